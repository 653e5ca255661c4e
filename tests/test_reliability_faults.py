"""Faults: SIGKILL at random moments, SIGTERM, a full disk, two runs on one folder, damaged model files.

Runs are real processes: `gptcli.cli.main` in a child forked from this test process (torch is already
imported there, so a run starts in milliseconds rather than the seconds of a fresh interpreter, and the
random kill moments fall on gptcli's work rather than on imports). Every child runs torch on one thread,
as this process does, so runs compare bit for bit. GPTCLI_HEAVY=1 raises the number of kills.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from forked import fork_main

import tiny

HEAVY = os.environ.get("GPTCLI_HEAVY", "") not in ("", "0")
KILLS = 25 if HEAVY else 4
STEPS = 24
RUN = ["--batch-size", "4", "--block-size", "32", "--lr", "1e-3", "--save-every", "2", "--log-every", "1"]
RUN += ["--eval-every", "8", "--seed", "7", "--steps", str(STEPS), "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def _warm_imports() -> None:
    """What a run imports late (matplotlib for loss.png), imported once here so forked children share it."""
    import matplotlib.backends.backend_agg
    import matplotlib.figure  # noqa: F401


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "corpus.txt"
    path.write_text(tiny.TEXT * 4, encoding="utf-8")
    return path


# -- a run in a child process ---------------------------------------------------------------------------


@dataclass
class Child:
    pid: int
    log: Path
    code: int | None = None  # once reaped

    def wait(self, timeout: float = 120) -> int:
        """The exit code (negative: killed by that signal); a child still running at `timeout` fails."""
        deadline = time.monotonic() + timeout
        while self.code is None and time.monotonic() < deadline:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.code = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.01)
        if self.code is not None:
            return self.code
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        pytest.fail(f"gptcli still running after {timeout} s:\n{self.stderr}")

    def running(self) -> bool:
        if self.code is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code is None

    @property
    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def fork_gptcli(*args: object, log: Path, file_limit: int | None = None) -> Child:
    """Run `gptcli ARGS` in a forked child, stdout and stderr into `log`; `file_limit` caps the size of
    every file the child writes (RLIMIT_FSIZE: a write past it fails with EFBIG, as on a full disk)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def limit() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.RLIM_INFINITY))

    try:
        pid = fork_main(*args, stdout=fd, stderr=fd, close=[fd], before=limit)
    finally:
        os.close(fd)
    return Child(pid, log)


def finetune(model: Path, corpus: Path, out: Path, *extra: object, file_limit: int | None = None) -> Child:
    log = out.with_name(out.name + f".log-{time.monotonic_ns()}")
    return fork_gptcli(
        "finetune", corpus, "-m", model, "-o", out, *RUN, *extra, log=log, file_limit=file_limit
    )


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def checkpoint(out: Path) -> dict | None:
    """The checkpoint a --resume would read (None: none yet); it must load with the weights_only loader."""
    import torch

    path = out / "checkpoint.pt"
    if not path.exists():
        return None
    state: dict = torch.load(path, map_location="cpu", weights_only=True)
    return state


def saved_step(out: Path) -> int:
    """The step of the checkpoint in `out`, which must be there."""
    state = checkpoint(out)
    assert state is not None, f"no checkpoint in {out}"
    return int(state["step"])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def leftovers(out: Path) -> list[str]:
    """Temporary files and folders of interrupted writes."""
    found = [*out.glob(".*.tmp-*"), *out.glob(".export.tmp-*"), *(out / "data").glob(".*.tmp-*")]
    return sorted(p.name for p in found)


def assert_same_run(out: Path, reference: Path) -> None:
    """Bit for bit: the same weights, and the same logged losses step by step."""
    import torch

    mine, theirs = weights(out), weights(reference)
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(mine[name], tensor), name
    got, want = metrics(out), metrics(reference)
    assert [r["step"] for r in got] == list(range(STEPS + 1))  # step 0: the baseline validation loss
    for have, expected in zip(got, want, strict=True):
        assert (have.get("loss"), have.get("val_loss")) == (expected.get("loss"), expected.get("val_loss")), (
            have
        )


