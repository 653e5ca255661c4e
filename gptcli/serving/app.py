"""The HTTP side of `gptcli serve`: routes, the guard around them, request bodies, event streams.

`create_app(lm)` returns a FastAPI app whose lifespan starts and stops one gptcli.serving.engine.Engine. Every
route reads its body itself (size-limited, strict UTF-8 and JSON), validates it (gptcli.serving.schemas),
tokenizes it in a worker thread (gptcli.serving.plans), submits one engine Job and turns its events into
OpenAI's objects (gptcli.serving.responses). The guard, outermost, checks the API key, turns any failure into
OpenAI's error object (never a traceback to the client), and logs one line per request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptcli.errors import GptcliError, UsageError, first_line
from gptcli.loading.models import LoadedModel
from gptcli.serving.engine import Done, Engine, Event, Failed, Job
from gptcli.serving.plans import Plan, check_ids, plan_chat, plan_completion, tokenize_text
from gptcli.serving.responses import Reply
from gptcli.serving.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse,
)
from gptcli.textio import decode_utf8

MAX_BODY = 4 * 2**20  # bytes of a request body: 4 MiB is thousands of contexts of text
_THREADS = 4  # worker threads for tokenizing (each thread's malloc arena stays: keep them few)

Log = Callable[[str], None]


def create_app(
    lm: LoadedModel, *, api_key: str | None = None, log: Log | None = None, max_rows: int = 32
) -> FastAPI:
    """The OpenAI-compatible app over `lm`; `log` receives one line per request (None: silent)."""
    engine = Engine(lm, max_rows=max_rows)
    limiter: list[anyio.CapacityLimiter] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limiter.append(anyio.CapacityLimiter(_THREADS))
        engine.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(engine.stop)

    app = FastAPI(title="gptcli", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(Guard, api_key=api_key, log=log or (lambda line: None))
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    created = int(time.time())
    model_object = {"id": lm.name, "object": "model", "created": created, "owned_by": "gptcli"}

    async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter[0] if limiter else None)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != lm.name:
            raise ApiError(
                404, f"The model '{model_id}' does not exist", param="model", code="model_not_found"
            )
        return model_object

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse(CompletionRequest, await read_json(request))
        plan = await in_thread(plan_completion, lm, body)
        return await run(request, engine, plan, lm)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse(ChatRequest, await read_json(request))
        plan = await in_thread(plan_chat, lm, body)
        return await run(request, engine, plan, lm)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = parse(TokenizeRequest, await read_json(request))
        return await in_thread(tokenize_text, lm, body)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = parse(DetokenizeRequest, await read_json(request))
        check_ids(lm, body.tokens, "tokens")
        return {
            "content": await in_thread(lambda: lm.tokenizer.decode(body.tokens, skip_special_tokens=False))
        }

    return app


# --- Requests: body, plan, run -------------------------------------------------------------------------


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object: at most MAX_BODY bytes (413), strict UTF-8 and strict JSON (400)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise _too_large()
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise _too_large()
    try:
        text = decode_utf8(bytes(data), "the request body")
        value = json.loads(text, parse_constant=_no_constant)
    except UsageError as exc:
        raise ApiError(400, str(exc), code="invalid_encoding") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError; so is an integer of 5,000 digits
        reason = first_line(exc)
        if "integer string conversion" in reason:
            reason = "a number has too many digits"
        raise ApiError(400, f"the request body is not valid JSON: {reason}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return value


def _too_large() -> ApiError:
    return ApiError(413, f"the request body is larger than {MAX_BODY // 2**20} MiB", code="request_too_large")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class Events:
    """A job's events, handed from the engine thread to the request's event loop."""

    GONE = object()  # the client went away

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, event: Event) -> None:
        """The job's sink (on the engine thread): raises once the loop is closed, which stops the job."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self.queue.get()
            if event is self.GONE:
                return
            yield event
            if isinstance(event, (Done, Failed)):
                return


