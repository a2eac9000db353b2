"""Input shards that arrive while merging: fetch one ahead of the reader, drop each after its last read.

The executor reads base shards in plan order. `InputSchedule` derives from that order alone when
each file is first needed and after which tensor it is never read again. `Prefetcher` follows it:
it makes the next file available while the current one is being read and, with --low-disk, evicts
a file this run downloaded as soon as its last tensor has been read, and fetches ahead only while
fewer than two downloaded files are on disk. So at most two input shards are held, unless the plan
itself reads from more files at once (output tensors are name-sorted within a shard, which can
interleave input shards). `estimate_disk` replays the same policy (`may_fetch`) so `plan` prints the
peak disk use before a byte is downloaded.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import ExecutionError
from ..options import format_size


@dataclass(frozen=True)
class InputSchedule:
    """Files in order of first use, and the index of the last tensor that reads each of them."""

    order: tuple[str, ...]
    last: Mapping[str, int]

    @classmethod
    def of(cls, files: Sequence[str]) -> "InputSchedule":
        """`files[i]` is the input file tensor i (in read order) comes from."""
        order: dict[str, None] = {}
        last: dict[str, int] = {}
        for i, f in enumerate(files):
            order.setdefault(f, None)
            last[f] = i
        return cls(tuple(order), last)


HELD_AHEAD = 2  # with --low-disk, fetch ahead only while fewer downloaded files than this are on disk


def may_fetch(j: int, wanted: int, held: int, low_disk: bool) -> bool:
    """Whether file j (in first-use order) may be fetched now: the reader wants it (j <= wanted), or it
    is the next one and, with --low-disk, fewer than HELD_AHEAD downloaded files are on disk."""
    return j <= wanted or (j == wanted + 1 and (not low_disk or held < HELD_AHEAD))


@dataclass(frozen=True)
class DiskEstimate:
    output: int  # bytes of output shards the folder holds at the end
    downloads: int  # input bytes this run downloads
    cached: int  # input bytes used in place from the cache
    peak_input: int  # most downloaded input bytes held at once
    peak_output: int  # most output bytes on disk at once
    peak: int  # most bytes added to disk at once (output so far + downloaded input held)
    low_disk: bool

    def lines(self) -> list[str]:
        if not self.downloads:
            return [f"download:   nothing, all {format_size(self.cached)} of base shards are in the Hugging Face cache"]
        how = "evicted once merged (--low-disk)" if self.low_disk else "kept in the cache (--low-disk evicts them)"
        return [
            f"download:   {format_size(self.downloads)} of base shards, one ahead of the merge, {how}"
            + (f"; {format_size(self.cached)} already cached, used in place" if self.cached else ""),
            f"peak disk:  {format_size(self.peak)} (output so far + {format_size(self.peak_input)} of input shards at most)",
        ]


def estimate_disk(
    tensor_files: Sequence[str],
    shard_of_tensor: Sequence[int],
    shard_sizes: Sequence[int],
    file_sizes: Mapping[str, int],
    downloaded: set[str],
    *,
    low_disk: bool,
    streaming_push: bool = False,
) -> DiskEstimate:
    """Replay the Prefetcher's policy tensor by tensor (fetching as early as it may, the worst case for
    disk); output shards count in full from when they open (the writer reserves them), and with a
    streaming push only the current one and the one being uploaded stay."""
    schedule = InputSchedule.of(tensor_files)
    order = schedule.order
    position = {f: i for i, f in enumerate(order)}
    wanted, ready = -1, -1  # furthest file asked for / made available, as indices into `order`
    held: set[str] = set()
    peak = peak_input = peak_output = 0

    def advance() -> None:
        nonlocal ready
        while ready + 1 < len(order) and may_fetch(ready + 1, wanted, len(held), low_disk):
            ready += 1
            if order[ready] in downloaded:
                held.add(order[ready])

    for i, f in enumerate(tensor_files):
        s = shard_of_tensor[i]
        out = shard_sizes[s] + (shard_sizes[s - 1] if s else 0) if streaming_push else sum(shard_sizes[: s + 1])
        wanted = max(wanted, position[f])
        advance()
        held_bytes = sum(file_sizes[g] for g in held)
        peak, peak_input, peak_output = max(peak, out + held_bytes), max(peak_input, held_bytes), max(peak_output, out)
        if low_disk and schedule.last[f] == i:
            held.discard(f)
            advance()
            held_bytes = sum(file_sizes[g] for g in held)
            peak, peak_input = max(peak, out + held_bytes), max(peak_input, held_bytes)
    return DiskEstimate(
        output=0 if streaming_push else sum(shard_sizes),
        downloads=sum(file_sizes[f] for f in schedule.order if f in downloaded),
        cached=sum(file_sizes[f] for f in schedule.order if f not in downloaded),
        peak_input=peak_input,
        peak_output=peak_output,
        peak=peak,
        low_disk=low_disk,
    )


class Prefetcher:
    """The executor's view of input files that may not exist yet (see execute.InputFiles).

    `fetch(path)` makes a missing file exist (downloads it); `evict(path)` removes one we fetched.
    A file that already exists when its turn comes is used in place and never evicted.
    """

    def __init__(self, fetch: Callable[[Path], None], evict: Callable[[Path], None], *, low_disk: bool):
        self._fetch = fetch
        self._evict = evict
        self.low_disk = low_disk
        self._cond = threading.Condition()
        self._order: tuple[str, ...] = ()
        self._position: dict[str, int] = {}
        self._wanted = -1  # furthest file (in order) the reader has asked for
        self._ready: set[str] = set()
        self._ours: set[str] = set()  # fetched by this run and still on disk
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.fetched: list[str] = []  # every file fetched, in order (for reports and tests)
        self.evicted: list[str] = []

    def begin(self, files: Sequence[str]) -> None:
        """`files`: the input file of every tensor the run will read, in read order."""
        self._order = InputSchedule.of(files).order
        self._position = {f: i for i, f in enumerate(self._order)}
        self._thread = threading.Thread(target=self._run, name="streammerge-fetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for j, name in enumerate(self._order):
            with self._cond:
                while not self._closed and not may_fetch(j, self._wanted, len(self._ours), self.low_disk):
                    self._cond.wait()
                if self._closed:
                    return
            path = Path(name)
            try:
                if not path.exists():
                    self._fetch(path)
                    with self._cond:
                        self._ours.add(name)
                        self.fetched.append(name)
            except BaseException as exc:  # handed to the reader by acquire()
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self._ready.add(name)
                self._cond.notify_all()

    def acquire(self, path: str, cancelled: threading.Event) -> None:
        """Block until `path` can be read (returns early if `cancelled` is set)."""
        with self._cond:
            if path not in self._position:
                raise ExecutionError(f"internal error: {path} is not in the input schedule")
            self._wanted = max(self._wanted, self._position[path])
            self._cond.notify_all()
            while path not in self._ready:
                if self._error is not None:
                    raise self._error
                if cancelled.is_set() or self._closed:
                    return
                self._cond.wait(0.1)

    def release(self, path: str) -> None:
        """No tensor reads `path` again: with --low-disk, a file we fetched is removed now."""
        with self._cond:
            mine = self.low_disk and path in self._ours
            if mine:
                self._ours.discard(path)
        if mine:
            self._evict(Path(path))
            with self._cond:
                self.evicted.append(path)
                self._cond.notify_all()  # room to fetch ahead again

    def end(self, wait: float = 5.0) -> None:
        """Stop fetching; with --low-disk also remove what we fetched and still hold (a failed run)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(wait)
        if self.low_disk:
            with self._cond:
                left, self._ours = sorted(self._ours), set()
            for name in left:
                self._evict(Path(name))
                self.evicted.append(name)
