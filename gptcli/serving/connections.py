"""Connections before they are requests: a limit on how many are open, a deadline for their headers,
the process's file limit, and log lines that a flood cannot multiply.

uvicorn reads requests with h11 and has neither a header deadline nor a connection limit (its
`limit_concurrency` answers 503 only once the headers are in, so connections that never finish their
headers still hold a file each). `protocol(...)` is its h11 protocol with both: a connection that has
not sent a whole request head within `timeout` seconds is closed, and past `max_connections` a new
connection takes the place of the oldest one still sending its request head, so a flood of stalled
connections (slowloris) cannot lock out clients that send their requests at once. Only when every
connection is in a request is a new one answered 503 and closed.

Reading the body and writing the answer have their own deadlines in the app (gptcli.serving.app),
which finds the connection's `abort` in the request's scope (`extensions["gptcli.abort"]`) to cut
off a client that stopped reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import time
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

Log = Callable[[str], None]


def raise_file_limit() -> int:
    """Raise the soft limit on open files to the hard one (each connection takes a file); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):  # a container may refuse it: the soft limit then stays
            pass
    return soft


class Tally:
    """One log line per kind of event per `interval` seconds, however many happen: a flood of refused
    connections writes a line a second that says how many, not one line (or a traceback) each. Used
    on the event loop's thread."""

    def __init__(self, log: Log, interval: float = 1.0) -> None:
        self.log = log
        self.interval = interval
        self.counts: dict[str, int] = {}  # events not logged yet
        self.last: dict[str, float] = {}

    def note(self, what: str) -> None:
        """Count one `what` ("refused a connection: ..."); log it now, or the count within `interval`."""
        now = time.monotonic()
        self.counts[what] = self.counts.get(what, 0) + 1
        wait = self.last.get(what, -self.interval) + self.interval - now
        if wait <= 0:
            self._flush(what)
        elif self.counts[what] == 1:  # the first held back: make sure its count is logged
            with contextlib.suppress(RuntimeError):  # no loop (outside the server): with the next line
                asyncio.get_running_loop().call_later(wait, self._flush, what)

    def _flush(self, what: str) -> None:
        count = self.counts.pop(what, 0)
        if not count:
            return
        self.last[what] = time.monotonic()
        times = f" (x{count} in the last {self.interval:g} s)" if count > 1 else ""
        self.log(f"server: {what}{times}")


def loop_errors(tally: Tally) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An asyncio exception handler that counts instead of printing a traceback: with no file left,
    asyncio's accept loop reports `socket.accept() out of system resource` on every try."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        reason = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        tally.note(f"{context.get('message', 'event loop error')}{reason}".splitlines()[0][:300])

    return handle


def _refusal(status: int, reason: str, message: str) -> bytes:
    body = json.dumps(
        {"error": {"message": message, "type": "server_error", "param": None, "code": "server_busy"}}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\nretry-after: 1\r\n\r\n"
    )
    return head.encode() + body


def protocol(max_connections: int, timeout: float, tally: Tally) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection limit and a deadline for each request's head."""

    heads: dict[Guarded, None] = {}  # connections sending a request head, oldest first

    class Guarded(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                oldest = next(iter(heads), None)
                if oldest is None:
                    tally.note(f"refused connections: {max_connections} are open (--max-connections)")
                    message = f"the server has {max_connections} connections open: try again shortly"
                    transport.write(_refusal(503, "Service Unavailable", message))
                    transport.close()
                    return
                tally.note(
                    f"{max_connections} connections open: closed the oldest still sending its request head"
                )
                oldest._disarm()
                oldest.transport.abort()
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # a keep-alive connection starts its next request: a new deadline
            super().data_received(data)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request head arrived whole
                self._disarm()
                # The app may cut off a client that stopped reading (ASGI has no way to abort).
                self.scope.setdefault("extensions", {})["gptcli.abort"] = self.transport.abort

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout, self._too_slow)
            heads[self] = None

        def _disarm(self) -> None:
            heads.pop(self, None)
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            heads.pop(self, None)
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            tally.note(f"closed connections that sent no whole request in {timeout:g} s (--timeout)")
            self.transport.abort()

    return Guarded
