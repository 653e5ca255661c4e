"""What the inference benchmarks share: a GPT-2-124M-shaped model built on the fly, timing, the machine.

No hub: the model has random weights (seeded) and a GPT-2-style byte-level BPE trained here on
generated text, padded to GPT-2's 50,257 ids so the embedding and output layers have GPT-2's size.
It is built once into a cache folder ($GPTCLI_BENCH_CACHE, else /tmp/gptcli-bench) and reused.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

VOCAB = 50257
CACHE = Path(os.environ.get("GPTCLI_BENCH_CACHE", "/tmp/gptcli-bench"))

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "an", "er", "in", "on", "st", "th", "qu", "wa"]
_HANZI = "今天天气很好我们去公园散步明天可能会下雨记得带伞喜欢早上喝一杯热茶然后开始工作这本书有意思"


def generated_text(chars: int, seed: int = 0) -> str:
    """About `chars` characters of word-like text: English-looking words, punctuation, some Chinese."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    out, size = [], 0
    while size < chars:
        if rng.random() < 0.15:
            piece = "".join(rng.choice(_HANZI) for _ in range(rng.randint(2, 12))) + "。"
        else:
            piece = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + ". "
        out.append(piece)
        size += len(piece)
    return "".join(out)[:chars]


def build_tokenizer(trained_vocab: int = 8000):
    """A GPT-2-style byte-level BPE trained on generated text, filled up to GPT-2's 50,257 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trainer = trainers.BpeTrainer(
        vocab_size=trained_vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(generated_text(400_000, seed=1).split(". "), trainer)
    trained = json.loads(tok.to_str())["model"]
    vocab = dict(trained["vocab"])
    # Ids the merges never produce: they give the embedding and output layers GPT-2's shape.
    for i in range(len(vocab), VOCAB):
        vocab[f"<unused{i}>"] = i
    pairs = (m.split(" ") if isinstance(m, str) else m for m in trained["merges"])
    merges = [(a, b) for a, b in pairs]
    full = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    full.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    full.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=full, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def model_folder(n_layer: int = 12, n_head: int = 12, n_embd: int = 768) -> Path:
    """A saved GPT-2 with random weights (fp32 safetensors) and the tokenizer above; built once, cached.

    Saved the way users' folders are: the model by transformers' save_pretrained, the tokenizer as
    GPT2TokenizerFast saves itself (its tokenizer_config.json then has add_prefix_space, errors and a
    null pad_token, as transformers 5 writes for every GPT-2 tokenizer).
    """
    folder = CACHE / f"gpt2-{n_layer}x{n_embd}-random-saved"
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer()
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=1024,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    partial = folder.with_name(folder.name + ".partial")
    GPT2LMHeadModel(config).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    # GPT2TokenizerFast is exported lazily; transformers' __init__ hides the name from mypy
    from transformers import GPT2TokenizerFast  # type: ignore[attr-defined]

    gpt2_tokenizer = GPT2TokenizerFast.from_pretrained(partial)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (partial / name).unlink()
    gpt2_tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def weights_bytes(folder: Path) -> int:
    return (folder / "model.safetensors").stat().st_size


# --- Timing -------------------------------------------------------------------------------------------


K = TypeVar("K", bound=Hashable)


def alternate(variants: Mapping[K, Callable[[], object]], rounds: int) -> dict[K, list[float]]:
    """Seconds per call of each variant, the variants taking turns (ABC, CBA, ABC...) so that drift in
    the machine's speed hits them alike."""
    names = list(variants)
    times: dict[K, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """min–max of the runs, to show how noisy they were."""
    return f"{min(values):.3g}–{max(values):.3g}"


# --- The machine --------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    """The vector extensions that matter for these kernels, as the kernel reports them."""
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return "unknown"
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "avx_vnni"]
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512"


def others_running() -> str:
    """Other processes using CPU right now (they skew the figures; the ratios less so)."""
    mine = {os.getpid(), os.getppid()}
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    busy = []
    for line in out.splitlines()[1:]:
        pid, cpu, args = line.split(None, 2)
        if int(pid) not in mine and float(cpu) >= 20:
            busy.append(f"{args[:60]} ({cpu}% CPU)")
    return "; ".join(busy[:4]) or "nothing else busy"


def machine() -> str:
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    wait = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (
        f"{cpu_name()}, {os.cpu_count()} CPUs ({cpu_flags()}), torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()} kernels), {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY {wait}; load average {load}; also running: {others_running()}"
    )


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table (pastes into docs/performance.md as is)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
