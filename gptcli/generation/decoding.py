"""The one decoding core: a row being decoded, the steps of the loop, the decoder and the KV budget.

Every path that generates goes through these names: `complete` and `--each-line`
(gptcli.generation.generate), `step` (gptcli.inspection.step) and the server's engine
(gptcli.serving.engine). A loop builds `Row`s (`new_row`), seeds each sampled row's generator
(`seed_for`, `generator`), keeps what the penalties need (`penalty_state`, `note_tokens`), picks
every row's next token (`pick`), takes it into its row (`take`) and turns a finished row into a
`Completion` (`finish`). What a token is drawn from is gptcli.generation.sampling; the model runs
through the `Decoder` that `open_decoder` gives (gptcli.contracts.Decoder).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gptcli.generation.sampling import Settings, draw
from gptcli.generation.tokens import Detokenizer, TokenText, decode

if TYPE_CHECKING:
    import torch

    from gptcli.contracts import Decoder, LogprobEntry, Tokenizer
    from gptcli.loading.models import LoadedModel

# --- Events -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextChunk:
    """Text of sample `sample` of prompt `index` that became final (whole characters, before any stop)."""

    index: int
    sample: int
    text: str


@dataclass
class Completion:
    """One finished sample."""

    index: int  # which prompt
    sample: int  # which sample of that prompt (-N)
    prompt: str
    prompt_ids: list[int]  # as the model saw them, after any cut
    text: str
    token_ids: list[int]  # every generated id, a final EOS and the tokens of a stop text included
    finish_reason: str  # "eos", "stop" or "length"
    dropped: int = 0  # prompt tokens cut from the left to fit the context
    context_full: bool = False  # "length" because the context filled up, not because of -n
    seed: int | None = None  # reproduces this sample alone (None: greedy)
    seconds: float = 0.0
    first_token_seconds: float = 0.0
    logprobs: list[LogprobEntry] | None = None

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0

    def to_json(self, model: str) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "model": model,
            "prompt": self.prompt,
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "usage": {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.token_ids)},
            "seconds": round(self.seconds, 6),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "seed": self.seed,
        }
        if self.logprobs is not None:
            obj["logprobs"] = self.logprobs
        return obj


# --- Stop texts ---------------------------------------------------------------------------------------


class StopScanner:
    """Finds stop texts in streamed text, holding back any tail that could be the start of one.

    A stop text can span tokens ("\\n\\n" as "\\n" + "\\n"), so text that might begin a stop text is not
    released until the next tokens show whether it does: nothing of a stop text is ever printed.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to release, whether a stop text was found); after a stop, drop the rest."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [at for s in self.stops if (at := self.pending.find(s)) >= 0]
        if hits:
            released, self.pending = self.pending[: min(hits)], ""
            return released, True
        hold = max((_overlap(self.pending, s) for s in self.stops), default=0)
        cut = len(self.pending) - hold
        released, self.pending = self.pending[:cut], self.pending[cut:]
        return released, False

    def flush(self) -> str:
        released, self.pending = self.pending, ""
        return released


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


def cut_at_stop(text: str, stops: Iterable[str]) -> str:
    """`text` up to the first stop text, if any."""
    hits = [at for s in stops if s and (at := text.find(s)) >= 0]
    return text[: min(hits)] if hits else text


# --- A row: one sample being decoded -----------------------------------------------------------------


@dataclass
class Row:
    """One sample being decoded: its prompt, its text so far, and how it ended."""

    index: int
    sample: int
    prompt: str
    prompt_ids: list[int]
    dropped: int
    seed: int | None
    detok: Detokenizer
    stops: StopScanner
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] | None = None
    finish_reason: str | None = None
    context_full: bool = False
    first_token_at: float = 0.0
    done_at: float = 0.0


