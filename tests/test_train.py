"""`gptcli finetune` and gptcli.training on the tiny fixture models: real training runs, real processes."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gptcli.training.config import TrainConfig
from gptcli.training.loop import lr_at, train

import tiny

# conftest runs torch on one thread in this process; subprocesses get the same setting, so that their
# numbers match the in-process runs bit for bit.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "GPTCLI_DEBUG": "1"}
SMALL = ["--batch-size", "4", "--block-size", "32", "--log-every", "1"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(tiny.TEXT * 4, encoding="utf-8")  # about 2,700 tokens: 84 blocks of 32
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint_step(out: Path) -> int:
    import torch

    return int(torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["step"])


def corpus_loss(model, tokenizer, text: str) -> float:
    import torch

    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:120]])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss.item())


def test_loss_falls_and_the_output_is_a_model_folder(cli, bpe_model: Path, corpus: Path, tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from gptcli.loading.models import load_model

    out = tmp_path / "out"
    args = ["--steps", "40", "--lr", "3e-3", "--eval-every", "20", "--seed", "0"]
    result = cli("finetune", corpus, "-m", bpe_model, "-o", out, *SMALL, "--batch-size", "8", *args)
    assert result.code == 0, result.err
    assert result.out == ""  # stdout is for data; all talk goes to stderr
    assert "trained 40 steps" in result.err and f"model in {out}" in result.err

    baseline, *records = metrics(out)
    assert baseline["step"] == 0 and baseline["tokens"] == 0 and "loss" not in baseline  # before training
    assert [r["step"] for r in records] == list(range(1, 41))
    assert {"step", "loss", "lr", "tokens", "tokens_per_second"} <= set(records[0])
    assert records[-1]["tokens"] == 40 * 8 * 32
    first, last = sum(r["loss"] for r in records[:5]) / 5, sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.85 * first, (first, last)  # (the fixture has seen this text before: it starts low)
    vals = [r["val_loss"] for r in [baseline, *records] if "val_loss" in r]
    assert len(vals) == 3 and vals[2] < vals[1] < vals[0]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The folder loads with plain transformers and with gptcli's loader, and holds the trained weights.
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not list(out.glob("*.bin"))
    trained = AutoModelForCausalLM.from_pretrained(out)
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    for name, tensor in trained.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    lm = load_model(str(out), device="cpu")
    base = AutoModelForCausalLM.from_pretrained(bpe_model)
    assert (
        corpus_loss(tiny.reference_model(lm), lm.tokenizer, tiny.TEXT)
        < corpus_loss(base, lm.tokenizer, tiny.TEXT) - 0.3
    )
    ids = torch.tensor([lm.tokenizer("今天天气")["input_ids"]])
    greedy = tiny.reference_model(lm).generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
    )
    with torch.no_grad():  # the reference: argmax, one token at a time, no cache
        for _ in range(8):
            ids = torch.cat([ids, trained(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert greedy.tolist() == ids.tolist()


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_losses(bpe_model: Path, corpus: Path, tmp_path: Path):
    """Kill a real run with SIGKILL between two saves; resuming it must retrace the uninterrupted run.

    Dropout stays on (the fixture's 0.1), so this also checks that the RNG streams are restored.
    """
    common: dict[str, Any] = dict(
        data=[str(corpus)], model=str(bpe_model), steps=30, batch_size=4, block_size=32
    )
    common |= dict(lr=1e-3, save_every=10, log_every=1, eval_every=15, seed=5)
    reference = train(TrainConfig(out_dir=tmp_path / "ref", **common))
    assert not reference.interrupted

    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "gptcli", "finetune", str(corpus), "-m", str(bpe_model), "-o", str(out)]
    argv += ["--steps", "30", "--batch-size", "4", "--block-size", "32", "--lr", "1e-3", "--save-every", "10"]
    argv += ["--log-every", "1", "--eval-every", "15", "--seed", "5"]
    proc = subprocess.Popen(argv, env={**os.environ, **ONE_THREAD}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and any(r["step"] >= 13 for r in _safe_metrics(out)):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    saved, logged = checkpoint_step(out), max(r["step"] for r in _safe_metrics(out))
    assert saved % 10 == 0 and 10 <= saved <= logged < 30
    assert not (out / "model.safetensors").exists()  # it never finished

    resumed = train(TrainConfig(out_dir=out, resume=True, **common))
    assert resumed.step == 30 and not resumed.interrupted
    expected, got = metrics(tmp_path / "ref"), metrics(out)
    assert [r["step"] for r in got] == list(range(31))  # the killed run's extra lines were dropped
    assert got[0] == expected[0]  # the baseline, at step 0
    for want, have in zip(expected[1:], got[1:], strict=True):
        # Bit for bit: same ops, same order, same single thread (a tolerance would hide a lost RNG state
        # less well than this does).
        assert have["loss"] == want["loss"], have["step"]
        assert have.get("val_loss") == want.get("val_loss"), have["step"]
        assert have["lr"] == want["lr"] and have["tokens"] == want["tokens"]


def _safe_metrics(out: Path) -> list[dict]:
    records = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written right now
            records.append(json.loads(line))
    return records


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_130(cli, bpe_model, corpus, tmp_path, sig):
    """Ctrl-C, SIGTERM and SIGHUP (the terminal closed, SSH dropped) each save and stop."""
    out = tmp_path / "out"

    def interrupt_after_step_3() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (out / "metrics.jsonl").exists() and any(r["step"] >= 3 for r in _safe_metrics(out)):
                os.kill(os.getpid(), sig)
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=interrupt_after_step_3, daemon=True)
    watcher.start()
    result = cli("finetune", corpus, "-m", bpe_model, "-o", out, *SMALL, "--steps", "5000")
    watcher.join()
    assert result.code == 130, result.err
    step = checkpoint_step(out)
    assert 3 <= step < 5000 and max(r["step"] for r in metrics(out)) <= step
    assert f"interrupted at step {step}/5000" in result.err and "--resume" in result.err
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one_process(bpe_model: Path, corpus: Path, tmp_path: Path):
    """2 gloo processes x batch 2 see the same sequences per step as 1 process x batch 4."""
    common = ["--steps", "6", "--grad-accum", "2", "--block-size", "32", "--lr", "3e-3", "--dropout", "0"]
    common += ["--log-every", "1", "--eval-every", "3", "--eval-batches", "2", "--device", "cpu"]
    two = tmp_path / "two"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv += [
        "-m",
        "gptcli",
        "finetune",
        str(corpus),
        "-m",
        str(bpe_model),
        "-o",
        str(two),
        "--batch-size",
        "2",
    ]
    proc = subprocess.Popen(
        argv + common, env={**os.environ, **ONE_THREAD}, stderr=subprocess.PIPE, text=True
    )

    one = tmp_path / "one"  # meanwhile, the single process in this one
    cfg = TrainConfig(data=[str(corpus)], model=str(bpe_model), out_dir=one, steps=6, batch_size=4)
    cfg.grad_accum, cfg.block_size, cfg.lr, cfg.dropout, cfg.device = 2, 32, 3e-3, 0.0, "cpu"
    cfg.log_every, cfg.eval_every, cfg.eval_batches = 1, 3, 2
    train(cfg)

    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err.count("trained 6 steps") == 1 and "2 processes" in err  # rank 0 alone reports
    expected, got = metrics(one), metrics(two)
    assert [r["step"] for r in got] == list(range(7))  # rank 0 alone writes; step 0 is the baseline
    assert got[0]["val_loss"] == pytest.approx(expected[0]["val_loss"], abs=1e-4)
    for want, have in zip(expected[1:], got[1:], strict=True):
        assert have["loss"] == pytest.approx(want["loss"], abs=1e-4), have["step"]
        assert have.get("val_loss") == pytest.approx(want.get("val_loss"), abs=1e-4)
        assert have["tokens"] == want["tokens"]
    assert expected[-1]["loss"] < expected[1]["loss"]  # it trained, so the match means something


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(cli, bpe_model, corpus, tmp_path):
    out = tmp_path / "out"
    # lr 1e30: the first Adam step turns every weight into ~1e30, and the next loss overflows.
    args = ["--steps", "20", "--lr", "1e30", "--warmup", "0", "--save-every", "1"]
    result = cli("finetune", corpus, "-m", bpe_model, "-o", out, *SMALL, *args)
    assert result.code == 1
    assert "the training loss became NaN by step 2" in result.err
    assert "last good checkpoint (step 1) is kept" in result.err
    assert checkpoint_step(out) == 1
    assert not (out / "model.safetensors").exists()


def test_from_scratch_with_a_config_file_and_overrides(cli, bpe_model: Path, corpus: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tmp_path / "small.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16}))
    out = tmp_path / "out"
    args = [
        "--from-scratch",
        "--tokenizer",
        bpe_model,
        "--config",
        config,
        "--n-layer",
        "2",
        "--context",
        "48",
    ]
    result = cli("finetune", corpus, "-o", out, *args, "--steps", "3", "--block-size", "48")
    assert result.code == 0, result.err
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_positions) == (2, 2, 16, 48)
    assert c.vocab_size == len(tokenizer) == len(AutoTokenizer.from_pretrained(bpe_model))
    assert c.eos_token_id == tokenizer.eos_token_id


def test_jsonl_from_stdin_with_a_bert_tokenizer(cli, bert_model: Path, tmp_path: Path):
    """The BERT fixture has no EOS token: documents are separated by the model's eos id ([SEP])."""
    lines = "".join(json.dumps({"body": line}, ensure_ascii=False) + "\n" for line in tiny.TEXT.splitlines())
    out = tmp_path / "out"
    (tmp_path / "chats.jsonl").write_text(lines * 3, encoding="utf-8")
    args = ["--text-field", "body", "--steps", "2", "--val-split", "0", "--block-size", "16"]
    result = cli("finetune", tmp_path / "chats.jsonl", "-m", bert_model, "-o", out, *args)
    assert result.code == 0, result.err
    assert "60 documents" in result.err
    from transformers import AutoTokenizer

    sep = AutoTokenizer.from_pretrained(bert_model).sep_token_id
    import numpy as np

    ids = np.fromfile(out / "data" / "train.bin", dtype=np.uint16)
    assert (ids == sep).sum() == 60 and ids[-1] == sep

    piped = cli("finetune", "-", "-m", bert_model, "-o", tmp_path / "piped", *args[2:], stdin=tiny.TEXT * 3)
    assert piped.code == 0, piped.err
    assert "1 document:" in piped.err


def test_bad_inputs_are_refused_with_a_reason(cli, bpe_model: Path, corpus: Path, tmp_path: Path):
    def run(*args):
        return cli("finetune", "-m", bpe_model, *SMALL, "--steps", "2", *args)  # later options win

    (tmp_path / "empty.txt").write_text("")
    r = run(tmp_path / "empty.txt", "-o", tmp_path / "a")
    assert r.code == 2 and "no text in the training data" in r.err and "empty.txt" in r.err

    (tmp_path / "short.txt").write_text("今天天气很好")
    r = run(tmp_path / "short.txt", "-o", tmp_path / "b")
    assert r.code == 2 and "fewer than one block of 32 + 1: refusing to pad" in r.err

    (tmp_path / "latin1.txt").write_bytes(b"abc\ncaf\xe9\n")
    r = run(tmp_path / "latin1.txt", "-o", tmp_path / "c")
    assert r.code == 2 and f"{tmp_path / 'latin1.txt'} is not valid UTF-8 (byte offset 7)" in r.err

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    r = run(corpus, "-o", foreign)
    assert r.code == 2 and "not a gptcli run (cat.jpg)" in r.err and "--overwrite" in r.err
    assert sorted(p.name for p in foreign.iterdir()) == ["cat.jpg"]  # nothing written
    r = run(corpus, "-o", foreign, "--overwrite")
    assert r.code == 0, r.err
    assert (foreign / "cat.jpg").read_bytes() == b"\xff\xd8" and (foreign / "model.safetensors").exists()

    r = run(corpus, "-o", foreign)  # our own finished run: not clobbered by a repeated command
    assert r.code == 2 and "--resume" in r.err
    smaller = [
        "--from-scratch",
        "--tokenizer",
        bpe_model,
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "16",
    ]
    r = run(corpus, "-o", foreign, "--resume", *smaller)
    assert r.code == 1 and "does not fit this model" in r.err

    r = run(corpus, "-o", tmp_path / "f", "-m", tmp_path / "no-such-model")
    assert r.code == 2 and not (tmp_path / "f").exists()  # a refusal leaves nothing behind
    r = run(corpus, "-o", tmp_path / "d", "--steps", "3", "--epochs", "1")
    assert r.code == 2 and "not both" in r.err
    r = run(corpus, "-o", tmp_path / "e", "--block-size", "500")
    assert r.code == 2 and "longer than the model's context (128" in r.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "inf"], "--epochs must be a finite number (got inf)"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number (got nan)"),
        (["--clip", "nan"], "--clip must be a finite number"),
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--seed", "-1"], "--seed must be between 0 and 2**63 - 1 (got -1)"),
        (["--seed", str(2**64)], "--seed must be between 0 and 2**63 - 1"),
        (["--from-scratch", "--n-head", "0"], "--n-head must be at least 1"),
        (["--from-scratch", "--context", "-3"], "--context must be at least 1"),
        (["--from-scratch", "--n-layer", str(10**12)], "needs about"),
        (["--from-scratch", "--n-embd", str(2**40), "--n-head", "1"], "more than the"),
        (["--batch-size", str(10**9)], "--batch-size 1000000000 with blocks of 32 tokens needs"),
    ],
)
def test_values_that_cannot_work_are_refused_first(cli, bpe_model, corpus, tmp_path, args, message):
    """NaN passes every comparison, inf never ends, and a model or batch bigger than the machine's memory
    would loop or allocate for minutes before failing: all refused at once, nothing written."""
    out = tmp_path / "out"
    started = time.monotonic()
    result = cli("finetune", corpus, "-m", bpe_model, "-o", out, *SMALL, "--steps", "2", *args)
    assert result.code == 2, result.err
    assert message in result.err and result.err.count("\n") == 1, result.err
    assert time.monotonic() - started < 30
    if "--batch-size" not in args:  # the batch is checked once the data's block size is known
        assert not out.exists()


