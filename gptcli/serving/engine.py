"""Continuous batching: many requests share one decode loop, joining and leaving it step by step.

Callers `submit` a `Job` (prompts already tokenized, decoding `Settings`, and a `sink` that receives
the job's events) from any thread, and may `cancel`, `pause` or `resume` it. Two parts run it:

- the scheduler (`Engine`, here): the request states (each Job's rows admitted, running, done), the
  waiting line and admission (first come first served, as many rows as --max-batch and the KV budget
  allow), the events each job is sent, and failures;
- the runner (gptcli.serving.runner.Runner): the model, the batch's KV cache and its rows; it prefills
  a prompt (or a chunk of one), merges rows into the batch, parks paused ones, picks every row's token
  and runs one step.

Threads. The engine thread (`Engine._run`) owns the waiting line, the request states and the whole
runner: every model call and every tensor of the batch are touched by it alone, so nothing takes a
lock. Any other thread may only call `submit` (which puts the job into the inbox, a thread-safe
queue), `stop`, `waiting`/`stats` (snapshots), and a job's `cancel`/`pause`/`resume`, which set a flag
that the engine thread reads at its next step. Sinks are called on the engine thread and must not
block: the server's put each event on its event loop's queue, and JSON, SSE and the response bodies
are made there, on the event loop, off the model's thread. Detokenizing and stop texts stay here
(decoding.take, about 6 µs a token: docs/serve.md), since a stop text ends its row at that step.

One step of the loop: take in the jobs that arrived; admit waiting rows (a prompt longer than
`prefill_chunk` tokens goes in one chunk per step, so the running rows still decode one token between
two chunks, and short prompts behind it join without waiting for it: vLLM's chunked prefill, one row
at a time); pick and take every running row's token and send its events; drop rows that are done;
run the model once on the batch. A joining row computes what it computes alone (its cache is gathered
right-aligned, left padding masked, positions counted per row) and a seeded row draws from its own
generator, so every answer equals `gptcli complete`'s. Rows, picking and taking tokens, stop texts, the
UTF-8-safe text, the finished Completion and the KV budget are gptcli.generation.decoding's.

Failures stay with their job: a job whose prompt scoring, prefill or token taking raises gets a Failed
event with the reason (the server answers 500) and leaves; the others, running or waiting, go on. An
error in the batch's own step fails the jobs with rows in it, never the waiting or paused ones.

Models that gptcli.gpt2 does not run (lm.runtime "transformers": their DynamicCache) decode one job at
a time: a job waits until the batch is empty, then its rows decode together as in `generate.stream`
(docs/serve.md says why, with figures).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from gptcli.errors import GptcliError, UsageError, first_line
from gptcli.generation.decoding import KV_BUDGET, Completion, eos_ids, finish, seed_for, take
from gptcli.generation.sampling import Settings
from gptcli.gpt2 import BATCHED_ROWS
from gptcli.serving import PREFILL_CHUNK
from gptcli.serving.runner import Joining, Runner, Slot

if TYPE_CHECKING:
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
# decoding and short prompts behind it join. Smaller chunks cut the wait between two tokens but run the
# weights once more per chunk; docs/serve.md has the figures of benchmarks/bench_serve.py.

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
    # The engine thread's bookkeeping (the scheduler's and the runner's; no other thread reads it):
    next_row: int = field(default=0, repr=False)  # the next row (prompt-major) not yet in the batch
    prefilled: dict[int, Any] = field(default_factory=dict, repr=False)  # prompt -> (cache, logits)
    prefilling: Any = field(default=None, repr=False)  # (decoder, tokens fed) of a prompt in chunks
    _running: int = 0  # rows in the batch
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


def check_max_batch(max_rows: int) -> None:
    """Refuse a --max-batch (the engine's `max_rows`) below 1: a usage error wherever it comes from."""
    if max_rows < 1:
        raise UsageError(f"--max-batch must be at least 1 (got {max_rows})")


class Engine:
    """The scheduler of the model's one decode loop, shared by every job: start(), submit() jobs, stop()."""

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
        self.kv_budget = KV_BUDGET  # most bytes the batch's KV cache may take
        self._fault = os.environ.get(FAULT_ENV) or None
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gptcli-engine", daemon=True)
        self._eos = eos_ids(lm)
        # The engine thread's alone:
        self._waiting: deque[Job] = deque()
        self._jobs: dict[Job, None] = {}  # every job taken in and not over: what a failure must tell
        self.runner = Runner(lm, prefill_chunk)
        if max_rows >= BATCHED_ROWS:
            # A server's steps are batched whenever requests overlap: oneDNN-packed weights run them
            # faster, for a second at start and a second copy of the matmul weights (docs/performance.md).
            lm.pack_for_batches()
        self.tokens = 0  # tokens generated, all jobs together

    @property
    def steps(self) -> int:
        """Decoding steps run (for tests and benchmarks)."""
        return self.runner.steps

    @property
    def peak_rows(self) -> int:
        """Most rows decoded together."""
        return self.runner.peak_rows

    @property
    def chunks(self) -> int:
        """Prefill chunks run (prompts longer than prefill_chunk)."""
        return self.runner.chunks

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
        waiting, tokens generated so far, and the bytes of the batch's KV cache (a snapshot)."""
        runner = self.runner
        return {
            "rows": sum(not s.done for s in runner.slots),
            "paused": len(runner.parked),
            "waiting": len(self._waiting),
            "tokens": self.tokens,
            "kv_bytes": runner.kv_bytes_now(),
        }

    def _wake(self) -> None:
        self._inbox.put(None)

    # -- the engine thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    idle = not self.runner.slots and not self._waiting and not self.runner.resumable()
                    self._take(block=idle)
                    if self._stopping.is_set():
                        break
                    self._admit()
                    if self.runner.slots:
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

    # Failures ------------------------------------------------------------------------------------------

    def _fail_job(self, job: Job, exc: BaseException) -> None:
        """This job alone failed (its scoring, prefill or a row's token): tell it why, let its rows go
        at the next step (as a cancel's do), and leave the other jobs alone."""
        if job in self._waiting:
            self._waiting.remove(job)
        job.prefilled.clear()
        job.prefilling = None
        if not job.cancelled:
            self._send(job, Failed(_reason(exc)))
        job.cancelled = True
        self._jobs.pop(job, None)

    def _fail_running(self, exc: BaseException) -> None:
        """The batch's step raised: fail the jobs with rows in it; waiting and parked jobs go on."""
        for job in dict.fromkeys(s.job for s in self.runner.slots):
            self._fail_job(job, exc)
        self.runner.clear()

    def _fail_all(self, message: str) -> None:
        """Tell every job not over yet that it failed, and start again with an empty batch."""
        jobs = list(self._jobs)
        self.runner.clear()
        self.runner.parked.clear()
        self._waiting.clear()
        self._jobs.clear()
        for job in jobs:
            if not job.cancelled:
                self._send(job, Failed(message))
            job.cancelled = True

    def _guarded(self, job: Job, work: Callable[[Job], _T]) -> _T | None:
        """`work(job)`, or None when it raised: then this job alone fails and the others go on."""
        try:
            return work(job)
        except Exception as exc:
            self._fail_job(job, exc)
            return None

    # Admission: waiting jobs' rows join the batch -----------------------------------------------------

    def _admit(self) -> None:
        """Bring rows of waiting jobs into the batch, as many as fit, first come first served."""
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
        for job in [j for j in self._jobs if j.cancelled]:  # their rows leave at the next step
            del self._jobs[job]
        joining = self.runner.unpark(self.max_rows)
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
            if job.next_row == job.rows and job in self._waiting:
                job.prefilled.clear()
                self._waiting.remove(job)
            if full:
                break
        if joining:
            self.runner.merge(joining)

    def _admit_rows(self, job: Job, joining: list[Joining], chunked: bool) -> tuple[bool, bool]:
        """Bring the job's rows into `joining` while there is room; returns (whether the batch is full or
        its KV budget spent, whether a chunk of a long prompt went in at this step)."""
        runner = self.runner
        while job.next_row < job.rows and not job.cancelled:
            if len(runner.slots) + len(joining) >= self.max_rows:
                return True, chunked
            if runner.in_chunks(job):
                if chunked:
                    return False, chunked
                chunked = True
            made = self._guarded(job, runner.new_row)
            if made is None:  # it failed, or a chunk of its prompt went in and the batch decodes first
                return False, chunked
            slot, cache, logits = made
            if runner.slots or joining:
                rows = [*runner.slots, *(s for s, _, _ in joining), slot]
                if runner.kv_bytes(rows) > KV_BUDGET:
                    job.next_row -= 1  # not now: it waits for rows to leave
                    return True, chunked
            joining.append((slot, cache, logits))
            job._running += 1
        return False, chunked

    def _admit_one_job(self) -> None:
        """transformers' models: the next job's rows decode as one batch once the batch is empty."""
        if self.runner.slots:
            return
        job = self._waiting[0]
        try:
            if not self._ends_before_decoding(job):
                self._start_one_job(job)
        except Exception as exc:  # this job cannot be run: it fails alone
            self.runner.clear()
            self._fail_job(job, exc)

    def _start_one_job(self, job: Job) -> None:
        """As many of the job's rows as max_rows, prefilled together (left-padded) as the batch."""
        take = min(self.max_rows, job.rows - job.next_row)
        slots: list[Slot] = []
        for _ in range(take):
            index, sample = divmod(job.next_row, job.settings.num_samples)
            job.next_row += 1
            slots.append(self.runner.slot(job, index, sample, self.lm.config.vocab_size))
        job._running += take
        if job.next_row == job.rows:
            self._waiting.popleft()
        self.runner.start_together(slots)

    def _ends_before_decoding(self, job: Job) -> bool:
        """Score a waiting job's prompts (once); if it generates nothing, or was cancelled meanwhile, it
        leaves the queue here (with Done when it was not cancelled): True."""
        if job.prompt_logprobs is not None and not job._scored:
            job._scored = True
            for index, ids in enumerate(job.prompt_ids):
                self._send(job, PromptLogprobs(index, self.runner.score(list(ids), job.prompt_logprobs)))
        if job.generate and not job.cancelled:
            return False
        self._waiting.remove(job)
        if not job.cancelled:
            self._send(job, Done())
        return True

    # One step: pick every row's token, send events, drop rows that are done, run the model ------------

    def _decode_step(self) -> None:
        runner = self.runner
        for slot in runner.slots:
            if slot.job.cancelled and not slot.done:
                slot.done = True
        runner.park_paused()
        if not runner.slots:
            return
        tokens = runner.pick_all()
        now = time.perf_counter()
        for slot, token in zip(runner.slots, tokens, strict=True):
            if not (slot.done or slot.job.cancelled):
                try:
                    self._take_token(slot, token, now)
                except Exception as exc:  # this row's processing failed: its job alone fails
                    self._fail_job(slot.job, exc)
        for slot in runner.slots:
            slot.done = slot.done or slot.job.cancelled
        tokens = runner.drop_done(tokens, bool(self._waiting) or not self._inbox.empty())
        if not runner.slots:
            return
        try:
            runner.step(tokens)
        except Exception as exc:  # the batch's step raised: its jobs fail, the waiting ones go on
            self._fail_running(exc)

    def _take_token(self, slot: Slot, token: int, now: float) -> None:
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
        max_new, context = job.settings.max_new_tokens, self.lm.context_length
        text = take(row, token, eos=eos, max_new_tokens=max_new, context=context, now=now)
        logprob = row.logprobs[-1] if row.logprobs else None
        self._send(job, Token(row.index, row.sample, token, text, logprob))
        if row.finish_reason is not None:
            slot.done = True
            job._running -= 1
            self._send(job, finish(self.lm.tokenizer, row, job.settings, job.submitted))
            if job._running == 0 and job.next_row == job.rows:
                self._send(job, Done())


def _reason(exc: BaseException) -> str:
    return f"generation failed: {first_line(exc)}"
