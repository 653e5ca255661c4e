"""`gptcli serve` under concurrent load: 16 clients at once against the same requests one at a time.

A real server process (`python -m gptcli serve`) on a GPT-2-124M-shaped model (random weights, built
on the fly; --quick: a 4-layer, 256-wide one). Each of 16 clients asks for 32 greedy tokens (end-of-text
ignored, so every answer has 32) after its own short prompt of 2 to 10 words, about 10 tokens: each
prompt's prefill is not shared, so long prompts would measure prefill rather than batching. "One at a
time" sends the 16 requests in turn, each waiting for the one before: the server then decodes one row
per step, as `gptcli complete` does. "Concurrent" sends them together from 16 threads: the rows join
the server's batch and share its steps. Throughput is new tokens per second of wall time, from the
first request sent to the last answer received; the two take turns for --rounds rounds, and the
figures are medians.
Every concurrent answer must equal the one-at-a-time answer of its prompt (text and tokens).

In each round it also times one decoding step of 1 row and of 16 rows in its own process, the server
idle: 16 × the first / the second is the most that sharing steps can give on the machine it runs on,
in the conditions of the run (3.8 for the 124M shape, 4.8 for --quick on the quiet 2-core AMD EPYC of
docs/serve.md, whose matrix products of 16 rows are compute-bound; less when other processes take a
core).

    python benchmarks/bench_serve.py            # GPT-2-124M shape, 3 rounds (a few minutes)
    python benchmarks/bench_serve.py --quick    # a small model, 3 rounds (about a minute)

Then time to first token with a long prompt arriving mid-batch (issue 22): 8 streams decode, a prompt
of about 870 tokens arrives, and 16 short streaming requests (4 tokens each) follow it 25 ms apart; each
short request's time to first token (sending to the first chunk with text), p50 and p99 over --rounds
rounds, and the running streams' longest gap between two chunks. Twice, each on its own server: prompts
prefilled a chunk of 256 tokens per step (the engine's default, PREFILL_CHUNK), and whole (chunking off,
as before issue 22). The servers are started through gptcli.serving.serve, since `gptcli serve` has
no option for the chunk size.

--transformers (issue 22, item 4): what batching would give a model that runs through transformers
(gptcli's engine serves those one request at a time): the same model saved with
scale_attn_by_inverse_layer_idx (which gptcli's GPT-2 does not run), one decoding step of 1 row and of
16 rows through gptcli's Decoder for it (transformers' DynamicCache), 16 × the first / the second.

    python benchmarks/bench_serve.py --transformers

--flood (issue 23): 200 clients at once against a server started with --max-waiting 48, on 127.0.0.1
only, each sending one request, bounded to 200 requests and --flood-seconds (180) in all: short prompts
and long ones (about 400 tokens), whole and streamed; 10% leave after the first chunk, 10% read one
chunk every 50 ms (slow readers). Every answer that comes back whole must equal gptcli's own greedy
completion of its prompt (`complete`, in this process); the shed ones must be OpenAI's 429 with
Retry-After. It prints the counts, time to first token p50/p99 (streams, from sending the request to
the first chunk with text; short prompts apart from the long ones that arrive while others decode),
/health's slowest answer during the flood, and the server's peak RSS.

    python benchmarks/bench_serve.py --flood --quick    # the small model (about a minute)
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

# As gptcli's commands do (gptcli/cli/_common.py): on a shared machine spinning OpenMP threads make
# every parallel kernel wait a scheduler slice. The server process inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import generated_text, machine, median, model_folder, print_table, spread

CLIENTS = 16
NEW_TOKENS = 32
GOAL = 4.0  # × the one-at-a-time throughput (issue 15)


def prompts(count: int = CLIENTS, words: tuple[int, int] = (2, 10)) -> list[str]:
    """`count` prompts of words[0] to words[1] words (about 2.5 tokens a word)."""
    rng = random.Random(15)
    text = generated_text(20_000, seed=5).replace("\n", " ").split(" ")
    out = []
    for _ in range(count):
        start = rng.randrange(len(text) - 60)
        out.append(" ".join(text[start : start + rng.randint(*words)]).strip() or "The")
    return out


# A server whose engine prefills at most `chunk` prompt tokens per step (0: whole prompts).
LAUNCH = """
import sys
from gptcli.loading.models import load_model
from gptcli.serving import serve
chunk = int(sys.argv[2]) or None
def listening(url):
    print("serving at " + url, file=sys.stderr, flush=True)
