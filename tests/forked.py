"""`gptcli` run in a forked child: a real process with real file descriptors and signals.

A fork, not `python -m gptcli`: the child starts with torch already imported, where a fresh interpreter
spends seconds on imports (start-up is covered elsewhere). The child runs the console-script entry point
`gptcli.cli.main` with the signal handling of a fresh interpreter, and never returns into pytest.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import NoReturn


def fork_main(
    *args: object,
    stdout: int,
    stderr: int,
    close: Iterable[int] = (),
    before: Callable[[], None] | None = None,
) -> int:
    """Fork a child that runs `gptcli ARGS` with `stdout`/`stderr` as fds 1 and 2; its pid.

    `close`: descriptors the child must not keep (e.g. the parent's ends of its pipes); `before`: run
    in the child just before gptcli (e.g. to set a resource limit).
    """
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        _run_main(args, stdout, stderr, close, before)
    return pid


def fork_main_on_a_terminal(*args: object, env: dict[str, str] | None = None) -> tuple[int, int]:
    """Fork a child that runs `gptcli ARGS` on a new pseudo-terminal (stdin, stdout and stderr, and its
    controlling terminal: Ctrl-C typed there is a SIGINT); its pid and the terminal's master end."""
    import pty

    pid, master = pty.fork()
    if pid == 0:
        os.environ.update(env or {})
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        _run_main(args, 1, 2, (), None)
    return pid, master


def _run_main(
    args: tuple[object, ...],
    stdout: int,
    stderr: int,
    close: Iterable[int],
    before: Callable[[], None] | None,
) -> NoReturn:
    code = 1
    try:
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        for fd in close:
            os.close(fd)
        # pytest's capture replaced sys.stdout/err; give the child the streams a real process has.
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as CPython sets them at start-up
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if before is not None:
            before()
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # no fork warning from tokenizers
        sys.argv = ["gptcli", *map(str, args)]
        from gptcli.cli import main

        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os._exit(code)
