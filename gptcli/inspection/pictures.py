"""Heat maps of `lens` and `attention` as files: PNG and SVG drawn with matplotlib, or one HTML page.

A `Grid` is what both commands draw, on a terminal (gptcli.cli.lens) or here: labelled rows and
columns, a value per cell (its shade), a text per cell, and what hovering the cell shows in HTML.

matplotlib is used through its Figure API with an Agg canvas, never pyplot: no global backend, no
display needed. Labels with Chinese characters need a font that has them; matplotlib's own DejaVu Sans
has none, so a CJK font installed on the machine is looked up (Noto Sans CJK from Debian's
fonts-noto-cjk, Source Han Sans, WenQuanYi, ...). Without one, a PNG shows such characters as their
UTF-8 bytes, `<e4 bb 8a>`, the notation `tokenize` uses, instead of empty boxes.
"""

from __future__ import annotations

import html
import math
import re
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = (".png", ".svg", ".html")
# Families that hold CJK characters, most common first (Linux, then macOS and Windows).
CJK_FAMILIES = (
    "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Noto Sans SC",
    "Noto Serif CJK SC", "Source Han Sans SC", "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
    "Droid Sans Fallback", "AR PL UMing CN", "AR PL UKai CN", "PingFang SC", "Hiragino Sans GB",
    "Heiti SC", "STHeiti", "Microsoft YaHei", "SimHei", "SimSun", "Arial Unicode MS",
)  # fmt: skip
_CJK_FILE = re.compile(
    r"CJK|SourceHan|WenQuanYi|wqy|DroidSansFallback|uming|ukai|PingFang|Hiragino|msyh|simhei|simsun|"
    r"NotoSans(SC|TC|JP|KR)",
    re.IGNORECASE,
)
# Two shades per palette, light to dark: probabilities in blue, attention in orange (ColorBrewer);
# "signed" values (attribution, patching) are red above zero and blue below.
PALETTES = {
    "blue": ((247, 251, 255), (8, 48, 107)),
    "orange": ((255, 245, 235), (127, 39, 4)),
    "red": ((255, 245, 240), (103, 0, 13)),
}


@dataclass
class Grid:
    """A heat map: rows × columns of cells, each with a value in [0, 1] (signed: any sign, shaded up to
    `limit` or the largest magnitude), a text and hover details."""

    title: str
    rows: list[str]
    columns: list[str]  # column headings (token pieces)
    values: list[list[float | None]]  # None: no cell (a key after the query)
    texts: list[list[str]]
    details: list[list[str]]  # shown when hovering the cell (HTML)
    marks: list[list[bool]] | None = None  # cells to outline (lens: the top-1 is the actual next token)
    mark_meaning: str = ""
    palette: str = "blue"
    dim_columns: tuple[int, ...] = ()  # left out of the shading (the attention sink)
    caption: str = ""
    row_title: str = ""
    signed: bool = False  # palette "signed": red above zero, blue below
    limit: float | None = None  # signed: the magnitude that gets the darkest shade (default: the largest)

    @property
    def scale(self) -> float:
        """The value that gets the darkest shade: 1, or the largest value outside the dimmed columns;
        signed: `limit`, or the largest magnitude."""
        if self.signed:
            return (
                self.limit
                or max((abs(v) for row in self.values for v in row if v is not None), default=0.0)
                or 1.0
            )
        if not self.dim_columns:
            return 1.0
        rest = [
            v for row in self.values for j, v in enumerate(row) if v is not None and j not in self.dim_columns
        ]
        return max(rest, default=0.0) or 1.0

    def shade(self, row: int, column: int) -> float | None:
        """How dark the cell is, 0 to 1 (signed: -1 to 1); None for no cell or a dimmed column."""
        value = self.values[row][column]
        if value is None or column in self.dim_columns:
            return None
        return min(1.0, max(-1.0 if self.signed else 0.0, value / self.scale))


def visible(piece: str) -> str:
    """A piece as a label: on one line (`\\n` for a newline), and one made only of spaces shows them as
    ␣ (a blank label reads as no token)."""
    from gptcli.generation.tokens import one_line

    return "␣" * len(piece) if piece and not piece.strip(" ") else one_line(piece)


