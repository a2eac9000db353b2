"""The executor: stream every output tensor of a plan through read -> compute -> write.

Three stages overlap: a reader thread fills buffers with positioned reads, the calling thread does
the math (CPU or CUDA) into output buffers, and a writer thread appends them to the output shard.
All tensor data lives in two fixed pools of buffers allocated once (plus a float32 tile workspace
and the LoRA factors of the tensor in flight), so the budget is what is resident, not an estimate.
"""

from __future__ import annotations

import ctypes
import math
import os
import queue
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping

import torch

from . import ops
from .errors import DiskFullError, ExecutionError, Interrupted, OutputError, PlanError
from .io.safetensors import DISK_FULL_ERRNOS, ITEMSIZE, TORCH_NAME, ShardWriter, TensorSpec, build_header, pread_exact, release_cache
from .options import format_size
from .planner import SHARD_METADATA, MergePlan, OutputShard, OutputTensor

READ_BUFFERS = 3  # one being read, one queued, one being computed on (or written, for copies)
WRITE_BUFFERS = 2  # one being filled by the math, one being written


def torch_dtype(safetensors_dtype: str) -> torch.dtype:
    return getattr(torch, TORCH_NAME[safetensors_dtype])


def _rows_and_width(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:])) if shape else (1, 1)


# --------------------------------------------------------------------------------- memory layout


@dataclass(frozen=True)
class Layout:
    """How the `--max-memory` budget is spent: buffer sizes fixed before the first read."""

    buffer_bytes: int  # each read and write buffer
    tile_elements: int  # float32 elements per tile (two tiles)
    factor_bytes: int  # the largest tensor's LoRA factors, raw and float32

    @property
    def total(self) -> int:
        return (READ_BUFFERS + WRITE_BUFFERS) * self.buffer_bytes + 8 * self.tile_elements + self.factor_bytes


def _factor_bytes(tensor: OutputTensor) -> int:
    return sum(math.prod(s.shape) * (ITEMSIZE[s.dtype] + 4) for term in tensor.loras for s in (term.a, term.b))


def _row_bytes(tensor: OutputTensor) -> int:
    width = _rows_and_width(tensor.shape)[1]
    return width * max(ITEMSIZE[tensor.source.dtype], ITEMSIZE[tensor.dtype])


def plan_layout(plan: MergePlan) -> Layout:
    merges = [t for t in plan.tensors if t.op == "merge"]
    tile = max([ops.TILE_ELEMENTS] + [_rows_and_width(t.shape)[1] for t in merges]) if merges else 0
    factors = max((_factor_bytes(t) for t in merges), default=0)
    widest = max((_row_bytes(t) for t in plan.tensors), default=1)
    largest = max((_rows_and_width(t.shape)[0] * _row_bytes(t) for t in plan.tensors), default=1)
    fixed = 8 * tile + factors
    buffer_bytes = (plan.options.max_memory - fixed) // (READ_BUFFERS + WRITE_BUFFERS)
    if buffer_bytes < widest:
        need = fixed + (READ_BUFFERS + WRITE_BUFFERS) * widest
        raise PlanError(
            f"--max-memory {format_size(plan.options.max_memory)} is too small: one row of the widest tensor "
            f"needs {format_size(widest)} in each of {READ_BUFFERS + WRITE_BUFFERS} buffers; "
            f"use at least --max-memory {math.ceil(need / 1e6)}MB"
        )
    return Layout(min(buffer_bytes, max(largest, 1)), tile, factors)


@dataclass(frozen=True)
class Chunk:
    tensor: OutputTensor
    row_start: int
    row_stop: int
    first: bool
    last: bool

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start


