"""The executor: stream every output tensor of a plan through read -> compute -> write.

Three stages overlap: a reader thread fills a fixed pool of buffers with positioned reads, the
calling thread does the math (on CPU or CUDA), and a writer thread appends bytes to the output
shard. The pool and two bounded queues are the memory budget: chunk sizes are chosen so that
everything in flight fits `--max-memory`.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import ops
from .errors import ExecutionError, OutputError, PlanError
from .io.safetensors import ITEMSIZE, TORCH_NAME, ShardWriter, build_header, pread_exact, release_cache, TensorSpec
from .options import format_size
from .planner import SHARD_METADATA, LoraTerm, MergePlan, OutputShard, OutputTensor

READ_BUFFERS = 3  # buffers in the read pool (one being read, one queued, one being computed on)
WRITE_QUEUE = 1  # finished chunks waiting for the writer (plus the one being written)


def torch_dtype(safetensors_dtype: str) -> torch.dtype:
    return getattr(torch, TORCH_NAME[safetensors_dtype])


# ------------------------------------------------------------------------------- chunk planning


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


def _rows_and_width(shape: tuple[int, ...]) -> tuple[int, int]:
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def _merge_fixed_bytes(tensor: OutputTensor) -> int:
    """Resident for the whole tensor: raw A and B with their float32 copies, and two float32 tiles."""
    total = 2 * 4 * max(ops.TILE_ELEMENTS, _rows_and_width(tensor.shape)[1])
    for term in tensor.loras:
        for src in (term.a, term.b):
            total += math.prod(src.shape) * (ITEMSIZE[src.dtype] + 4)
    return total


def memory_per_row(tensor: OutputTensor) -> tuple[int, int]:
    """(fixed bytes for the tensor, bytes per row in flight) under the pipeline's depth."""
    _, width = _rows_and_width(tensor.shape)
    in_size, out_size = ITEMSIZE[tensor.source.dtype], ITEMSIZE[tensor.dtype]
    if tensor.op == "copy":
        return 0, width * in_size * READ_BUFFERS
    if tensor.op == "cast":
        return 0, width * (in_size * READ_BUFFERS + out_size * (WRITE_QUEUE + 2))
    return _merge_fixed_bytes(tensor), width * (in_size * READ_BUFFERS + out_size * (WRITE_QUEUE + 2))


def minimum_budget(plan: MergePlan) -> int:
    return max((sum(memory_per_row(t)) for t in plan.tensors), default=0)


def check_budget(plan: MergePlan) -> None:
    need = minimum_budget(plan)
    if plan.options.max_memory < need:
        widest = max(plan.tensors, key=lambda t: sum(memory_per_row(t)))
        raise PlanError(
            f"--max-memory {format_size(plan.options.max_memory)} is too small to hold one row of "
            f"{widest.name} {list(widest.shape)}; use at least --max-memory {math.ceil(need / 1e6)}MB"
        )


