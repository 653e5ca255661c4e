"""The `finetune` command: options -> TrainConfig -> gptcli.training.loop.train, with progress on stderr.

The command's options are generated from TrainConfig's fields (their help, flags and panels are written
there), so a default or a help text exists once.
"""

from __future__ import annotations

import inspect
import sys
import typing
from dataclasses import MISSING, fields
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gptcli.cli._common import TRAIN, command, is_tty, quietly_if_gone, stderr
from gptcli.training.config import TrainConfig

if TYPE_CHECKING:
    from gptcli.training.loop import TrainEvent, TrainResult

EPILOG = """\
[bold]Examples[/bold]

  gptcli finetune notes.txt -m gpt2 -o my-gpt2 --steps 500

  gptcli finetune chats.jsonl --text-field body -o out --epochs 2 --batch-size 4 --grad-accum 8

  cat *.txt | gptcli finetune - -o out --from-scratch --tokenizer gpt2 --n-layer 4 --n-embd 256

  torchrun --nproc_per_node 4 -m gptcli finetune corpus.txt -m gpt2 -o out --steps 2000

  gptcli finetune corpus.txt -m gpt2 -o out --steps 2000 --resume    [dim]# after Ctrl-C or a crash[/dim]
"""


def _parameters() -> list[inspect.Parameter]:
    """One typer parameter per TrainConfig field that has an option (all but `betas`)."""
    hints = typing.get_type_hints(TrainConfig)
    params = []
    for f in fields(TrainConfig):
        cli = f.metadata.get("cli")
        if cli is None:
            continue
        kind = hints[f.name]
        if f.name == "out_dir":  # required: a run's output must go somewhere the user chose
            info: Any = typer.Option(*cli["flags"], help=cli["help"])
            default: Any = inspect.Parameter.empty
        elif cli["argument"]:
            info, default = typer.Argument(help=cli["help"]), inspect.Parameter.empty
        else:
            default = f.default if f.default is not MISSING else None  # [] -> None: typer's "not given"
            if f.default_factory is not MISSING:
                kind = kind | None
            flags = cli["flags"] or ("--" + f.name.replace("_", "-"),)
            shown = default is not None and "(default:" not in cli["help"]
            info = typer.Option(*flags, help=cli["help"], show_default=shown, rich_help_panel=cli["panel"])
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info]
            )
        )
    return params


def finetune(**options: Any) -> None:
    """Fine-tune a model on your text (or train one from scratch), on CPU, a GPU, or many under torchrun.

    Progress goes to stderr, and every logged step is a line in OUT/metrics.jsonl.

    OUT ends as a model folder that `gptcli complete -m OUT` loads.

    Ctrl-C saves a checkpoint and exits 130; the same command with --resume continues the run.
    """
    from gptcli.training.loop import train

    cfg = TrainConfig(
        **{name: [] if value is None and name == "val" else value for name, value in options.items()}
    )
    view = ProgressView(live=is_tty(sys.stderr))
    try:
        result = train(cfg, lambda event: quietly_if_gone(view.on_event, event))
    finally:
        quietly_if_gone(view.close)
    if result.main:
        quietly_if_gone(print, summary(result), file=sys.stderr, flush=True)
    if result.interrupted:
        raise typer.Exit(130)


_PARAMETERS = _parameters()
finetune.__signature__ = inspect.Signature(_PARAMETERS)  # type: ignore[attr-defined]
finetune.__annotations__ = {p.name: p.annotation for p in _PARAMETERS}
command(rich_help_panel=TRAIN, epilog=EPILOG)(finetune)


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
            blocks = m["train_tokens"] // m["block_size"]
            text = (
                f"training {m['parameters'] / 1e6:.2f}M parameters on {m['device']} ({m['precision']}, "
                f"{m['processes']} process{'es' if m['processes'] > 1 else ''}): {m['train_tokens']:,} "
                f"training tokens ({_count(blocks, 'block')} of {m['block_size']}), "
                f"global batch {m['global_batch']}"
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
    if result.start_step:  # resumed: this run's steps and time, and the run's totals
        return (
            f"trained steps {result.start_step + 1} to {result.step} in {_duration(result.seconds)} "
            f"(resumed from step {result.start_step}; {_count(result.step, 'step')}, {result.tokens:,} "
            f"tokens in all){losses}: model in {result.out_dir}"
        )
    return (
        f"trained {_count(result.step, 'step')} ({result.tokens:,} tokens) in {_duration(result.seconds)}"
        f"{losses}: model in {result.out_dir}"
    )


def _count(n: int, thing: str) -> str:
    return f"{n:,} {thing}{'' if n == 1 else 's'}"
