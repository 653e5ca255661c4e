"""The `step` command: walk the next-token tree by hand, one key per token."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gptcli.cli._common import (
    GENERATE,
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    TrustCodeOpt,
    command,
    emit_json,
    load,
    note,
    read_text,
    surprise_style,
)
from gptcli.cli._decoding import decoding_flags, with_decoding_options
from gptcli.errors import GptcliError, UsageError
from gptcli.generation.sampling import check_flags, resolve_settings
from gptcli.generation.tokens import one_line
from gptcli.textio import check_text

if TYPE_CHECKING:
    from rich.console import Console

    from gptcli.inspection.step import StepSession

_EXAMPLES = """\
[bold]Examples[/bold]

  gptcli step "今天" > story.txt          keys: 0-9 pick, Enter top, s sample, Backspace undo, q done
  gptcli step "Once upon a time" --choose 0,0,2,s,0 --seed 1
  echo "今天" | gptcli step --choose 0,0,0 | jq -c .chosen
"""

_KEYS = "0-9 pick · Enter the top one · s sample · Backspace undo · q done"
_BACKSPACE = ("\x7f", "\x08")
_QUIT = ("q", "Q", "\x04")  # q, or Ctrl-D


@command(rich_help_panel=GENERATE, epilog=_EXAMPLES)
@with_decoding_options("step")
def step(
    prompt: Annotated[
        str | None,
        typer.Argument(
            help="The text to start from; on a terminal, absent means the start of a text.",
            show_default=False,
        ),
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the prompt from this file.")] = None,
    model: ModelOpt = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Candidates shown per step (at most 10 keys).")] = 10,
    choose: Annotated[
        str | None,
        typer.Option(
            "--choose",
            metavar="0,2,s,...",
            help="Replay these choices without asking: ranks (0: the most likely) and s for a sample; "
            "one JSON line per step.",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
    **decoding: Any,
) -> None:
    """Choose each next token yourself: the model shows its top candidates, you press a key.

    On a terminal: a digit picks that candidate, Enter the most likely one, s samples (with the
    sampling flags, as `complete` does), Backspace takes the last choice back, q ends. The text goes to
    stdout at the end, so `gptcli step "今天" > story.txt` keeps it; the screen is on stderr.

    Candidates are ranked as `complete --greedy` ranks them (after any repetition penalty), so always
    taking the top one gives its tokens. Off a terminal, or with --choose, the choices are replayed:
    one JSON line per step {"step", "text", "top", "chosen"}, then {"text", "token_ids",
    "finish_reason"}.
    """
    from gptcli.inspection.predict import check_k
    from gptcli.inspection.step import StepSession, parse_choices, replay

    check_k(k)
    flags = decoding_flags(decoding)
    check_flags(**flags)
    choices = parse_choices(choose) if choose is not None else None
    keyboard = _keyboard()
    if choices is None and keyboard is None:
        raise UsageError("step reads keys from a terminal; off a terminal, pass the choices: --choose 0,2,s")
    if prompt is None and file is None and keyboard is not None:
        source = ""  # stdin is the keyboard: start from the start of a text
    else:
        source = check_text(read_text(prompt, file))
    lm = load(model, device, dtype, allow_pickle, trust_remote_code)
    session = StepSession(lm, source, resolve_settings(lm.generation_config, **flags))
    if session.dropped:
        note(f"the prompt has more tokens than the context ({lm.context_length}); kept the last ones")
    if choices is None and keyboard is not None:
        try:
            _walk(session, keyboard, min(k, 10))
        except KeyboardInterrupt:  # keep what was built, as `q` would, but exit as interrupted
            sys.stdout.write(session.text() + "\n")
            raise typer.Exit(130) from None
        sys.stdout.write(session.text() + "\n")
        return
    choices = choices or []
    for record in replay(session, choices, k):
        emit_json(record)
    if session.done and len(session.chosen) < len(choices):
        note(f"{_ended(session)} after {len(session.chosen)} of {len(choices)} choices")
    new_ids = [c.id for c in session.chosen]
    emit_json({"text": session.text(), "token_ids": new_ids, "finish_reason": session.finish_reason})


def _ended(session: StepSession) -> str:
    if session.finish_reason == "eos":
        return "the text ended (the end-of-text token was chosen)"
    return f"the context is full ({session.context} tokens)"


def _keyboard() -> int | None:
    """stdin's descriptor when it is a terminal a person types on, else None."""
    try:
        if sys.stdin is not None and sys.stdin.isatty() and os.environ.get("TERM") != "dumb":
            return sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        pass
    return None


@contextmanager
def _single_keys(fd: int) -> Iterator[None]:
    """The terminal in cbreak mode: each key arrives at once and is not echoed; restored on the way out.

    Not full raw mode: the screen is drawn on the same terminal, and raw mode would also turn off the
    newline translation that drawing relies on; Ctrl-C still interrupts.
    """
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _walk(session: StepSession, fd: int, k: int) -> None:
    """The interactive loop: draw, read one key, act, until q."""
    from gptcli.cli._common import stderr

    console = stderr()
    message = ""
    with _single_keys(fd), console.screen(hide_cursor=True):
        while True:
            _draw(console, session, k, message)
            message = ""
            data = _read_keys(fd)
            if not data:  # the terminal went away
                return
            if data.startswith(b"\x1b"):  # arrows and other escape sequences: not ours
                continue
            for key in data.decode("utf-8", errors="replace"):
                try:
                    if key in _QUIT:
                        return
                    if key in _BACKSPACE:
                        if session.undo() is None:
                            message = "nothing to undo"
                    elif key in ("\r", "\n"):
                        session.choose(0)
                    elif key.isdigit() and int(key) < k:
                        session.choose(int(key))
                    elif key in ("s", "S"):
                        session.sample()
                    else:
                        message = f"keys: {_KEYS}"
                except GptcliError as exc:  # the text has ended or the context is full
                    message = f"{exc}"


def _read_keys(fd: int) -> bytes:
    """The next keys typed, waiting in short slices rather than in one blocking read: a Ctrl-C whose
    signal lands just before a blocking read() would only be acted on at the next key (Python runs
    signal handlers between bytecodes, and the read would not be interrupted)."""
    import select

    while not select.select([fd], [], [], 0.2)[0]:
        pass
    return os.read(fd, 64)


def _draw(console: Console, session: StepSession, k: int, message: str) -> None:
    from rich.table import Table
    from rich.text import Text

    console.clear()
    text = Text()
    for piece in session.pieces():
        if piece.prob is None:
            text.append(piece.text)
        elif piece.complete:
            text.append(piece.text, style=surprise_style(piece.prob, console))
        else:  # bytes of a character that the next token should complete
            text.append(piece.text, style="italic " + surprise_style(piece.prob, console))
    text.append("▏", style="blink")
    console.print(text)
    console.print()
    if session.done:
        console.print(Text(f"{_ended(session)}: Backspace to undo, q to finish", style="bold"))
    else:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column, justify in (("key", "right"), ("piece", "left"), ("prob", "right"), ("", "left")):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for t in session.top(k):
            table.add_row(
                str(t["rank"]), one_line(t["token"]), f"{t['prob']:.4f}", "█" * round(t["prob"] * 30)
            )
        console.print(table)
    console.print()
    if message:
        console.print(Text(message, style="yellow"))
    console.print(Text(f"step {len(session.chosen) + 1} · {_KEYS}", style="dim"))
