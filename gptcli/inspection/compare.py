"""What changed between two models: per-token log-probabilities under each, and how far apart their
next-token distributions are (KL divergence), on a text or after a prompt.

Meant for a base model and its fine-tune (`gptcli finetune`), but any two models with the same
vocabulary compare token by token. Models with different vocabularies compare only on perplexity and
bits per byte. Every probability is a float32 log-softmax; each model's log-probabilities are exactly
those `gptcli score` gives it, through the same sliding window (gptcli.inspection.predict.window_logprobs).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gptcli.batching import fit_context
from gptcli.errors import GptcliError, UsageError
from gptcli.generation.tokens import TokenText, encode_prompt
from gptcli.inspection.predict import check_k, check_stride, score_text, text_ids, window_logprobs

if TYPE_CHECKING:
    import torch

    from gptcli.contracts import ComparedCandidate, ComparedToken
    from gptcli.loading.models import LoadedModel


def vocabulary_difference(a: LoadedModel, b: LoadedModel) -> str | None:
    """Why the two models' tokens cannot be matched one to one, or None when they can."""
    width_a, width_b = a.config.vocab_size, b.config.vocab_size
    if width_a != width_b or len(a.tokenizer) != len(b.tokenizer):
        return (
            f"the models have different vocabularies ({len(a.tokenizer):,} and {len(b.tokenizer):,} tokens)"
        )
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab():
        return "the models' vocabularies have the same size but different tokens"
    return None


@dataclass
class Change:
    """A position where the models disagree most: the token, and both models' top candidates there."""

    index: int  # into Comparison.tokens
    candidates: list[ComparedCandidate]


@dataclass
class Comparison:
    """Two models on one text: per-token log-probabilities, KL of their next-token distributions, totals.

    `tokens` is empty when the vocabularies differ (`reason` says how); the totals are then each
    model's own (perplexity per token of its own tokenizer, bits per byte comparable across them).
    """

    tokens: list[ComparedToken] = field(default_factory=list)
    num_bytes: int = 0
    perplexity_a: float = math.nan
    perplexity_b: float = math.nan
    bits_per_byte_a: float = math.nan
    bits_per_byte_b: float = math.nan
    reason: str | None = None  # why there is no token-by-token comparison
    changes: list[Change] = field(default_factory=list)  # the largest |logprob_b - logprob_a|, largest first

    @property
    def mean_kl(self) -> float | None:
        if not self.tokens:
            return None
        return sum(t["kl"] for t in self.tokens) / len(self.tokens)

    def to_json(self, model_a: str, model_b: str) -> dict[str, Any]:
        return {
            "model_a": model_a,
            "model_b": model_b,
            "tokens": self.tokens,
            "perplexity_a": self.perplexity_a,
            "perplexity_b": self.perplexity_b,
            "bits_per_byte_a": self.bits_per_byte_a,
            "bits_per_byte_b": self.bits_per_byte_b,
            "mean_kl": self.mean_kl,
        }


def kl_divergence(logprobs_a: torch.Tensor, logprobs_b: torch.Tensor) -> torch.Tensor:
    """KL(A‖B) = Σ p_a (log p_a − log p_b) over the last dimension, in nats; 0·log 0 counts as 0."""
    import torch

    p_a = logprobs_a.exp()
    return torch.where(p_a > 0, p_a * (logprobs_a - logprobs_b), 0.0).sum(dim=-1)


def check_compare_options(*, k: int = 10, changes: int = 0) -> None:
    """Refuse a -k or --changes that cannot work (before the models load, too)."""
    check_k(k)
    if changes < 0:
        raise UsageError("--changes must be 0 or more")


