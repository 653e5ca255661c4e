"""complete and --each-line: prompts in, text chunks and finished completions out.

`stream()` is a generator of events: `TextChunk`s as text becomes final and one `Completion` per sample.
It never prints and knows nothing of terminals; the CLI decides what to show. The loop's data and steps
(rows, picking and taking a token, the decoder, the KV budget) are gptcli.generation.decoding's, shared
with `step` and the server; what a token is drawn from is gptcli.generation.sampling.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING

from gptcli.batching import check_batch_size, fit_context, left_pad, pad_id
from gptcli.generation.decoding import (
    Completion,
    Row,
    StopScanner,
    TextChunk,
    eos_ids,
    finish,
    logprob_entry,
    new_row,
    note_tokens,
    open_decoder,
    penalty_state,
    pick,
    rows_that_fit,
    seed_for,
    take,
    torch_threads,
)
from gptcli.generation.decoding import generator as new_generator
from gptcli.generation.sampling import Settings, resolve_settings
from gptcli.generation.tokens import TokenText, encode_prompt
from gptcli.gpt2 import BATCHED_ROWS

if TYPE_CHECKING:
    import torch

    from gptcli.contracts import Decoder, Tokenizer
    from gptcli.gpt2 import GPT2
    from gptcli.loading.models import LoadedModel

# Where they were before gptcli.generation.decoding existed; callers may import them from here.
__all__ = ["Completion", "StopScanner", "TextChunk", "complete", "encode_for_context", "eos_ids", "stream"]


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
SORT_WINDOW = 8


def _stream(
    lm: LoadedModel, prompts: Sequence[str], settings: Settings, batch_size: int
) -> Generator[TextChunk | Completion, None, None]:
    seed = seed_for(settings)
    eos = set() if settings.ignore_eos else eos_ids(lm)
    names = TokenText(lm.tokenizer) if settings.logprobs is not None else None

    def rows() -> Iterator[Row]:  # lazily: `-N 1000000000000` must start streaming at once
        for index, prompt in enumerate(prompts):
            ids, dropped = encode_for_context(
                lm.tokenizer, prompt, lm.context_length, settings.max_new_tokens
            )
            for sample in range(settings.num_samples):
                yield new_row(
                    lm.tokenizer,
                    settings,
                    index=index,
                    sample=sample,
                    prompt=prompt,
                    prompt_ids=ids,
                    seed=seed,
                    dropped=dropped,
                )

    # Batches of rows of similar length waste less on padding, so each window of rows is sorted by
    # length; completions are put back in input order, which a window bounds how long they wait for.
    window = batch_size * SORT_WINDOW if batch_size > 1 else 1
    finished: dict[tuple[int, int], Completion] = {}
    order = ((index, sample) for index in range(len(prompts)) for sample in range(settings.num_samples))
    wanted = next(order, None)
    pending = rows()
    while todo := sorted(itertools.islice(pending, window), key=lambda r: len(r.prompt_ids)):
        first = 0
        while first < len(todo):
            # As many rows as fit in the KV cache budget; sorted, so the last row is the longest.
            longest = len(todo[min(first + batch_size, len(todo)) - 1].prompt_ids)
            size = rows_that_fit(lm, longest, settings.max_new_tokens, batch_size)
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


def complete(
    lm: LoadedModel, prompts: str | Sequence[str], settings: Settings | None = None, *, batch_size: int = 32
) -> list[Completion]:
    """Every completion of `prompts` (one prompt or many), in input order."""
    if isinstance(prompts, str):
        prompts = [prompts]
    return [e for e in stream(lm, prompts, settings, batch_size=batch_size) if isinstance(e, Completion)]


def _prefill(lm: LoadedModel, rows: list[Row], settings: Settings, pad: int) -> tuple[Decoder, torch.Tensor]:
    """A decoder holding the rows' prompts, and the float32 logits of each row's next token."""
    lengths = [len(r.prompt_ids) for r in rows]
    capacity = max(lengths) + min(settings.max_new_tokens, lm.context_length)
    if lm.runtime == "gptcli" and len(rows) > 1:
        assert lm.net is not None
        return _prefill_in_groups(lm.net, [r.prompt_ids for r in rows], pad, capacity)
    input_ids, mask, positions = left_pad([r.prompt_ids for r in rows], pad, lm.device)
    decoder = open_decoder(lm, len(rows), capacity)
    # Without padding the mask is all ones: leave it out so attention can take its causal fast path.
    return decoder, decoder.prefill(input_ids, mask if min(lengths) < max(lengths) else None, positions)


def _decode(
    lm: LoadedModel,
    rows: list[Row],
    settings: Settings,
    eos: set[int],
    names: TokenText | None,
) -> Generator[TextChunk | Completion, None, None]:
    """Decode one batch of rows to the end, yielding each Completion as its row finishes.

    The generator yields outside inference mode.
    """
    import torch

    device, context = lm.device, lm.context_length
    pad = pad_id(lm.tokenizer)
    started = time.perf_counter()
    if len(rows) >= BATCHED_ROWS and len(rows) * settings.max_new_tokens >= _PACK_WORK:
        lm.pack_for_batches()  # once per model: long batched work repays the packing many times
    with torch.inference_mode():
        decoder, logits = _prefill(lm, rows, settings, pad)
        next_pos = torch.tensor([len(r.prompt_ids) for r in rows], device=device)
        seen, counts = penalty_state(settings, [r.prompt_ids for r in rows], logits.shape[-1], device)
        generators = [new_generator(device, r.seed) for r in rows] if settings.sampling else []
    batch = list(rows)  # the rows the decoder's batch holds, in its order
    while True:
        active = [r.finish_reason is None for r in batch]
        with torch.inference_mode():
            next_ids, chosen, top = pick(logits, settings, seen, generators, active, pad, counts)
            note_tokens(seen, counts, next_ids)
        now = time.perf_counter()
        for i, (row, token) in enumerate(zip(batch, next_ids.tolist(), strict=True)):
            if not active[i]:
                continue
            entry = None
            if names is not None and chosen is not None:
                entry = logprob_entry(names, token, chosen[i], top[i] if top else [])
            text = take(
                row,
                token,
                eos=eos,
                max_new_tokens=settings.max_new_tokens,
                context=context,
                now=now,
                logprob=entry,
            )
            if text:
                yield TextChunk(row.index, row.sample, text)
            if row.finish_reason is not None:
                yield finish(lm.tokenizer, row, settings, started)
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
                counts = counts[index] if counts is not None else None
                generators = [generators[i] for i in keep] if generators else []
                batch = [batch[i] for i in keep]
            with torch_threads(lm.decode_threads() if len(batch) == 1 else None):
                logits = decoder.step(next_ids[:, None], next_pos.clamp(max=context - 1)[:, None])
            next_pos += 1


def _decode_lookup(
    lm: LoadedModel,
    rows: list[Row],
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
        decoder = open_decoder(lm, 1, capacity)
        positions = torch.arange(len(ids), device=device)[None]
        with torch_threads(None):
            logits = decoder.prefill(torch.tensor([ids], device=device), None, positions)
        seen, counts = penalty_state(settings, [ids], logits.shape[-1], device)
    draft: list[int] = []
    while True:
        # logits[j] predicts the token after ids (j = 0), then after each kept draft token.
        for j in range(len(logits)):
            with torch.inference_mode():
                picked, chosen, top = pick(logits[j : j + 1], settings, seen, [], [True], 0, counts)
                note_tokens(seen, counts, picked)
                token = int(picked[0])
            entry = None
            if names is not None and chosen is not None:
                entry = logprob_entry(names, token, chosen[0], top[0] if top else [])
            ids.append(token)
            seen_at.add(len(ids) - 1, token)
            now = time.perf_counter()
            text = take(
                row,
                token,
                eos=eos,
                max_new_tokens=settings.max_new_tokens,
                context=context,
                now=now,
                logprob=entry,
            )
            if text:
                yield TextChunk(row.index, row.sample, text)
            if row.finish_reason is not None:
                yield finish(lm.tokenizer, row, settings, started)
                return
            if j >= len(draft) or token != draft[j]:
                break  # the draft goes wrong here (or is used up): `token` is new to the cache
        # The cache holds every id but the last; feed the last and the next draft.
        room = min(capacity, context) - len(ids)
        left = settings.max_new_tokens - len(row.token_ids)
        draft = seen_at.draft(ids, min(settings.lookup, room, left - 1))
        with torch.inference_mode(), torch_threads(lm.decode_threads()):
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
    net: GPT2, prompts: list[list[int]], pad: int, capacity: int
) -> tuple[Decoder, torch.Tensor]:
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
    with torch_threads(None):
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
