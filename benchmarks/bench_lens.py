"""Memory and time of `lens` and `attention` on a 1,024-token prompt (the whole context of GPT-2).

On a GPT-2-124M-shaped model (random weights, fp32 safetensors, built on the fly). Each command runs as
its own process with its JSON going to /dev/null; the figures are its peak RSS (which counts the
memory-mapped weight pages it read, 475 MB here) and its wall time. For scale: `python -c "import
torch"` and `gptcli topk` on the same prompt. Without the top-k per cell, the lens alone would hold
13 × 1,024 × 50,257 float32 logits: 2.7 GB.

    python benchmarks/bench_lens.py            # 3 runs each, medians
    python benchmarks/bench_lens.py --runs 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench_memory import peak_rss
from common import generated_text, machine, median, model_folder, print_table

TOKENS = 1024


def prompt_of(folder: Path, tokens: int) -> str:
    """Generated text cut to exactly `tokens` tokens of the model's tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = generated_text(tokens * 6, seed=3)
    ids = tokenizer.encode(text).ids[:tokens]
    assert len(ids) == tokens, "the generated text is too short"
    return tokenizer.decode(ids)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    folder = model_folder()
    started = machine()
    with tempfile.TemporaryDirectory(prefix="bench-lens-") as temp:
        file = Path(temp) / "prompt.txt"
        file.write_text(prompt_of(folder, TOKENS), encoding="utf-8")
        gptcli = [sys.executable, "-m", "gptcli"]
        common = ["-f", str(file), "-m", str(folder), "--json"]
        commands = {
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
            "topk (last position)": [*gptcli, "topk", "-m", str(folder), "--json", str(file.read_text())],
            "lens, every position, top 5": [*gptcli, "lens", *common],
            "lens --sublayer, every position": [*gptcli, "lens", *common, "--sublayer"],
            "lens, last position": [*gptcli, "lens", *common, "--at", "-1"],
            "attention, last position": [*gptcli, "attention", *common],
            "attention --rollout, last position": [*gptcli, "attention", *common, "--rollout"],
            "attention --query all": [*gptcli, "attention", *common, "--query", "all"],
        }
        peaks: dict[str, list[int]] = {name: [] for name in commands}
        times: dict[str, list[float]] = {name: [] for name in commands}
        for r in range(args.runs):
            for name, cmd in commands.items() if r % 2 == 0 else reversed(commands.items()):
                start = time.perf_counter()
                peaks[name].append(peak_rss(cmd))
                times[name].append(time.perf_counter() - start)

    print()
    print(f"machine at the start: {started}")
    print(f"machine at the end: {machine()}")
    print(f"GPT-2-124M shape, fp32, a {TOKENS}-token prompt, {args.runs} runs, medians")
    rows = [
        [name, f"{median(peaks[name]) / 2**20:,.0f} MiB", f"{median(times[name]):.1f} s"] for name in commands
    ]
    print_table(["command", "peak RSS", "wall time"], rows)


if __name__ == "__main__":
    main()
