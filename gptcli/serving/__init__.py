"""`gptcli serve`'s library: an OpenAI-compatible HTTP server over one loaded model.

    from gptcli import load_model
    from gptcli.serving import serve
    serve(load_model("gpt2"), port=8000, log=print)

This module stays light (no FastAPI until `serve` or `create_app` runs), so `gptcli serve --help` is.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gptcli.errors import GptcliError, UsageError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gptcli.loading.models import LoadedModel

# Seconds that in-flight requests get to finish after Ctrl-C or SIGTERM before they are failed (503).
GRACE_SECONDS = 5
MAX_CONNECTIONS = 1000  # open at once; past it, a new connection gets a 503 and is closed
TIMEOUT_SECONDS = 30  # to send a request (head, body), or to take the next piece of a stream
MAX_WAITING = 256  # requests waiting for room in the batch; past it, 429
PREFILL_CHUNK = 256  # prompt tokens prefilled between two decoding steps of the running rows
BACKLOG = 128  # connections the kernel holds for accept


def create_app(lm: LoadedModel, **options: Any) -> FastAPI:
    """The FastAPI app over `lm` (gptcli.serving.app.create_app)."""
    from gptcli.serving.app import create_app as create

    return create(lm, **options)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535 (got {port}; 0 picks a free port)")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or GptcliError saying why not."""
    check_port(port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"cannot listen on {host}: {getattr(exc, 'strerror', None) or exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise GptcliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def address(sock: socket.socket) -> str:
    """http://host:port of a listening socket (IPv6 in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _LogLines(logging.Handler):
    """uvicorn's own warnings and errors as single lines through `log` (tracebacks with GPTCLI_DEBUG)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.log = log
        self.debug = os.environ.get("GPTCLI_DEBUG", "") not in ("", "0")

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage().strip().splitlines()
        text = line[0] if line else record.levelname
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            if self.debug:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.log(f"server: {text}")


def allowed_hosts(host: str, extra: list[str] | None) -> frozenset[str] | None:
    """The Host names the server answers for: on a loopback address, its own names (a web page that
    rebinds a DNS name to 127.0.0.1 must not reach it) plus `extra`; elsewhere `extra` if given, else
    any (None)."""
    names = {name.strip().strip("[]").lower() for name in extra or [] if name.strip()}
    if is_loopback(host):
        return frozenset({"localhost", "127.0.0.1", "::1", host.strip("[]").lower(), *names})
    return frozenset({host.strip("[]").lower(), *names}) if names else None


def serve(
    lm: LoadedModel,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    sock: socket.socket | None = None,
    log: Callable[[str], None] = print,
    on_listening: Callable[[str], None] | None = None,
    grace: float = GRACE_SECONDS,
    max_connections: int = MAX_CONNECTIONS,
    allowed_host: list[str] | None = None,
    **options: Any,
) -> None:
    """Serve `lm` on host:port (or on `sock`, from `listen`) until SIGINT or SIGTERM; then stop taking
    requests, give those in flight `grace` seconds, answer the rest with a 503 (streams: an error event
    and [DONE]), and stop.

    `log` gets one line per request; `on_listening(url)` is called once the socket listens.
    `options`: gptcli.serving.app.Options' fields (api_key, max_rows, max_waiting, timeout, model_id).
    After a signal, uvicorn raises it again once the server has stopped (KeyboardInterrupt for Ctrl-C).
    """
    import asyncio

    import uvicorn

    from gptcli.serving.connections import Tally, loop_errors, protocol, raise_file_limit

    files = raise_file_limit()
    sock = sock if sock is not None else listen(host, port)
    bound = str(sock.getsockname()[0])
    options.setdefault("timeout", TIMEOUT_SECONDS)
    options.setdefault("max_waiting", MAX_WAITING)
    app = create_app(lm, log=log, allowed_hosts=allowed_hosts(bound, allowed_host), **options)
    state = app.state.gptcli
    tally = Tally(log)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = [_LogLines(log)]
        logger.propagate = False
    # Each connection takes a file; keep some for the model's files, the log and the worker threads.
    connections = max(1, min(max_connections, files - 64))
    config = uvicorn.Config(
        app,
        http=protocol(connections, options["timeout"], tally),
        log_config=None,
        access_log=False,
        # uvicorn cancels what is left after this: by then the engine has failed every job (below)
        # and their answers are out.
        timeout_graceful_shutdown=math.ceil(grace) + 5,
        lifespan="on",
        server_header=False,
        # asyncio's accept loop tries up to `backlog` times per wake-up, and out of files it reports
        # (and schedules a retry for) every try: uvicorn's 2,048 made thousands a second.
        backlog=BACKLOG,
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            asyncio.get_running_loop().set_exception_handler(loop_errors(tally))
            await super().startup(sockets)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            state.begin_stop(grace)
            await super().shutdown(sockets)

    server = Server(config)
    if on_listening is not None:
        on_listening(address(sock))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
