"""The HTTP side of `gptcli serve`: routes, the guard around them, request bodies, event streams.

`create_app(lm)` returns a FastAPI app whose lifespan starts and stops one gptcli.engine.Engine. Every
route reads its body itself (size-limited, strict UTF-8 and JSON), validates it (gptcli.server.schemas),
tokenizes in a worker thread, submits one engine Job and turns its events into OpenAI's objects
(gptcli.server.responses). The guard, outermost, checks the API key, turns any failure into OpenAI's
error object (never a traceback to the client), and logs one line per request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptcli.chat import chat_prompt
from gptcli.engine import Done, Engine, Event, Failed, Job
from gptcli.errors import GptcliError, UsageError, first_line
from gptcli.models import LoadedModel
from gptcli.sampling import Settings
from gptcli.server.responses import Reply
from gptcli.server.schemas import (
    MAX_CHOICES,
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse,
    settings,
    unsupported,
)
from gptcli.textio import check_text, decode_utf8
from gptcli.tokens import TokenText, encode_prompt

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


@dataclass
class Plan:
    """A validated request, tokenized, ready to become an engine Job and a Reply."""

    chat: bool
    prompts: list[str]
    prompt_ids: list[list[int]]
    settings: Settings
    generate: bool = True
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # alternatives per token; None: no logprobs


def check_ids(lm: LoadedModel, ids: list[int], param: str) -> None:
    vocab = min(len(lm.tokenizer), lm.config.vocab_size)
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is not in the vocabulary (0 to {vocab - 1})", param=param)


def _text(value: str, param: str) -> str:
    try:
        return check_text(value, param)
    except UsageError as exc:
        raise ApiError(400, str(exc), param=param) from None


def _check_lengths(lm: LoadedModel, plan: Plan, max_tokens: int | None) -> None:
    """Refuse what cannot fit the context (a prompt is never cut: the reply would not be what was asked)."""
    context = lm.context_length
    if max_tokens is not None and max_tokens > context:
        raise ApiError(
            400,
            f"max_tokens is {max_tokens}, more than the model's context ({context} tokens)",
            param="max_tokens",
        )
    room = 1 if plan.generate else 0
    for ids in plan.prompt_ids:
        if len(ids) + room > context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens; the prompt has {len(ids)}"
                + (", and at least one must be left to generate" if room else ""),
                param="messages" if plan.chat else "prompt",
                code="context_length_exceeded",
            )


def _check_choices(prompts: int, n: int) -> None:
    if prompts * n > MAX_CHOICES:
        raise ApiError(400, f"at most {MAX_CHOICES} completions per request (prompts × n)", param="n")


def plan_completion(lm: LoadedModel, request: CompletionRequest) -> Plan:
    unsupported(request)
    raw = request.prompt
    many = isinstance(raw, list) and bool(raw) and not all(isinstance(p, int) for p in raw)
    _check_choices(len(raw) if many else 1, request.n)  # before tokenizing them all
    prompts: list[str] = []
    prompt_ids: list[list[int]] = []
    if isinstance(raw, str) or (raw and all(isinstance(p, str) for p in raw)):
        for i, prompt in enumerate([raw] if isinstance(raw, str) else raw):
            text = _text(prompt, "prompt" if isinstance(raw, str) else f"prompt[{i}]")  # type: ignore[arg-type]
            prompts.append(text)
            prompt_ids.append(encode_prompt(lm.tokenizer, text))
    else:
        lists = [raw] if raw and all(isinstance(p, int) for p in raw) else raw
        for i, ids in enumerate(lists):  # token ids: the prompt is exactly these
            if not isinstance(ids, list) or not ids:
                raise ApiError(400, "a prompt of token ids must not be empty", param=f"prompt[{i}]")
            check_ids(lm, ids, "prompt")  # type: ignore[arg-type]
            prompt_ids.append(list(ids))  # type: ignore[arg-type]
            prompts.append(lm.tokenizer.decode(ids, skip_special_tokens=False))
    if not prompts:
        raise ApiError(400, "prompt must not be an empty list", param="prompt")
    generate = request.max_tokens != 0
    plan = Plan(
        chat=False,
        prompts=prompts,
        prompt_ids=prompt_ids,
        settings=settings(
            request, lm.generation_config, max_tokens=request.max_tokens, logprobs=request.logprobs
        ),
        generate=generate,
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        echo=request.echo,
        logprobs=request.logprobs,
    )
    _check_lengths(lm, plan, request.max_tokens)
    return plan


def plan_chat(lm: LoadedModel, request: ChatRequest) -> Plan:
    unsupported(request)
    if request.top_logprobs is not None and not request.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = (
        request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    )
    if max_tokens == 0:
        raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
    messages = []
    for i, message in enumerate(request.messages):
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        messages.append({"role": message.role, "content": _text(content or "", f"messages[{i}].content")})
    try:
        prompt = chat_prompt(lm.tokenizer, messages)
    except GptcliError:
        raise
    except Exception as exc:  # the model's template refused the conversation (jinja raises)
        raise ApiError(
            400, f"the model's chat template failed: {first_line(exc)}", param="messages"
        ) from None
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    _check_choices(1, request.n)
    plan = Plan(
        chat=True,
        prompts=[prompt.text],
        prompt_ids=[prompt.ids],
        settings=settings(
            request, lm.generation_config, max_tokens=max_tokens, logprobs=logprobs, extra_stops=prompt.stops
        ),
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        logprobs=logprobs,
    )
    _check_lengths(lm, plan, max_tokens)
    return plan


def tokenize_text(lm: LoadedModel, request: TokenizeRequest) -> dict[str, Any]:
    """llama.cpp's /tokenize: ids, or with_pieces: {"id", "piece"} plus gptcli's "token" and "bytes"."""
    text = _text(request.content, "content")
    ids = list(lm.tokenizer.encode(text, add_special_tokens=request.add_special)) if text else []
    if not request.with_pieces:
        return {"tokens": ids}
    names = TokenText(lm.tokenizer)
    tokens = []
    for token in ids:
        described = names.describe(token)
        data = names.bytes(token)
        try:
            piece: Any = data.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(data)  # llama.cpp: the bytes, when the piece is not whole characters
        tokens.append({"id": token, "piece": piece, "token": described["token"], "bytes": described["bytes"]})
    return {"tokens": tokens}


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
