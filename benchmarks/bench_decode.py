"""Decode speed: gptcli's generation path against transformers' `generate`, on a GPT-2-124M shape.

One prompt, 128 new tokens (end-of-text ignored), greedy and sampled (top-k 50, temperature 1), with
gptcli in fp32, `--dtype bfloat16` and `--quantize int8`, against transformers fp32 (the reference the
goals are set against) and transformers bf16. The variants take turns, round after round, and each
figure is the median over the rounds. Each gptcli figure is also given as a fraction of

- its kernel ceiling: the speed of its own weight matmuls alone (every layer's four, and the output
  layer, on one token, on the one thread gptcli decodes one sequence with), measured here, i.e. what
  a loop with no other cost would reach;
- the bandwidth bound: the read bandwidth measured here divided by the bytes of weights one token
  reads.

The second table measures the kernels gptcli did not pick, to show why it picked its own.

    python benchmarks/bench_decode.py            # 128 new tokens, 5 rounds (about 8 minutes)
    python benchmarks/bench_decode.py --quick    # 32 new tokens, no transformers bf16 (about a minute)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# As gptcli's commands do (gptcli/cli/_common.py), before torch loads, for both sides: on a shared
# machine spinning OpenMP threads make every parallel kernel wait a scheduler slice.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import alternate, machine, median, model_folder, print_table

PROMPT = "Once upon a time, in a small village by the sea, there lived"
GOALS = {"float32": 1.6, "bfloat16": 2.3, "int8": 3.3, "int4": 4.3}  # × transformers fp32 (issues 6, 25)


def read_bandwidth() -> float:
    """Bytes per second that summing a 1 GiB buffer reads, with torch's threads (best of 5)."""
    import torch

    data = torch.ones(2**28)  # 1 GiB of float32, larger than any cache
    data.sum()
    best = min(_timed(data.sum) for _ in range(5))
    return data.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmuls(net) -> list:
    """gptcli's weight matmuls for one token, in the order the forward pass runs them."""
    layers = [m for b in net.blocks for m in (b.c_attn, b.attn_proj, b.c_fc, b.mlp_proj)]
    return [*layers, net.lm_head]


def weight_bytes(net) -> int:
    """Bytes of weights one decoded token reads (the output layer's table included), scales included."""
    c = net.config
    shapes = [
        (3 * c.n_embd, c.n_embd),
        (c.n_embd, c.n_embd),
        (4 * c.n_embd, c.n_embd),
        (c.n_embd, 4 * c.n_embd),
    ]
    shapes = shapes * c.n_layer + [(c.vocab_size, c.n_embd)]
    total = 0
    for out, width in shapes:
        if net.quantize == "int8":
            total += out * width + 4 * out  # a float scale per row
        elif net.quantize == "int4":
            total += out * width // 2 + 2 * 2 * out * width // 32  # bf16 scale and offset per 32 weights
        else:
            total += out * width * net.weight_dtype.itemsize
    return total


def kernel_seconds(net, rounds: int = 7) -> float:
    """Median seconds to run gptcli's weight matmuls once each on one token (no cache holds them all)."""
    import torch

    calls = [(m, torch.randn(1, 1, layer_in(net, i), dtype=net.dtype)) for i, m in enumerate(matmuls(net))]

    def once() -> None:
        for layer, x in calls:
            layer(x)

    with torch.inference_mode():
        once()
        return statistics.median(_timed(once) for _ in range(rounds))


def layer_in(net, index: int) -> int:
    """Input width of the `index`-th of `matmuls(net)`: the MLP's output projection reads 4x the width."""
    width = int(net.config.n_embd)
    return 4 * width if index % 4 == 3 and index < 4 * net.config.n_layer else width


