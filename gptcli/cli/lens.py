"""Looking inside the model: lens (the prediction after every layer) and attention (what it draws on)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gptcli.cli._common import (
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
    is_tty,
    load,
    note,
    progress,
    read_text,
    stdout,
)
from gptcli.textio import check_text

if TYPE_CHECKING:
    from rich.console import Console

    from gptcli.lens import Lens
    from gptcli.pictures import Grid

SaveOpt = Annotated[
    Path | None,
    typer.Option("--save", metavar="FILE", help="Also draw the heat map into FILE: .png, .svg or .html."),
]
PICTURE_POSITIONS = 64  # a picture wider than this is no longer readable


@command(
    epilog="Examples: gptcli lens 'The capital of France is' · gptcli lens 'I like' --at -1 -k 8 · "
    "gptcli lens 'The capital of France is' --token ' Paris' · gptcli lens '今天天气' --save lens.html"
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
    from gptcli.lens import check_lens_options, logit_lens
    from gptcli.pictures import check_save_path

    check_lens_options(k=k, positions=positions, at=at)
    if save is not None:
        check_save_path(save)
    text = check_text(read_text(prompt, file))
    lm = load(model, device, dtype, allow_pickle, trust_remote_code)
    terminal = is_tty() and not json_
    # One position: --at, or --token alone (its rank at every layer of the last position).
    table = terminal and (at is not None or (token is not None and positions is None))
    chosen: str | list[int] | None = positions
    if table and at is None:
        at = -1
    if at is None and positions is None and terminal:  # the grid: only the positions that can be seen
        from gptcli.tracing import encode

        count = len(encode(lm, text).ids)
        shown = min(count, PICTURE_POSITIONS if save else _fitting_columns(stdout(), label=10, column=9))
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
        _save([_lens_grid(result, drawn)], save, _title(lm.name, text))
    if json_:
        emit_json(result.to_json(lm.name))
    elif table:
        _lens_table(result)
    elif terminal:
        _print_grid(_lens_grid(result, result.positions), stdout(), marks="✓")
    else:
        _lens_tsv(result)


def _lens_grid(result: Lens, positions: list[int]) -> Grid:
    from gptcli.lens import lens_grid

    return lens_grid(result, positions)


def _lens_tsv(result: Lens) -> None:
    for row in result.rows:
        for i, position in enumerate(result.positions):
            if row.target is not None:
                t = row.target[i]
                print(
                    f"{row.label}\t{position}\t{t['rank']}\t{t['id']}\t{t['token']}\t{t['prob']:.6g}\t{t['logprob']:.6g}"
                )
                continue
            for rank, t in enumerate(row.top[i], 1):
                print(
                    f"{row.label}\t{position}\t{rank}\t{t['id']}\t{t['token']}\t{t['prob']:.6g}\t{t['logprob']:.6g}"
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
            style = "" if _plain(console) else _style(console, "blue", t["prob"])
            cells.append(Text(f"{t['token']} {100 * t['prob']:.0f}%", style=style))
        if row.target is not None:
            t = row.target[0]
            cells.append(f"rank {t['rank']}  {100 * t['prob']:.2f}%")
        table.add_row(*cells)
    console.print(table)


@command(
    epilog="Examples: gptcli attention '今天天气很好，我们去' · gptcli attention 'I like' --layer 3 · "
    "gptcli attention 'The cat sat' --head 2.1 --query all · gptcli attention 'I like tea' --rollout"
)
def attention(
    prompt: TextArg = None,
    file: FileOpt = None,
    model: ModelOpt = None,
    layer: Annotated[
        int | None, typer.Option("--layer", metavar="L", help="The heads of block L (1 = the first).")
    ] = None,
    head: Annotated[
        str | None, typer.Option("--head", metavar="L.H", help="One head: block L, head H (0 = the first).")
    ] = None,
    query: Annotated[
        str | None,
        typer.Option(
            "--query", metavar="POS|all", help="Which positions look (default: the last); all, 3, 2:8."
        ),
    ] = None,
    rollout: Annotated[
        bool, typer.Option("--rollout", help="Attention rollout through all layers (a heuristic).")
    ] = False,
    hide_sink: Annotated[
        bool,
        typer.Option("--hide-sink", help="Leave the first token (the attention sink) out of the shading."),
    ] = False,
    save: SaveOpt = None,
    json_: JsonOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Attention weights: how much each position draws on each earlier token, per block and head.

    On a terminal: for the last position (the one that predicts the next token), a blocks × tokens
    heat map of the weights averaged over the heads, in percent. Piped: tab-separated `layer head
    query key piece weight` lines (blocks count from 1, heads from 0; keys after the query are left
    out, their weight is 0).
    """
    from gptcli.attention import (
        attention_grids,
        attention_weights,
        check_attention_options,
        check_layer_head,
        parse_head,
    )
    from gptcli.pictures import check_save_path

    check_attention_options(layer=layer, head=head, query=query, rollout=rollout)
    if save is not None:
        check_save_path(save)
    text = check_text(read_text(prompt, file))
    lm = load(model, device, dtype, allow_pickle, trust_remote_code)
    chosen_head = parse_head(head) if head is not None else None
    check_layer_head(lm, layer, chosen_head)
    result = attention_weights(lm, text, queries=query, rollout=rollout)
    if result.prompt.dropped:
        note(f"the prompt has more tokens than the context ({lm.context_length}); kept the last ones")

    def grids() -> list[Grid]:
        return attention_grids(result, layer=layer, head=chosen_head, rollout=rollout, hide_sink=hide_sink)

    if save is not None:
        _save(grids(), save, _title(lm.name, text))
    if json_:
        for piece in result.json_pieces(lm.name):
            sys.stdout.write(piece)
        sys.stdout.flush()
    elif is_tty():
        console = stdout()
        for grid in grids():
            _print_grid(grid, console)
    else:
        tokens = [t["token"] for t in result.prompt.tokens]
        if rollout and result.rollout is not None:
            for i, q in enumerate(result.queries):
                for j in range(q + 1):
                    print(f"rollout\t-\t{q}\t{j}\t{tokens[j]}\t{result.rollout[i, j]:.6g}")
            return
        blocks = (
            [chosen_head[0]] if chosen_head else [layer] if layer else range(1, result.weights.shape[0] + 1)
        )
        heads = [chosen_head[1]] if chosen_head else range(result.weights.shape[1])
        for block in blocks:
            for h in heads:
                for i, q in enumerate(result.queries):
                    weights = result.weights[block - 1, h, i]
                    for j in range(q + 1):
                        print(f"{block}\t{h}\t{q}\t{j}\t{tokens[j]}\t{weights[j]:.6g}")


