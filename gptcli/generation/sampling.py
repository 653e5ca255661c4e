"""Decoding settings and the sampling filters: what `complete` draws the next token from.

`Settings` holds how to decode; `resolve_settings` layers our defaults, a model's generation_config.json
and flags. The filters follow transformers' definitions so results can be checked against its logits
processors: repetition penalty, then (when sampling) temperature, top-k, top-p and min-p, in that order
and with the same formulas; the presence and frequency penalties, which transformers lacks, follow
OpenAI's definition and come right after the repetition penalty (as in vLLM). Greedy decoding applies
only the penalties, as `generate` does with `do_sample=False`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from gptcli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from gptcli.contracts import GenerationConfig

# Where a setting's value came from, for `-v` and for error messages.
DEFAULT, GENERATION_CONFIG, FLAG = "default", "generation_config.json", "flag"

# The help panel of the decoding options on the command line.
DECODING_PANEL = "Decoding (a model's generation_config.json replaces these defaults)"


@dataclass(frozen=True)
class Option:
    """How a decoding setting is offered: its help, flags, range, and the server's names for it.

    The `complete` and `step` options (gptcli.cli._decoding) and the server's request fields
    (gptcli.serving.schemas) are generated from these, so a setting is declared once, here.
    """

    help: str
    flags: tuple[str, ...] = ()  # default: --field-name
    commands: tuple[str, ...] = ("complete", "step", "chat")  # the commands that offer it
    shown: object = None  # the default as the help shows it (None: the field's default)
    panel: str | None = DECODING_PANEL
    metavar: str | None = None
    # The values that work: each bound that is not None holds (floats must also be finite).
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    rule: str = ""  # what the error says when a value is out of range ("must be at least 1")
    api: tuple[str, ...] = ()  # the server's request fields that set it (the first given wins)

    def accepts(self, value: Any) -> bool:
        """Whether `value` is in range (None: not given, always accepted)."""
        if value is None or isinstance(value, (bool, tuple)):
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def flag_name(self, name: str) -> str:
        """How the setting is spelled on the command line, for error messages: "-n/--max-new-tokens"."""
        flags = self.flags or ("--" + name.replace("_", "-"),)
        return "/".join(sorted((f.split("/")[0] for f in flags), key=len))


def option(default: Any, help: str, **how: Any) -> Any:
    """A Settings field and how it is offered (see Option)."""
    return field(default=default, metadata={"option": Option(help, **how)})


@dataclass(frozen=True)
class Settings:
    """How to decode. `resolve_settings` builds one from our defaults, generation_config.json and flags.

    Each field that a user can set declares its option here (help, flags, range, server field): adding
    a setting is a field here and its use in the sampler below.
    """

    max_new_tokens: int = option(
        64,
        "Most tokens to generate.",
        flags=("--max-new-tokens", "-n"),
        commands=("complete", "chat"),
        ge=1,
        rule="must be at least 1",
    )
    temperature: float = option(
        0.8, "Divide the logits by this; 0 means greedy.", ge=0, rule="must be a number >= 0 (0 means greedy)"
    )
    top_k: int = option(
        50,
        "Sample from the K most likely tokens; 0: off.",
        ge=0,
        rule="must be >= 0 (0 turns top-k off)",
        api=("top_k",),
    )
    top_p: float = option(
        0.95,
        "Keep the likeliest tokens whose probabilities add up to this; 1: off.",
        gt=0,
        le=1,
        rule="must be in (0, 1] (1 turns top-p off)",
        api=("top_p",),
    )
    min_p: float | None = option(
        None,
        "Drop tokens less likely than this times the most likely one.",
        shown="off",
        ge=0,
        le=1,
        rule="must be in [0, 1] (0 turns min-p off)",
        api=("min_p",),
    )
    repetition_penalty: float = option(
        1.0,
        "Make tokens already in the text less likely (>1) or more likely (<1).",
        gt=0,
        rule="must be a positive number (1 turns it off)",
        api=("repeat_penalty", "repetition_penalty"),
    )
    presence_penalty: float = option(
        0.0,
        "Subtract this from the logit of every token generated so far (OpenAI's presence penalty).",
        ge=-2,
        le=2,
        rule="must be between -2 and 2 (0: off)",
        api=("presence_penalty",),
    )
    frequency_penalty: float = option(
        0.0,
        "Subtract this times the number of times a token was generated so far from its logit "
        "(OpenAI's frequency penalty).",
        ge=-2,
        le=2,
        rule="must be between -2 and 2 (0: off)",
        api=("frequency_penalty",),
    )
    greedy: bool = option(
        False,
        "Always pick the most likely token, or sample.",
        flags=("--greedy/--sample",),
        commands=("complete", "chat"),
        shown="sample",
    )
    seed: int | None = option(
        None,
        "Seed for sampling; sample k uses SEED+k.",
        shown="random",
        ge=0,
        lt=2**63,
        rule="must be between 0 and 2**63 - 1",
        api=("seed",),
    )  # None: a fresh random seed per run
    stop: tuple[str, ...] = option((), "End before this text (repeatable).", commands=("complete", "chat"))
    ignore_eos: bool = option(False, "Keep going past the end-of-text token.", commands=("complete", "chat"))
    num_samples: int = option(
        1,
        "Completions per prompt.",
        flags=("--num-samples", "-N"),
        commands=("complete",),
        ge=1,
        rule="must be at least 1",
    )
    # None: no logprobs; K: the chosen token's and K alternatives
    logprobs: int | None = option(
        None,
        "Add each token's logprob and its K most likely alternatives (implies --json).",
        commands=("complete",),
        panel=None,
        metavar="K",
        ge=0,
        rule="must be >= 0 (the number of alternatives per token)",
    )
    # greedy, one row: draft up to this many tokens from earlier text per pass (0: off)
    lookup: int = option(
        10,
        "Greedy: with each token, try up to K tokens that followed the same words earlier in the text, "
        "checked in the same pass (prompt lookup); the output is greedy decoding's, often sooner. 0: off.",
        commands=("complete",),
        ge=0,
        le=64,
        rule="must be between 0 (off) and 64",
    )
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


def options() -> dict[str, tuple[Option, Any]]:
    """Every setting a user can set: name -> (its Option, its default)."""
    return {f.name: (f.metadata["option"], f.default) for f in fields(Settings) if "option" in f.metadata}


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
    how = options()[name][0]
    where = f"{name} in {GENERATION_CONFIG}" if source == GENERATION_CONFIG else how.flag_name(name)
    if name == "stop" and any(not s for s in value):
        raise UsageError(f"{where} must not be empty: an empty stop text would end every completion at once")
    if not how.accepts(value):
        raise UsageError(f"{where} {how.rule} (got {value!r})")


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
        given = [options()[name][0].flag_name(name) for name in _SAMPLING_ONLY if flags.get(name) is not None]
        if given:
            raise UsageError(
                f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect with --greedy"
            )
        samples = flags.get("num_samples") or 1
        if samples > 1:
            raise UsageError(f"-N {samples} with --greedy would print {samples} identical completions")
    if flags.get("temperature") == 0 and (flags.get("num_samples") or 1) > 1:
        raise UsageError("-N with --temperature 0 (greedy) would print identical completions")


def generation_config_values(generation_config: GenerationConfig | None) -> dict[str, Any]:
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


def resolve_settings(generation_config: GenerationConfig | None = None, **flags: Any) -> Settings:
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


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: logit[j] -= c[j] * frequency + (c[j] > 0) * presence,
    c[j] the number of times token j was generated so far (the prompt does not count).

    Args:
        logits: [batch, vocab].
        counts: [batch, vocab], float.
    """
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def penalize(
    logits: torch.Tensor, settings: Settings, seen: torch.Tensor | None, counts: torch.Tensor | None
) -> torch.Tensor:
    """The repetition penalty (on `seen`), then the presence and frequency penalties (on `counts`), each
    where the settings ask for it and its state is given."""
    if seen is not None and settings.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if counts is not None and (settings.presence_penalty or settings.frequency_penalty):
        logits = apply_presence_frequency(
            logits, counts, settings.presence_penalty, settings.frequency_penalty
        )
    return logits


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
    logits: torch.Tensor,
    settings: Settings,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scores tokens are picked from: penalties, then for sampling temperature, top-k, top-p, min-p."""
    logits = penalize(logits, settings, seen, counts)
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
    logits: torch.Tensor,
    settings: Settings,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens sampling can draw and their scores: (ids [batch, C], scores [batch, C]).

    The same distribution as `process_logits` (its finite entries, the same formulas), computed on the
    top-k candidates instead of the whole vocabulary when top-k is on: top-p sorts its input, and a
    sort of GPT-2's 50,257 logits costs a sizeable share of a CPU decoding step, where sorting 50 costs
    nothing (docs/performance.md). Entries outside the filters are -inf.
    """
    import torch

    logits = penalize(logits, settings, seen, counts)
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
    logits: torch.Tensor,
    settings: Settings,
    seen: torch.Tensor | None,
    generators: list[torch.Generator],
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of every row: the argmax of the processed logits, or a draw from `candidates`
    with the row's own generator."""
    import torch

    if not settings.sampling:
        return process_logits(logits, settings, seen, counts).argmax(dim=-1)
    ids, scores = candidates(logits, settings, seen, counts)
    probs = torch.softmax(scores, dim=-1)
    picks = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return ids.gather(1, torch.stack(picks))[:, 0]
