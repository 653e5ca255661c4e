"""What a training run is asked to do: TrainConfig, one field per `gptcli finetune` option, checked.

Kept apart from the loop (gptcli.train) so the CLI and tools can build and validate a config without
importing torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gptcli.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """A training run. The `gptcli finetune` options map one to one onto these fields."""

    data: list[str] = field(default_factory=list)
    """Training text: .txt files (one document each), .jsonl files (one per line), '-' for stdin."""
    out_dir: Path = Path("finetuned")
    """Where the checkpoint, metrics.jsonl, loss.png, the token cache and finally the trained model go."""
    model: str | None = None
    """Base model, a hub id or a folder [default: $GPTCLI_MODEL or gpt2]. With from_scratch: only the
    default tokenizer."""
    text_field: str = "text"
    """The field of each .jsonl line that holds the text."""
    val: list[str] = field(default_factory=list)
    """Validation text files; when empty, `val_split` of the training blocks is held out instead."""
    val_split: float = 0.05
    """Fraction of training blocks held out for validation when `val` is empty (0: no validation)."""
    block_size: int | None = None
    """Tokens per training sequence [default: the model's context, at most 1024]."""

    steps: int | None = None
    """Optimizer steps to run. Give this or `epochs`; neither means one epoch."""
    epochs: float | None = None
    """Passes over the training blocks (fractions allowed); sets `steps`."""
    batch_size: int = 8
    """Sequences per process per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step. Global batch = batch_size x grad_accum x processes."""
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine decay [default: lr / 10]."""
    warmup: int | None = None
    """Linear warm-up steps [default: 5% of the steps, at most 1000; 0 turns it off]."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices and embeddings only (not biases or norms)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas; 0.95 as in GPT-3 and nanoGPT, steadier than 0.999 with small batches."""
    clip: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    dropout: float | None = None
    """Override the model's dropout probabilities [default: keep the model's; 0 when from scratch]."""
    seed: int = 1337
    """Seeds weight init, data order and dropout; the same seed gives the same run."""

    device: str = "auto"
    """auto|cpu|cuda|cuda:N|mps. Under torchrun each process takes cuda:LOCAL_RANK."""
    precision: str = "auto"
    """auto|fp32|bf16|fp16 autocast. auto: bf16 on CUDA GPUs that have it, else fp16; fp32 elsewhere."""
    compile: bool = False
    """torch.compile the model (faster steps on GPUs after a slow first one)."""

    eval_every: int = 200
    """Steps between validation losses (also at the last step)."""
    eval_batches: int = 20
    """Validation batches (of batch_size per process) per evaluation; the same blocks every time."""
    save_every: int = 500
    """Steps between checkpoints (also at the last step, and on Ctrl-C or SIGTERM)."""
    log_every: int = 10
    """Steps between metrics.jsonl lines and progress updates; the loss is the mean since the last one."""
    resume: bool = False
    """Continue the run in out_dir from its checkpoint (start fresh when it has none)."""
    overwrite: bool = False
    """Write into out_dir even if it holds other files; our own old run files there are deleted."""

    from_scratch: bool = False
    """New random weights instead of a pretrained model."""
    n_layer: int | None = None
    """From scratch: transformer blocks [default: from model_config, else 6]."""
    n_head: int | None = None
    """From scratch: attention heads [default: from model_config, else 6]."""
    n_embd: int | None = None
    """From scratch: embedding width [default: from model_config, else 384]."""
    context: int | None = None
    """From scratch: positions the model attends to [default: from model_config, else 256]."""
    model_config: Path | None = None
    """From scratch: a config.json to start from (GPT-2 unless it names another model_type)."""
    tokenizer: str | None = None
    """From scratch: tokenizer hub id or folder [default: the tokenizer of `model`]."""

    allow_pickle: bool = False
    """Allow a base model with pickle (pytorch_model.bin) weights, loaded with weights_only=True."""
    trust_remote_code: bool = False
    """Allow the base model's own Python code (auto_map) to run."""

    def check(self) -> None:
        """Refuse values that cannot work, with the option to fix."""
        positive = {
            "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum,
            "--eval-every": self.eval_every,
            "--eval-batches": self.eval_batches,
            "--save-every": self.save_every,
            "--log-every": self.log_every,
        }
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"{name} must be at least 1")
        optional = {
            "--steps": self.steps,
            "--block-size": self.block_size,
            "--n-layer": self.n_layer,
            "--n-head": self.n_head,
            "--n-embd": self.n_embd,
            "--context": self.context,
        }
        for name, value in optional.items():
            if value is not None and value < 1:
                raise UsageError(f"{name} must be at least 1")
        numbers = {
            "--epochs": self.epochs,
            "--lr": self.lr,
            "--min-lr": self.min_lr,
            "--weight-decay": self.weight_decay,
            "--clip": self.clip,
            "--dropout": self.dropout,
            "--val-split": self.val_split,
        }
        for name, number in numbers.items():  # NaN passes every comparison below; inf never ends a run
            if number is not None and not math.isfinite(number):
                raise UsageError(f"{name} must be a finite number (got {number})")
        if not 0 <= self.seed <= 2**63 - 1:
            raise UsageError(f"--seed must be between 0 and 2**63 - 1 (got {self.seed})")
        if self.steps is not None and self.epochs is not None:
            raise UsageError("give --steps or --epochs, not both")
        if self.epochs is not None and not self.epochs > 0:
            raise UsageError("--epochs must be positive")
        if not 0 <= self.val_split < 1:
            raise UsageError("--val-split must be at least 0 and below 1")
        if not self.lr > 0 or (self.min_lr is not None and not 0 <= self.min_lr <= self.lr):
            raise UsageError("--lr must be positive and --min-lr between 0 and --lr")
        if self.warmup is not None and self.warmup < 0:
            raise UsageError("--warmup must be 0 or more")
        if self.clip < 0 or self.weight_decay < 0:
            raise UsageError("--clip and --weight-decay must be 0 or more")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise UsageError("--dropout must be at least 0 and below 1")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown --precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        scratch_only = {
            "--n-layer": self.n_layer,
            "--n-head": self.n_head,
            "--n-embd": self.n_embd,
            "--context": self.context,
            "--config": self.model_config,
            "--tokenizer": self.tokenizer,
        }
        given = [name for name, value in scratch_only.items() if value is not None]
        if given and not self.from_scratch:
            raise UsageError(f"{', '.join(given)} only apply with --from-scratch")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (paths as strings), for gptcli-run.json and the checkpoint."""
        out = asdict(self)
        out["out_dir"] = str(self.out_dir)
        out["model_config"] = str(self.model_config) if self.model_config else None
        out["betas"] = list(self.betas)
        return out