# --- Rendering ----------------------------------------------------------------------------------------


def _title(model: str, text: str) -> str:
    shown = text if len(text) <= 60 else text[:59] + "…"
    return f"{model}: {shown!r}"


def _save(grids: list[Grid], path: Path, title: str) -> None:
    from gptcli.pictures import save

    for message in save(grids, path, title=title):
        note(message)
    note(f"wrote {path}")


def _plain(console: Console) -> bool:
    """No colours to shade with (NO_COLOR, a dumb terminal): cells then carry a shade character."""
    return console.no_color or console.color_system is None


def _fitting_columns(console: Console, *, label: int, column: int) -> int:
    return max(1, (console.width - label) // column)


_SHADES = " ░▒▓█"


# With 16 colours, shades of one hue collapse into one grey: four steps of standard colours instead.
_STANDARD = {
    "blue": ("", "black on bright_cyan", "black on cyan", "bright_white on blue"),
    "orange": ("", "black on bright_yellow", "black on yellow", "bright_white on red"),
}


def _style(console: Console, palette: str, shade: float) -> str:
    """The style of a cell of `shade` (0 to 1): a background from the palette and ink that reads on it."""
    from gptcli.pictures import colour, ink

    if console.color_system in ("standard", "windows"):
        t = shade**0.5
        return _STANDARD[palette][0 if t < 0.3 else 1 if t < 0.55 else 2 if t < 0.8 else 3]
    background = colour(palette, shade)
    r, g, b = background
    return f"{ink(background)} on rgb({r},{g},{b})"


def _print_grid(grid: Grid, console: Console, *, marks: str = "") -> None:
    """A Grid as a rich table: the last columns that fit the terminal, cells shaded by their value."""
    from rich.cells import cell_len
    from rich.table import Table
    from rich.text import Text

    plain = _plain(console)
    limit = 9 if marks else 6
    widths = []
    for j, heading in enumerate(grid.columns):
        longest = max([cell_len(heading), *(cell_len(row[j]) + len(marks) + plain for row in grid.texts)])
        widths.append(max(3, min(limit, longest)))
    label_width = min(16, max(cell_len(grid.row_title), *(cell_len(r) for r in grid.rows)))
    first, used = len(widths), label_width
    while first > 0 and used + widths[first - 1] + 1 <= console.width:
        first -= 1
        used += widths[first] + 1
    first = min(first, len(widths) - 1)
    table = Table(box=None, padding=(0, 1, 0, 0), header_style="bold", title=grid.title, title_justify="left")
    table.add_column(
        grid.row_title, justify="right", no_wrap=True, max_width=label_width, overflow="ellipsis"
    )
    for j in range(first, len(widths)):
        table.add_column(grid.columns[j], no_wrap=True, overflow="ellipsis", width=widths[j])
    for i, name in enumerate(grid.rows):
        cells: list[Any] = [name]
        for j in range(first, len(widths)):
            if grid.values[i][j] is None:
                cells.append("")
                continue
            content = grid.texts[i][j]
            marked = bool(grid.marks and grid.marks[i][j])
            shade = grid.shade(i, j)
            if plain:
                glyph = "·" if shade is None else _SHADES[min(4, int(shade * 5))]
                cells.append(Text(glyph + content + (marks if marked else "")))
                continue
            style = "bright_black" if shade is None else _style(console, grid.palette, shade)
            cell = Text(content, style=style)
            if marked:
                cell.append(marks, style="bold")
            cells.append(cell)
        table.add_row(*cells)
    console.print(table)
    caption = grid.caption + (f"; {marks}: {grid.mark_meaning}" if marks else "")
    if plain:
        caption += f"; shade {_SHADES[1]}{_SHADES[2]}{_SHADES[3]}{_SHADES[4]}: low to high"
    if first:
        caption += f"; {first} columns on the left do not fit the terminal"
    console.print(Text(caption, style="dim"))