def colour(palette: str, shade: float) -> tuple[int, int, int]:
    """The palette's colour at `shade` (0 light, 1 dark; "signed": -1 dark blue to 1 dark red)."""
    if palette == "signed":
        palette, shade = ("red", shade) if shade >= 0 else ("blue", -shade)
    light, dark = PALETTES[palette]
    # A square root spreads the small values, where most cells are, over more of the range.
    t = math.sqrt(max(0.0, min(1.0, shade)))
    return tuple(round(a + (b - a) * t) for a, b in zip(light, dark, strict=True))  # type: ignore[return-value]


def ink(background: tuple[int, int, int]) -> str:
    """ "black" or "white", whichever reads on `background`."""
    r, g, b = background
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"


def check_save_path(path: Path) -> None:
    """Refuse a --save FILE that cannot be written (its kind, its folder), before any work is done."""
    import os

    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"--save {path}: the file name must end in {', '.join(FORMATS)}")
    folder = path.expanduser().parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UsageError(f"--save {path}: {folder} {what}")
    if path.expanduser().is_dir():
        raise UsageError(f"--save {path}: that is a folder; give a file name")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--save {path}: the folder {folder} is not writable")


DPI = 110  # dots per inch of a PNG: a cell is 0.75 inch wide
MAX_SIDE = 4096  # most pixels a PNG side gets: larger ones are drawn at a lower resolution


def check_picture_options(save: Path | None, dpi: int) -> None:
    """--save and --dpi of a command that draws: both checked before any model loads (exit 2)."""
    check_dpi(dpi)
    if save is not None:
        check_save_path(save)


def check_dpi(dpi: int) -> None:
    if not 20 <= dpi <= 600:
        raise UsageError(f"--dpi must be between 20 and 600 (got {dpi})")


def save(grids: list[Grid], path: Path, *, title: str, dpi: int = DPI) -> list[str]:
    """Write the grids to `path` (.png, .svg or .html); returns notes for the user (a missing font, a
    picture drawn at a lower resolution than `dpi` to stay within MAX_SIDE pixels a side)."""
    from gptcli.training.atomic import atomic_write

    check_save_path(path)
    kind = path.suffix.lower()
    notes: list[str] = []
    if kind == ".html":
        page = to_html(grids, title=title).encode("utf-8")
        atomic_write(path, lambda f: f.write(page))
        return notes
    font = cjk_font()
    if font is None and kind == ".png" and any(_missing(label) for label in _labels(grids)):
        notes.append(
            "no CJK font found (install one, e.g. Debian's fonts-noto-cjk): characters DejaVu Sans "
            "cannot draw are shown as their bytes, e.g. <e4 bb 8a>"
        )
    fig = figure(grids, title=title, fallback=font is None and kind == ".png")
    if kind == ".png":
        check_dpi(dpi)
        width, height = fig.get_size_inches()
        fitting = min(dpi, int(MAX_SIDE / max(width, height)))
        if fitting < dpi:
            notes.append(
                f"the picture would be {round(width * dpi)} x {round(height * dpi)} px at --dpi {dpi}: "
                f"drawn at {fitting} dpi to stay within {MAX_SIDE} px a side (fewer positions, blocks or "
                "heads give larger cells)"
            )
        fig.set_dpi(fitting)
    from matplotlib import rc_context

    # SVG keeps text as text: searchable, and drawn with the viewer's fonts, which have CJK glyphs.
    with rc_context({"svg.fonttype": "none"}), warnings.catch_warnings():
        # Characters no font has: the note above says so once, instead of a warning per glyph.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        atomic_write(
            path,
            lambda f: fig.savefig(f, format=kind[1:], metadata=_metadata(title, kind), dpi=fig.get_dpi()),
        )
    return notes


def _metadata(title: str, kind: str) -> dict[str, str]:
    return {"Title": title, "Software": "gptcli"} if kind == ".png" else {"Title": title}


def _labels(grids: list[Grid]) -> list[str]:
    return [s for g in grids for s in (g.title, *g.rows, *g.columns, *(t for r in g.texts for t in r))]


@cache
def cjk_font() -> str | None:
    """The family name of an installed font with CJK characters, or None."""
    from matplotlib import font_manager

    installed = {f.name: f.fname for f in font_manager.fontManager.ttflist}
    for family in CJK_FAMILIES:
        if family in installed and _has_glyphs(installed[family], "今天气"):
            return family
    for name, file in sorted(installed.items()):  # any other font whose name says CJK
        if "CJK" in name and _has_glyphs(file, "今天气"):
            return name
    # matplotlib lists the fonts it found when its cache was built: one installed since is not in it.
    files = sorted(
        (f for f in font_manager.findSystemFonts() if _CJK_FILE.search(Path(f).name)),
        key=lambda f: ("Regular" not in f, "Sans" not in f, f),
    )
    for file in files:
        if _has_glyphs(file, "今天气"):
            try:
                font_manager.fontManager.addfont(file)
            except (OSError, RuntimeError, ValueError):
                continue
            return str(font_manager.FontProperties(fname=file).get_name())
    return None


