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
A run holds OUTDIR/.lock (flock) from before its first write to its exit, so two runs never write into
one folder, and the temporary files a killed run left behind can be removed safely.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from gptcli.errors import GptcliError, UsageError, first_line
from gptcli.training.atomic import (
    atomic_write,
    atomic_write_json,
    file_mode,
    free_space,
    fsync_dir,
    is_temp,
    move_into_place,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MARKER = "gptcli-run.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
DATA = "data"
LOCK = ".lock"
# What --overwrite may delete: only files a run of ours wrote, never anything else in the folder.
_OURS = (MARKER, CHECKPOINT, METRICS, PLOT, DATA)


class RunLock:
    """OUTDIR/.lock, held with flock for a whole run, so that a second run on the folder is refused.

    The kernel drops the lock when the process ends in any way (SIGKILL included), so a crashed run
    never leaves a stale lock. The file itself stays: deleting it would let two runs lock two files.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK
        self._file: IO[str] | None = None

    def acquire(self, *, create: bool = True) -> None:
        """Take the lock (creating OUTDIR and the lock file unless `create` is false: then a folder
        without one is not locked), or raise GptcliError naming the run that holds it."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs there are not protected from each other
            return
        if not create and not self.path.is_file():
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "a+" if create else "r", encoding="utf-8")  # noqa: SIM115 (held until release)
        except OSError as exc:  # no permission, a read-only file system
            raise GptcliError(f"cannot write into {self.path.parent}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip()
            file.close()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise GptcliError(
                f"another gptcli finetune{who} is writing to {self.path.parent}; wait for it to end, "
                "or pick another -o folder"
            ) from None
        if create:  # the pid, for the message the next run gets
            file.seek(0)
            file.truncate()
            file.write(f"{os.getpid()}\n")
            file.flush()
        self._file = file

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None


def check_out_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Whether a run may write into `out_dir`: the checkpoint to resume from, or None to start fresh.

    Refuses a folder that another run is writing to, a folder that holds anything but our own run
    unless `overwrite`, and our own run with a checkpoint unless `resume` or `overwrite`: hours of
    training are not lost to a repeated command. Writes nothing, so a refusal (or a model that then
    fails to load) leaves no trace.
    """
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(
                f"{out_dir} is a file, not a folder: pass -o with a folder for the trained model"
            )
        probe = RunLock(out_dir)
        probe.acquire(create=False)
        probe.release()
        return _check_contents(out_dir, resume=resume, overwrite=overwrite)
    except OSError as exc:  # a name too long, a folder we may not read
        raise UsageError(f"cannot use {out_dir} as the output folder: {exc.strerror or exc}") from exc


def _check_contents(out_dir: Path, *, resume: bool, overwrite: bool) -> Path | None:
    entries = (
        sorted(p.name for p in out_dir.iterdir() if not _ours_in_passing(p.name)) if out_dir.is_dir() else []
    )
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


def _ours_in_passing(name: str) -> bool:
    """The lock, and temporary files of a run that was killed: ours, and never a reason to refuse."""
    return name == LOCK or is_temp(name)


def claim_out_dir(
    out_dir: Path, lock: RunLock, *, resume: bool, overwrite: bool, describe: dict[str, Any]
) -> Path | None:
    """Lock `out_dir`, check it again (another run may have written to it meanwhile), remove what
    killed runs left half-written, and mark it as our run; with `overwrite`, first delete an earlier
    run's files (only those: whatever else the folder holds stays). Returns check_out_dir's answer."""
    lock.acquire()
    resume_from = _check_contents(out_dir, resume=resume, overwrite=overwrite)
    # Under the lock no other run is writing, so every temporary file here is a killed run's leftover.
    for leftover in [*out_dir.glob(".*"), *(out_dir / DATA).glob(".*")]:
        if not is_temp(leftover.name):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    if overwrite:
        for name in _OURS:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = {"gptcli": describe.get("version"), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **describe}
    atomic_write_json(out_dir / MARKER, marker)
    return resume_from


def undo_claim(out_dir: Path, before: set[str] | None) -> None:
    """After a run failed before writing any checkpoint, remove what it created in `out_dir`: the
    folder itself if it did not exist (`before` is None), else only the entries that were not there.
    A failed first run then leaves no half-made folder that the next run would have to be told about.
    """
    try:
        entries = set(os.listdir(out_dir))
    except OSError:
        return
    created = entries - (before or set())
    if CHECKPOINT in created:  # training got far enough to keep: --resume continues it
        return
    for name in created:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if before is None:
        with contextlib.suppress(OSError):
            out_dir.rmdir()


def _read_marker(path: Path) -> bool:
    try:
        return "gptcli" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def save_checkpoint(state: dict[str, Any], out_dir: Path, previous: int | None) -> None:
    """Write checkpoint.pt atomically; on failure say that the previous one (step `previous`) is kept."""
    try:
        atomic_write(out_dir / CHECKPOINT, lambda f: torch.save(state, f))
    except GptcliError as exc:
        kept = (
            f"the checkpoint of step {previous} is kept and --resume continues from it"
            if previous is not None
            else "no checkpoint had been written yet"
        )
        raise GptcliError(f"step {state['step']} was not saved: {exc}; {kept}") from exc


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Our own checkpoint: tensors, numbers and strings only, so the weights_only loader reads it."""
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        return state
    except Exception as exc:
        raise GptcliError(f"cannot read the checkpoint {path}: {first_line(exc)}") from exc


def is_adapter(model: torch.nn.Module) -> bool:
    """Whether `model` is a PEFT model (LoRA), of which only the adapter weights train and are saved."""
    return hasattr(model, "peft_config")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must keep: all of them, or with LoRA only the adapter's (the base is
    frozen and reloads from its folder)."""
    if not is_adapter(model):
        return model.state_dict()
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put `trainable_state`'s weights back; raises RuntimeError when they do not fit the model."""
    if not is_adapter(model):
        model.load_state_dict(state)
        return
    wanted = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != wanted:
        raise RuntimeError(
            f"the checkpoint's adapter weights are not this run's ({len(state)} vs {len(wanted)})"
        )
    model.load_state_dict(state, strict=False)