@pytest.fixture(scope="module")
def reference(bpe_model: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """An uninterrupted run of the command every test here interrupts, and how long it took."""
    out = tmp_path_factory.mktemp("reference") / "out"
    started = time.monotonic()
    child = finetune(bpe_model, corpus, out)
    assert child.wait() == 0, child.stderr
    return out, time.monotonic() - started


# -- SIGKILL at random moments ----------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_the_uninterrupted_run(
    bpe_model: Path, corpus: Path, reference: tuple[Path, float], tmp_path: Path
) -> None:
    """Kill runs at uniformly random moments (setup, tokenizing, steps, checkpoint writes, export) and
    restart each with --resume, as a job script would, until KILLS kills have landed. After every kill
    the checkpoint loads (or there is none yet) and never goes back, and the next --resume gets the lock
    the killed run held (the kernel drops a flock with its process); every chain of restarts ends with
    the weights and losses of the uninterrupted run, and no temporary file is left."""
    ref_out, ref_seconds = reference
    rng = random.Random(int(os.environ.get("GPTCLI_SEED", "20261129")) if not HEAVY else None)
    landed = {"no checkpoint yet": 0, "mid-run": 0, "after the last step": 0, "during a write": 0}
    kills = chains = 0
    while kills < KILLS:
        out = tmp_path / f"chain-{chains}"
        last_step = 0
        while True:
            child = finetune(bpe_model, corpus, out, "--resume")
            time.sleep(rng.uniform(0, ref_seconds))
            os.kill(child.pid, signal.SIGKILL)  # a child that already ended is a zombie until waited for
            code = child.wait()
            if code == 0:  # it finished before the kill: the chain is complete
                break
            assert code == -signal.SIGKILL, child.stderr
            kills += 1
            state = checkpoint(out)  # a --resume reads exactly this
            step = 0 if state is None else state["step"]
            assert step >= last_step, f"the checkpoint went back from step {last_step} to {step}"
            last_step = step
            if leftovers(out):
                landed["during a write"] += 1
            elif state is None:
                landed["no checkpoint yet"] += 1
            elif step == STEPS:
                landed["after the last step"] += 1
            else:
                landed["mid-run"] += 1
            if kills >= KILLS:  # the last chain: let the resumed run finish
                final = finetune(bpe_model, corpus, out, "--resume")
                assert final.wait() == 0, final.stderr
                break
        assert_same_run(out, ref_out)
        assert leftovers(out) == [] and (out / ".lock").is_file()
        chains += 1
    print(f"\nSIGKILL: {kills} kills in {chains} chains (a run takes {ref_seconds:.1f} s), all resumed to")
    print(f"the reference weights; where they landed: {landed}")


# -- SIGTERM behaves like Ctrl-C; a full disk keeps the last checkpoint ----------------------------------


