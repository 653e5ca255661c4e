"""Walking the next-token tree by hand: a session that offers the top candidates and takes choices.

`StepSession` holds one growing text and the model's KV cache for it, so each choice costs one decoding
step. The ranking is the one `complete --greedy` picks from (the model's float32 distribution after the
repetition penalty, when the settings have one), so always choosing rank 0 gives greedy's tokens; `s`
draws from the same candidates and generator as `complete`'s sampling, so `--seed` reproduces it too.
It never prints: the CLI (gptcli.cli.step) draws the screen and reads the keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from gptcli.errors import GptcliError, UsageError
from gptcli.generation.decoding import eos_ids, generator, open_decoder, penalty_state, seed_for
from gptcli.generation.generate import encode_for_context
from gptcli.generation.sampling import Settings, draw, penalize, resolve_settings
from gptcli.generation.tokens import Detokenizer, TokenText, decode, readable

if TYPE_CHECKING:
    import torch

    from gptcli.contracts import Candidate
    from gptcli.loading.models import LoadedModel

SAMPLE = "s"


def parse_choices(spec: str) -> list[int | str]:
    """`--choose 0,2,1,s`: ranks (0 is the most likely) and `s` for a sample, in order."""
    choices: list[int | str] = []
    for part in spec.split(","):
        part = part.strip().lower()
        if part == SAMPLE:
            choices.append(SAMPLE)
        elif part.isdigit():
            choices.append(int(part))
        else:
            raise UsageError(f"--choose takes ranks (0, 1, ...) and s, separated by commas (got {part!r})")
    return choices


@dataclass(frozen=True)
class Chosen:
    """One choice: the token, its rank in the ranking it was chosen from, and its probability there."""

    rank: int
    id: int
    token: str
    prob: float
    logprob: float

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "token": self.token}


@dataclass(frozen=True)
class Piece:
    """A stretch of the displayed text: the prompt (prob None), whole characters of the chosen tokens
    (shaded by the least likely of them), or bytes that do not make a whole character yet."""

    text: str
    prob: float | None
    complete: bool = True


class StepSession:
    """A text grown one chosen token at a time, with the KV cache kept between steps.

    `top()` is the ranked next-token candidates, `choose(rank)` takes one, `sample()` draws one with
    the sampling settings, `undo()` takes the last choice back. The session is done after the end of
    text token (an `undo` reopens it) or when the context is full.
    """

    def __init__(self, lm: LoadedModel, prompt: str = "", settings: Settings | None = None) -> None:
        import torch

        self.lm = lm
        self.prompt = prompt
        # `s` always samples (whatever the model's do_sample says); rank 0 is always greedy's pick.
        settings = settings or resolve_settings(lm.generation_config)
        self.settings = replace(settings, greedy=False) if settings.greedy else settings
        self.settings.validate()
        self.names = TokenText(lm.tokenizer)
        self.eos = eos_ids(lm)
        self.context = lm.context_length
        self.prompt_ids, self.dropped = encode_for_context(
            lm.tokenizer, prompt, self.context, self.settings.max_new_tokens
        )
        self.chosen: list[Chosen] = []
        self.seed = seed_for(self.settings, always=True) or 0  # (always: never None)
        self._generator = generator(lm.device, self.seed)
        self._decoder = open_decoder(lm, 1, self.context)
        ids = torch.tensor([self.prompt_ids], device=lm.device)
        positions = torch.arange(len(self.prompt_ids), device=lm.device)[None]
        with torch.inference_mode():
            # One float32 logits row per position reached, so that undo needs no recomputation.
            self._logits: list[torch.Tensor] = [self._decoder.prefill(ids, None, positions)[0]]

    # --- state ----------------------------------------------------------------------------------------

    @property
    def ids(self) -> list[int]:
        """The prompt's ids (as the model saw them) and the chosen ones."""
        return self.prompt_ids + [c.id for c in self.chosen]

    @property
    def finish_reason(self) -> str | None:
        """'eos' after the end-of-text token, 'length' when the context is full, else None."""
        if self.chosen and self.chosen[-1].id in self.eos:
            return "eos"
        if len(self.prompt_ids) + len(self.chosen) >= self.context:
            return "length"
        return None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def logits(self) -> torch.Tensor:
        """The model's float32 logits for the next token (before any penalty)."""
        return self._logits[-1]

    def text(self) -> str:
        """The prompt and the continuation, decoded in one go as `complete` decodes it."""
        return self.prompt + decode(self.lm.tokenizer, [c.id for c in self.chosen], after=self.prompt)

    def display_text(self) -> str:
        """The text as shown while walking: incomplete bytes at the end as `<e4 bb>`."""
        return "".join(p.text for p in self.pieces())

    def pieces(self) -> list[Piece]:
        """The text in stretches to shade: the prompt, then whole characters of the chosen tokens, each
        stretch with the probability of the least likely token in it, then any incomplete bytes."""
        out = [Piece(self.prompt, None)] if self.prompt else []
        detok = Detokenizer(self.lm.tokenizer, after=self.prompt)
        held: list[Chosen] = []
        for c in self.chosen:
            held.append(c)
            chunk = detok.push(c.id)
            if chunk or c.id in self.names.special_ids:
                out.append(Piece(chunk, min(h.prob for h in held)))
                held = []
        if held:
            pending = b"".join(self.names.bytes(h.id) for h in held)
            out.append(Piece(readable(pending), min(h.prob for h in held), complete=False))
        return out

    # --- the ranking ----------------------------------------------------------------------------------

    def _penalty_state(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the penalties read of the text so far ([1, vocab] each, or None)."""
        return penalty_state(
            self.settings,
            [self.prompt_ids],
            self.logits.shape[-1],
            self.logits.device,
            generated=[[c.id for c in self.chosen]],
        )

    def _scores(self) -> torch.Tensor:
        """What greedy decoding picks from: the logits after the penalties, if any."""
        seen, counts = self._penalty_state()
        if seen is None and counts is None:
            return self.logits
        return penalize(self.logits[None], self.settings, seen, counts)[0]

    def top(self, k: int = 10) -> list[Candidate]:
        """The k best next tokens, rank 0 first: {"rank", "id", "token", "bytes", "prob", "logprob"}.

        Ties keep the lower id first, as greedy's argmax does. Empty when the session is done.
        """
        import torch

        if self.done:
            return []
        with torch.inference_mode():
            logprobs = torch.log_softmax(self._scores(), dim=-1)
            best = torch.topk(logprobs, min(k, logprobs.shape[-1]))
            pairs = sorted(zip(best.values.tolist(), best.indices.tolist(), strict=True), key=_best_first)
        return [
            {"rank": rank, **self.names.describe(tid), "prob": math.exp(lp), "logprob": lp}
            for rank, (lp, tid) in enumerate(pairs)
        ]

    def rank_of(self, token_id: int) -> int:
        """Where `token_id` stands in the ranking (0: first)."""
        import torch

        with torch.inference_mode():
            scores = self._scores()
            value = scores[token_id]
            ahead = (scores > value).sum() + (scores[:token_id] == value).sum()
        return int(ahead)

    # --- choices --------------------------------------------------------------------------------------

    def choose(self, rank: int) -> Chosen:
        """Take the candidate of this rank (0: the most likely)."""
        if rank < 0 or rank >= self.logits.shape[-1]:
            raise UsageError(f"rank {rank} is not in the vocabulary (0 to {self.logits.shape[-1] - 1})")
        self._check_open()
        entry = self.top(rank + 1)[rank]
        return self._take(rank, entry["id"], entry["prob"], entry["logprob"])

    def sample(self) -> Chosen:
        """Draw the next token with the sampling settings (temperature, top-k, top-p, min-p, penalty)."""
        import torch

        self._check_open()
        with torch.inference_mode():
            seen, counts = self._penalty_state()
            token = int(draw(self.logits[None], self.settings, seen, [self._generator], counts=counts)[0])
            logprob = float(torch.log_softmax(self._scores(), dim=-1)[token])
        return self._take(self.rank_of(token), token, math.exp(logprob), logprob)

    def undo(self) -> Chosen | None:
        """Take back the last choice (None when there is none); the cache forgets its position."""
        if not self.chosen:
            return None
        last = self.chosen.pop()
        self._logits.pop()
        self._decoder.truncate(len(self.prompt_ids) + len(self.chosen))
        return last

    def _check_open(self) -> None:
        if self.finish_reason == "eos":
            raise GptcliError("the text has ended (end-of-text token); undo to go on")
        if self.finish_reason == "length":
            raise GptcliError(f"the context is full ({self.context} tokens)")

    def _take(self, rank: int, token: int, prob: float, logprob: float) -> Chosen:
        import torch

        position = len(self.prompt_ids) + len(self.chosen)
        chosen = Chosen(rank, token, self.names.describe(token)["token"], prob, logprob)
        self.chosen.append(chosen)
        if self.done:  # no next step to compute: the end of text, or the context is full
            self._logits.append(self._logits[-1])
            return chosen
        with torch.inference_mode():
            step_ids = torch.tensor([[token]], device=self.lm.device)
            positions = torch.tensor([[position]], device=self.lm.device)
            self._logits.append(self._decoder.step(step_ids, positions)[0])
        return chosen


def _best_first(pair: tuple[float, int]) -> tuple[float, int]:
    logprob, token_id = pair
    return -logprob, token_id


def replay(session: StepSession, choices: list[int | str], k: int = 10) -> Iterator[dict[str, Any]]:
    """Apply `choices` in order, yielding one record per step: {"step", "text", "top", "chosen"}.

    `text` is the text the candidates follow (incomplete bytes shown as `<e4 bb>`). Stops early, without
    error, when the text ends or the context fills up (`session.finish_reason` says which).
    """
    for choice in choices:
        if session.done:
            return
        record: dict[str, Any] = {
            "step": len(session.chosen) + 1,
            "text": session.display_text(),
            "top": session.top(k),
        }
        chosen = session.sample() if choice == SAMPLE else session.choose(int(choice))
        record["chosen"] = chosen.to_json()
        yield record