serve(load_model(sys.argv[1]), port=0, on_listening=listening, log=lambda line: None, prefill_chunk=chunk)
"""


def start_server(folder: Path, *options: str, chunk: int | None = None) -> tuple[subprocess.Popen, str, int]:
    """`gptcli serve` on a free port of 127.0.0.1 (`chunk`: gptcli.serving.serve with that prefill
    chunk instead); (process, host, port) once /health answers."""
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    command = ["-m", "gptcli", "serve", "-m", str(folder), "--port", "0", *options]
    if chunk is not None:
        command = ["-c", LAUNCH, str(folder), str(chunk)]
    process = subprocess.Popen(
        [sys.executable, *command],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 300
    for line in process.stderr:
        found = re.search(r"http://([\d.]+):(\d+)", line)
        if found:
            host, port = found.group(1), int(found.group(2))
            break
        if time.monotonic() > deadline:
            raise SystemExit("the server did not start")
    else:
        raise SystemExit(f"the server exited: {process.wait()}")
    # Keep reading its log so the pipe never fills up.
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # type: ignore[union-attr]
    while True:
        try:
            request(host, port, "GET", "/health")
            return process, host, port
        except OSError:
            time.sleep(0.2)


def request(host: str, port: int, method: str, path: str, body: dict | None = None) -> dict:
    connection = http.client.HTTPConnection(host, port, timeout=600)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer: dict = json.loads(response.read())
        if response.status != 200:
            raise SystemExit(f"{path}: {response.status} {answer}")
        return answer
    finally:
        connection.close()


def complete(host: str, port: int, prompt: str) -> tuple[str, list[str]]:
    """The text and tokens of 32 greedy tokens after `prompt` (logprobs 0: the tokens, nothing more)."""
    body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    choice = request(host, port, "POST", "/v1/completions", body)["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == NEW_TOKENS, choice
    return choice["text"], choice["logprobs"]["tokens"]


def one_at_a_time(host: str, port: int, texts: list[str]) -> tuple[float, list]:
    start = time.perf_counter()
    answers = [complete(host, port, t) for t in texts]
    return time.perf_counter() - start, answers


def concurrent(host: str, port: int, texts: list[str]) -> tuple[float, list]:
    answers: list = [None] * len(texts)
    ready = threading.Barrier(len(texts) + 1)

    def client(i: int) -> None:
        ready.wait()
        answers[i] = complete(host, port, texts[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, answers


class Ceiling:
    """One decoding step of 1 row and of `rows` rows, timed in this process while the server sits idle,
    as the engine runs them: one thread for one row, torch's threads for a batch. `rows` × the first /
    the second is the most that sharing steps can give on this machine, now."""

    def __init__(self, folder: Path, rows: int = CLIENTS, steps: int = 8) -> None:
        import torch

        from gptcli.loading.models import load_model

        self.lm, self.rows, self.steps = load_model(str(folder)), rows, steps
        if self.lm.net is not None:
            self.lm.net.pack_for_batches()  # as the server's engine does at start
        self.ms: dict[int, list[float]] = {1: [], rows: []}
        with torch.inference_mode():
            self._decode(1), self._decode(rows)  # warm up

    def measure(self) -> None:
        import torch

        with torch.inference_mode():
            for batch in (1, self.rows):
                self.ms[batch].append(self._decode(batch) / self.steps * 1000)

    def _decode(self, batch: int) -> float:
        """Seconds of `steps` steps of `batch` rows, after a 16-token prefill (not timed)."""
        import torch

        from gptcli.generation.decoding import torch_threads
        from gptcli.gpt2 import CachedDecoder

        assert self.lm.net is not None
        decoder = CachedDecoder(self.lm.net, batch, 16 + self.steps)
        decoder.prefill(torch.randint(0, 5000, (batch, 16)), None, torch.arange(16).expand(batch, 16))
        token = torch.randint(0, 5000, (batch, 1))
        with torch_threads(1 if batch == 1 else None):
            start = time.perf_counter()
            for i in range(self.steps):
                decoder.step(token, torch.full((batch, 1), 16 + i))
            return time.perf_counter() - start


RUNNING = 8  # streams decoding when the long prompt arrives
SHORT = 16  # short streaming requests after it
CHUNKS = {"chunked prefill (256 tokens a step)": 256, "whole prompts (chunking off)": 0}


def stream_times(host: str, port: int, prompt: str, max_tokens: int) -> list[float]:
    """Stream `max_tokens` greedy tokens; the times (perf_counter) of the chunks with text, and of the
    request's sending first."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    connection = http.client.HTTPConnection(host, port, timeout=600)
    times = [time.perf_counter()]
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        for line in response:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                times.append(time.perf_counter())
    finally:
        connection.close()
    return times


