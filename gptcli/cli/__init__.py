"""The `gptcli` command line: a thin Typer layer over the library, and its one error boundary."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from gptcli import __version__

# Importing a command module registers its commands on `app`.
from gptcli.cli import attention as _attention  # noqa: F401
from gptcli.cli import chat as _chat  # noqa: F401
from gptcli.cli import compare as _compare  # noqa: F401
from gptcli.cli import complete as _complete  # noqa: F401
from gptcli.cli import finetune as _finetune  # noqa: F401
from gptcli.cli import info as _info  # noqa: F401
from gptcli.cli import lens as _lens  # noqa: F401
from gptcli.cli import models as _models  # noqa: F401
from gptcli.cli import score as _score  # noqa: F401
from gptcli.cli import serve as _serve  # noqa: F401
from gptcli.cli import step as _step  # noqa: F401
from gptcli.cli import tokenize as _tokenize  # noqa: F401
from gptcli.cli import topk as _topk  # noqa: F401
from gptcli.cli._common import app, quiet_broken_pipe
from gptcli.errors import GptcliError

__all__ = ["app", "main"]


def _version(value: bool) -> None:
    if value:
        print(f"gptcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Work with GPT-2-family language models from the shell: complete, inspect, score, fine-tune.

    stdout carries only data (text, tables, JSON lines); notes and progress go to stderr.
    """


def _fail(message: str, code: int) -> int:
    print(f"Error: {_one_line(message)}", file=sys.stderr, flush=True)
    return code


def _usage_message(exc: typer.TyperException) -> str:
    """The parser's message, with only the "did you mean" suggestions that look like the typo.

    The parser suggests any option that is 60% alike, which with the shared "--" offers `--verbose`
    for `--bogus`; compared without the dashes, at 75%, a suggestion is one a person would make.
    """
    typo, offered = getattr(exc, "option_name", None), getattr(exc, "possibilities", None)
    if not isinstance(typo, str) or not offered:
        return exc.format_message()
    import difflib

    names = {name.lstrip("-"): name for name in offered}
    close = difflib.get_close_matches(typo.lstrip("-"), list(names), n=3, cutoff=0.75)
    message = f"No such option: {typo}"
    return message + (f" (did you mean {' or '.join(names[c] for c in close)}?)" if close else "")


def _one_line(message: str) -> str:
    """`message` as one printable line: an error may quote what the user typed, and that text may hold
    newlines, control characters, bidi overrides or lone surrogates (bytes of argv that were not UTF-8),
    which would split the line, reorder it on a terminal, or fail to encode."""
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in message.strip())


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; every failure becomes one `Error:` line on stderr."""
    debug = os.environ.get("GPTCLI_DEBUG", "") not in ("", "0")
    args = sys.argv[1:] if argv is None else argv
    try:
        # A bare `gptcli` asks for the help: print it and succeed.
        result = app(args=args or ["--help"], prog_name="gptcli", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except GptcliError as exc:
        if debug:
            raise
        return _fail(str(exc), exc.exit_code)
    except typer.TyperException as exc:  # bad usage caught by the parser: unknown option, bad value...
        if debug:
            raise
        return _fail(_usage_message(exc), exc.exit_code)
    except BrokenPipeError:
        return quiet_broken_pipe()
    except (KeyboardInterrupt, typer.Abort):
        print(file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment failure: one line, the traceback on request
        if debug:
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        name = type(exc).__name__
        return _fail(f"{name}: {detail} (set GPTCLI_DEBUG=1 for the traceback)" if detail else name, 1)


def _utf8_streams() -> None:
    # Tokens are UTF-8 text; a non-UTF-8 locale must not turn output into UnicodeEncodeError.
    for stream, errors in ((sys.stdout, "strict"), (sys.stderr, "backslashreplace")):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors=errors)


def main() -> None:
    """Console-script entry point."""
    _utf8_streams()
    code = run()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = quiet_broken_pipe()
    sys.exit(code)
