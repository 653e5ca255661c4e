"""The `chat` command: keep a model loaded and try one entry after another (gptcli.generation.session)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gptcli.cli._common import (
    GENERATE,
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    QuantizeOpt,
    TrustCodeOpt,
    command,
    examples,
    is_tty,
    load,
    note,
)
from gptcli.cli._decoding import decoding_flags, with_decoding_options
from gptcli.errors import GptcliError
from gptcli.generation.sampling import check_flags, resolve_settings
from gptcli.loading.models import check_quantize

if TYPE_CHECKING:
    from gptcli.generation.session import Session

PROMPT, MORE = "> ", ". "

HELP = """\
/set                 show the decoding settings
/set NAME VALUE      change one: /set temperature 0.7, /set top_k 0, /set greedy on, /set seed off
/topk [K]            the K (10) most likely next tokens at this point
/text                show the text so far (chat: the conversation as the model sees it)
/save FILE           write the text so far to FILE
/reset               start anew (the settings stay)
/help, /quit         this help; leave (Ctrl-D leaves too)
A line ending in \\ goes on on the next line. Ctrl-C stops a reply (what was written is kept).
An empty entry (text mode) lets the model go on with the text so far; //x sends the entry /x."""


@command(
    rich_help_panel=GENERATE,
    epilog=examples(
        "gptcli chat -m builtin",
        "gptcli chat -m ./my-model --temperature 0.7 -n 200",
        "printf 'Once upon a time\\n/topk 5\\n' | gptcli chat --seed 1    [dim]# one entry a line[/dim]",
    ),
)
@with_decoding_options("chat")
def chat(
    model: ModelOpt = None,
    system: Annotated[
        str | None,
        typer.Option("--system", help="A system message to start with (chat models).", show_default=False),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
    **decoding: Any,
) -> None:
    """Keep a model loaded and try one entry after another, without a server.

    A model with a chat template keeps the conversation. Without one (GPT-2), each entry continues the
    text so far, until /reset. Commands start with / (/help lists them: /set temperature 0.7, /topk,
    /save FILE, /reset). Ctrl-C stops a reply, Ctrl-D leaves.

    On a terminal, lines are edited with readline and kept in its history; piped, each line of stdin
    is an entry, and each reply goes to stdout followed by a line break.
    """
    from gptcli.generation.session import Session

    flags = decoding_flags(decoding)
    check_flags(**flags)
    check_quantize(quantize)
    lm = load(model, device, dtype, allow_pickle, trust_remote_code, quantize)
    session = Session.start(lm, resolve_settings(lm.generation_config, **flags), system=system)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (input() edits lines and keeps a history once it is loaded)

        mode = "chat: a conversation" if session.chat else "text: each entry continues the text so far"
        note(f"{lm.name} ({mode}); /help for commands, Ctrl-D to leave")
    while True:
        try:
            entry = _read_entry(interactive)
        except KeyboardInterrupt:  # as in Python's REPL: the line is dropped, the session goes on
            print(file=sys.stderr)
            continue
        if entry is None:
            if interactive:
                print(file=sys.stderr)
            return
        try:
            if entry.startswith("/") and not entry.startswith("//"):
                if not _command(session, entry):
                    return
                continue
            _reply(session, entry.removeprefix("/"), interactive)
        except GptcliError as exc:  # a mistake in one entry never ends the session
            print(f"Error: {exc}", file=sys.stderr, flush=True)


def _read_entry(interactive: bool) -> str | None:
    """One entry (lines ending in a backslash go on); None at the end of input (Ctrl-D)."""
    lines: list[str] = []
    while True:
        try:
            line = input(MORE if lines else PROMPT) if interactive else _stdin_line()
        except EOFError:
            return "\n".join(lines) if lines else None
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def _stdin_line() -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.removesuffix("\n").removesuffix("\r")


def _reply(session: Session, entry: str, interactive: bool) -> None:
    """Stream the reply to stdout; Ctrl-C stops it and keeps what was written."""
    if session.chat and not entry.strip():
        return
    reply = session.send(entry)
    try:
        for text in reply:
            sys.stdout.write(text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        reply.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if interactive:
            note("stopped; the reply so far is kept")
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    if session.dropped:
        note(f"the text is longer than the context ({session.lm.context_length} tokens): the start was cut")


def _command(session: Session, entry: str) -> bool:
    """Run one /command; False when it asks to leave."""
    name, _, rest = entry[1:].strip().partition(" ")
    rest = rest.strip()
    if name in ("quit", "exit", "q"):
        return False
    if name == "help":
        print(HELP, file=sys.stderr)
    elif name == "set":
        _set(session, rest)
    elif name == "topk":
        _topk(session, rest)
    elif name == "text":
        print(session.text())
    elif name == "save":
        if not rest:
            raise GptcliError("/save needs a file name: /save FILE")
        session.save(Path(rest))
        note(f"saved {len(session.text())} characters to {rest}")
    elif name == "reset":
        session.reset()
        note("started anew")
    else:
        raise GptcliError(f"no command /{name}; /help lists them")
    return True


def _set(session: Session, rest: str) -> None:
    from gptcli.generation.session import SETTABLE

    if not rest:
        for name in SETTABLE:
            print(f"{name} {_shown(getattr(session.settings, name))}", file=sys.stderr)
        return
    name, _, value = rest.partition(" ")
    if not value.strip():
        raise GptcliError(f"/set {name} needs a value: /set {name} VALUE")
    new = session.set(name, value)
    note(f"{name.replace('-', '_')} {_shown(new)}")


def _shown(value: object) -> str:
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _topk(session: Session, rest: str) -> None:
    from gptcli.cli.topk import print_tokens

    try:
        k = int(rest) if rest else 10
    except ValueError:
        raise GptcliError(f"/topk takes a number (got {rest!r})") from None
    if k < 1:  # checked here: the library's own message names topk's -k, not /topk
        raise GptcliError(f"/topk takes a number of at least 1 (got {k})")
    print_tokens(session.top(k).tokens, table=is_tty())