def alternatives(net32) -> list[list[str]]:
    """Per-token matmul time of kernels gptcli does not use, on the same weights: why it picked its own."""
    import torch
    import torch.nn.functional as F

    from gptcli.loading.quantize import quantize_int8

    conv = matmuls(net32)[:-1]  # Conv1D layers, [in, out]
    head = net32.lm_head.table  # the embeddings, [vocab, width]
    rows = []

    def run(name: str, layers: list, note: str) -> None:
        inputs: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        for _, width, dtype in layers:
            inputs.setdefault((width, dtype), torch.randn(1, width, dtype=dtype))
        calls = [(fn, inputs[(width, dtype)]) for fn, width, dtype in layers]

        def once() -> None:
            for fn, x in calls:
                fn(x)

        with torch.inference_mode():
            once()
            seconds = statistics.median(_timed(once) for _ in range(5))
        rows.append([name, f"{1 / seconds:.1f}", note])

    f32 = torch.float32
    bf16 = torch.bfloat16
    out_in = [m.weight.t().contiguous() for m in conv]
    run(
        "fp32 F.linear, [out, in]",
        [(lambda x, w=w: F.linear(x, w), w.shape[1], f32) for w in [*out_in, head]],
        "nn.Linear's layout (and transformers' output layer): slower than addmm on [in, out]",
    )
    run(
        "fp32 addmm blocks, F.linear output layer",
        [(lambda x, m=m: m(x), layer_in(net32, i), f32) for i, m in enumerate(conv)]
        + [(lambda x: F.linear(x, head), head.shape[1], f32)],
        "transformers' kernels: the output layer on the embeddings as they are",
    )
    del out_in
    in_out16 = [m.weight.to(bf16) for m in conv]
    head16 = head.to(bf16)
    run(
        "bf16 addmm, [in, out]",
        [(lambda x, w=w: torch.mm(x, w), w.shape[0], bf16) for w in in_out16]
        + [(lambda x: F.linear(x, head16), head16.shape[1], bf16)],
        "transformers' bf16 layout (Conv1D)",
    )
    del in_out16
    packed = [quantize_int8(m.weight.t()) for m in conv] + [quantize_int8(head)]
    run(
        "int8 _weight_int8pack_mm, fp32 activations",
        [
            (lambda x, q=q, s=s: torch.ops.aten._weight_int8pack_mm(x, q, s), q.shape[1], f32)
            for q, s in packed
        ],
        "no vectorized fp32 path on this CPU",
    )
    return rows


QUALITY_PROMPTS = [
    "Alice was beginning to get very tired",
    "今天天气",
    "The Queen said",
    "我们",
    "Once upon a",
]


def quality(folder: Path, text: str) -> list[list[str]]:
    """How far bf16, int8 and int4 move a model's numbers from fp32: perplexity of `text`, the top-10
    probabilities and KL divergence after a few prompts, and greedy ids."""
    import torch

    from gptcli.generation.generate import complete
    from gptcli.generation.sampling import resolve_settings
    from gptcli.inspection.predict import score_text
    from gptcli.loading.models import load_model

    base = load_model(str(folder), device="cpu")
    greedy = resolve_settings(None, greedy=True, max_new_tokens=64, ignore_eos=True, lookup=0)
    base_ppl = score_text(base, text).perplexity
    base_ids = [d.token_ids for d in complete(base, QUALITY_PROMPTS, greedy)]
    rows = [["fp32", f"{base_ppl:.3f}", "", "", "", "", ""]]
    variants: tuple[tuple[str, dict[str, Any]], ...] = (
        ("bf16", {"dtype": "bfloat16"}),
        ("int8", {"quantize": "int8"}),
        ("int4", {"quantize": "int4"}),
    )
    for name, kwargs in variants:
        lm = load_model(str(folder), device="cpu", **kwargs)
        ppl = score_text(lm, text).perplexity
        diffs, kls, top1 = [], [], 0
        for prompt in QUALITY_PROMPTS:
            ids = torch.tensor([base.tokenizer.encode(prompt)])
            with torch.inference_mode():
                p = torch.log_softmax(base.logits(ids)[0, -1].float(), dim=-1)
                q = torch.log_softmax(lm.logits(ids)[0, -1].float(), dim=-1)
            top = torch.topk(p, 10).indices
            diffs.append(float((p.exp()[top] - q.exp()[top]).abs().max()))
            kls.append(float((p.exp() * (p - q)).sum()))
            top1 += int(p.argmax() == q.argmax())
        same = [
            next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
            for x, y in zip(
                base_ids, [d.token_ids for d in complete(lm, QUALITY_PROMPTS, greedy)], strict=True
            )
        ]
        rows.append(
            [
                name,
                f"{ppl:.3f}",
                f"{ppl / base_ppl - 1:+.3%}",
                f"{max(diffs):.4f}",
                f"{sum(kls) / len(kls):.2e}",
                f"{top1}/{len(QUALITY_PROMPTS)}",
                f"{statistics.median(same)} of 64",
            ]
        )
    return rows


