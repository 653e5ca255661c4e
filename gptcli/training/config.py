"""What a training run is asked to do: TrainConfig, one field per `gptcli finetune` option, checked.

Each field carries its option's help, flags and help panel, so the `finetune` command is generated from
this class (gptcli.cli.finetune) and every default and help text is written here once. Kept apart
from the loop, without torch, so the CLI and tools can build and validate a config cheaply.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from gptcli.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

DATA, TRAINING, LORA, RUN, SCRATCH = (
    "Data",
    "Training",
    "LoRA (--lora-rank)",
    "Evaluation, checkpoints, output",
    "From scratch (--from-scratch)",
)


def option(
    help: str,
    *,
    default: Any = MISSING,
    factory: Any = MISSING,
    panel: str | None = None,
    flags: tuple[str, ...] = (),
    argument: bool = False,
) -> Any:
    """A TrainConfig field and the `finetune` option it is: help text, flags (default: --field-name),
    help panel. `help` ends with "(default: ...)" where the default is not a plain value."""
    cli = {"help": help, "panel": panel, "flags": flags, "argument": argument}
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"cli": cli})
    return field(default=default, metadata={"cli": cli})


@dataclass
class TrainConfig:
    """A training run. The `gptcli finetune` options map one to one onto these fields (but `betas`)."""

    data: list[str] = option(
        "Training text: .txt files (one document each), .jsonl files, or - for stdin.",
        factory=list,
        argument=True,
    )
    out_dir: Path = option(
        "Output folder: checkpoints, metrics, then the trained model.",
        default=Path("finetuned"),
        flags=("--out", "-o"),
    )
    model: str | None = option(
        "Base model: hub id, local folder saved with save_pretrained, or builtin. With --from-scratch: "
        "only the default tokenizer. (default: $GPTCLI_MODEL, else gpt2, else builtin)",
        default=None,
        flags=("--model", "-m"),
    )
    text_field: str = option("JSONL field that holds the text.", default="text", panel=DATA)
    val: list[str] = option(
        "Validation file(s) instead of --val-split.", factory=list, panel=DATA, flags=("--val",)
    )
    val_split: float = option(
        "Fraction of training blocks held out for validation when --val is not given (0: none).",
        default=0.05,
        panel=DATA,
    )
    block_size: int | None = option(
        "Tokens per sequence. (default: the model's context, at most 1024)", default=None, panel=DATA
    )
    train_on_prompt: bool = option(
        "Instruction data: train on the prompt tokens too, not only on the answers.",
        default=False,
        panel=DATA,
        flags=("--train-on-prompt",),
    )
    pack: bool = option(
        "Instruction data: pack several examples into each block (attention and loss never cross from "
        "one into the next), or --no-pack: one example a row, padded to the longest of its batch.",
        default=True,
        panel=DATA,
        flags=("--pack/--no-pack",),
    )

    steps: int | None = option("Optimizer steps. (default: one epoch)", default=None, panel=TRAINING)
    epochs: float | None = option(
        "Passes over the data (fractions allowed), instead of --steps.", default=None, panel=TRAINING
    )
    batch_size: int = option("Sequences per process per micro-step.", default=8, panel=TRAINING)
    grad_accum: int = option(
        "Micro-steps per optimizer step; global batch = batch size x grad accum x processes.",
        default=1,
        panel=TRAINING,
    )
    lr: float = option("Peak learning rate (AdamW).", default=5e-5, panel=TRAINING)
    min_lr: float | None = option(
        "Final learning rate of the cosine decay. (default: lr/10)", default=None, panel=TRAINING
    )
    warmup: int | None = option(
        "Linear warm-up steps; 0 turns it off. (default: 5% of steps, at most 1000)",
        default=None,
        panel=TRAINING,
    )
    weight_decay: float = option(
        "AdamW weight decay, on matrices and embeddings only (not biases or norms).",
        default=0.1,
        panel=TRAINING,
    )
    betas: tuple[float, float] = field(default=(0.9, 0.95))
    """AdamW betas; 0.95 as in GPT-3 and nanoGPT, steadier than 0.999 with small batches (no option)."""
    clip: float = option("Gradient-norm clip; 0: none.", default=1.0, panel=TRAINING)
    dropout: float | None = option(
        "Override the model's dropout. (default: the model's; 0 from scratch)", default=None, panel=TRAINING
    )
    seed: int = option(
        "Seed for init, data order and dropout; the same seed gives the same run.",
        default=1337,
        panel=TRAINING,
    )

    lora_rank: int = option(
        "Train a LoRA adapter of this rank (HF PEFT) instead of every weight; 0: full fine-tuning.",
        default=0,
        panel=LORA,
    )
    lora_alpha: float | None = option(
        "LoRA scale numerator: the update is (alpha / rank) B A. (default: 2 x rank)",
        default=None,
        panel=LORA,
    )
    lora_dropout: float = option("Dropout on the LoRA path's input.", default=0.05, panel=LORA)
    lora_targets: str = option(
        "Comma-separated module names that get adapters (GPT-2: c_attn, c_proj, c_fc; other models: "
        "q_proj, v_proj, ...).",
        default="c_attn",
        panel=LORA,
    )

    device: str = option(
        "auto|cpu|cuda|cuda:N|mps (auto: CUDA, MPS, CPU). Under torchrun each process takes cuda:LOCAL_RANK.",
        default="auto",
    )
    precision: str = option(
        "auto|fp32|bf16|fp16 autocast (auto: bf16 on GPUs that have it, else fp16; fp32 on CPU).",
        default="auto",
        panel=TRAINING,
    )
    compile: bool = option(
        "torch.compile the model (faster steps on GPUs after a slow first one).",
        default=False,
        panel=TRAINING,
        flags=("--compile",),
    )

    eval_every: int = option(
        "Steps between validation losses (and at the last step).", default=200, panel=RUN
    )
    eval_batches: int = option(
        "Batches per validation loss (the same blocks every time).", default=20, panel=RUN
    )
    save_every: int = option(
        "Steps between checkpoints (and at the last step, on Ctrl-C and SIGTERM).", default=500, panel=RUN
    )
    save_best: bool = option(
        "Keep the model (or adapter) of the lowest validation loss in --out, not the last one.",
        default=False,
        panel=RUN,
        flags=("--save-best",),
    )
    patience: int | None = option(
        "Stop after this many validation losses in a row without a new best (step 0's counts).",
        default=None,
        panel=RUN,
    )
    log_every: int = option(
        "Steps between metrics lines; the loss is the mean since the last one.", default=10, panel=RUN
    )
    resume: bool = option(
        "Continue the run in --out from its checkpoint.", default=False, panel=RUN, flags=("--resume",)
    )
    overwrite: bool = option(
        "Write into --out even if it holds other files (an earlier run's files there are deleted).",
        default=False,
        panel=RUN,
        flags=("--overwrite",),
    )

    from_scratch: bool = option(
        "Train new random weights.", default=False, panel=SCRATCH, flags=("--from-scratch",)
    )
    n_layer: int | None = option("Blocks. (default: from --config, else 6)", default=None, panel=SCRATCH)
    n_head: int | None = option("Heads. (default: from --config, else 6)", default=None, panel=SCRATCH)
    n_embd: int | None = option("Width. (default: from --config, else 384)", default=None, panel=SCRATCH)
    context: int | None = option(
        "Positions the model attends to. (default: from --config, else 256)", default=None, panel=SCRATCH
    )
    model_config: Path | None = option(
        "A config.json to start from (GPT-2 unless it names another model_type).",
        default=None,
        panel=SCRATCH,
        flags=("--config",),
    )
    tokenizer: str | None = option("Tokenizer hub id or folder. (default: -m's)", default=None, panel=SCRATCH)

    allow_pickle: bool = option(
        "Allow pytorch_model.bin weights (loaded with weights_only=True).",
        default=False,
        flags=("--allow-pickle",),
    )
    trust_remote_code: bool = option(
        "Allow a model folder's own Python code (auto_map) to run.",
        default=False,
        flags=("--trust-remote-code",),
    )

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
            "--patience": self.patience,
        }
        for name, given in optional.items():
            if given is not None and given < 1:
                raise UsageError(f"{name} must be at least 1")
        numbers = {
            "--epochs": self.epochs,
            "--lr": self.lr,
            "--min-lr": self.min_lr,
            "--weight-decay": self.weight_decay,
            "--clip": self.clip,
            "--dropout": self.dropout,
            "--val-split": self.val_split,
            "--lora-alpha": self.lora_alpha,
            "--lora-dropout": self.lora_dropout,
        }
        for name, number in numbers.items():  # NaN passes every comparison below; inf never ends a run
            if number is not None and not math.isfinite(number):
                raise UsageError(f"{name} must be a finite number (got {number})")
        if not 0 <= self.seed <= 2**63 - 1:
            raise UsageError(f"--seed must be between 0 and 2**63 - 1 (got {self.seed})")
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
        self._check_lora()
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown --precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        self._check_length_and_scratch()

    def _check_length_and_scratch(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise UsageError("give --steps or --epochs, not both")
        if self.epochs is not None and not self.epochs > 0:
            raise UsageError("--epochs must be positive")
        scratch_only = {
            "--n-layer": self.n_layer,
            "--n-head": self.n_head,
            "--n-embd": self.n_embd,
            "--context": self.context,
            "--config": self.model_config,
            "--tokenizer": self.tokenizer,
        }
        scratch_given = [name for name, value in scratch_only.items() if value is not None]
        if scratch_given and not self.from_scratch:
            raise UsageError(f"{', '.join(scratch_given)} only apply with --from-scratch")

    @property
    def targets(self) -> list[str]:
        """--lora-targets as a list of module names."""
        return [name.strip() for name in self.lora_targets.split(",") if name.strip()]

    def _check_lora(self) -> None:
        if self.lora_rank < 0:
            raise UsageError("--lora-rank must be 0 (full fine-tuning) or more")
        if not self.lora_rank:
            given = [name for name, on in (("--lora-alpha", self.lora_alpha is not None),) if on]
            if given:
                raise UsageError(f"{', '.join(given)} only applies with --lora-rank")
            return
        if self.from_scratch:
            raise UsageError("--lora-rank adapts a pretrained model: it does not go with --from-scratch")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError("--lora-dropout must be at least 0 and below 1")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise UsageError("--lora-alpha must be positive")
        if not self.targets:
            raise UsageError("--lora-targets names no module")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (paths as strings), for gptcli-run.json and the checkpoint."""
        out = asdict(self)
        out["out_dir"] = str(self.out_dir)
        out["model_config"] = str(self.model_config) if self.model_config else None
        out["betas"] = list(self.betas)
        return out
