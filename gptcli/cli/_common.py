"""What every command shares: the Typer app, option declarations, input reading and output helpers.

This package is the only place that imports typer and rich. Library modules never print.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from gptcli.textio import read_input, read_input_lines

if TYPE_CHECKING:
    from rich.console import Console

    from gptcli.loading.models import LoadedModel


class _FlagsWithoutValues:
    """Flags show no value placeholder in --help (typer would show `<bool>`, as if `--json` took one),
    and a repeatable option or argument shows the type of one value (typer would show `<list[str]>`)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if param.metavar is not None:
                continue
            if getattr(param, "is_flag", False):
                param.metavar = ""
            else:
                shown = param.display_type(ctx)  # e.g. "<list[str]>" for a repeatable value
                if shown.startswith("<list[") and shown.endswith("]>"):
                    one = "<" + shown[6:-2] + ">"
                    if param.nargs == -1:  # an argument: its name stays, only its type column changes
                        param.display_type_rich = lambda ctx, one=one: one + "..."
                    else:
                        param.metavar = one
        return params


class _Command(_FlagsWithoutValues, TyperCommand):
    """A command of gptcli's."""


# `gptcli --help` groups the commands in panels, in this order (each command names its panel).
GENERATE, INSPECT, TRAIN, SERVE, MODELS = "Generate", "Inspect", "Train", "Serve", "Models"
COMMAND_ORDER = (
    *("complete", "chat", "step"),
    *("tokenize", "detokenize", "topk", "score", "lens", "attention", "attribute", "patch", "compare"),
    *("finetune", "serve", "models", "pull", "info"),
)


class Group(_FlagsWithoutValues, TyperGroup):
    """A command group of gptcli's (`gptcli` itself, `gptcli models`)."""

    def list_commands(self, ctx: Any) -> list[str]:
        """In COMMAND_ORDER (the order of the panels, and within one the order of common use), not in
        the order the modules happen to be imported."""
        names = super().list_commands(ctx)
        known = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda name: known.get(name, len(known)))


app = typer.Typer(
    name="gptcli",
    cls=Group,
    help="Work with GPT-2-family language models from the shell.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command(
    app_: typer.Typer | None = None, **kwargs: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`app.command`, plus the quiet exit on a closed pipe that every command needs.

    Typer turns a BrokenPipeError raised inside a command into a bare exit 1, before the error
    boundary in gptcli.cli.run could see it; `gptcli ... | head` must end quietly instead.
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        # `gptcli --help` shows the docstring's first paragraph; joined into one line, so that it wraps
        # at the terminal's width instead of at the docstring's line breaks.
        paragraphs = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
        kwargs.setdefault("short_help", " ".join(paragraphs[0].split()))
        # `gptcli CMD --help` too: rich markup mode keeps a docstring's line breaks, which wrapped at the
        # terminal's width left a short line at each one.
        kwargs.setdefault("help", "\n\n".join(" ".join(p.split()) for p in paragraphs))

        @functools.wraps(fn)
        def guarded(*args: Any, **kw: Any) -> Any:
            try:
                return fn(*args, **kw)
            except BrokenPipeError:
                raise typer.Exit(quiet_broken_pipe()) from None

        return (app_ or app).command(cls=_Command, **kwargs)(guarded)

    return register


def quiet_broken_pipe() -> int:
    """The reader went away (`| head`): stop quietly, with the exit status of a SIGPIPE death."""
    # Point stdout at /dev/null so the interpreter's final flush does not raise a second
    # BrokenPipeError on the way out.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, what a C tool killed by the signal reports


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Hub id, local folder saved with save_pretrained, or builtin. "
        "\\[default: $GPTCLI_MODEL, else gpt2, else builtin]",
        show_default=False,
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto|cpu|cuda|cuda:N|mps (auto: CUDA, MPS, CPU).")]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto|float32|bfloat16|float16 (auto: fp32 on CPU, bf16 on GPU).")
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Allow pytorch_model.bin weights (loaded with weights_only=True)."),
]
TrustCodeOpt = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Allow a model folder's own Python code (auto_map) to run."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (one object per line).")]
TextArg = Annotated[
    str | None,
    typer.Argument(
        help="The text; read from stdin when absent or '-' (one final line break dropped).",
        show_default=False,
    ),
]
FileOpt = Annotated[
    Path | None,
    typer.Option(
        "--file",
        "-f",
        help="Read the text from this file (one final line break dropped).",
        show_default=False,
    ),
]
QuantizeOpt = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        metavar="int8|int4",
        help="Store the weights as int8, or int4 in groups of 32 (plain GPT-2 checkpoints): faster on CPU, "
        "slightly different numbers (docs/performance.md).",
        show_default=False,
    ),
]

ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        metavar="N",
        help="CPU threads for everything, decoding one sequence included. \\[default: torch's for prompts "
        "and batches; for one sequence's steps, 1 or all, as measured once on this machine]",
        show_default=False,
    ),
]


