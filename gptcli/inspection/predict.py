"""What the model predicts: next-token distributions (`topk`) and per-token scores, perplexity (`score`).

All probabilities are computed as float32 log-softmax over the model's logits, so they match a direct
transformers computation whatever dtype the weights are in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gptcli.batching import check_batch_size, fit_context, left_pad, pad_id
from gptcli.errors import UsageError
from gptcli.generation.sampling import apply_temperature
from gptcli.generation.tokens import TokenText, encode_prompt, start_token_id, unknown_token_id

if TYPE_CHECKING:
    import torch

    from gptcli.contracts import Candidate, ScoredToken, Tokenizer
    from gptcli.loading.models import LoadedModel


def check_k(k: int) -> None:
    """Refuse a -k (how many candidates to show: topk, lens, compare, step) below 1."""
    if k < 1:
        raise UsageError("-k must be at least 1")


def check_topk_options(*, k: int = 10, temperature: float = 1.0, batch_size: int = 16) -> None:
    """Refuse a -k, --temperature or --batch-size that cannot work (before a model loads, too)."""
    check_k(k)
    if not temperature > 0 or math.isinf(temperature):
        raise UsageError("--temperature must be a positive number")
    check_batch_size(batch_size)


@dataclass
class Distribution:
    """The top of the next-token distribution after one prompt."""

    prompt: str
    prompt_ids: list[int]
    tokens: list[Candidate]
    dropped: int = 0  # prompt tokens cut from the left to fit the context

    def to_json(self, model: str) -> dict[str, Any]:
        return {"model": model, "prompt": self.prompt, "tokens": self.tokens}


def next_token_distribution(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    k: int = 10,
    temperature: float = 1.0,
    batch_size: int = 16,
    on_progress: Callable[[int], None] | None = None,
) -> list[Distribution]:
    """The k most likely next tokens after each prompt, prompts batched with left padding.

    An empty prompt is conditioned on the start token (BOS, or EOS for GPT-2's <|endoftext|>).
    `on_progress(prompts_done)` is called after each batch.
    """
    import torch

    check_topk_options(k=k, temperature=temperature, batch_size=batch_size)
    names = TokenText(lm.tokenizer)
    k = min(k, lm.config.vocab_size)
    encoded = [fit_context(encode_prompt(lm.tokenizer, p), lm.context_length) for p in prompts]
    results: list[Distribution] = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            ids, mask, positions = left_pad([ids for ids, _ in chunk], pad_id(lm.tokenizer), lm.device)
            logits = lm.logits(ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)[:, -1, :]
            logprobs = torch.log_softmax(apply_temperature(logits.float(), temperature), dim=-1)
            top = torch.topk(logprobs, k, dim=-1)
            for row, (prompt_ids, dropped) in enumerate(chunk):
                tokens: list[Candidate] = []
                for rank, (lp, tid) in enumerate(
                    zip(top.values[row].tolist(), top.indices[row].tolist(), strict=True), 1
                ):
                    tokens.append({"rank": rank, **names.describe(tid), "prob": math.exp(lp), "logprob": lp})
                results.append(Distribution(prompts[start + row], prompt_ids, tokens, dropped))
            if on_progress is not None:
                on_progress(len(results))
    return results


@dataclass
class Score:
    """How well the model predicted each token of a text."""

    tokens: list[ScoredToken] = field(default_factory=list)
    num_bytes: int = 0
    unknown: int = 0
    """How many tokens are the tokenizer's unknown token ([UNK]): text it cannot spell. Predicting one
    counts as a hit, so with many of them perplexity says little about the text."""

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def total_logprob(self) -> float:
        return sum(t["logprob"] for t in self.tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.total_logprob / self.num_tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return -self.total_logprob / math.log(2) / self.num_bytes if self.num_bytes else float("nan")

    def to_json(self, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "tokens": self.tokens,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "num_tokens": self.num_tokens,
            "unknown_tokens": self.unknown,
        }


def check_stride(stride: int | None, context: int) -> int:
    """The sliding window's step for a model with this context (default: half the context)."""
    stride = max(1, context // 2) if stride is None else stride
    if not 0 < stride <= context:
        raise UsageError(f"--stride must be between 1 and the context length ({context})")
    return stride


def window_logprobs(
    lm: LoadedModel, ids: Sequence[int], *, stride: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """Float32 log-probabilities of every token of `ids` but the first, window by window.

    Yields (first, logprobs): row j of logprobs [n, vocab] is the distribution that predicts
    ids[first + j], from the tokens before it. Sequences longer than the context go through a sliding
    window (as in the transformers perplexity guide): each window is `context` tokens long, starts
    `stride` tokens after the previous one, and predicts only the tokens the previous window did not,
    so every token is predicted once, with at least `context - stride` tokens of history.
    """
    import torch

    context = lm.context_length
    stride = check_stride(stride, context)
    scored_to = 1  # ids[0] is context, not a prediction
    begin = 0
    while scored_to < len(ids):
        end = min(begin + context, len(ids))
        with torch.inference_mode():
            window = torch.tensor([list(ids[begin:end])], device=lm.device)
            # Position j predicts ids[begin + j + 1]: targets scored_to..end-1 need positions
            # scored_to-1-begin..end-2-begin, the window's last ones but its very last. Only those go
            # through the output layer (a 50,257-wide matmul): after the first window, half of them.
            keep = end - scored_to + 1
            rows = lm.logits(window, logits_to_keep=keep)[0, -keep:-1].float()  # (models that ignore it)
            logprobs = torch.log_softmax(rows, dim=-1)
        yield scored_to, logprobs
        scored_to = end
        # The next window must hold at least the token before the first one it predicts.
        begin = min(begin + stride, scored_to - 1)


def text_ids(lm: LoadedModel, text: str) -> list[int]:
    """The ids `score` predicts from: the start token, then the text's own tokens."""
    body = lm.tokenizer.encode(text, add_special_tokens=False) if text else []
    return [start_token_id(lm.tokenizer), *body]


def score_text(
    lm: LoadedModel,
    text: str,
    *,
    stride: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Score:
    """Log-probability and rank of every token of `text`, each predicted from the tokens before it.

    The text is preceded by the start token so its first token is scored too. Texts longer than the
    context are scored with a sliding window (`window_logprobs`). `on_progress(tokens_scored, tokens)`
    follows the windows.
    """
    import torch

    stride = check_stride(stride, lm.context_length)
    names = TokenText(lm.tokenizer)
    ids = text_ids(lm, text)
    score = Score(num_bytes=len(text.encode("utf-8")), unknown=_count_unknown(lm.tokenizer, ids[1:]))
    with torch.inference_mode():
        for first, logprobs in window_logprobs(lm, ids, stride=stride):
            targets = torch.tensor(ids[first : first + len(logprobs)], device=lm.device)
            chosen = logprobs.gather(1, targets[:, None])[:, 0]
            ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
            for tid, lp, rank in zip(targets.tolist(), chosen.tolist(), ranks.tolist(), strict=True):
                score.tokens.append({**names.describe(tid), "logprob": lp, "rank": rank})
            if on_progress is not None:
                on_progress(len(score.tokens), len(ids) - 1)
    return score


def _count_unknown(tokenizer: Tokenizer, ids: list[int]) -> int:
    """How many of `ids` are the unknown token (`unknown_token_id`: 0 where there is no real one)."""
    unk = unknown_token_id(tokenizer)
    return 0 if unk is None else sum(i == unk for i in ids)
