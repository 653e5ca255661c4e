"""`gptcli compare` and gptcli.inspection.compare: two tiny real models, checked against `score`, `topk`
and a direct
transformers computation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from gptcli.inspection.compare import compare_text
from gptcli.loading.models import load_model
from gptcli.training.config import TrainConfig
from gptcli.training.loop import train

import tiny

SHORT_TEXT = "今天天气很好，我们去公园散步吧。"  # fewer tokens than the 'short' model's 24 positions
KEYS = {"model_a", "model_b", "tokens", "perplexity_a", "perplexity_b", "bits_per_byte_a", "bits_per_byte_b"}
TOKEN_KEYS = {"id", "token", "bytes", "logprob_a", "logprob_b", "kl"}


def compare_json(cli, *args: object) -> dict:
    result = cli("compare", *args, "--json")
    assert result.code == 0, result.err
    (line,) = result.out.splitlines()
    record: dict = json.loads(line)
    return record


def score_json(cli, model: Path, text: str) -> dict:
    result = cli("score", "-m", model, text, "--json")
    assert result.code == 0, result.err
    record: dict = json.loads(result.out)
    return record


def test_a_model_compared_with_itself_changes_nothing(cli, bpe_model: Path) -> None:
    out = compare_json(cli, bpe_model, bpe_model, tiny.TEXT[:300])
    assert set(out) == KEYS | {"mean_kl"}
    assert out["tokens"] and all(set(t) == TOKEN_KEYS for t in out["tokens"])
    assert all(t["logprob_a"] == t["logprob_b"] for t in out["tokens"])
    assert all(abs(t["kl"]) < 1e-6 for t in out["tokens"])
    assert abs(out["mean_kl"]) < 1e-6
    assert out["perplexity_a"] == out["perplexity_b"]
    assert out["bits_per_byte_a"] == out["bits_per_byte_b"]


def test_each_side_is_exactly_what_score_gives_that_model(cli, models: dict[str, Path]) -> None:
    # Same tokenizer, different contexts (128 and 24 positions): a long text slides through different
    # windows in each model, and each side must still be the model's own `score`.
    a, b = models["bpe"], models["short"]
    text = tiny.TEXT[:900]
    out = compare_json(cli, a, b, text)
    score_a, score_b = score_json(cli, a, text), score_json(cli, b, text)
    assert len(score_a["tokens"]) > 2 * 128  # both models really slide
    for side, score in (("a", score_a), ("b", score_b)):
        assert [{k: t[k] for k in ("id", "token", "bytes")} for t in out["tokens"]] == [
            {k: t[k] for k in ("id", "token", "bytes")} for t in score["tokens"]
        ]
        assert [t[f"logprob_{side}"] for t in out["tokens"]] == [t["logprob"] for t in score["tokens"]]
        assert out[f"perplexity_{side}"] == pytest.approx(score["perplexity"], rel=1e-12)
        assert out[f"bits_per_byte_{side}"] == pytest.approx(score["bits_per_byte"], rel=1e-12)
    assert out["mean_kl"] > 0


def test_kl_equals_a_direct_transformers_computation(cli, models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = models["bpe"], models["short"]
    out = compare_json(cli, a, b, SHORT_TEXT)
    tokenizer = AutoTokenizer.from_pretrained(a)
    ids = [tokenizer.bos_token_id, *tokenizer.encode(SHORT_TEXT, add_special_tokens=False)]
    assert len(ids) <= 24
    logprobs = []
    for folder in (a, b):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        logprobs.append(torch.log_softmax(logits, dim=-1))
    lp_a, lp_b = logprobs
    kl = (lp_a.exp() * (lp_a - lp_b)).sum(dim=-1)
    targets = torch.tensor(ids[1:])[:, None]
    assert [t["id"] for t in out["tokens"]] == ids[1:]
    assert [t["kl"] for t in out["tokens"]] == pytest.approx(kl.tolist(), abs=1e-5)
    assert [t["logprob_a"] for t in out["tokens"]] == pytest.approx(
        lp_a.gather(1, targets)[:, 0].tolist(), abs=1e-5
    )
    assert [t["logprob_b"] for t in out["tokens"]] == pytest.approx(
        lp_b.gather(1, targets)[:, 0].tolist(), abs=1e-5
    )
    assert out["mean_kl"] == pytest.approx(kl.mean().item(), abs=1e-5)
    # Every KL is far above the tolerance: two different models, so the check above could fail.
    assert min(t["kl"] for t in out["tokens"]) > 1e-3


def test_different_vocabularies_compare_on_perplexity_and_bits_per_byte(cli, bpe_model, bert_model) -> None:
    result = cli("compare", bpe_model, bert_model, SHORT_TEXT, "--json")
    assert result.code == 0, result.err
    out = json.loads(result.out)
    assert "different vocabularies" in result.err and "bits per byte" in result.err
    assert out["tokens"] == [] and out["mean_kl"] is None
    for side, model in (("a", bpe_model), ("b", bert_model)):
        score = score_json(cli, model, SHORT_TEXT)
        assert out[f"perplexity_{side}"] == pytest.approx(score["perplexity"], rel=1e-12)
        assert out[f"bits_per_byte_{side}"] == pytest.approx(score["bits_per_byte"], rel=1e-12)

    piped = cli("compare", bpe_model, bert_model, SHORT_TEXT)
    assert piped.code == 0 and "perplexity A" in piped.out and "bits/byte" in piped.out
    nxt = cli("compare", bpe_model, bert_model, "--next", "今天")
    assert nxt.code == 1 and "different vocabularies" in nxt.err and nxt.out == ""


def test_a_fine_tune_shows_positive_change_on_its_training_text(cli, bpe_model: Path, tmp_path: Path) -> None:
    text = "小猫在窗台上睡觉，阳光照在它的身上。The cat is sleeping on the windowsill in the sun.\n"
    corpus = tmp_path / "train.txt"
    corpus.write_text(text * 8, encoding="utf-8")
    out_dir = tmp_path / "tuned"
    config: dict[str, Any] = dict(
        steps=25, batch_size=4, block_size=32, lr=3e-3, val_split=0.0, seed=0, log_every=25
    )
    train(TrainConfig(data=[str(corpus)], model=str(bpe_model), out_dir=out_dir, **config))

    out = compare_json(cli, bpe_model, out_dir, text.strip())
    changes = [t["logprob_b"] - t["logprob_a"] for t in out["tokens"]]
    assert sum(changes) / len(changes) > 1.0  # nats per token: the tuned model expects its text
    assert sum(c > 0 for c in changes) > 0.9 * len(changes)
    assert out["perplexity_b"] < out["perplexity_a"] / 3
    assert out["bits_per_byte_b"] < out["bits_per_byte_a"]
    assert out["mean_kl"] > 0.1

    # The terminal view: the largest changes, each with both top-k lists.
    a, b = load_model(str(bpe_model), device="cpu"), load_model(str(out_dir), device="cpu")
    result = compare_text(a, b, text.strip(), changes=3, k=4)
    biggest = sorted(range(len(result.tokens)), key=lambda i: -abs(changes[i]))[:3]
    assert [c.index for c in result.changes] == biggest
    for change in result.changes:
        assert sorted(t["rank_a"] for t in change.candidates if t["rank_a"] <= 4) == [1, 2, 3, 4]
        assert sorted(t["rank_b"] for t in change.candidates if t["rank_b"] <= 4) == [1, 2, 3, 4]


def test_terminal_view_shows_the_text_totals_and_largest_changes(cli, models, monkeypatch) -> None:
    import gptcli.cli.compare as command

    monkeypatch.setattr(command, "is_tty", lambda stream=None: True)
    monkeypatch.setenv("COLUMNS", "120")
    result = cli("compare", models["bpe"], models["short"], SHORT_TEXT, "--changes", "2", "-k", "3")
    assert result.code == 0, result.err
    assert SHORT_TEXT in result.out
    assert "perplexity A" in result.out and "mean KL" in result.out
    assert result.out.count("logprob A") == 2  # one header per change shown
    assert "▲" in result.out and "▼" in result.out


def test_piped_output_is_one_tsv_line_per_token(cli, models, tmp_path: Path) -> None:
    text_file = tmp_path / "text.txt"
    text_file.write_text(SHORT_TEXT, encoding="utf-8")
    result = cli("compare", models["bpe"], models["short"], "-f", text_file)
    assert result.code == 0, result.err
    out = compare_json(cli, models["bpe"], models["short"], SHORT_TEXT)
    lines = [line.split("\t") for line in result.out.splitlines()]
    assert len(lines) == len(out["tokens"])
    for fields, t in zip(lines, out["tokens"], strict=True):
        assert int(fields[0]) == t["id"] and fields[1] == t["token"]
        assert float(fields[4]) == pytest.approx(t["logprob_b"] - t["logprob_a"], abs=1e-4)
        assert float(fields[5]) == pytest.approx(t["kl"], rel=1e-4, abs=1e-6)
    assert "perplexity A" in result.err


def test_next_gives_both_top_k_with_the_change_of_each(cli, models) -> None:
    a, b = models["bpe"], models["short"]
    out = json.loads(cli("compare", a, b, "--next", "今天", "-k", "4", "--json").out)
    assert set(out) == {"model_a", "model_b", "prompt", "kl", "tokens"} and out["prompt"] == "今天"
    for side, model in (("a", a), ("b", b)):
        topk = json.loads(cli("topk", "-m", model, "今天", "-k", "4", "--json").out)["tokens"]
        mine = sorted((t for t in out["tokens"] if t[f"rank_{side}"] <= 4), key=lambda t: t[f"rank_{side}"])
        assert [t["id"] for t in mine] == [t["id"] for t in topk]
        assert [t[f"logprob_{side}"] for t in mine] == pytest.approx([t["logprob"] for t in topk], abs=1e-6)
    assert out["kl"] > 0

    piped = cli("compare", a, b, "--next", "今天", "-k", "4")
    rows = [line.split("\t") for line in piped.out.splitlines()]
    assert len(rows) == len(out["tokens"]) and "KL(A‖B)" in piped.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "0", "x"], "-k must be at least 1"),
        (["--changes", "-1", "x"], "--changes"),
        (["--stride", "0", "x"], "--stride"),
        ([""], "nothing to compare"),
    ],
)
def test_bad_values_are_refused(cli, bpe_model, args, message) -> None:
    result = cli("compare", bpe_model, bpe_model, *args)
    assert result.code == 2 and message in result.err


def test_kl_is_zero_only_for_equal_distributions() -> None:
    from gptcli.inspection.compare import kl_divergence

    p = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), dim=-1)
    q = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]]), dim=-1)
    kl = kl_divergence(p, q)
    expected = sum(math.exp(a) * (a - b) for a, b in zip(p[0].tolist(), q[0].tolist(), strict=True))
    assert kl[0].item() == pytest.approx(expected, rel=1e-6) and kl[1].item() == 0.0
