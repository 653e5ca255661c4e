"""Shared fixtures: tiny real models built once per test run, and a way to run the CLI in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny

# The hub is unreachable here and in CI: make every test fail fast instead of waiting on retries.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.pop("GPTCLI_MODEL", None)


def pytest_configure(config: pytest.Config) -> None:
    # The test models are tiny: thread start-up and contention cost more than they save (about 3x on
    # a shared 2-core machine). Subprocesses started by tests keep torch's default.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{'bpe': byte-level BPE GPT-2, 'bert': BERT-tokenizer GPT-2, 'short': 24-position context}."""
    return tiny.build_all(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def bpe_model(models: dict[str, Path]) -> Path:
    return models["bpe"]


@pytest.fixture(scope="session")
def bert_model(models: dict[str, Path]) -> Path:
    return models["bert"]


@pytest.fixture(scope="session")
def traced_folders(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Copies of the fixtures with random LayerNorm weights, for looking inside (lens, attention); "hf"
    is a GPT-2 variant that gptcli loads through transformers."""
    root = tmp_path_factory.mktemp("traced")
    return {
        "bpe": tiny.model_copy(models["bpe"], root / "bpe"),
        "bert": tiny.model_copy(models["bert"], root / "bert"),
        "hf": tiny.model_copy(models["bpe"], root / "hf", transformers_path=True),
    }


@pytest.fixture(scope="session")
def traced_lms(traced_folders: dict[str, Path]):
    from gptcli.loading.models import load_model

    loaded = {name: load_model(str(path), device="cpu") for name, path in traced_folders.items()}
    assert loaded["bpe"].net is not None and loaded["bert"].net is not None and loaded["hf"].net is None
    return loaded


@pytest.fixture
def unreachable_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, a hub endpoint that refuses connections, and no $GPTCLI_MODEL."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("GPTCLI_MODEL", raising=False)
    return cache


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Run `gptcli ARGS` in this process; returns Result(code, out, err). `stdin` is text or bytes,
    given through a real file (as `gptcli ... < file` would), so gptcli sees a real descriptor."""
    from gptcli.cli import run

    def invoke(*args: str, stdin: str | bytes | None = None) -> Result:
        data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
        if data is not None:
            path = tmp_path / f"stdin-{os.urandom(4).hex()}"
            path.write_bytes(data)
            stream = open(path, encoding="utf-8")  # noqa: SIM115 (closed at teardown)
            request_close.append(stream)
            monkeypatch.setattr(sys, "stdin", stream)
        code = run([str(a) for a in args])
        captured = capsysbinary.readouterr()
        return Result(code, captured.out.decode("utf-8"), captured.err.decode("utf-8"))

    request_close: list = []
    yield invoke
    for stream in request_close:
        stream.close()


def run_gptcli(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 60
):
    """Run gptcli in a real subprocess (for pipes, signals and start-up behaviour)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gptcli", *map(str, args)],
        input=stdin,
        capture_output=True,
        env=full_env,
        timeout=timeout,
    )
