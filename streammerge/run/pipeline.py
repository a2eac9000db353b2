"""The plumbing of the executor's threads: buffer pools that bound memory, cancellable queues,
the protocols of what a run reads (inputs that may still be downloading) and resumes from.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Protocol, Sequence

import torch

from ..errors import ExecutionError
from ..planning.types import MergePlan, OutputShard

def fix_malloc_threshold() -> None:
    """glibc raises its mmap threshold after large frees, after which freed buffers stay resident;
    a fixed threshold keeps big allocations in mmap so that freeing them returns the memory."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class Stop(Exception):
    """Raised inside a stage when another stage failed or the run was cancelled."""


class Pool:
    """Buffers allocated once; `take` blocks until one is free, which is what bounds memory.

    With `pinned`, the buffers are page-locked (CUDA host memory), exposed as numpy arrays so that
    preads and `torch.frombuffer` treat them like bytearrays while copies to the device run async.
    """

    def __init__(self, count: int, size: int, cancelled: threading.Event, pinned: bool = False):
        self._free: queue.Queue = queue.Queue()
        self._keep: list[torch.Tensor] = []
        for _ in range(count):
            if pinned:
                t = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=True)
                self._keep.append(t)
                self._free.put(t.numpy())
            else:
                self._free.put(bytearray(size))
        self._cancelled = cancelled

    def take(self) -> bytearray:
        return _get(self._free, self._cancelled)

    def give(self, buf: bytearray) -> None:
        self._free.put(buf)


def _put(q: queue.Queue, item, cancelled: threading.Event) -> None:
    while True:
        if cancelled.is_set():  # checked first: a flowing pipeline must stop promptly too
            raise Stop
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if cancelled.is_set():
                raise Stop from None


def _get(q: queue.Queue, cancelled: threading.Event):
    while True:
        if cancelled.is_set():
            raise Stop
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if cancelled.is_set():
                raise Stop from None


@dataclass
class ShardResult:
    filename: str
    size: int
    sha256: str


@dataclass
class RunStats:
    seconds: float = 0.0
    bytes_written: int = 0
    tensors_done: int = 0
    shards: list[ShardResult] = field(default_factory=list)


class InputFiles(Protocol):
    """Input files that may not exist yet (a Hub base downloaded while merging, io/fetch.py).

    `begin` and the reader's last-read map must cover exactly the tensors the reader reads: a run
    that skips finished tensors (resume) leaves them out of both, and then only the shards the
    remaining tensors need are fetched.
    """

    def begin(self, files: Sequence[str]) -> None:
        """The input file of every tensor the run will read, in read order."""

    def acquire(self, path: str, cancelled: threading.Event) -> None:
        """Block until `path` can be read (or `cancelled` is set)."""

    def release(self, path: str) -> None:
        """No tensor of this run reads `path` again."""

    def end(self) -> None:
        """The run is over (finished or failed)."""


class Resume(Protocol):
    """What an interrupted run left that this one keeps (built and verified by journal.verify)."""

    finished: Mapping[str, Any]  # shard filename -> a complete shard, left as it is
    partial: Mapping[str, Any]  # shard filename -> .offset, .done (tensors), .sha256 (hash of the prefix)
    layouts: Mapping[str, OutputShard]  # shard layouts as the interrupted run resolved them


def done_tensors(plan: MergePlan, resume: Resume | None) -> frozenset[str]:
    """Tensors an interrupted run finished: all of its finished shards, the verified prefix of a partial one."""
    if resume is None:
        return frozenset()
    return frozenset(
        t.name for s in plan.shards for t in (
            s.tensors if s.filename in resume.finished
            else s.tensors[: resume.partial[s.filename].done] if s.filename in resume.partial else ()
        )
    )


def tensors_in(plan: MergePlan, shards: Collection[str]) -> frozenset[str]:
    """The tensors of these shards (another partition's, which this run leaves alone)."""
    return frozenset(t.name for s in plan.shards if s.filename in shards for t in s.tensors)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ExecutionError(f"--device {name} was asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)