def speed_rows(
    modes: list[str],
    refs: list[str],
    lms: list[str],
    rate: dict[tuple[str, str], float],
    tokens: dict[tuple[str, str], int],
    ceilings: dict[str, float],
    bounds: dict[str, float],
) -> list[list[str]]:
    """The speed table: transformers' rows, then gptcli's beside its goal, kernel ceiling and bound."""
    rows: list[list[str]] = []
    for mode in modes:
        base = rate[("transformers float32", mode)]
        for precision in refs:
            key = ("transformers " + precision, mode)
            if key in rate:
                note = f" ({tokens[key]} tokens)" if key in tokens else ""
                rows.append(
                    [key[0] + note, mode, f"{rate[key]:.1f}", f"{rate[key] / base:.2f}", "", "", "", ""]
                )
        for precision in lms:
            r = rate[("gptcli " + precision, mode)]
            goal = GOALS[precision]
            met = "yes" if r / base >= goal else f"no ({r / base / goal:.0%} of it)"
            rows.append(
                [
                    "gptcli " + precision,
                    mode,
                    f"{r:.1f}",
                    f"{r / base:.2f}",
                    f"≥ {goal} {met}",
                    f"{ceilings[precision]:.1f}",
                    f"{r / ceilings[precision]:.0%}",
                    f"{bounds[precision]:.0f} ({r / bounds[precision]:.0%})",
                ]
            )
    return rows


