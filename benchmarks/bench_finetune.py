"""Training throughput: gptcli's loop against a plain transformers/PyTorch loop at the same settings.

A GPT-2-124M-shaped model with random weights (built here, no hub) trains on synthetic text. Each
variant runs in its own process (so peak memory is its own), the two alternate for --rounds rounds so
that drift in the machine's speed hits both, and each reports the median tokens/s over its steps after
the first --warmup ones.

    python benchmarks/bench_finetune.py       # 124M, block 128, batch 4, 6 steps x 2 rounds
    python benchmarks/bench_finetune.py --n-layer 4 --n-embd 256 --vocab 8000 --steps 20   # small, quick

LoRA against full fine-tuning (issue 24), on the shared corpus (its path is the argument):

    python benchmarks/bench_finetune.py --lora-vs-full ../shared/data/corpus --steps 6 --rounds 3

1. The 124M shape (random weights, the built-in model's tokenizer, GPT-2's 50,257-row embedding),
   trained on the corpus's Tatoeba sentences (every 20th line held out for validation), full and with
   LoRA rank --rank on c_attn, each in its own process, alternating for --rounds rounds: time per
   step (median of the rounds), peak RSS, the size of what OUT holds (model or adapter; the
   checkpoint), and the validation loss at step 0 and after --steps. CPU only.
2. Instruction data (recipes/instruct_from_corpus.py's set, 800 examples) on the built-in model with
   LoRA, packed (batch 8 and 1) against padded per batch (batch 8): one epoch's steps, time, real
   tokens/s and validation loss.

The plain loop is what a tutorial writes: model(input_ids, labels=input_ids).loss, backward, clip, AdamW
step, zero_grad, loss.item() for the log. gptcli runs with the same batch, block size, precision policy
(fp32 on CPU, bf16 autocast on CUDA), clip and optimizer, logging every step (its most expensive setting).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_model_folder(folder: Path, args: argparse.Namespace) -> None:
    """A random GPT-2 and a byte-level tokenizer padded to the full vocabulary size, saved in `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    # Every byte is a token and the rest of the vocabulary is filler: the embedding and output layers
    # have GPT-2's size (what costs compute), while tokenizing needs no trained merges.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {piece: i for i, piece in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    for i in range(len(vocab), args.vocab):
        vocab[f"<filler{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=max(1024, args.block_size),
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def synthetic_text(tokens: int) -> str:
    """About `tokens` bytes of word-like ASCII text (one byte is one token with this tokenizer)."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(2, 9))) for _ in range(500)]
    out, size = [], 0
    while size < tokens:
        line = " ".join(rng.choice(words) for _ in range(12)) + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)


def peak_memory(device: str) -> float:
    """Peak memory so far in GiB: CUDA allocator peak on a GPU, else the process's peak RSS."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_gptcli(args: argparse.Namespace, folder: Path, text: Path, out: Path) -> dict:
    from gptcli.training.config import TrainConfig
    from gptcli.training.loop import train

    rates: list[float] = []
    peak = [0.0]

    def on_event(event) -> None:
        if event.kind == "log":
            rates.append(event.metrics["tokens_per_second"])
            peak[0] = peak_memory(args.device)  # before the final checkpoint and export

    cfg = TrainConfig(
        data=[str(text)],
        model=str(folder),
        out_dir=out,
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        lr=1e-4,
        val_split=0,
        log_every=1,
        save_every=10**9,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
        overwrite=True,
    )
    train(cfg, on_event)
    return {"rates": rates[args.warmup :], "peak_gib": peak[0]}


def run_plain(args: argparse.Namespace, folder: Path, text: Path) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = np.array(tokenizer(text.read_text(), add_special_tokens=False)["input_ids"], dtype=np.int64)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.to(device)  # type: ignore[arg-type]  # in place; transformers' decorator hides .to's signature
    model.train()
    if args.compile:
        model.compile()  # in place: the same module, its forward compiled
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda" or None
    )
    dtype = torch.float32
    if device.type == "cuda" and args.precision in ("auto", "bf16"):
        dtype = torch.bfloat16
    rng = np.random.default_rng(0)
    tokens_per_step = args.batch_size * args.block_size
    rates = []
    for _ in range(args.steps):
        start = time.perf_counter()
        offsets = rng.integers(0, len(ids) - args.block_size - 1, args.batch_size)
        x = torch.from_numpy(np.stack([ids[o : o + args.block_size] for o in offsets])).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # what a loop that logs its loss does; also waits for the GPU
        rates.append(tokens_per_step / (time.perf_counter() - start))
    return {"rates": rates[args.warmup :], "peak_gib": peak_memory(args.device)}


def worker(args: argparse.Namespace) -> None:
    folder, text = Path(args.folder), Path(args.text)
    if args.worker == "gptcli":
        result = run_gptcli(args, folder, text, Path(args.folder).parent / "gptcli-out")
    else:
        result = run_plain(args, folder, text)
    print("RESULT " + json.dumps(result), flush=True)


def lora_worker(args: argparse.Namespace) -> None:
    """One variant of --lora-vs-full in this process: train, then report its figures as a RESULT line."""
    from gptcli.training.config import TrainConfig
    from gptcli.training.loop import train

    spec = json.loads(args.spec)
    seconds: list[float] = []
    vals: list[float] = []
    peak = [0.0]
    tokens = [0]

    def on_event(event) -> None:
        if event.kind == "note" and "before training" in event.message:
            vals.append(float(event.message.rsplit(" ", 1)[1]))
        if event.kind == "log":
            m = event.metrics  # the loop's own timing of the step, evaluation and saving left out
            seconds.append((m["tokens"] - tokens[0]) / m["tokens_per_second"])
            tokens[0] = m["tokens"]
            if "val_loss" in m:
                vals.append(m["val_loss"])
            peak[0] = max(peak[0], peak_memory("cpu"))

    out = Path(spec.pop("out_dir"))
    started = time.perf_counter()
    result = train(TrainConfig(out_dir=out, device="cpu", overwrite=True, log_every=1, **spec), on_event)
    total = time.perf_counter() - started
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    weights = sum(v for k, v in files.items() if k.endswith(".safetensors"))
    report = {
        "step_seconds": statistics.median(seconds[1:] or seconds),
        "peak_gib": peak[0],
        "weights_bytes": weights,
        "checkpoint_bytes": files.get("checkpoint.pt", 0),
        "val": vals,
        "seconds": total,
        "steps": result.step,
        "tokens": result.tokens,
    }
    print("RESULT " + json.dumps(report), flush=True)


def run_variant(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--lora-worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GPTCLI_DEBUG": "1"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{spec['out_dir']} failed:\n{proc.stderr[-3000:]}")
    result: dict = json.loads(line.removeprefix("RESULT "))
    return result


def lora_vs_full(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    corpus = Path(args.lora_vs_full)
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as name:
        temp = Path(name)
        train_txt, val_txt = temp / "train.txt", temp / "val.txt"
        lines: dict[str, list[str]] = {"train": [], "val": []}
        for file in ("en/tatoeba_eng_sentences.txt", "zh/tatoeba_cmn_sentences.txt"):
            for i, line in enumerate((corpus / file).read_text(encoding="utf-8").splitlines()):
                lines["val" if i % 20 == 19 else "train"].append(line)
        train_txt.write_text("\n".join(lines["train"]) + "\n", encoding="utf-8")
        val_txt.write_text("\n".join(lines["val"]) + "\n", encoding="utf-8")

        folder = temp / "gpt2-124m"
        tokenizer = AutoTokenizer.from_pretrained(repo / "gptcli" / "builtin")
        config = GPT2Config(
            vocab_size=50257, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id
        )
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

        common = {
            "data": [str(train_txt)], "val": [str(val_txt)], "model": str(folder), "steps": args.steps,
            "batch_size": args.batch_size, "block_size": args.block_size, "eval_every": args.steps,
            "eval_batches": 4, "save_every": args.steps, "warmup": 0, "seed": 0,
        }  # fmt: skip
        variants = {"full": {"lr": 3e-4}, "lora": {"lr": 1e-3, "lora_rank": args.rank}}
        results: dict[str, dict] = {}
        rounds: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(args.rounds):  # alternating, so that the machine's drift hits both
            for variant in list(variants) if round_ % 2 == 0 else list(variants)[::-1]:
                result = run_variant({**common, **variants[variant], "out_dir": str(temp / variant)})
                rounds[variant].append(result["step_seconds"])
                previous = results.get(variant)
                if previous is not None:
                    result["peak_gib"] = max(result["peak_gib"], previous["peak_gib"])
                results[variant] = result
                print(f"round {round_ + 1} {variant}: {result['step_seconds']:.2f} s/step", flush=True)
        for variant, result in results.items():
            result["step_seconds"] = statistics.median(rounds[variant])

        subprocess.run(
            [sys.executable, str(repo / "recipes" / "instruct_from_corpus.py"), str(corpus), "--out",
             str(temp / "instruct"), "--train", "800", "--val", "100"],
            check=True, capture_output=True,
        )  # fmt: skip
        instruct = {
            "data": [str(temp / "instruct" / "train.jsonl")], "val": [str(temp / "instruct" / "val.jsonl")],
            "model": "builtin", "epochs": 1.0, "batch_size": 8, "block_size": 256, "lr": 1e-2,
            "lora_rank": 8, "eval_every": 10**6, "save_every": 10**6, "seed": 0,
        }  # fmt: skip
        packing = {}
        for mode, extra in (
            ("pack", {"pack": True}),
            ("pack b1", {"pack": True, "batch_size": 1}),  # about as many examples a step as pad's 8
            ("pad", {"pack": False}),
        ):
            spec = {**instruct, **extra, "out_dir": str(temp / mode.replace(" ", "-"))}
            packing[mode] = run_variant(spec)
            print(f"{mode}: done", flush=True)

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print()
    print(
        f"1. GPT-2 124M shape (random weights), batch {args.batch_size} x block {args.block_size}, "
        f"{args.steps} steps on CPU ({os.cpu_count()} cores), torch {torch.__version__}; load average {load}"
    )
    print(
        f"{'variant':<14} {'s/step':>7} {'peak RSS':>9} {'weights':>10} {'checkpoint':>11} "
        f"{'val @0':>7} {'val @end':>9}"
    )
    for variant, r in results.items():
        label = f"{variant} r{args.rank}" if variant == "lora" else variant
        print(
            f"{label:<14} {r['step_seconds']:>7.2f} {r['peak_gib']:>5.2f} GiB "
            f"{r['weights_bytes'] / 1e6:>7.1f} MB {r['checkpoint_bytes'] / 1e6:>8.1f} MB "
            f"{r['val'][0]:>7.3f} {r['val'][-1]:>9.3f}"
        )
    ratio = results["lora"]["step_seconds"] / results["full"]["step_seconds"]
    per_round = "; ".join(f"{v}: " + ", ".join(f"{x:.2f}" for x in xs) for v, xs in rounds.items())
    print(f"lora / full step time: {ratio:.2f} (s/step per round: {per_round})")
    print()
    print("2. instruction data, built-in model, LoRA r8, 800 examples, one epoch, batch 8 rows (pack b1: 1)")
    print(f"{'rows':<8} {'steps':>6} {'seconds':>8} {'tokens/s':>9} {'val loss':>9}")
    for mode, r in packing.items():
        print(
            f"{mode:<8} {r['steps']:>6} {r['seconds']:>8.1f} {r['tokens'] / r['seconds']:>9,.0f} "
            f"{r['val'][-1]:>9.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6, help="steps per round and variant")
    parser.add_argument("--warmup", type=int, default=1, help="first steps of each round left out")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--lora-vs-full", metavar="CORPUS", help="LoRA against full fine-tuning (see above)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank for --lora-vs-full")
    parser.add_argument("--lora-worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["gptcli", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--text", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lora_worker:
        lora_worker(argparse.Namespace(spec=args.lora_worker))
        return
    if args.lora_vs_full:
        lora_vs_full(args)
        return
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as temp:
        folder, text = Path(temp) / "model", Path(temp) / "text.txt"
        build_model_folder(folder, args)
        needed = args.steps * args.batch_size * (args.block_size + 1) * 2 + 10_000
        text.write_text(synthetic_text(needed), encoding="utf-8")
        results: dict[str, dict[str, list[float]]] = {
            "plain": {"rates": [], "peak": []},
            "gptcli": {"rates": [], "peak": []},
        }
        passthrough = [a for a in sys.argv[1:] if a != "--compile"] + (["--compile"] if args.compile else [])
        for round_ in range(args.rounds):
            for variant in ("plain", "gptcli") if round_ % 2 == 0 else ("gptcli", "plain"):
                cmd = [sys.executable, __file__, *passthrough, "--device", args.device]
                cmd += ["--worker", variant, "--folder", str(folder), "--text", str(text)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
                result = json.loads(line.removeprefix("RESULT "))
                results[variant]["rates"] += result["rates"]
                results[variant]["peak"].append(result["peak_gib"])
                print(
                    f"round {round_ + 1} {variant}: {statistics.median(result['rates']):,.0f} tok/s",
                    flush=True,
                )

    import torch

    params = (12 * args.n_layer * args.n_embd**2 + args.vocab * args.n_embd) / 1e6
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print()
    print(
        f"GPT-2 shape {args.n_layer}x{args.n_embd} (~{params:.0f}M params), vocab {args.vocab}, "
        f"batch {args.batch_size} x block {args.block_size}, {args.device} ({where}), "
        f"torch {torch.__version__}"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the end: {load} (other processes on the machine skew the figures)")
    print(f"{'loop':<8} {'tokens/s (median)':>18} {'ms/step':>9} {'steps':>6} {'peak memory':>12}")
    medians = {}
    for variant in ("plain", "gptcli"):
        rates = results[variant]["rates"]
        medians[variant] = statistics.median(rates)
        ms = 1000 * args.batch_size * args.block_size / medians[variant]
        peak = max(results[variant]["peak"])
        memory = "GPU alloc" if args.device.startswith("cuda") else "RSS"
        print(f"{variant:<8} {medians[variant]:>18,.0f} {ms:>9.0f} {len(rates):>6} {peak:>7.2f} GiB {memory}")
    print(f"ratio gptcli / plain: {medians['gptcli'] / medians['plain']:.3f}")


if __name__ == "__main__":
    main()
