"""LoRA fine-tuning (HF PEFT): the adapter gptcli saves, PEFT's loading of it, `-m ADAPTER`, `gptcli merge`,
and an exact resume; on the tiny fixture model, trained for real."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from gptcli.training.config import TrainConfig
from gptcli.training.loop import train

import tiny

SMALL: dict[str, Any] = {"batch_size": 4, "block_size": 32, "log_every": 1, "seed": 0}


@pytest.fixture(scope="module")
def adapter(bpe_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained on the fixture text, hard enough that it changes the model."""
    root = tmp_path_factory.mktemp("lora")
    (root / "corpus.txt").write_text(tiny.TEXT * 4, encoding="utf-8")
    cfg = TrainConfig(
        data=[str(root / "corpus.txt")], out_dir=root / "adapter", model=str(bpe_model),
        steps=12, lr=2e-2, lora_rank=4, lora_targets="c_attn,c_proj", **SMALL,
    )  # fmt: skip
    result = train(cfg)
    assert not result.interrupted
    return root / "adapter"


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def test_rank_8_on_c_attn_of_gpt2_124m_trains_294912_parameters() -> None:
    """The issue's figure, from a config alone: 12 layers x 8 x (768 + 2304), nothing trained."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptcli.training.setup import add_lora

    with torch.device("meta"):  # the shapes, no memory
        model = add_lora(GPT2LMHeadModel(GPT2Config()), TrainConfig(lora_rank=8), base="gpt2")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 294_912
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_the_adapter_folder_is_peft_s_and_small(adapter: Path, bpe_model: Path) -> None:
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names  # the base is not copied
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["fan_in_fan_out"] is True and sorted(config["target_modules"]) == ["c_attn", "c_proj"]
    assert config["base_model_name_or_path"] == str(bpe_model.resolve())
    base_size = (bpe_model / "model.safetensors").stat().st_size
    assert (adapter / "adapter_model.safetensors").stat().st_size < base_size / 5


def test_peft_loads_the_adapter_and_gptcli_runs_it_merged_with_the_same_logits(
    adapter: Path, bpe_model: Path
) -> None:
    """PeftModel.from_pretrained(base, OUT) reads what gptcli saved; gptcli's own GPT-2 with the adapter
    merged at load gives PEFT's logits (base + adapter) to 1e-5, and they are not the base's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptcli.loading.models import load_model

    tokenizer = AutoTokenizer.from_pretrained(bpe_model)
    ids = torch.tensor([tokenizer(tiny.TEXT[:200])["input_ids"][:60]])
    base = AutoModelForCausalLM.from_pretrained(bpe_model, dtype=torch.float32).eval()
    before = logits(base, ids)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    reference = logits(peft_model, ids)
    assert (reference - before).abs().max() > 1e-2  # the adapter changed the model

    lm = load_model(str(adapter), device="cpu")
    assert lm.net is not None and lm.path == adapter.resolve()  # gptcli's runtime, adapter merged
    ours = lm.logits(ids)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()


@pytest.mark.slow
def test_merge_writes_a_folder_that_transformers_and_gptcli_load_alike(
    cli, adapter: Path, bpe_model: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gptcli.loading.models import load_model

    merged = tmp_path / "merged"
    result = cli("merge", adapter, "-o", merged)
    assert result.code == 0, result.err
    assert result.out == "" and f"merged model in {merged}" in result.err
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in merged.iterdir()
    }
    ids = torch.tensor([[5, 17, 42, 99, 3, 8, 150, 7]])
    hf = logits(AutoModelForCausalLM.from_pretrained(merged).eval(), ids)
    base = AutoModelForCausalLM.from_pretrained(bpe_model, dtype=torch.float32)
    reference = logits(PeftModel.from_pretrained(base, adapter).eval(), ids)
    ours = load_model(str(merged), device="cpu").logits(ids)
    assert torch.allclose(hf, reference, atol=1e-5, rtol=0)
    assert torch.allclose(ours, hf, atol=1e-5, rtol=0)

    again = cli("merge", adapter, "-o", merged)  # never over a folder that holds something
    assert again.code == 2 and again.err.startswith("Error: ") and "not empty" in again.err

    # -m ADAPTER in the commands: the same answers as the merged folder's.
    for command in (["topk", "-k", "5"], ["complete", "-n", "8", "--temperature", "0"]):
        via_adapter = cli(*command, "-m", adapter, "The weather")
        via_merged = cli(*command, "-m", merged, "The weather")
        assert via_adapter.code == via_merged.code == 0, via_adapter.err
        assert via_adapter.out == via_merged.out and via_adapter.out.strip()