def wait_for_step(out: Path, step: int, child: Child, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for line in (out / "metrics.jsonl").read_text().splitlines():
                with contextlib.suppress(ValueError):  # a line being written
                    if json.loads(line)["step"] >= step:
                        return
        assert child.running(), child.stderr
        time.sleep(0.005)
    pytest.fail(f"no step {step} within {timeout} s")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_sigterm_then_a_full_disk_then_resume_equals_the_uninterrupted_run(
    bpe_model: Path, corpus: Path, reference: tuple[Path, float], tmp_path: Path
) -> None:
    """SIGTERM behaves like Ctrl-C: the step ends, a checkpoint and the model folder are written, exit 130.
    Then a resume on a full disk: RLIMIT_FSIZE makes every write past 100 KB fail with EFBIG, as a full
    disk fails with ENOSPC, so the next checkpoint (about 550 KB) cannot be written. That run stops with
    one clear line, the previous checkpoint is byte for byte what it was and no temporary file is left.
    With room again, --resume ends where the uninterrupted run ends."""
    out = tmp_path / "out"
    child = finetune(bpe_model, corpus, out)
    wait_for_step(out, 4, child)
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait(timeout=30) == 130, child.stderr
    kept = saved_step(out)
    assert 4 <= kept < STEPS and max(r["step"] for r in metrics(out)) == kept
    assert f"interrupted at step {kept}/{STEPS}" in child.stderr and "--resume" in child.stderr
    assert "Error" not in child.stderr and "Traceback" not in child.stderr
    assert (out / "model.safetensors").is_file()  # the model folder of the interrupted run, too
    before = digest(out / "checkpoint.pt")

    full = finetune(bpe_model, corpus, out, "--resume", file_limit=100_000)
    assert full.wait() == 1, full.stderr
    last = full.stderr.rstrip("\n").splitlines()[-1]
    next_save = kept + 2 - kept % 2  # --save-every 2; SIGTERM may have saved an odd step
    assert last.startswith(f"Error: step {next_save} was not saved: could not write {out / 'checkpoint.pt'}")
    assert "File too large" in last and "MB free on that disk" in last
    assert f"the checkpoint of step {kept} is kept and --resume continues from it" in last
    assert sum(line.startswith("Error:") for line in full.stderr.splitlines()) == 1
    assert "Traceback" not in full.stderr
    assert digest(out / "checkpoint.pt") == before and saved_step(out) == kept
    assert leftovers(out) == []

    resumed = finetune(bpe_model, corpus, out, "--resume")
    assert resumed.wait() == 0, resumed.stderr
    assert f"resumed from step {kept}" in resumed.stderr
    assert_same_run(out, reference[0])


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        (4_000, "could not write the token cache"),  # 2,700 tokens of 2 bytes
        (100_000, "step 2 was not saved: could not write"),  # the first checkpoint, ~550 KB
    ],
)
def test_a_full_disk_before_any_checkpoint_says_so(
    bpe_model: Path, corpus: Path, tmp_path: Path, limit: int, message: str
) -> None:
    out = tmp_path / "out"
    full = finetune(bpe_model, corpus, out, file_limit=limit)
    assert full.wait() == 1, full.stderr
    last = full.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"Error: {message}") and "File too large" in last, last
    assert "GPTCLI_DEBUG" not in last and sum(x.startswith("Error:") for x in full.stderr.splitlines()) == 1
    assert not (out / "checkpoint.pt").exists() and leftovers(out) == []


def test_a_full_disk_while_exporting_keeps_the_checkpoint(
    bpe_model: Path, corpus: Path, reference: tuple[Path, float], tmp_path: Path
) -> None:
    """Killed after its last checkpoint, before the model folder was written; resumed on a full disk,
    the export fails with one line and leaves nothing half-written; resumed with room, it exports."""
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        (out / name).unlink()
    full = finetune(bpe_model, corpus, out, "--resume", file_limit=100_000)  # model.safetensors: 172 KB
    assert full.wait() == 1, full.stderr
    last = full.stderr.rstrip("\n").splitlines()[-1]
    assert (
        last.startswith(f"Error: could not write the model folder into {out} (") and "File too large" in last
    )
    assert last.endswith("the checkpoint is kept, and --resume writes the model folder again")
    assert not (out / "model.safetensors").exists() and leftovers(out) == []
    resumed = finetune(bpe_model, corpus, out, "--resume")
    assert resumed.wait() == 0, resumed.stderr
    assert_same_run(out, reference[0])


