"""Model loading: local folders, the hub cache, offline fail-fast, and refusing unsafe files."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from gptcli.errors import GptcliError, UsageError
from gptcli.loading.models import load_model, resolve_device, resolve_dtype, resolve_model_path

import tiny
from conftest import run_gptcli


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_loads_local_folder(bpe_model: Path) -> None:
    lm = load_model(str(bpe_model), device="cpu")
    assert lm.path == bpe_model.resolve()
    assert lm.context_length == 128
    assert tiny.reference_model(lm).config.n_layer == 2
    assert not tiny.reference_model(lm).training


def test_cached_hub_id_loads_without_network(bpe_model: Path, unreachable_hub: Path) -> None:
    # The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}
    repo = unreachable_hub / "models--tiny-org--tiny-gpt2"
    commit = "0" * 40
    copy_model(bpe_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    start = time.monotonic()
    lm = load_model("tiny-org/tiny-gpt2", device="cpu")
    assert time.monotonic() - start < 10
    assert lm.path == repo / "snapshots" / commit
    assert tiny.reference_model(lm).config.vocab_size == 400


def test_uncached_hub_id_fails_fast_when_hub_unreachable(unreachable_hub: Path) -> None:
    start = time.monotonic()
    with pytest.raises(GptcliError) as info:
        resolve_model_path("gpt2")
    assert time.monotonic() - start < 2
    message = str(info.value)
    assert "not in the local cache" in message
    assert "HF_HUB_OFFLINE=1" in message and "local model folder" in message


def test_uncached_hub_id_fails_at_once_when_offline(unreachable_hub: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(GptcliError, match="HF_HUB_OFFLINE is set"):
        resolve_model_path("some-org/some-model")
    assert time.monotonic() - start < 0.5


@pytest.mark.slow
def test_offline_fail_fast_whole_process(tmp_path: Path) -> None:
    """The real CLI, a fresh process, an empty cache, the real (unreachable) hub: one line, quickly."""
    start = time.monotonic()
    proc = run_gptcli("topk", "-m", "gpt2", "hello", env={"HF_HOME": str(tmp_path)})
    elapsed = time.monotonic() - start
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert err.startswith("Error: model 'gpt2' is not in the local cache")
    assert len(err.strip().splitlines()) == 1
    # interpreter + torch import + at most the 1.5 s probe; the old behaviour was ~48 s of retries
    assert elapsed < 15


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/no/such/folder", "no model folder at /no/such/folder"),
        ("./missing", "no model folder at ./missing"),
        ("~/missing-model-xyz", "no model folder at ~/missing-model-xyz"),
        ("../../no-such-dir-xyz", "no model folder at ../../no-such-dir-xyz"),
        ("owner/../../x", "no model folder"),
        ("", "empty model name"),
    ],
)
def test_bad_names_are_usage_errors(name: str, message: str, unreachable_hub: Path) -> None:
    with pytest.raises(UsageError, match=message.replace(".", r"\.")):
        resolve_model_path(name)


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(GptcliError, match=r"no config\.json in"):
        load_model(str(tmp_path), device="cpu")


def test_config_that_is_not_json(bpe_model: Path, tmp_path: Path) -> None:
    folder = copy_model(bpe_model, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(GptcliError, match=r"config\.json is not valid JSON"):
        load_model(str(folder), device="cpu")


def test_corrupt_weights_name_the_file(bpe_model: Path, tmp_path: Path) -> None:
    folder = copy_model(bpe_model, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(GptcliError, match=r"model\.safetensors"):
        load_model(str(folder), device="cpu")


def test_pickle_weights_load_with_flag(bpe_model: Path, tmp_path: Path) -> None:
    """Honest pickle weights load with --allow-pickle (through torch's weights_only loader)."""
    import torch
    from safetensors.torch import load_file

    folder = copy_model(bpe_model, tmp_path / "honest")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(GptcliError, match="pickle"):
        load_model(str(folder), device="cpu")
    lm = load_model(str(folder), device="cpu", allow_pickle=True)
    assert torch.equal(tiny.reference_model(lm).transformer.wte.weight, state["transformer.wte.weight"])


def test_devices_and_dtypes() -> None:
    import torch

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(GptcliError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UsageError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_bfloat16_weights(bpe_model: Path) -> None:
    import torch

    lm = load_model(str(bpe_model), device="cpu", dtype="bfloat16")
    assert tiny.reference_model(lm).transformer.wte.weight.dtype == torch.bfloat16


def test_info(bpe_model: Path, bert_model: Path, cli) -> None:
    result = cli("info", "-m", bpe_model, "--json")
    assert result.code == 0, result.err
    facts = json.loads(result.out)
    assert facts["architecture"] == "GPT2LMHeadModel"
    assert facts["layers"] == 2 and facts["context_length"] == 128 and facts["vocab_size"] == 400
    assert facts["parameters"] == sum(
        p.numel() for p in tiny.reference_model(load_model(str(bpe_model))).parameters()
    )
    assert facts["path"] == str(bpe_model.resolve())
    assert facts["dtype"] == "float32" and facts["device"] == "cpu"
    plain = cli("info", "-m", bert_model)
    assert plain.code == 0
    assert "BertTokenizer" in plain.out and "context length" in plain.out


def test_default_model_from_environment(bpe_model: Path, cli, monkeypatch) -> None:
    monkeypatch.setenv("GPTCLI_MODEL", str(bpe_model))
    result = cli("info", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["path"] == str(bpe_model.resolve())


# -- damaged folders: every error names the file to look at -----------------------------------------------


def _damaged(bpe_model: Path, tmp_path: Path, damage) -> Path:
    folder = copy_model(bpe_model, tmp_path / "damaged")
    damage(folder)
    return folder


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: (d / "config.json").write_text(""), "config.json"),
        (lambda d: (d / "config.json").write_text("[]"), "config.json"),
        (lambda d: (d / "tokenizer_config.json").write_text("{not json"), "tokenizer_config.json"),
        (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors"),
        pytest.param(
            lambda d: (d / "tokenizer.json").unlink(),
            "tokenizer.json",
        ),
        pytest.param(
            lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "trunc'),
            "tokenizer.json",
        ),
        pytest.param(
            lambda d: (d / "config.json").write_text(
                json.dumps({**json.loads((d / "config.json").read_text()), "n_layer": "two"})
            ),
            "config.json",
        ),
        pytest.param(
            lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 1000),
            "model.safetensors",
        ),
        pytest.param(
            lambda d: (d / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}"),
            "model.safetensors",
        ),
    ],
)
def test_a_damaged_file_is_named(bpe_model: Path, tmp_path: Path, cli, damage, named: str) -> None:
    folder = _damaged(bpe_model, tmp_path, damage)
    result = cli("topk", "-m", folder, "hi")
    assert result.code == 1
    assert result.err.startswith("Error: ") and result.err.count("\n") == 1, result.err
    assert str(folder / named) in result.err and "GPTCLI_DEBUG" not in result.err, result.err


def test_a_folder_without_any_tokenizer_is_refused(bpe_model: Path, tmp_path: Path, cli) -> None:
    folder = copy_model(bpe_model, tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    result = cli("tokenize", "-m", folder, "hello")
    assert result.code == 1 and "tokenizer" in result.err


def test_a_name_longer_than_a_file_name_is_refused_plainly(cli) -> None:
    result = cli("topk", "-m", "a" * 300, "hi")
    assert result.code == 2 and "GPTCLI_DEBUG" not in result.err, result.err
