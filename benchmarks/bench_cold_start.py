"""Cold start: a whole `gptcli complete ... -n 16` process against a transformers script doing the same.

Both load the same GPT-2-124M-shaped folder (random weights, built on the fly, saved by transformers'
save_pretrained as users' folders are) and greedily generate 16 tokens, each in a fresh Python process
(the page cache is warm for both: each runs once before timing). The two take turns round after round;
figures are medians. Then where the time goes, phase by phase, for each (import, load, first token,
the other 15 tokens), and `gptcli --help`, `gptcli tokenize` and `gptcli info` on the same folder
against `python -c "import torch"`.

    python benchmarks/bench_cold_start.py            # 7 rounds (about 2 minutes)
    python benchmarks/bench_cold_start.py --quick    # 5 rounds, phases measured once (about a minute)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, median, model_folder, print_table, spread

PROMPT = "Once upon a time, in a small village by the sea, there lived"
NEW = 16

# What a person writes to do this with transformers: the reference.
REFERENCE = """\
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
ids = tokenizer(prompt, return_tensors="pt")
out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:]))
"""


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return seconds


def phases_gptcli(folder: str) -> dict[str, float]:
    """gptcli's own path, phase by phase (what `gptcli complete` runs, minus printing)."""
    marks = [time.perf_counter()]
    import gptcli.cli  # noqa: F401 -- the CLI: typer, rich, the command modules

    marks.append(time.perf_counter())
    # What load_model imports lazily: torch and tokenizers; transformers only for folders that are not
    # plain GPT-2 (gptcli.loading.gpt2_folder), so not here.
    import tokenizers  # noqa: F401
    import torch  # noqa: F401

    marks.append(time.perf_counter())
    from gptcli.generation.generate import complete
    from gptcli.generation.sampling import resolve_settings
    from gptcli.loading.models import load_model

    lm = load_model(folder)
    marks.append(time.perf_counter())
    (done,) = complete(lm, PROMPT, resolve_settings(lm.generation_config, greedy=True, max_new_tokens=NEW))
    end = time.perf_counter()
    assert "transformers" not in sys.modules, "gptcli imported transformers for a plain GPT-2"
    return _phases(marks, done.first_token_seconds, end)


def phases_transformers(folder: str) -> dict[str, float]:
    """The reference script, phase by phase (a streamer notes when the first new token comes)."""
    marks = [time.perf_counter(), time.perf_counter()]  # no CLI
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401 -- what from_pretrained imports lazily
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    marks.append(time.perf_counter())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    marks.append(time.perf_counter())

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls: list[float] = []

        def put(self, value) -> None:  # first call: the prompt; second: the first new token
            self.calls.append(time.perf_counter())

        def end(self) -> None:
            pass

    streamer = FirstToken()
    ids = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=NEW, do_sample=False, pad_token_id=tokenizer.eos_token_id, streamer=streamer
    )
    tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    end = time.perf_counter()
    return _phases(marks, streamer.calls[1] - marks[3], end)


def _phases(marks: list[float], first_token: float, end: float) -> dict[str, float]:
    return {
        "CLI import": marks[1] - marks[0],
        "library imports (gptcli: torch, tokenizers)": marks[2] - marks[1],
        "load (tokenizer, config, weights)": marks[3] - marks[2],
        "first token (prompt + 1 step)": first_token,
        f"other {NEW - 1} tokens": end - marks[3] - first_token,
    }


def worker(kind: str, folder: str) -> None:
    result = phases_gptcli(folder) if kind == "gptcli" else phases_transformers(folder)
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(kind: str, folder: Path) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--folder", str(folder)], capture_output=True, text=True
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{kind} worker failed:\n{proc.stderr[-2000:]}")
    result: dict[str, float] = json.loads(line.removeprefix("RESULT "))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--worker", choices=["gptcli", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.folder)
        return
    rounds = args.rounds or (5 if args.quick else 7)
    phase_rounds = 1 if args.quick else 5

    folder = model_folder()

    started = machine()
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as temp:
        script = Path(temp) / "reference.py"
        script.write_text(REFERENCE, encoding="utf-8")
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
        reference = [sys.executable, str(script), str(folder), PROMPT, str(NEW)]
        help_cmd = [sys.executable, "-m", "gptcli", "--help"]
        tokenize_cmd = [sys.executable, "-m", "gptcli", "tokenize", "-m", str(folder), PROMPT]
        info_cmd = [sys.executable, "-m", "gptcli", "info", "-m", str(folder)]
        torch_cmd = [sys.executable, "-c", "import torch"]
        commands = {
            "gptcli": gptcli,
            "reference": reference,
            "help": help_cmd,
            "tokenize": tokenize_cmd,
            "info": info_cmd,
            "torch": torch_cmd,
        }
        for cmd in commands.values():  # warm the page cache
            wall(cmd)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for r in range(rounds):
            pairs = list(commands.items())
            for name, cmd in pairs if r % 2 == 0 else pairs[::-1]:
                times[name].append(wall(cmd))
        phases: dict[str, list[dict[str, float]]] = {"gptcli": [], "transformers": []}
        for r in range(phase_rounds):
            for kind in ("gptcli", "transformers") if r % 2 == 0 else ("transformers", "gptcli"):
                phases[kind].append(run_worker(kind, folder))

    m = {name: median(t) for name, t in times.items()}
    print()
    print(f"machine at the start: {started}")
    print(f"machine at the end: {machine()}")
    print(f"model: GPT-2-124M shape ({folder}); {rounds} rounds, medians (seconds; min–max in brackets)")
    print()
    print_table(
        ["what", "gptcli s", "reference s", "ratio", "goal"],
        [
            [
                f"`gptcli complete ... -n {NEW}` vs transformers script",
                f"{m['gptcli']:.2f} [{spread(times['gptcli'])}]",
                f"{m['reference']:.2f} [{spread(times['reference'])}]",
                f"{m['gptcli'] / m['reference']:.2f}",
                "≤ 0.5 " + ("met" if m["gptcli"] / m["reference"] <= 0.5 else "not met"),
            ],
            *[
                [
                    f'`gptcli {what}` vs `python -c "import torch"`',
                    f"{m[name]:.2f} [{spread(times[name])}]",
                    f"{m['torch']:.2f} [{spread(times['torch'])}]",
                    f"{m[name] / m['torch']:.2f}",
                    "≤ 0.35 " + ("met" if m[name] / m["torch"] <= 0.35 else "not met"),
                ]
                for name, what in (("help", "--help"), ("tokenize", "tokenize"), ("info", "info"))
            ],
        ],
    )
    print()
    print(f"Where the time goes (in-process, medians of {phase_rounds}; interpreter start-up not included):")
    names = list(phases["gptcli"][0])
    print_table(
        ["phase", "gptcli s", "transformers s"],
        [
            [
                n,
                f"{median([p[n] for p in phases['gptcli']]):.2f}",
                f"{median([p[n] for p in phases['transformers']]):.2f}",
            ]
            for n in names
        ]
        + [
            [
                "total",
                f"{median([sum(p.values()) for p in phases['gptcli']]):.2f}",
                f"{median([sum(p.values()) for p in phases['transformers']]):.2f}",
            ]
        ],
    )


if __name__ == "__main__":
    main()
