"""Commands about where models come from: `models` (list, rm) and `pull`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gptcli.cli._common import MODELS, AllowPickleOpt, Group, JsonOpt, app, command, emit_json, note

models_app = typer.Typer(
    name="models",
    cls=Group,
    help="The built-in model and the models in the local Hugging Face cache.",
    invoke_without_command=True,
    no_args_is_help=False,
    rich_markup_mode="rich",
    epilog="[bold]Examples[/bold]\n\n  gptcli models\n  gptcli models --json | jq -r .id\n"
    "  gptcli models rm gpt2\n",
)
app.add_typer(models_app, rich_help_panel=MODELS)


@models_app.callback()
def models(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """The built-in model and the models in the local Hugging Face cache, with their sizes.

    Add one with `gptcli pull NAME` (hub id) or use any folder saved with save_pretrained: `-m ./folder`.
    Remove one with `gptcli models rm NAME`.
    """
    if ctx.invoked_subcommand is not None:
        return
    from rich.filesize import decimal

    from gptcli.loading.hub import cached_models
    from gptcli.loading.models import BUILTIN, builtin_path

    found: list[dict[str, Any]] = []
    if (builtin_path() / "config.json").is_file():
        size = sum(f.stat().st_size for f in builtin_path().iterdir() if f.is_file())
        found.append({"id": BUILTIN, "size": size, "path": str(builtin_path())})
    found += cached_models()
    if json_:
        for entry in found:
            emit_json(entry)
        return
    width = max((len(m["id"]) for m in found), default=0)
    for m in found:
        print(f"{m['id']:<{width}}  {decimal(m['size']):>9}  {m['path']}")
    if len(found) <= 1:
        print("(add models with `gptcli pull NAME`, or pass -m with a folder saved by save_pretrained)")


@command(name="rm", app_=models_app)
def rm(
    name: Annotated[str, typer.Argument(help="Hub id of a cached model, as `gptcli models` lists it.")],
) -> None:
    """Remove a model from the local Hugging Face cache, every revision of it, and say what was freed."""
    from rich.filesize import decimal

    from gptcli.errors import UsageError
    from gptcli.loading.hub import remove_cached
    from gptcli.loading.models import BUILTIN

    if name == BUILTIN:
        raise UsageError("the built-in model is part of gptcli and cannot be removed")
    freed, _ = remove_cached(name)
    print(f"removed {name} ({decimal(freed)} freed)")


@command(
    rich_help_panel=MODELS,
    epilog="[bold]Examples[/bold]\n\n  gptcli pull gpt2\n  gptcli pull uer/gpt2-chinese-cluecorpussmall\n"
    "  gptcli pull gpt2 --revision 607a30d783dfa663caf39e06633721c8d4cfcd7e\n",
)
def pull(
    name: Annotated[str, typer.Argument(help="Hub id, e.g. gpt2 or uer/gpt2-chinese-cluecorpussmall.")],
    revision: Annotated[
        str | None,
        typer.Option(help="A branch, tag or commit of the repo. \\[default: main]", show_default=False),
    ] = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Download a model from the Hugging Face hub into the local cache (progress on stderr).

    Prints the folder it is in. A model already in the cache is checked for updates when the hub
    answers; offline, the cached copy is the answer.
    """
    from gptcli.errors import UsageError
    from gptcli.loading.hub import cached_snapshot, download, hub_reachable, unreachable_reason
    from gptcli.loading.models import check_model_folder, is_hub_id

    if not is_hub_id(name):
        try:
            local = Path(name).expanduser().exists()
        except (OSError, ValueError):
            local = False
        if local:
            raise UsageError(f"{name} is a local folder: it needs no pull, use it with -m {name}")
        raise UsageError(
            f"{name!r} is not a hub id: a hub id is NAME or OWNER/NAME of letters, digits, '-', '_' and '.' "
            "(e.g. gpt2, uer/gpt2-chinese-cluecorpussmall)"
        )
    cached = cached_snapshot(name, revision)
    if hub_reachable():
        path = download(name, allow_pickle=allow_pickle, probed=True, revision=revision)
    elif cached is not None:
        note(f"{name} is already cached at {cached} ({unreachable_reason()}: not checked for updates)")
        path = cached
    else:
        path = download(
            name,
            allow_pickle=allow_pickle,
            probed=False,
            revision=revision,
            fix=f"connect (or point HF_ENDPOINT at a mirror) and run `gptcli pull {name}` again",
        )
    check_model_folder(path, allow_pickle=allow_pickle, trust_remote_code=True)
    print(path)
