"""Build a small instruction set (prompt/completion JSONL) from the corpus's Tatoeba sentence files.

    python recipes/instruct_from_corpus.py ../shared/data/corpus --out runs/instruct

Writes OUT/train.jsonl, OUT/val.jsonl and OUT/val-prompts.txt (the validation prompts with their
answers, as plain text for `gptcli compare -f`). Nothing of the corpus goes into the repository.

Why not translation pairs: the corpus keeps the English and the Chinese column of Tatoeba's cmn.txt
in two files, each deduplicated on its own, so line N of one is not the translation of line N of the
other (line 2 is "Run." against "你好。"); a translation set made from them would teach wrong answers.
Two questions whose answers follow from the sentence itself are asked instead, so every label is right:

    Sentence: 下雨了。\\nLanguage:                 -> " Chinese"
    Sentence: Is it raining?\\nQuestion or statement: -> " question"

Validation uses the lines the built-in model never trained on (every 20th line of each file, the
split of recipes/builtin_model.py), so "before" and "after" are measured on unseen sentences.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FILES = {"English": "en/tatoeba_eng_sentences.txt", "Chinese": "zh/tatoeba_cmn_sentences.txt"}


def examples(sentence: str, language: str, rng: random.Random) -> dict[str, str]:
    """One of the two questions about `sentence`, picked at random."""
    if rng.random() < 0.5:
        return {"prompt": f"Sentence: {sentence}\nLanguage:", "completion": f" {language}"}
    kind = "question" if sentence.rstrip().endswith(("?", "？")) else "statement"
    return {"prompt": f"Sentence: {sentence}\nQuestion or statement:", "completion": f" {kind}"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpus", type=Path, help="the corpus folder (holds en/ and zh/)")
    parser.add_argument("--out", type=Path, default=Path("runs/instruct"))
    parser.add_argument("--train", type=int, default=4000, help="training examples")
    parser.add_argument("--val", type=int, default=200, help="validation examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    train, val = [], []
    for language, name in FILES.items():
        lines = (args.corpus / name).read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip():
                (val if i % 20 == 19 else train).append((line.strip(), language))
    rng.shuffle(train)
    rng.shuffle(val)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, pairs, count in (("train", train, args.train), ("val", val, args.val)):
        records = [examples(sentence, language, rng) for sentence, language in pairs[:count]]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (args.out / f"{split}.jsonl").write_text(text, encoding="utf-8")
        if split == "val":
            plain = "".join(f"{r['prompt']}{r['completion']}\n\n" for r in records)
            (args.out / "val-prompts.txt").write_text(plain, encoding="utf-8")
        print(f"{args.out / f'{split}.jsonl'}: {len(records)} examples")


if __name__ == "__main__":
    main()