def new_row(
    tokenizer: Tokenizer,
    settings: Settings,
    *,
    index: int,
    sample: int,
    prompt: str,
    prompt_ids: list[int],
    seed: int | None,
    dropped: int = 0,
) -> Row:
    """Sample `sample` of prompt `index`; `seed` is the job's (sample k draws with seed + k)."""
    return Row(
        index=index,
        sample=sample,
        prompt=prompt,
        prompt_ids=prompt_ids,
        dropped=dropped,
        seed=None if seed is None else seed + sample,
        detok=Detokenizer(tokenizer, after=prompt),
        stops=StopScanner(settings.stop),
        logprobs=[] if settings.logprobs is not None else None,
    )


def seed_for(settings: Settings, *, always: bool = False) -> int | None:
    """The seed a run draws with: the settings' own, else a fresh random one when it samples (or
    `always`), else None (greedy needs none)."""
    if settings.seed is not None:
        return settings.seed
    return secrets.randbits(31) if settings.sampling or always else None


def generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A torch generator on `device` seeded with `seed`: each sampled row draws from its own, so its
    tokens do not depend on the rows it shares a batch with."""
    import torch

    made = torch.Generator(device=device)
    made.manual_seed(seed or 0)
    return made


def penalty_state(
    settings: Settings,
    prompts: Sequence[Sequence[int]],
    vocab: int,
    device: torch.device,
    generated: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the penalties read of each row's text, [rows, vocab] each (None when no penalty needs it):
    `seen`, the tokens of its prompt and output (repetition penalty), and `counts`, how often each
    token was generated (presence and frequency penalties: OpenAI counts the output only).
    `generated`: each row's tokens so far, when it has some already."""
    import torch

    seen = counts = None
    if settings.repetition_penalty != 1.0:
        seen = torch.zeros((len(prompts), vocab), dtype=torch.bool, device=device)
        for i, ids in enumerate(prompts):
            seen[i, list(ids)] = True
    if settings.presence_penalty or settings.frequency_penalty:
        counts = torch.zeros((len(prompts), vocab), dtype=torch.float32, device=device)
    for i, ids in enumerate(generated or []):
        if ids:
            tokens = torch.tensor(list(ids), device=device)
            if seen is not None:
                seen[i, tokens] = True
            if counts is not None:
                counts[i].index_add_(0, tokens, torch.ones(len(ids), device=device))
    return seen, counts


def note_tokens(seen: torch.Tensor | None, counts: torch.Tensor | None, next_ids: torch.Tensor) -> None:
    """Record each row's new token ([rows]) in the penalties' state, in place."""
    if seen is not None:
        seen.scatter_(1, next_ids[:, None], True)
    if counts is not None:
        counts.scatter_add_(1, next_ids[:, None], counts.new_ones((len(next_ids), 1)))


# --- Picking and taking a token ------------------------------------------------------------------------


def pick(
    logits: torch.Tensor,
    settings: Settings,
    seen: torch.Tensor | None,
    generators: list[torch.Generator],
    active: list[bool],
    pad: int,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float] | None, list[list[tuple[int, float]]] | None]:
    """The next token of every row (pad for finished rows), and raw logprobs when asked for:
    (ids, the chosen tokens' logprobs, each row's top alternatives as (id, logprob))."""
    import torch

    if all(active):
        next_ids = draw(logits, settings, seen, generators, counts=counts)
    else:  # finished rows draw nothing, so the others' generators advance as they would alone
        rows = torch.tensor([i for i, a in enumerate(active) if a], device=logits.device)
        drawn = draw(
            logits[rows],
            settings,
            None if seen is None else seen[rows],
            [g for g, a in zip(generators, active, strict=True) if a] if generators else [],
            counts=None if counts is None else counts[rows],
        )
        next_ids = torch.full((len(active),), pad, dtype=torch.long, device=logits.device)
        next_ids[rows] = drawn
    if settings.logprobs is None:
        return next_ids, None, None
    # Logprobs are the model's own distribution (before temperature, penalties and filters), so they
    # are comparable across settings and equal to what `gptcli topk` shows.
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, next_ids[:, None])[:, 0].tolist()
    top = None
    if settings.logprobs > 0:
        best = torch.topk(logprobs, min(settings.logprobs, logprobs.shape[-1]), dim=-1)
        top = [
            list(zip(ids, lps, strict=True))
            for ids, lps in zip(best.indices.tolist(), best.values.tolist(), strict=True)
        ]
    return next_ids, chosen, top


