"""Fine-tune (or train from scratch) a causal LM: one training loop, top to bottom.

The shape is nanoGPT's train.py, as functions: DDP when torchrun starts us, rank 0 alone logs and writes,
gradient accumulation without needless all-reduces (no_sync), autocast that is off in fp32, a GradScaler
only for fp16, a validation loss under torch.no_grad(), and a checkpoint with everything needed to
continue the run as if it had never stopped (model, optimizer, scaler, step, RNG states, data position).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from gptcli import __version__
from gptcli.errors import GptcliError, UsageError, first_line
from gptcli.training import distributed
from gptcli.training.checkpoint import (
    MetricsLog,
    RunLock,
    all_finite,
    check_out_dir,
    claim_out_dir,
    export_model,
    load_checkpoint,
    load_trainable_state,
    non_finite_message,
    plot_losses,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trainable_state,
    undo_claim,
)
from gptcli.training.config import TrainConfig
from gptcli.training.data import IGNORE, Batch, check_inputs, shard_start
from gptcli.training.distributed import Dist, StopRequest
from gptcli.training.setup import (
    Rows,
    TrainData,
    build_model,
    load_data,
    model_flops_per_token,
    peak_flops,
    precision_note,
    resolve_precision,
)


@dataclass
class TrainEvent:
    """What the loop reports, on rank 0 only.

    kind: "status" (what is being set up, in `message`),
    "start" (metrics: parameters, train_tokens, val_tokens, global_batch, block_size, ...),
    "log" (step, loss, lr, tokens, tokens_per_second, eta_seconds, and val_loss / mfu when known),
    "save" (a checkpoint was written), "note" (a remark in `message`), "end".
    """

    kind: str
    step: int
    total_steps: int
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""


@dataclass
class TrainResult:
    """How a run ended."""

    out_dir: Path
    step: int
    total_steps: int
    tokens: int
    loss: float | None
    val_loss: float | None
    seconds: float
    interrupted: bool
    main: bool = True
    """Whether this process is rank 0, the one that reports (False on the other torchrun ranks)."""
    start_step: int = 0
    """The step this run started from (a resumed run's checkpoint step): `seconds` are this run's."""
    stopped_early: bool = False
    """--patience evaluations in a row found no better validation loss."""
    best_val: float | None = None
    best_step: int | None = None
    save_best: bool = False
    patience: int | None = None


EventHandler = Callable[[TrainEvent], None]


@dataclass
class Position:
    """Where a run is: what a checkpoint records besides the weights, and a resume restores."""

    step: int = 0
    samples_seen: int = 0
    """The data position: the batch order is a function of it."""
    tokens_seen: int = 0
    pending_loss: float = 0.0
    """The loss summed since the last logged step, so the first mean logged after a resume is the same."""
    pending_steps: int = 0
    best_val: float | None = None
    """The lowest validation loss so far (step 0's, the baseline, included), and its step."""
    best_step: int | None = None
    bad_evals: int = 0
    """Evaluations since the best one: --patience stops the run when it reaches it."""


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps, and the learning rate at each: linear warm-up, then cosine decay."""

    total_steps: int
    warmup: int
    lr: float
    min_lr: float

    @classmethod
    def for_run(cls, cfg: TrainConfig, blocks: int, global_batch: int) -> Schedule:
        total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * blocks / global_batch))
        warmup = min(total // 20, 1000) if cfg.warmup is None else cfg.warmup
        return cls(total, warmup, cfg.lr, cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr)

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.lr, self.min_lr, self.warmup, self.total_steps)


class Reporter:
    """Sends TrainEvents to the handler (rank 0's; None on the other ranks)."""

    def __init__(self, on_event: EventHandler | None) -> None:
        self.on_event = on_event

    def __call__(
        self,
        kind: str,
        step: int = 0,
        total: int = 0,
        metrics: dict[str, Any] | None = None,
        message: str = "",
    ) -> None:
        if self.on_event is not None:
            self.on_event(TrainEvent(kind, step, total, metrics or {}, message))


def train(config: TrainConfig, on_event: EventHandler | None = None) -> TrainResult:
    """Train as `config` says; report progress through `on_event`; return how it ended.

    Under torchrun every process calls this; only rank 0 calls `on_event` and writes files.
    Raises GptcliError for what the user can fix (bad data, foreign out_dir, a loss that became NaN).
    """
    config.check()
    check_inputs(config.data + config.val)  # before anything is created
    ddp = distributed.setup(config.device)
    out = Path(config.out_dir).expanduser()
    before = set(os.listdir(out)) if out.is_dir() else None
    lock = RunLock(out)  # taken by rank 0, which alone writes
    try:
        return _train(config, ddp, lock, Reporter(on_event if ddp.is_main else None))
    except BaseException:
        if lock.held:  # only what this run created, and only while no other run can be writing
            undo_claim(out, before)
        raise
    finally:
        lock.release()
        ddp.close()


@dataclass
class Run:
    """What the loop works with: the model as saved (`model`) and as it runs (`net`: compiled, wrapped
    for DDP), the optimizer, the data, and where the run is (`at`)."""

    cfg: TrainConfig
    ddp: Dist
    report: Reporter
    out: Path
    tokenizer: Any
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Schedule
    data: TrainData
    val: Rows | None
    autocast: AbstractContextManager[Any]
    no_sync: Callable[[], AbstractContextManager[Any]]
    metrics: MetricsLog | None
    at: Position
    flops_per_token: float
    peak: float | None
    last_saved: int | None = None
    last_loss: float | None = None
    last_val: float | None = None

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.ddp.world


def _train(cfg: TrainConfig, ddp: Dist, lock: RunLock, report: Reporter) -> TrainResult:
    started = time.perf_counter()
    run = _prepare(cfg, ddp, lock, report)
    at, total_steps = run.at, run.schedule.total_steps
    first_step = at.step
    if run.val is not None and at.step == 0 and at.best_val is None:
        val_loss = evaluate(run)  # the baseline: what training has to beat
        if run.metrics is not None:
            run.metrics.write({"step": 0, "tokens": 0, "val_loss": val_loss})
        report("note", 0, total_steps, message=f"validation loss before training: {val_loss:.4f}")

    # The loop. Tensors stay on the device between log steps: no .item() (a GPU sync) until then.
    loss_sum = torch.tensor(at.pending_loss, device=ddp.device)
    interval = Interval(at.pending_steps, 0, time.perf_counter())
    with StopRequest(under_torchrun=ddp.enabled) as stop:
        while at.step < total_steps and not out_of_patience(run):
            lr = run.schedule.lr_at(at.step)
            loss_sum += train_step(run, lr)
            interval.steps += 1
            interval.timed += 1

            done = at.step == total_steps
            evaluate_now = run.val is not None and (at.step % cfg.eval_every == 0 or done)
            save = at.step % cfg.save_every == 0 or done
            stopping = ddp.any(stop.requested)
            # A stopped run logs its last step, so the loss it reports is that step's.
            log = at.step % cfg.log_every == 0 or evaluate_now or done or stopping
            if not (log or save or stopping):
                continue
            mean_loss = ddp.mean(loss_sum).item() / interval.steps
            if not math.isfinite(mean_loss):
                what = "infinite" if math.isinf(mean_loss) else "NaN"
                raise GptcliError(
                    non_finite_message(f"the training loss became {what}", at.step, run.last_saved, run.out)
                )
            if log:
                log_step(run, mean_loss, lr, interval, evaluate_now)
                loss_sum.zero_()
                interval.steps = 0
            if save or stopping or out_of_patience(run):
                at.pending_loss, at.pending_steps = ddp.mean(loss_sum).item(), interval.steps
                save_state(run)
            if stopping:
                break
            interval.start = time.perf_counter()  # evaluation and saving are not training speed
            interval.timed = 0
    return _finish(run, started, first_step)


@dataclass
class Interval:
    """The steps since the last logged one (`timed`: those this run timed since `start`; a resumed
    run's pending steps were timed by the run before)."""

    steps: int
    timed: int
    start: float


def _prepare(cfg: TrainConfig, ddp: Dist, lock: RunLock, report: Reporter) -> Run:
    """The output folder claimed, the model, data, optimizer and schedule ready, a checkpoint restored:
    everything up to the first step, reported as "status", "start" and "note" events."""
    device = ddp.device
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever autocast leaves in fp32

    # The output folder, the model and the data.
    out = Path(cfg.out_dir).expanduser()
    about = {"version": __version__, "config": cfg.to_dict()}
    # Refuse a folder we may not write into before the model loads; claim it, under a lock, after.
    ddp.on_main(lambda: check_out_dir(out, resume=cfg.resume, overwrite=cfg.overwrite))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    report("status", message="building a new model" if cfg.from_scratch else "loading the model")
    tokenizer, model, notice = build_model(cfg)
    resume_from = ddp.on_main(
        lambda: claim_out_dir(out, lock, resume=cfg.resume, overwrite=cfg.overwrite, describe=about)
    )
    report("status", message="reading the data (tokenized once, then cached)")
    train_data, val_data, notes = load_data(cfg, ddp, tokenizer, model.config, out)
    if val_data is None and (cfg.save_best or cfg.patience is not None):
        raise UsageError(
            "--save-best and --patience need a validation loss: pass --val FILE, or more data for --val-split"
        )
    notes += [n for n in (notice, precision_note(precision, device)) if n]
    global_batch = cfg.batch_size * cfg.grad_accum * ddp.world
    schedule = Schedule.for_run(cfg, len(train_data.blocks), global_batch)
    block_size = train_data.blocks.block_size

    model.to(device)  # type: ignore[arg-type]  # transformers' decorator hides nn.Module.to's signature
    model.train()
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    torch.manual_seed(cfg.seed + ddp.rank)  # different dropout masks on each rank, as in nanoGPT
    at = Position()
    if resume_from is not None:
        at = restore(resume_from, model, optimizer, scaler, ddp, notes)

    net: torch.nn.Module = model
    if cfg.compile:
        net = cast(torch.nn.Module, torch.compile(model))
    if ddp.enabled:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    # Only the last micro-step of a step all-reduces gradients; the others just accumulate locally.
    no_sync = net.no_sync if isinstance(net, DistributedDataParallel) else nullcontext
    autocast = torch.autocast(device.type, dtype=precision) if precision != torch.float32 else nullcontext()
    metrics = None
    if ddp.is_main:
        metrics = MetricsLog(out / "metrics.jsonl", keep_until=at.step if resume_from else None)
    params = sum(p.numel() for p in model.parameters())
    run = Run(
        cfg, ddp, report, out, tokenizer, model, net, optimizer, scaler, schedule, train_data, val_data,
        autocast, no_sync, metrics, at,
        model_flops_per_token(model.config, params, block_size), peak_flops(device),
    )  # fmt: skip
    run.last_saved = at.step if resume_from else None
    start_metrics = {
        "parameters": params,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_tokens": train_data.blocks.targets,  # each token of the stream (or each answer) once
        "train_rows": len(train_data.blocks),
        "val_tokens": val_data.targets if val_data else 0,
        "global_batch": global_batch,
        "block_size": block_size,
        "processes": ddp.world,
        "device": str(device),
        "precision": str(precision).removeprefix("torch."),
        "start_step": at.step,
    }  # fmt: skip
    for note in notes:  # what the data became, then the start line (docs/training.md)
        report("note", at.step, schedule.total_steps, message=note)
    report("start", at.step, schedule.total_steps, start_metrics)
    return run


def train_step(run: Run, lr: float) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; returns the step's mean loss (a device tensor,
    this process's share of it under DDP).

    The loss is the mean over every target token of the whole global batch, not a mean of micro-batch
    means: each micro-batch's summed loss is divided by the global batch's target count, so micro-batches
    (and processes) holding more answer tokens weigh more, as in one big batch (transformers #35438).
    """
    cfg, ddp, at = run.cfg, run.ddp, run.at
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batches = [
        run.data.blocks.batch(
            run.data.order.take(
                shard_start(at.samples_seen, micro, ddp.rank, ddp.world, cfg.batch_size), cfg.batch_size
            )
        )
        for micro in range(cfg.grad_accum)
    ]
    targets, tokens = ddp.total([sum(b.targets for b in batches), sum(b.tokens for b in batches)])
    # DDP averages the gradients over processes: the world factor turns that mean back into the sum.
    scale = ddp.world / max(targets, 1)
    step_loss = torch.zeros((), device=ddp.device)
    for micro, batch in enumerate(batches):
        last = micro == cfg.grad_accum - 1
        with nullcontext() if last else run.no_sync():
            loss = batch_loss(run.net, batch, ddp.device, run.autocast) * scale
            run.scaler.scale(loss).backward()
        step_loss += loss.detach()
    if cfg.clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    at.step += 1
    at.samples_seen += run.global_batch
    at.tokens_seen += tokens
    return step_loss


def log_step(run: Run, mean_loss: float, lr: float, interval: Interval, evaluate_now: bool) -> None:
    """A metrics line (with the validation loss when it is due) and a "log" event."""
    at, total_steps = run.at, run.schedule.total_steps
    seconds_per_step = (time.perf_counter() - interval.start) / max(interval.timed, 1)
    tokens_per_step = at.tokens_seen / at.step if at.step else 0  # a padded row's padding is not a token
    record: dict[str, Any] = {
        "step": at.step,
        "loss": mean_loss,
        "lr": lr,
        "tokens": at.tokens_seen,
        "tokens_per_second": tokens_per_step / seconds_per_step,
    }
    if run.peak:
        record["mfu"] = run.flops_per_token * record["tokens_per_second"] / run.ddp.world / run.peak
    if evaluate_now:
        record["val_loss"] = evaluate(run)
    run.last_loss = mean_loss
    if run.metrics is not None:
        run.metrics.write(record)
    eta = seconds_per_step * (total_steps - at.step)
    run.report("log", at.step, total_steps, {**record, "eta_seconds": eta})


def evaluate(run: Run) -> float:
    """The validation loss now; keeps track of the best, writing its model into OUT with --save-best."""
    assert run.val is not None
    at = run.at
    val_loss = run.last_val = estimate_val_loss(run.model, run.val, run.cfg, run.ddp, run.autocast)
    if at.best_val is not None and not val_loss < at.best_val:
        at.bad_evals += 1
        return val_loss
    at.best_val, at.best_step, at.bad_evals = val_loss, at.step, 0
    if run.cfg.save_best and run.ddp.is_main:
        export_model(cast(Any, run.model), run.tokenizer, run.out)
    return val_loss


def out_of_patience(run: Run) -> bool:
    """Whether --patience evaluations in a row have not beaten the best validation loss."""
    return run.cfg.patience is not None and run.at.bad_evals >= run.cfg.patience


def save_state(run: Run) -> None:
    """Write the checkpoint (every process takes part: it gathers their RNG states)."""
    at = run.at
    if not all_finite(run.model):  # never let a checkpoint replace a good one with NaN weights
        raise GptcliError(
            non_finite_message("the weights became NaN or infinite", at.step, run.last_saved, run.out)
        )
    state = checkpoint_state(at, run.model, run.optimizer, run.scaler, run.schedule, run.cfg, run.ddp)
    if run.ddp.is_main:
        save_checkpoint(state, run.out, previous=run.last_saved)
        run.report("save", at.step, run.schedule.total_steps, {"step": at.step})
    run.last_saved = at.step


def _finish(run: Run, started: float, first_step: int) -> TrainResult:
    """The model folder (unless --save-best already holds the best one), the loss plot, the result."""
    at, total_steps, out = run.at, run.schedule.total_steps, run.out
    if run.ddp.is_main:
        if not (run.cfg.save_best and at.best_step is not None):
            export_model(cast(Any, run.model), run.tokenizer, out)
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    if run.metrics is not None:
        run.metrics.close()
    seconds = time.perf_counter() - started
    stopped_early = out_of_patience(run) and at.step < total_steps
    interrupted = at.step < total_steps and not stopped_early
    result = TrainResult(
        out, at.step, total_steps, at.tokens_seen, run.last_loss, run.last_val, seconds, interrupted,
        run.ddp.is_main, first_step, stopped_early=stopped_early, best_val=at.best_val,
        best_step=at.best_step, save_best=run.cfg.save_best, patience=run.cfg.patience,
    )  # fmt: skip
    end = {"loss": run.last_loss, "val_loss": run.last_val, "tokens": at.tokens_seen, "seconds": seconds}
    run.report("end", at.step, total_steps, end)
    return result


def checkpoint_state(
    at: Position,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    schedule: Schedule,
    cfg: TrainConfig,
    ddp: Dist,
) -> dict[str, Any]:
    """Everything a resume needs to go on as if the run had never stopped (every rank must call this:
    it gathers each rank's RNG state)."""
    return {
        "format": 1,
        **asdict(at),
        "rng": ddp.gather(rng_state(ddp.device)),  # every rank's dropout stream
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "schedule": {
            "lr": schedule.lr,
            "min_lr": schedule.min_lr,
            "warmup": schedule.warmup,
            "steps": schedule.total_steps,
        },
        "config": cfg.to_dict(),
    }


def restore(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ddp: Dist,
    notes: list[str],
) -> Position:
    """Load a checkpoint into the model, optimizer and scaler, set this rank's RNG stream, and return
    where the run was; what the user should know goes into `notes`."""
    state = load_checkpoint(path)
    try:
        load_trainable_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise GptcliError(
            f"the checkpoint {path} does not fit this model (was the run started with another "
            f"-m or model size?): {first_line(exc)}"
        ) from exc
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    if len(rng) != ddp.world:
        notes.append(f"the checkpoint was written by {len(rng)} process(es), this run has {ddp.world}")
    set_rng_state(rng[ddp.rank % len(rng)], ddp.device)
    notes.append(f"resumed from step {state['step']} ({path})")
    return Position(
        state["step"],
        state["samples_seen"],
        state["tokens_seen"],
        state["pending_loss"],
        state["pending_steps"],
        state.get("best_val"),
        state.get("best_step"),
        state.get("bad_evals", 0),
    )


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine decay to min_lr."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings only; the fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda" or None)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def model_inputs(batch: Batch, device: torch.device, bool_mask: bool = True) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's forward for `batch`.

    Packed examples get positions that restart at each example and a block-diagonal causal mask
    (batch, 1, positions, positions), so each sees only itself, as if alone in its row. The mask is
    boolean for SDPA, additive (0 / most negative) for eager attention, which adds it to the scores.
    """
    inputs = {"input_ids": to_device(batch.inputs, device)}
    if batch.attention is not None:
        inputs["attention_mask"] = to_device(batch.attention, device)
    if batch.segments is not None:
        segments = batch.segments
        index = np.broadcast_to(np.arange(segments.shape[1]), segments.shape)
        new = np.ones(segments.shape, dtype=bool)
        new[:, 1:] = segments[:, 1:] != segments[:, :-1]
        inputs["position_ids"] = to_device(
            index - np.maximum.accumulate(np.where(new, index, 0), axis=1), device
        )
        seg = to_device(segments, device)
        causal = torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool, device=device).tril()
        mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
        if not bool_mask:
            mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
        inputs["attention_mask"] = mask
    return inputs


def batch_loss(
    net: torch.nn.Module, batch: Batch, device: torch.device, autocast: AbstractContextManager[Any]
) -> torch.Tensor:
    """The summed cross-entropy over `batch`'s targets (positions labelled IGNORE do not count)."""
    config = getattr(net, "config", None) or getattr(getattr(net, "module", None), "config", None)
    bool_mask = getattr(config, "_attn_implementation", "sdpa") != "eager"
    inputs = model_inputs(batch, device, bool_mask)
    with autocast:
        logits = net(**inputs, use_cache=False).logits
    labels = to_device(batch.labels, device)
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def estimate_val_loss(
    model: torch.nn.Module, val: Rows, cfg: TrainConfig, ddp: Dist, autocast: AbstractContextManager[Any]
) -> float:
    """Mean loss per target token over the first eval_batches x batch_size x processes validation rows.

    Always the same rows, split among the processes, so successive values (and runs with different
    numbers of processes) compare.
    """
    count = min(len(val), cfg.eval_batches * cfg.batch_size * ddp.world)
    mine = np.arange(ddp.rank, count, ddp.world)
    total = torch.zeros(2, dtype=torch.float64, device=ddp.device)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(mine), cfg.batch_size):
            batch = val.batch(mine[i : i + cfg.batch_size])
            total[0] += batch_loss(model, batch, ddp.device, autocast)
            total[1] += batch.targets
    model.train()
    loss_sum, targets = ddp.sum(total).tolist()
    return float(loss_sum) / max(float(targets), 1.0)