def _has_glyphs(file: str, text: str) -> bool:
    from matplotlib.ft2font import FT2Font

    try:
        font = FT2Font(file)
        return all(font.get_char_index(ord(ch)) for ch in text)
    except (OSError, RuntimeError, ValueError):
        return False


@cache
def _default_charset() -> frozenset[int]:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(font_manager.findfont("DejaVu Sans")).get_charmap())


def _missing(text: str) -> bool:
    charset = _default_charset()
    return any(ord(ch) not in charset for ch in text)


def drawable(text: str) -> str:
    """`text` with every run of characters DejaVu Sans cannot draw replaced by its bytes, <e4 bb 8a>."""
    charset = _default_charset()
    out, pending = [], ""
    for ch in text:
        if ord(ch) in charset:
            if pending:
                out.append("<" + " ".join(f"{b:02x}" for b in pending.encode("utf-8")) + ">")
                pending = ""
            out.append(ch)
        else:
            pending += ch
    if pending:
        out.append("<" + " ".join(f"{b:02x}" for b in pending.encode("utf-8")) + ">")
    return "".join(out)


def _colour_map(palette: str) -> Any:
    """The matplotlib colour map of a palette (on square-rooted shades, as `colour` spreads them)."""
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    if palette == "signed":
        blue, red = PALETTES["blue"][1], PALETTES["red"][1]
        stops = [np.array(c) / 255 for c in (blue, (255, 255, 255), red)]
    else:
        stops = [np.array(c) / 255 for c in PALETTES[palette]]
    return LinearSegmentedColormap.from_list(palette, stops).with_extremes(bad="#ffffff")


_CELL = 0.75  # inches a cell is wide
_CELL_CHARS = 12  # characters of 7-point DejaVu Sans that fit in a cell (about 0.6 em each)
_LABEL_CHARS = 16  # of a row or column label (a piece in byte notation is 4 characters a byte)


