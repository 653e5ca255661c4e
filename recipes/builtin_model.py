"""Rebuild gptcli's built-in model from a text corpus: tokenizer, training, evaluation, export.

    python recipes/builtin_model.py ../shared/data/corpus --work runs/builtin

Steps (each can be re-run alone with --only STEP):
  split      hold out every 20th line of every file (5%) for validation; the Tatoeba sentence files
             (everyday language) are repeated in the training set so prompts like "今天天气" continue
             naturally
  tokenizer  a byte-level BPE (any text encodes, no unknown tokens) trained with `tokenizers`;
             --measure-vocab prints bytes/token on the held-out text for several vocabulary sizes
  train      `gptcli finetune --from-scratch` on all training files (work/base), then a short second
             phase on the everyday Tatoeba sentences alone at a lower learning rate (work/model), so
             that prompts like "今天天气" continue as everyday sentences, not as essays
  evaluate   validation loss, perplexity and bits per byte, against a unigram model on the same
             tokenizer; greedy and sampled continuations
  export     half-precision safetensors + tokenizer + generation config + NOTICE into gptcli/builtin/
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILTIN = REPO / "gptcli" / "builtin"
EOS = "<|endoftext|>"
UPWEIGHT = {"tatoeba_cmn_sentences.txt": 3, "tatoeba_eng_sentences.txt": 3}
NOTICE = """\
Training text includes sentences from the Tatoeba Project (https://tatoeba.org),
licensed CC BY 2.0 FR, with Chinese converted to Simplified characters. The
other texts are in the public domain: works by Lu Xun, William Shakespeare
("Tiny Shakespeare" as distributed with karpathy/char-rnn), Lewis Carroll,
L. Frank Baum and L. M. Montgomery.
"""
PROMPTS = ["今天天气", "我们一起", "他说：", "The weather is", "Alice was", "I think that"]


def split(corpus: Path, work: Path) -> None:
    """work/train/*.txt (Tatoeba repeated) and work/val/*.txt: every 20th line of each file held out."""
    files = sorted(corpus.glob("*/*.txt"))
    if not files:
        sys.exit(f"no */*.txt files under {corpus}")
    for sub in ("train", "val"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True)
    for file in files:
        lines = file.read_text(encoding="utf-8").splitlines()
        train = [line for i, line in enumerate(lines) if i % 20 != 19]
        val = [line for i, line in enumerate(lines) if i % 20 == 19]
        name = f"{file.parent.name}_{file.name}"
        for copy in range(UPWEIGHT.get(file.name, 1)):
            (work / "train" / f"{copy}_{name}").write_text("\n".join(train) + "\n", encoding="utf-8")
        (work / "val" / name).write_text("\n".join(val) + "\n", encoding="utf-8")
    print(f"split {len(files)} files into {work / 'train'} and {work / 'val'}")


def _train_bpe(lines: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return tok


def _lines(folder: Path, dedupe: bool = True) -> Iterator[str]:
    seen: dict[str, None] = {}
    for file in sorted(folder.glob("*.txt")):
        name = file.name.split("_", 1)[1]
        if dedupe and name in seen:
            continue  # the repeated Tatoeba copies would only slow the tokenizer trainer
        seen[name] = None
        yield from file.read_text(encoding="utf-8").splitlines()


def tokenizer(work: Path, vocab_size: int, measure: bool) -> None:
    from transformers import PreTrainedTokenizerFast

    train = list(_lines(work / "train"))
    val = list(_lines(work / "val"))
    val_bytes = sum(len(line.encode()) for line in val)
    if measure:
        print("| vocab | bytes/token (held-out) | embedding params at 256 dims |")
        print("| ---: | ---: | ---: |")
        for size in (2048, 4096, 8192, 16384, 32768):
            tok = _train_bpe(train, size)
            n = sum(len(e.ids) for e in tok.encode_batch(val))
            print(f"| {size} | {val_bytes / n:.3f} | {size * 256 / 1e6:.2f} M |")
    tok = _train_bpe(train, vocab_size)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    wrapped.model_max_length = 1024
    wrapped.save_pretrained(work / "tokenizer")
    n = sum(len(e.ids) for e in tok.encode_batch(val))
    print(f"tokenizer: vocab {vocab_size}, {val_bytes / n:.3f} bytes/token on held-out text")


def train(work: Path, args: argparse.Namespace) -> None:
    command = [
        sys.executable,
        "-m",
        "gptcli",
        "finetune",
        *map(str, sorted((work / "train").glob("*.txt"))),
        "--val",
        str(work / "val.txt"),
        "--from-scratch",
        "--tokenizer",
        str(work / "tokenizer"),
        "--n-layer",
        str(args.n_layer),
        "--n-head",
        str(args.n_head),
        "--n-embd",
        str(args.n_embd),
        "--context",
        str(args.context),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--min-lr",
        str(args.lr / 10),
        "--warmup",
        str(args.steps // 50),
        "--weight-decay",
        "0.1",
        "--eval-every",
        str(max(50, args.steps // 10)),
        "--eval-batches",
        "10",
        "--save-every",
        str(max(100, args.steps // 10)),
        "--seed",
        "1337",
        "-o",
        str(work / "base"),
        *(["--resume"] if args.resume else ["--overwrite"]),
    ]
    everyday = [
        str(work / "train" / f"0_{lang}_{name}")
        for lang, name in (("en", "tatoeba_eng_sentences.txt"), ("zh", "tatoeba_cmn_sentences.txt"))
    ]
    anneal = [
        sys.executable,
        "-m",
        "gptcli",
        "finetune",
        *everyday,
        "-m",
        str(work / "base"),
        "--val",
        str(work / "val.txt"),
        "--steps",
        str(args.anneal_steps),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr * 0.3),
        "--min-lr",
        str(args.lr * 0.03),
        "--warmup",
        "10",
        "--eval-every",
        "100",
        "--eval-batches",
        "10",
        "--save-every",
        "100",
        "--seed",
        "1337",
        "-o",
        str(work / "model"),
        "--overwrite",
    ]
    # The validation text as one file (the split step keeps one per source).
    (work / "val.txt").write_text("\n".join(_lines(work / "val")) + "\n", encoding="utf-8")
    for phase in (command, anneal):
        print(" ".join(phase))
        start = time.monotonic()
        subprocess.run(phase, check=True)
        print(f"trained in {(time.monotonic() - start) / 60:.1f} min")


def _val_ids(tok, work: Path) -> tuple[list[int], int]:
    ids: list[int] = []
    nbytes = 0
    for file in sorted((work / "val").glob("*.txt")):
        text = file.read_text(encoding="utf-8")
        ids += [*tok.encode(text), tok.eos_token_id]
        nbytes += len(text.encode())
    return ids, nbytes


def evaluate(work: Path, model_dir: Path) -> dict:
    """Validation loss, perplexity and bits/byte of the model and of a unigram model; samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids, nbytes = _val_ids(tok, work)
    context = model.config.n_positions
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, context):
            block = torch.tensor([ids[start : start + context + 1]])
            if block.shape[1] < 2:
                break
            logits = model(block[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], block[0, 1:], reduction="sum")
            nll += loss.item()
            count += block.shape[1] - 1

    counts: Counter[int] = Counter()
    lines = [line + "\n" for line in _lines(work / "train", dedupe=False)]
    for start in range(0, len(lines), 10_000):  # batched: the fast tokenizer runs in Rust
        for row in tok(lines[start : start + 10_000])["input_ids"]:
            counts.update(row)
    total = sum(counts.values())
    vocab = len(tok)
    # add-one smoothing so tokens unseen in training still get a probability
    uni_nll = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in ids[1:])

    def figures(total_nll: float) -> dict:
        return {
            "val_loss": total_nll / count,
            "perplexity": math.exp(total_nll / count),
            "bits_per_byte": total_nll / math.log(2) / nbytes,
        }

    samples = {}
    for prompt in PROMPTS:
        prompt_ids = torch.tensor([tok.encode(prompt)])
        with torch.inference_mode():
            greedy = model.generate(prompt_ids, max_new_tokens=40, do_sample=False, repetition_penalty=1.3)
        samples[prompt] = tok.decode(greedy[0, prompt_ids.shape[1] :], skip_special_tokens=True)
    result = {
        "val_tokens": count,
        "val_bytes": nbytes,
        "model": figures(nll),
        "unigram": figures(uni_nll),
        "parameters": sum(p.numel() for p in model.parameters()),
        "greedy_samples": samples,
    }
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return result


def export(work: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float16)
    tok = AutoTokenizer.from_pretrained(work / "model")
    shutil.rmtree(BUILTIN, ignore_errors=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        do_sample=True,
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        # A 5M-parameter model falls into loops quickly; 1.3 measured best on the greedy samples.
        repetition_penalty=1.3,
    )
    model.save_pretrained(BUILTIN)
    tok.save_pretrained(BUILTIN)
    (BUILTIN / "NOTICE").write_text(NOTICE, encoding="utf-8")
    (BUILTIN / "README.md").write_text(
        "# gptcli built-in model\n\nA small GPT-2 trained from scratch by `recipes/builtin_model.py`; "
        "see docs/builtin-model.md for its figures.\n\n## Attribution\n\n" + NOTICE,
        encoding="utf-8",
    )
    for extra in ("loss.png", "metrics.jsonl"):
        if (work / "model" / extra).exists():
            shutil.copy(work / "model" / extra, work / extra)
    size = sum(f.stat().st_size for f in BUILTIN.iterdir())
    print(f"exported to {BUILTIN} ({size / 1e6:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpus", type=Path, help="folder with zh/*.txt and en/*.txt (../shared/data/corpus)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "builtin")
    parser.add_argument("--only", choices=["split", "tokenizer", "train", "evaluate", "export"])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--measure-vocab", action="store_true")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=550)
    parser.add_argument("--anneal-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps = [args.only] if args.only else ["split", "tokenizer", "train", "evaluate", "export"]
    if "split" in steps:
        split(args.corpus, work)
    if "tokenizer" in steps:
        tokenizer(work, args.vocab_size, args.measure_vocab)
    if "train" in steps:
        train(work, args)
    if "evaluate" in steps:
        result = evaluate(work, work / "model")
        (work / "eval.json").write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    if "export" in steps:
        export(work)
        result = evaluate(work, BUILTIN)
        (work / "eval_fp16.json").write_text(
            json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8"
        )


if __name__ == "__main__":
    main()
