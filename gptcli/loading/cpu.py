"""What this CPU can do, and how many threads one sequence's decoding should use on it.

Decoding one sequence is a chain of matrix-vector products bound by memory bandwidth. Whether a second
thread helps depends on the machine: on the 2-core AVX2 EPYC gptcli was first tuned on one thread was
faster (a wake-up and a join at each product cost more than the bandwidth it adds); on an AVX-512 EPYC
llama.cpp gains 1.36x from the second thread. So it is measured, once per machine and weight format, on
the model's own matmuls, and cached with the CPU's model name and flags (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

# `--threads` and $GPTCLI_THREADS override the measurement.
THREADS_ENV = "GPTCLI_THREADS"


def cpu_flags() -> set[str] | None:
    """The flags /proc/cpuinfo lists for this CPU (None: cannot tell, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def cpu_has_bf16() -> bool | None:
    """Whether this CPU has bf16 instructions (avx512_bf16 or amx_bf16; None: cannot tell)."""
    flags = cpu_flags()
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_key() -> str:
    """This machine as the thread cache knows it: CPU model, flags, core count and torch version."""
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    flags = " ".join(sorted(cpu_flags() or ()))
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{model}|{digest}|{os.cpu_count()}|{torch.__version__}"


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "gptcli" / "decode-threads.json"


def _read_cache() -> dict[str, int]:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}


def _write_cache(data: dict[str, int]) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
        temporary.replace(path)
    except OSError:
        pass  # a read-only home: measure again next time


def fastest_threads(step: Callable[[], object], most: int, rounds: int = 5) -> int:
    """The thread count, 1 or `most`, that runs `step` faster: the best of `rounds` alternating runs."""
    import torch

    if most <= 1:
        return 1
    before = torch.get_num_threads()
    best = {1: float("inf"), most: float("inf")}
    try:
        for _ in range(rounds):
            for count in best:
                torch.set_num_threads(count)
                start = time.perf_counter()
                step()
                best[count] = min(best[count], time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    # A second thread must pay for itself clearly: within 3% counts as no gain.
    return most if best[most] < 0.97 * best[1] else 1


def decode_threads(kind: str, step: Callable[[], object], requested: int | None = None) -> int:
    """How many threads one sequence's decoding steps of weight format `kind` run on.

    `requested` (`--threads`), else $GPTCLI_THREADS, else the cached measurement for this machine, else
    a measurement now (`step` runs a one-token pass over the model's matmuls, ~10 times) that is cached.
    """
    import torch

    if requested is None and os.environ.get(THREADS_ENV, "").strip():
        try:
            requested = int(os.environ[THREADS_ENV])
        except ValueError:
            requested = None
    if requested is not None and requested >= 1:
        return requested
    most = torch.get_num_threads()
    key = f"{cpu_key()}|{kind}|{most}"
    cache = _read_cache()
    if key not in cache:
        cache[key] = fastest_threads(step, most)
        _write_cache(cache)
    return cache[key]
