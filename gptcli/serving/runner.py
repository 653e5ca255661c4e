"""The runner: the model, the batch's KV cache and its rows; it runs one step when the scheduler asks.

Owned by the engine thread alone (gptcli.serving.engine's Engine, the scheduler, calls every method
here from its loop): nothing in this module is touched from another thread, so it takes no lock.

The batch is one right-aligned cache (gptcli.gpt2.KVCache.gather): a prompt prefilled on its own, as
`gptcli complete` prefills it (in chunks of `prefill_chunk` tokens when it is longer), joins with its
keys and values gathered beside the running rows', left padding masked, positions counted per row, so
a row computes what it computes alone. Rows of paused jobs wait outside it, parked with a copy of
their cache and logits. Picking tokens, penalties and logprobs are gptcli.generation.decoding's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gptcli.batching import left_pad, pad_id
from gptcli.generation.decoding import (
    generator,
    kv_bytes,
    logprob_entry,
    new_row,
    open_decoder,
    penalty_state,
    pick,
    torch_threads,
)
from gptcli.generation.sampling import Settings
from gptcli.generation.tokens import TokenText

if TYPE_CHECKING:
    import torch

    from gptcli.contracts import LogprobEntry
    from gptcli.generation.decoding import Row
    from gptcli.loading.models import LoadedModel
    from gptcli.serving.engine import Job


@dataclass(eq=False)
class Slot:
    """One row of the batch: a sample being decoded, its job, and what drawing its tokens needs."""

    job: Job
    row: Row
    position: int  # tokens of this row in the cache: the position of the next one fed
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # [vocab] bool: in the text so far (repetition penalty)
    counts: torch.Tensor | None = None  # [vocab]: times generated so far (presence/frequency penalties)
    done: bool = False


# A row ready to join the batch: its slot, its own cache (one row, or a prompt's shared by its
# samples) and its next logits [1, vocab].
Joining = tuple[Slot, Any, "torch.Tensor"]


class Runner:
    """The batch: `slots` (rows in the batch, in cache order), `parked` (rows of paused jobs), the
    decoder over their cache and each row's next logits."""

    def __init__(self, lm: LoadedModel, prefill_chunk: int | None) -> None:
        self.lm = lm
        self.prefill_chunk = prefill_chunk
        self.names = TokenText(lm.tokenizer)
        self.pad = pad_id(lm.tokenizer)
        self.slots: list[Slot] = []
        self.parked: list[Joining] = []
        self.decoder: Any = None
        self.logits: torch.Tensor | None = None  # [rows, vocab], float32: each row's next pick
        self.steps = 0  # decoding steps run
        self.peak_rows = 0  # most rows decoded together
        self.chunks = 0  # prefill chunks run (prompts longer than prefill_chunk)

    def clear(self) -> None:
        """Let the batch go (its jobs failed): no rows, no cache."""
        self.slots, self.decoder, self.logits = [], None, None

    def kv_bytes_now(self) -> int:
        cache = getattr(self.decoder, "cache", None)
        return 0 if cache is None else 2 * cache.keys.numel() * cache.keys.element_size()

    # Prefill: a job's next row, its prompt prefilled alone -------------------------------------------

    def in_chunks(self, job: Job) -> bool:
        """Whether the job's next row needs a prompt prefilled in chunks (not done yet)."""
        index = job.next_row // job.settings.num_samples
        chunk = self.prefill_chunk
        return index not in job.prefilled and chunk is not None and len(job.prompt_ids[index]) > chunk

    def new_row(self, job: Job) -> Joining | None:
        """The job's next row, with its prompt prefilled alone (once for all samples of the prompt).
        None while a long prompt is prefilled in chunks: one more chunk went in, the row is not ready."""
        index, sample = divmod(job.next_row, job.settings.num_samples)
        if index not in job.prefilled and not self.prefill(job, index):
            return None
        job.next_row += 1
        cache, logits = job.prefilled[index]
        return self.slot(job, index, sample, logits.shape[-1]), cache, logits

    def prefill(self, job: Job, index: int) -> bool:
        """Prefill prompt `index` of the job, or its next chunk when it is longer than prefill_chunk;
        True once the whole prompt is in (its cache and last logits then in job.prefilled)."""
        import torch

        from gptcli.gpt2 import CachedDecoder

        ids = list(job.prompt_ids[index])
        if job.prefilling is None:
            job.prefilled.clear()  # rows are prompt-major: the previous prompt is done with
            job.prefilling = (CachedDecoder(self.lm.net, 1, len(ids)), 0)  # type: ignore[arg-type]
        decoder, fed = job.prefilling
        end = len(ids) if self.prefill_chunk is None else min(len(ids), fed + self.prefill_chunk)
        input_ids = torch.tensor([ids[fed:end]], device=self.lm.device)
        positions = torch.arange(fed, end, device=self.lm.device)[None]
        # As `complete` prefills one prompt: no padding, no mask; SDPA's causal path for the first
        # chunk, a causal mask offset by the cached columns for the next ones.
        logits = decoder.prefill(input_ids, None, positions)
        if end < len(ids):
            job.prefilling = (decoder, end)
            self.chunks += 1
            return False
        if fed:
            self.chunks += 1
        job.prefilling = None
        job.prefilled[index] = (decoder.cache, logits)
        return True

    def slot(self, job: Job, index: int, sample: int, vocab: int) -> Slot:
        settings = job.settings
        ids = list(job.prompt_ids[index])
        row = new_row(
            self.lm.tokenizer,
            settings,
            index=index,
            sample=sample,
            prompt=job.prompts[index],
            prompt_ids=ids,
            seed=job.seed,
        )
        slot = Slot(job, row, position=len(ids))
        if settings.sampling:
            slot.generator = generator(self.lm.device, row.seed)
        seen, counts = penalty_state(settings, [ids], vocab, self.lm.device)
        slot.seen = None if seen is None else seen[0]
        slot.counts = None if counts is None else counts[0]
        return slot

    def score(self, ids: list[int], k: int) -> list[LogprobEntry | None]:
        """Each prompt token's logprob given the ones before it, with its top `k` alternatives: one
        forward pass over the whole prompt."""
        import torch

        logits = self.lm.logits(torch.tensor([ids], device=self.lm.device))[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(ids[1:], device=self.lm.device)
        chosen = logprobs[:-1].gather(1, targets[:, None])[:, 0].tolist()
        top = torch.topk(logprobs[:-1], min(k, logprobs.shape[-1]), dim=-1) if k else None
        entries: list[LogprobEntry | None] = [None]
        for j, token in enumerate(ids[1:]):
            alternatives = []
            if top is not None:
                alternatives = list(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True))
            entries.append(logprob_entry(self.names, token, chosen[j], alternatives))
        return entries

    # The batch's cache: joining, parking, its size ------------------------------------------------------

    def kv_bytes(self, slots: list[Slot]) -> int:
        """Bytes of the KV cache a batch of these rows takes until its longest row is done."""
        slots = [s for s in slots if not s.done]  # rows that are done leave when the others join
        return kv_bytes(self.lm, len(slots), self._columns(slots))

    def _columns(self, slots: list[Slot]) -> int:
        """Columns a right-aligned cache of these rows needs: the longest row now, plus the most steps
        any of them may still take."""
        width = max(s.position for s in slots)
        more = max(
            (s.job.settings.max_new_tokens - len(s.row.token_ids) for s in slots if not s.done), default=0
        )
        return width + max(0, min(more, self.lm.context_length))

    def merge(self, joining: list[Joining]) -> None:
        """One batch of the running rows that are not done and the joining ones, in one new cache."""
        import torch

        from gptcli.gpt2 import CachedDecoder, KVCache

        net = self.lm.net
        assert net is not None
        kept = [i for i, s in enumerate(self.slots) if not s.done] if self.decoder is not None else []
        parts = [(self.decoder.cache, i, self.slots[i].position) for i in kept]
        parts += [(cache, 0, slot.position) for slot, cache, _ in joining]
        slots = [self.slots[i] for i in kept] + [slot for slot, _, _ in joining]
        cache = KVCache.gather(net.config, parts, self._columns(slots))
        logits = [self.logits[kept]] if kept and self.logits is not None else []
        logits += [row_logits for _, _, row_logits in joining]
        self.decoder = CachedDecoder(net, 0, 0, cache=cache)
        self.logits = torch.cat(logits)
        self.slots = slots
        self.peak_rows = max(self.peak_rows, len(slots))

    def resumable(self) -> bool:
        return any(not slot.job.paused or slot.job.cancelled for slot, _, _ in self.parked)

    def unpark(self, max_rows: int) -> list[Joining]:
        """The parked rows whose jobs go on again (and room in the batch): they join as new rows do,
        with the cache and logits they left with. Rows of cancelled jobs are let go."""
        joining: list[Joining] = []
        parked: list[Joining] = []
        for slot, cache, logits in self.parked:
            if slot.job.cancelled:
                continue
            if slot.job.paused or len(self.slots) + len(joining) >= max_rows:
                parked.append((slot, cache, logits))
            else:
                joining.append((slot, cache, logits))
        self.parked = parked
        return joining

    def park_paused(self) -> None:
        """Rows of paused jobs leave the batch with a copy of their cache and logits (gptcli's GPT-2
        only: transformers' caches cannot be split by row, so there a paused job's rows go on)."""
        import torch

        from gptcli.gpt2 import KVCache

        if self.lm.runtime != "gptcli" or self.decoder is None or self.logits is None:
            return
        net = self.lm.net
        assert net is not None
        leaving = [i for i, s in enumerate(self.slots) if s.job.paused and not (s.done or s.job.cancelled)]
        if not leaving:
            return
        for i in leaving:
            slot = self.slots[i]
            row = [(self.decoder.cache, i, slot.position)]
            cache = KVCache.gather(net.config, row, slot.position)
            self.parked.append((slot, cache, self.logits[i : i + 1].clone()))
        keep = [i for i in range(len(self.slots)) if i not in set(leaving)]
        self.slots = [self.slots[i] for i in keep]
        if not keep:
            self.decoder = self.logits = None
            return
        index = torch.tensor(keep, device=self.lm.device)
        self.decoder.keep(index)
        self.logits = self.logits[index]

    def start_together(self, slots: list[Slot]) -> None:
        """transformers' models: these rows (of one job) prefilled together, left-padded, in a fresh
        decoder, as the batch."""
        lengths = [s.position for s in slots]
        input_ids, mask, positions = left_pad([s.row.prompt_ids for s in slots], self.pad, self.lm.device)
        most = max(s.job.settings.max_new_tokens for s in slots)
        self.decoder = open_decoder(
            self.lm, len(slots), input_ids.shape[1] + min(most, self.lm.context_length)
        )
        self.logits = self.decoder.prefill(
            input_ids, mask if min(lengths) < max(lengths) else None, positions
        )
        self.slots = slots
        self.peak_rows = max(self.peak_rows, len(slots))

    # One step -------------------------------------------------------------------------------------------

    def pick_all(self) -> list[int]:
        """Every row's next token (pad for rows that are done): rows with the same way of drawing are
        drawn together, each with its own generator, by decoding.pick."""
        import torch

        assert self.logits is not None
        tokens = [self.pad] * len(self.slots)
        groups: dict[tuple[Settings, Any], list[int]] = {}
        for i, slot in enumerate(self.slots):
            if not slot.done:
                bias = tuple(sorted(slot.job.logit_bias.items())) if slot.job.logit_bias else None
                groups.setdefault((_how_drawn(slot.job.settings), bias), []).append(i)
        for (settings, bias), rows in groups.items():
            whole = len(rows) == len(self.slots)
            index = torch.tensor(rows, device=self.logits.device)
            logits = self.logits if whole else self.logits[index]
            if bias is not None:  # OpenAI's: added before drawing, so the logprobs are of the biased logits
                ids, values = zip(*bias, strict=True)
                logits = logits.clone()
                logits[:, list(ids)] += torch.tensor(values, dtype=logits.dtype, device=logits.device)
            seen = counts = None
            if settings.repetition_penalty != 1.0:
                seen = torch.stack([self.slots[i].seen for i in rows])  # type: ignore[misc]
            if settings.presence_penalty or settings.frequency_penalty:
                counts = torch.stack([self.slots[i].counts for i in rows])  # type: ignore[misc]
            # (every sampled row has its generator)
            generators = [g for i in rows if (g := self.slots[i].generator) is not None]
            picked, chosen, top = pick(
                logits, settings, seen, generators, [True] * len(rows), self.pad, counts
            )
            for j, (i, token) in enumerate(zip(rows, picked.tolist(), strict=True)):
                tokens[i] = token
                row = self.slots[i].row
                if row.logprobs is not None and chosen is not None:
                    row.logprobs.append(logprob_entry(self.names, token, chosen[j], top[j] if top else []))
        return tokens

    def drop_done(self, tokens: list[int], others_waiting: bool) -> list[int]:
        """Let rows that are done leave the batch; returns the tokens of the rows that stay. Dropping
        copies the cache, so not at every finish: once half the batch is done, when others wait to
        join, or when a job was cancelled (its row is freed at once). Until then a finished row steps
        with the pad token, as in generate."""
        done = [s.done for s in self.slots]
        if not any(done):
            return tokens
        cancelled = any(s.job.cancelled for s in self.slots)
        if 2 * sum(done) >= len(done) or cancelled or others_waiting:
            import torch

            keep = [i for i, d in enumerate(done) if not d]
            if keep and self.decoder is not None:
                self.decoder.keep(torch.tensor(keep, device=self.lm.device))
            self.slots = [self.slots[i] for i in keep]
            tokens = [tokens[i] for i in keep]
        if not self.slots:
            self.decoder = self.logits = None
        return tokens

    def step(self, tokens: list[int]) -> None:
        """Run the model on every row's new token: the logits of the next pick."""
        import torch

        assert self.decoder is not None
        context = self.lm.context_length
        next_ids = torch.tensor(
            [self.pad if s.done else t for s, t in zip(self.slots, tokens, strict=True)],
            device=self.lm.device,
        )
        positions = torch.tensor([min(s.position, context - 1) for s in self.slots], device=self.lm.device)
        # One row alone decodes on the threads measured fastest for it, as `complete` does.
        with torch_threads(self.lm.decode_threads() if len(self.slots) == 1 else None):
            self.logits = self.decoder.step(next_ids[:, None], positions[:, None])
        for slot in self.slots:
            slot.position += 1
        self.steps += 1


def _how_drawn(settings: Settings) -> Settings:
    """The settings with only what picking a token depends on: rows that agree on it draw together."""
    return dataclasses.replace(
        settings, max_new_tokens=1, seed=None, stop=(), ignore_eos=False, num_samples=1, sources={}
    )
