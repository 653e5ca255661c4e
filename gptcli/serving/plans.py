"""Requests into plans: a validated request, its prompts tokenized and checked against the context.

Runs in a worker thread (tokenizing and chat templates take time); raises ApiError for what cannot be
served as asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gptcli.errors import GptcliError, UsageError, first_line
from gptcli.generation.sampling import Settings
from gptcli.generation.tokens import TokenText, encode_prompt
from gptcli.loading.models import LoadedModel
from gptcli.serving.chat import chat_prompt
from gptcli.serving.schemas import (
    MAX_CHOICES,
    ApiError,
    ChatRequest,
    CompletionRequest,
    TokenizeRequest,
    settings,
    unsupported,
)
from gptcli.textio import check_text


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
