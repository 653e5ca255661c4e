"""--quantize int8/int4 and bf16 weights: close to fp32, by measures that fail when they are not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gptcli.errors import UsageError
from gptcli.loading.cpu import cpu_has_bf16
from gptcli.loading.models import load_model
from gptcli.loading.quantize import INT4_GROUP, Int4Linear, Int8Linear, quantize_int4, quantize_int8

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
    # int4: 16 levels per group of 32 weights (a whole row of this 32-wide model), bf16 activations
    [("bfloat16", None, 0.01, 1e-4), ("float32", "int8", 0.02, 1e-3), ("float32", "int4", 0.05, 0.03)],
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
    assert lm.net is not None  # gptcli's own GPT-2 runs it
    block = lm.net.blocks[0]
    assert {type(m) for m in (block.c_attn, block.attn_proj, block.c_fc, block.mlp_proj)} == {Int8Linear}
    assert lm.net.lm_head.weight.dtype == torch.int8
    assert lm.quantize == "int8"
    assert (
        tiny.reference_model(lm).transformer.wte.weight.dtype == torch.float32
    )  # transformers' model is the original


def test_quantize_errors(bpe_model: Path, tmp_path: Path, cli) -> None:
    with pytest.raises(UsageError, match=r"--quantize must be int8 or int4 \(got 'int2'\)"):
        load_model(str(bpe_model), quantize="int2")
    folder = tmp_path / "scaled"
    shutil.copytree(bpe_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["scale_attn_by_inverse_layer_idx"] = True  # a GPT-2 variant that transformers runs
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="plain GPT-2 checkpoints only"):
        load_model(str(folder), quantize="int8")
    result = cli("complete", "hi", "-m", "./no-such-model", "--quantize", "int2")
    assert result.code == 2 and "--quantize must be int8 or int4" in result.err
    result = cli("complete", "hi", "-m", "./no-such-model", "--threads", "0")
    assert result.code == 2 and "--threads must be at least 1" in result.err


def test_complete_with_int8(bpe_model: Path, cli) -> None:
    args = ("complete", "今天天气", "-m", bpe_model, "--greedy", "-n", "8", "--json")
    (quantized,) = [json.loads(line) for line in cli(*args, "--quantize", "int8").out.splitlines()]
    (full,) = [json.loads(line) for line in cli(*args).out.splitlines()]
    assert len(quantized["token_ids"]) == 8
    # This model's greedy choices are far from ties: int8 does not change them.
    assert quantized["token_ids"] == full["token_ids"]


def test_int4_maps_each_group_onto_sixteen_levels() -> None:
    torch.manual_seed(2)
    w = torch.randn(48, 96) * torch.linspace(0.01, 3, 48)[:, None]
    w[3] = 0.5  # a constant row: its groups have no spread, nothing divides by zero
    q, params = quantize_int4(w)
    assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) <= 15
    groups = 96 // INT4_GROUP
    assert params.shape == (groups, 48, 2)
    scale = params[..., 0].t().repeat_interleave(INT4_GROUP, dim=1)
    zero = params[..., 1].t().repeat_interleave(INT4_GROUP, dim=1)
    restored = (q.float() - 8) * scale + zero
    assert bool(((restored - w).abs() <= scale / 2 + 1e-6).all())  # never more than half a step off
    assert torch.allclose(restored[3], w[3], atol=1e-6)
    # Each group's smallest and largest weight are its first and last level.
    codes = q.view(48, groups, INT4_GROUP)
    spread = [i for i in range(48) if i != 3]
    assert bool((codes.amin(-1)[spread] == 0).all()) and bool((codes.amax(-1)[spread] == 15).all())


def test_int4_linear_is_close_to_the_float_product() -> None:
    torch.manual_seed(3)
    # 100 output rows: not a multiple of the kernel's 16, so the padding is exercised too
    w, b, x = torch.randn(100, 64), torch.randn(100), torch.randn(3, 5, 64)
    layer = Int4Linear(w, b, torch.float32, rows=True)
    q, params = quantize_int4(w)
    scale = params[..., 0].t().repeat_interleave(INT4_GROUP, dim=1)
    restored = (q.float() - 8) * scale + params[..., 1].t().repeat_interleave(INT4_GROUP, dim=1)
    got = layer(x)
    assert got.shape == (3, 5, 100) and got.dtype == torch.float32
    # The kernel multiplies by exactly the restored weights; only bf16 activations and sums differ.
    exact = torch.nn.functional.linear(x, restored, b)
    assert (got - exact).norm() / exact.norm() < 0.01
    assert torch.allclose(layer.rows(torch.tensor([[0, 99]])), restored[[0, 99]][None], atol=1e-5)


def test_int4_stores_the_matmul_weights_in_four_bits(bpe_model: Path) -> None:
    lm = load_model(str(bpe_model), device="cpu", quantize="int4")
    assert lm.net is not None  # gptcli's own GPT-2 runs it
    block = lm.net.blocks[0]
    assert {type(m) for m in (block.c_attn, block.attn_proj, block.c_fc, block.mlp_proj)} == {Int4Linear}
    assert isinstance(lm.net.lm_head, Int8Linear) and lm.quantize == "int4"  # the output layer: 8 bits


def test_complete_with_int4(bpe_model: Path, cli) -> None:
    args = ("complete", "今天天气", "-m", bpe_model, "--greedy", "-n", "8", "--json", "--threads", "1")
    result = cli(*args, "--quantize", "int4")
    assert result.code == 0, result.err
    (quantized,) = [json.loads(line) for line in result.out.splitlines()]
    (full,) = [json.loads(line) for line in cli(*args).out.splitlines()]
    assert len(quantized["token_ids"]) == 8
    # The first choice is clear on this trained model: 4 bits do not change it.
    assert quantized["token_ids"][0] == full["token_ids"][0]


@pytest.mark.skipif(not cpu_has_bf16(), reason="no bf16 instructions on this CPU")
def test_bf16_on_a_cpu_with_bf16_runs_on_packed_weights(bpe_model: Path) -> None:
    from gptcli.gpt2 import Linear

    lm = load_model(str(bpe_model), device="cpu", dtype="bfloat16")
    assert lm.net is not None  # gptcli's own GPT-2 runs it
    layer = lm.net.blocks[0].c_fc
    assert layer.packed is not None and layer.weight is None  # one copy: the packed one
    assert lm.net.lm_head.weight is not None  # the output layer's table also serves the embeddings
    torch.manual_seed(4)
    w, b, x = torch.randn(96, 64).bfloat16(), torch.randn(96), torch.randn(3, 5, 64)
    packed = Linear(w, b, torch.float32)
    assert packed.packed is not None
    # The same bf16 weights and inputs by oneDNN's packed kernel and by F.linear: rounding apart only.
    expected = torch.nn.functional.linear(x.bfloat16(), w).float() + b
    assert (packed(x) - expected).abs().max() < 0.02 * expected.abs().max()
