"""The `finetune` command: options -> TrainConfig -> gptcli.train.train, with progress on stderr."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gptcli.cli._common import AllowPickleOpt, DeviceOpt, ModelOpt, TrustCodeOpt, command, is_tty, stderr

if TYPE_CHECKING:
    from gptcli.train import TrainEvent, TrainResult

_DATA = "Data"
_TRAIN = "Training"
_RUN = "Evaluation, checkpoints, output"
_SCRATCH = "From scratch (--from-scratch)"

EPILOG = """\
[bold]Examples[/bold]

  gptcli finetune notes.txt -m gpt2 -o my-gpt2 --steps 500

  gptcli finetune chats.jsonl --text-field body -o out --epochs 2 --batch-size 4 --grad-accum 8

  cat *.txt | gptcli finetune - -o out --from-scratch --tokenizer gpt2 --n-layer 4 --n-embd 256

  torchrun --nproc_per_node 4 -m gptcli finetune corpus.txt -m gpt2 -o out --steps 2000

  gptcli finetune corpus.txt -m gpt2 -o out --steps 2000 --resume    [dim]# after Ctrl-C or a crash[/dim]
"""


@command(epilog=EPILOG)
def finetune(
    data: Annotated[
        list[str],
        typer.Argument(help="Training text: .txt files (one document each), .jsonl files, or - for stdin."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder: checkpoints, metrics, then the trained model.")
    ],
    model: ModelOpt = None,
    text_field: Annotated[
        str, typer.Option(help="JSONL field that holds the text.", rich_help_panel=_DATA)
    ] = "text",
    val: Annotated[
        list[str] | None,
        typer.Option("--val", help="Validation file(s) instead of --val-split.", rich_help_panel=_DATA),
    ] = None,
    val_split: Annotated[
        float, typer.Option(help="Fraction of blocks held out for validation.", rich_help_panel=_DATA)
    ] = 0.05,
    block_size: Annotated[
        int | None,
        typer.Option(
            help="Tokens per sequence. (default: the model's context, at most 1024)",
            show_default=False,
            rich_help_panel=_DATA,
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps. (default: one epoch)", show_default=False, rich_help_panel=_TRAIN
        ),
    ] = None,
    epochs: Annotated[
        float | None,
        typer.Option(help="Passes over the data, instead of --steps.", rich_help_panel=_TRAIN),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Sequences per process per micro-step.", rich_help_panel=_TRAIN)
    ] = 8,
    grad_accum: Annotated[
        int, typer.Option(help="Micro-steps per optimizer step.", rich_help_panel=_TRAIN)
    ] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.", rich_help_panel=_TRAIN)] = 5e-5,
    min_lr: Annotated[
        float | None,
        typer.Option(
            help="Final learning rate of the cosine decay. (default: lr/10)", rich_help_panel=_TRAIN
        ),
    ] = None,
    warmup: Annotated[
        int | None,
        typer.Option(
            help="Warm-up steps; 0 turns it off. (default: 5% of steps, at most 1000)",
            show_default=False,
            rich_help_panel=_TRAIN,
        ),
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.", rich_help_panel=_TRAIN)] = 0.1,
    clip: Annotated[float, typer.Option(help="Gradient-norm clip; 0: none.", rich_help_panel=_TRAIN)] = 1.0,
    dropout: Annotated[
        float | None,
        typer.Option(help="Override the model's dropout. (default: the model's)", rich_help_panel=_TRAIN),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed for init, data order and dropout.", rich_help_panel=_TRAIN)
    ] = 1337,
    device: DeviceOpt = "auto",
    precision: Annotated[
        str,
        typer.Option(help="auto|fp32|bf16|fp16 (auto: bf16 on GPU, fp32 on CPU).", rich_help_panel=_TRAIN),
    ] = "auto",
    compile_: Annotated[
        bool, typer.Option("--compile", help="torch.compile the model.", rich_help_panel=_TRAIN)
    ] = False,
    eval_every: Annotated[
        int, typer.Option(help="Steps between validation losses.", rich_help_panel=_RUN)
    ] = 200,
    eval_batches: Annotated[
        int, typer.Option(help="Batches per validation loss.", rich_help_panel=_RUN)
    ] = 20,
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints.", rich_help_panel=_RUN)] = 500,
    log_every: Annotated[int, typer.Option(help="Steps between metrics lines.", rich_help_panel=_RUN)] = 10,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the run in --out from its checkpoint.", rich_help_panel=_RUN),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Write into --out even if it holds other files.", rich_help_panel=_RUN
        ),
    ] = False,
    from_scratch: Annotated[
        bool,
        typer.Option("--from-scratch", help="Train new random weights.", rich_help_panel=_SCRATCH),
    ] = False,
    n_layer: Annotated[
        int | None, typer.Option(help="Blocks. (default: 6)", rich_help_panel=_SCRATCH)
    ] = None,
    n_head: Annotated[int | None, typer.Option(help="Heads. (default: 6)", rich_help_panel=_SCRATCH)] = None,
    n_embd: Annotated[
        int | None, typer.Option(help="Width. (default: 384)", rich_help_panel=_SCRATCH)
    ] = None,
    context: Annotated[
        int | None, typer.Option(help="Positions. (default: 256)", rich_help_panel=_SCRATCH)
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="A config.json to start from.", rich_help_panel=_SCRATCH)
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Tokenizer hub id or folder. (default: -m's)", rich_help_panel=_SCRATCH),
    ] = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Fine-tune a model on your text (or train one from scratch), on CPU, a GPU, or many under torchrun.

    Progress goes to stderr, and every logged step is a line in OUT/metrics.jsonl.

    OUT ends as a model folder that `gptcli complete -m OUT` loads.

    Ctrl-C saves a checkpoint and exits 130; the same command with --resume continues the run.
    """
    from gptcli.train import train
    from gptcli.train_config import TrainConfig

    cfg = TrainConfig(
        data=data,
        out_dir=out,
        model=model,
        text_field=text_field,
        val=val or [],
        val_split=val_split,
        block_size=block_size,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        min_lr=min_lr,
        warmup=warmup,
        weight_decay=weight_decay,
        clip=clip,
        dropout=dropout,
        seed=seed,
        device=device,
        precision=precision,
        compile=compile_,
        eval_every=eval_every,
        eval_batches=eval_batches,
        save_every=save_every,
        log_every=log_every,
        resume=resume,
        overwrite=overwrite,
        from_scratch=from_scratch,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        context=context,
        model_config=config,
        tokenizer=tokenizer,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    view = ProgressView(live=is_tty(sys.stderr))
    try:
        result = train(cfg, view.on_event)
    finally:
        view.close()
    if result.main:
        print(summary(result), file=sys.stderr, flush=True)
    if result.interrupted:
        raise typer.Exit(130)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _stats(m: dict[str, Any], val_loss: float | None) -> str:
    parts = [f"loss {m['loss']:.4f}"]
    if val_loss is not None:
        parts.append(f"val {val_loss:.4f}")
    parts.append(f"lr {m['lr']:.2e}")
    parts.append(f"{m['tokens_per_second']:,.0f} tok/s")
    if "mfu" in m:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    parts.append(f"eta {_duration(m['eta_seconds'])}")
    return "  ".join(parts)


class ProgressView:
    """Renders TrainEvents on stderr: a rich progress bar on a terminal, plain lines otherwise (logs)."""

    def __init__(self, live: bool) -> None:
        self.console = stderr()
        self.progress: Any = None
        self.task: Any = None
        self.live = live
        self.spinner: Any = None
        self.val_loss: float | None = None

    def on_event(self, event: TrainEvent) -> None:
        m = event.metrics
        if event.kind == "status":
            if self.live:  # a spinner while the model loads and the data is tokenized
                if self.spinner is None:
                    self.spinner = self.console.status(event.message, spinner="dots")
                    self.spinner.start()
                self.spinner.update(event.message)
            return
        if self.spinner is not None:
            self.spinner.stop()
            self.spinner = None
        if event.kind == "start":
            text = (
                f"training {m['parameters'] / 1e6:.2f}M parameters on {m['device']} ({m['precision']}, "
                f"{m['processes']} process{'es' if m['processes'] > 1 else ''}): {m['train_tokens']:,} "
                f"tokens in blocks of {m['block_size']}, global batch {m['global_batch']}"
            )
            self.console.print(text)
            if self.live:
                self._start_bar(event)
        elif event.kind == "note":
            self.console.print(f"note: {event.message}")
        elif event.kind == "log":
            self.val_loss = m.get("val_loss", self.val_loss)
            if self.progress is not None:  # the bar keeps showing the latest validation loss
                self.progress.update(self.task, completed=event.step, stats=_stats(m, self.val_loss))
            else:  # a log line shows one only where it was measured
                line = f"step {event.step}/{event.total_steps}  {_stats(m, m.get('val_loss'))}"
                print(line, file=sys.stderr, flush=True)

    def _start_bar(self, event: TrainEvent) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[stats]}"),
            console=self.console,
        )
        self.task = self.progress.add_task(
            "train", total=event.total_steps, completed=event.metrics["start_step"], stats=""
        )
        self.progress.start()

    def close(self) -> None:
        if self.spinner is not None:
            self.spinner.stop()
            self.spinner = None
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def summary(result: TrainResult) -> str:
    """One line: how far the run got, its losses, its speed and where the model is."""
    losses = ""
    if result.loss is not None:
        losses = f", loss {result.loss:.4f}"
    if result.val_loss is not None:
        losses += f", val loss {result.val_loss:.4f}"
    if result.interrupted:
        return (
            f"interrupted at step {result.step}/{result.total_steps}{losses}; checkpoint and model saved in "
            f"{result.out_dir}: add --resume to the same command to continue"
        )
    return (
        f"trained {result.step} steps ({result.tokens:,} tokens) in {_duration(result.seconds)}{losses}: "
        f"model in {result.out_dir}"
    )
