"""Decode speed against llama.cpp on the same machine, in the same run: gptcli's fp32, bf16, int8 and int4
against llama.cpp's f32, f16, q8_0 (and q4_0 when llama-quantize is built) on the same weights.

This script builds nothing of llama.cpp: give it a build (`--llama DIR`, the source tree with
build/bin/llama-bench in it). How to make one, in a temporary folder outside this repository:

    git archive HEAD -- . ':!models' ':!media' | tar -x -C /tmp/llama     # llama.cpp at c392e50
    cd /tmp/llama && cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
    cmake --build build -j 2 --target llama-bench llama-quantize
    pip install sentencepiece            # its gguf-py converter imports it

The model is benchmarks/common.py's GPT-2-124M shape (random weights, a BPE tokenizer trained here),
converted with llama.cpp's convert_hf_to_gguf.py (its tokenizer check does not know this tokenizer, which
decoding speed does not depend on, so the check is told it is GPT-2's). Both decode 128 tokens after a
short prompt with sampling (gptcli: top-k 50, temperature 1; llama-bench's tg128), rounds alternating
between the two programs; medians. gptcli runs in this process with its decode threads as chosen
(`auto`: measured once per machine, gptcli.loading.cpu), and with 1 and 2 threads forced, so the rule is
checked here too.

    python benchmarks/bench_llama.py --llama /tmp/llama [--rounds 3] [--tokens 128] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from common import CACHE, alternate, machine, median, model_folder, print_table

PROMPT = "Once upon a time"
# gptcli weights -> the llama.cpp type with the same bytes per weight (or the nearest), and the goal
PAIRS = {
    "float32": ("f32", 1.0),
    "bfloat16": ("f16", 0.6),
    "int8": ("q8_0", 0.8),
    "int4": ("q4_0", None),
}


def cpu_summary() -> str:
    from gptcli.loading.cpu import cpu_flags

    flags = cpu_flags() or set()
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return " ".join(f for f in wanted if f in flags) or "(no flags read)"


def gguf_files(llama: Path, folder: Path, kinds: list[str]) -> dict[str, Path]:
    """The benchmark model as GGUF files of each kind, converted once into the benchmark cache."""
    out_dir = CACHE / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / "model"
    if not (source / "model.safetensors").is_file():
        shutil.copytree(folder, source, dirs_exist_ok=True)
        config = json.loads((source / "config.json").read_text())
        config["n_ctx"] = config.get("n_positions", 1024)  # the converter reads GPT-2's context from n_ctx
        (source / "config.json").write_text(json.dumps(config, indent=1))
    shim = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']\n"
        "import convert_hf_to_gguf as c\n"
        "c.Model.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'\n"
        "sys.argv = ['convert_hf_to_gguf.py', *sys.argv[2:]]; c.main()\n"
    )
    files: dict[str, Path] = {}
    for kind in kinds:
        target = out_dir / f"{kind}.gguf"
        if not target.is_file():
            if kind == "q4_0":
                quantize = llama / "build" / "bin" / "llama-quantize"
                if not quantize.is_file():
                    continue
                f32 = files.get("f32") or gguf_files(llama, folder, ["f32"])["f32"]
                subprocess.run(
                    [str(quantize), str(f32), str(target), "q4_0"], check=True, capture_output=True
                )
            else:
                command = [sys.executable, "-c", shim, str(llama), str(source), "--outtype", kind]
                subprocess.run([*command, "--outfile", str(target)], check=True, capture_output=True)
        files[kind] = target
    return files


def llama_rate(llama: Path, gguf: Path, threads: int, tokens: int) -> float:
    """Tokens per second of one llama-bench tg run."""
    command = [str(llama / "build" / "bin" / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(tokens)]
    command += ["-t", str(threads), "-r", "1", "-o", "json"]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(json.loads(done.stdout)[0]["avg_ts"])


Key = tuple[str, str, int | None]  # (program, weights, threads; None: gptcli's own choice)
Variant = Callable[[], float | None]  # one run: llama-bench returns its own rate, gptcli's call None


def measure(variants: dict[Key, Variant], rounds: int, tokens: int) -> dict[Key, float]:
    """Median tokens per second of each variant over `rounds` alternating rounds."""
    rates: dict[Key, list[float]] = {key: [] for key in variants}

    # llama-bench reports its own rate (its load excluded); gptcli's is tokens over the call's time.
    def timed(key: Key) -> Callable[[], None]:
        def run() -> None:
            value = variants[key]()
            if value is not None:
                rates[key].append(value)

        return run

    for key in variants:
        if key[0] == "gptcli":
            variants[key]()  # warm-up
    times = alternate({key: timed(key) for key in variants}, rounds)
    return {
        key: median(rates[key]) if key[0] == "llama.cpp" else tokens / median(t) for key, t in times.items()
    }


def table_rows(
    precisions: list[str], thread_counts: list[int], rate: dict[Key, float], chosen: dict[str, int]
) -> list[list[str]]:
    """Rows of the table: gptcli at each thread count beside llama.cpp's best, per precision."""
    rows = []
    for precision in precisions:
        kind, goal = PAIRS[precision]
        theirs = {t: rate.get(("llama.cpp", kind, t)) for t in thread_counts}
        best_theirs = max((r for r in theirs.values() if r), default=None)
        ours_auto = rate[("gptcli", precision, None)]
        for threads in [None, *thread_counts]:
            r = rate[("gptcli", precision, threads)]
            label = f"auto ({chosen[precision]})" if threads is None else str(threads)
            ratio = f"{r / best_theirs:.2f}" if best_theirs else ""
            met = ""
            if threads is None and goal is not None and best_theirs:
                met = f"≥ {goal}: " + (
                    "yes" if r / best_theirs >= goal else f"no ({r / best_theirs / goal:.0%})"
                )
            rows.append([f"gptcli {precision}", label, f"{r:.1f}", ratio, met])
        for threads, their_rate in theirs.items():
            if their_rate:
                rows.append([f"llama.cpp {kind}", str(threads), f"{their_rate:.1f}", "", ""])
        if precision == "int4" and ("gptcli", "int8", None) in rate:
            int8 = rate[("gptcli", "int8", None)]
            rows.append(["gptcli int4 / gptcli int8", "auto", f"{ours_auto / int8:.2f}x", "", "≥ 1.3"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llama", type=Path, required=True, help="llama.cpp source tree with build/bin")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="fp32 and int8 only, 1 round")
    args = parser.parse_args()
    if not (args.llama / "build" / "bin" / "llama-bench").is_file():
        sys.exit(f"no llama-bench under {args.llama}/build/bin: build it first (see this script's help)")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the gptcli command sets it
    # gptcli's thread choice measured in this run, not read from an earlier one's cache
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="gptcli-bench-threads-")

    import torch

    from gptcli.generation.generate import complete
    from gptcli.generation.sampling import resolve_settings
    from gptcli.loading.models import load_model

    rounds = 1 if args.quick else args.rounds
    precisions = ["float32", "int8"] if args.quick else list(PAIRS)
    cores = torch.get_num_threads()
    thread_counts = sorted({1, cores})
    folder = model_folder()
    ggufs = gguf_files(args.llama, folder, [PAIRS[p][0] for p in precisions])
    started = machine()

    settings = resolve_settings(
        None, max_new_tokens=args.tokens, ignore_eos=True, temperature=1.0, top_k=50, top_p=1.0, seed=1234
    )
    variants: dict[Key, Variant] = {}
    chosen: dict[str, int] = {}
    for precision in precisions:
        kwargs: dict[str, Any] = (
            {"quantize": precision} if precision.startswith("int") else {"dtype": precision}
        )
        for threads in [None, *thread_counts]:
            lm = load_model(str(folder), device="cpu", threads=threads, **kwargs)
            if threads is None:
                chosen[precision] = lm.decode_threads()
            torch.set_num_threads(cores)  # load_model set it for a forced count; each run sets its own

            def ours(lm=lm, threads=threads) -> None:
                torch.set_num_threads(threads or cores)
                try:
                    (done,) = complete(lm, PROMPT, settings)
                finally:
                    torch.set_num_threads(cores)
                assert len(done.token_ids) == args.tokens

            variants[("gptcli", precision, threads)] = ours
        kind = PAIRS[precision][0]
        if kind in ggufs:
            for threads in thread_counts:
                variants[("llama.cpp", kind, threads)] = partial(
                    llama_rate, args.llama, ggufs[kind], threads, args.tokens
                )
    rate = measure(variants, rounds, args.tokens)

    print()
    print(f"machine at the start: {started}")
    print(f"machine at the end: {machine()}")
    print(f"CPU flags: {cpu_summary()}")
    print(f"model: GPT-2-124M shape ({folder}); {args.tokens} sampled tokens; {rounds} rounds, medians")
    print(f"gptcli's decode threads as chosen on this machine: {chosen}")
    rows = table_rows(precisions, thread_counts, rate, chosen)
    print_table(["program, weights", "threads", "tokens/s", "× llama.cpp (its best threads)", "goal"], rows)


if __name__ == "__main__":
    main()
