"""A model kept loaded for one entry after another: the state behind `gptcli chat`.

With a chat template (a model tuned for chat), each entry is a user message and the replies are kept as
the conversation. Without one (GPT-2 and other base models), there is no conversation to keep: each
entry is appended to the text so far and the model continues it, so the text grows entry by entry
until `reset()` starts anew.

Decoding goes through gptcli.generation.generate.stream, so a reply is what `complete` would print for
the same prompt and settings. A reply stopped early (Ctrl-C) keeps what was generated up to then.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli.errors import UsageError
from gptcli.generation.generate import Completion, TextChunk, stream
from gptcli.generation.sampling import FLAG, Settings, options, resolve_settings
from gptcli.serving.chat import chat_prompt, has_chat_template

if TYPE_CHECKING:
    from gptcli.inspection.predict import Distribution
    from gptcli.loading.models import LoadedModel

# What `/set NAME VALUE` may change: the decoding settings a person tries one after another (-N, lookup
# and logprobs are for scripts, and stop texts are set on the command line).
SETTABLE = tuple(name for name, (how, _) in options().items() if "chat" in how.commands and name != "stop")
_OFF = ("off", "none", "random")
_TRUE, _FALSE = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


@dataclass
class Turn:
    """One entry and the model's reply to it."""

    entry: str
    reply: str
    finish_reason: str  # "eos", "stop", "length", or "interrupted" (stopped with Ctrl-C)


@dataclass
class Session:
    """A loaded model, its decoding settings, and the text or conversation so far."""

    lm: LoadedModel
    settings: Settings
    chat: bool
    system: str | None = None  # a system message that starts every conversation (chat only)
    turns: list[Turn] = field(default_factory=list)
    dropped: int = 0  # tokens cut from the start of the last prompt to fit the context

    @classmethod
    def start(cls, lm: LoadedModel, settings: Settings | None = None, system: str | None = None) -> Session:
        """A session in chat mode when the model has a chat template, in text mode otherwise."""
        settings = settings or resolve_settings(lm.generation_config)
        return cls(lm, settings, chat=has_chat_template(lm.tokenizer), system=system)

    # --- the text so far --------------------------------------------------------------------------

    def messages(self, entry: str | None = None) -> list[dict[str, str]]:
        """The conversation (chat mode), with `entry` as the next user message when given."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns:
            messages.append({"role": "user", "content": turn.entry})
            messages.append({"role": "assistant", "content": turn.reply})
        if entry is not None:
            messages.append({"role": "user", "content": entry})
        return messages

    def text(self) -> str:
        """The text so far: every entry and reply joined (text mode), or the conversation as the
        model sees it (chat mode, with the cue for the next reply)."""
        if self.chat:
            return chat_prompt(self.lm.tokenizer, self.messages()).text
        return "".join(turn.entry + turn.reply for turn in self.turns)

    def _prompt(self, entry: str) -> tuple[str, tuple[str, ...]]:
        if self.chat:
            prompt = chat_prompt(self.lm.tokenizer, self.messages(entry))
            return prompt.text, prompt.stops
        return self.text() + entry, ()

    # --- entries ----------------------------------------------------------------------------------

    def send(self, entry: str) -> Generator[str, None, None]:
        """Generate the reply to `entry`, yielding its text as it becomes final.

        The turn is recorded when the generator ends, however it ends: stopped by a KeyboardInterrupt
        or closed early, it keeps the reply as far as it was yielded.
        """
        prompt, stops = self._prompt(entry)
        settings = self.settings
        if stops:
            settings = dataclasses.replace(settings, stop=tuple(dict.fromkeys(settings.stop + stops)))
        events = stream(self.lm, [prompt], settings)
        reply: list[str] = []
        reason = "interrupted"
        try:
            for event in events:
                if isinstance(event, TextChunk):
                    reply.append(event.text)
                    yield event.text
                elif isinstance(event, Completion):
                    reason, self.dropped = event.finish_reason, event.dropped
        finally:
            events.close()
            self.turns.append(Turn(entry, "".join(reply), reason))

    def reset(self) -> None:
        """Forget the text or conversation so far (the settings stay)."""
        self.turns.clear()

    def top(self, k: int = 10) -> Distribution:
        """The k most likely next tokens at the current point (after the text so far, or, in chat
        mode, at the start of the next reply)."""
        from gptcli.inspection.predict import next_token_distribution

        prompt = self.text() if self.turns or self.chat else ""
        return next_token_distribution(self.lm, [prompt], k=k)[0]

    def save(self, path: Path) -> None:
        """Write the text so far to `path` (chat mode: the conversation as the model sees it)."""
        try:
            path.expanduser().write_text(self.text(), encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc

    # --- settings ---------------------------------------------------------------------------------

    def set(self, name: str, value: str) -> Any:
        """Change one decoding setting from its text (`temperature`, `0.7`); returns the new value.

        Raises UsageError for an unknown name or a value that cannot work; the settings then stay.
        """
        key = name.strip().lstrip("-").replace("-", "_")
        if key not in SETTABLE:
            raise UsageError(f"no setting {name!r}: the settings are {', '.join(SETTABLE)}")
        kind = typing.get_type_hints(Settings)[key]
        parsed = _parse(key, value.strip(), kind)
        settings = dataclasses.replace(
            self.settings, **{key: parsed}, sources={**self.settings.sources, key: FLAG}
        )
        settings.validate()
        self.settings = settings
        return parsed


def _parse(name: str, value: str, kind: Any) -> Any:
    """`value` as the type of setting `name` (int, float, bool, or None where the type allows)."""
    types = typing.get_args(kind) or (kind,)
    if type(None) in types and value.lower() in _OFF:
        return None
    if bool in types:
        if value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise UsageError(f"{name} is on or off (got {value!r})")
    number = int if int in types else float
    try:
        return number(value)
    except ValueError:
        what = "a whole number" if number is int else "a number"
        raise UsageError(f"{name} takes {what} (got {value!r})") from None