async def watch_disconnect(receive: Receive, job: Job, events: Events) -> None:
    """Stop the job as soon as the client disconnects (its rows leave the batch at the next step)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            events.queue.put_nowait(Events.GONE)
            return


async def run(request: Request, engine: Engine, plan: Plan, lm: LoadedModel) -> Response:
    events = Events()
    reply = Reply(
        model=lm.name,
        chat=plan.chat,
        prompts=plan.prompts,
        prompt_ids=plan.prompt_ids,
        n=plan.settings.num_samples,
        tokenizer=lm.tokenizer,
        echo=plan.echo,
        logprobs=plan.logprobs is not None,
        include_usage=plan.include_usage,
    )
    job = Job(
        plan.prompts,
        plan.prompt_ids,
        plan.settings,
        events.put,
        prompt_logprobs=plan.logprobs if plan.echo else None,
        generate=plan.generate,
    )
    try:
        engine.submit(job)
    except GptcliError as exc:
        raise ApiError(503, str(exc), kind="server_error") from None
    if plan.stream:
        return EventStream(reply, job, events, request.scope)
    watcher = asyncio.ensure_future(watch_disconnect(request.receive, job, events))
    try:
        async for event in events:
            reply.feed(event)
            if isinstance(event, Failed):
                raise ApiError(500, event.message, kind="server_error")
    finally:
        watcher.cancel()
        job.cancel()
    body = reply.body()
    _note(request.scope, body["usage"])
    return JSONResponse(body)


def _note(scope: Scope, usage: dict[str, int]) -> None:
    """What the request's log line adds: its tokens."""
    scope.setdefault("state", {})["note"] = f"{usage['prompt_tokens']}+{usage['completion_tokens']} tokens"


class EventStream(Response):
    """Server-sent events: one `data: {json}` per chunk, then `data: [DONE]`. Stops the job when the
    client goes away, whether the disconnect is seen by watching or by a failed write."""

    media_type = "text/event-stream"

    def __init__(self, reply: Reply, job: Job, events: Events, scope: Scope) -> None:
        self.reply, self.job, self.events, self.scope = reply, job, events, scope
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(watch_disconnect(receive, self.job, self.events))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            for chunk in self.reply.start():
                await self._data(send, chunk)
            async for event in self.events:
                for chunk in self.reply.feed(event):
                    await self._data(send, chunk)
                if isinstance(event, Done):
                    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
                    _note(self.scope, self.reply.usage())
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we wrote (uvicorn's ClientDisconnected)
            pass
        finally:
            watcher.cancel()
            self.job.cancel()
            if "note" not in self.scope.get("state", {}):
                left = sum(len(c.text) for c in self.reply.choices.values())
                self.scope.setdefault("state", {})["note"] = f"stream cut short after {left} tokens"

    @staticmethod
    async def _data(send: Send, chunk: dict[str, Any]) -> None:
        data = b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": data, "more_body": True})


# --- Errors and the guard --------------------------------------------------------------------------------


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message, code = f"Invalid URL ({request.method} {request.url.path})", "unknown_url"
    elif exc.status_code == 405:
        message, code = f"Method not allowed ({request.method} {request.url.path})", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    return JSONResponse(ApiError(exc.status_code, message, code=code).body(), status_code=exc.status_code)


class Guard:
    """Outermost: the API key, one log line per request, and no failure reaching the client raw."""

    def __init__(self, app: ASGIApp, api_key: str | None, log: Log) -> None:
        self.app = app
        self.key = f"Bearer {api_key}".encode() if api_key else None
        self.log = log
        self.debug = os.environ.get("GPTCLI_DEBUG", "") not in ("", "0")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key is not None and scope["path"] != "/health" and not self._authorized(scope):
                error = ApiError(401, "Incorrect API key provided", code="invalid_api_key")
                await _send_json(send_and_see, 401, error.body())
            else:
                await self.app(scope, receive, send_and_see)
        except Exception as exc:  # a bug: one line in the log, OpenAI's error object to the client
            if self.debug:
                import traceback

                traceback.print_exc()
            scope.setdefault("state", {})["note"] = f"error: {type(exc).__name__}: {first_line(exc)}"
            if not status:
                error = ApiError(500, f"internal error: {first_line(exc)}", kind="server_error")
                with suppress(OSError):  # the client is gone too
                    await _send_json(send_and_see, 500, error.body())
        finally:
            self.log(self._line(scope, status, time.perf_counter() - started))

    def _authorized(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return self.key is not None and hmac.compare_digest(given, self.key)

    @staticmethod
    def _line(scope: Scope, status: int, seconds: float) -> str:
        client = scope.get("client") or ("-", 0)
        path = _printable(scope.get("path", ""))[:200]
        note = scope.get("state", {}).get("note")
        status_text = str(status) if status else "disconnected"
        return f'{client[0]} "{scope.get("method", "")} {path}" {status_text} {seconds:.2f}s' + (
            f" {note}" if note else ""
        )


def _printable(text: str) -> str:
    """Client-chosen text (a path) as one printable line: no control characters reach the log."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
