"""Pipelines: `--each-line` over 64 prompts against 64 one-prompt generations in one process.

64 prompts of 2 to about 120 tokens, greedy, the same number of new tokens each (end-of-text ignored),
on a GPT-2-124M-shaped model (random weights, built on the fly). gptcli runs what `complete
--each-line` runs (batches of 32, prompts sorted by length, completions back in input order); the
reference is a transformers loop, one `generate` per prompt. Also shown: gptcli one prompt at a time,
and gptcli batched without sorting by length (what sorting buys). The variants take turns; medians.
The greedy ids of every prompt must equal the reference's.

    python benchmarks/bench_pipeline.py            # 32 new tokens, 5 rounds (about 10 minutes)
    python benchmarks/bench_pipeline.py --quick    # 8 new tokens, 5 rounds (about a minute)
"""

from __future__ import annotations

import argparse
import os
import random

# As gptcli's commands do (gptcli/cli/_common.py), before torch loads, for both sides: on a shared
# machine spinning OpenMP threads make every parallel kernel wait a scheduler slice.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import alternate, generated_text, machine, median, model_folder, print_table

PROMPTS = 64


def prompts(tokenizer, count: int = PROMPTS) -> list[str]:
    """`count` prompts of 2 to about 120 tokens, one per line (no newlines inside)."""
    rng = random.Random(7)
    words = generated_text(60_000, seed=3).replace("\n", " ").split(" ")
    out = []
    for _ in range(count):
        start = rng.randrange(len(words) - 200)
        out.append(" ".join(words[start : start + rng.choice([1, 2, 4, 8, 16, 32, 64, 80])]).strip() or "The")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    new = args.new_tokens or (8 if args.quick else 32)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gptcli.generation.generate
    from gptcli.generation.generate import complete
    from gptcli.generation.sampling import resolve_settings
    from gptcli.loading.models import load_model

    folder = model_folder()

    started = machine()
    lm = load_model(str(folder), device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # the same work as gptcli's --ignore-eos
    lines = prompts(tokenizer)
    settings = resolve_settings(None, greedy=True, max_new_tokens=new, ignore_eos=True, lookup=0)
    ids: dict[str, list[list[int]]] = {}

    def each_line() -> None:
        ids["each-line"] = [d.token_ids for d in complete(lm, lines, settings, batch_size=args.batch_size)]

    def unsorted() -> None:
        # One batch per sorting window: the rows of a batch are the same as without sorting.
        window = gptcli.generation.generate.SORT_WINDOW
        gptcli.generation.generate.SORT_WINDOW = 1
        try:
            ids["unsorted"] = [d.token_ids for d in complete(lm, lines, settings, batch_size=args.batch_size)]
        finally:
            gptcli.generation.generate.SORT_WINDOW = window

    def one_by_one() -> None:
        ids["one by one"] = [complete(lm, line, settings)[0].token_ids for line in lines]

    def reference() -> None:
        out = []
        with torch.inference_mode():
            for line in lines:
                enc = tokenizer(line, return_tensors="pt")
                gen = model.generate(
                    **enc, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.eos_token_id
                )
                new_ids = gen[0, enc["input_ids"].shape[1] :]
                tokenizer.decode(new_ids)
                out.append(new_ids.tolist())
        ids["reference"] = out

    variants = {
        "transformers, one generate per prompt": reference,
        "gptcli --each-line": each_line,
        "gptcli --each-line, not sorted by length": unsorted,
        "gptcli, one prompt at a time": one_by_one,
    }
    with torch.inference_mode():  # warm-up: first calls allocate and initialize
        complete(lm, lines[:20], settings, batch_size=args.batch_size)
        model.generate(**tokenizer(lines[0], return_tensors="pt"), max_new_tokens=2, do_sample=False)
    times = alternate(variants, args.rounds)
    total = PROMPTS * new
    base = total / median(times["transformers, one generate per prompt"])

    lengths = [len(tokenizer.encode(p)) for p in lines]
    print()
    print(f"machine at the start: {started}")
    print(f"machine at the end: {machine()}")
    print(
        f"model: GPT-2-124M shape ({folder}); {PROMPTS} prompts of {min(lengths)}-{max(lengths)} tokens, "
        f"{new} new tokens each, batch {args.batch_size}; {args.rounds} rounds, medians"
    )
    print()
    rows = []
    for name, t in times.items():
        rate = total / median(t)
        goal = ""
        if name == "gptcli --each-line":
            goal = "≥ 6 " + ("met" if rate / base >= 6 else "not met")
        rows.append([name, f"{median(t):.2f}", f"{rate:.1f}", f"{rate / base:.2f}", goal])
    print_table(["variant", "seconds", "new tokens/s", "× transformers", "goal"], rows)
    print()
    for name in ("each-line", "unsorted", "one by one"):
        same = sum(a == b for a, b in zip(ids[name], ids["reference"], strict=True))
        print(f"greedy ids of gptcli {name} equal to transformers': {same} of {PROMPTS} prompts")


if __name__ == "__main__":
    main()
