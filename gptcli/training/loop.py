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
from gptcli.errors import GptcliError, first_line
from gptcli.training import distributed
from gptcli.training.checkpoint import (
    MetricsLog,
    RunLock,
    all_finite,
    check_out_dir,
    claim_out_dir,
    export_model,
    load_checkpoint,
    non_finite_message,
    plot_losses,
    rng_state,
    save_checkpoint,
    set_rng_state,
    undo_claim,
)
from gptcli.training.config import TrainConfig
from gptcli.training.data import BatchOrder, Blocks, check_inputs, shard_start
from gptcli.training.distributed import Dist, StopRequest
from gptcli.training.setup import (
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


def _train(cfg: TrainConfig, ddp: Dist, lock: RunLock, report: Reporter) -> TrainResult:
    started = time.perf_counter()
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
    notes += [n for n in (notice, precision_note(precision, device)) if n]
    global_batch = cfg.batch_size * cfg.grad_accum * ddp.world
    schedule = Schedule.for_run(cfg, len(train_data.blocks), global_batch)
    total_steps = schedule.total_steps
    block_size = train_data.blocks.block_size

    model.to(device)  # type: ignore[arg-type]  # transformers' decorator hides nn.Module.to's signature
    model.train()
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    torch.manual_seed(cfg.seed + ddp.rank)  # different dropout masks on each rank, as in nanoGPT
    at = Position()
    if resume_from is not None:
        at = restore(resume_from, model, optimizer, scaler, ddp, notes)

    raw_model = model  # what is saved; `net` is what runs: compiled, wrapped for DDP
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
    params = sum(p.numel() for p in raw_model.parameters())
    flops_per_token = model_flops_per_token(raw_model.config, params, block_size)
    peak = peak_flops(device)
    start_metrics = {
        "parameters": params,
        "train_tokens": len(train_data.blocks) * block_size,
        "val_tokens": len(val_data) * block_size if val_data else 0,
        "global_batch": global_batch,
        "block_size": block_size,
        "processes": ddp.world,
        "device": str(device),
        "precision": str(precision).removeprefix("torch."),
        "start_step": at.step,
    }
    for note in notes:  # what the data became, then the start line (docs/training.md)
        report("note", at.step, total_steps, message=note)
    report("start", at.step, total_steps, start_metrics)
    first_step = at.step

    # The loop. Tensors stay on the device between log steps: no .item() (a GPU sync) until then.
    loss_sum = torch.tensor(at.pending_loss, device=device)
    interval_steps, interval_start = at.pending_steps, time.perf_counter()
    timed_steps = 0  # steps since interval_start: a resumed run's pending steps were timed by the last run
    last_loss = last_val = None
    last_saved = at.step if resume_from else None
    with StopRequest(under_torchrun=ddp.enabled) as stop:
        while at.step < total_steps:
            lr = schedule.lr_at(at.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg.grad_accum):
                start = shard_start(at.samples_seen, micro, ddp.rank, ddp.world, cfg.batch_size)
                x, y = get_batch(train_data.blocks, train_data.order, start, cfg.batch_size, device)
                last = micro == cfg.grad_accum - 1
                with nullcontext() if last else no_sync():
                    with autocast:
                        logits = net(input_ids=x, use_cache=False).logits
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / cfg.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if cfg.clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            at.step += 1
            at.samples_seen += global_batch
            at.tokens_seen += global_batch * block_size
            interval_steps += 1
            timed_steps += 1

            done = at.step == total_steps
            evaluate = val_data is not None and (at.step % cfg.eval_every == 0 or done)
            save = at.step % cfg.save_every == 0 or done
            stopping = ddp.any(stop.requested)
            # A stopped run logs its last step, so the loss it reports is that step's.
            log = at.step % cfg.log_every == 0 or evaluate or done or stopping
            if not (log or save or stopping):
                continue

            mean_loss = ddp.mean(loss_sum).item() / interval_steps
            if not math.isfinite(mean_loss):
                what = "infinite" if math.isinf(mean_loss) else "NaN"
                raise GptcliError(
                    non_finite_message(f"the training loss became {what}", at.step, last_saved, out)
                )
            if log:
                seconds_per_step = (time.perf_counter() - interval_start) / max(timed_steps, 1)
                record: dict[str, Any] = {
                    "step": at.step,
                    "loss": mean_loss,
                    "lr": lr,
                    "tokens": at.tokens_seen,
                    "tokens_per_second": global_batch * block_size / seconds_per_step,
                }
                if peak:
                    record["mfu"] = flops_per_token * record["tokens_per_second"] / ddp.world / peak
                if evaluate and val_data is not None:
                    last_val = record["val_loss"] = estimate_val_loss(raw_model, val_data, cfg, ddp, autocast)
                last_loss = mean_loss
                if metrics is not None:
                    metrics.write(record)
                eta = seconds_per_step * (total_steps - at.step)
                report("log", at.step, total_steps, {**record, "eta_seconds": eta})
                loss_sum.zero_()
                interval_steps = 0
            if save or stopping:
                if not all_finite(raw_model):  # never let a checkpoint replace a good one with NaN weights
                    raise GptcliError(
                        non_finite_message("the weights became NaN or infinite", at.step, last_saved, out)
                    )
                at.pending_loss, at.pending_steps = ddp.mean(loss_sum).item(), interval_steps
                state = checkpoint_state(at, raw_model, optimizer, scaler, schedule, cfg, ddp)
                if ddp.is_main:
                    save_checkpoint(state, out, previous=last_saved)
                    report("save", at.step, total_steps, {"step": at.step})
                last_saved = at.step
                del state
            if stopping:
                break
            interval_start = time.perf_counter()  # evaluation and saving are not training speed
            timed_steps = 0

    if ddp.is_main:
        export_model(raw_model, tokenizer, out)
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    if metrics is not None:
        metrics.close()
    seconds = time.perf_counter() - started
    interrupted = at.step < total_steps
    result = TrainResult(
        out,
        at.step,
        total_steps,
        at.tokens_seen,
        last_loss,
        last_val,
        seconds,
        interrupted,
        ddp.is_main,
        first_step,
    )
    end = {"loss": last_loss, "val_loss": last_val, "tokens": at.tokens_seen, "seconds": seconds}
    report("end", at.step, total_steps, end)
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
        "model": model.state_dict(),
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
        model.load_state_dict(state["model"])
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


def get_batch(
    blocks: Blocks, order: BatchOrder, start: int, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for samples start .. start+batch_size-1 of the training order."""
    tokens = torch.from_numpy(blocks.read(order.take(start, batch_size)))
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        tokens = tokens.pin_memory()
    tokens = tokens.to(device, non_blocking=True)
    return tokens[:, :-1], tokens[:, 1:]


def estimate_val_loss(
    model: torch.nn.Module, val: Blocks, cfg: TrainConfig, ddp: Dist, autocast: AbstractContextManager[Any]
) -> float:
    """Mean loss per token over the first eval_batches x batch_size x processes validation blocks.

    Always the same blocks, split among the processes, so successive values (and runs with different
    numbers of processes) compare.
    """
    count = min(len(val), cfg.eval_batches * cfg.batch_size * ddp.world)
    mine = np.arange(ddp.rank, count, ddp.world)
    total = torch.zeros(2, dtype=torch.float64, device=ddp.device)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(mine), cfg.batch_size):
            tokens = torch.from_numpy(val.read(mine[i : i + cfg.batch_size])).to(ddp.device)
            x, y = tokens[:, :-1], tokens[:, 1:]
            with autocast:
                logits = model(input_ids=x, use_cache=False).logits
            total[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            total[1] += y.numel()
    model.train()
    loss_sum, tokens = ddp.sum(total).tolist()
    return loss_sum / tokens
