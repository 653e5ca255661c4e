"""The HTTP side of `gptcli serve`: routes, request bodies, event streams.

`create_app(lm)` returns a FastAPI app whose lifespan starts and stops one gptcli.serving.engine.Engine.
Every route reads its body itself (size-limited, within the timeout), parses and validates it in a
worker thread (strict UTF-8 and JSON, gptcli.serving.schemas), tokenizes it there too
(gptcli.serving.plans), submits one engine Job and turns its events into OpenAI's objects
(gptcli.serving.responses). gptcli.serving.guard, outermost, checks the Host, the key and the content
type, logs one line per request, and turns any failure into OpenAI's error object.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from gptcli.errors import GptcliError, UsageError, first_line
from gptcli.loading.models import LoadedModel
from gptcli.serving import PREFILL_CHUNK
from gptcli.serving.engine import SHUTTING_DOWN, Busy, Done, Engine, Event, Failed, Job, Token
from gptcli.serving.guard import RETRY_AFTER, Gone, Guard, api_error, http_error, note, stopping_error
from gptcli.serving.metrics import CONTENT_TYPE, Metrics
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
_THREADS = 4  # worker threads for tokenizing and parsing (each thread's malloc arena stays: keep them few)
STREAM_BUFFER = 16  # events per completion a stream may hold unsent before its rows pause

Log = Callable[[str], None]
T = TypeVar("T")


@dataclass
class Options:
    """How the app guards itself; `gptcli serve`'s options (docs/serve.md, limits)."""

    api_key: str | None = None
    model_id: str | None = None  # the name /v1/models gives (None: the model's, without a local path)
    max_rows: int = 32
    prefill_chunk: int | None = PREFILL_CHUNK  # longest prompt prefilled in one step (None: any)
    max_waiting: int | None = None  # jobs waiting for room beyond the batch; past it, 429
    timeout: float = 30.0  # seconds to send a body, or for a stream's client to take the next piece
    allowed_hosts: frozenset[str] | None = None  # Host names accepted (None: any)