def test_merge_refuses_a_folder_without_an_adapter(cli, bpe_model: Path, tmp_path: Path) -> None:
    result = cli("merge", bpe_model, "-o", tmp_path / "m")
    assert result.code == 2 and result.err.startswith("Error: no LoRA adapter in "), result.err
    assert not (tmp_path / "m").exists()


def test_an_unknown_lora_target_is_refused_with_the_layers_there_are(cli, bpe_model, tmp_path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(tiny.TEXT * 4, encoding="utf-8")
    args = ["--lora-rank", "4", "--lora-targets", "q_proj", "--steps", "1", "--block-size", "32"]
    result = cli("finetune", corpus, "-m", bpe_model, "-o", tmp_path / "out", *args)
    assert result.code == 2 and "--lora-targets q_proj: no such module" in result.err, result.err
    assert "c_attn" in result.err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_resume_with_lora_gives_the_same_run(bpe_model: Path, tmp_path: Path) -> None:
    """Stopped at step 3 (a SIGINT, as Ctrl-C) and resumed: the same losses and adapter as one run,
    dropout on the LoRA path included."""
    from safetensors.torch import load_file

    corpus = tmp_path / "c.txt"
    corpus.write_text(tiny.TEXT * 4, encoding="utf-8")

    def config(out: str, **extra) -> TrainConfig:
        return TrainConfig(
            data=[str(corpus)], out_dir=tmp_path / out, model=str(bpe_model), steps=6, lr=1e-2,
            lora_rank=4, lora_dropout=0.1, eval_every=2, **SMALL, **extra,
        )  # fmt: skip

    whole = train(config("whole"))

    def stop_after_3(event) -> None:
        if event.kind == "log" and event.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the loop saves and stops at the next step

    first = train(config("parts"), stop_after_3)
    assert first.interrupted and first.step == 4
    second = train(config("parts", resume=True))
    assert second.step == 6 and not second.interrupted

    def losses(out: str) -> list:
        lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, lines)]

    assert losses("parts") == losses("whole")
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "parts" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert whole.loss == second.loss


def test_a_base_folder_named_like_a_hub_id_is_recorded_absolute(
    bpe_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`-m models/tiny` is a folder, not the hub repo models/tiny: the adapter must find it from
    any directory, so it records the absolute path."""
    (tmp_path / "corpus.txt").write_text(tiny.TEXT, encoding="utf-8")
    monkeypatch.chdir(bpe_model.parent.parent)
    relative = f"{bpe_model.parent.name}/{bpe_model.name}"
    cfg = TrainConfig(
        data=[str(tmp_path / "corpus.txt")], out_dir=tmp_path / "adapter", model=relative,
        steps=1, lora_rank=2, **SMALL,
    )  # fmt: skip
    train(cfg)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(bpe_model.resolve())


def test_finetune_on_an_adapter_folder_says_to_merge_it_first(cli, adapter: Path, tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text(tiny.TEXT, encoding="utf-8")
    out = cli("finetune", tmp_path / "corpus.txt", "-m", adapter, "--steps", "1", "--out", tmp_path / "o")
    assert out.code == 2
    assert out.err.startswith("Error: ") and "is a LoRA adapter" in out.err and "gptcli merge" in out.err
    assert len(out.err.strip().splitlines()) == 1
