"""The guard of `gptcli serve`, outermost, before any route: the Host (against DNS rebinding), the API
key, JSON bodies only (a web page's no-cors POST is text/plain), 503 once the server is stopping; one
log line per request with the status the client got; no failure reaching the client raw. And the
app's error handlers: every refusal is OpenAI's error object.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from contextlib import suppress
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptcli.errors import first_line
from gptcli.serving.schemas import ApiError

if TYPE_CHECKING:
    from gptcli.serving.app import State

RETRY_AFTER = 1  # seconds a refused client is told to wait (429, 503)


def stopping_error() -> ApiError:
    return ApiError(
        503,
        "the server is shutting down",
        kind="server_error",
        code="server_shutting_down",
        headers={"retry-after": str(RETRY_AFTER)},
    )


class Gone(Exception):
    """The client disconnected before its answer was sent (logged as such, nothing sent)."""


def note(scope: Scope, text: str) -> None:
    """What the request's log line adds (its tokens, why it ended)."""
    scope.setdefault("state", {})["note"] = text


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message, code = f"Invalid URL ({request.method} {request.url.path})", "unknown_url"
    elif exc.status_code == 405:
        message, code = f"Method not allowed ({request.method} {request.url.path})", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    return JSONResponse(ApiError(exc.status_code, message, code=code).body(), status_code=exc.status_code)


_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


class Guard:
    """Outermost, before any route: the Host (against DNS rebinding), the API key, JSON bodies only
    (a web page's no-cors POST is text/plain), 503 once stopping; one log line per request with the
    status the client got; no failure reaching the client raw.

    Raw ASGI rather than a Starlette middleware: BaseHTTPMiddleware runs the route in another task
    and buffers streams through a memory channel, which would hide a client's disconnect and a slow
    reader from EventStream; this one only watches `send`.
    """

    OPEN = ("/health",)  # no key needed: a load balancer's probe

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state
        self.key = state.options.api_key.encode() if state.options.api_key else None
        self.debug = os.environ.get("GPTCLI_DEBUG", "") not in ("", "0")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})["arrived"] = started  # (time to first token counts from here)
        status = 0

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _send_json(send_and_see, refusal)
            else:
                await self.app(scope, receive, send_and_see)
        except (Gone, ClientDisconnect):
            scope.setdefault("state", {}).setdefault("note", "client went away")
        except Exception as exc:  # a bug: one line in the log, OpenAI's error object to the client
            if self.debug:
                import traceback

                traceback.print_exc()
            note(scope, f"error: {type(exc).__name__}: {first_line(exc)}")
            if not status:
                error = ApiError(500, f"internal error: {first_line(exc)}", kind="server_error")
                with suppress(OSError):  # the client is gone too
                    await _send_json(send_and_see, error)
        finally:
            self.state.metrics.request(scope.get("path", ""), str(status) if status else "disconnected")
            self.state.log(self._line(scope, status, time.perf_counter() - started))

    def _refusal(self, scope: Scope) -> ApiError | None:
        """Why the request is refused before it reaches a route, or None."""
        headers = dict(scope["headers"])
        allowed = self.state.options.allowed_hosts
        if allowed is not None:
            host = _host_name(headers.get(b"host", b"").decode("latin-1"))
            if host is not None and host not in allowed:
                return ApiError(
                    421,
                    f"this server does not answer for the host {host!r} (--allowed-host adds names)",
                    code="invalid_host",
                )
        if self.key is not None and scope["path"] not in self.OPEN:
            given = headers.get(b"authorization")
            scheme, _, token = (given or b"").strip().partition(b" ")
            if not given or scheme.lower() != b"bearer":
                return ApiError(401, _NO_KEY, code="missing_api_key", headers=_CHALLENGE)
            if not hmac.compare_digest(token.strip(), self.key):
                return ApiError(
                    401,
                    "Incorrect API key provided.",
                    code="invalid_api_key",
                    headers={"www-authenticate": 'Bearer realm="gptcli", error="invalid_token"'},
                )
        if scope["method"] == "POST":
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                return ApiError(
                    415,
                    "the request body must be JSON, sent with Content-Type: application/json",
                    code="unsupported_media_type",
                )
        if self.state.stopping and scope["path"] not in self.OPEN:
            return stopping_error()
        return None

    @staticmethod
    def _line(scope: Scope, status: int, seconds: float) -> str:
        client = scope.get("client") or ("-", 0)
        path = _printable(scope.get("path", ""))[:200]
        note = scope.get("state", {}).get("note")
        status_text = str(status) if status else "disconnected"
        return f'{client[0]} "{scope.get("method", "")} {path}" {status_text} {seconds:.2f}s' + (
            f" {_printable(note)[:300]}" if note else ""
        )


_CHALLENGE = {"www-authenticate": 'Bearer realm="gptcli"'}


def _host_name(header: str) -> str | None:
    """The name in a Host header, lower case, without its port (None: no Host, as in HTTP/1.0)."""
    header = header.strip().lower()
    if not header:
        return None
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _printable(text: str) -> str:
    """Client-chosen text (a path) as one printable line: no control characters reach the log."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


async def _send_json(send: Send, error: ApiError) -> None:
    data = json.dumps(error.body()).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