def load(
    model: str | None,
    device: str,
    dtype: str,
    allow_pickle: bool,
    trust_remote_code: bool,
    quantize: str | None = None,
    threads: int | None = None,
) -> LoadedModel:
    """Load a model with a spinner on stderr when it is a terminal."""
    # Before torch loads (its OpenMP runtime reads this once): idle threads sleep instead of spinning.
    # On a machine busy with other work, spinning threads wait a scheduler slice at every parallel
    # kernel, which made decoding several times slower on a shared 2-core machine (docs/performance.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from gptcli.loading.models import load_model

    with status(f"loading {model or 'the model'}"):
        lm = load_model(
            model,
            device=device,
            dtype=dtype,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            quantize=quantize,
            threads=threads,
        )
    if lm.notice:
        note(lm.notice)
    return lm


def stderr() -> Console:
    """A rich console on stderr that outlives its reader: rich's own answer to a closed pipe is
    `SystemExit(1)`, which would end a training run for the loss of its progress display."""
    from rich.console import Console

    class TalkConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            stderr_gone()

    return TalkConsole(stderr=True, highlight=False, soft_wrap=True)


def stdout() -> Console:
    """A rich console on stdout; a closed pipe raises BrokenPipeError, which `command` turns into a
    quiet exit 141 (rich would exit 1)."""
    from rich.console import Console

    class DataConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError

    return DataConsole(highlight=False, soft_wrap=True)


def stderr_gone() -> None:
    """The reader of stderr went away (`2>&1 | head` exited, the terminal closed): send stderr to
    /dev/null from now on, so that no later remark fails and the work goes on."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def quietly_if_gone(write: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """`write(*args, **kwargs)` to stderr, for talk that must never stop the work (training progress):
    a gone reader (EPIPE from a closed pipe, EIO from a hung-up terminal) silences stderr instead."""
    try:
        write(*args, **kwargs)
    except OSError:
        stderr_gone()


class _NoStatus:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def status(message: str) -> Any:
    """A spinner on stderr while something slow runs, only when a person is watching."""
    if not sys.stderr.isatty():
        return _NoStatus()
    return stderr().status(message, spinner="dots")


def note(message: str) -> None:
    """A remark for the person at the terminal (stderr), never mixed into the data on stdout."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A warning for the person at the terminal (stderr): something works, but maybe not as they think."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def emit_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def read_text(text: str | None, file: Path | None = None) -> str:
    """The command's text by the one input rule: TEXT, -f FILE, or stdin (gptcli.textio.read_input)."""
    return read_input(text, file, sys.stdin)


def read_lines(text: str | None = None, file: Path | None = None) -> list[str]:
    """Every line of -f FILE or stdin, for --each-line."""
    return read_input_lines(text, file, sys.stdin)


class _NoProgress:
    def __enter__(self) -> Callable[..., None]:
        return lambda done, total=None: None

    def __exit__(self, *exc: object) -> None:
        return None


