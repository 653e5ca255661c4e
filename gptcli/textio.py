"""Text that comes in: strict UTF-8 with the byte offset of the first bad byte, and the one input rule.

Every command reads its text through these functions (argument, -f FILE, stdin; training data too), so
the same bytes mean the same text however they arrive.
"""

from __future__ import annotations

from pathlib import Path

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
