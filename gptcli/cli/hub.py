"""Commands about where models come from: `models` and `pull`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from gptcli.cli._common import AllowPickleOpt, JsonOpt, command, emit_json


@command()
def models(json_: JsonOpt = False) -> None:
    """The built-in model and the models in the local Hugging Face cache.

    Add one with `gptcli pull NAME` (hub id) or use any folder saved with save_pretrained: `-m ./folder`.
    """
    from rich.filesize import decimal

    from gptcli.hub import cached_models
    from gptcli.models import BUILTIN, builtin_path

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


@command()
def pull(
    name: Annotated[str, typer.Argument(help="Hub id, e.g. gpt2 or uer/gpt2-chinese-cluecorpussmall.")],
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Download a model from the Hugging Face hub into the local cache (progress on stderr)."""
    from gptcli.errors import UsageError
    from gptcli.hub import download
    from gptcli.models import check_model_folder, is_hub_id

    if not is_hub_id(name):
        raise UsageError(f"{name!r} is not a hub id (owner/name): local folders need no pull")
    path = download(name, allow_pickle=allow_pickle)
    check_model_folder(path, allow_pickle=allow_pickle, trust_remote_code=True)
    print(path)
