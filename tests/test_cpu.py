"""The decode thread count: measured on the machine, cached with its CPU, overridden by --threads."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from gptcli.loading.cpu import THREADS_ENV, cpu_key, decode_threads, fastest_threads
from gptcli.loading.models import load_model


def _step_faster_with(count: int):
    """A step that takes 5 ms on `count` threads and 25 ms on any other count."""

    def step() -> None:
        time.sleep(0.005 if torch.get_num_threads() == count else 0.025)

    return step


@pytest.mark.parametrize("faster", [1, 2])
def test_the_faster_thread_count_is_chosen_and_torch_is_left_as_it_was(faster: int) -> None:
    before = torch.get_num_threads()
    assert fastest_threads(_step_faster_with(faster), 2, rounds=3) == faster
    assert torch.get_num_threads() == before


def test_one_core_needs_no_measurement() -> None:
    def step() -> None:
        raise AssertionError("measured with one core")

    assert fastest_threads(step, 1) == 1


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(THREADS_ENV, raising=False)
    return tmp_path


def test_the_measurement_is_cached_per_machine_and_format(cache_home: Path) -> None:
    most = torch.get_num_threads()
    first = decode_threads("int4", _step_faster_with(most))
    assert first == most
    cached = json.loads((cache_home / "gptcli" / "decode-threads.json").read_text())
    assert cached == {f"{cpu_key()}|int4|{most}": most}

    def step() -> None:
        raise AssertionError("measured again")

    assert decode_threads("int4", step) == most  # read back, not measured
    # Another weight format is measured on its own.
    assert decode_threads("float32", _step_faster_with(1)) == 1


def test_threads_asked_for_win(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def step() -> None:
        raise AssertionError("measured although a count was given")

    assert decode_threads("float32", step, requested=3) == 3
    monkeypatch.setenv(THREADS_ENV, "2")
    assert decode_threads("float32", step) == 2
    assert not (cache_home / "gptcli").exists()


def test_a_loaded_model_decodes_on_the_threads_asked_for(bpe_model: Path, cache_home: Path) -> None:
    before = torch.get_num_threads()
    try:
        lm = load_model(str(bpe_model), device="cpu", threads=1)
        assert torch.get_num_threads() == 1 and lm.decode_threads() == 1
    finally:
        torch.set_num_threads(before)
    measured = load_model(str(bpe_model), device="cpu").decode_threads()
    assert measured in (1, before)
    assert (cache_home / "gptcli" / "decode-threads.json").is_file()