def logprob_entry(names: TokenText, token: int, logprob: float, top: list[tuple[int, float]]) -> LogprobEntry:
    """A token's logprob record: {"id", "token", "bytes", "logprob", "top_logprobs"}."""
    return {
        **names.describe(token),
        "logprob": logprob,
        "top_logprobs": [{**names.describe(t), "logprob": lp} for t, lp in top],
    }


def take(
    row: Row,
    token: int,
    *,
    eos: set[int],
    max_new_tokens: int,
    context: int,
    now: float,
    logprob: LogprobEntry | None = None,
) -> str:
    """Take one generated token (and its logprob record, if any) into the row, set its finish reason
    if it is done; return the text that became final (at the end, also what was held back)."""
    if not row.token_ids:
        row.first_token_at = now
    row.token_ids.append(token)
    if logprob is not None and row.logprobs is not None:
        row.logprobs.append(logprob)
    text = _advance(row, token, eos, max_new_tokens, context)
    if row.finish_reason is not None:
        row.done_at = now
    return text


def _advance(row: Row, token: int, eos: set[int], max_new_tokens: int, context: int) -> str:
    text = ""
    if token in eos:
        row.finish_reason = "eos"
    else:
        text, hit = row.stops.feed(row.detok.push(token))
        if hit:
            row.finish_reason = "stop"
            return text
        if len(row.token_ids) >= max_new_tokens:
            row.finish_reason = "length"
        elif len(row.prompt_ids) + len(row.token_ids) >= context:
            row.finish_reason = "length"
            row.context_full = True
        else:
            return text
    # The end: release the bytes held back for an incomplete character, then the held stop prefix.
    tail, hit = row.stops.feed(row.detok.flush())
    if hit:
        row.finish_reason = "stop"
        row.context_full = False
        return text + tail
    return text + tail + row.stops.flush()


def finish(tokenizer: Tokenizer, row: Row, settings: Settings, started: float) -> Completion:
    """The Completion of a row that is done; its times count from `started`."""
    # The text is the one-shot decode of the ids, not the sum of the streamed chunks: the two agree
    # (Detokenizer's promise, checked by the tests), and the one-shot decode is the reference.
    text = decode(tokenizer, row.token_ids, after=row.prompt)
    if row.finish_reason == "stop":
        text = cut_at_stop(text, settings.stop)
    return Completion(
        index=row.index,
        sample=row.sample,
        prompt=row.prompt,
        prompt_ids=row.prompt_ids,
        text=text,
        token_ids=row.token_ids,
        finish_reason=row.finish_reason or "length",
        dropped=row.dropped,
        context_full=row.context_full,
        seed=row.seed,
        seconds=row.done_at - started,
        first_token_seconds=row.first_token_at - started,
        logprobs=row.logprobs,
    )


def eos_ids(lm: LoadedModel) -> set[int]:
    """The ids that end generation: generation_config's eos_token_id (one or a list), else the tokenizer's."""
    for source in (lm.generation_config, lm.config, lm.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}
    return set()


# --- The KV-cache budget ------------------------------------------------------------------------------

# Most bytes one batch's KV cache may take, so that long prompts, or big models, decode fewer rows at a
# time instead of running out of memory: 32 rows of GPT-2-124M near its full context would take 2.5 GB
# (26 rows fit), GPT-2-XL's take 0.6 GB a row (3 fit).
KV_BUDGET = 2 * 2**30


