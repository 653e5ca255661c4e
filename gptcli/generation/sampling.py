"""Decoding settings and the sampling filters: what `complete` draws the next token from.

`Settings` holds how to decode; `resolve_settings` layers our defaults, a model's generation_config.json
and flags. The filters follow transformers' definitions so results can be checked against its logits
processors: repetition penalty, then (when sampling) temperature, top-k, top-p and min-p, in that order
and with the same formulas. Greedy decoding applies only the repetition penalty, as `generate` does
with `do_sample=False`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from gptcli.errors import UsageError

if TYPE_CHECKING:
    import torch

# Where a setting's value came from, for `-v` and for error messages.
DEFAULT, GENERATION_CONFIG, FLAG = "default", "generation_config.json", "flag"

# How each setting is spelled on the command line, for error messages.
_FLAGS = {
    "max_new_tokens": "-n/--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
    "seed": "--seed",
    "stop": "--stop",
    "num_samples": "-N/--num-samples",
    "logprobs": "--logprobs",
    "lookup": "--lookup",
}


@dataclass(frozen=True)
class Settings:
    """How to decode. `resolve_settings` builds one from our defaults, generation_config.json and flags."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50  # 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float | None = None  # None or 0: off
    repetition_penalty: float = 1.0  # 1.0: off
    greedy: bool = False
    seed: int | None = None  # None: a fresh random seed per run
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    num_samples: int = 1
    logprobs: int | None = None  # None: no logprobs; K: the chosen token's and K alternatives
    lookup: int = 10  # greedy, one row: draft up to this many tokens from earlier text per pass (0: off)
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def sampling(self) -> bool:
        """Whether tokens are drawn at random (temperature 0 means greedy, as in most tools)."""
        return not self.greedy and self.temperature > 0

    def validate(self) -> None:
        """Raise UsageError for a value that cannot work, naming the flag or file it came from."""
        for f in fields(self):
            if f.name != "sources":
                _check(f.name, getattr(self, f.name), self.sources.get(f.name, FLAG))


def check_samples(settings: Settings) -> None:
    """Refuse -N above 1 with greedy decoding, wherever the greedy came from: the samples would be
    identical. (The server does not ask: OpenAI's API answers n > 1 at temperature 0 with copies.)"""
    if settings.num_samples > 1 and not settings.sampling:
        why = "--greedy" if settings.greedy else "--temperature 0"
        if settings.sources.get("greedy") == GENERATION_CONFIG:
            why = f"do_sample false in the model's {GENERATION_CONFIG} (pass --sample to sample)"
        raise UsageError(
            f"-N {settings.num_samples} with greedy decoding ({why}) would print {settings.num_samples} "
            "identical completions"
        )


def _check(name: str, value: Any, source: str = FLAG) -> None:
    where = f"{name} in {GENERATION_CONFIG}" if source == GENERATION_CONFIG else _FLAGS.get(name, name)

    def bad(rule: str) -> UsageError:
        return UsageError(f"{where} {rule} (got {value!r})")

    if name in ("max_new_tokens", "num_samples") and value < 1:
        raise bad("must be at least 1")
    if name == "temperature" and not (0 <= value < math.inf):
        raise bad("must be a number >= 0 (0 means greedy)")
    if name == "top_k" and value < 0:
        raise bad("must be >= 0 (0 turns top-k off)")
    if name == "top_p" and not 0 < value <= 1:
        raise bad("must be in (0, 1] (1 turns top-p off)")
    if name == "min_p" and value is not None and not 0 <= value <= 1:
        raise bad("must be in [0, 1] (0 turns min-p off)")
    if name == "repetition_penalty" and not (0 < value < math.inf):
        raise bad("must be a positive number (1 turns it off)")
    if name == "lookup" and not 0 <= value <= 64:
        raise bad("must be between 0 (off) and 64")
    if name == "logprobs" and value is not None and value < 0:
        raise bad("must be >= 0 (the number of alternatives per token)")
    if name == "stop" and any(not s for s in value):
        raise UsageError(f"{where} must not be empty: an empty stop text would end every completion at once")
    if name == "seed" and value is not None and not 0 <= value < 2**63:
        raise bad("must be between 0 and 2**63 - 1")


# Flags that only change how tokens are drawn at random: they mean nothing with --greedy.
_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p", "seed")


def check_flags(**flags: Any) -> None:
    """Validate explicit flag values (None: not given) before anything slow, like loading a model.

    Flags that contradict each other are refused rather than one silently winning.
    """
    for name, value in flags.items():
        if value is not None:
            _check(name, value)
    if flags.get("greedy"):
        given = [_FLAGS[name] for name in _SAMPLING_ONLY if flags.get(name) is not None]
        if given:
            raise UsageError(
                f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect with --greedy"
            )
        samples = flags.get("num_samples") or 1
        if samples > 1:
            raise UsageError(f"-N {samples} with --greedy would print {samples} identical completions")
    if flags.get("temperature") == 0 and (flags.get("num_samples") or 1) > 1:
        raise UsageError("-N with --temperature 0 (greedy) would print identical completions")


def generation_config_values(generation_config: Any) -> dict[str, Any]:
    """The decoding values a model's generation_config.json sets, as Settings fields.

    In transformers 5 every unset field is None, so anything else came from the file (or, for token ids,
    from config.json). `do_sample: false` makes greedy the default; `stop_strings` become stop texts.
    """
    if generation_config is None:
        return {}
    values: dict[str, Any] = {}
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        value = getattr(generation_config, name, None)
        if value is not None:
            values[name] = value
    do_sample = getattr(generation_config, "do_sample", None)
    if do_sample is not None:
        values["greedy"] = not do_sample
    stops = getattr(generation_config, "stop_strings", None)
    if stops:
        values["stop"] = (stops,) if isinstance(stops, str) else tuple(stops)
    return values


