"""Continuous batching: many requests share one decode loop, joining and leaving it step by step.

`Engine` owns the model on one thread. Callers `submit` a `Job` (prompts already tokenized, decoding
`Settings`, and a `sink` that receives the job's events) from any thread, and may `cancel` it. At each
step the engine takes in the jobs that arrived, decodes one token for every row of every running job
together, sends each row's events, and drops the rows that are done.

A joining prompt is prefilled on its own, as `gptcli complete` prefills it, and its keys and
values are gathered with the running rows into one right-aligned cache (gptcli.gpt2.KVCache.gather):
left padding marked in the mask, positions counted per row. So a row computes what it computes alone,
whoever shares its steps, and a seeded row draws from its own generator (seed + sample) as in the CLI.
Rows, picking and taking tokens, stop texts, the UTF-8-safe text, the finished Completion and the
KV budget are gptcli.generation.decoding's, as for `complete`.

A prompt longer than `prefill_chunk` tokens is prefilled a chunk per step: between two chunks the
running rows decode one token, so a long prompt arriving mid-batch delays their next tokens by one
chunk's time rather than the whole prompt's (vLLM's chunked prefill, on one row at a time).

Failures stay with their job: a job whose prefill, prompt scoring or token taking raises gets a Failed
event (the server answers 500 with the reason) and leaves; the other jobs, running or waiting, go on.
An error in the batch's own step fails the jobs with rows in that step, never the waiting ones.

Threads: the engine thread (`_run`) owns everything below the "engine thread" line: the waiting line,
the batch (rows, KV cache, logits), the parked rows and every model call. Any thread may `submit`,
`cancel`, `pause` and `resume`: those only put into the inbox queue or set a job's flags, which the
engine thread reads at its next step. Sinks are called on the engine thread and must not block (the
server's put the events on its event loop's queue, where they are turned into JSON and SSE).

Models that gptcli.gpt2 does not run (lm.runtime "transformers": their DynamicCache) decode one job at
a time: a job waits until the batch is empty, then its rows decode together as in `generate.stream`.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from gptcli.batching import left_pad, pad_id
from gptcli.errors import GptcliError, UsageError, first_line
from gptcli.generation.decoding import (
    KV_BUDGET,
    Completion,
    Row,
    eos_ids,
    finish,
    generator,
    kv_bytes,
    logprob_entry,
    new_row,
    open_decoder,
    penalty_state,
    pick,
    seed_for,
    take,
    torch_threads,
)
from gptcli.generation.sampling import Settings
from gptcli.generation.tokens import TokenText
from gptcli.gpt2 import BATCHED_ROWS

if TYPE_CHECKING:
    import torch

    from gptcli.contracts import LogprobEntry
    from gptcli.loading.models import LoadedModel

_T = TypeVar("_T")

# --- Events (what a job's sink receives, in order) ----------------------------------------------------


@dataclass(frozen=True)
class Token:
    """One new token of sample `sample` of prompt `index`, and the text that became final with it.

    `text` is "" while a character's bytes are incomplete or a possible stop text is held back; the
    texts of a row add up to its Completion's text. `logprob` is the token's entry when the job asked
    for logprobs ({"id", "token", "bytes", "logprob", "top_logprobs"}, as `complete --logprobs`).
    """

    index: int
    sample: int
    token_id: int
    text: str
    logprob: LogprobEntry | None = None


@dataclass(frozen=True)
class PromptLogprobs:
    """Each prompt token's logprob given the ones before it (the first has none: None), with the top
    `Job.prompt_logprobs` alternatives; sent before any Token of that prompt."""

    index: int
    entries: list[LogprobEntry | None]


@dataclass(frozen=True)
class Done:
    """The job is over: every row sent its Completion (the last event of a job that was not cancelled)."""


SHUTTING_DOWN = "the server is shutting down"  # the Failed message of the jobs `stop` ends

# Longest prompt prefilled in one go: longer ones go a chunk per step, so the running rows keep
# decoding. A 256-token chunk of GPT-2-124M takes about as long on a CPU as a few batched steps.
PREFILL_CHUNK = 256

# A test-only fault (a real code path, not a mock): a row whose prompt contains this variable's text
# raises when its first token is taken, as a bug in one row's processing would.
FAULT_ENV = "GPTCLI_ENGINE_FAULT"


class Busy(GptcliError):
    """The waiting line is full: the job was not taken."""


@dataclass(frozen=True)
class Failed:
    """The job could not go on (the engine stopped, or the model raised); its last event."""

    message: str


Event = Token | Completion | PromptLogprobs | Done | Failed


@dataclass(eq=False)
class Job:
    """A request: complete each prompt `settings.num_samples` times and send the events to `sink`.

    `sink` is called on the engine's thread and must not block. `prompt_ids` are the prompts as the
    model sees them (gptcli.generation.tokens.encode_prompt), each shorter than the context.
    `prompt_logprobs`: also score the prompt tokens, with that many alternatives each.
    `generate=False`: only that (an `echo` with no new tokens); the settings are then unused.
    """

    prompts: Sequence[str]
    prompt_ids: Sequence[list[int]]
    settings: Settings
    sink: Callable[[Event], None]
    prompt_logprobs: int | None = None
    generate: bool = True
    logit_bias: dict[int, float] | None = None  # added to the logits before a token is drawn (OpenAI's)
    cancelled: bool = False
    paused: bool = False  # its reader is behind: its rows wait outside the batch (see `pause`)
    submitted: float = field(default_factory=time.perf_counter)
    seed: int | None = None  # resolved at submit: the settings' seed, or a fresh one when sampling
    _engine: Engine | None = field(default=None, repr=False)
    _next: int = 0  # the next row (prompt-major) not yet in the batch
    _running: int = 0  # rows in the batch
    _prefilled: dict[int, Any] = field(default_factory=dict, repr=False)  # prompt -> (cache, logits)
    _prefilling: Any = field(default=None, repr=False)  # (decoder, tokens fed) of a prompt being chunked
    _scored: bool = False  # the PromptLogprobs were sent

    @property
    def rows(self) -> int:
        return len(self.prompt_ids) * self.settings.num_samples if self.generate else 0

    def cancel(self) -> None:
        """Stop this job at the next step (from any thread); its rows leave the batch, no more events."""
        self.cancelled = True
        if self._engine is not None:
            self._engine._wake()

    def pause(self) -> None:
        """Take this job's rows out of the batch at the next step, their caches kept (from any thread):
        what a server does while the client does not read, so that its events stop piling up."""
        self.paused = True

    def resume(self) -> None:
        """Let a paused job's rows join the batch again (from any thread)."""
        self.paused = False
        if self._engine is not None:
            self._engine._wake()