def chunks_of(tensor: OutputTensor, layout: Layout, max_rows: int | None) -> Iterator[Chunk]:
    rows, width = _rows_and_width(tensor.shape)
    if rows == 0 or width == 0:
        yield Chunk(tensor, 0, 0, True, True)  # an empty tensor still completes
        return
    step = max(1, layout.buffer_bytes // _row_bytes(tensor))
    if max_rows is not None:
        step = min(step, max_rows)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        yield Chunk(tensor, start, stop, start == 0, stop == rows)


def _fix_malloc_threshold() -> None:
    """glibc raises its mmap threshold after large frees, after which freed buffers stay resident;
    a fixed threshold keeps big allocations in mmap so that freeing them returns the memory."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------ pipeline


class _Stop(Exception):
    """Raised inside a stage when another stage failed or the run was cancelled."""


class _Pool:
    """Buffers allocated once; `take` blocks until one is free, which is what bounds memory."""

    def __init__(self, count: int, size: int, cancelled: threading.Event):
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(count):
            self._free.put(bytearray(size))
        self._cancelled = cancelled

    def take(self) -> bytearray:
        return _get(self._free, self._cancelled)

    def give(self, buf: bytearray) -> None:
        self._free.put(buf)


def _put(q: queue.Queue, item, cancelled: threading.Event) -> None:
    while True:
        if cancelled.is_set():  # checked first: a flowing pipeline must stop promptly too
            raise _Stop
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if cancelled.is_set():
                raise _Stop from None


def _get(q: queue.Queue, cancelled: threading.Event):
    while True:
        if cancelled.is_set():
            raise _Stop
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if cancelled.is_set():
                raise _Stop from None


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ExecutionError(f"--device {name} was asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)


class Executor:
    """Runs a validated plan into `out_dir`; shards appear only once complete (`.partial` + rename).

    Resuming: shards named in `skip` are already complete; a shard in `resume` (an object with
    `offset`, `done`, `sha256`) continues after its first `done` tensors; shards in `hold` are
    fsynced but left as NAME.partial for the caller to rename last. `on_tensor_done(shard, tensor,
    crc32)` runs (writer thread) once a tensor's bytes are written; `on_shard_done(filename, size,
    sha256)` once a shard is committed. `cancel_event` (or `cancel()`) stops the run promptly.
    """

    def __init__(
        self,
        plan: MergePlan,
        out_dir: Path,
        *,
        device: torch.device,
        progress: bool = False,
        on_tensor_done: Callable[[OutputShard, OutputTensor, int], None] | None = None,
        on_shard_done: Callable[[str, int, str], None] | None = None,
        skip: Collection[str] = (),
        resume: Mapping[str, Any] | None = None,
        hold: Collection[str] = (),
        cancel_event: threading.Event | None = None,
    ):
        self.plan = plan
        self.out_dir = out_dir
        self.device = device
        self.progress = progress
        self.on_tensor_done = on_tensor_done
        self.on_shard_done = on_shard_done
        self.skip = frozenset(skip)
        self.resume = dict(resume or {})
        self.hold = frozenset(hold)
        self.layout = plan_layout(plan)
        self._cancelled = cancel_event if cancel_event is not None else threading.Event()
        self._errors: list[BaseException] = []
        self._fds: dict[str, int] = {}
        self._finished = False

    def cancel(self) -> None:
        self._cancelled.set()

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise ExecutionError(f"cannot open {path}: {exc.strerror or exc}") from None
            self._fds[path] = fd
        return fd

    def _fail(self, exc: BaseException) -> None:
        self._errors.append(exc)
        self._cancelled.set()

    # -- reader thread: positioned reads into the read pool

    def _reader(self, pool: _Pool, out_q: queue.Queue) -> None:
        try:
            for shard in self.plan.shards:
                if shard.filename in self.skip:
                    continue
                point = self.resume.get(shard.filename)
                _put(out_q, ("open", shard, point), self._cancelled)
                for tensor in shard.tensors[point.done if point is not None else 0:]:
                    src = tensor.source
                    row_bytes = _rows_and_width(src.shape)[1] * ITEMSIZE[src.dtype]
                    for chunk in chunks_of(tensor, self.layout, self.plan.options.max_chunk_rows):
                        offset, length = src.start + chunk.row_start * row_bytes, chunk.rows * row_bytes
                        buf = pool.take()
                        fd = self._fd(src.file)
                        pread_exact(fd, memoryview(buf)[:length], offset, src.file)
                        release_cache(fd, offset, length)
                        _put(out_q, ("chunk", chunk, buf, length), self._cancelled)
                _put(out_q, ("close", shard), self._cancelled)
            _put(out_q, None, self._cancelled)
        except _Stop:
            pass
        except BaseException as exc:
            self._fail(exc)

    # -- writer thread: sequential appends, sha256 on the fly, commit by rename

    def _writer(self, in_q: queue.Queue, stats: RunStats, bar) -> None:
        writer: ShardWriter | None = None
        shard: OutputShard | None = None
        try:
            while (item := _get(in_q, self._cancelled)) is not None:
                kind = item[0]
                if kind == "open":
                    shard, point = item[1], item[2]
                    header, _ = build_header([TensorSpec(t.name, t.dtype, t.shape) for t in shard.tensors], SHARD_METADATA)
                    path = self.out_dir / shard.filename
                    if point is None:
                        writer = ShardWriter(path, header, shard.size)
                    else:
                        writer = ShardWriter(path, header, shard.size, resume_at=point.offset, prefix_hash=point.sha256.copy())
                    if bar is not None:
                        bar.update(writer.position)
                elif kind == "data":
                    _, data, release = item
                    writer.write(data)
                    release()
                    stats.bytes_written += len(data)
                    if bar is not None:
                        bar.update(len(data))
                elif kind == "tensor":
                    stats.tensors_done += 1
                    if self.on_tensor_done is not None:
                        self.on_tensor_done(shard, item[1], item[2])
                elif kind == "close":
                    sha = writer.commit(rename=item[1].filename not in self.hold)
                    writer = None
                    stats.shards.append(ShardResult(item[1].filename, item[1].size, sha))
                    if self.on_shard_done is not None:
                        self.on_shard_done(item[1].filename, item[1].size, sha)
            self._finished = True
        except _Stop:
            pass
        except OSError as exc:
            cls = DiskFullError if exc.errno in DISK_FULL_ERRNOS else OutputError
            self._fail(cls(f"writing {self.out_dir}: {exc.strerror or exc}"))
        except BaseException as exc:
            self._fail(exc)
        finally:
            if writer is not None:
                writer.close(sync=True)  # what was written stays, for the next run to verify and keep

    # -- compute (calling thread)

    def _load_factors(self, tensor: OutputTensor) -> list[ops.LoraTermF32]:
        terms = []
        for term in tensor.loras:
            pair = []
            for src in (term.a, term.b):
                buf = bytearray(src.end - src.start)
                pread_exact(self._fd(src.file), memoryview(buf), src.start, src.file)
                pair.append(torch.frombuffer(buf, dtype=torch_dtype(src.dtype)).reshape(src.shape))
            terms.append(ops.lora_term(pair[0], pair[1], term.factor, term.transpose, self.device))
        return terms

    def _compute_into(self, chunk: Chunk, buf: bytearray, length: int, out_buf: bytearray, terms, tiles) -> int:
        """Math for one chunk, written into `out_buf`; returns the number of output bytes."""
        tensor = chunk.tensor
        width = _rows_and_width(tensor.shape)[1]
        base = torch.frombuffer(buf, dtype=torch.uint8, count=length).view(torch_dtype(tensor.source.dtype))
        base = base.reshape(chunk.rows, width)
        out_dtype = torch_dtype(tensor.dtype)
        out_len = chunk.rows * width * ITEMSIZE[tensor.dtype]
        out = torch.frombuffer(out_buf, dtype=torch.uint8, count=out_len).view(out_dtype).reshape(chunk.rows, width)
        on_device = self.device.type != "cpu"
        if tensor.op == "cast":
            out.copy_(base)
        elif on_device:
            out.copy_(ops.merge_rows(base.to(self.device), terms, chunk.row_start, out_dtype, tiles=tiles))
        else:
            ops.merge_rows(base, terms, chunk.row_start, out_dtype, tiles=tiles, out=out)
        return out_len

    def run(self) -> RunStats:
        if self._cancelled.is_set():
            raise Interrupted("interrupted before the first tensor")
        _fix_malloc_threshold()
        stats = RunStats()
        start = time.perf_counter()
        size = self.layout.buffer_bytes
        read_pool = _Pool(READ_BUFFERS, size, self._cancelled)
        write_pool = _Pool(WRITE_BUFFERS, size, self._cancelled) if any(t.op != "copy" for t in self.plan.tensors) else None
        tiles = ops.Tiles.allocate(self.layout.tile_elements, self.device) if self.layout.tile_elements else None
        read_q: queue.Queue = queue.Queue(maxsize=1)
        write_q: queue.Queue = queue.Queue(maxsize=WRITE_BUFFERS)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.plan.file_bytes, initial=sum(s.size for s in self.plan.shards if s.filename in self.skip), unit="B", unit_scale=True, unit_divisor=1000, desc="merging",
                       file=sys.stderr, dynamic_ncols=True)
        reader = threading.Thread(target=self._reader, args=(read_pool, read_q), name="streammerge-read", daemon=True)
        writer = threading.Thread(target=self._writer, args=(write_q, stats, bar), name="streammerge-write", daemon=True)
        reader.start()
        writer.start()
        terms = None
        crc = 0  # crc32 of the tensor's output bytes, for the journal: computed here, in chunk order, so
        # that the writer thread (already hashing the shard with sha256) is not slowed down by it
        try:
            while (item := _get(read_q, self._cancelled)) is not None:
                if item[0] != "chunk":
                    _put(write_q, item, self._cancelled)  # open / close markers pass through in order
                    continue
                _, chunk, buf, length = item
                if chunk.tensor.op == "copy":  # bytes as they are: hand the read buffer to the writer
                    crc = zlib.crc32(memoryview(buf)[:length], crc)
                    _put(write_q, ("data", memoryview(buf)[:length], lambda b=buf: read_pool.give(b)), self._cancelled)
                else:
                    if chunk.first and chunk.tensor.op == "merge":
                        terms = self._load_factors(chunk.tensor)
                    out_buf = write_pool.take()
                    out_len = self._compute_into(chunk, buf, length, out_buf, terms, tiles)
                    read_pool.give(buf)
                    crc = zlib.crc32(memoryview(out_buf)[:out_len], crc)
                    _put(write_q, ("data", memoryview(out_buf)[:out_len], lambda b=out_buf: write_pool.give(b)), self._cancelled)
                if chunk.last:
                    terms = None
                    _put(write_q, ("tensor", chunk.tensor, crc), self._cancelled)
                    crc = 0
            _put(write_q, None, self._cancelled)
        except _Stop:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            reader.join()
            writer.join()
            if bar is not None:
                bar.close()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        if self._errors:
            raise self._errors[0]
        if not self._finished:
            raise Interrupted(f"interrupted after {stats.tensors_done} more tensor(s)")
        stats.seconds = time.perf_counter() - start
        return stats