def test_schedule_warms_up_then_decays_to_min_lr():
    lrs = [lr_at(step, 1.0, 0.1, 4, 20) for step in range(21)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == 1.0 and lrs[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lr_at(0, 1.0, 0.1, 0, 20) == 1.0  # --warmup 0


def test_every_finetune_option_defaults_to_trainconfig() -> None:
    """The command is generated from TrainConfig: each option's default is the field's, nothing else."""
    import dataclasses

    import typer

    from gptcli.cli import app

    command = typer.main.get_command(app).commands["finetune"]  # type: ignore[attr-defined]
    params = {p.name: p for p in command.params if p.name != "help"}
    defaults = TrainConfig()
    checked = 0
    for f in dataclasses.fields(TrainConfig):
        if f.name == "betas":  # no option: a fixed choice, documented on the field
            assert f.name not in params
            continue
        param = params[f.name]
        expected = getattr(defaults, f.name)
        given = param.default if param.default is not None else ([] if isinstance(expected, list) else None)
        if f.name in ("data", "out_dir"):  # required: no default on the command line
            assert param.required, f.name
        else:
            assert given == expected, (f.name, given, expected)
        assert param.help == f.metadata["cli"]["help"], f.name
        checked += 1
    assert checked == len(params) == 44


def found(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text)
    assert match is not None, (pattern, text)
    return match


def test_the_numbers_of_tokens_agree(cli, bpe_model: Path, corpus: Path, tmp_path: Path) -> None:
    """The start line and the data notes count the same tokens, and say what each number is."""
    import re

    result = cli("finetune", corpus, "-m", bpe_model, "-o", tmp_path / "out", *SMALL, "--steps", "1")
    assert result.code == 0, result.err
    tokenized = int(found(r"tokenized 1 document: ([\d,]+) tokens", result.err)[1].replace(",", ""))
    train, val, block = map(
        int, found(r"(\d+) training \+ (\d+) validation blocks of (\d+)", result.err).groups()
    )
    left = re.search(r"the last ([\d,]+) tokens make a short final block", result.err)
    left_over = int(left[1].replace(",", "")) if left else 0
    assert left_over  # this corpus does not fill its last block: the short final one trains on the rest
    assert (train - 1 + val) * block + left_over + 1 == tokenized  # every token once, none dropped
    assert f"{(train - 1) * block + left_over:,} training tokens ({train:,} blocks of {block})" in result.err


def test_a_fine_tuned_model_keeps_only_the_token_ids_of_the_generation_config(
    cli, bpe_model: Path, corpus: Path, tmp_path: Path
) -> None:
    """The base's decoding defaults (a repetition penalty tuned for its own text) do not carry over."""
    import shutil

    base = Path(shutil.copytree(bpe_model, tmp_path / "base"))
    settings = json.loads((base / "generation_config.json").read_text())
    settings.update(repetition_penalty=1.3, top_k=7, do_sample=True)
    (base / "generation_config.json").write_text(json.dumps(settings))
    out = tmp_path / "out"
    assert cli("finetune", corpus, "-m", base, "-o", out, *SMALL, "--steps", "1").code == 0
    kept = json.loads((out / "generation_config.json").read_text())
    assert not {"repetition_penalty", "top_k", "do_sample"} & set(kept)
    assert kept["eos_token_id"] == settings["eos_token_id"]


@pytest.mark.parametrize("problem", ["missing file", "bad utf-8", "too little data"])
@pytest.mark.parametrize("folder", ["new", "existing and empty"])
def test_a_failed_first_run_leaves_nothing_behind(
    cli, bpe_model: Path, tmp_path: Path, problem, folder
) -> None:
    data = tmp_path / "data.txt"
    if problem == "bad utf-8":
        data.write_bytes("今天天气".encode() * 50 + b"\xff\xfe")
    elif problem == "too little data":
        data.write_text("hi", encoding="utf-8")
    out = tmp_path / "out"
    if folder == "existing and empty":
        out.mkdir()
    result = cli("finetune", data, "-m", bpe_model, "-o", out, *SMALL, "--steps", "2")
    assert result.code == 2 and result.err.startswith("Error: "), result.err
    if folder == "new":
        assert not out.exists()
    else:
        assert out.is_dir() and list(out.iterdir()) == []


def test_bf16_on_a_cpu_without_bf16_says_so(cli, bpe_model: Path, corpus: Path, tmp_path: Path) -> None:
    from gptcli.loading.cpu import cpu_has_bf16

    if cpu_has_bf16() is not False:
        pytest.skip("this CPU has bf16 instructions (or it cannot be told)")
    result = cli(
        "finetune",
        corpus,
        "-m",
        bpe_model,
        "-o",
        tmp_path / "out",
        *SMALL,
        "--steps",
        "1",
        "--precision",
        "bf16",
    )
    assert result.code == 0, result.err
    assert "no bf16 instructions" in result.err and "--precision fp32" in result.err


def test_unknown_tokens_in_the_data_are_reported(cli, bert_model: Path, tmp_path: Path) -> None:
    """English the BERT-style vocabulary cannot spell becomes [UNK]: the run says how much of it."""
    data = tmp_path / "english.txt"
    data.write_text("Zebras quietly juggle xylophones beneath purple volcanoes. " * 40, encoding="utf-8")
    result = cli("finetune", data, "-m", bert_model, "-o", tmp_path / "out", *SMALL, "--steps", "1")
    assert result.code == 0, result.err
    assert "of the training tokens are the unknown token [UNK]" in result.err


@pytest.mark.slow
def test_a_closed_stderr_never_stops_training(bpe_model: Path, corpus: Path, tmp_path: Path) -> None:
    """`gptcli finetune ... 2>&1 | head -5`: the reader goes away, training goes on to the end."""
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "gptcli",
        "finetune",
        corpus,
        "-m",
        bpe_model,
        "-o",
        out,
        *SMALL,
        "--steps",
        "60",
    ]
    proc = subprocess.Popen(
        list(map(str, argv)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **ONE_THREAD},
    )
    assert proc.stdout is not None
    head = [proc.stdout.readline() for _ in range(3)]  # `| head -3`, then the reader is gone
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0, head
    assert checkpoint_step(out) == 60 and (out / "model.safetensors").exists()
    assert max(r["step"] for r in metrics(out)) == 60


class _ReaderGoneAt(io.TextIOWrapper):
    """fd 2 of a forked child whose pipe's only reader (`read_end`, held by the child alone) goes away
    just before the first line that starts with `cue` is written: that write meets a real EPIPE."""

    def __init__(self, read_end: int, cue: str) -> None:
        super().__init__(io.FileIO(2, "w", closefd=False), encoding="utf-8", write_through=True)
        self.read_end, self.cue = read_end, cue

    def write(self, text: str) -> int:
        if self.read_end >= 0 and text.lstrip().startswith(self.cue):
            os.close(self.read_end)
            self.read_end = -1
        return super().write(text)


@pytest.mark.parametrize("cue", ["training ", "note: ", "step ", "trained "])
def test_stderr_gone_at_any_kind_of_line_never_stops_training(
    bpe_model: Path, corpus: Path, tmp_path: Path, cue: str
) -> None:
    """`gptcli finetune ... 2>&1 | head -c 64`: the reader goes just as a start line, a note, a progress
    line or the summary is written; the run still ends at its last step with its model saved."""
    from forked import fork_main

    out = tmp_path / "out"
    read_end, write_end = os.pipe()

    def reader_goes_at_cue() -> None:
        sys.stderr = _ReaderGoneAt(read_end, cue)

    args = ("finetune", corpus, "-m", bpe_model, "-o", out, *SMALL, "--steps", "3")
    pid = fork_main(*args, stdout=write_end, stderr=write_end, before=reader_goes_at_cue)
    os.close(read_end)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert checkpoint_step(out) == 3 and (out / "model.safetensors").exists()
    assert max(r["step"] for r in metrics(out)) == 3


def test_the_model_folder_follows_the_umask(cli, bpe_model: Path, corpus: Path, tmp_path: Path) -> None:
    """Every file of OUT, the weights too, is readable by others when the umask says so (022)."""
    old = os.umask(0o022)
    try:
        result = cli("finetune", corpus, "-m", bpe_model, "-o", tmp_path / "out", *SMALL, "--steps", "1")
    finally:
        os.umask(old)
    assert result.code == 0, result.err
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert "model.safetensors" in modes and "checkpoint.pt" in modes
    assert set(modes.values()) == {0o644}, modes


def test_notes_come_before_the_first_progress_line_in_the_documented_order(
    cli, bpe_model: Path, corpus: Path, tmp_path: Path
) -> None:
    """docs/training.md: the notes on what the data became, then the start line, the baseline, progress."""
    result = cli("finetune", corpus, "-m", bpe_model, "-o", tmp_path / "out", *SMALL, "--steps", "2")
    assert result.code == 0, result.err
    lines = result.err.splitlines()
    kinds = [line.split()[0] if not line.startswith("note:") else line.split()[1] for line in lines]
    assert kinds[0] == "tokenized" and kinds[1].isdigit() and kinds[2] == "training", lines
    assert lines[3].startswith("note: validation loss before training: ")
    assert lines[4].startswith("step 1/2")


def test_one_block_is_one_block(cli, bpe_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "short.txt"
    data.write_text(tiny.TEXT[:60], encoding="utf-8")  # 95 tokens: 94 targets, one block of 94
    args = ["--batch-size", "1", "--block-size", "94", "--val-split", "0", "--steps", "1"]
    result = cli("finetune", data, "-m", bpe_model, "-o", tmp_path / "out", *args)
    assert result.code == 0, result.err
    assert "note: tokenized 1 document: 95 tokens" in result.err, result.err
    assert "note: 1 training block of 94 tokens" in result.err, result.err
    assert "(1 block of 94)" in result.err and "1 blocks" not in result.err
    assert "trained 1 step (94 tokens)" in result.err


def test_an_interrupted_run_reports_its_last_step_and_a_resume_says_what_it_did(
    cli, bpe_model: Path, corpus: Path, tmp_path: Path
) -> None:
    """Stopped after step 5 (logged every 4): the loss it reports is step 5's, and metrics.jsonl has it;
    the resumed run's summary tells its own steps and time from the run's totals."""
    out = tmp_path / "out"

    def stop_after_step_4(event) -> None:
        if event.kind == "log" and event.step == 4:  # as Ctrl-C during step 5 would
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = TrainConfig(data=[str(corpus)], model=str(bpe_model), out_dir=out, steps=8, batch_size=4)
    cfg.block_size, cfg.log_every, cfg.device = 32, 4, "cpu"
    stopped = train(cfg, stop_after_step_4)
    assert stopped.interrupted and stopped.step == 5
    assert [r["step"] for r in metrics(out)] == [0, 4, 5] and stopped.loss == metrics(out)[-1]["loss"]
    args = ["--batch-size", "4", "--block-size", "32", "--log-every", "4", "--steps", "8", "--resume"]
    resumed = cli("finetune", corpus, "-m", bpe_model, "-o", out, *args)
    assert resumed.code == 0, resumed.err
    summary = resumed.err.strip().splitlines()[-1]
    assert re.match(
        rf"trained steps 6 to 8 in \d+:\d\d \(resumed from step 5; 8 steps, {8 * 4 * 32:,} tokens", summary
    )
    assert [r["step"] for r in metrics(out)] == [0, 4, 5, 8]  # step 0: the baseline validation loss


def test_the_first_rate_after_a_resume_counts_only_the_steps_it_timed(
    bpe_model: Path, corpus: Path, tmp_path: Path
) -> None:
    """A run killed after its step-6 checkpoint (logged every 4: steps 5 and 6 pending) resumes; its
    first logged rate is over steps 7 and 8, the ones it timed, not over 5 to 8 (twice the real rate)."""
    out = tmp_path / "out"
    cfg = TrainConfig(data=[str(corpus)], model=str(bpe_model), out_dir=out, steps=8, batch_size=8)
    cfg.block_size, cfg.grad_accum, cfg.log_every, cfg.save_every, cfg.device = 32, 4, 4, 2, "cpu"

    def killed_after_the_step_6_checkpoint(event) -> None:
        if event.kind == "save" and event.step == 6:
            os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()
    if pid == 0:  # the run that gets killed; never returns into pytest
        try:
            train(cfg, killed_after_the_step_6_checkpoint)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and checkpoint_step(out) == 6

    times: dict[str, float] = {}
    rates: dict[int, float] = {}

    def watch(event) -> None:
        times.setdefault(event.kind, time.perf_counter())
        if event.kind == "log":
            rates[event.step] = event.metrics["tokens_per_second"]

    cfg.resume = True
    train(cfg, watch)
    # The loop's steps 7 and 8 ran between the start event and the log event, and took most of it.
    tokens = 2 * 8 * 4 * 32
    seconds = times["log"] - times["start"]
    assert tokens / seconds <= rates[8] < 1.5 * tokens / seconds