def compare_text(
    a: LoadedModel,
    b: LoadedModel,
    text: str,
    *,
    stride: int | None = None,
    changes: int = 0,
    k: int = 5,
) -> Comparison:
    """Score `text` under both models, token by token when their vocabularies match.

    Args:
        stride: the sliding window's step for texts longer than a context (default: each model's
            context / 2); each model runs its own windows, as `gptcli score` runs them.
        changes: how many positions with the largest change to describe, with each model's top `k`.
    """
    import torch

    check_compare_options(k=k, changes=changes)
    stride_a = check_stride(stride, a.context_length)
    stride_b = check_stride(stride, b.context_length)
    num_bytes = len(text.encode("utf-8"))
    reason = vocabulary_difference(a, b)
    ids = text_ids(a, text)
    if reason is None and text_ids(b, text) != ids:
        reason = "the models' tokenizers split the text differently"
    if reason is not None:
        score_a, score_b = score_text(a, text, stride=stride), score_text(b, text, stride=stride)
        return Comparison(
            num_bytes=num_bytes,
            perplexity_a=score_a.perplexity,
            perplexity_b=score_b.perplexity,
            bits_per_byte_a=score_a.bits_per_byte,
            bits_per_byte_b=score_b.bits_per_byte,
            reason=reason,
        )

    names = TokenText(a.tokenizer)
    result = Comparison(num_bytes=num_bytes)
    largest: list[tuple[float, int, torch.Tensor, torch.Tensor]] = []  # a min-heap of (|change|, index, ...)
    rows = _aligned(window_logprobs(a, ids, stride=stride_a), window_logprobs(b, ids, stride=stride_b))
    with torch.inference_mode():
        for first, lp_a, lp_b in rows:
            targets = torch.tensor(ids[first : first + len(lp_a)], device=lp_a.device)
            chosen_a = lp_a.gather(1, targets[:, None])[:, 0]
            chosen_b = lp_b.gather(1, targets[:, None])[:, 0]
            kl = kl_divergence(lp_a, lp_b)
            for row, (tid, la, lb, d) in enumerate(
                zip(targets.tolist(), chosen_a.tolist(), chosen_b.tolist(), kl.tolist(), strict=True)
            ):
                index = len(result.tokens)
                result.tokens.append({**names.describe(tid), "logprob_a": la, "logprob_b": lb, "kl": d})
                # Ties go to the earlier position; rows are copied only for the positions kept.
                key = (abs(lb - la), -index)
                if len(largest) < changes:
                    heapq.heappush(largest, (*key, lp_a[row].clone(), lp_b[row].clone()))
                elif changes and key > largest[0][:2]:
                    heapq.heapreplace(largest, (*key, lp_a[row].clone(), lp_b[row].clone()))
    total_a = sum(t["logprob_a"] for t in result.tokens)
    total_b = sum(t["logprob_b"] for t in result.tokens)
    count = len(result.tokens)
    result.perplexity_a = math.exp(-total_a / count) if count else math.nan
    result.perplexity_b = math.exp(-total_b / count) if count else math.nan
    result.bits_per_byte_a = -total_a / math.log(2) / num_bytes if num_bytes else math.nan
    result.bits_per_byte_b = -total_b / math.log(2) / num_bytes if num_bytes else math.nan
    for _, negative_index, row_a, row_b in sorted(largest, key=lambda e: e[:2], reverse=True):
        result.changes.append(Change(-negative_index, candidates(names, row_a, row_b, k)))
    return result


def _aligned(
    rows_a: Iterator[tuple[int, torch.Tensor]], rows_b: Iterator[tuple[int, torch.Tensor]]
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Both models' rows for the same positions, chunk by chunk: with different contexts their windows
    end at different places, so each side's rows wait for the other's."""
    pending_a = pending_b = None
    while True:
        pending_a = pending_a or next(rows_a, None)
        pending_b = pending_b or next(rows_b, None)
        if pending_a is None or pending_b is None:
            return
        (first, chunk_a), (_, chunk_b) = pending_a, pending_b
        n = min(len(chunk_a), len(chunk_b))
        yield first, chunk_a[:n], chunk_b[:n]
        pending_a = (first + n, chunk_a[n:]) if len(chunk_a) > n else None
        pending_b = (first + n, chunk_b[n:]) if len(chunk_b) > n else None


def candidates(names: TokenText, lp_a: torch.Tensor, lp_b: torch.Tensor, k: int) -> list[ComparedCandidate]:
    """A's top k, then those of B's top k that A's lacks, each with both log-probabilities and ranks
    (1: the most likely)."""
    import torch

    k = min(k, lp_a.shape[-1])
    top_a = torch.topk(lp_a, k).indices.tolist()
    top_b = torch.topk(lp_b, k).indices.tolist()
    out: list[ComparedCandidate] = []
    for tid in [*top_a, *(t for t in top_b if t not in top_a)]:
        la, lb = lp_a[tid], lp_b[tid]
        out.append(
            {
                **names.describe(tid),
                "logprob_a": float(la),
                "logprob_b": float(lb),
                "rank_a": int((lp_a > la).sum()) + 1,
                "rank_b": int((lp_b > lb).sum()) + 1,
            }
        )
    return out


@dataclass
class NextComparison:
    """Both models' next-token distributions after one prompt."""

    prompt: str
    kl: float
    tokens: list[ComparedCandidate]  # `candidates`: A's top k, then B's newcomers
    dropped: int = 0  # prompt tokens cut from the left to fit the smaller context

    def to_json(self, model_a: str, model_b: str) -> dict[str, Any]:
        return {
            "model_a": model_a,
            "model_b": model_b,
            "prompt": self.prompt,
            "kl": self.kl,
            "tokens": self.tokens,
        }


def compare_next(a: LoadedModel, b: LoadedModel, prompt: str, *, k: int = 10) -> NextComparison:
    """The next token after `prompt` under both models: each one's top k with the other's view of them."""
    import torch

    reason = vocabulary_difference(a, b)
    ids = encode_prompt(a.tokenizer, prompt)
    if reason is None and encode_prompt(b.tokenizer, prompt) != ids:
        reason = "the models' tokenizers split the prompt differently"
    if reason is not None:
        raise GptcliError(
            f"{reason}, so their next-token candidates cannot be matched; compare them on a text"
        )
    ids, dropped = fit_context(ids, min(a.context_length, b.context_length))
    with torch.inference_mode():
        rows = []
        for lm in (a, b):
            window = torch.tensor([ids], device=lm.device)
            rows.append(torch.log_softmax(lm.logits(window, logits_to_keep=1)[0, -1].float(), dim=-1))
        lp_a, lp_b = rows
        kl = float(kl_divergence(lp_a, lp_b))
        tokens = candidates(TokenText(a.tokenizer), lp_a, lp_b, k)
    return NextComparison(prompt, kl, tokens, dropped)
