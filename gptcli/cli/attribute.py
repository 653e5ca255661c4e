"""`gptcli attribute`: which heads and MLPs wrote a logit (direct logit attribution)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from gptcli.cli._common import (
    INSPECT,
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    FileOpt,
    JsonOpt,
    ModelOpt,
    TextArg,
    TrustCodeOpt,
    command,
    emit_json,
    examples,
    is_tty,
    load,
    note,
    read_text,
    stdout,
)
from gptcli.cli._grids import DpiOpt, SaveOpt, is_plain, save_grids, title
from gptcli.cli._targets import FoilIdOpt, FoilOpt, TargetIdOpt, TargetOpt
from gptcli.textio import check_text

if TYPE_CHECKING:
    from gptcli.inspection.attribution import Attribution

TOP = 16  # parts listed on a terminal
TOP_HEADS = 3  # heads whose sources are listed
TOP_SOURCES = 3


@command(
    rich_help_panel=INSPECT,
    epilog=examples(
        "gptcli attribute 'The capital of France is'",
        "gptcli attribute '今天天气很' --target 好 --foil 差",
        "gptcli attribute 'I like' --json",
        "gptcli attribute 'I like tea' --at 1 --save dla.png",
    ),
)
def attribute(
    prompt: TextArg = None,
    file: FileOpt = None,
    model: ModelOpt = None,
    at: Annotated[
        int,
        typer.Option("--at", metavar="POS", help="The position whose prediction to explain (-1: the last)."),
    ] = -1,
    target: TargetOpt = None,
    target_id: TargetIdOpt = None,
    foil: FoilOpt = None,
    foil_id: FoilIdOpt = None,
    save: SaveOpt = None,
    dpi: DpiOpt = 110,
    json_: JsonOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Direct logit attribution: how much each head, MLP and the embeddings wrote the target's logit.

    The residual stream is a sum of parts; each goes through the final LayerNorm with its scale frozen
    at the real pass's value, into the output layer. The parts plus the LayerNorm's bias term equal
    the logit. On a terminal: the largest parts with bars, the positions the top heads read from, and
    the sum check. Piped: tab-separated `kind layer head position logit` lines (a head's `source`
    lines follow it; then `bias` and `logit`).
    """
    from gptcli.inspection.attribution import (
        attribute as run,
    )
    from gptcli.inspection.attribution import (
        attribution_grid,
        check_token_options,
        token_id,
    )
    from gptcli.inspection.pictures import check_picture_options

    check_token_options(target=target, target_id=target_id, foil=foil, foil_id=foil_id)
    check_picture_options(save, dpi)
    text = check_text(read_text(prompt, file))
    lm = load(model, device, dtype, allow_pickle, trust_remote_code)
    result = run(
        lm,
        text,
        position=at,
        target=token_id(lm, target, target_id, "--target"),
        foil=token_id(lm, foil, foil_id, "--foil"),
    )
    if result.prompt.dropped:
        note(f"the prompt has more tokens than the context ({lm.context_length}); kept the last ones")
    if save is not None:
        save_grids([attribution_grid(result)], save, title(lm.name, text), dpi)
    if json_:
        emit_json(result.to_json())
    elif is_tty():
        _show(result)
    else:
        _tsv(result)


def _tsv(result: Attribution) -> None:
    for c in result.components:
        layer = "-" if c.layer is None else c.layer
        head = "-" if c.head is None else c.head
        print(f"{c.kind}\t{layer}\t{head}\t-\t{c.logit:.6g}")
        for position, logit in c.sources or []:
            print(f"source\t{layer}\t{head}\t{position}\t{logit:.6g}")
    print(f"bias\t-\t-\t-\t{result.bias:.6g}")
    print(f"logit\t-\t-\t{result.position}\t{result.logit:.6g}")


def _what(result: Attribution) -> str:
    what = f"the logit of {result.target['token']!r}"
    if result.foil is not None:
        what += f" minus that of {result.foil['token']!r}"
    token = result.prompt.tokens[result.position]["token"]
    return f"{what} after position {result.position} ({token!r})"


def _show(result: Attribution) -> None:
    """The largest parts with signed bars, the top heads' sources, and the sum check."""
    from rich.table import Table
    from rich.text import Text

    console = stdout()
    plain = is_plain(console)
    ranked = result.ranked()[:TOP]
    largest = max(abs(c.logit) for c in ranked) or 1.0
    table = Table(
        box=None,
        header_style="bold",
        title=f"direct logit attribution: {_what(result)}",
        title_justify="left",
    )
    table.add_column("part", justify="right", no_wrap=True)
    table.add_column("logit", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for c in ranked:
        bar = "█" * max(1, round(20 * abs(c.logit) / largest))
        # Plain red and blue: readable on 16 colours as on 256; NO_COLOR keeps the sign.
        style = "" if plain else ("red" if c.logit >= 0 else "blue")
        table.add_row(c.label, f"{c.logit:+.4f}", Text(("+" if c.logit >= 0 else "-") + bar, style=style))
    console.print(table)
    tokens = [t["token"] for t in result.prompt.tokens]
    for c in [c for c in ranked if c.kind == "head"][:TOP_HEADS]:
        top = sorted(c.sources or [], key=lambda s: -abs(s[1]))[:TOP_SOURCES]
        reads = ", ".join(f"{j} {tokens[j]!r} {x:+.3f}" for j, x in top)
        console.print(f"head {c.label} reads from: {reads}")
    check = Text(
        f"{len(result.components)} parts {result.total - result.bias:+.4f} + ln_f bias {result.bias:+.4f} "
        f"= {result.total:.4f}; the model's logit: {result.logit:.4f}",
        style="dim",
    )
    console.print(check)
