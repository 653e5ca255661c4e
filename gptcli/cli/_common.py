"""What every command shares: the Typer app, option declarations, input reading and output helpers.

This package is the only place that imports typer and rich. Library modules never print.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gptcli.errors import UsageError
from gptcli.textio import decode_utf8, read_file_text, strip_one_newline

if TYPE_CHECKING:
    from rich.console import Console

    from gptcli.models import LoadedModel

app = typer.Typer(
    name="gptcli",
    help="Work with GPT-2-family language models from the shell.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command(**kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`app.command`, plus the quiet exit on a closed pipe that every command needs.

    Typer turns a BrokenPipeError raised inside a command into a bare exit 1, before the error
    boundary in gptcli.cli.run could see it; `gptcli ... | head` must end quietly instead.
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def guarded(*args: Any, **kw: Any) -> Any:
            try:
                return fn(*args, **kw)
            except BrokenPipeError:
                raise typer.Exit(quiet_broken_pipe()) from None

        return app.command(**kwargs)(guarded)

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
QuantizeOpt = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        metavar="int8",
        help="Store the weights as int8 (plain GPT-2 checkpoints): faster on CPU, slightly different "
        "numbers (docs/performance.md).",
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
) -> LoadedModel:
    """Load a model with a spinner on stderr when it is a terminal."""
    # Before torch loads (its OpenMP runtime reads this once): idle threads sleep instead of spinning.
    # On a machine busy with other work, spinning threads wait a scheduler slice at every parallel
    # kernel, which made decoding several times slower on a shared 2-core machine (docs/performance.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from gptcli.models import load_model

    with status(f"loading {model or 'the model'}"):
        lm = load_model(
            model,
            device=device,
            dtype=dtype,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            quantize=quantize,
        )
    if lm.notice:
        note(lm.notice)
    return lm


def stderr() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


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


def emit_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def read_stdin() -> str:
    """All of stdin as text; refuses a terminal (nothing piped) and invalid UTF-8 with a clear message."""
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("no input: pass the text as an argument or pipe it on stdin")
    return decode_utf8(sys.stdin.buffer.read(), "stdin")


def read_text(text: str | None, file: Path | None = None, *, strip_newline: bool = True) -> str:
    """The command's input: TEXT, or -f FILE, or stdin when TEXT is absent or '-'.

    One trailing newline is dropped from piped input, so `echo 今天天气 | gptcli ...` means "今天天气".
    """
    if file is not None:
        if text not in (None, "-"):
            raise UsageError("give the text as an argument or with -f/--file, not both")
        return read_file_text(file)
    if text is not None and text != "-":
        return text
    data = read_stdin()
    return strip_one_newline(data) if strip_newline else data


def read_lines() -> list[str]:
    """Every stdin line, for --each-line (the newline itself is not part of a prompt)."""
    return read_stdin().splitlines()


def is_tty(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False
