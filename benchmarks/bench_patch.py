"""Time of `gptcli patch` on a GPT-2-124M shape: the three 12 x 20 grids (720 patched runs).

On a GPT-2-124M-shaped model (random weights, fp32 safetensors, built on the fly) and a 20-token
prompt pair that differs in one token. Each patched run is a row of a batched pass through the hook
points (gptcli.inspection.patching); for scale, the same number of runs one at a time is estimated
from the time of single patched runs, and `attribute` on the clean prompt is timed too.

    python benchmarks/bench_patch.py            # 3 rounds, medians
    python benchmarks/bench_patch.py --rounds 1
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as gptcli's commands do, before torch loads

from common import machine, median, model_folder, print_table

TOKENS = 20


def prompt_pair(lm) -> tuple[str, str]:
    """Two texts of exactly TOKENS tokens each that differ in one token near the middle."""
    from common import generated_text

    ids = lm.tokenizer.encode(generated_text(400, seed=5), add_special_tokens=False)[:TOKENS]
    clean = lm.tokenizer.decode(ids)
    for other in range(300, 8000):
        changed = [*ids[: TOKENS // 2], other, *ids[TOKENS // 2 + 1 :]]
        corrupt = lm.tokenizer.decode(changed)
        if lm.tokenizer.encode(corrupt, add_special_tokens=False) == changed:
            return clean, corrupt
    raise SystemExit("no corrupted prompt of the same length found")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    from gptcli.inspection.attribution import attribute
    from gptcli.inspection.patching import GRIDS, Patch, diffs, patch, prepare
    from gptcli.inspection.tracing import encode
    from gptcli.loading.models import load_model

    folder = model_folder()
    started = machine()
    lm = load_model(str(folder), device="cpu")
    clean, corrupt = prompt_pair(lm)
    assert len(encode(lm, clean).ids) == len(encode(lm, corrupt).ids) == TOKENS
    cells = 3 * 12 * TOKENS
    batched, single, attributed = [], [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        result = patch(lm, clean, corrupt)
        batched.append(time.perf_counter() - start)
        setup = prepare(lm, encode(lm, clean).ids, encode(lm, corrupt).ids)
        some = [(Patch(point, 5, (p,)),) for point in GRIDS.values() for p in (3, 9, 15)]
        start = time.perf_counter()
        for cell in some:  # one run per cell, as a loop over the cells would do
            diffs(lm, setup, [cell])
        single.append((time.perf_counter() - start) / len(some) * cells)
        start = time.perf_counter()
        attribute(lm, clean)
        attributed.append(time.perf_counter() - start)
    assert all(len(result.scores[g]) == 12 and len(result.scores[g][0]) == TOKENS for g in GRIDS)
    print(f"machine: {started}")
    print(f"model: GPT-2-124M shape ({folder}); {TOKENS}-token prompts; {torch.get_num_threads()} threads")
    print(f"{args.rounds} rounds, medians\n")
    print_table(
        ["what", "seconds"],
        [
            [f"patch, three 12 x {TOKENS} grids ({cells} patched runs, batched)", f"{median(batched):.1f}"],
            [
                f"the same {cells} runs one at a time (estimated from {3 * 3} of them)",
                f"{median(single):.1f}",
            ],
            [
                "attribute, last position (one pass, 144 heads with their sources)",
                f"{median(attributed):.2f}",
            ],
        ],
    )
    print(f"\nbatched: {median(single) / median(batched):.1f}x faster than one run per cell")


if __name__ == "__main__":
    main()
