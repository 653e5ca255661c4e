"""OpenAI's response objects, built from a job's events: whole, or as the chunks of a stream.

Choice `i` is sample `i % n` of prompt `i // n`, as OpenAI numbers them. finish_reason is OpenAI's:
"stop" for the end-of-text token or a stop text, "length" for max_tokens or a full context.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gptcli.generation.generate import Completion
from gptcli.generation.tokens import Detokenizer, TokenText
from gptcli.serving.engine import Done, Event, Failed, PromptLogprobs, Token

if TYPE_CHECKING:
    from gptcli.contracts import LogprobEntry, TopLogprob

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def _finite(value: float) -> float | None:
    """JSON has no infinities: a logprob of -inf (a float32 underflow) goes out as null."""
    return value if math.isfinite(value) else None


def legacy_piece(hex_bytes: str) -> str:
    """A token as the completions API writes it: its text, or `bytes:\\xe4\\xbb` when it is part of a
    character (byte-level BPE splits most CJK characters)."""
    data = bytes.fromhex(hex_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def chat_logprob(entry: TopLogprob) -> dict[str, Any]:
    """A token entry as chat completions write it: text (U+FFFD for part of a character) and bytes."""
    data = bytes.fromhex(entry["bytes"])
    return {
        "token": data.decode("utf-8", errors="replace"),
        "logprob": _finite(entry["logprob"]),
        "bytes": list(data),
    }


@dataclass
class _Choice:
    index: int
    text: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float | None] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    chat_logprobs: list[dict[str, Any]] = field(default_factory=list)
    released: int = 0  # characters of text so far (the prompt's too, with echo)
    done: Completion | None = None


@dataclass
class Reply:
    """The events of one request, turned into OpenAI's objects.

    `feed(event)` returns the chunks to stream for it (for a non-streamed request, ignore them);
    `body()` is the whole response once the job is done.
    """

    model: str
    chat: bool
    prompts: list[str]
    prompt_ids: list[list[int]]
    n: int
    tokenizer: Any
    echo: bool = False
    logprobs: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))
    choices: dict[int, _Choice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + self.id
        self._names = TokenText(self.tokenizer)
        for i in range(len(self.prompts) * self.n):
            self.choices[i] = _Choice(i)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    # -- streaming -------------------------------------------------------------------------------------

    def start(self) -> list[dict[str, Any]]:
        """The chunks that open a stream: the assistant's role (chat), the echoed prompts (unless their
        logprobs will come with them)."""
        if self.chat:
            return [self._chunk(c, {"role": "assistant", "content": ""}) for c in self.choices.values()]
        if self.echo and not self.logprobs:
            chunks = []
            for index, prompt in enumerate(self.prompts):
                for choice in self._choices_of(index):
                    chunks.append(self._chunk(choice, prompt))
            return chunks
        return []

    def feed(self, event: Event) -> list[dict[str, Any]]:
        if isinstance(event, PromptLogprobs):
            return self._prompt_logprobs(event)
        if isinstance(event, Token):
            return self._token(event)
        if isinstance(event, Completion):
            choice = self.choices[event.index * self.n + event.sample]
            choice.done = event
            return [self._chunk(choice, "", finish=FINISH.get(event.finish_reason, "stop"))]
        if isinstance(event, Done) and self.include_usage:
            return [self._usage_chunk()]
        if isinstance(event, Failed):
            return [
                {"error": {"message": event.message, "type": "server_error", "param": None, "code": None}}
            ]
        return []

    def _choices_of(self, index: int) -> list[_Choice]:
        return [self.choices[index * self.n + s] for s in range(self.n)]

    def _prompt_logprobs(self, event: PromptLogprobs) -> list[dict[str, Any]]:
        """With echo (completions): the prompt's tokens come first, with their logprobs."""
        ids = self.prompt_ids[event.index]
        detok = Detokenizer(self.tokenizer)
        offsets = []
        for token in ids:
            offsets.append(len(detok.emitted))
            detok.push(token)
        chunks = []
        for choice in self._choices_of(event.index):
            start = len(choice.tokens)
            for token, entry, offset in zip(ids, event.entries, offsets, strict=True):
                self._add_logprob(choice, token, entry, offset)
            choice.released = len(self.prompts[event.index])
            chunks.append(self._chunk(choice, self.prompts[event.index], logprobs_from=start))
        return chunks

    def _token(self, event: Token) -> list[dict[str, Any]]:
        choice = self.choices[event.index * self.n + event.sample]
        start = len(choice.tokens)
        if self.logprobs:
            self._add_logprob(choice, event.token_id, event.logprob, choice.released)
        choice.text.append(event.text)
        choice.released += len(event.text)
        if not event.text and not self.logprobs:
            return []
        if self.chat:
            return [self._chunk(choice, {"content": event.text}, logprobs_from=start)]
        return [self._chunk(choice, event.text, logprobs_from=start)]

    def _add_logprob(self, choice: _Choice, token: int, entry: LogprobEntry | None, offset: int) -> None:
        if self.chat:
            if entry is not None:
                item = chat_logprob(entry)
                item["top_logprobs"] = [chat_logprob(t) for t in entry["top_logprobs"]]
                choice.chat_logprobs.append(item)
            choice.tokens.append("")  # (counts the tokens streamed)
            return
        if entry is None:  # a prompt's first token: nothing before it to predict it from
            choice.tokens.append(legacy_piece(self._names.bytes(token).hex()))
            choice.token_logprobs.append(None)
            choice.top_logprobs.append(None)
        else:
            choice.tokens.append(legacy_piece(entry["bytes"]))
            choice.token_logprobs.append(_finite(entry["logprob"]))
            top = {legacy_piece(t["bytes"]): _finite(t["logprob"]) for t in entry["top_logprobs"]}
            top.setdefault(legacy_piece(entry["bytes"]), _finite(entry["logprob"]))
            choice.top_logprobs.append(top)
        choice.text_offset.append(offset)

    def _logprobs_object(self, choice: _Choice, start: int = 0) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": choice.chat_logprobs[start:], "refusal": None}
        return {
            "tokens": choice.tokens[start:],
            "token_logprobs": choice.token_logprobs[start:],
            "top_logprobs": choice.top_logprobs[start:],
            "text_offset": choice.text_offset[start:],
        }

    def _chunk(
        self, choice: _Choice, content: Any, *, finish: str | None = None, logprobs_from: int | None = None
    ) -> dict[str, Any]:
        logprobs = None if logprobs_from is None else self._logprobs_object(choice, logprobs_from)
        if self.chat:
            delta = content if isinstance(content, dict) else ({} if finish else {"content": content})
            item: dict[str, Any] = {"index": choice.index, "delta": delta, "logprobs": logprobs}
        else:
            item = {"index": choice.index, "text": content, "logprobs": logprobs}
        item["finish_reason"] = finish
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [item],
        }
        if self.chat:
            chunk["system_fingerprint"] = None
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _usage_chunk(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(),
        }

    # -- whole -----------------------------------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        prompt = sum(len(ids) for ids in self.prompt_ids)
        completion = sum(len(c.done.token_ids) for c in self.choices.values() if c.done is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def body(self) -> dict[str, Any]:
        choices = []
        for choice in self.choices.values():
            done = choice.done
            text = done.text if done is not None else ""
            finish = FINISH.get(done.finish_reason, "stop") if done is not None else "length"
            logprobs = self._logprobs_object(choice)
            if self.chat:
                message = {"role": "assistant", "content": text, "refusal": None}
                choices.append(
                    {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": finish}
                )
            else:
                if self.echo:
                    text = self.prompts[choice.index // self.n] + text
                choices.append(
                    {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
                )
        body: dict[str, Any] = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }
        if self.chat:
            body["system_fingerprint"] = None
        return body