@dataclass(eq=False)
class _Slot:
    """One row of the batch: a sample being decoded, its job, and what drawing its tokens needs."""

    job: Job
    row: Row
    position: int  # tokens of this row in the cache: the position of the next one fed
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # [vocab] bool: in the text so far (repetition penalty)
    counts: torch.Tensor | None = None  # [vocab]: times generated so far (presence/frequency penalties)
    done: bool = False


def check_max_batch(max_rows: int) -> None:
    """Refuse a --max-batch (the engine's `max_rows`) below 1: a usage error wherever it comes from."""
    if max_rows < 1:
        raise UsageError(f"--max-batch must be at least 1 (got {max_rows})")


class Engine:
    """The model's one decode loop, shared by every job: start(), submit() jobs, stop()."""

    def __init__(
        self, lm: LoadedModel, *, max_rows: int = 32, prefill_chunk: int | None = PREFILL_CHUNK
    ) -> None:
        """`max_rows`: most rows decoded together (fewer when their KV cache would pass KV_BUDGET).
        `prefill_chunk`: most prompt tokens prefilled between two decoding steps (None: whole prompts)."""
        check_max_batch(max_rows)
        if prefill_chunk is not None and prefill_chunk < 1:
            raise UsageError(f"the prefill chunk must be at least 1 token (got {prefill_chunk})")
        self.lm = lm
        self.max_rows = max_rows
        self.prefill_chunk = prefill_chunk
        self._fault = os.environ.get(FAULT_ENV) or None
        self.kv_budget = KV_BUDGET  # most bytes the batch's KV cache may take
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._waiting: deque[Job] = deque()
        self._jobs: dict[Job, None] = {}  # every job taken in and not over: what a failure must tell
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gptcli-engine", daemon=True)
        self._names = TokenText(lm.tokenizer)
        self._eos = eos_ids(lm)
        self._pad = pad_id(lm.tokenizer)
        # The batch, touched by the engine thread only.
        self._slots: list[_Slot] = []
        self._parked: list[tuple[_Slot, Any, torch.Tensor]] = []  # rows of paused jobs: cache, logits
        self._decoder: Any = None
        self._logits: torch.Tensor | None = None  # [rows, vocab], float32: each row's next pick
        if max_rows >= BATCHED_ROWS:
            # A server's steps are batched whenever requests overlap: oneDNN-packed weights run them
            # faster, for a second at start and a second copy of the matmul weights (docs/performance.md).
            lm.pack_for_batches()
        self.steps = 0  # decoding steps run (for tests and benchmarks)
        self.peak_rows = 0  # most rows decoded together
        self.tokens = 0  # tokens generated, all jobs together
        self.chunks = 0  # prefill chunks run (prompts longer than prefill_chunk)

    # -- the caller's side (any thread) ----------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, job: Job, max_waiting: int | None = None) -> Job:
        """Queue `job`; its rows join the batch at the next step. Returns it (to cancel it).

        Raises Busy when `max_waiting` jobs already wait for room in the batch.
        """
        if self._stopping.is_set() or not self._thread.is_alive():
            raise GptcliError("the engine is not running")
        if max_waiting is not None and self.waiting() >= max_waiting:
            raise Busy(f"{max_waiting} requests are already waiting for room")
        job.settings.validate()
        if job.seed is None:
            job.seed = seed_for(job.settings)
        job._engine = self
        self._inbox.put(job)
        return job

    def stop(self, timeout: float = 10.0) -> None:
        """Fail every job still running or waiting, and end the loop (within `timeout` seconds)."""
        self._stopping.set()
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def stream(self, prompts: Sequence[str], settings: Settings, **job: Any) -> Iterator[Event]:
        """Submit the prompts as one job and yield its events until it is done (for Python callers).

        Raises GptcliError when the job fails; closing the iterator early cancels the job.
        """
        from gptcli.generation.tokens import encode_prompt

        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        ids = [encode_prompt(self.lm.tokenizer, p) for p in prompts]
        submitted = self.submit(Job(prompts, ids, settings, events.put, **job))
        try:
            while True:
                event = events.get()
                if isinstance(event, Failed):
                    raise GptcliError(event.message)
                if isinstance(event, Done):
                    return
                yield event
        finally:
            submitted.cancel()

    def waiting(self) -> int:
        """Jobs submitted whose rows are not all in the batch yet (read from any thread: a snapshot)."""
        return len(self._waiting) + self._inbox.qsize()  # (the inbox may also hold a wake-up or two)

    def stats(self) -> dict[str, int]:
        """What the engine is doing now: rows decoding, rows paused (their readers are behind), jobs
        waiting, tokens generated so far, and the bytes of the batch's KV cache."""
        decoder = self._decoder
        cache = getattr(decoder, "cache", None)
        kv = 0 if cache is None else 2 * cache.keys.numel() * cache.keys.element_size()
        return {
            "rows": sum(not s.done for s in self._slots),
            "paused": len(self._parked),
            "waiting": len(self._waiting),
            "tokens": self.tokens,
            "kv_bytes": kv,
        }

    def _wake(self) -> None:
        self._inbox.put(None)

    # -- the engine thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self._take(block=not self._slots and not self._waiting and not self._resumable())
                    if self._stopping.is_set():
                        break
                    self._admit()
                    if self._slots:
                        self._decode_step()
                except Exception as exc:  # a bug outside any one job's work: fail what runs, serve on
                    self._fail_all(_reason(exc))
        self._fail_all(SHUTTING_DOWN)
        while True:  # jobs submitted while stopping
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._send(job, Failed(SHUTTING_DOWN))

    def _take(self, block: bool) -> None:
        """Move newly submitted jobs into the waiting line; wait for one when there is nothing to do."""
        item = self._inbox.get() if block else None
        while True:
            if item is not None:
                self._waiting.append(item)
                self._jobs[item] = None
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _send(self, job: Job, event: Event) -> None:
        if isinstance(event, (Done, Failed)):
            self._jobs.pop(job, None)
        if job.cancelled and not isinstance(event, Failed):
            return
        try:
            job.sink(event)
        except Exception:  # whoever listened is gone (a closed event loop, say): stop the job
            job.cancelled = True

    def _fail_job(self, job: Job, exc: BaseException) -> None:
        """This job alone failed (its prefill, scoring or a row's token): tell it why, let its rows go at
        the next step (as a cancel's do), and leave the other jobs alone."""
        if job in self._waiting:
            self._waiting.remove(job)
        job._prefilled.clear()
        job._prefilling = None
        if not job.cancelled:
            self._send(job, Failed(_reason(exc)))
        job.cancelled = True
        self._jobs.pop(job, None)

    def _fail_running(self, exc: BaseException) -> None:
        """The batch's step raised: fail the jobs with rows in it; waiting and parked jobs go on."""
        for job in dict.fromkeys(s.job for s in self._slots):
            self._fail_job(job, exc)
        self._slots, self._decoder, self._logits = [], None, None

    def _fail_all(self, message: str) -> None:
        """Tell every job not over yet that it failed, and start again with an empty batch."""
        jobs = list(self._jobs)
        self._slots, self._decoder, self._logits = [], None, None
        self._parked.clear()
        self._waiting.clear()
        self._jobs.clear()
        for job in jobs:
            if not job.cancelled:
                self._send(job, Failed(message))
            job.cancelled = True

    # Admission: waiting jobs' rows join the batch -----------------------------------------------------

    def _admit(self) -> None:
        """Bring rows of waiting jobs into the batch, as many as fit, first come first served."""
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
        for job in [j for j in self._jobs if j.cancelled]:  # their rows leave at the next step
            del self._jobs[job]
        joining = self._unpark()
        if not self._waiting and not joining:
            return
        if self.lm.runtime == "transformers":
            self._admit_one_job()
            return
        # First come first served, except that one chunk of a long prompt is prefilled per step: the
        # jobs behind it whose prompts go in whole are not kept waiting by it.
        chunked = False
        for job in list(self._waiting):
            if self._guarded(job, self._ends_before_decoding) is not False:  # it left (or failed)
                continue
            full, chunked = self._admit_rows(job, joining, chunked)
            if job._next == job.rows and job in self._waiting:
                job._prefilled.clear()
                self._waiting.remove(job)
            if full:
                break
        if joining:
            self._merge(joining)

    def _admit_rows(
        self, job: Job, joining: list[tuple[_Slot, Any, torch.Tensor]], chunked: bool
    ) -> tuple[bool, bool]:
        """Bring the job's rows into `joining` while there is room; returns (whether the batch is full or
        its KV budget spent, whether a chunk of a long prompt went in at this step)."""
        while job._next < job.rows and not job.cancelled:
            if len(self._slots) + len(joining) >= self.max_rows:
                return True, chunked
            if self._in_chunks(job):
                if chunked:
                    return False, chunked
                chunked = True
            made = self._guarded(job, self._new_row)
            if made is None:  # it failed, or a chunk of its prompt went in and the batch decodes first
                return False, chunked
            slot, cache, logits = made
            if self._slots or joining:
                rows = [*self._slots, *(s for s, _, _ in joining), slot]
                if self._kv_bytes(rows) > KV_BUDGET:
                    job._next -= 1  # not now: it waits for rows to leave
                    return True, chunked
            joining.append((slot, cache, logits))
            job._running += 1
        return False, chunked

    def _in_chunks(self, job: Job) -> bool:
        """Whether the job's next row needs a prompt prefilled in chunks (not done yet)."""
        index = job._next // job.settings.num_samples
        chunk = self.prefill_chunk
        return index not in job._prefilled and chunk is not None and len(job.prompt_ids[index]) > chunk

    def _guarded(self, job: Job, work: Callable[[Job], _T]) -> _T | None:
        """`work(job)`, or None when it raised: then this job alone fails and the others go on."""
        try:
            return work(job)
        except Exception as exc:
            self._fail_job(job, exc)
            return None

    def _resumable(self) -> bool:
        return any(not slot.job.paused or slot.job.cancelled for slot, _, _ in self._parked)

    def _unpark(self) -> list[tuple[_Slot, Any, torch.Tensor]]:
        """The parked rows whose jobs go on again (and room in the batch): they join as new rows do,
        with the cache and logits they left with. Rows of cancelled jobs are let go."""
        joining: list[tuple[_Slot, Any, torch.Tensor]] = []
        parked: list[tuple[_Slot, Any, torch.Tensor]] = []
        for slot, cache, logits in self._parked:
            if slot.job.cancelled:
                continue
            if slot.job.paused or len(self._slots) + len(joining) >= self.max_rows:
                parked.append((slot, cache, logits))
            else:
                joining.append((slot, cache, logits))
        self._parked = parked
        return joining

    def _park_paused(self) -> None:
        """Rows of paused jobs leave the batch with a copy of their cache and logits (gptcli's GPT-2
        only: transformers' caches cannot be split by row, so there a paused job's rows go on)."""
        import torch

        from gptcli.gpt2 import KVCache

        if self.lm.runtime != "gptcli" or self._decoder is None or self._logits is None:
            return
        net = self.lm.net
        assert net is not None
        leaving = [i for i, s in enumerate(self._slots) if s.job.paused and not (s.done or s.job.cancelled)]
        if not leaving:
            return
        for i in leaving:
            slot = self._slots[i]
            row = [(self._decoder.cache, i, slot.position)]
            cache = KVCache.gather(net.config, row, slot.position)
            self._parked.append((slot, cache, self._logits[i : i + 1].clone()))
        keep = [i for i in range(len(self._slots)) if i not in set(leaving)]
        self._slots = [self._slots[i] for i in keep]
        if not keep:
            self._decoder = self._logits = None
            return
        index = torch.tensor(keep, device=self.lm.device)
        self._decoder.keep(index)
        self._logits = self._logits[index]

    def _new_row(self, job: Job) -> tuple[_Slot, Any, torch.Tensor] | None:
        """The job's next row, with its prompt prefilled alone (once for all samples of the prompt).
        None while a long prompt is prefilled in chunks: one more chunk went in, the row is not ready."""
        index, sample = divmod(job._next, job.settings.num_samples)
        if index not in job._prefilled and not self._prefill(job, index):
            return None
        job._next += 1
        cache, logits = job._prefilled[index]
        return self._slot(job, index, sample, logits.shape[-1]), cache, logits

    def _prefill(self, job: Job, index: int) -> bool:
        """Prefill prompt `index` of the job, or its next chunk when it is longer than prefill_chunk;
        True once the whole prompt is in (its cache and last logits then in job._prefilled)."""
        import torch

        from gptcli.gpt2 import CachedDecoder

        ids = list(job.prompt_ids[index])
        if job._prefilling is None:
            job._prefilled.clear()  # rows are prompt-major: the previous prompt is done with
            job._prefilling = (CachedDecoder(self.lm.net, 1, len(ids)), 0)  # type: ignore[arg-type]
        decoder, fed = job._prefilling
        end = len(ids) if self.prefill_chunk is None else min(len(ids), fed + self.prefill_chunk)
        input_ids = torch.tensor([ids[fed:end]], device=self.lm.device)
        positions = torch.arange(fed, end, device=self.lm.device)[None]
        # As `complete` prefills one prompt: no padding, no mask; SDPA's causal path for the first
        # chunk, a causal mask offset by the cached columns for the next ones.
        logits = decoder.prefill(input_ids, None, positions)
        if end < len(ids):
            job._prefilling = (decoder, end)
            self.chunks += 1
            return False
        if fed:
            self.chunks += 1
        job._prefilling = None
        job._prefilled[index] = (decoder.cache, logits)
        return True

    def _slot(self, job: Job, index: int, sample: int, vocab: int) -> _Slot:

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
        slot = _Slot(job, row, position=len(ids))
        if settings.sampling:
            slot.generator = generator(self.lm.device, row.seed)
        seen, counts = penalty_state(settings, [ids], vocab, self.lm.device)
        slot.seen = None if seen is None else seen[0]
        slot.counts = None if counts is None else counts[0]
        return slot

    def _kv_bytes(self, slots: list[_Slot]) -> int:
        """Bytes of the KV cache a batch of these rows takes until its longest row is done."""
        slots = [s for s in slots if not s.done]  # rows that are done leave when the others join
        return kv_bytes(self.lm, len(slots), self._columns(slots))

    def _columns(self, slots: list[_Slot]) -> int:
        """Columns a right-aligned cache of these rows needs: the longest row now, plus the most steps
        any of them may still take."""
        width = max(s.position for s in slots)
        more = max(
            (s.job.settings.max_new_tokens - len(s.row.token_ids) for s in slots if not s.done), default=0
        )
        return width + max(0, min(more, self.lm.context_length))

    def _merge(self, joining: list[tuple[_Slot, Any, torch.Tensor]]) -> None:
        """One batch of the running rows that are not done and the joining ones, in one new cache."""
        import torch

        from gptcli.gpt2 import CachedDecoder, KVCache

        net = self.lm.net
        assert net is not None
        kept = [i for i, s in enumerate(self._slots) if not s.done] if self._decoder is not None else []
        parts = [(self._decoder.cache, i, self._slots[i].position) for i in kept]
        parts += [(cache, 0, slot.position) for slot, cache, _ in joining]
        slots = [self._slots[i] for i in kept] + [slot for slot, _, _ in joining]
        cache = KVCache.gather(net.config, parts, self._columns(slots))
        logits = [self._logits[kept]] if kept and self._logits is not None else []
        logits += [row_logits for _, _, row_logits in joining]
        self._decoder = CachedDecoder(net, 0, 0, cache=cache)
        self._logits = torch.cat(logits)
        self._slots = slots
        self.peak_rows = max(self.peak_rows, len(slots))

    def _admit_one_job(self) -> None:
        """transformers' models: the next job's rows decode as one batch once the batch is empty."""
        if self._slots:
            return
        job = self._waiting[0]
        try:
            if not self._ends_before_decoding(job):
                self._start_one_job(job)
        except Exception as exc:  # this job cannot be run: it fails alone
            self._slots, self._decoder, self._logits = [], None, None
            self._fail_job(job, exc)

    def _start_one_job(self, job: Job) -> None:
        """Prefill the job's rows (as many as max_rows) together, left-padded, in a fresh decoder."""
        take = min(self.max_rows, job.rows - job._next)
        slots = []
        for _ in range(take):
            index, sample = divmod(job._next, job.settings.num_samples)
            job._next += 1
            slots.append(self._slot(job, index, sample, self.lm.config.vocab_size))
        job._running += take
        if job._next == job.rows:
            self._waiting.popleft()
        lengths = [s.position for s in slots]
        input_ids, mask, positions = left_pad([s.row.prompt_ids for s in slots], self._pad, self.lm.device)
        most = max(s.job.settings.max_new_tokens for s in slots)
        self._decoder = open_decoder(
            self.lm, len(slots), input_ids.shape[1] + min(most, self.lm.context_length)
        )
        self._logits = self._decoder.prefill(
            input_ids, mask if min(lengths) < max(lengths) else None, positions
        )
        self._slots = slots
        self.peak_rows = max(self.peak_rows, len(slots))

    def _ends_before_decoding(self, job: Job) -> bool:
        """Score a waiting job's prompts (once); if it generates nothing, or was cancelled
        meanwhile, it leaves the queue here (with Done when it was not cancelled): True."""
        self._score_prompts(job)
        if job.generate and not job.cancelled:
            return False
        self._waiting.remove(job)
        if not job.cancelled:
            self._send(job, Done())
        return True

    def _score_prompts(self, job: Job) -> None:
        """PromptLogprobs of every prompt of the job (once): one forward pass over each whole prompt."""
        import torch

        if job.prompt_logprobs is None or job._scored:
            return
        job._scored = True
        k = job.prompt_logprobs
        for index, ids in enumerate(job.prompt_ids):
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
                entries.append(logprob_entry(self._names, token, chosen[j], alternatives))
            self._send(job, PromptLogprobs(index, entries))

    # One step: pick every row's token, send events, drop rows that are done, run the model ------------

    def _decode_step(self) -> None:
        for slot in self._slots:
            if slot.job.cancelled and not slot.done:
                slot.done = True
        self._park_paused()
        if not self._slots:
            return
        tokens = self._pick_all()
        now = time.perf_counter()
        context = self.lm.context_length
        for slot, token in zip(self._slots, tokens, strict=True):
            if not (slot.done or slot.job.cancelled):
                try:
                    self._take_token(slot, token, context, now)
                except Exception as exc:  # this row's processing failed: its job alone fails
                    self._fail_job(slot.job, exc)
        for slot in self._slots:
            slot.done = slot.done or slot.job.cancelled
        tokens = self._drop_done(tokens)
        if not self._slots:
            self._decoder = self._logits = None
            return
        try:
            self._step(tokens)
        except Exception as exc:  # the batch's step raised: its jobs fail, the waiting ones go on
            self._fail_running(exc)

    def _take_token(self, slot: _Slot, token: int, context: int, now: float) -> None:
        """Take the row's new token: penalties' state, its text, its events, and its end if it ends."""
        job, row = slot.job, slot.row
        if self._fault is not None and not row.token_ids and self._fault in row.prompt:
            raise RuntimeError(f"injected fault ({FAULT_ENV}) in the row of prompt {row.index}")
        self.tokens += 1
        if slot.seen is not None:
            slot.seen[token] = True
        if slot.counts is not None:
            slot.counts[token] += 1
        eos = set() if job.settings.ignore_eos else self._eos
        max_new = job.settings.max_new_tokens
        text = take(row, token, eos=eos, max_new_tokens=max_new, context=context, now=now)
        logprob = row.logprobs[-1] if row.logprobs else None
        self._send(job, Token(row.index, row.sample, token, text, logprob))
        if row.finish_reason is not None:
            slot.done = True
            job._running -= 1
            self._send(job, finish(self.lm.tokenizer, row, job.settings, job.submitted))
            if job._running == 0 and job._next == job.rows:
                self._send(job, Done())

    def _step(self, tokens: list[int]) -> None:
        """Run the model on every row's new token: the logits of the next pick."""
        import torch

        assert self._decoder is not None
        context = self.lm.context_length
        next_ids = torch.tensor(
            [self._pad if s.done else t for s, t in zip(self._slots, tokens, strict=True)],
            device=self.lm.device,
        )
        positions = torch.tensor([min(s.position, context - 1) for s in self._slots], device=self.lm.device)
        # One row alone decodes on the threads measured fastest for it, as `complete` does.
        with torch_threads(self.lm.decode_threads() if len(self._slots) == 1 else None):
            self._logits = self._decoder.step(next_ids[:, None], positions[:, None])
        for slot in self._slots:
            slot.position += 1
        self.steps += 1

    def _pick_all(self) -> list[int]:
        """Every row's next token (pad for rows that are done): rows with the same way of drawing are
        drawn together, each with its own generator, by decoding.pick."""
        import torch

        assert self._logits is not None
        tokens = [self._pad] * len(self._slots)
        groups: dict[tuple[Settings, Any], list[int]] = {}
        for i, slot in enumerate(self._slots):
            if not slot.done:
                bias = tuple(sorted(slot.job.logit_bias.items())) if slot.job.logit_bias else None
                groups.setdefault((_how_drawn(slot.job.settings), bias), []).append(i)
        for (settings, bias), rows in groups.items():
            whole = len(rows) == len(self._slots)
            index = torch.tensor(rows, device=self._logits.device)
            logits = self._logits if whole else self._logits[index]
            if bias is not None:  # OpenAI's: added before drawing, so the logprobs are of the biased logits
                ids, values = zip(*bias, strict=True)
                logits = logits.clone()
                logits[:, list(ids)] += torch.tensor(values, dtype=logits.dtype, device=logits.device)
            seen = counts = None
            if settings.repetition_penalty != 1.0:
                seen = torch.stack([self._slots[i].seen for i in rows])  # type: ignore[misc]
            if settings.presence_penalty or settings.frequency_penalty:
                counts = torch.stack([self._slots[i].counts for i in rows])  # type: ignore[misc]
            # (every sampled row has its generator)
            generators = [g for i in rows if (g := self._slots[i].generator) is not None]
            picked, chosen, top = pick(
                logits, settings, seen, generators, [True] * len(rows), self._pad, counts
            )
            for j, (i, token) in enumerate(zip(rows, picked.tolist(), strict=True)):
                tokens[i] = token
                row = self._slots[i].row
                if row.logprobs is not None and chosen is not None:
                    row.logprobs.append(logprob_entry(self._names, token, chosen[j], top[j] if top else []))
        return tokens

    def _drop_done(self, tokens: list[int]) -> list[int]:
        """Let rows that are done leave the batch; returns the tokens of the rows that stay. Dropping
        copies the cache, so not at every finish: once half the batch is done, when others wait to
        join, or when a job was cancelled (its row is freed at once). Until then a finished row steps
        with the pad token, as in generate."""
        done = [s.done for s in self._slots]
        if not any(done):
            return tokens
        cancelled = any(s.job.cancelled for s in self._slots)
        if 2 * sum(done) >= len(done) or cancelled or self._waiting or not self._inbox.empty():
            import torch

            keep = [i for i, d in enumerate(done) if not d]
            if keep and self._decoder is not None:
                self._decoder.keep(torch.tensor(keep, device=self.lm.device))
            self._slots = [self._slots[i] for i in keep]
            tokens = [tokens[i] for i in keep]
        return tokens


def _reason(exc: BaseException) -> str:
    return f"generation failed: {first_line(exc)}"


def _how_drawn(settings: Settings) -> Settings:
    """The settings with only what picking a token depends on: rows that agree on it draw together."""
    return dataclasses.replace(
        settings, max_new_tokens=1, seed=None, stop=(), ignore_eos=False, num_samples=1, sources={}
    )
