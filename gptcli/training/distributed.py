"""One process or many under torchrun: who we are, and the few collectives the training loop needs.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them (or with WORLD_SIZE=1) everything here is a
no-op and the loop runs as a single plain process.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from gptcli.errors import GptcliError
from gptcli.loading.models import resolve_device

T = TypeVar("T")

# Rank 0 may tokenize a large corpus while the others wait: far longer than NCCL's 10-minute default.
_CONTROL_TIMEOUT = timedelta(hours=6)


@dataclass
class Dist:
    """This process's place in the run: rank, world size, its device, and a CPU group for control messages."""

    rank: int
    local_rank: int
    world: int
    device: torch.device
    control: Any = None  # a gloo process group: small CPU messages never wait on the GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over all processes (the tensor itself in a single process)."""
        if not self.enabled:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG
        return value

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over all processes."""
        return self.sum(value) / self.world if self.enabled else value

    def total(self, counts: list[int]) -> list[int]:
        """Integer counts summed over all processes, on the CPU (no wait on the GPU)."""
        if not self.enabled:
            return counts
        value = torch.tensor(counts, dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.control)
        return [int(v) for v in value.tolist()]

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any process; every process must call it at the same point."""
        if not self.enabled:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)
        return bool(value.item())

    def gather(self, obj: T) -> list[T]:
        """Every process's `obj`, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 alone and hand its result, or its error, to every process."""
        if not self.enabled:
            return fn()
        box: list[Any] = [None]
        failure: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except BaseException as exc:  # the others must hear of it, or they wait forever
                failure = exc
                box[0] = ("error", str(exc) if isinstance(exc, GptcliError) else f"rank 0 failed: {exc!r}")
        dist.broadcast_object_list(box, src=0, group=self.control)
        if failure is not None:
            raise failure
        kind, value = box[0]
        if kind == "error":
            raise GptcliError(value)
        result: T = value  # what fn() returned on rank 0, passed through the pickled broadcast
        return result

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def setup(device_spec: str) -> Dist:
    """Join the process group when torchrun started us (NCCL on GPUs, gloo on CPU), and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec)
    if world <= 1:
        return Dist(0, 0, 1, device)

    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise GptcliError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                "use --nproc_per_node at most the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise GptcliError(
            f"torchrun with device {device.type!r} is not supported: use CUDA GPUs or --device cpu"
        )
    dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
    return Dist(rank, local_rank, world, device, control)


class StopRequest:
    """The first SIGINT (Ctrl-C), SIGTERM or SIGHUP (a closed terminal, a dropped SSH connection) asks
    the loop to save and stop after the current step.

    In a single process a second Ctrl-C stops at once. Under torchrun repeats are ignored: a Ctrl-C
    reaches each worker twice (from the terminal, then forwarded by torchrun), and the workers still
    have to agree on a step and write the checkpoint; torchrun kills them if they take too long.
    """

    def __init__(self, *, under_torchrun: bool = False) -> None:
        self.requested = False
        self.under_torchrun = under_torchrun
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT and not self.under_torchrun:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
                if sig is None:  # Windows has no SIGHUP
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