def resolve_settings(generation_config: Any = None, **flags: Any) -> Settings:
    """Our defaults, replaced by the model's generation_config.json, replaced by explicit flags (not None)."""
    values: dict[str, Any] = {f.name: f.default for f in fields(Settings) if f.name != "sources"}
    sources = dict.fromkeys(values, DEFAULT)
    for layer, source in ((generation_config_values(generation_config), GENERATION_CONFIG), (flags, FLAG)):
        for name, value in layer.items():
            if name not in values:
                raise TypeError(f"unknown setting {name!r}")
            if value is not None:
                values[name] = tuple(value) if name == "stop" else value
                sources[name] = source
    settings = Settings(**values, sources=sources)
    settings.validate()
    return settings


# --- Sampling: the same definitions as transformers' logits processors -------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in the text less likely: positive logits divided by `penalty`, negative ones
    multiplied, once per token however often it occurred (RepetitionPenaltyLogitsProcessor).

    Args:
        logits: [batch, vocab].
        seen: [batch, vocab] bool, True for tokens in the prompt or generated so far.
    """
    import torch

    # A penalty below the dtype's smallest normal number would divide by zero (0 / 0 is NaN), and
    # dividing by a tiny one overflows: clamp both, so an absurd penalty still gives a distribution.
    finfo = torch.finfo(logits.dtype)
    penalty = max(penalty, finfo.tiny)
    penalized = torch.where(logits < 0, logits * penalty, (logits / penalty).clamp(max=finfo.max))
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`logits / temperature`, shifted so that the largest is 0 (softmax does not change).

    The shift keeps a tiny temperature from overflowing the largest logits to inf (inf - inf is NaN in
    softmax): instead the distribution tends to greedy, as temperature -> 0 should. Below 1e-30 every
    token but the likeliest (and its exact ties) already has probability 0 in float32, so a smaller
    temperature acts as 1e-30: dividing by less would only overflow log-probabilities to -inf, which
    JSON cannot carry.
    """
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return shifted / max(temperature, 1e-30)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits (ties with the k-th included), -inf elsewhere (TopKLogitsWarper)."""
    import torch

    k = min(max(k, 1), logits.size(-1))
    threshold = torch.topk(logits, k).values[..., -1, None]
    return logits.masked_fill(logits < threshold, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p
    (TopPLogitsWarper; the most likely token always stays)."""
    import torch

    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1:] = False
    remove = remove.scatter(-1, order, remove)
    return logits.masked_fill(remove, -math.inf)


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens less likely than p times the most likely one (MinPLogitsWarper)."""
    import torch

    probs = torch.softmax(logits, dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(remove, -math.inf)


def process_logits(
    logits: torch.Tensor, settings: Settings, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """The scores tokens are picked from: penalty, then for sampling temperature, top-k, top-p, min-p."""
    if seen is not None and settings.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if not settings.sampling:
        return logits
    if settings.temperature != 1.0:
        logits = apply_temperature(logits, settings.temperature)
    return _filter(logits, settings)


def _filter(scores: torch.Tensor, settings: Settings) -> torch.Tensor:
    """Top-k, top-p and min-p, in that order."""
    if settings.top_k:
        scores = top_k_filter(scores, settings.top_k)
    if settings.top_p < 1.0:
        scores = top_p_filter(scores, settings.top_p)
    if settings.min_p:
        scores = min_p_filter(scores, settings.min_p)
    return scores


def candidates(
    logits: torch.Tensor, settings: Settings, seen: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens sampling can draw and their scores: (ids [batch, C], scores [batch, C]).

    The same distribution as `process_logits` (its finite entries, the same formulas), computed on the
    top-k candidates instead of the whole vocabulary when top-k is on: top-p sorts its input, and a
    sort of GPT-2's 50,257 logits costs a sizeable share of a CPU decoding step, where sorting 50 costs
    nothing (docs/performance.md). Entries outside the filters are -inf.
    """
    import torch

    if seen is not None and settings.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if settings.temperature != 1.0:
        logits = apply_temperature(logits, settings.temperature)
    k = settings.top_k
    values = ids = None
    if 0 < k < logits.shape[-1]:
        values, ids = torch.topk(logits, k)
        # Exact ties go through the whole vocabulary instead: TopKLogitsWarper keeps every logit tied
        # with the k-th, and which of tied tokens top-p drops depends on how the sort met them.
        beyond_k = bool(((logits >= values[:, -1:]).sum(dim=-1) > k).any())
        if beyond_k or (settings.top_p < 1.0 and bool((values[:, 1:] == values[:, :-1]).any())):
            values = ids = None
    if values is None or ids is None:
        vocab = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
        return vocab, _filter(logits, settings)
    if settings.top_p < 1.0:
        values = top_p_filter(values, settings.top_p)
    if settings.min_p:
        values = min_p_filter(values, settings.min_p)
    return ids, values


def draw(
    logits: torch.Tensor, settings: Settings, seen: torch.Tensor | None, generators: list[torch.Generator]
) -> torch.Tensor:
    """The next token of every row: the argmax of the processed logits, or a draw from `candidates`
    with the row's own generator."""
    import torch

    if not settings.sampling:
        return process_logits(logits, settings, seen).argmax(dim=-1)
    ids, scores = candidates(logits, settings, seen)
    probs = torch.softmax(scores, dim=-1)
    picks = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return ids.gather(1, torch.stack(picks))[:, 0]
