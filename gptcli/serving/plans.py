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
    MAX_OUTPUT,
    MAX_PIECES,
    ApiError,
    ChatRequest,
    CompletionRequest,
    TokenizeRequest,
    logit_bias,
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
    logit_bias: dict[int, float] | None = None


def _vocab(lm: LoadedModel) -> int:
    return min(len(lm.tokenizer), lm.config.vocab_size)


def check_ids(lm: LoadedModel, ids: list[int], param: str) -> None:
    vocab = _vocab(lm)
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is not in the vocabulary (0 to {vocab - 1})", param=param)


def _text(value: str, param: str) -> str:
    try:
        return check_text(value, param)
    except UsageError as exc:
        raise ApiError(400, str(exc), param=param) from None


# Characters of a long text tokenized first to see whether it can fit the context at all: tokens of
# text average 2 to 5 characters, so a text this many times the context that does not fit is seen from
# its start, and refused before the rest is tokenized (4 MiB of prompt took 6 s of a core).
_PEEK = 16
_MARGIN = 8  # tokens a cut may merge or split at its edge (a template's text around a message)


def _check_not_huge(lm: LoadedModel, text: str, param: str, chat: bool) -> None:
    """Refuse a text whose first `_PEEK` × context characters, up to a space, are already more tokens
    than the context holds: the whole text has at least as many (its words before that space are
    tokenized the same), so it cannot fit."""
    context = lm.context_length
    window = _PEEK * context
    if len(text) <= window:
        return
    cut = text.rfind(" ", 0, window)
    if cut <= 0:
        return  # no word boundary to cut at: tokenized whole, as any prompt
    head = len(lm.tokenizer.encode(text[:cut], add_special_tokens=False))
    if head > context + _MARGIN:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens; the prompt has more than {head}",
            param=param if not chat else "messages",
            code="context_length_exceeded",
        )


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


def _check_output(lm: LoadedModel, plan: Plan) -> None:
    """Refuse, before any work, an answer bigger than MAX_OUTPUT token entries: every token it may
    generate or echo, times 1 + its alternatives (a 100-byte request must not make a 100 MB answer)."""
    context = lm.context_length
    n = plan.settings.num_samples
    tokens = 0
    for ids in plan.prompt_ids:
        new = min(plan.settings.max_new_tokens, context - len(ids)) if plan.generate else 0
        scored = len(ids) if plan.echo and plan.logprobs is not None else 0
        tokens += n * (new + scored)
    entries = tokens * (1 + (plan.logprobs or 0))
    if entries > MAX_OUTPUT:
        alternatives = f" × (1 + {plan.logprobs} logprobs)" if plan.logprobs else ""
        raise ApiError(
            400,
            f"this request may return {tokens:,} tokens{alternatives} = {entries:,} entries; at most "
            f"{MAX_OUTPUT:,} per request: ask for fewer (n, max_tokens, logprobs, prompts)",
            param="max_tokens",
            code="output_too_large",
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
            _check_not_huge(lm, text, "prompt" if isinstance(raw, str) else f"prompt[{i}]", chat=False)
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
        logit_bias=logit_bias(request, _vocab(lm)),
    )
    _check_lengths(lm, plan, request.max_tokens)
    _check_output(lm, plan)
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
        text = _text(content or "", f"messages[{i}].content")
        _check_not_huge(lm, text, f"messages[{i}].content", chat=True)
        messages.append({"role": message.role, "content": text})
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
        logit_bias=logit_bias(request, _vocab(lm)),
    )
    _check_lengths(lm, plan, max_tokens)
    _check_output(lm, plan)
    return plan


def tokenize_text(lm: LoadedModel, request: TokenizeRequest) -> dict[str, Any]:
    """llama.cpp's /tokenize and vLLM's at once: `{"tokens", "count", "max_model_len"}` (and vLLM's
    `token_strs` when asked); with_pieces: llama.cpp's {"id", "piece"} per token, plus gptcli's "token"
    and "bytes"."""
    if (request.content is None) == (request.prompt is None):
        message = "give the text as 'content' (llama.cpp) or 'prompt' (vLLM), one of them"
        raise ApiError(400, message, param="content")
    param = "content" if request.content is not None else "prompt"
    text = _text(request.content if request.content is not None else request.prompt or "", param)
    flags = (request.add_special, request.add_special_tokens)
    if None not in flags and flags[0] != flags[1]:
        raise ApiError(400, "add_special and add_special_tokens differ: give one", param="add_special")
    # Each server's default: llama.cpp's add_special is false, vLLM's add_special_tokens true.
    special = next((f for f in flags if f is not None), param == "prompt")
    ids = list(lm.tokenizer.encode(text, add_special_tokens=special)) if text else []
    answer: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": lm.context_length}
    if request.return_token_strs:
        answer["token_strs"] = lm.tokenizer.convert_ids_to_tokens(ids)
    if not request.with_pieces:
        return answer
    if len(ids) > MAX_PIECES:
        raise ApiError(
            400,
            f"with_pieces describes at most {MAX_PIECES:,} tokens (the text has {len(ids):,}): send less",
            param="with_pieces",
            code="output_too_large",
        )
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
    answer["tokens"] = tokens
    return answer
