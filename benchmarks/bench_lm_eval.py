"""lm-eval against `gptcli serve`: its `local-completions` backend (no tokenizer given: it uses the server's
/tokenizer_info, /tokenize and /detokenize) against its own `hf` backend on the same folder.

Both score the same loglikelihood requests (contexts and continuations cut from generated text, 8 per
request to the server): the table gives the largest difference of a log-likelihood, how many greedy flags
agree, and each backend's wall time. Needs the [eval] extra (`pip install 'gptcli[eval]'`); the hub is
not needed (HF_HUB_OFFLINE=1).

    python benchmarks/bench_lm_eval.py                   # gptcli's built-in model
    python benchmarks/bench_lm_eval.py -m PATH --requests 200
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

from bench_serve import start_server
from common import generated_text, machine, print_table


def requests(count: int) -> list[tuple[str, str]]:
    rng = random.Random(22)
    text = generated_text(60_000, seed=9)
    out: list[tuple[str, str]] = []
    while len(out) < count:
        start = rng.randrange(len(text) - 400)
        cut = text.find(" ", start + rng.randint(20, 300))  # at a word's start, as tasks cut them
        context, continuation = text[start:cut], text[cut : cut + rng.randint(3, 60)]
        if context.strip() and continuation.strip():  # (lm-eval's hf backend refuses empty ones)
            out.append((context, continuation))
    return out


def loglikelihoods(lm, pairs: list[tuple[str, str]]) -> tuple[list[tuple[float, bool]], float]:
    from lm_eval.api.instance import Instance

    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)
    ]
    start = time.perf_counter()
    return lm.loglikelihood(instances, disable_tqdm=True), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-m", "--model", default=None, help="a model folder (default: the built-in model)")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    from lm_eval.api.registry import get_model

    from gptcli.loading.models import builtin_path, load_model

    folder = Path(args.model) if args.model else builtin_path()
    context = load_model(str(folder)).context_length
    pairs = requests(args.requests)
    process, host, port = start_server(folder)
    try:
        remote = get_model("local-completions")(
            base_url=f"http://{host}:{port}/v1/completions",
            model=folder.name,
            batch_size=args.batch_size,
            max_length=context,
        )
        assert type(remote.tokenizer).__name__ == "RemoteTokenizer", type(remote.tokenizer)
        served, served_s = loglikelihoods(remote, pairs)
    finally:
        process.terminate()
        process.wait(30)
    # float32 as the server computes (lm-eval's "auto" would take the checkpoint's float16 on a CPU)
    hf = {"pretrained": str(folder), "batch_size": args.batch_size, "device": "cpu", "dtype": "float32"}
    local_lm = get_model("hf")(**hf)
    local, local_s = loglikelihoods(local_lm, pairs)
    worst = max(abs(a - b) for (a, _), (b, _) in zip(served, local, strict=True))
    agree = sum(a[1] == b[1] for a, b in zip(served, local, strict=True))
    print(f"lm-eval loglikelihood, {len(pairs)} requests, batch size {args.batch_size}, {folder.name}")
    print(machine())
    print()
    rows = [
        [
            folder.name,
            len(pairs),
            f"{worst:.1e}",
            f"{agree}/{len(pairs)}",
            f"{served_s:.1f} s",
            f"{local_s:.1f} s",
        ]
    ]
    headers = ["model", "requests", "largest |difference|", "greedy flags equal", "local-completions", "hf"]
    print_table(headers, rows)


if __name__ == "__main__":
    main()
