"""--quantize int8 and bf16 weights: close to fp32, by measures that fail when they are not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gptcli.errors import UsageError
from gptcli.loading.models import load_model
from gptcli.loading.quantize import Int8Linear, quantize_int8

import tiny

PROMPTS = ["今天天气很好", "The weather is nice today, so we", "Hello world! 12345", "我喜欢在早上喝一杯热茶"]


def test_int8_rounds_each_weight_to_the_nearest_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.linspace(0.01, 3, 64)[:, None]  # rows of very different scales
    w[5] = 0.0
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (64,)
    assert int(q.abs().amax(dim=1)[0]) == 127  # each row's largest weight uses the full range
    error = (q.float() * scales[:, None] - w).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-7).all())  # never more than half a step off
    assert bool((q[5] == 0).all()) and scales[5] == 1.0  # a zero row stays zero, nothing divides by 0


@pytest.mark.parametrize(("kernel", "tolerance"), [("fbgemm", 0.03), ("weight-only", 0.01)])
def test_int8_linear_is_close_to_the_float_product(kernel: str, tolerance: float) -> None:
    torch.manual_seed(1)
    w, b, x = torch.randn(96, 64), torch.randn(96), torch.randn(3, 5, 64)
    layer = Int8Linear(w, b, torch.float32, rows=True)
    if kernel == "weight-only":
        layer.packed = None  # what runs where FBGEMM is unavailable (GPUs)
    elif layer.packed is None:
        pytest.skip("this torch has no FBGEMM")
    exact = torch.nn.functional.linear(x, w, b)
    got = layer(x)
    assert got.shape == exact.shape and got.dtype == torch.float32
    # FBGEMM also rounds the activations (7 bits per token), so it strays further than weight-only.
    relative = (got - exact).norm() / exact.norm()
    assert relative < tolerance, relative
    rows = layer.rows(torch.tensor([0, 7]))
    assert torch.allclose(rows, w[[0, 7]], atol=float(layer.row_scales.max()) / 2 + 1e-6)


@pytest.fixture(scope="module")
def fp32(bpe_model: Path):
    return load_model(str(bpe_model), device="cpu")


@pytest.mark.parametrize(
    ("dtype", "quantize", "max_diff", "max_kl"),
    # bf16: as measured on the built-in model (top-10 probabilities within 0.009, docs/performance.md)
    [("bfloat16", None, 0.01, 1e-4), ("float32", "int8", 0.02, 1e-3)],
)
def test_probabilities_stay_close_to_fp32(
    fp32, bpe_model: Path, dtype: str, quantize: str | None, max_diff: float, max_kl: float
) -> None:
    lm = load_model(str(bpe_model), device="cpu", dtype=dtype, quantize=quantize)
    for prompt in PROMPTS:
        ids = torch.tensor([fp32.tokenizer.encode(prompt)])
        with torch.inference_mode():
            p = torch.softmax(fp32.logits(ids)[0].float(), dim=-1)
            q = torch.softmax(lm.logits(ids)[0].float(), dim=-1)
        assert not torch.equal(p, q)  # the weights really are stored differently
        assert (p - q).abs().max() < max_diff, prompt
        kl = (p * (p.log() - q.log())).sum(dim=-1).mean()
        assert kl < max_kl, prompt
        # The same choice wherever fp32's is clear (a near-tie may go either way after rounding).
        top2 = p.topk(2, dim=-1).values
        clear = top2[:, 0] - top2[:, 1] > 2 * max_diff
        assert clear.any() and torch.equal(p.argmax(dim=-1)[clear], q.argmax(dim=-1)[clear]), prompt


def test_int8_stores_the_matmul_weights_as_int8(bpe_model: Path) -> None:
    lm = load_model(str(bpe_model), device="cpu", quantize="int8")
    block = lm.net.blocks[0]
    assert {type(m) for m in (block.c_attn, block.attn_proj, block.c_fc, block.mlp_proj)} == {Int8Linear}
    assert lm.net.lm_head.weight.dtype == torch.int8
    assert lm.quantize == "int8"
    assert (
        tiny.reference_model(lm).transformer.wte.weight.dtype == torch.float32
    )  # transformers' model is the original


def test_quantize_errors(bpe_model: Path, tmp_path: Path, cli) -> None:
    with pytest.raises(UsageError, match=r"--quantize must be int8 \(got 'int4'\)"):
        load_model(str(bpe_model), quantize="int4")
    folder = tmp_path / "scaled"
    shutil.copytree(bpe_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["scale_attn_by_inverse_layer_idx"] = True  # a GPT-2 variant that transformers runs
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="plain GPT-2 checkpoints only"):
        load_model(str(folder), quantize="int8")
    result = cli("complete", "hi", "-m", "./no-such-model", "--quantize", "int4")
    assert result.code == 2 and "--quantize must be int8" in result.err


def test_complete_with_int8(bpe_model: Path, cli) -> None:
    args = ("complete", "今天天气", "-m", bpe_model, "--greedy", "-n", "8", "--json")
    (quantized,) = [json.loads(line) for line in cli(*args, "--quantize", "int8").out.splitlines()]
    (full,) = [json.loads(line) for line in cli(*args).out.splitlines()]
    assert len(quantized["token_ids"]) == 8
    # This model's greedy choices are far from ties: int8 does not change them.
    assert quantized["token_ids"] == full["token_ids"]
