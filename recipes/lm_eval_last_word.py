"""Evaluate a gptcli model with lm-evaluation-harness through `gptcli serve`, on a task built from a local
text file: LAMBADA's form (predict a sentence's last word from the rest), no hub needed.

Builds the task (one JSON line per sentence of 6 to 40 words, first --sentences of them), starts
`gptcli serve -m MODEL`, runs lm-eval's `local-completions` against it with no tokenizer (it uses the
server's), then lm-eval's own `hf` backend on the same folder in float32, and prints both: accuracy
(the last word is the greedy continuation) and perplexity of the last word. Needs `pip install
'gptcli[eval]'`.

    python recipes/lm_eval_last_word.py sentences.txt                 # the built-in model
    python recipes/lm_eval_last_word.py sentences.txt -m ./my-model --sentences 500
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

TASK = """\
task: gptcli_last_word
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def build_task(text_file: Path, count: int, folder: Path) -> None:
    """The task's YAML and its JSON lines in `folder`."""
    lines = []
    for line in text_file.read_text(encoding="utf-8").splitlines():
        words = line.strip().split(" ")
        if 6 <= len(words) <= 40:
            lines.append(json.dumps({"text": " ".join(words)}, ensure_ascii=False))
        if len(lines) == count:
            break
    data = folder / "last_word.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "last_word.yaml").write_text(TASK.format(data=data), encoding="utf-8")


def serve(model: str) -> tuple[subprocess.Popen, str]:
    """`gptcli serve -m MODEL` on a free port; (process, base URL) once it answers."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gptcli", "serve", "-m", model, "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        found = re.search(r"(http://[\d.]+:\d+)/v1", line)
        if found:
            return process, found.group(1)
    raise SystemExit(f"the server did not start (exit {process.wait()})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("text_file", type=Path, help="one sentence a line (UTF-8)")
    parser.add_argument("-m", "--model", default="builtin")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    import httpx
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from gptcli.loading.models import builtin_path

    folder = str(builtin_path()) if args.model == "builtin" else args.model
    with tempfile.TemporaryDirectory() as tmp:
        build_task(args.text_file, args.sentences, Path(tmp))
        tasks = TaskManager(include_path=tmp)
        process, url = serve(folder)
        try:
            context = httpx.get(url + "/tokenizer_info", timeout=60).json()["model_max_length"]
            model_args = {
                "base_url": url + "/v1/completions",
                "model": Path(folder).name,
                "batch_size": args.batch_size,
                "max_length": context,
            }
            started = time.perf_counter()
            served = simple_evaluate(
                "local-completions", model_args, ["gptcli_last_word"], task_manager=tasks
            )
            served_s = time.perf_counter() - started
        finally:
            process.terminate()
            process.wait(30)
        hf_args = {"pretrained": folder, "batch_size": args.batch_size, "device": "cpu", "dtype": "float32"}
        started = time.perf_counter()
        local = simple_evaluate("hf", hf_args, ["gptcli_last_word"], task_manager=tasks)
        local_s = time.perf_counter() - started
    print(f"| Backend | Sentences | acc | perplexity | time |  ({Path(folder).name}, {args.text_file.name})")
    print("|---|---:|---:|---:|---:|")
    for name, result, seconds in (
        ("local-completions (gptcli serve)", served, served_s),
        ("hf", local, local_s),
    ):
        scores = result["results"]["gptcli_last_word"]
        count = result["n-samples"]["gptcli_last_word"]["effective"]
        acc, perplexity = scores["acc,none"], scores["perplexity,none"]
        print(f"| {name} | {count} | {acc:.4f} | {perplexity:.3f} | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
