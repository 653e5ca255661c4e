"""The decode loop: prompts in, text chunks and finished completions out.

`stream()` is a generator of events: `TextChunk`s as text becomes final and one `Completion` per sample.
It never prints and knows nothing of terminals; the CLI decides what to show. What a token is drawn
from (settings, the filters) is gptcli.generation.sampling; the model runs through gptcli.gpt2's cached
decoder
for plain GPT-2 checkpoints and through transformers for the rest, with the same results.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gptcli.batching import check_batch_size, fit_context, left_pad, pad_id
from gptcli.generation.sampling import Settings, draw, resolve_settings
from gptcli.generation.tokens import Detokenizer, TokenText, decode, encode_prompt
from gptcli.gpt2 import BATCHED_ROWS

if TYPE_CHECKING:
    import torch

    from gptcli.contracts import Tokenizer
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
    logprobs: list[dict[str, Any]] | None = None

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


# --- The decode loop ----------------------------------------------------------------------------------


class KVStepper:
    """A transformers model run one step at a time over its DynamicCache, returning float32 logits of the
    last position: the decoder for checkpoints gptcli.gpt2 does not run (same interface as its
    CachedDecoder)."""

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
        return out.logits[:, -keep:, :].float() if keep else out.logits[:, -1, :].float()


def _decoder(lm: LoadedModel, batch_size: int, max_length: int) -> Any:
    """The cached decoder for this model: gptcli's own for plain GPT-2s, transformers' for the rest."""
    if lm.net is not None:
        from gptcli.gpt2 import CachedDecoder

        return CachedDecoder(lm.net, batch_size, max_length)
    return KVStepper(lm.model)


@dataclass
class _Row:
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
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    context_full: bool = False
    first_token_at: float = 0.0
    done_at: float = 0.0


def encode_for_context(
    tokenizer: Tokenizer, prompt: str, context: int, max_new_tokens: int
) -> tuple[list[int], int]:
    """The prompt's ids, cut from the left when they fill the context, keeping room to generate.

    Room is -n tokens, at most half the context (a long prompt still matters more than a long answer).
    Returns the ids and how many were dropped.
    """
    ids = encode_prompt(tokenizer, prompt)
    if len(ids) < context:
        return ids, 0
    room = max(1, min(max_new_tokens, context // 2))
    return fit_context(ids, context - room)


def eos_ids(lm: LoadedModel) -> set[int]:
    """The ids that end generation: generation_config's eos_token_id (one or a list), else the tokenizer's."""
    for source in (lm.generation_config, lm.config, lm.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}
    return set()


def stream(
    lm: LoadedModel,
    prompts: Sequence[str],
    settings: Settings | None = None,
    *,
    batch_size: int = 1,
) -> Generator[TextChunk | Completion, None, None]:
    """Complete each prompt `settings.num_samples` times, yielding text as it becomes final.

    Rows (prompt × sample) are decoded `batch_size` at a time with left padding. Completions come in
    input order (prompt, then sample); the TextChunks of rows in one batch interleave.

    Sample k of every prompt draws from its own generator seeded with seed + k, so a sample's tokens do
    not depend on the batch it ran in or on how the output is shown.
    """
    settings = settings or resolve_settings(lm.generation_config)
    settings.validate()  # here, not at the first next(): a generator body runs only when iterated
    check_batch_size(batch_size)
    return _stream(lm, prompts, settings, batch_size)


# Rows are sorted by length within windows of this many batches (which bounds how long a completion
# waits for the ones before it).
_SORT_WINDOW = 8


def _stream(
    lm: LoadedModel, prompts: Sequence[str], settings: Settings, batch_size: int
) -> Generator[TextChunk | Completion, None, None]:
    seed = settings.seed
    if seed is None and settings.sampling:
        seed = secrets.randbits(31)
    eos = set() if settings.ignore_eos else eos_ids(lm)
    names = TokenText(lm.tokenizer) if settings.logprobs is not None else None

    def rows() -> Iterator[_Row]:  # lazily: `-N 1000000000000` must start streaming at once
        for index, prompt in enumerate(prompts):
            ids, dropped = encode_for_context(
                lm.tokenizer, prompt, lm.context_length, settings.max_new_tokens
            )
            for sample in range(settings.num_samples):
                yield _Row(
                    index=index,
                    sample=sample,
                    prompt=prompt,
                    prompt_ids=ids,
                    dropped=dropped,
                    seed=None if seed is None else seed + sample,
                    detok=Detokenizer(lm.tokenizer, after=prompt),
                    stops=StopScanner(settings.stop),
                    logprobs=[] if names is not None else None,
                )

    # Batches of rows of similar length waste less on padding, so each window of rows is sorted by
    # length; completions are put back in input order, which a window bounds how long they wait for.
    window = batch_size * _SORT_WINDOW if batch_size > 1 else 1
    finished: dict[tuple[int, int], Completion] = {}
    order = ((index, sample) for index in range(len(prompts)) for sample in range(settings.num_samples))
    wanted = next(order, None)
    pending = rows()
    while todo := sorted(itertools.islice(pending, window), key=lambda r: len(r.prompt_ids)):
        first = 0
        while first < len(todo):
            # As many rows as fit in the KV cache budget; sorted, so the last row is the longest.
            longest = len(todo[min(first + batch_size, len(todo)) - 1].prompt_ids)
            size = _rows_that_fit(lm, longest, settings.max_new_tokens, batch_size)
            batch, first = todo[first : first + size], first + size
            one_greedy_row = len(batch) == 1 and not settings.sampling and settings.lookup > 0
            decode = _decode_lookup if one_greedy_row else _decode
            for event in decode(lm, batch, settings, eos, names):
                if isinstance(event, TextChunk):
                    yield event
                    continue
                finished[(event.index, event.sample)] = event
                while wanted in finished:
                    yield finished.pop(wanted)
                    wanted = next(order, None)


# Batched work (rows x new tokens) from which packing the weights for oneDNN (about a second for
# GPT-2-124M) pays: batched steps run ~1.2x faster on them (docs/performance.md).
_PACK_WORK = 1024

# Most bytes one batch's KV cache may take, so that long prompts, or big models, decode fewer rows at a
# time instead of running out of memory: 32 rows of GPT-2-124M near its full context would take 2.5 GB
# (26 rows fit), GPT-2-XL's take 0.6 GB a row (3 fit).
_KV_BUDGET = 2 * 2**30


def _rows_that_fit(lm: LoadedModel, prompt_length: int, max_new_tokens: int, wanted: int) -> int:
    """How many rows (at most `wanted`) of this length decode together within _KV_BUDGET."""
    layers, width, context = lm.config.num_hidden_layers, lm.config.hidden_size, lm.context_length
    length = min(prompt_length, context) + min(max_new_tokens, context)
    itemsize = 4 if lm.device.type == "cpu" else lm.dtype.itemsize  # gptcli.gpt2 keeps fp32 KV on CPUs
    per_row = 2 * layers * width * length * itemsize  # keys and values of every layer
    return max(1, min(wanted, _KV_BUDGET // per_row))


def complete(
    lm: LoadedModel, prompts: str | Sequence[str], settings: Settings | None = None, *, batch_size: int = 32
) -> list[Completion]:
    """Every completion of `prompts` (one prompt or many), in input order."""
    if isinstance(prompts, str):
        prompts = [prompts]
    return [e for e in stream(lm, prompts, settings, batch_size=batch_size) if isinstance(e, Completion)]


def _decode(
    lm: LoadedModel,
    rows: list[_Row],
    settings: Settings,
    eos: set[int],
    names: TokenText | None,
) -> Generator[TextChunk | Completion, None, None]:
    """Decode one batch of rows to the end, yielding each Completion as its row finishes.

    The generator yields outside inference mode.
    """
    import torch

    device = lm.device
    context = lm.context_length
    pad = pad_id(lm.tokenizer)
    lengths = [len(r.prompt_ids) for r in rows]
    started = time.perf_counter()
    if lm.net is not None and len(rows) >= BATCHED_ROWS and len(rows) * settings.max_new_tokens >= _PACK_WORK:
        lm.net.pack_for_batches()  # once per model: long batched work repays the packing many times
    with torch.inference_mode():
        capacity = max(lengths) + min(settings.max_new_tokens, context)
        if lm.net is not None and len(rows) > 1:
            decoder, logits = _prefill_in_groups(lm.net, [r.prompt_ids for r in rows], pad, capacity)
        else:
            input_ids, mask, positions = left_pad([r.prompt_ids for r in rows], pad, device)
            decoder = _decoder(lm, len(rows), capacity)
            # Without padding the mask is all ones: leave it out so attention can take its causal fast path.
            logits = decoder.prefill(input_ids, mask if min(lengths) < max(lengths) else None, positions)
        next_pos = torch.tensor(lengths, device=device)
        seen = None
        if settings.repetition_penalty != 1.0:
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)
            for i, ids in enumerate(r.prompt_ids for r in rows):
                seen[i, ids] = True
        generators = []
        if settings.sampling:
            for row in rows:
                generator = torch.Generator(device=device)
                generator.manual_seed(row.seed or 0)
                generators.append(generator)
    batch = list(rows)  # the rows the decoder's batch holds, in its order
    while True:
        active = [r.finish_reason is None for r in batch]
        with torch.inference_mode():
            next_ids, chosen, top = _pick(logits, settings, seen, generators, active, pad)
            if seen is not None:
                seen.scatter_(1, next_ids[:, None], True)
        now = time.perf_counter()
        for i, (row, token) in enumerate(zip(batch, next_ids.tolist(), strict=True)):
            if not active[i]:
                continue
            if not row.token_ids:
                row.first_token_at = now
            row.token_ids.append(token)
            if row.logprobs is not None and names is not None and chosen is not None:
                row.logprobs.append(_logprob_entry(names, token, chosen[i], top[i] if top else []))
            text = _advance(row, token, eos, settings.max_new_tokens, context)
            if text:
                yield TextChunk(row.index, row.sample, text)
            if row.finish_reason is not None:
                row.done_at = now
                yield _finish(lm, row, settings, started)
        if all(r.finish_reason is not None for r in batch):
            return
        with torch.inference_mode():
            keep = [i for i, r in enumerate(batch) if r.finish_reason is None]
            # Rows that are done stop costing compute once half the batch is done: dropping them copies
            # the cache, so not at every finish. Until then they step with the pad token, their position
            # clamped inside the position table.
            if 2 * len(keep) <= len(batch):
                index = torch.tensor(keep, device=device)
                decoder.keep(index)
                next_ids, next_pos = next_ids[index], next_pos[index]
                seen = seen[index] if seen is not None else None
                generators = [generators[i] for i in keep] if generators else []
                batch = [batch[i] for i in keep]
            with _threads(lm.decode_threads() if len(batch) == 1 else None):
                logits = decoder.step(next_ids[:, None], next_pos.clamp(max=context - 1)[:, None])
            next_pos += 1


def _decode_lookup(
    lm: LoadedModel,
    rows: list[_Row],
    settings: Settings,
    eos: set[int],
    names: TokenText | None,
) -> Generator[TextChunk | Completion, None, None]:
    """Greedy decoding of one row with prompt lookup: the same tokens as `_decode`, fewer passes.

    Decoding is bound by reading the weights, once per pass whether the pass feeds one token or ten.
    So after each chosen token, the tokens that followed the last earlier occurrence of the text's
    last few tokens (in the prompt or the output: quoted text, code, lists, repeated names) are fed
    along with it as a draft, and the model's own greedy choices decide how many of them stand: each
    draft token is kept only while it equals what greedy decoding picks at its place, so the output
    is greedy decoding's (transformers' `prompt_lookup_num_tokens`; llama.cpp's lookup decoding). The
    cache is cut back to the kept tokens. Where nothing matches, a pass feeds the one token, as
    `_decode` does.
    """
    import torch

    (row,) = rows
    device, context = lm.device, lm.context_length
    started = time.perf_counter()
    ids = list(row.prompt_ids)
    seen_at = _Index(ids)
    capacity = len(ids) + min(settings.max_new_tokens, context)
    with torch.inference_mode():
        decoder = _decoder(lm, 1, capacity)
        positions = torch.arange(len(ids), device=device)[None]
        with _threads(None):
            logits = decoder.prefill(torch.tensor([ids], device=device), None, positions)
        seen = None
        if settings.repetition_penalty != 1.0:
            seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
            seen[ids] = True
    draft: list[int] = []
    while True:
        # logits[j] predicts the token after ids (j = 0), then after each kept draft token.
        for j in range(len(logits)):
            with torch.inference_mode():
                seen_row = None if seen is None else seen[None]
                picked, chosen, top = _pick(logits[j : j + 1], settings, seen_row, [], [True], 0)
                token = int(picked[0])
                if seen is not None:
                    seen[token] = True
            if row.logprobs is not None and names is not None and chosen is not None:
                row.logprobs.append(_logprob_entry(names, token, chosen[0], top[0] if top else []))
            if not row.token_ids:
                row.first_token_at = time.perf_counter()
            row.token_ids.append(token)
            ids.append(token)
            seen_at.add(len(ids) - 1, token)
            text = _advance(row, token, eos, settings.max_new_tokens, context)
            if text:
                yield TextChunk(row.index, row.sample, text)
            if row.finish_reason is not None:
                row.done_at = time.perf_counter()
                yield _finish(lm, row, settings, started)
                return
            if j >= len(draft) or token != draft[j]:
                break  # the draft goes wrong here (or is used up): `token` is new to the cache
        # The cache holds every id but the last; feed the last and the next draft.
        room = min(capacity, context) - len(ids)
        left = settings.max_new_tokens - len(row.token_ids)
        draft = seen_at.draft(ids, min(settings.lookup, room, left - 1))
        with torch.inference_mode(), _threads(lm.decode_threads()):
            decoder.truncate(len(ids) - 1)
            feed = torch.tensor([[ids[-1], *draft]], device=device)
            where = torch.arange(len(ids) - 1, len(ids) + len(draft), device=device)[None]
            logits = decoder.extend(feed, where) if draft else decoder.step(feed, where)


class _Index:
    """Where each token occurs in a growing text, to find drafts for lookup decoding quickly."""

    def __init__(self, ids: list[int]) -> None:
        self.at: dict[int, list[int]] = {}
        for position, token in enumerate(ids):
            self.at.setdefault(token, []).append(position)

    def add(self, position: int, token: int) -> None:
        self.at.setdefault(token, []).append(position)

    def draft(self, ids: list[int], count: int, longest: int = 3) -> list[int]:
        """Up to `count` tokens that followed the last earlier occurrence of the text's last
        `longest` tokens (or fewer, down to its last one); [] when none occurred before."""
        if count <= 0:
            return []
        last = len(ids) - 1
        for n in range(min(longest, last), 0, -1):
            tail = ids[-n:]
            for end in reversed(self.at.get(ids[-1], [])):  # end: where an earlier copy of the tail ends
                if end < last and end >= n - 1 and ids[end - n + 1 : end + 1] == tail:
                    return ids[end + 1 : end + 1 + count]
        return []


# A prompt group of the batch is prefilled together while padding it to its longest prompt costs at
# most this much more than its prompts' own tokens.
_PADDING_SLACK = 1.25


def _prefill_in_groups(
    net: Any, prompts: list[list[int]], pad: int, capacity: int
) -> tuple[Any, torch.Tensor]:
    """Prefill a batch of prompts (sorted by length, as `_stream` sorts them) in groups of similar
    length, then gather their caches into one batch: (decoder, the last positions' float32 logits).

    A prefill is a matrix product over every padded position, so padding the whole batch to its longest
    prompt spends most of its work on padding when lengths differ (a 10-token prompt next to a
    170-token one); groups padded at most _PADDING_SLACK over their own tokens do the same work
    without it. Gathered right-aligned with the padding marked, each row computes what it does alone.
    """
    import torch

    from gptcli.gpt2 import CachedDecoder, KVCache

    groups: list[list[int]] = []
    for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        group = [*groups[-1], i] if groups else [i]
        width = len(prompts[i])
        if groups and width * len(group) <= _PADDING_SLACK * sum(len(prompts[j]) for j in group):
            groups[-1] = group
        else:
            groups.append([i])
    merged: KVCache | None = None
    logits = [torch.empty(0)] * len(prompts)
    with _threads(None):
        for group in groups:
            rows = [prompts[i] for i in group]
            ids, mask, positions = left_pad(rows, pad, net.device)
            decoder = CachedDecoder(net, len(rows), ids.shape[1])
            even = min(map(len, rows)) == max(map(len, rows))
            out = decoder.prefill(ids, None if even else mask, positions)
            if merged is None:  # each group's cache goes into the batch's at once, then is freed
                merged = KVCache.empty_for(net.config, [len(p) for p in prompts], capacity, decoder.cache)
            for row, i in enumerate(group):
                merged.put(i, decoder.cache, row, len(prompts[i]))
                logits[i] = out[row]
    assert merged is not None
    return CachedDecoder(net, len(prompts), capacity, cache=merged), torch.stack(logits)


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
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


def _pick(
    logits: torch.Tensor,
    settings: Settings,
    seen: torch.Tensor | None,
    generators: list[torch.Generator],
    active: list[bool],
    pad: int,
) -> tuple[torch.Tensor, list[float] | None, list[list[tuple[int, float]]] | None]:
    """The next token of every row (pad for finished rows), and raw logprobs when asked for."""
    import torch

    if all(active):
        next_ids = draw(logits, settings, seen, generators)
    else:  # finished rows draw nothing, so the others' generators advance as they would alone
        rows = torch.tensor([i for i, a in enumerate(active) if a], device=logits.device)
        drawn = draw(
            logits[rows],
            settings,
            None if seen is None else seen[rows],
            [g for g, a in zip(generators, active, strict=True) if a] if generators else [],
        )
        next_ids = torch.full((len(active),), pad, dtype=torch.long, device=logits.device)
        next_ids[rows] = drawn
    if settings.logprobs is None:
        return next_ids, None, None
    # Logprobs are the model's own distribution (before temperature, penalty and filters), so they
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


def _logprob_entry(
    names: TokenText, token: int, logprob: float, top: list[tuple[int, float]]
) -> dict[str, Any]:
    return {
        **names.describe(token),
        "logprob": logprob,
        "top_logprobs": [{**names.describe(t), "logprob": lp} for t, lp in top],
    }


def _advance(row: _Row, token: int, eos: set[int], max_new_tokens: int, context: int) -> str:
    """Take one generated token into the row, set its finish reason if it is done; return the text
    that became final (at the end, also what was held back)."""
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


def _finish(lm: LoadedModel, row: _Row, settings: Settings, started: float) -> Completion:
    # The text is the one-shot decode of the ids, not the sum of the streamed chunks: the two agree
    # (Detokenizer's promise, checked by the tests), and the one-shot decode is the reference.
    text = decode(lm.tokenizer, row.token_ids, after=row.prompt)
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
