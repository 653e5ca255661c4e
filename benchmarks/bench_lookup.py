"""Lookup decoding: greedy tokens/s with `--lookup K` against plain greedy, on text that repeats and on
free generation, with the same greedy ids.

Drafts come from earlier text, so what lookup gains depends on how much the continuation repeats what
came before: a passage quoted again, code, a list, a name. The built-in model (trained, small) and the
GPT-2-124M-shaped benchmark model (random weights: its output repeats little) each continue

- "repeat": a passage of the shared corpus followed by its first sentence again (the model copies on);
- "free": the first sentence alone (nothing to copy from but what it writes itself).

Variants take turns, round after round; figures are medians.

    python benchmarks/bench_lookup.py ../shared/data/corpus       # 128 new tokens, 5 rounds
    python benchmarks/bench_lookup.py --quick                     # built-in text only, 3 rounds
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import alternate, machine, median, model_folder, print_table

FALLBACK = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing "
    "to do: once or twice she had peeped into the book her sister was reading, but it had no pictures "
    "or conversations in it, and what is the use of a book, thought Alice, without pictures or "
    "conversations? So she was considering in her own mind (as well as she could, for the hot day made "
    "her feel very sleepy and stupid), whether the pleasure of making a daisy-chain would be worth the "
    "trouble of getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran "
    "close by her."
)


def passage(corpus: Path | None) -> str:
    if corpus is None:
        return FALLBACK
    for path in sorted((corpus / "en").glob("*.txt")):
        text = " ".join(path.read_text(encoding="utf-8").split())
        return text[5000:5800]
    return FALLBACK


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpus", nargs="?", type=Path, help="the shared corpus folder (en/*.txt)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--lookup", type=int, default=10)
    args = parser.parse_args()
    rounds, new = (3, 64) if args.quick else (5, 128)

    from gptcli.generation.generate import complete
    from gptcli.generation.sampling import resolve_settings
    from gptcli.loading.models import load_model

    text = passage(args.corpus)
    first = text.split(". ")[0] + "."
    prompts = {"repeat": text + " " + first, "free": first}
    models = {"builtin": "builtin"} if args.quick else {"builtin": "builtin", "124M": str(model_folder())}
    started = machine()
    rows = []
    for label, name in models.items():
        lm = load_model(name, device="cpu")
        for kind, prompt in prompts.items():
            plain = resolve_settings(None, greedy=True, max_new_tokens=new, ignore_eos=True)
            looked = resolve_settings(
                None, greedy=True, max_new_tokens=new, ignore_eos=True, lookup=args.lookup
            )
            ids: dict[str, list[int]] = {}

            def run(settings, key, lm=lm, prompt=prompt, ids=ids):
                (done,) = complete(lm, prompt, settings)
                ids[key] = done.token_ids

            complete(lm, prompt, resolve_settings(None, greedy=True, max_new_tokens=8))  # warm up
            times = alternate(
                {
                    "plain": partial(run, plain, "plain"),
                    "lookup": partial(run, looked, "lookup"),
                },
                rounds,
            )
            a, b = new / median(times["plain"]), new / median(times["lookup"])
            rows.append(
                [
                    label,
                    kind,
                    f"{a:.1f}",
                    f"{b:.1f}",
                    f"{b / a:.2f}",
                    "yes" if ids["plain"] == ids["lookup"] else "NO",
                ]
            )
    print()
    print(f"machine at the start: {started}")
    print(f"machine at the end: {machine()}")
    print(f"{new} new tokens, greedy, --lookup {args.lookup}; {rounds} rounds, medians")
    print()
    print_table(["model", "text", "plain tok/s", "lookup tok/s", "ratio", "same ids"], rows)


if __name__ == "__main__":
    main()