def export_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Save a model folder (safetensors, config, generation config, tokenizer) into `out_dir`, atomically
    file by file, so `from_pretrained(out_dir)` and `gptcli complete -m out_dir` load it; for a LoRA run,
    PEFT's adapter folder (adapter_config.json naming the base, adapter_model.safetensors) and the
    tokenizer, which `PeftModel.from_pretrained(base, out_dir)` and `gptcli complete -m out_dir` load.

    Its generation_config.json keeps only the base model's token ids: decoding defaults were chosen for
    the base's text (the built-in model's repetition penalty 1.3, say), and would mangle what the
    fine-tuned model learned to repeat (docs/training.md).
    """
    from transformers import GenerationConfig

    if not is_adapter(model):
        ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
        kept = {name: getattr(model.generation_config, name, None) for name in ids}
        model.generation_config = GenerationConfig(**{k: v for k, v in kept.items() if v is not None})
    try:
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export.tmp-") as temp:
            model.save_pretrained(temp, safe_serialization=True)
            tokenizer.save_pretrained(temp)
            # PEFT adds a model card of blanks ("More Information Needed"); gptcli-run.json says more.
            (Path(temp) / "README.md").unlink(missing_ok=True)
            mode = file_mode()
            for file in sorted(Path(temp).iterdir()):
                # safetensors writes through a 0600 temporary file; the folder is for others to load too
                os.chmod(file, mode)
                move_into_place(file, out_dir / file.name, sync_folder=False)
    except Exception as exc:  # a full disk, as safetensors or the tokenizer report it
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise GptcliError(
            f"could not write the model folder into {out_dir} ({reason}{free_space(out_dir)}); "
            f"the checkpoint is kept, and --resume writes the model folder again"
        ) from exc
    fsync_dir(out_dir)


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
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:
            raise GptcliError(
                f"could not write {self.path} ({exc.strerror or exc}{free_space(self.path.parent)}); "
                "free some space, then --resume"
            ) from exc

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
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib: only at the end of a run
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
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
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
    return bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())
