"""Text that comes in: strict UTF-8 with the byte offset of the first bad byte, and the one input rule.

Every command reads its text through these functions (argument, -f FILE, stdin; training data too), so
the same bytes mean the same text however they arrive.
"""

from __future__ import annotations

import array
import os
import stat
from pathlib import Path
from typing import TextIO

from gptcli.errors import UsageError


def decode_utf8(data: bytes, where: str, *, offset: int = 0) -> str:
    """`data` as text, or UsageError naming `where` and the offset of the first byte that is not UTF-8.

    `offset`: where `data` starts in the input `where` names (a line of a file, say).
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where} is not valid UTF-8 (byte offset {offset + exc.start})") from None


def check_text(text: str, what: str = "the text") -> str:
    """`text` as text UTF-8 can hold, or UsageError naming the first byte that is not UTF-8.

    On POSIX, argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape); the
    tokenizers would refuse them with a TypeError that says nothing of the input. The byte offset is
    the one `stdin is not valid UTF-8` reports for the same bytes.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:  # a surrogate that no byte stands for (from Python, not argv)
            raise UsageError(f"{what} is not valid Unicode text (a lone surrogate at {exc.start})") from None
        return decode_utf8(raw, what)  # escaped bytes that are UTF-8 after all
    return text


def read_file_text(path: Path) -> str:
    """The whole file as text (strict UTF-8); UsageError naming the file when it cannot be read."""
    try:
        data = path.expanduser().read_bytes()
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path, which no file name holds
        raise UsageError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return decode_utf8(data, str(path))


def strip_one_newline(text: str) -> str:
    """Text read from a pipe or a file without its final line break (one "\\n" or "\\r\\n").

    `echo 今天天气 | gptcli ...` means "今天天气", as `$(cat file)` in a shell would.
    """
    if text.endswith("\n"):
        return text[:-1].removesuffix("\r")
    return text


def waiting(stream: TextIO | None) -> bool:
    """Whether text is waiting on `stream` (stdin), found without reading or waiting for it.

    True for a pipe with unread bytes or a redirected file not at its end; False for a terminal, an
    empty pipe, /dev/null, or a stream that has no file descriptor. A pipe whose writer has not written
    yet counts as empty: gptcli never waits on stdin when the text was given another way.
    """
    try:
        fd = stream.fileno() if stream is not None else -1
        if fd < 0 or os.isatty(fd):
            return False
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            return os.lseek(fd, 0, os.SEEK_CUR) < info.st_size
        if stat.S_ISFIFO(info.st_mode) or stat.S_ISSOCK(info.st_mode):
            import fcntl
            import termios

            count = array.array("i", [0])
            fcntl.ioctl(fd, termios.FIONREAD, count)  # bytes in the pipe, left where they are
            return count[0] > 0
    except (AttributeError, OSError, ValueError, ImportError):  # no descriptor; no FIONREAD (Windows)
        return False
    return False


def read_stdin(stream: TextIO | None) -> str:
    """All of `stream` (stdin) as strict UTF-8 text; refuses a terminal, where nothing was piped."""
    if stream is None or stream.isatty():
        raise UsageError("no input: pass the text as an argument, with -f FILE, or on stdin")
    return decode_utf8(stream.buffer.read(), "stdin")


def read_input(text: str | None, file: Path | None, stdin: TextIO | None) -> str:
    """A command's text, by the one input rule (docs/usage.md#input):

    - TEXT as typed; or the file of -f FILE; or stdin when neither is given (or TEXT is "-");
    - text from a file or stdin loses one trailing line break, as `$(cat file)` in a shell would lose
      it: `echo hi | gptcli ...`, `gptcli ... < hi.txt`, `gptcli ... -f hi.txt` and `gptcli ... hi`
      all mean "hi";
    - two sources at once (TEXT and -f, or either with text piped on stdin) are refused, never
      silently dropped.
    """
    typed = text is not None and text != "-"
    if typed and file is not None:
        raise UsageError("give the text as an argument or with -f/--file, not both")
    if (typed or file is not None) and waiting(stdin):
        raise UsageError(
            f"text is piped on stdin and given {'as TEXT' if typed else 'with -f'} too: "
            "pass one of them (TEXT '-' reads stdin)"
        )
    if file is not None:
        return strip_one_newline(read_file_text(file))
    if text is not None and text != "-":
        return text
    return strip_one_newline(read_stdin(stdin))


def read_input_lines(text: str | None, file: Path | None, stdin: TextIO | None) -> list[str]:
    """Every line of -f FILE or stdin, for --each-line (line breaks are not part of a line)."""
    if text not in (None, "-"):
        raise UsageError("--each-line reads its lines from stdin or -f FILE; do not pass TEXT too")
    if file is not None and waiting(stdin):
        raise UsageError("text is piped on stdin and given with -f too: pass one of them")
    return (read_file_text(file) if file is not None else read_stdin(stdin)).splitlines()