def kv_bytes(lm: LoadedModel, rows: int, positions: int) -> int:
    """Bytes of the keys and values of every layer for `rows` rows of `positions` positions."""
    # gptcli.gpt2 keeps its KV cache in float32 on CPUs whatever the weights; transformers' models on
    # a CPU run in float32 too unless asked otherwise, and counting 4 bytes errs on the safe side.
    itemsize = 4 if lm.device.type == "cpu" else lm.dtype.itemsize
    return 2 * lm.config.num_hidden_layers * lm.config.hidden_size * itemsize * rows * positions


def rows_that_fit(lm: LoadedModel, prompt_length: int, max_new_tokens: int, wanted: int) -> int:
    """How many rows (at most `wanted`) of this prompt length decode together within KV_BUDGET."""
    context = lm.context_length
    length = min(prompt_length, context) + min(max_new_tokens, context)
    return max(1, min(wanted, KV_BUDGET // kv_bytes(lm, 1, length)))


# --- The decoder --------------------------------------------------------------------------------------


def open_decoder(lm: LoadedModel, batch_size: int, max_length: int) -> Decoder:
    """The cached decoder for this model, `batch_size` rows of at most `max_length` positions:
    gptcli's own for the models gptcli.gpt2 runs (lm.runtime "gptcli"), transformers' for the rest."""
    if lm.runtime == "gptcli":
        from gptcli.gpt2 import CachedDecoder

        assert lm.net is not None
        return CachedDecoder(lm.net, batch_size, max_length)
    return KVStepper(lm.model)


class KVStepper:
    """A transformers model run one step at a time over its DynamicCache, returning float32 logits of the
    last position: the Decoder for checkpoints gptcli.gpt2 does not run."""

    def __init__(self, model: Any) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.mask: torch.Tensor | None = None

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> torch.Tensor:
        self.mask = attention_mask
        return self._forward(input_ids, position_ids)

    def step(self, next_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row ([batch, 1]) at `position_ids` ([batch, 1])."""
        import torch

        if self.mask is not None:
            ones = torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype, device=self.mask.device)
            self.mask = torch.cat([self.mask, ones], dim=1)
        return self._forward(next_ids, position_ids)

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these rows only (indices into the current batch)."""
        self.cache.batch_select_indices(rows)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, rows)

    def extend(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Feed several new tokens of one unpadded row ([1, n]); float32 logits of each [n, vocab]."""
        import torch

        if self.mask is not None:
            ones = torch.ones((1, ids.shape[1]), dtype=self.mask.dtype, device=self.mask.device)
            self.mask = torch.cat([self.mask, ones], dim=1)
        return self._forward(ids, position_ids, keep=ids.shape[1])[0]

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (undo): the next step writes at `length`."""
        # A negative count of tokens to drop: what every transformers 5 release takes (newer ones
        # refuse an absolute length).
        drop = self.cache.get_seq_length() - length
        if drop > 0:
            self.cache.crop(-drop)
        if self.mask is not None:
            self.mask = self.mask[:, :length]

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """float32 logits of the last position [batch, vocab], or of the last `keep` [batch, keep, vocab]."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.mask,
            position_ids=position_ids,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=keep or 1,
        )
        self.cache = out.cache
        # float32 whatever the weights: the reference numerics for sampling, penalties and logprobs.
        logits: torch.Tensor = out.logits[:, -keep:, :] if keep else out.logits[:, -1, :]
        return logits.float()


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run torch on `count` threads inside the block (None: as it is).

    One sequence's decoding step is ~50 small matrix-vector products, each bound by memory bandwidth;
    whether a second thread adds bandwidth or only a wake-up and a join at each product depends on the
    machine, so the count for them is measured (LoadedModel.decode_threads, gptcli.loading.cpu).
    Prompts and batches, which are matrix-matrix products, keep every thread.
    """
    import torch

    before = torch.get_num_threads()
    if count is None or count >= before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