def fit(text: str, width: int) -> str:
    """`text` cut to `width` characters, its end marked with …, so a cell's text stays in its cell
    instead of running over its neighbours (and the first column's over the row labels)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _wrapped(text: str, fig: Figure, points: float, lines: int = 2) -> str:
    """`text` in at most `lines` lines of `points`-point text as wide as the figure (matplotlib's own
    wrap=True is not seen by the constrained layout, which then squeezes the heat map to nothing)."""
    import textwrap

    width = max(20, int((fig.get_figwidth() - 0.3) * 72 / (points * 0.62)))
    return "\n".join(textwrap.wrap(fit(text, width * lines), width, replace_whitespace=False)[:lines])


def figure(grids: list[Grid], *, title: str, fallback: bool = False) -> Figure:
    """A matplotlib Figure with one heat map per grid, stacked; `fallback`: no CJK font, use bytes."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    label = drawable if fallback else (lambda s: s)
    font = cjk_font()
    families = ["DejaVu Sans", *([font] if font else [])]
    columns = max(len(g.columns) for g in grids)
    # Under each grid's rows: its title (up to two lines) and its column labels (up to 16 characters,
    # slanted), which take about 0.05 inch a character.
    heights = [len(g.rows) * 0.32 + 1.0 + 0.05 * max(len(fit(label(c), _LABEL_CHARS)) for c in g.columns)
               for g in grids]  # fmt: skip
    fig = Figure(figsize=(2.0 + columns * _CELL, sum(heights) + 0.9), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    # Titles wrapped to the figure's width (a long one, in byte notation above all, was cut at both ends).
    fig.suptitle(_wrapped(label(title), fig, 12), fontfamily=families, parse_math=False)
    axes = fig.subplots(len(grids), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, grid in zip(axes, grids, strict=True):
        cmap = _colour_map(grid.palette)
        shades = np.array(
            [[math.nan if (s := grid.shade(i, j)) is None else math.copysign(math.sqrt(abs(s)), s)
              for j in range(len(grid.columns))]
             for i in range(len(grid.rows))]
        )  # fmt: skip
        ax.imshow(
            np.ma.masked_invalid(shades),
            cmap=cmap,
            vmin=-1 if grid.signed else 0,
            vmax=1,
            aspect="auto",
            interpolation="none",
        )
        for i in range(len(grid.rows)):
            for j in range(len(grid.columns)):
                if grid.values[i][j] is None:
                    continue
                shade = grid.shade(i, j)
                if shade is None:  # a dimmed column: grey, outside the scale
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#e0e0e0", edgecolor="none"))
                text_colour = "black" if shade is None else ink(colour(grid.palette, shade))
                if grid.texts[i][j]:
                    cell = fit(label(grid.texts[i][j]), _CELL_CHARS)
                    ax.text(j, i, cell, ha="center", va="center", fontsize=7,
                            color=text_colour, fontfamily=families, parse_math=False)  # fmt: skip
                if grid.marks and grid.marks[i][j]:
                    ax.add_patch(
                        Rectangle(
                            (j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor="#d62728", linewidth=1.6
                        )
                    )
        ax.set_title(
            _wrapped(label(grid.title), fig, 9), fontsize=9, fontfamily=families, parse_math=False, loc="left"
        )
        ax.set_yticks(
            range(len(grid.rows)),
            [fit(label(r), _LABEL_CHARS) for r in grid.rows],
            fontsize=8,
            fontfamily=families,
        )
        heads = [fit(label(c), _LABEL_CHARS) for c in grid.columns]
        ax.set_xticks(range(len(grid.columns)), heads, fontsize=8, fontfamily=families, rotation=60,
                      ha="left", rotation_mode="anchor")  # fmt: skip
        for tick in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
            tick.set_parse_math(False)
        ax.xaxis.tick_top()
        ax.set_ylabel(label(grid.row_title), fontsize=8)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        caption = grid.caption + (f"; outlined: {grid.mark_meaning}" if grid.marks else "")
        if caption:
            ax.set_xlabel(label(caption), fontsize=7, fontfamily=families, parse_math=False)
    return fig


_CSS = """
body { font-family: "DejaVu Sans", "Noto Sans CJK SC", "Source Han Sans SC", "PingFang SC",
       "Microsoft YaHei", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.1em; } h2 { font-size: 1em; margin-top: 1.5em; }
table { border-collapse: collapse; font-size: 12px; }
th { font-weight: normal; color: #555; padding: 2px 4px; white-space: pre; }
th.row { text-align: right; }
td { padding: 3px 5px; text-align: center; white-space: pre; position: relative; min-width: 2.5em; }
td.mark { outline: 2px solid #d62728; outline-offset: -2px; }
td.none { background: #fff; }
td.dim { background: #e0e0e0; color: #555; }
td .tip { display: none; position: absolute; z-index: 1; left: 50%; top: 100%; background: #222;
          color: #fff; padding: 4px 6px; border-radius: 3px; text-align: left; font-family: monospace; }
td:hover .tip { display: block; }
p.caption { color: #555; font-size: 12px; }
"""


def to_html(grids: list[Grid], *, title: str) -> str:
    """One self-contained page (no scripts, no network): a table per grid, details on hover."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for grid in grids:
        parts.append(f"<h2>{e(grid.title)}</h2><table>")
        heads = "".join(f"<th>{e(c)}</th>" for c in grid.columns)
        parts.append(f"<tr><th>{e(grid.row_title)}</th>{heads}</tr>")
        for i, name in enumerate(grid.rows):
            cells = []
            for j in range(len(grid.columns)):
                value = grid.values[i][j]
                if value is None:
                    cells.append('<td class="none"></td>')
                    continue
                shade = grid.shade(i, j)
                classes = ["dim"] if shade is None else []
                if grid.marks and grid.marks[i][j]:
                    classes.append("mark")
                style = ""
                if shade is not None:
                    bg = colour(grid.palette, shade)
                    style = f' style="background:rgb{bg};color:{ink(bg)}"'
                tip = f'<span class="tip">{e(grid.details[i][j])}</span>' if grid.details[i][j] else ""
                attrs = f' class="{" ".join(classes)}"' if classes else ""
                cells.append(f"<td{attrs}{style}>{e(grid.texts[i][j])}{tip}</td>")
            parts.append(f'<tr><th class="row">{e(name)}</th>{"".join(cells)}</tr>')
        parts.append("</table>")
        caption = grid.caption + (f"; outlined: {grid.mark_meaning}" if grid.marks else "")
        parts.append(f'<p class="caption">{e(caption)}; hover over a cell for details</p>')
    parts.append("</body></html>\n")
    return "\n".join(parts)
