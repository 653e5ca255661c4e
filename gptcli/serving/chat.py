"""Chat messages as one prompt: the model's own chat template, or a plain transcript for base models.

A model tuned for chat ships a template (tokenizer_config.json's `chat_template`, or chat_template.jinja)
that says how its turns were written in training; transformers renders it. Base models such as GPT-2
have none, so their messages become a transcript any text model can continue:

    System: You answer briefly.
    User: What is the capital of France?
    Assistant: Paris.
    User: And of Italy?
    Assistant:

One line per message, `Role: content` (a `developer` message is a System line), then `Assistant:` for
the model to continue; generation stops before the model writes the next `User:`, `System:` or
`Assistant:` line itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli.generation.tokens import encode_prompt

if TYPE_CHECKING:
    from gptcli.contracts import Tokenizer

_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
TRANSCRIPT_STOPS = ("\nUser:", "\nSystem:", "\nAssistant:")


@dataclass(frozen=True)
class ChatPrompt:
    """The prompt that stands for a conversation: its text, its ids, and stop texts it implies."""

    text: str
    ids: list[int]
    stops: tuple[str, ...]
    template: bool  # rendered with the model's chat template (False: the plain transcript)


def has_chat_template(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer (or, for gptcli's stand-in, its folder) has a chat template."""
    from gptcli.loading import gpt2_folder

    if not isinstance(tokenizer, gpt2_folder.Tokenizer):  # transformers' own tokenizer knows
        return bool(getattr(tokenizer, "chat_template", None))
    folder = Path(tokenizer.name_or_path)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def chat_template(tokenizer: Tokenizer) -> str | None:
    """The tokenizer's chat template (Jinja source), or None when it has none."""
    if not has_chat_template(tokenizer):
        return None
    from gptcli.loading.gpt2_folder import transformers_tokenizer

    template = getattr(transformers_tokenizer(tokenizer), "chat_template", None)
    return template if isinstance(template, str) else None


def transcript(messages: list[dict[str, str]]) -> str:
    """The plain transcript of `messages` ({"role", "content"}), ending with the assistant's cue."""
    lines = [f"{_NAMES[m['role']]}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def chat_prompt(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> ChatPrompt:
    """The prompt for the assistant's next message after `messages` ({"role", "content"} each)."""
    if has_chat_template(tokenizer):
        from gptcli.loading.gpt2_folder import transformers_tokenizer

        full: Any = transformers_tokenizer(tokenizer)
        text = full.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template writes any BOS itself: encoding must not add another one.
        ids = list(full.encode(text, add_special_tokens=False)) or encode_prompt(tokenizer, "")
        return ChatPrompt(text, ids, (), template=True)
    text = transcript(messages)
    return ChatPrompt(text, encode_prompt(tokenizer, text), TRANSCRIPT_STOPS, template=False)
