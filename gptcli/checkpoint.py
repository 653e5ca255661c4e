"""What a training run keeps in OUTDIR, and how it writes it so that a kill at any moment is harmless.

OUTDIR/
  gptcli-run.json     marks the folder as a gptcli run (and records how it was started)
  checkpoint.pt       the last good checkpoint: model, optimizer, scaler, step, RNG states, data position
  metrics.jsonl       one JSON line per logged step
  data/               token ids of the training (and --val) data, reused by --resume
  loss.png            train and validation loss against tokens seen (at the end)
  config.json, generation_config.json, model.safetensors, tokenizer files: the trained model (at the end)

Every file is written under a temporary name, fsynced, then renamed over the old one: a reader (or a
resume after SIGKILL) sees either the previous complete file or the new complete file, never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gptcli.errors import GptcliError, UsageError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MARKER = "gptcli-run.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
DATA = "data"
# What --overwrite may delete: only files a run of ours wrote, never anything else in the folder.
_OURS = (MARKER, CHECKPOINT, METRICS, PLOT, DATA)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every OS (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through `write(file)` under a temporary name, fsync it, then rename it into place."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def check_out_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Whether a run may write into `out_dir`: the checkpoint to resume from, or None to start fresh.

    Refuses a folder that holds anything but our own run unless `overwrite`, and our own run with a
    checkpoint unless `resume` or `overwrite`: hours of training are not lost to a repeated command.
    Writes nothing, so a refusal (or a model that then fails to load) leaves no trace.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file, not a folder: pass -o with a folder for the trained model")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    ours = MARKER in entries and _read_marker(out_dir / MARKER)
    checkpoint = out_dir / CHECKPOINT
    if overwrite:
        return None
    if entries and not ours:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise UsageError(
            f"{out_dir} already holds files that are not a gptcli run ({shown}); "
            "pick another -o folder, or pass --overwrite to write into it anyway"
        )
    if checkpoint.is_file() and not resume:
        raise UsageError(
            f"{out_dir} holds a gptcli run with a checkpoint; pass --resume to continue it, "
            "or --overwrite to start over"
        )
    return checkpoint if resume and checkpoint.is_file() else None


def claim_out_dir(out_dir: Path, *, overwrite: bool, describe: dict[str, Any]) -> None:
    """Create `out_dir` and mark it as our run; with `overwrite`, first delete an earlier run's files
    (only those: whatever else the folder holds stays)."""
    if overwrite:
        for name in _OURS:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = {"gptcli": describe.get("version"), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **describe}
    atomic_write(out_dir / MARKER, lambda f: f.write(json.dumps(marker, indent=1, default=str).encode()))


def _read_marker(path: Path) -> bool:
    try:
        return "gptcli" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def save_checkpoint(state: dict[str, Any], out_dir: Path) -> None:
    import torch

    atomic_write(out_dir / CHECKPOINT, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Our own checkpoint: tensors, numbers and strings only, so the weights_only loader reads it."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GptcliError(f"cannot read the checkpoint {path}: {exc}") from exc


def export_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Save a model folder (safetensors, config, generation config, tokenizer) into `out_dir`, atomically
    file by file, so `from_pretrained(out_dir)` and `gptcli complete -m out_dir` load it."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as temp:
        model.save_pretrained(temp, safe_serialization=True)
        tokenizer.save_pretrained(temp)
        for file in sorted(Path(temp).iterdir()):
            with open(file, "rb") as f:
                os.fsync(f.fileno())
            os.replace(file, out_dir / file.name)
    _fsync_dir(out_dir)


class MetricsLog:
    """OUTDIR/metrics.jsonl: one JSON object per logged step, flushed at once so `tail -f` follows it."""

    def __init__(self, path: Path, *, keep_until: int | None) -> None:
        """Open the log; on resume keep only the lines up to the checkpoint's step (`keep_until`)."""
        self.path = path
        kept = []
        if keep_until is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= keep_until:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill mid-write
        text = "".join(line + "\n" for line in kept)
        atomic_write(path, lambda f: f.write(text.encode()))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the whole run)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def plot_losses(metrics: Path, out: Path) -> None:
    """loss.png: training and validation loss against tokens seen."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics)
    # The Figure API with an Agg canvas: no pyplot, so no global backend switch and no display needed.
    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = [(r["tokens"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["tokens"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", markersize=3)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png"))


def rng_state(device: torch.device) -> dict[str, Any]:
    """The random streams dropout draws from, so a resumed run draws the same masks."""
    import torch

    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def non_finite_message(what: str, step: int, last_saved: int | None, out: Path) -> str:
    """Why the run stopped and what was kept, for a loss or weights that are no longer finite."""
    kept = (
        f"the last good checkpoint (step {last_saved}) is kept in {out / 'checkpoint.pt'}"
        if last_saved is not None
        else "no checkpoint had been written yet"
    )
    return (
        f"{what} by step {step}, so the run stopped; {kept}. "
        "Try a lower --lr (and --precision bf16 or fp32 if this was fp16), then --resume"
    )


def all_finite(model: torch.nn.Module) -> bool:
    """Whether every weight is finite: checked before a checkpoint may replace the last good one."""
    import torch

    return bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())
