"""Fine-tune (or train from scratch) a causal LM: one training loop, top to bottom.

The shape is nanoGPT's train.py, as functions: DDP when torchrun starts us, rank 0 alone logs and writes,
gradient accumulation without needless all-reduces (no_sync), autocast that is off in fp32, a GradScaler
only for fp16, a validation loss under torch.no_grad(), and a checkpoint with everything needed to
continue the run as if it had never stopped (model, optimizer, scaler, step, RNG states, data position).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli import __version__
from gptcli.errors import GptcliError
from gptcli.train_config import TrainConfig

if TYPE_CHECKING:
    import torch

    from gptcli.checkpoint import RunLock
    from gptcli.data import BatchOrder, Blocks
    from gptcli.distributed import Dist


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


EventHandler = Callable[[TrainEvent], None]


def train(config: TrainConfig, on_event: EventHandler | None = None) -> TrainResult:
    """Train as `config` says; report progress through `on_event`; return how it ended.

    Under torchrun every process calls this; only rank 0 calls `on_event` and writes files.
    Raises GptcliError for what the user can fix (bad data, foreign out_dir, a loss that became NaN).
    """
    from gptcli import distributed
    from gptcli.checkpoint import RunLock

    config.check()
    ddp = distributed.setup(config.device)
    lock = RunLock(Path(config.out_dir).expanduser())  # taken by rank 0, which alone writes
    try:
        return _train(config, ddp, lock, on_event if ddp.is_main else None)
    finally:
        lock.release()
        ddp.close()


def _train(cfg: TrainConfig, ddp: Dist, lock: RunLock, on_event: EventHandler | None) -> TrainResult:
    import torch
    import torch.nn.functional as F

    from gptcli.checkpoint import (
        MetricsLog,
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
    )
    from gptcli.data import shard_start
    from gptcli.distributed import StopRequest
    from gptcli.train_setup import (
        build_model,
        load_data,
        model_flops_per_token,
        peak_flops,
        resolve_precision,
    )

    def report(kind: str, metrics: dict[str, Any] | None = None, message: str = "") -> None:
        if on_event is not None:
            on_event(TrainEvent(kind, step, total_steps, metrics or {}, message))

    started = time.perf_counter()
    step = total_steps = 0
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
    notes = ([notice] if notice else []) + notes
    global_batch = cfg.batch_size * cfg.grad_accum * ddp.world
    total_steps = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * len(train_data.blocks) / global_batch))
    warmup = min(total_steps // 20, 1000) if cfg.warmup is None else cfg.warmup
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    block_size = train_data.blocks.block_size

    model.to(device)
    model.train()
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)

    # Resume: weights, optimizer moments, scaler, position in the data, RNG streams, pending loss sum.
    samples_seen = tokens_seen = pending_steps = 0
    pending_loss = 0.0
    torch.manual_seed(cfg.seed + ddp.rank)  # different dropout masks on each rank, as in nanoGPT
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise GptcliError(
                f"the checkpoint {resume_from} does not fit this model (was the run started with another "
                f"-m or model size?): {str(exc).strip().splitlines()[0]}"
            ) from exc
        scaler.load_state_dict(state["scaler"])
        step, samples_seen, tokens_seen = state["step"], state["samples_seen"], state["tokens_seen"]
        pending_loss, pending_steps = state["pending_loss"], state["pending_steps"]
        rng = state["rng"]
        if len(rng) != ddp.world:
            notes.append(f"the checkpoint was written by {len(rng)} process(es), this run has {ddp.world}")
        set_rng_state(rng[ddp.rank % len(rng)], device)
        notes.append(f"resumed from step {step} ({resume_from})")
        del state

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=precision) if precision != torch.float32 else nullcontext()
    metrics = (
        MetricsLog(out / "metrics.jsonl", keep_until=step if resume_from else None) if ddp.is_main else None
    )
    params = sum(p.numel() for p in raw_model.parameters())
    flops_per_token = model_flops_per_token(raw_model.config, params, block_size)
    peak = peak_flops(device)

    report(
        "start",
        {
            "parameters": params,
            "train_tokens": len(train_data.blocks) * block_size,
            "val_tokens": len(val_data) * block_size if val_data else 0,
            "global_batch": global_batch,
            "block_size": block_size,
            "processes": ddp.world,
            "device": str(device),
            "precision": str(precision).removeprefix("torch."),
            "start_step": step,
        },
    )
    for note in notes:
        report("note", message=note)

    # The loop. Tensors stay on the device between log steps: no .item() (a GPU sync) until then.
    loss_sum = torch.tensor(pending_loss, device=device)
    interval_steps, interval_start = pending_steps, time.perf_counter()
    last_loss = last_val = None
    last_saved = step if resume_from else None
    with StopRequest(under_torchrun=ddp.enabled) as stop:
        while step < total_steps:
            lr = lr_at(step, cfg.lr, min_lr, warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg.grad_accum):
                start = shard_start(samples_seen, micro, ddp.rank, ddp.world, cfg.batch_size)
                x, y = get_batch(train_data.blocks, train_data.order, start, cfg.batch_size, device)
                # Only the last micro-step all-reduces gradients; the others just accumulate locally.
                last = micro == cfg.grad_accum - 1
                with nullcontext() if last or not ddp.enabled else model.no_sync():
                    with autocast:
                        logits = model(input_ids=x, use_cache=False).logits
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / cfg.grad_accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if cfg.clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            samples_seen += global_batch
            tokens_seen += global_batch * block_size
            interval_steps += 1

            done = step == total_steps
            evaluate = val_data is not None and (step % cfg.eval_every == 0 or done)
            save = step % cfg.save_every == 0 or done
            log = step % cfg.log_every == 0 or evaluate or done
            stopping = ddp.any(stop.requested)
            if not (log or save or stopping):
                continue

            mean_loss = ddp.mean(loss_sum).item() / interval_steps
            if not math.isfinite(mean_loss):
                what = "infinite" if math.isinf(mean_loss) else "NaN"
                raise GptcliError(
                    non_finite_message(f"the training loss became {what}", step, last_saved, out)
                )
            if log:
                now = time.perf_counter()
                seconds_per_step = (now - interval_start) / interval_steps
                record: dict[str, Any] = {
                    "step": step,
                    "loss": mean_loss,
                    "lr": lr,
                    "tokens": tokens_seen,
                    "tokens_per_second": global_batch * block_size / seconds_per_step,
                }
                if peak:
                    per_device = record["tokens_per_second"] / ddp.world
                    record["mfu"] = flops_per_token * per_device / peak
                if evaluate:
                    assert val_data is not None
                    last_val = record["val_loss"] = estimate_val_loss(raw_model, val_data, cfg, ddp, autocast)
                last_loss = mean_loss
                if metrics is not None:
                    metrics.write(record)
                report("log", {**record, "eta_seconds": seconds_per_step * (total_steps - step)})
                loss_sum.zero_()
                interval_steps = 0
            if save or stopping:
                if not all_finite(raw_model):  # never let a checkpoint replace a good one with NaN weights
                    raise GptcliError(
                        non_finite_message("the weights became NaN or infinite", step, last_saved, out)
                    )
                state = {
                    "format": 1,
                    "step": step,
                    "samples_seen": samples_seen,  # the data position: the batch order is a function of it
                    "tokens_seen": tokens_seen,
                    "pending_loss": ddp.mean(loss_sum).item(),  # so the next logged mean is the same
                    "pending_steps": interval_steps,
                    "rng": ddp.gather(rng_state(device)),  # every rank's dropout stream
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "schedule": {"lr": cfg.lr, "min_lr": min_lr, "warmup": warmup, "steps": total_steps},
                    "config": cfg.to_dict(),
                }
                if ddp.is_main:
                    save_checkpoint(state, out, previous=last_saved)
                    report("save", {"step": step})
                last_saved = step
                del state
            if stopping:
                break
            interval_start = time.perf_counter()  # evaluation and saving are not training speed

    interrupted = step < total_steps
    if ddp.is_main:
        export_model(raw_model, tokenizer, out)
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    if metrics is not None:
        metrics.close()
    result = TrainResult(
        out,
        step,
        total_steps,
        tokens_seen,
        last_loss,
        last_val,
        time.perf_counter() - started,
        interrupted,
        ddp.is_main,
    )
    report("end", {"loss": last_loss, "val_loss": last_val, "tokens": tokens_seen, "seconds": result.seconds})
    return result


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
    import torch

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
    import torch

    tokens = torch.from_numpy(blocks.read(order.take(start, batch_size)))
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        tokens = tokens.pin_memory()
    tokens = tokens.to(device, non_blocking=True)
    return tokens[:, :-1], tokens[:, 1:]


def estimate_val_loss(model: Any, val: Blocks, cfg: TrainConfig, ddp: Dist, autocast: Any) -> float:
    """Mean loss per token over the first eval_batches x batch_size x processes validation blocks.

    Always the same blocks, split among the processes, so successive values (and runs with different
    numbers of processes) compare.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

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