class State:
    """What the routes and the guard share: the engine, the options, whether the server is stopping."""

    def __init__(self, lm: LoadedModel, options: Options, log: Log) -> None:
        self.lm = lm
        self.options = options
        self.log = log
        self.engine = Engine(lm, max_rows=options.max_rows, prefill_chunk=options.prefill_chunk)
        self.model_id = options.model_id or public_name(lm.name)
        self.metrics = Metrics(self.engine.stats, self.engine.kv_budget)
        self.stopping = False
        self.limiter: anyio.CapacityLimiter | None = None

    def begin_stop(self, grace: float) -> None:
        """Stop admitting requests now; after `grace` seconds fail what is still running (their clients
        get a 503, or an error event and [DONE]). Called on the event loop when a signal arrives."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        loop.call_later(grace, lambda: loop.run_in_executor(None, self.engine.stop))

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)


def public_name(name: str) -> str:
    """The model's name for clients: a local folder's own name, not where it lies on this machine."""
    path = Path(name).expanduser()
    try:
        local = path.is_absolute() or name.startswith(".") or path.exists()
    except OSError:
        local = False
    return path.name or name if local else name


def create_app(lm: LoadedModel, *, log: Log | None = None, **options: Any) -> FastAPI:
    """The OpenAI-compatible app over `lm`; `log` receives one line per request (None: silent);
    `options` are Options' fields."""
    state = State(lm, Options(**options), log or (lambda line: None))
    engine = state.engine

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.limiter = anyio.CapacityLimiter(_THREADS)
        engine.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(engine.stop)

    app = FastAPI(title="gptcli", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gptcli = state
    app.add_middleware(Guard, state=state)
    app.add_exception_handler(ApiError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    created = int(time.time())
    model_object = {"id": state.model_id, "object": "model", "created": created, "owned_by": "gptcli"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "stopping" if state.stopping else "ok", **engine.stats()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in (state.model_id, lm.name):
            raise ApiError(
                404, f"The model '{model_id}' does not exist", param="model", code="model_not_found"
            )
        return model_object

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request, state, CompletionRequest)
        shed(state)  # before tokenizing: a full line refuses at once
        plan = await state.in_thread(plan_completion, lm, body)
        return await run(request, state, plan)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, state, ChatRequest)
        shed(state)
        plan = await state.in_thread(plan_chat, lm, body)
        return await run(request, state, plan)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await read_body(request, state, TokenizeRequest)
        return await state.in_thread(tokenize_text, lm, body)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await read_body(request, state, DetokenizeRequest)
        check_ids(lm, body.tokens, "tokens")
        text = await state.in_thread(lambda: lm.tokenizer.decode(body.tokens, skip_special_tokens=False))
        return {"content": text, "prompt": text}  # llama.cpp's name, vLLM's

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return await state.in_thread(describe_tokenizer, lm)

    return app


# --- Requests: body, plan, run -------------------------------------------------------------------------


async def read_body(request: Request, state: State, model: type[Any]) -> Any:
    """The body as `model`: at most MAX_BODY bytes (413) within the timeout (408), then parsed and
    validated in a worker thread (a 4 MiB body takes the event loop tens of milliseconds)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise _too_large()
    data = bytearray()
    try:
        with anyio.fail_after(state.options.timeout):
            async for chunk in request.stream():
                data += chunk
                if len(data) > MAX_BODY:
                    raise _too_large()
    except TimeoutError:
        seconds = f"{state.options.timeout:g}"
        raise ApiError(408, f"the request body did not arrive within {seconds} s", code="timeout") from None
    return await state.in_thread(_parse_body, bytes(data), model)


def _parse_body(data: bytes, model: type[Any]) -> Any:
    """Strict UTF-8, strict JSON, an object, no lone surrogate in any string, then `model`'s fields."""
    try:
        text = decode_utf8(data, "the request body")
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
    _check_surrogates(value)
    return parse(model, value)


def _check_surrogates(value: Any) -> None:
    """One rule for every string of a body, keys included: JSON's `\ud800` escapes can spell a lone
    surrogate, which is no text (a prompt, a stop, a message, a name alike): refused with its place."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                stack.append((key, where))
                stack.append((inner, f"{where}.{key}" if where else str(key)))
        elif isinstance(item, list):
            stack.extend((inner, f"{where}[{i}]") for i, inner in enumerate(item))
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ApiError(
                    400,
                    f"Invalid value for '{where or 'body'}': not valid Unicode text (a lone surrogate at "
                    f"character {exc.start})",
                    param=where or None,
                    code="invalid_value",
                ) from None


def _too_large() -> ApiError:
    return ApiError(413, f"the request body is larger than {MAX_BODY // 2**20} MiB", code="request_too_large")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def shed(state: State) -> None:
    """429 when --max-waiting requests already wait for room; 503 once the server is stopping."""
    if state.stopping:
        raise stopping_error()
    limit = state.options.max_waiting
    if limit is not None and state.engine.waiting() >= limit:
        raise _busy(limit)


def _busy(limit: int) -> ApiError:
    return ApiError(
        429,
        f"the server is busy: {limit} requests are already waiting (--max-waiting); retry shortly",
        kind="server_error",
        code="rate_limit_exceeded",
        headers={"retry-after": str(RETRY_AFTER)},
    )


class Events:
    """A job's events, handed from the engine thread to the request's event loop.

    The engine never waits for a client: when more than `limit` events are waiting to be sent (the
    client reads slower than the batch decodes), the job is paused (its rows leave the batch, their
    caches kept) until the reader catches up to half of that.
    """

    GONE = object()  # the client went away

    def __init__(self, state: State, rows: int, arrived: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.limit = STREAM_BUFFER * max(1, rows)
        self.job: Job | None = None
        self.metrics = state.metrics
        self.started = arrived  # when the request arrived (perf_counter)
        self.last: dict[tuple[int, int], float] = {}  # each row's last token time

    def put(self, event: Event) -> None:
        """The job's sink (on the engine thread): raises once the loop is closed, which stops the job."""
        if isinstance(event, Token):
            now = time.perf_counter()
            row = (event.index, event.sample)
            before = self.last.get(row)
            if before is None:
                self.metrics.ttft.observe(now - self.started)
            else:
                self.metrics.per_token.observe(now - before)
            self.last[row] = now
        self.loop.call_soon_threadsafe(self._arrive, event)

    def _arrive(self, event: Any) -> None:
        self.queue.put_nowait(event)
        if self.job is not None and not self.job.paused and self.queue.qsize() > self.limit:
            self.job.pause()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self.queue.get()
            if self.job is not None and self.job.paused and self.queue.qsize() <= self.limit // 2:
                self.job.resume()
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


def _failure(event: Failed) -> ApiError:
    if event.message == SHUTTING_DOWN:
        return stopping_error()
    return ApiError(500, event.message, kind="server_error", code="generation_failed")


async def run(request: Request, state: State, plan: Plan) -> Response:
    lm = state.lm
    rows = len(plan.prompt_ids) * plan.settings.num_samples
    events = Events(state, rows, request.scope.get("state", {}).get("arrived", time.perf_counter()))
    reply = Reply(
        model=state.model_id,
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
        logit_bias=plan.logit_bias,
    )
    events.job = job
    if state.stopping:
        raise stopping_error()
    try:
        state.engine.submit(job, state.options.max_waiting)
    except Busy:
        raise _busy(state.options.max_waiting or 0) from None
    except GptcliError:
        raise stopping_error() from None
    if plan.stream:
        return EventStream(reply, job, events, request.scope, state)
    watcher = asyncio.ensure_future(watch_disconnect(request.receive, job, events))
    finished = False
    try:
        async for event in events:
            reply.feed(event)
            if isinstance(event, Failed):
                raise _failure(event)
            finished = isinstance(event, Done)
    finally:
        watcher.cancel()
        job.cancel()
    if not finished:
        made = reply.usage()["completion_tokens"]
        note(request.scope, f"client went away after {made} tokens" if made else "client went away")
        raise Gone()
    body = reply.body()
    _note_usage(request.scope, body["usage"], state)
    return JSONResponse(body)


def _note_usage(scope: Scope, usage: dict[str, int], state: State) -> None:
    note(scope, f"{usage['prompt_tokens']}+{usage['completion_tokens']} tokens")
    state.metrics.prompt_tokens.inc(usage["prompt_tokens"])
    state.metrics.generation_tokens.inc(usage["completion_tokens"])


_DONE = b"data: [DONE]\n\n"


class EventStream(Response):
    """Server-sent events: one `data: {json}` per chunk, then `data: [DONE]`, also after an error event.
    Stops the job when the client goes away (seen by watching, or by a failed write), and cuts off a
    client that takes no data for the timeout: its rows wait paused meanwhile, then are let go."""

    media_type = "text/event-stream"

    def __init__(self, reply: Reply, job: Job, events: Events, scope: Scope, state: State) -> None:
        self.reply, self.job, self.events, self.scope, self.state = reply, job, events, scope, state
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(watch_disconnect(receive, self.job, self.events))
        self.send = send
        why = "client went away"
        try:
            await self._send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            for chunk in self.reply.start():
                await self._data(chunk)
            async for event in self.events:
                for chunk in self.reply.feed(event):
                    await self._data(chunk)
                if isinstance(event, (Done, Failed)):
                    await self._send({"type": "http.response.body", "body": _DONE, "more_body": True})
                if isinstance(event, Done):
                    _note_usage(self.scope, self.reply.usage(), self.state)
                elif isinstance(event, Failed):
                    note(self.scope, f"error: {event.message}")
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:  # it stopped reading: close the connection, whatever it holds unsent
            why = f"client took no data for {self.state.options.timeout:g} s"
            abort = scope.get("extensions", {}).get("gptcli.abort")
            if abort is not None:
                abort()
        except OSError:  # the client went away while we wrote (uvicorn's ClientDisconnected)
            pass
        finally:
            watcher.cancel()
            self.job.cancel()
            if "note" not in self.scope.get("state", {}):
                made = self.reply.usage()["completion_tokens"]
                left = sum(len(c.text) for c in self.reply.choices.values())
                note(self.scope, f"stream cut short after {max(made, left)} tokens ({why})")

    async def _send(self, message: Message) -> None:
        """Send, or TimeoutError when the client has taken nothing for the timeout (uvicorn waits for
        the socket to drain before it writes more)."""
        with anyio.fail_after(self.state.options.timeout):
            await self.send(message)

    async def _data(self, chunk: dict[str, Any]) -> None:
        data = b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
        await self._send({"type": "http.response.body", "body": data, "more_body": True})


def describe_tokenizer(lm: LoadedModel) -> dict[str, Any]:
    """vLLM's /tokenizer_info: the special tokens, the context, the class, the chat template."""
    from gptcli.serving.chat import chat_template

    tokenizer = lm.tokenizer

    def special(role: str) -> str | None:
        token = getattr(tokenizer, f"{role}_token_id", None)
        return None if token is None else str(tokenizer.convert_ids_to_tokens(token))

    return {
        # gptcli's stand-in names the class transformers would build
        "tokenizer_class": getattr(tokenizer, "class_name", type(tokenizer).__name__),
        "eos_token": special("eos"),
        "bos_token": special("bos"),
        "pad_token": special("pad"),
        "unk_token": special("unk"),
        "model_max_length": lm.context_length,
        "vocab_size": min(len(tokenizer), lm.config.vocab_size),
        "chat_template": chat_template(tokenizer),
    }
