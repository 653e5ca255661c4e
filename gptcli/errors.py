"""Errors a person can act on. Library code raises these; the CLI's one error boundary prints them."""

from __future__ import annotations


class GptcliError(Exception):
    """A failure with a message meant for the user: printed as `Error: <message>`, exit code 1."""

    exit_code = 1


class UsageError(GptcliError):
    """The user asked for something that cannot work as asked (bad option value, bad path): exit code 2."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its class name when it has none.

    Library errors can run to pages (transformers', torch's); a message quotes only their first line.
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
