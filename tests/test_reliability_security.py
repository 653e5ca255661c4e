"""Hostile files and names: pickle that runs a command, a model folder's own Python code, hub ids with
path tricks, and where a fine-tune writes. Nothing here may run foreign code or write outside its place.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tiny


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tree(root: Path) -> set[str]:
    """Every file and folder under `root`, relative."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(tiny.TEXT * 2, encoding="utf-8")
    return path


# Every command that loads a model, and how each gets one: (label, argv before the model folder, after).
LOADERS: list[tuple[str, list[str], list[str]]] = [
    ("topk", ["topk", "hi", "-m"], []),
    ("score", ["score", "hi", "-m"], []),
    ("complete", ["complete", "hi", "-n", "2", "-m"], []),
    ("info", ["info", "-m"], []),
    ("finetune -m", ["finetune", "{corpus}", "-o", "{out}", "--steps", "1", "--block-size", "16", "-m"], []),
]


def argv_for(template: list[str], folder: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [a.format(corpus=corpus, out=out) for a in template] + [str(folder), *extra]


# -- pickle ----------------------------------------------------------------------------------------------


class RunsACommand:
    """Unpickling this runs `touch MARKER`: what a malicious pytorch_model.bin does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_pickle(bpe_model: Path, tmp_path: Path) -> tuple[Path, Path]:
    import torch

    marker = tmp_path / "command-ran"
    folder = copy_model(bpe_model, tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": RunsACommand(marker)}, folder / "pytorch_model.bin")
    return folder, marker


@pytest.mark.parametrize(("label", "template", "extra"), LOADERS, ids=[x[0] for x in LOADERS])
@pytest.mark.parametrize("allow", [False, True], ids=["refused", "allowed"])
def test_pickle_never_runs_a_command(
    cli, evil_pickle, corpus, tmp_path, label, template, extra, allow
) -> None:
    """Without --allow-pickle the folder is refused before anything is read; with it, torch's
    weights_only loader refuses the payload. Either way the command never ran."""
    folder, marker = evil_pickle
    out = tmp_path / "out"
    argv = argv_for(template, folder, corpus, out, *extra, *(["--allow-pickle"] if allow else []))
    result = cli(*argv)
    assert result.code == 1, result.err
    assert result.err.startswith("Error: ") and result.err.count("\n") == 1, result.err
    if allow:
        assert "could not load the model weights from" in result.err and "pytorch_model.bin" in result.err
    else:
        assert "pytorch_model.bin is a pickle file" in result.err and "--allow-pickle" in result.err
        assert not out.exists()
    assert not marker.exists()


def test_the_pickle_payload_is_real(evil_pickle) -> None:
    """The control: a plain unpickling of the same file does run the command."""
    import torch

    folder, marker = evil_pickle
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_a_pickle_named_safetensors_is_not_unpickled(cli, evil_pickle, tmp_path) -> None:
    folder, marker = evil_pickle
    (folder / "pytorch_model.bin").rename(folder / "model.safetensors")
    for argv in (["topk", "hi"], ["topk", "hi", "--allow-pickle"]):
        result = cli(*argv, "-m", folder)
        assert result.code == 1 and result.err.startswith("Error: ") and result.err.count("\n") == 1
        assert str(folder / "model.safetensors") in result.err, result.err
    assert not marker.exists()


def test_a_pickled_checkpoint_in_outdir_is_not_unpickled(
    cli, bpe_model, evil_pickle, corpus, tmp_path
) -> None:
    """--resume reads OUT/checkpoint.pt with the weights_only loader: a planted one runs nothing."""
    import torch

    _, marker = evil_pickle
    out = tmp_path / "out"
    first = cli("finetune", corpus, "-m", bpe_model, "-o", out, "--steps", "1", "--block-size", "16")
    assert first.code == 0, first.err
    torch.save({"step": 0, "model": RunsACommand(marker)}, out / "checkpoint.pt")
    result = cli(
        "finetune", corpus, "-m", bpe_model, "-o", out, "--steps", "2", "--block-size", "16", "--resume"
    )
    assert result.code == 1 and f"cannot read the checkpoint {out / 'checkpoint.pt'}" in result.err
    assert not marker.exists()


# -- remote code -----------------------------------------------------------------------------------------


class PromptTrap(io.TextIOWrapper):
    """stdin of a terminal that fails the test if anything reads it (transformers' trust prompt would)."""

    read_attempts = 0

    def isatty(self) -> bool:
        return True

    def _caught(self, *args, **kwargs):
        PromptTrap.read_attempts += 1
        raise AssertionError("gptcli prompted on stdin")

    read = readline = readlines = _caught


@pytest.fixture
def remote_code(bpe_model: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose config and tokenizer config point at its own Python files, which create a
    marker file when imported."""
    marker = tmp_path / "code-ran"
    folder = copy_model(bpe_model, tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return folder, marker


REMOTE = [
    *LOADERS,
    ("tokenize", ["tokenize", "hi", "-m"], []),
    (
        "finetune --tokenizer",
        ["finetune", "{corpus}", "-o", "{out}", "--steps", "1", "--from-scratch", "--n-layer", "1"],
        [],
    ),
]


@pytest.mark.parametrize(("label", "template", "extra"), REMOTE, ids=[x[0] for x in REMOTE])
def test_remote_code_is_never_imported(
    remote_code, corpus, tmp_path, monkeypatch, capsys, label, template, extra
) -> None:
    from gptcli.cli import run

    folder, marker = remote_code
    out = tmp_path / "out"
    if label == "finetune --tokenizer":
        argv = [a.format(corpus=corpus, out=out) for a in template] + ["--tokenizer", str(folder)]
    else:
        argv = argv_for(template, folder, corpus, out, *extra)
    PromptTrap.read_attempts = 0
    monkeypatch.setattr(sys, "stdin", PromptTrap(io.BytesIO(b"y\n"), encoding="utf-8"))
    code = run(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    assert "auto_map" in err and "--trust-remote-code" in err, err
    assert PromptTrap.read_attempts == 0 and not marker.exists()
    assert not out.exists()


def test_remote_code_in_a_from_scratch_config(cli, bpe_model, remote_code, corpus, tmp_path) -> None:
    folder, marker = remote_code
    out = tmp_path / "out"
    argv = ["finetune", corpus, "-o", out, "--from-scratch", "--tokenizer", bpe_model, "--steps", "1"]
    result = cli(*argv, "--config", folder / "config.json")
    assert result.code == 1 and "--trust-remote-code" in result.err, result.err
    assert not marker.exists() and not out.exists()


# -- hub ids with path tricks ----------------------------------------------------------------------------

TRICKS = [
    "..",
    ".",
    "../x",
    "../../etc/passwd",
    "../outside/model",
    "/",
    "/etc",
    "/tmp/gptcli-no-such-model",
    "~",
    "~/x",
    "~root/x",
    "~/../x",
    "owner/../x",
    "owner/..",
    "owner/../../x",
    "../owner/x",
    "owner/x/..",
    "owner/./x",
    "a/b/c",
    "owner//x",
    "/owner/x",
    "owner/x/",
    "owner\\..\\x",
    "..\\x",
    "C:\\x",
    "\\\\server\\share\\x",
    "%2e%2e/x",
    "owner/%2e%2e",
    "owner/.git",
    ".git",
    "models--owner--x",
    " owner/x",
    "owner/x\n",
    "owner/x\x00",
    "owner/x\udcff",
    "x" * 300,
]


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bpe_model: Path) -> Path:
    """HOME, the working directory, the Hugging Face cache and a model folder "outside", all under one
    root; an unreachable hub (connections refused at once), so a name taken as a hub id fails fast."""
    from huggingface_hub import constants

    root = tmp_path / "sandbox"
    for name in ("home", "work/cwd", "hf/hub"):
        (root / name).mkdir(parents=True)
    copy_model(bpe_model, root / "work" / "outside" / "model")
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.chdir(root / "work" / "cwd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return root


@pytest.mark.parametrize("name", TRICKS, ids=[ascii(t)[1:-1][:40] for t in TRICKS])
def test_path_tricks_are_local_paths_or_refused(cli, sandbox: Path, name: str) -> None:
    """Each name is refused (not a hub id, no such folder), or is a local path: it never reaches the
    hub, and nothing is written anywhere (the cache included)."""
    before = tree(sandbox)
    pulled = cli("pull", "--", name)
    used = cli("topk", "-m", name, "hi")
    assert tree(sandbox) == before
    assert pulled.code == 2 and pulled.err.startswith("Error: ") and pulled.err.count("\n") == 1
    if name == "../outside/model":  # a real folder, relative to the working directory: it loads
        assert used.code == 0, used.err
        return
    assert used.code in (1, 2) and used.err.startswith("Error: ") and used.err.count("\n") == 1
    for result in (pulled, used):
        assert "127.0.0.1:9" not in result.err, result.err  # never taken to the hub


def test_a_relative_path_to_a_model_loads(cli, sandbox: Path) -> None:
    """The control for the test above: the same names do reach a folder when it exists."""
    result = cli("topk", "-m", "../outside/model", "hi")
    assert result.code == 0, result.err
    result = cli("pull", "owner/model")  # and a plain hub id does go to the (unreachable) hub
    assert result.code == 1 and "127.0.0.1:9 is unreachable" in result.err


# -- where finetune writes -------------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_writes_only_in_outdir_and_the_caches(bpe_model: Path, corpus: Path, tmp_path: Path) -> None:
    """A real process with HOME, HF_HOME, TMPDIR and the working directory in separate folders: files
    appear only in OUTDIR, the Hugging Face cache, and the user cache (~/.cache, where matplotlib keeps
    its font list); libraries may leave empty folders (torch: $TMPDIR/torchinductor_USER, matplotlib:
    ~/.config/matplotlib), never files."""
    root = tmp_path / "root"
    places = {name: root / name for name in ("home", "hf", "tmp", "cwd")}
    for folder in places.values():
        folder.mkdir(parents=True)
    out = root / "out"
    # matplotlib's font list, built once per user (seconds of scanning the system's fonts): copied in, so
    # the run finds its user cache already warm, as it would be on any machine after the first run.
    import matplotlib

    fonts = Path(matplotlib.get_cachedir())
    if fonts.is_dir():
        shutil.copytree(fonts, places["home"] / ".cache" / "matplotlib")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(places["home"]),
        "HF_HOME": str(places["hf"]),
        "TMPDIR": str(places["tmp"]),
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # Python's own .pyc files are not the command's writing
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    argv = [sys.executable, "-m", "gptcli", "finetune", str(corpus), "-m", str(bpe_model), "-o", str(out)]
    argv += ["--steps", "2", "--block-size", "16", "--batch-size", "2"]
    before = tree(root)
    model_before = tree(bpe_model)
    proc = subprocess.run(argv, cwd=places["cwd"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file()
    created = tree(root) - before
    allowed = ("out", "hf", os.path.join("home", ".cache"))
    stray = sorted(p for p in created if not p.startswith(allowed) and (root / p).is_file())
    assert stray == []
    empty_dirs = sorted(p for p in created if not p.startswith(allowed) and (root / p).is_dir())
    for name in empty_dirs:
        assert not any(p.is_file() for p in (root / name).rglob("*")), name
    assert tree(bpe_model) == model_before  # the base model's folder is only read
