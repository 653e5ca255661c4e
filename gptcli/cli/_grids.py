"""Heat-map grids on the terminal and into files, shared by lens, attention and the other views."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gptcli.cli._common import note

if TYPE_CHECKING:
    from rich.console import Console

    from gptcli.inspection.pictures import Grid

SaveOpt = Annotated[
    Path | None,
    typer.Option("--save", metavar="FILE", help="Also draw the heat map into FILE: .png, .svg or .html."),
]
DpiOpt = Annotated[
    int,
    typer.Option(
        "--dpi",
        help="Resolution of a --save PNG (a cell is 0.75 inch wide); a picture larger than 4096 pixels a "
        "side is drawn at a lower one.",
    ),
]
PICTURE_POSITIONS = 64  # a picture wider than this is no longer readable


def title(model: str, text: str) -> str:
    shown = text if len(text) <= 60 else text[:59] + "…"
    return f"{model}: {shown!r}"


def save_grids(grids: list[Grid], path: Path, title: str, dpi: int) -> None:
    from gptcli.inspection.pictures import save

    for message in save(grids, path, title=title, dpi=dpi):
        note(message)
    note(f"wrote {path}")


def is_plain(console: Console) -> bool:
    """No colours to shade with (NO_COLOR, a dumb terminal): cells then carry a shade character."""
    return console.no_color or console.color_system is None


def fitting_columns(console: Console, *, label: int, column: int) -> int:
    return max(1, (console.width - label) // column)


_SHADES = " ░▒▓█"


# With 16 colours, shades of one hue collapse into one grey: four steps of standard colours instead.
_STANDARD = {
    "blue": ("", "black on bright_cyan", "black on cyan", "bright_white on blue"),
    "orange": ("", "black on bright_yellow", "black on yellow", "bright_white on red"),
}


def cell_style(console: Console, palette: str, shade: float) -> str:
    """The style of a cell of `shade` (0 to 1): a background from the palette and ink that reads on it."""
    from gptcli.inspection.pictures import colour, ink

    if console.color_system in ("standard", "windows"):
        t = shade**0.5
        return _STANDARD[palette][0 if t < 0.3 else 1 if t < 0.55 else 2 if t < 0.8 else 3]
    background = colour(palette, shade)
    r, g, b = background
    return f"{ink(background)} on rgb({r},{g},{b})"


def print_grid(grid: Grid, console: Console, *, marks: str = "") -> None:
    """A Grid as a rich table: the last columns that fit the terminal, cells shaded by their value."""
    from rich.cells import cell_len
    from rich.table import Table
    from rich.text import Text

    plain = is_plain(console)
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
            style = "bright_black" if shade is None else cell_style(console, grid.palette, shade)
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
