"""attribute: every part equals an independent computation with transformers' own modules, on models
whose LayerNorms have random gains and biases (a missing centring, gain or a double ln_f fails), the
parts sum to the logit, a head's sources sum to the head; the formats and the errors."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptcli.inspection.attribution import attribute
from gptcli.inspection.tracing import encode

import tiny

PROMPTS = tiny.TRACED_PROMPTS


@pytest.fixture(scope="module")
def references(traced_folders: dict[str, Path]):
    """transformers' models (eager attention, for the weights) of the same folders, loaded apart."""
    return {
        name: AutoModelForCausalLM.from_pretrained(traced_folders[name], attn_implementation="eager").eval()
        for name in ("bpe", "hf")
    }


@torch.no_grad()
def reference_parts(model, ids: list[int], position: int, target: int, foil: int | None) -> dict:
    """{(kind, layer, head): logit term} and per-head sources, from transformers' modules: each part of
    the stream at `position` through ln_f with the real pass's scale, times the output layer's row."""
    blocks = model.transformer.h
    got: dict[str, list] = {"z": [], "attn": [], "mlp": [], "embed": [], "final": [], "v": []}
    hooks = [blocks[0].register_forward_pre_hook(lambda _m, a: got["embed"].append(a[0][0]))]
    for block in blocks:
        hooks += [
            block.attn.c_proj.register_forward_pre_hook(lambda _m, a: got["z"].append(a[0][0])),
            block.attn.register_forward_hook(lambda _m, _i, o: got["attn"].append(o[1][0])),
            block.attn.c_attn.register_forward_hook(lambda _m, _i, o: got["v"].append(o[0].chunk(3, -1)[2])),
            block.mlp.register_forward_hook(lambda _m, _i, o: got["mlp"].append(o[0])),
        ]
    hooks.append(model.transformer.ln_f.register_forward_pre_hook(lambda _m, a: got["final"].append(a[0][0])))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, position]
    finally:
        for hook in hooks:
            hook.remove()
    ln_f = model.transformer.ln_f
    x = got["final"][0][position]
    scale = (x.var(unbiased=False) + ln_f.eps).sqrt()
    row = model.lm_head.weight[target] - (0 if foil is None else model.lm_head.weight[foil])

    def term(u: torch.Tensor) -> float:  # LayerNorm with the scale frozen, then the output row
        with torch.no_grad():
            return float(((u - u.mean()) / scale * ln_f.weight) @ row)

    heads = model.config.n_head
    d = model.config.n_embd // heads
    parts: dict = {("embed", None, None): term(got["embed"][0][position])}
    sources: dict = {}
    for layer, block in enumerate(blocks, 1):
        w, b = block.attn.c_proj.weight, block.attn.c_proj.bias  # Conv1D: [in, out]
        for h in range(heads):
            rows = w[h * d : (h + 1) * d]
            parts[("head", layer, h)] = term(got["z"][layer - 1][position, h * d : (h + 1) * d] @ rows)
            pattern = got["attn"][layer - 1][h, position]
            values = got["v"][layer - 1][:, h * d : (h + 1) * d]
            sources[(layer, h)] = [term(pattern[j] * values[j] @ rows) for j in range(position + 1)]
        parts[("attn_bias", layer, None)] = term(b)
        parts[("mlp", layer, None)] = term(got["mlp"][layer - 1][position])
    bias = float(ln_f.bias @ row)
    logit = float(logits[target] - (0 if foil is None else logits[foil]))
    return {"parts": parts, "sources": sources, "bias": bias, "logit": logit}


@pytest.mark.parametrize("name", ["bpe", "hf"])
@pytest.mark.parametrize("position,foil", [(-1, None), (4, 7)])
def test_every_part_equals_transformers_modules(
    traced_lms, references, name: str, position: int, foil
) -> None:
    lm, ref = traced_lms[name], references[name]
    result = attribute(lm, PROMPTS[name], position=position, foil=foil)
    ids = encode(lm, PROMPTS[name]).ids
    at = position % len(ids)
    with torch.no_grad():
        top = int(ref(torch.tensor([ids])).logits[0, at].argmax())
    assert result.position == at and result.target["id"] == top  # default target: the top-1
    assert (result.foil is None) == (foil is None)
    expected = reference_parts(ref, ids, at, top, foil)
    got = {(c.kind, c.layer, c.head): c for c in result.components}
    assert set(got) == set(expected["parts"])
    for key, value in expected["parts"].items():
        assert abs(got[key].logit - value) < 1e-4, key
    for (layer, h), sources in expected["sources"].items():
        mine = got[("head", layer, h)].sources
        assert mine is not None and [j for j, _ in mine] == list(range(at + 1))
        assert max(abs(a - b) for (_, a), b in zip(mine, sources, strict=True)) < 1e-4
        assert abs(sum(x for _, x in mine) - got[("head", layer, h)].logit) < 1e-4  # sources sum to the head
    assert abs(result.bias - expected["bias"]) < 1e-4
    assert abs(result.logit - expected["logit"]) < 1e-4
    assert abs(result.total - result.logit) < 1e-4  # the parts plus the bias term are the logit
    if name == "hf":  # eager attention for the pass that read the pattern, and back after it
        assert lm.model.config._attn_implementation == "sdpa"
    # The LayerNorm's gain and centring matter on this fixture: without the gain the parts do not add up.
    assert abs(sum(expected["parts"].values()) + expected["bias"] - expected["logit"]) < 1e-4