# -- two runs on one folder -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused(
    bpe_model: Path, corpus: Path, reference: tuple[Path, float], tmp_path: Path, cli
) -> None:
    """While a run writes into OUT, another is refused at once (plain, --resume or --overwrite), before
    it loads anything and without touching a file; the first run ends as if alone."""
    out = tmp_path / "out"
    first = finetune(bpe_model, corpus, out, "--save-every", "1")  # slower: many checkpoints
    wait_for_step(out, 2, first)
    kept = ("gptcli-run.json", ".lock", "data", "data/train.bin", "data/meta.json")
    files = {name: (out / name).stat().st_mtime_ns for name in kept}
    for extra in ([], ["--resume"], ["--overwrite"]):
        second = cli("finetune", corpus, "-m", bpe_model, "-o", out, *RUN, *extra)
        assert second.code == 1, second.err
        assert second.err == (
            f"Error: another gptcli finetune (pid {first.pid}) is writing to {out}; "
            "wait for it to end, or pick another -o folder\n"
        )
    assert first.running(), "the first run should still be training"
    for name, mtime in files.items():  # the second run wrote nothing (the first rewrites only its
        assert (out / name).stat().st_mtime_ns == mtime, name  # checkpoint and metrics by now)
    assert first.wait() == 0, first.stderr
    assert_same_run(out, reference[0])  # --save-every 1 changes when it saves, not what it computes
    again = cli("finetune", corpus, "-m", bpe_model, "-o", out, *RUN, "--resume")  # the lock is free again
    assert again.code == 0, again.err


# -- damaged model files ----------------------------------------------------------------------------------


def damaged(model: Path, tmp_path: Path, how: str) -> Path:
    folder = tmp_path / f"damaged-{how.replace('.', '-')}"
    shutil.copytree(model, folder)
    if how == "config.json":
        (folder / "config.json").write_text("{not json")
    elif how == "model.safetensors":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "tokenizer.json":
        (folder / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    return folder


@pytest.mark.parametrize(
    "how",
    [
        "config.json",
        "model.safetensors",
        pytest.param(
            "tokenizer.json",
        ),
    ],
)
def test_finetune_names_the_damaged_file(
    bpe_model: Path, corpus: Path, tmp_path: Path, how: str, cli
) -> None:
    folder = damaged(bpe_model, tmp_path, how)
    out = tmp_path / "out"
    result = cli("finetune", corpus, "-m", folder, "-o", out, *RUN)
    assert result.code == 1, result.err
    assert result.err.startswith("Error: ") and result.err.count("\n") == 1, result.err
    assert str(folder / how) in result.err
    assert not out.exists()  # refused before anything was written


def test_a_damaged_checkpoint_is_named(bpe_model: Path, corpus: Path, reference, tmp_path: Path, cli) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    result = cli("finetune", corpus, "-m", bpe_model, "-o", out, *RUN, "--steps", str(STEPS + 2), "--resume")
    assert result.code == 1
    assert result.err.startswith(f"Error: cannot read the checkpoint {out / 'checkpoint.pt'}: ")
    assert result.err.count("\n") == 1


# -- complete in a fresh interpreter: a closed pipe and Ctrl-C --------------------------------------------
# tests/test_complete.py covers both in forked children on every run; these start `python -m gptcli` as a
# shell would (a few seconds of imports each), so they run with GPTCLI_HEAVY=1.

ENDLESS = ("-n", "100", "-N", "1000", "--ignore-eos", "--seed", "1", "--temperature", "3", "--top-k", "0")


@pytest.mark.skipif(not HEAVY, reason="a fresh interpreter each: GPTCLI_HEAVY=1")
def test_complete_into_a_closed_pipe_exits_141_quietly(bpe_model: Path) -> None:
    import subprocess

    argv = [sys.executable, "-m", "gptcli", "complete", "今天", "-m", str(bpe_model), *ENDLESS]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(20)
    proc.stdout.close()  # `| head -c 20`
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and len(head) == 20
    assert err == b""


@pytest.mark.skipif(not HEAVY, reason="a fresh interpreter each: GPTCLI_HEAVY=1")
def test_complete_interrupted_by_sigint_keeps_its_text(bpe_model: Path) -> None:
    import subprocess

    argv = [sys.executable, "-m", "gptcli", "complete", "今天", "-m", str(bpe_model), *ENDLESS]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    printed = proc.stdout.read(30)  # generation is under way
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    text = (printed + out).decode("utf-8", errors="replace")
    assert len(text) > 10 and text.endswith("\n")  # what was printed stays, and its line is ended
    assert b"Traceback" not in err and b"Error" not in err
