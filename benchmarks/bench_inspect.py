"""topk and score: gptcli's forward passes against the transformers equivalent.

- topk: latency of the next-token distribution (top 10) after a short prompt;
- score: tokens/s scoring a long text with a sliding window (context 1024, stride 512), as the
  transformers perplexity guide does it.

On a GPT-2-124M-shaped model (random weights, built on the fly), fp32. The variants take turns;
medians. Probabilities must agree with transformers' to 1e-5.

    python benchmarks/bench_inspect.py            # 4,096-token text, 7 rounds
    python benchmarks/bench_inspect.py --quick    # 2,048-token text, 5 rounds (about a minute)
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

# As gptcli's commands do (gptcli/cli/_common.py), before torch loads, for both sides: on a shared
# machine spinning OpenMP threads make every parallel kernel wait a scheduler slice.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import alternate, generated_text, machine, median, model_folder, print_table

PROMPT = "The capital of the kingdom by the sea was"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 7)
    text_tokens = 2048 if args.quick else 4096
    calls = 10  # topk calls per round

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptcli.inspection.predict import next_token_distribution, score_text
    from gptcli.loading.models import load_model

    folder = model_folder()

    started = machine()
    lm = load_model(str(folder), device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = generated_text(text_tokens * 6, seed=5)
    ids = tokenizer.encode(text)[:text_tokens]
    text = str(tokenizer.decode(ids))
    ids = tokenizer.encode(text)
    results: dict[str, Any] = {}  # each variant's output, compared below

    def topk_ours() -> None:
        for _ in range(calls):
            results["topk ours"] = next_token_distribution(lm, [PROMPT], k=10)[0].tokens

    def topk_theirs() -> None:
        for _ in range(calls):
            with torch.inference_mode():
                enc = tokenizer(PROMPT, return_tensors="pt")
                logits = model(**enc).logits[0, -1].float()
                top = torch.topk(torch.log_softmax(logits, dim=-1), 10)
                results["topk theirs"] = list(
                    zip(top.indices.tolist(), top.values.exp().tolist(), strict=True)
                )

    def score_ours() -> None:
        results["score ours"] = score_text(lm, text)

    def score_theirs() -> None:
        # The transformers perplexity guide's sliding window: windows of the context, stride 512, each
        # token scored once, the text preceded by <|endoftext|>.
        context, stride = 1024, 512
        all_ids = [tokenizer.eos_token_id, *tokenizer.encode(text)]
        logprobs: list[float] = []
        scored_to, begin = 1, 0
        with torch.inference_mode():
            while scored_to < len(all_ids):
                end = min(begin + context, len(all_ids))
                window = torch.tensor([all_ids[begin:end]])
                lp = torch.log_softmax(model(window).logits[0].float(), dim=-1)
                targets = torch.tensor(all_ids[scored_to:end])
                rows = lp[scored_to - 1 - begin : end - 1 - begin]
                logprobs += rows.gather(1, targets[:, None])[:, 0].tolist()
                scored_to = end
                begin = min(begin + stride, scored_to - 1)
        results["score theirs"] = logprobs

    variants = {"topk transformers": topk_theirs, "topk gptcli": topk_ours}
    for run in variants.values():
        run()
    topk_times = alternate(variants, rounds)
    variants = {"score transformers": score_theirs, "score gptcli": score_ours}
    for run in variants.values():
        run()
    score_times = alternate(variants, rounds)

    ours_top = [(t["id"], t["prob"]) for t in results["topk ours"]]
    theirs_top = results["topk theirs"]
    top_ids_same = [i for i, _ in ours_top] == [i for i, _ in theirs_top]
    top_diff = max(abs(a[1] - b[1]) for a, b in zip(ours_top, theirs_top, strict=True))
    ours_lp = [t["logprob"] for t in results["score ours"].tokens]
    theirs_lp = results["score theirs"]
    prob_diff = max(abs(math.exp(a) - math.exp(b)) for a, b in zip(ours_lp, theirs_lp, strict=True))
    lp_diff = max(abs(a - b) for a, b in zip(ours_lp, theirs_lp, strict=True))

    t_ours = median(topk_times["topk gptcli"]) / calls
    t_theirs = median(topk_times["topk transformers"]) / calls
    s_ours = len(ours_lp) / median(score_times["score gptcli"])
    s_theirs = len(theirs_lp) / median(score_times["score transformers"])
    print()
    print(f"machine at the start: {started}")
    print(f"machine at the end: {machine()}")
    print(
        f"model: GPT-2-124M shape ({folder}), fp32; topk prompt of {len(tokenizer.encode(PROMPT))} tokens, "
        f"score text of {len(ours_lp)} tokens; {rounds} rounds, medians"
    )
    print()
    print_table(
        ["what", "gptcli", "transformers", "speed ratio", "goal", "largest probability difference"],
        [
            [
                "topk latency (ms)",
                f"{t_ours * 1000:.1f}",
                f"{t_theirs * 1000:.1f}",
                f"{t_theirs / t_ours:.2f}",
                "≥ 1.5 " + ("met" if t_theirs / t_ours >= 1.5 else "not met"),
                f"{top_diff:.1e} (same top 10: {top_ids_same})",
            ],
            [
                "score (tokens/s)",
                f"{s_ours:.0f}",
                f"{s_theirs:.0f}",
                f"{s_ours / s_theirs:.2f}",
                "≥ 2 " + ("met" if s_ours / s_theirs >= 2 else "not met"),
                f"{prob_diff:.1e} (logprob {lp_diff:.1e})",
            ],
        ],
    )
    print(f"probabilities within 1e-5: {top_diff <= 1e-5 and prob_diff <= 1e-5}")


if __name__ == "__main__":
    main()