def test_json_schema(traced_folders, cli) -> None:
    out = cli(
        "attribute", PROMPTS["bpe"], "-m", traced_folders["bpe"], "--json", "--foil-id", "5", "--at", "3"
    )
    assert out.code == 0, out.err
    obj = json.loads(out.out)
    assert set(obj) == {"tokens", "position", "target", "foil", "logit", "bias", "components"}
    assert obj["position"] == 3 and obj["foil"]["id"] == 5 and set(obj["target"]) == {"id", "token"}
    assert set(obj["tokens"][0]) == {"id", "token", "bytes"}
    kinds = [c["kind"] for c in obj["components"]]
    assert kinds == ["embed"] + ["head", "head", "attn_bias", "mlp"] * 2
    for c in obj["components"]:
        assert set(c) == (
            {"kind", "layer", "head", "logit", "sources"}
            if c["kind"] == "head"
            else {"kind", "layer", "head", "logit"}
        )
        if c["kind"] == "head":
            assert [s["position"] for s in c["sources"]] == [0, 1, 2, 3]
    assert abs(sum(c["logit"] for c in obj["components"]) + obj["bias"] - obj["logit"]) < 1e-4
    plain = json.loads(cli("attribute", "hi", "-m", traced_folders["bpe"], "--json").out)
    assert plain["foil"] is None


def test_tsv_lines(traced_folders, cli) -> None:
    out = cli("attribute", PROMPTS["bpe"], "-m", traced_folders["bpe"])
    assert out.code == 0, out.err
    lines = [line.split("\t") for line in out.out.splitlines()]
    assert all(len(line) == 5 for line in lines)
    assert lines[0][:4] == ["embed", "-", "-", "-"]
    assert lines[-2][0] == "bias" and lines[-1][0] == "logit"
    parts = sum(float(line[4]) for line in lines if line[0] in ("embed", "head", "attn_bias", "mlp", "bias"))
    assert abs(parts - float(lines[-1][4])) < 1e-3
    count = len(encode_count(traced_folders))
    assert sum(line[0] == "source" for line in lines) == 4 * count  # 2 blocks x 2 heads, every position


def encode_count(traced_folders) -> list[int]:
    from gptcli.loading.models import load_model

    return encode(load_model(str(traced_folders["bpe"]), device="cpu"), PROMPTS["bpe"]).ids


@pytest.mark.parametrize("colours", ["256", "16", "none"])
def test_terminal_view(traced_folders, cli, monkeypatch: pytest.MonkeyPatch, colours: str) -> None:
    monkeypatch.setattr("gptcli.cli.attribute.is_tty", lambda *a: True)
    if colours == "none":
        monkeypatch.setenv("NO_COLOR", "1")
    else:
        monkeypatch.setenv("FORCE_COLOR", "1")
        monkeypatch.setenv("COLORTERM", "" if colours == "16" else "256")
        monkeypatch.setenv("TERM", "xterm" if colours == "16" else "xterm-256color")
    out = cli("attribute", PROMPTS["bpe"], "-m", traced_folders["bpe"], "--target-id", "5", "--foil-id", "6")
    assert out.code == 0, out.err
    assert "direct logit attribution" in out.out and "minus that of" in out.out
    assert "mlp 1" in out.out and "embed" in out.out and "reads from:" in out.out
    assert "the model's logit" in out.out
    if colours == "none":
        assert "\x1b[" not in out.out


def test_pictures_are_written(traced_folders, cli, tmp_path: Path) -> None:
    for suffix in (".png", ".svg", ".html"):
        path = tmp_path / f"dla{suffix}"
        out = cli("attribute", PROMPTS["bpe"], "-m", traced_folders["bpe"], "--save", path, "--json")
        assert out.code == 0, out.err
        assert json.loads(out.out)["components"]  # the picture does not replace the output
        data = path.read_bytes()
        if suffix == ".png":
            assert data.startswith(b"\x89PNG")
        elif suffix == ".svg":
            assert b"<svg" in data and b"mlp" in data
        else:
            parser = HTMLParser()
            parser.feed(data.decode())
            assert "<table>" in data.decode() and "h1" in data.decode() and "mlp" in data.decode()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--target", "a", "--target-id", "3"], "--target or --target-id"),
        (["--foil", "a", "--foil-id", "3"], "--foil or --foil-id"),
        (["--target-id", "100000"], "--target-id 100000 is out of range"),
        (["--target", "今天天气很好"], "give one token"),
        (["--target-id", "5", "--foil-id", "5"], "the foil is the target"),
        (["--at", "99"], "--at 99 is out of range"),
        (["--save", "x.gif"], "--save x.gif"),
    ],
)
def test_bad_input_is_one_error_line(traced_folders, cli, args: list[str], message: str) -> None:
    out = cli("attribute", "今天天气很好", "-m", traced_folders["bpe"], *args)
    assert out.code == 2
    assert out.err.startswith("Error: ") and message in out.err and len(out.err.strip().splitlines()) == 1


def test_a_model_without_a_final_layernorm_is_refused_in_plain_words(
    traced_folders, cli, tmp_path: Path
) -> None:
    """A Llama's final norm is an RMSNorm: one usage error that says attribution needs a LayerNorm, not
    the hook's internal name."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(traced_folders["bpe"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    out = cli("attribute", "今天天气很好", "-m", tmp_path / "llama")
    assert out.code == 2
    assert out.err.startswith("Error: attribution needs a final LayerNorm")
    assert "hook" not in out.err and len(out.err.strip().splitlines()) == 1
