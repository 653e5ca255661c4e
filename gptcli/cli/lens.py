"""`gptcli lens`: the prediction after every layer (the logit lens)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

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
    progress,
    read_text,
    stdout,
)
from gptcli.cli._grids import (
    PICTURE_POSITIONS,
    DpiOpt,
    SaveOpt,
    cell_style,
    fitting_columns,
    is_plain,
    print_grid,
    save_grids,
    title,
)
from gptcli.generation.tokens import one_line
from gptcli.textio import check_text

if TYPE_CHECKING:
    from gptcli.inspection.lens import Lens
    from gptcli.inspection.pictures import Grid


@command(
    rich_help_panel=INSPECT,
    epilog=examples(
        "gptcli lens 'The capital of France is'",
        "gptcli lens 'I like' --at -1 -k 8",
        "gptcli lens 'The capital of France is' --token ' Paris'",
        "gptcli lens '今天天气' --save lens.html",
    ),
)
def lens(
    prompt: TextArg = None,
    file: FileOpt = None,
    model: ModelOpt = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Tokens per cell in --at, TSV and JSON.")] = 5,
    sublayer: Annotated[
        bool, typer.Option("--sublayer", help="Also decode the stream after each block's attention.")
    ] = False,
    at: Annotated[
        int | None,
        typer.Option("--at", metavar="POS", help="One position (-1: the last): a layer × top-k table."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", metavar="TEXT", help="Follow this next token's rank and probability."),
    ] = None,
    positions: Annotated[
        str | None,
        typer.Option(
            "--positions",
            metavar="SPEC",
            help="Which positions: all, 0,3,-1 or ranges 2:10, -8: (end excluded).",
        ),
    ] = None,
    save: SaveOpt = None,
    dpi: DpiOpt = 110,
    json_: JsonOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """The logit lens: what the model would predict after each of its layers.

    Each layer's residual stream goes through the model's own final LayerNorm and output layer; the
    last row is the model's real prediction (what `topk` shows). On a terminal: a grid of layers ×
    prompt positions, each cell the most likely next token, shaded by its probability, marked ✓ where
    it is the prompt's actual next token. Piped: tab-separated `layer position rank id piece prob
    logprob` lines (with --token: that token's line per cell).
    """
    from gptcli.inspection.lens import check_lens_options, logit_lens
    from gptcli.inspection.pictures import check_picture_options

    check_lens_options(k=k, positions=positions, at=at)
    check_picture_options(save, dpi)
    text = check_text(read_text(prompt, file))
    lm = load(model, device, dtype, allow_pickle, trust_remote_code)
    terminal = is_tty() and not json_
    # One position: --at, or --token alone (its rank at every layer of the last position).
    table = terminal and (at is not None or (token is not None and positions is None))
    chosen: str | list[int] | None = positions
    if table and at is None:
        at = -1
    if at is None and positions is None and terminal:  # the grid: only the positions that can be seen
        from gptcli.inspection.tracing import encode

        count = len(encode(lm, text).ids)
        shown = min(count, PICTURE_POSITIONS if save else fitting_columns(stdout(), label=10, column=9))
        if shown < count:
            note(f"showing the last {shown} of {count} positions; --positions chooses others")
        chosen = list(range(count - shown, count))
    with progress(0, "decoding layers") as update:
        result = logit_lens(
            lm, text, positions=chosen, at=at, k=k, sublayer=sublayer, token=token, on_progress=update
        )
    if result.prompt.dropped:
        note(f"the prompt has more tokens than the context ({lm.context_length}); kept the last ones")
    if result.target is not None and result.target_pieces > 1:
        first = result.target["token"]
        note(f"--token {token!r} is {result.target_pieces} tokens; following its first, {first!r}")
    if save is not None:
        drawn = result.positions[-PICTURE_POSITIONS:] if positions is None else result.positions
        if len(drawn) < len(result.positions):
            note(f"the picture shows the last {len(drawn)} positions; --positions chooses others")
        save_grids([_lens_grid(result, drawn)], save, title(lm.name, text), dpi)
    if json_:
        emit_json(result.to_json(lm.name))
    elif table:
        _lens_table(result)
    elif terminal:
        print_grid(_lens_grid(result, result.positions), stdout(), marks="✓")
    else:
        _lens_tsv(result)


def _lens_grid(result: Lens, positions: list[int]) -> Grid:
    from gptcli.inspection.lens import lens_grid

    return lens_grid(result, positions)


def _lens_tsv(result: Lens) -> None:
    for row in result.rows:
        for i, position in enumerate(result.positions):
            if row.target is not None:
                t = row.target[i]
                print(
                    f"{row.label}\t{position}\t{t['rank']}\t{t['id']}\t{one_line(t['token'])}\t{t['prob']:.6g}\t{t['logprob']:.6g}"
                )
                continue
            for rank, t in enumerate(row.top[i], 1):
                print(
                    f"{row.label}\t{position}\t{rank}\t{t['id']}\t{one_line(t['token'])}\t{t['prob']:.6g}\t{t['logprob']:.6g}"
                )


def _lens_table(result: Lens) -> None:
    """One position: a row per layer, its top k (shaded by probability), and the --token's rank."""
    from rich.table import Table
    from rich.text import Text

    console = stdout()
    position = result.positions[0]
    piece = result.prompt.tokens[position]["token"]
    table = Table(
        box=None,
        header_style="bold",
        title=f"after position {position} ({piece!r}): the top {len(result.rows[0].top[0])} at each layer",
        title_justify="left",
    )
    table.add_column("layer", justify="right", no_wrap=True, min_width=10)
    for rank in range(1, len(result.rows[0].top[0]) + 1):
        table.add_column(f"#{rank}", no_wrap=True, overflow="ellipsis", max_width=18)
    if result.target is not None:
        table.add_column(f"{result.target['token']!r}", justify="right", no_wrap=True)
    for row in result.rows:
        cells: list[Any] = [row.name]
        for t in row.top[0]:
            style = "" if is_plain(console) else cell_style(console, "blue", t["prob"])
            cells.append(Text(f"{one_line(t['token'])} {100 * t['prob']:.0f}%", style=style))
        if row.target is not None:
            t = row.target[0]
            cells.append(f"rank {t['rank']}  {100 * t['prob']:.2f}%")
        table.add_row(*cells)
    console.print(table)