def print_agreement(ids: dict[tuple[str, str], list[int]], new: int) -> None:
    """How far each run's greedy ids agree with gptcli fp32's, and fp32's with transformers'."""
    greedy32 = ids[("gptcli float32", "greedy")]
    identical = greedy32 == ids[("transformers float32", "greedy")]
    print(f"fp32 greedy ids identical to transformers generate: {identical}")
    for precision in ("bfloat16", "int8", "int4"):
        other = ids[("gptcli " + precision, "greedy")]
        same = next((i for i, (a, b) in enumerate(zip(other, greedy32, strict=True)) if a != b), len(other))
        print(f"gptcli {precision} greedy ids equal to fp32 for the first {same} of {new} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="32 new tokens, no transformers bf16")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--quality-model",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "gptcli" / "builtin",
        help="a trained model to measure bf16/int8 quality on (default: the built-in model)",
    )
    parser.add_argument(
        "--quality-text", type=Path, default=None, help="text for perplexity (default: README)"
    )
    args = parser.parse_args()
    new = args.new_tokens or (32 if args.quick else 128)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)

    from gptcli.generation.decoding import torch_threads
    from gptcli.generation.generate import complete
    from gptcli.generation.sampling import resolve_settings
    from gptcli.loading.models import load_model

    folder = model_folder()

    started = machine()
    lms = {
        "float32": load_model(str(folder), device="cpu"),
        "bfloat16": load_model(str(folder), device="cpu", dtype="bfloat16"),
        "int8": load_model(str(folder), device="cpu", quantize="int8"),
        "int4": load_model(str(folder), device="cpu", quantize="int4"),
    }
    tokenizer = AutoTokenizer.from_pretrained(folder)
    refs = {"float32": AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()}
    if not args.quick:
        refs["bfloat16"] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    for model in refs.values():
        model.generation_config.eos_token_id = None  # 128 tokens, as gptcli's --ignore-eos

    modes: dict[str, dict[str, Any]] = {
        # Without lookup decoding (on by default for greedy): the goal is set without it, and
        # bench_lookup.py reports it separately.
        "greedy": {"greedy": True, "lookup": 0},
        "top-k 50": {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "seed": 1234},
    }
    ids: dict[tuple[str, str], list[int]] = {}

    def ours(precision: str, mode: str) -> Callable[[], None]:
        settings = resolve_settings(None, max_new_tokens=new, ignore_eos=True, **modes[mode])

        def run() -> None:
            (done,) = complete(lms[precision], PROMPT, settings)
            assert len(done.token_ids) == new
            ids[("gptcli " + precision, mode)] = done.token_ids

        return run

    def theirs(precision: str, mode: str, tokens: int) -> Callable[[], None]:
        model = refs[precision]
        sample = {"do_sample": False} if mode == "greedy" else {"do_sample": True, "top_k": 50, "top_p": 1.0}

        def run() -> None:
            with torch.inference_mode():
                enc = tokenizer(PROMPT, return_tensors="pt")
                out = model.generate(
                    **enc,
                    max_new_tokens=tokens,
                    pad_token_id=tokenizer.eos_token_id,
                    temperature=1.0,
                    **sample,
                )
                tokenizer.decode(out[0, enc["input_ids"].shape[1] :])
            ids[("transformers " + precision, mode)] = out[0, enc["input_ids"].shape[1] :].tolist()

        return run

    # transformers bf16 is so slow on a CPU without bf16 instructions (Conv1D's [in, out] layout) that
    # it runs greedy only, on 16 tokens.
    tokens = {("transformers bfloat16", "greedy"): min(new, 16)}
    variants: dict[tuple[str, str], Callable[[], None]] = {}
    for mode in modes:
        for precision in refs:
            key = ("transformers " + precision, mode)
            if precision == "float32" or key in tokens:
                variants[key] = theirs(precision, mode, tokens.get(key, new))
        for precision in lms:
            variants[("gptcli " + precision, mode)] = ours(precision, mode)
    for run in variants.values():  # warm-up: first calls allocate and initialize
        run()
    times = alternate(variants, args.rounds)
    rate = {key: tokens.get(key, new) / median(t) for key, t in times.items()}

    # Ceilings and bounds, after the timed runs so that the big buffers do not disturb them. The
    # kernels run on one thread, as gptcli's decoding steps of one sequence do (decoding.torch_threads);
    # the bandwidth is what all threads read.
    bandwidth = read_bandwidth()
    ceilings: dict[str, float] = {}
    bounds: dict[str, float] = {}
    with torch_threads(1):
        for precision, lm in lms.items():
            ceilings[precision] = 1 / kernel_seconds(lm.net)
            bounds[precision] = bandwidth / weight_bytes(lm.net)
        others = alternatives(lms["float32"].net)

    print()
    print(f"machine at the start: {started}")
    print(f"machine at the end: {machine()}")
    print(
        f"model: GPT-2-124M shape, random weights ({folder}); "
        f"prompt of {len(tokenizer.encode(PROMPT))} tokens"
    )
    print(
        f"{new} new tokens per run, {args.rounds} rounds, medians; read bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    print()
    rows = speed_rows(list(modes), list(refs), list(lms), rate, tokens, ceilings, bounds)
    print_table(
        [
            "variant",
            "decoding",
            "tokens/s",
            "× transformers fp32",
            "goal",
            "kernel ceiling tok/s",
            "of ceiling",
            "bandwidth bound tok/s (share)",
        ],
        rows,
    )
    print()
    print_agreement(ids, new)
    print()
    print("Kernels not chosen (weight matmuls of one token alone, the same weights):")
    print_table(["kernel", "ceiling tok/s", "why not"], others)

    print()
    if (args.quality_model / "model.safetensors").is_file():
        text_file = args.quality_text or Path(__file__).resolve().parents[1] / "README.md"
        text = text_file.read_text(encoding="utf-8")
        print(
            f"Quality against fp32 on {args.quality_model} (a trained model), perplexity of {text_file.name}:"
        )
        print_table(
            [
                "weights",
                "perplexity",
                "vs fp32",
                "top-10 prob, largest difference",
                "KL(fp32 ‖ it), mean",
                "same top-1",
                "greedy ids equal (median run)",
            ],
            quality(args.quality_model, text),
        )
    else:
        print(f"(no trained model at {args.quality_model}: quality not measured; pass --quality-model)")


if __name__ == "__main__":
    main()