class _Progress:
    def __init__(self, total: int, what: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn(what),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=stderr(),
            transient=True,
        )
        self.task = self.bar.add_task(what, total=total or None)
        self.started = False

    def __enter__(self) -> Callable[..., None]:
        if self.bar.tasks[0].total:
            self._start()
        return self.update

    def update(self, done: int, total: int | None = None) -> None:
        # A bar whose total is not known yet would show an empty `0/0 -:--:--`: it waits for the total.
        self.bar.update(self.task, completed=done, total=total)
        if not self.started and self.bar.tasks[0].total:
            self._start()

    def _start(self) -> None:
        self.bar.start()
        self.started = True

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.bar.stop()


def progress(total: int, what: str) -> Any:
    """A progress bar on stderr while `total` units of work are done, only when a person is watching:
    `with progress(n, "scoring") as update: ... update(done)` (or `update(done, total)` when the total
    becomes known only later)."""
    return _Progress(total, what) if sys.stderr.isatty() else _NoProgress()


# How surprising a token was, by its probability: level 0 (expected) to 4 (very surprising). The same
# levels give the colours and, without colour (NO_COLOR, a dumb terminal), marks that survive.
SURPRISE = (0.3, 0.05, 0.005, 0.0005)
_LEVEL_COLOURS_16 = ("black on green", "black on cyan", "black on yellow", "black on magenta", "white on red")
_LEVEL_MARKS = ("", "", "underline", "bold underline", "reverse")


def surprise_level(p: float) -> int:
    return sum(p < bound for bound in SURPRISE)


def surprise_style(p: float, console: Console) -> str:
    """The style of a token of probability `p` in a heat map: a green-to-red background on terminals
    with 256 colours or more, five distinct colours on 16-colour ones, underline/bold/reverse marks
    without colour (NO_COLOR)."""
    level = surprise_level(p)
    system = console.color_system
    if console.no_color or system is None:
        return _LEVEL_MARKS[level]
    if system == "standard":
        return _LEVEL_COLOURS_16[level]
    red, green = round(255 * (1 - p) ** 2), round(200 * p**0.5)
    return f"black on rgb({red},{green},60)"


def surprise_legend(console: Console) -> Any:
    """One line that says what the heat map's styles mean."""
    from rich.text import Text

    legend = Text("probability: ")
    edges = (1.0, *SURPRISE, 0.0)
    samples = (0.6, 0.1, 0.01, 0.001, 0.0001)
    for level, p in enumerate(samples):
        high, low = edges[level], edges[level + 1]
        legend.append(f" ≥{low:g} " if low else f" <{high:g} ", style=surprise_style(p, console))
        legend.append(" ")
    return legend


def change_style(change: float, console: Console) -> str:
    """The style of a change in log-probability (nats; > 0: better): greener or redder with its size,
    full at 3 nats (a factor of 20); on 16 colours two strengths of green and red; without colour,
    bold for better, underline or reverse for worse."""
    strong, mild = abs(change) >= 2.0, abs(change) >= 0.5
    system = console.color_system
    if console.no_color or system is None:
        if not mild:
            return ""
        return "bold" if change > 0 else "reverse" if strong else "underline"
    if system == "standard":
        if not mild:
            return ""
        if change > 0:
            return "black on green" if strong else "green"
        return "white on red" if strong else "red"
    t = min(abs(change) / 3.0, 1.0)
    to = (40, 190, 60) if change > 0 else (235, 50, 50)
    r, g, b = (round(200 + (c - 200) * t) for c in to)
    return f"black on rgb({r},{g},{b})"


def whole_characters(pieces: Iterable[tuple[bytes, float]]) -> Iterator[tuple[str, list[float]]]:
    """Token bytes regrouped into whole characters, each stretch with the values of its tokens: a CJK
    character that GPT-2 splits into byte pieces shows as itself, shaded as one. A token that ends one
    character and starts the next counts with the first."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    values: list[float] = []
    for data, value in pieces:
        values.append(value)
        text = decoder.decode(data)
        if text:
            yield text, values
            values = []
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail, values or [0.0]


def is_tty(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def examples(*lines: str) -> str:
    """A command's help epilog: one example command a line."""
    return "[bold]Examples[/bold]\n\n" + "\n".join(f"  {line}" for line in lines) + "\n"
