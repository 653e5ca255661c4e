"""attention: weights equal transformers' eager attention, the capture changes nothing, rollout, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from gptcli.inspection.attention import attention_grids, attention_rollout, attention_weights
from gptcli.inspection.tracing import encode
from gptcli.loading.models import load_model

import tiny

PROMPTS = tiny.TRACED_PROMPTS


@pytest.fixture(scope="module")
def folders(traced_folders: dict[str, Path]) -> dict[str, Path]:
    return traced_folders


@pytest.fixture(scope="module")
def lms(traced_lms):
    return traced_lms


@pytest.fixture(scope="module")
def eager(folders: dict[str, Path]):
    """transformers' models with eager attention, loaded independently of gptcli."""
    return {
        name: AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        for name, path in folders.items()
    }


def reference_attentions(model, ids: list[int]) -> np.ndarray:
    """[layers, heads, positions, positions] from transformers' output_attentions."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    return torch.stack([a[0] for a in out.attentions]).numpy()


@pytest.mark.parametrize("name", ["bpe", "bert", "hf"])
def test_weights_equal_transformers_eager_attention(lms, eager, name: str) -> None:
    result = attention_weights(lms[name], PROMPTS[name], queries="all")
    count = len(result.prompt.ids)
    assert result.queries == list(range(count))
    reference = reference_attentions(eager[name], result.prompt.ids)
    assert result.weights.shape == reference.shape == (2, 2, count, count)
    assert np.abs(result.weights - reference).max() < 1e-6
    # each row is a distribution over the keys up to its query, and exactly 0 after it
    assert np.allclose(result.weights.sum(axis=-1), 1, atol=1e-6)
    future = np.triu(np.ones((count, count), dtype=bool), k=1)
    assert (result.weights[..., future] == 0).all()
    # only the rows asked for: the last position by default, or a few
    last = attention_weights(lms[name], PROMPTS[name])
    assert last.queries == [count - 1] and last.weights.shape == (2, 2, 1, count)
    assert np.abs(last.weights[:, :, 0] - reference[:, :, -1]).max() < 1e-6
    some = attention_weights(lms[name], PROMPTS[name], queries="1,-2")
    assert np.abs(some.weights - reference[:, :, [1, count - 2]]).max() < 1e-6


@pytest.mark.parametrize("name", ["bpe", "hf"])
def test_capture_leaves_the_logits_unchanged(lms, name: str) -> None:
    lm = lms[name]
    ids = torch.tensor([encode(lm, PROMPTS[name]).ids])
    with torch.inference_mode():
        before = lm.logits(ids)
    implementation = None if lm.net is not None else tiny.reference_model(lm).config._attn_implementation
    attention_weights(lm, PROMPTS[name], queries="all", rollout=True)
    with torch.inference_mode():
        after = lm.logits(ids)
    assert torch.equal(before, after)
    if implementation is not None:  # transformers' model ran eager for the capture, and is back as it was
        assert tiny.reference_model(lm).config._attn_implementation == implementation == "sdpa"


def test_the_traced_stream_is_the_models_own(lms) -> None:
    """gptcli's trace computes the forward pass's numbers, also while it computes weights on the side."""
    from gptcli.inspection.tracing import final_logits, run

    lm = lms["bpe"]
    ids = encode(lm, PROMPTS["bpe"]).ids
    last: list[torch.Tensor] = []
    run(
        lm,
        ids,
        lambda layer, point, x: last.append(x) if (layer, point) == (2, "block") else None,
        on_attention=lambda layer, w: None,
    )
    with torch.inference_mode():
        assert torch.allclose(final_logits(lm)(last[0]), lm.logits(torch.tensor([ids])).float(), atol=1e-5)


@pytest.mark.parametrize("name", ["bpe", "hf"])
def test_rollout_equals_a_direct_computation(lms, eager, name: str) -> None:
    result = attention_weights(lms[name], PROMPTS[name], queries="2,-1", rollout=True)
    count = len(result.prompt.ids)
    reference = reference_attentions(eager[name], result.prompt.ids).astype(np.float64)
    joint = np.eye(count)
    for layer in reference:  # Abnar & Zuidema 2020: (A + I) / 2 of the head mean, renormalised
        a = (layer.mean(axis=0) + np.eye(count)) / 2
        joint = (a / a.sum(axis=-1, keepdims=True)) @ joint
    assert result.rollout is not None and result.rollout.shape == (2, count)
    assert np.abs(result.rollout - joint[[2, count - 1]]).max() < 1e-6
    assert np.allclose(result.rollout.sum(axis=-1), 1)
    assert (result.rollout[0, 3:] == 0).all()  # position 2 draws on nothing after it
    assert np.allclose(attention_rollout(np.stack([np.eye(3)] * 2)), np.eye(3))


def test_json_schema(folders, cli) -> None:
    out = cli("attention", PROMPTS["bpe"], "-m", folders["bpe"], "--json", "--query", "0,2", "--rollout")
    assert out.code == 0, out.err
    obj = json.loads(out.out)
    assert set(obj) == {"model", "prompt", "tokens", "queries", "attention", "rollout"}
    assert obj["queries"] == [0, 2] and obj["prompt"] == PROMPTS["bpe"]
    count = len(obj["tokens"])
    a = np.array(obj["attention"])
    assert a.shape == (2, 2, 2, count)  # [block][head][query][key]
    assert (
        (a[:, :, 0, 1:] == 0).all() and (a[:, :, 1, 3:] == 0).all() and a[:, :, 0, 0].tolist() == [[1, 1]] * 2
    )
    assert np.array(obj["rollout"]).shape == (2, count)
    result = attention_weights(
        load_model(str(folders["bpe"]), device="cpu"), PROMPTS["bpe"], queries="0,2", rollout=True
    )
    assert obj == result.to_json(str(folders["bpe"]))  # the pieces written make the same object
    plain = json.loads(cli("attention", "hi there", "-m", folders["bpe"], "--json").out)
    assert set(plain) == {"model", "prompt", "tokens", "queries", "attention"}
    assert plain["queries"] == [len(plain["tokens"]) - 1]


def test_tsv_lines(folders, cli) -> None:
    out = cli("attention", PROMPTS["bpe"], "-m", folders["bpe"], "--head", "2.1", "--query", "all")
    assert out.code == 0, out.err
    lines = [line.split("\t") for line in out.out.splitlines()]
    assert all(len(line) == 6 and line[:2] == ["2", "1"] for line in lines)
    count = int(lines[-1][2]) + 1
    assert len(lines) == count * (count + 1) // 2  # keys up to each query only
    for q in range(count):
        row = [float(line[5]) for line in lines if line[2] == str(q)]
        assert len(row) == q + 1 and abs(sum(row) - 1) < 1e-5
    assert lines[0][4] == "今天"
    layer = cli("attention", PROMPTS["bpe"], "-m", folders["bpe"], "--layer", "1")
    assert {tuple(line.split("\t")[:2]) for line in layer.out.splitlines()} == {("1", "0"), ("1", "1")}
    everything = cli("attention", PROMPTS["bpe"], "-m", folders["bpe"])
    assert {tuple(line.split("\t")[:2]) for line in everything.out.splitlines()} == {
        ("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")
    }  # fmt: skip
    rollout = cli("attention", PROMPTS["bpe"], "-m", folders["bpe"], "--rollout")
    assert {line.split("\t")[0] for line in rollout.out.splitlines()} == {"rollout"}


def test_views(lms) -> None:
    result = attention_weights(lms["bert"], "今天天气", queries="all")
    tokens = [t["token"] for t in result.prompt.tokens]
    assert tokens == ["[CLS]", "今", "天", "天", "气"]
    by_block = attention_grids(attention_weights(lms["bert"], "今天天气"))
    assert len(by_block) == 1 and by_block[0].rows == ["1", "2"] and by_block[0].columns == tokens
    heads = attention_grids(attention_weights(lms["bert"], "今天天气"), layer=2)[0]
    assert heads.rows == ["head 0", "head 1", "mean"]
    mean = heads.values[2]
    assert np.allclose(np.array(mean, dtype=float), np.mean(np.array(heads.values[:2], dtype=float), axis=0))
    patterns = attention_grids(result)
    assert len(patterns) == 2 and patterns[0].rows[0] == "0 [CLS]"
    assert patterns[0].values[0][1:] == [None] * 4  # the first query sees only itself
    one = attention_grids(result, head=(1, 0))[0]
    assert one.values[3][:4] == pytest.approx(result.weights[0, 0, 3, :4].tolist())
    sink = attention_grids(result, head=(1, 0), hide_sink=True)[0]
    assert sink.shade(3, 0) is None and max(sink.shade(i, j) or 0 for i in range(5) for j in range(1, 5)) == 1


def test_terminal_view(folders, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gptcli.cli.attention.is_tty", lambda *a: True)
    out = cli("attention", "今天天气很好", "-m", folders["bert"])
    assert out.code == 0, out.err
    lines = out.out.splitlines()
    assert "mean of the 2 heads" in lines[0]
    assert lines[1].split() == ["block", "[CLS]", "今", "天", "天", "气", "很", "好"]
    for line in lines[2:4]:
        cells = line.split()
        # percentages of one row, rounded (each after its shade glyph when there is no colour)
        assert abs(sum(int(c.strip("·░▒▓█")) for c in cells[1:]) - 100) <= 4
    rollout = cli("attention", "今天天气很好", "-m", folders["bert"], "--rollout")
    assert "a heuristic" in rollout.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--head", "1-2"], "expected LAYER.HEAD"),
        (["--head", "1.0", "--layer", "1"], "do not pass --layer too"),
        (["--rollout", "--layer", "1"], "takes no --layer or --head"),
        (["--query", "x"], "--query 'x'"),
        (["--save", "a.pdf"], "must end in .png, .svg, .html"),
        (["--save", "no-such-folder/x.png"], "--save no-such-folder/x.png: no-such-folder does not exist"),
    ],
)
def test_bad_options_fail_before_loading(cli, args: list[str], message: str) -> None:
    out = cli("attention", "hi", "-m", "./no-such-model", *args)
    assert out.code == 2 and message in out.err, out.err


def test_no_such_block_or_head(folders, cli) -> None:
    out = cli("attention", "hi", "-m", folders["bpe"], "--layer", "3")
    assert out.code == 2 and "block 3 does not exist: the model has blocks 1 to 2" in out.err
    out = cli("attention", "hi", "-m", folders["bpe"], "--head", "1.2")
    assert out.code == 2 and "head 2 does not exist: block 1 has heads 0 to 1" in out.err
    out = cli("attention", "hi", "-m", folders["bpe"], "--query", "5")
    assert out.code == 2 and "--query 5 is out of range" in out.err


def test_pictures_are_written(folders, cli, tmp_path: Path) -> None:
    from PIL import Image

    for suffix in ("png", "svg", "html"):
        path = tmp_path / f"attention.{suffix}"
        out = cli("attention", "今天天气很好", "-m", folders["bert"], "--save", path, "--query", "all")
        assert out.code == 0, out.err
        assert path.stat().st_size > 0
    with Image.open(tmp_path / "attention.png") as image:
        assert image.format == "PNG"
        image.load()
    svg = (tmp_path / "attention.svg").read_text(encoding="utf-8")
    assert "[CLS]" in svg and "block 2" in svg
    page = (tmp_path / "attention.html").read_text(encoding="utf-8")
    assert page.count("<table>") == 2 and "[CLS]" in page and "今" in page
    assert "http" not in page and "<script" not in page
    assert "→" in page  # hover details: query → key and the weight
