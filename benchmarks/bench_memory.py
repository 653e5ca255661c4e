"""Memory: peak RSS of a whole `gptcli complete ... -n 16` process against the size of the weights.

On a GPT-2-124M-shaped model (random weights, fp32 safetensors, built on the fly). Also measured, for
scale: the transformers script doing the same, `python -c "import torch"` (the floor any PyTorch
program pays), and gptcli with `--dtype bfloat16` and `--quantize int8`. Peak RSS counts the
memory-mapped weight pages a process has read, so a model read in place counts once. Medians of the
runs (RSS barely varies).

    python benchmarks/bench_memory.py            # 5 runs each
    python benchmarks/bench_memory.py --quick    # 5 runs each, without the bf16/int8 rows
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_cold_start import NEW, PROMPT, REFERENCE
from common import machine, median, model_folder, print_table, weights_bytes


def peak_rss(cmd: list[str]) -> int:
    """Peak resident set size of the process `cmd`, in bytes."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None  # stderr=PIPE
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    folder = model_folder()

    started = machine()
    size = weights_bytes(folder)
    gptcli = [
        sys.executable,
        "-m",
        "gptcli",
        "complete",
        PROMPT,
        "-m",
        str(folder),
        "-n",
        str(NEW),
        "--greedy",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as temp:
        script = Path(temp) / "reference.py"
        script.write_text(REFERENCE, encoding="utf-8")
        commands = {
            "gptcli complete (fp32)": gptcli,
            "transformers script (fp32)": [sys.executable, str(script), str(folder), PROMPT, str(NEW)],
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
        }
        if not args.quick:
            commands["gptcli complete --dtype bfloat16"] = [*gptcli, "--dtype", "bfloat16"]
            commands["gptcli complete --quantize int8"] = [*gptcli, "--quantize", "int8"]
        peaks: dict[str, list[int]] = {name: [] for name in commands}
        for r in range(args.runs):
            for name, cmd in commands.items() if r % 2 == 0 else reversed(commands.items()):
                peaks[name].append(peak_rss(cmd))

    torch_floor = median(peaks['python -c "import torch"'])
    print()
    print(f"machine at the start: {started}")
    print(f"machine at the end: {machine()}")
    print(
        f"model: GPT-2-124M shape ({folder}); weights file {size / 2**20:.0f} MiB; {args.runs} runs, medians"
    )
    print()
    rows = []
    for name, values in peaks.items():
        peak = median(values)
        goal = ""
        if name == "gptcli complete (fp32)":
            goal = "≤ 1.3 " + ("met" if peak / size <= 1.3 else "not met")
        rows.append(
            [name, f"{peak / 2**20:.0f}", f"{peak / size:.2f}", f"{(peak - torch_floor) / size:.2f}", goal]
        )
    print_table(
        ["process", "peak RSS MiB", "× weights file", "(peak − import torch) × weights", "goal"], rows
    )


if __name__ == "__main__":
    main()