def chunks_of(tensor: OutputTensor, budget: int, max_rows: int | None) -> Iterator[Chunk]:
    rows, width = _rows_and_width(tensor.shape)
    if rows == 0 or width == 0:
        yield Chunk(tensor, 0, 0, True, True)  # an empty tensor still completes
        return
    fixed, per_row = memory_per_row(tensor)
    step = max(1, (budget - fixed) // max(per_row, 1))
    if max_rows is not None:
        step = min(step, max_rows)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        yield Chunk(tensor, start, stop, start == 0, stop == rows)


# ------------------------------------------------------------------------------------ pipeline


class _Stop(Exception):
    """Raised inside a stage when another stage failed or the run was cancelled."""


class BufferPool:
    """A fixed number of reusable byte buffers; `take` blocks until one is free (that is the budget)."""

    def __init__(self, count: int, cancelled: threading.Event):
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(count):
            self._free.put(bytearray(0))
        self._cancelled = cancelled

    def take(self, size: int) -> bytearray:
        while True:
            try:
                buf = self._free.get(timeout=0.1)
                break
            except queue.Empty:
                if self._cancelled.is_set():
                    raise _Stop from None
        if len(buf) < size:
            buf = bytearray(size)  # grow: the old buffer is released here
        return buf

    def give(self, buf: bytearray) -> None:
        self._free.put(buf)


def _put(q: queue.Queue, item, cancelled: threading.Event) -> None:
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if cancelled.is_set():
                raise _Stop from None


def _get(q: queue.Queue, cancelled: threading.Event):
    while True:
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
    """Runs a validated plan into `out_dir`; shards appear only once complete (`.partial` + rename)."""

    def __init__(
        self,
        plan: MergePlan,
        out_dir: Path,
        *,
        device: torch.device,
        progress: bool = False,
        on_tensor_done: Callable[[OutputTensor], None] | None = None,
        skip_shards: set[str] | None = None,
    ):
        self.plan = plan
        self.out_dir = out_dir
        self.device = device
        self.progress = progress
        self.on_tensor_done = on_tensor_done
        self.skip_shards = skip_shards or set()
        self._cancelled = threading.Event()
        self._errors: list[BaseException] = []
        self._fds: dict[str, int] = {}

    # -- stage helpers

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise ExecutionError(f"cannot open {path}: {exc.strerror or exc}") from None
            self._fds[path] = fd
        return fd

    def _chunks(self) -> Iterator[tuple[OutputShard, Chunk | None]]:
        for shard in self.plan.shards:
            if shard.filename in self.skip_shards:
                continue
            yield shard, None  # open marker
            for tensor in shard.tensors:
                yield from ((shard, c) for c in chunks_of(tensor, self.plan.options.max_memory, self.plan.options.max_chunk_rows))

    def _read_range(self, chunk: Chunk) -> tuple[int, int]:
        src = chunk.tensor.source
        _, width = _rows_and_width(src.shape)
        row_bytes = width * ITEMSIZE[src.dtype]
        return src.start + chunk.row_start * row_bytes, chunk.rows * row_bytes

    def _reader(self, pool: BufferPool, out_q: queue.Queue) -> None:
        try:
            for shard, chunk in self._chunks():
                if chunk is None:
                    _put(out_q, (shard, None, None, 0), self._cancelled)
                    continue
                offset, length = self._read_range(chunk)
                buf = pool.take(length)
                fd = self._fd(chunk.tensor.source.file)
                pread_exact(fd, memoryview(buf)[:length], offset, chunk.tensor.source.file)
                release_cache(fd, offset, length)
                _put(out_q, (shard, chunk, buf, length), self._cancelled)
            _put(out_q, None, self._cancelled)
        except _Stop:
            pass
        except BaseException as exc:  # surfaced by the main thread
            self._errors.append(exc)
            self._cancelled.set()

    def _writer(self, in_q: queue.Queue, stats: RunStats, bar) -> None:
        writer: ShardWriter | None = None
        try:
            while True:
                item = _get(in_q, self._cancelled)
                if item is None:
                    break
                kind = item[0]
                if kind == "open":
                    shard: OutputShard = item[1]
                    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in shard.tensors]
                    header, _ = build_header(specs, SHARD_METADATA)
                    writer = ShardWriter(self.out_dir / shard.filename, header, shard.size)
                    if bar is not None:
                        bar.update(len(header))
                elif kind == "data":
                    _, data, release = item
                    writer.write(data)
                    if bar is not None:
                        bar.update(len(data))
                    stats.bytes_written += len(data)
                    if release is not None:
                        release()
                elif kind == "tensor":
                    stats.tensors_done += 1
                    if self.on_tensor_done is not None:
                        self.on_tensor_done(item[1])
                elif kind == "close":
                    shard = item[1]
                    sha = writer.commit()
                    stats.shards.append(ShardResult(shard.filename, shard.size, sha))
                    writer = None
        except _Stop:
            pass
        except OSError as exc:
            self._errors.append(OutputError(f"writing {self.out_dir}: {exc.strerror or exc}"))
            self._cancelled.set()
        except BaseException as exc:
            self._errors.append(exc)
            self._cancelled.set()
        finally:
            if writer is not None:
                writer.close()

    # -- compute (calling thread)

    def _load_factors(self, tensor: OutputTensor) -> list[ops.LoraTermF32]:
        factors = []
        for term in tensor.loras:
            pair = []
            for src in (term.a, term.b):
                buf = bytearray(src.end - src.start)
                pread_exact(self._fd(src.file), memoryview(buf), src.start, src.file)
                pair.append(torch.frombuffer(buf, dtype=torch_dtype(src.dtype)).reshape(src.shape) if buf else torch.empty(src.shape, dtype=torch_dtype(src.dtype)))
            factors.append(ops.lora_term(pair[0], pair[1], term.factor, term.transpose, self.device))
        return factors

    def _compute(self, chunk: Chunk, buf: bytearray, length: int, factors) -> torch.Tensor | None:
        tensor = chunk.tensor
        if tensor.op == "copy":
            return None
        src_dtype = torch_dtype(tensor.source.dtype)
        rows, width = chunk.rows, _rows_and_width(tensor.shape)[1]
        base = torch.frombuffer(buf, dtype=torch.uint8, count=length).view(src_dtype).reshape(rows, width)
        if self.device.type != "cpu":
            base = base.to(self.device)
        out_dtype = torch_dtype(tensor.dtype)
        if tensor.op == "cast":
            result = ops.cast(base, out_dtype)
        else:
            result = ops.merge_rows(base, factors, chunk.row_start, out_dtype)
        return result.cpu() if result.device.type != "cpu" else result

    def run(self) -> RunStats:
        stats = RunStats()
        start = time.perf_counter()
        pool = BufferPool(READ_BUFFERS, self._cancelled)
        read_q: queue.Queue = queue.Queue(maxsize=1)
        write_q: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        bar = None
        if self.progress:
            from tqdm import tqdm

            total = sum(s.size for s in self.plan.shards if s.filename not in self.skip_shards)
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="merging", file=sys.stderr, dynamic_ncols=True)
        reader = threading.Thread(target=self._reader, args=(pool, read_q), name="streammerge-read", daemon=True)
        writer = threading.Thread(target=self._writer, args=(write_q, stats, bar), name="streammerge-write", daemon=True)
        reader.start()
        writer.start()
        current_shard: OutputShard | None = None
        factors = None
        try:
            while True:
                item = _get(read_q, self._cancelled)
                if item is None:
                    break
                shard, chunk, buf, length = item
                if chunk is None:
                    if current_shard is not None:
                        _put(write_q, ("close", current_shard), self._cancelled)
                    current_shard = shard
                    _put(write_q, ("open", shard), self._cancelled)
                    continue
                if chunk.first and chunk.tensor.op == "merge":
                    factors = self._load_factors(chunk.tensor)
                result = self._compute(chunk, buf, length, factors)
                if result is None:  # a byte copy: hand the read buffer itself to the writer
                    _put(write_q, ("data", memoryview(buf)[:length], lambda b=buf: pool.give(b)), self._cancelled)
                else:
                    pool.give(buf)
                    data = result.contiguous().view(torch.uint8).numpy()
                    _put(write_q, ("data", memoryview(data), None), self._cancelled)
                if chunk.last:
                    factors = None
                    _put(write_q, ("tensor", chunk.tensor), self._cancelled)
            if current_shard is not None:
                _put(write_q, ("close", current_shard), self._cancelled)
            _put(write_q, None, self._cancelled)
            writer.join()
        except _Stop:
            pass
        except BaseException:
            self._cancelled.set()
            raise
        finally:
            if self._errors or sys.exc_info()[0] is not None:
                self._cancelled.set()
            reader.join()
            writer.join()
            if bar is not None:
                bar.close()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        if self._errors:
            raise self._errors[0]
        stats.seconds = time.perf_counter() - start
        return stats
