"""The built-in model: it ships with the package, loads offline, and stands in for gpt2 only by default."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gptcli.loading.models import BUILTIN, builtin_path, load_model, resolve

import tiny


def test_builtin_ships_with_attribution() -> None:
    folder = builtin_path()
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert "Tatoeba" in (folder / "NOTICE").read_text(encoding="utf-8")
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size <= 20_000_000


def test_builtin_loads_and_completes_chinese(cli) -> None:
    lm = load_model(BUILTIN, device="cpu")
    assert tiny.reference_model(lm).config.model_type == "gpt2"
    # a byte-level BPE: any text encodes, and 今天天气 needs no byte pieces
    ids = lm.tokenizer.encode("今天天气")
    assert lm.tokenizer.decode(ids) == "今天天气"
    result = cli("complete", "-m", BUILTIN, "--greedy", "-n", "12", "今天天气")
    assert result.code == 0, result.err
    text = result.out.strip()
    assert text and sum("\u4e00" <= ch <= "\u9fff" for ch in text) >= len(text) // 2, text


def test_builtin_continues_english_in_english(cli) -> None:
    result = cli("complete", "-m", BUILTIN, "--greedy", "-n", "12", "The weather is")
    assert result.code == 0, result.err
    text = result.out.strip()
    assert text and sum(ch.isascii() for ch in text) >= 0.9 * len(text), text


def test_default_falls_back_to_builtin_when_gpt2_cannot_be_had(unreachable_hub: Path, cli) -> None:
    name, path, notice = resolve(None)
    assert (name, path) == (BUILTIN, builtin_path())
    assert notice and "gptcli pull gpt2" in notice
    result = cli("topk", "--json", "-k", "3", "今天天气")
    assert result.code == 0, result.err
    assert json.loads(result.out)["model"] == BUILTIN
    assert result.err.count("\n") == 1 and "built-in model" in result.err


def test_explicit_gpt2_is_never_substituted(unreachable_hub: Path, cli) -> None:
    result = cli("topk", "-m", "gpt2", "hello")
    assert result.code == 1
    assert result.err.startswith("Error: model 'gpt2' is not in the local cache")


def test_environment_beats_default_and_flag_beats_environment(
    unreachable_hub: Path, bpe_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPTCLI_MODEL", str(bpe_model))
    assert resolve(None)[1] == bpe_model.resolve()
    assert resolve(BUILTIN)[1] == builtin_path()


def test_cached_gpt2_is_preferred_to_builtin(unreachable_hub: Path, bpe_model: Path) -> None:
    repo = unreachable_hub / "models--gpt2"
    commit = "1" * 40
    shutil.copytree(bpe_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    name, path, notice = resolve(None)
    assert (name, path, notice) == ("gpt2", repo / "snapshots" / commit, None)


def test_models_lists_builtin_and_cache(unreachable_hub: Path, bpe_model: Path, cli) -> None:
    repo = unreachable_hub / "models--someone--tiny"
    commit = "2" * 40
    shutil.copytree(bpe_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    result = cli("models", "--json")
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert rows[0]["id"] == BUILTIN and rows[0]["path"] == str(builtin_path()) and rows[0]["size"] > 0
    assert any(r["id"] == "someone/tiny" and r["size"] > 0 for r in rows)


def test_pull_fails_fast_offline(unreachable_hub: Path, cli) -> None:
    result = cli("pull", "gpt2")
    assert result.code == 1
    assert "not in the local cache" in result.err
    assert cli("pull", "../etc").code == 2