def long_prompt_round(host: str, port: int, long: str, short: list[str]) -> tuple[list[float], float]:
    """One round: the short requests' times to first token, and the running streams' longest gap."""
    running: list[list[float]] = [[] for _ in range(RUNNING)]
    firsts: list[float] = [0.0] * SHORT

    def run(i: int) -> None:
        running[i] = stream_times(host, port, short[i % len(short)], 96)

    def ask(i: int) -> None:
        times = stream_times(host, port, short[i % len(short)], 4)
        firsts[i] = times[1] - times[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(RUNNING)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the batch is decoding
    arrived = time.perf_counter()
    threads.append(
        threading.Thread(target=request, args=(host, port, "POST", "/v1/completions", _long_body(long)))
    )
    threads[-1].start()
    for i in range(SHORT):
        time.sleep(0.025)
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    gaps = [b - a for times in running for a, b in itertools.pairwise(times[1:]) if b > arrived]
    return firsts, max(gaps, default=0.0)


def _long_body(prompt: str) -> dict:
    return {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def long_prompt_ttft(folder: Path, rounds: int) -> list[list[object]]:
    """Table rows: for each way of prefilling, short requests' TTFT p50/p99 and the running streams'
    longest gap, with a prompt of about 870 tokens arriving mid-batch."""
    short = prompts()
    (long,) = prompts(1, words=(340, 360))
    rows: list[list[object]] = []
    for name, chunk in CHUNKS.items():
        process, host, port = start_server(folder, chunk=chunk)
        try:
            complete(host, port, short[0])  # warm up
            firsts: list[float] = []
            gaps: list[float] = []
            for _ in range(rounds):
                ttft, gap = long_prompt_round(host, port, long, short)
                firsts += ttft
                gaps.append(gap)
        finally:
            process.terminate()
            process.wait(30)
        firsts.sort()
        rows.append(
            [
                name,
                f"{_quantile(firsts, 0.5) * 1000:.0f} / {_quantile(firsts, 0.99) * 1000:.0f} ms",
                f"{max(gaps) * 1000:.0f} ms",
            ]
        )
    return rows


def transformers_ceiling(folder: Path, rounds: int) -> None:
    """Steps of 1 and of 16 rows of a transformers-run copy of the model (module docstring)."""
    import shutil

    import torch

    from gptcli.generation.decoding import open_decoder, torch_threads
    from gptcli.loading.models import load_model

    other = folder.with_name(folder.name + "-inverse-layer-idx")
    if not other.is_dir():
        shutil.copytree(folder, other)
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    lm = load_model(str(other))
    assert lm.runtime == "transformers", lm.runtime
    steps = 8

    def decode(batch: int) -> float:
        decoder = open_decoder(lm, batch, 16 + steps)
        decoder.prefill(torch.randint(0, 5000, (batch, 16)), None, torch.arange(16).expand(batch, 16))
        token = torch.randint(0, 5000, (batch, 1))
        with torch_threads(1 if batch == 1 else None):
            start = time.perf_counter()
            for i in range(steps):
                decoder.step(token, torch.full((batch, 1), 16 + i))
            return (time.perf_counter() - start) / steps * 1000

    ms: dict[int, list[float]] = {1: [], CLIENTS: []}
    with torch.inference_mode():
        decode(1), decode(CLIENTS)  # warm up
        for _ in range(rounds):
            for batch in ms:
                ms[batch].append(decode(batch))
    one, many = median(ms[1]), median(ms[CLIENTS])
    print(f"transformers runtime ({other.name}), {rounds} rounds")
    print(machine())
    print(
        f"a step of 1 row: {one:.1f} ms; of {CLIENTS} rows: {many:.1f} ms; batching {CLIENTS} requests would "
        f"give at most {CLIENTS * one / many:.2f}× the one-at-a-time decoding throughput"
    )


FLOOD_CLIENTS = 200
FLOOD_WAITING = 48  # the server's --max-waiting during the flood


def flood_request(host: str, port: int, kind: str, prompt: str) -> dict:
    """One flood client's request; what came back: status, text, time to first chunk, Retry-After."""
    stream = kind in ("stream", "leave", "slow")
    body = {
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    connection = http.client.HTTPConnection(host, port, timeout=120)
    sent = time.perf_counter()
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        out: dict = {"kind": kind, "prompt": prompt, "status": response.status}
        if response.status != 200:
            out["error"] = json.loads(response.read())["error"]
            out["retry_after"] = response.getheader("retry-after")
            return out
        if not stream:
            out["text"] = json.loads(response.read())["choices"][0]["text"]
            return out
        texts = []
        for line in response:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            text = json.loads(line[6:])["choices"][0]["text"]
            if text and "ttft" not in out:
                out["ttft"] = time.perf_counter() - sent
            texts.append(text)
            if kind == "leave":
                return out  # closes the connection mid-stream
            if kind == "slow":
                time.sleep(0.05)
        out["text"] = "".join(texts)
        return out
    finally:
        connection.close()


def flood(folder: Path, seconds: float) -> None:
    """200 clients at once, bounded in count and time (module docstring)."""
    from concurrent.futures import ThreadPoolExecutor, wait

    from gptcli.generation.generate import complete as reference_complete
    from gptcli.generation.sampling import resolve_settings
    from gptcli.loading.models import load_model

    rng = random.Random(23)
    short = prompts(12)
    long = prompts(4, words=(150, 170))  # about 400 tokens each
    kinds = ["whole"] * 8 + ["stream"] * 8 + ["leave"] * 2 + ["slow"] * 2
    plan = [
        (rng.choice(kinds), rng.choice(long if rng.random() < 0.2 else short)) for _ in range(FLOOD_CLIENTS)
    ]
    lm = load_model(str(folder))
    settings = resolve_settings(None, greedy=True, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    expected = {c.prompt: c.text for c in reference_complete(lm, short + long, settings, batch_size=1)}
    del lm
    process, host, port = start_server(folder, "--max-waiting", str(FLOOD_WAITING))
    health: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            request(host, port, "GET", "/health")
            health.append(time.perf_counter() - start)
            time.sleep(0.1)

    try:
        flood_request(host, port, "whole", short[0])  # warm up
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(FLOOD_CLIENTS) as pool:
            futures = [pool.submit(flood_request, host, port, kind, prompt) for kind, prompt in plan]
            done, late = wait(futures, timeout=seconds)
            wall = time.perf_counter() - started
            stop.set()
            watcher.join(5)
            peak = re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{process.pid}/status").read_text())
    finally:
        process.terminate()
        process.wait(30)
    results = [f.result() for f in done if f.exception() is None]
    failed = [repr(f.exception()) for f in done if f.exception() is not None]
    served = [r for r in results if r["status"] == 200]
    whole = [r for r in served if "text" in r]
    wrong = [r for r in whole if r["text"] != expected[r["prompt"]]]
    shed = [r for r in results if r["status"] == 429]
    shed_ok = [r for r in shed if r["error"]["code"] == "rate_limit_exceeded" and r["retry_after"] == "1"]
    other = [r for r in results if r["status"] not in (200, 429)]
    ttft = {
        size: sorted(r["ttft"] for r in served if "ttft" in r and (r["prompt"] in long) == (size == "long"))
        for size in ("short", "long")
    }
    clients = f"{FLOOD_CLIENTS} clients at once, {NEW_TOKENS} greedy tokens"
    print(f"gptcli serve --max-waiting {FLOOD_WAITING}: {clients}")
    print(machine())
    print()
    rows = [
        ["requests", FLOOD_CLIENTS, f"{len(done)} ended within {seconds:g} s, {len(late)} did not"],
        ["answered whole (200)", len(whole), f"{len(whole) - len(wrong)} equal to `complete --greedy`"],
        ["left mid-stream (by design)", sum(r["kind"] == "leave" for r in served), ""],
        ["shed (429)", len(shed), f"{len(shed_ok)} OpenAI-shaped with Retry-After"],
        ["other statuses / client errors", len(other) + len(failed), "; ".join(failed[:2])],
        *(
            [
                f"time to first token p50 / p99, {size} prompts (streams)",
                f"{_quantile(ttft[size], 0.5):.2f} / {_quantile(ttft[size], 0.99):.2f} s",
                f"{len(ttft[size])} streams",
            ]
            for size in ("short", "long")
        ),
        ["slowest /health during the flood", f"{max(health, default=0):.2f} s", f"{len(health)} probes"],
        ["server peak RSS", f"{int(peak.group(1)) / 1024:.0f} MiB" if peak else "?", f"wall {wall:.1f} s"],
    ]
    print_table(["", "count / figure", "detail"], rows)
    if wrong or other or failed or late or len(shed_ok) != len(shed):
        raise SystemExit("the flood found a fault (see the table)")


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a 4-layer, 256-wide model instead of 124M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flood", action="store_true", help="200 clients at once (issue 23)")
    parser.add_argument("--flood-seconds", type=float, default=180.0)
    parser.add_argument("--ttft-only", action="store_true", help="only the long-prompt TTFT figures")
    parser.add_argument(
        "--transformers", action="store_true", help="what batching would give transformers' models"
    )
    args = parser.parse_args()
    folder = model_folder(4, 4, 256) if args.quick else model_folder()
    if args.flood:
        flood(folder, args.flood_seconds)
        return
    if args.transformers:
        transformers_ceiling(folder, args.rounds)
        return
    if args.ttft_only:
        print_ttft(folder, args)
        return
    texts = prompts()
    from gptcli.loading.gpt2_folder import load

    prompt_tokens = sum(len(load(folder)[2].encode(t)) for t in texts) / len(texts)  # type: ignore[index,misc]
    process, host, port = start_server(folder)
    ceiling = Ceiling(folder)
    try:
        complete(host, port, texts[0])  # warm up: first-call allocations, thread pools
        times: dict[str, list[float]] = {"one at a time": [], "concurrent": []}
        reference: list | None = None
        identical, compared = 0, 0
        for r in range(args.rounds):
            order = ["one at a time", "concurrent"] if r % 2 == 0 else ["concurrent", "one at a time"]
            for name in order:
                run = one_at_a_time if name == "one at a time" else concurrent
                seconds, answers = run(host, port, texts)
                times[name].append(seconds)
                if name == "one at a time":
                    reference = reference or answers
                    assert answers == reference, "one-at-a-time answers changed between rounds"
                else:
                    pending = answers
            if reference is not None:
                identical += sum(a == b for a, b in zip(pending, reference, strict=True))
                compared += len(reference)
            ceiling.measure()  # in the same conditions as this round, the server idle
    finally:
        process.terminate()
        process.wait(30)
    one, many = median(ceiling.ms[1]), median(ceiling.ms[CLIENTS])
    tokens = CLIENTS * NEW_TOKENS
    alone, together = median(times["one at a time"]), median(times["concurrent"])
    shape = "4 layers × 256 (--quick)" if args.quick else "GPT-2-124M shape"
    print(f"gptcli serve, {shape}: {CLIENTS} clients × {NEW_TOKENS} greedy tokens, {args.rounds} rounds")
    print(machine())
    print()
    wall: list[object] = [
        "wall time (s)",
        f"{alone:.2f} ({spread(times['one at a time'])})",
        f"{together:.2f} ({spread(times['concurrent'])})",
        f"{together / alone:.2f}×",
    ]
    speed: list[object] = [
        "throughput (tokens/s)",
        f"{tokens / alone:.1f}",
        f"{tokens / together:.1f}",
        f"{alone / together:.2f}×",
    ]
    print_table(["", "one at a time", "16 concurrent", "concurrent / one at a time"], [wall, speed])
    print()
    goal = "met" if alone / together >= GOAL else "NOT met"
    print(f"goal ≥ {GOAL}× the one-at-a-time throughput: {alone / together:.2f}× ({goal})")
    print(f"concurrent answers identical to one at a time: {identical}/{compared}")
    print(
        f"this machine's ceiling for decoding alone: a step of 1 row takes {one:.0f} ms, of {CLIENTS} rows "
        f"{many:.0f} ms, so sharing steps gives at most {CLIENTS * one / many:.2f}× (each prompt's prefill, "
        "on average {:.1f} tokens here, is not shared)".format(prompt_tokens)
    )
    print()
    print_ttft(folder, args)


def print_ttft(folder: Path, args: argparse.Namespace) -> None:
    rows = long_prompt_ttft(folder, args.rounds)
    print(
        f"a prompt of about 870 tokens arrives while {RUNNING} streams decode; {SHORT} short streaming "
        f"requests follow it 25 ms apart ({args.rounds} rounds)"
    )
    print_table(["", "short requests' time to first token p50 / p99", "running streams' longest gap"], rows)


if __name__ == "__main__":
    main()
