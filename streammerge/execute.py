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
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Protocol, Sequence

import torch

from .console import terminal
from . import ops
from .errors import DiskFullError, ExecutionError, Interrupted, OutputError, PlanError
from .io.safetensors import DISK_FULL_ERRNOS, ITEMSIZE, TORCH_NAME, ShardWriter, TensorSpec, build_header, pread_exact, release_cache
from .options import format_size
from .planner import SHARD_METADATA, MergePlan, OutputShard, OutputTensor, Source, resize_shard
from .quant import stream as qs
from .terms import TensorMath, factor_bytes, needs_prepass

READ_BUFFERS = 4  # one being read, one queued, one being computed on, one written or hashed (copies)
WRITE_BUFFERS = 3  # one being filled by the math, one being written, one being hashed
WORK_BUFFERS = 1  # bitsandbytes chunks: the float32 rows and quantize_4bit's temporaries
QUANT_ROW_COST = 12  # bytes per element of a bitsandbytes chunk: float32 rows, scaled copy, int32 codes


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
    quant_bytes: int = 0  # the largest bitsandbytes per-tensor state (see quant.stream.state_bytes)
    work_buffers: int = 0  # WORK_BUFFERS when the plan has bitsandbytes tensors

    @property
    def total(self) -> int:
        return ((READ_BUFFERS + WRITE_BUFFERS + self.work_buffers) * self.buffer_bytes + 8 * self.tile_elements
                + self.factor_bytes + self.quant_bytes)


MATH_OPS = ("merge", "bias_add", "token_rows")  # ops computed in float32 from base + terms


def _factor_bytes(tensor: OutputTensor) -> int:
    return factor_bytes(tensor)


def is_passthrough(tensor: OutputTensor) -> bool:
    """Bytes written as read: a copy, or an adapter's full tensor already in the output dtype."""
    return tensor.op == "copy" or (tensor.op == "replace" and tensor.source.dtype == tensor.dtype)


def _row_bytes(tensor: OutputTensor) -> int:
    width = _rows_and_width(tensor.weight_shape)[1]
    if qs.involves_quant(tensor):
        return width * QUANT_ROW_COST
    return width * max(ITEMSIZE[tensor.source.dtype], ITEMSIZE[tensor.dtype])


def _streamed(plan: MergePlan) -> list[OutputTensor]:
    """Tensors whose source rows are streamed (a 4-bit output's statistic parts are derived instead)."""
    return [t for t in plan.tensors if t.quant_out is None or t.quant_out.part == "weight"]


def plan_layout(plan: MergePlan) -> Layout:
    streamed = _streamed(plan)
    merges = [t for t in streamed if t.op in MATH_OPS or t.loras or qs.involves_quant(t)]
    tile = max([ops.TILE_ELEMENTS] + [_rows_and_width(t.weight_shape)[1] for t in merges]) if merges else 0
    factors = max((_factor_bytes(t) for t in merges), default=0)
    quant = max((qs.state_bytes(t) for t in streamed), default=0)
    work = WORK_BUFFERS if any(qs.involves_quant(t) for t in streamed) else 0
    widest_tensor = max(streamed, key=lambda t: qs.row_alignment(t) * _row_bytes(t), default=None)
    widest = qs.row_alignment(widest_tensor) * _row_bytes(widest_tensor) if widest_tensor is not None else 1
    largest = max((_rows_and_width(t.weight_shape)[0] * _row_bytes(t) for t in streamed), default=1)
    fixed = 8 * tile + factors + quant
    count = READ_BUFFERS + WRITE_BUFFERS + work
    buffer_bytes = (plan.options.max_memory - fixed) // count
    if buffer_bytes < widest:
        need = fixed + count * widest
        raise PlanError(
            f"--max-memory {format_size(plan.options.max_memory)} is too small: one row (or 4-bit block row group) "
            f"of the widest tensor ({widest_tensor.name}) needs {format_size(widest)} in each of {count} buffers; "
            f"use at least --max-memory {math.ceil(need / 1e6)}MB"
        )
    return Layout(min(buffer_bytes, max(largest, 1)), tile, factors, quant, work)


@dataclass(frozen=True)
class Chunk:
    tensor: OutputTensor
    row_start: int
    row_stop: int
    first: bool
    last: bool
    # "write" | "prepass" (a first read of the rows for column-norm DoRA, nothing written) |
    # "stats" (4-bit output statistics) | "roundtrip" (its statistics)
    purpose: str = "write"

    @property
    def prepass(self) -> bool:
        return self.purpose == "prepass"

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start


def chunks_of(tensor: OutputTensor, layout: Layout, max_rows: int | None, purpose: str = "write") -> Iterator[Chunk]:
    """Row chunks that fit one buffer; with bitsandbytes formats, starting on whole 4-bit blocks
    (so `max_rows` is rounded down to the row alignment, and up to one alignment at least)."""
    rows, width = _rows_and_width(tensor.weight_shape)
    if rows == 0 or width == 0:
        yield Chunk(tensor, 0, 0, True, True, purpose)  # an empty tensor still completes
        return
    step = max(1, layout.buffer_bytes // _row_bytes(tensor))
    if max_rows is not None:
        step = min(step, max_rows)
    align = qs.row_alignment(tensor)
    step = max(align, step // align * align)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        yield Chunk(tensor, start, stop, start == 0, stop == rows, purpose)


@dataclass(frozen=True)
class Pass:
    """Stream the source rows of `tensor` once, for `purpose` (see Chunk.purpose)."""

    tensor: OutputTensor
    purpose: str


def _passes(tensor: OutputTensor, purpose: str) -> list[Pass]:
    """A pass for `purpose`, after the passes it depends on: the double-quant round trip's statistics,
    then (column-norm DoRA) a first read of every row for the column norms."""
    first = [Pass(tensor, "roundtrip")] if tensor.roundtrip is not None and tensor.roundtrip.double_quant else []
    if needs_prepass(tensor):
        first.append(Pass(tensor, "prepass"))
    return first + [Pass(tensor, purpose)]


def schedule(plan: MergePlan, done: Collection[str] = frozenset(), finished: Collection[str] = frozenset()) -> Iterator[tuple]:
    """The work in file order: ("open", shard) / ("pass", Pass) / ("part", tensor) / ("close", shard).

    A resumed run leaves out the shards in `finished` and the tensors in `done`; statistics passes
    still run where a remaining part (or the header of a reopened shard) needs them.

    A 4-bit output writes its statistics next to (often before) its packed bytes, and the
    double-quant quant-state JSON's length is data dependent; so a weight's statistics pass (the
    merged rows' block absmax only) runs where they are needed first: before the shard header for
    a double-quant JSON, before the absmax tensor otherwise. The absmax vector of the last pass is
    kept for the absmax part that (in safetensors' order) follows its weight; small statistics
    (JSON, nested absmax) are kept until written.
    """
    weights = {t.name: t for t in plan.tensors if t.quant_out is not None and t.quant_out.part == "weight"}
    known: set[str] = set()
    last: list[str | None] = [None]

    def stats(weight: str) -> Iterator[tuple]:
        for p in _passes(weights[weight], "stats"):
            yield ("pass", p)
        known.add(weight)
        last[0] = weight

    for shard in plan.shards:
        if shard.filename in finished:
            continue
        for t in shard.tensors:
            if t.quant_out is not None and not t.quant_out.exact_size and t.quant_out.weight not in known:
                yield from stats(t.quant_out.weight)
        yield ("open", shard)
        for t in shard.tensors:
            if t.name in done:
                continue
            qo = t.quant_out
            if qo is None or qo.part == "weight":
                for p in _passes(t, "write"):
                    yield ("pass", p)
                if qo is not None:
                    known.add(t.name)
                    last[0] = t.name
                continue
            if qo.part == "absmax" and last[0] != qo.weight:
                yield from stats(qo.weight)
            elif qo.part in ("nested_absmax", "quant_state") and qo.weight not in known:
                yield from stats(qo.weight)
            yield ("part", t)
        yield ("close", shard)


def _fix_malloc_threshold() -> None:
    """glibc raises its mmap threshold after large frees, after which freed buffers stay resident;
    a fixed threshold keeps big allocations in mmap so that freeing them returns the memory."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------ pipeline


class _Stop(Exception):
    """Raised inside a stage when another stage failed or the run was cancelled."""


class _Pool:
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


@dataclass
class _PassState:
    """What one pass over a tensor's rows needs (built at its first chunk, dropped after its last)."""

    math: TensorMath | None = None  # the LoRA/DoRA/MoE/bias/token terms (None: nothing to add)
    decoder: qs.Decoder | None = None
    roundtrip: qs.RoundTrip | None = None
    quantizer: qs.OutputQuantizer | None = None


def _pass_files(tensor: OutputTensor) -> list[str]:
    """Input files a pass over `tensor` reads: its source, and a bitsandbytes weight's statistics."""
    files = [tensor.source.file]
    if tensor.quant_in is not None:
        files += [c.file for c in tensor.quant_in.companions if c.file not in files]
    return files


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ExecutionError(f"--device {name} was asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)


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


def _compute_threads(plan: MergePlan, device: torch.device, available: int) -> int:
    """torch's intra-op threads for the math. Writing a 16-bit output, the reader, writer and hasher
    threads keep about one core busy, and torch threads competing with them for it cost time (on 2
    cores: 5.0 s with one thread against 6.0 s with two, on the 1.1B bench); a 4-bit output is
    bound by its quantizer, which uses them all. The FMA chain and the quantizer are elementwise, so
    the bytes do not depend on this."""
    if device.type != "cpu" or any(t.quant_out is not None for t in plan.tensors):
        return available
    return max(1, available - 1)


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


def _refuse_nonfinite(chunk: Chunk, base: torch.Tensor, out: torch.Tensor) -> None:
    """NaN/Inf made by the merge (or by a cast that overflows) is an error naming the tensor,
    before the chunk is written; a cast keeps the non-finite values the base already had."""
    tensor = chunk.tensor
    index = ops.first_nonfinite(out, where_finite=base if tensor.op == "cast" else None)
    if index is None:
        return
    row, col = divmod(index, max(1, out.shape[1]))
    value, base_value = out.reshape(-1)[index].item(), base.reshape(-1)[index].item()
    if tensor.op == "cast":
        why = f"casting {base_value:g} to {tensor.dtype} overflows"
    elif not math.isfinite(base_value):
        why = f"the base weight itself holds {base_value} there"
    else:
        why = (
            f"the base holds {base_value:g} there and base + delta is {value} in {tensor.dtype}: "
            "an adapter holds extreme values, or the output dtype is too narrow"
        )
    raise ExecutionError(
        f"{tensor.source.file}: tensor {tensor.name!r}: the {'cast' if tensor.op == 'cast' else 'merged'} result has "
        f"NaN/Inf at row {chunk.row_start + row}, column {col} ({why}); the output is left incomplete: fix the inputs, "
        "or pass --allow-nonfinite to write such values"
    )


class Executor:
    """Runs a validated plan into `out_dir`; shards appear only once complete (`.partial` + rename).

    Resuming: with `resume`, finished shards are left out, a partial shard continues after its
    verified prefix; shards in `hold` are synced but left as NAME.partial for the caller to rename
    last. `on_shard_open(shard)` (the layout as resolved), `on_tensor_done(shard, tensor, prefix_sha256)`
    and `on_shard_done(filename, size, sha256)` run in the writer thread. `cancel_event` (or
    `cancel()`) stops the run promptly and raises `Interrupted`.
    """

    def __init__(
        self,
        plan: MergePlan,
        out_dir: Path,
        *,
        device: torch.device,
        progress: bool = False,
        on_shard_open: Callable[[OutputShard], None] | None = None,
        on_tensor_done: Callable[[OutputShard, OutputTensor, str], None] | None = None,
        on_shard_done: Callable[[str, int, str], None] | None = None,
        inputs: InputFiles | None = None,
        resume: Resume | None = None,
        hold: Collection[str] = (),
        cancel_event: threading.Event | None = None,
    ):
        self.plan = plan
        self.out_dir = out_dir
        self.device = device
        self.progress = progress
        self.on_shard_open = on_shard_open
        self.on_tensor_done = on_tensor_done
        self.on_shard_done = on_shard_done
        self.inputs = inputs
        self.hold = frozenset(hold)
        self.finished = frozenset(resume.finished) if resume is not None else frozenset()
        self.partial: Mapping[str, Any] = dict(resume.partial) if resume is not None else {}
        recorded = dict(resume.layouts) if resume is not None else {}
        self.done = done_tensors(plan, resume)
        self.layout = plan_layout(plan)
        self._schedule = list(schedule(plan, self.done, self.finished))
        self._cancelled = cancel_event if cancel_event is not None else threading.Event()
        self._finished_run = False
        self._open_writers: list[ShardWriter] = []  # opened by the writer thread, not yet committed
        self._errors: list[BaseException] = []
        self._fds: dict[str, int] = {}
        # 4-bit outputs: small statistics per weight until written, the last pass's absmax, the
        # current round trip's statistics, and the shard layouts as resolved at their headers
        self._small: dict[str, dict[str, torch.Tensor]] = {}
        self._stash: tuple[str, torch.Tensor] | None = None
        self._roundtrip: tuple[str, qs.RoundTrip] | None = None
        self._prepassed: tuple[str, TensorMath] | None = None
        # files holding a bitsandbytes weight's statistics are read by the compute thread at the start
        # of a pass, so the reader keeps them until the run ends
        self._companion_files = {c.file for t in plan.tensors if t.quant_in is not None for c in t.quant_in.companions}
        # finished shards keep the layout they were written with; a reopened one is checked against it
        self._resolved: dict[str, OutputShard] = {k: v for k, v in recorded.items() if k in self.finished}
        self._recorded = recorded
        self._current: dict[str, OutputTensor] = {}
        self._parts_left: dict[str, int] = {}
        for t in plan.tensors:
            if t.quant_out is not None and t.quant_out.part != "weight" and t.name not in self.done:
                self._parts_left[t.quant_out.weight] = self._parts_left.get(t.quant_out.weight, 0) + 1

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
            items = self._schedule
            # the last pass reading each input file (its base rows, or a bitsandbytes weight's statistics)
            last_read: dict[str, int] = {}
            for i, item in enumerate(items):
                if item[0] == "pass":
                    for f in _pass_files(item[1].tensor):
                        last_read[f] = i
            for i, item in enumerate(items):
                if item[0] != "pass":
                    _put(out_q, item, self._cancelled)  # open / part / close pass through in order
                    continue
                p: Pass = item[1]
                src = p.tensor.source
                if self.inputs is not None:
                    for f in _pass_files(p.tensor):
                        self.inputs.acquire(f, self._cancelled)
                    if self._cancelled.is_set():
                        raise _Stop
                for chunk in chunks_of(p.tensor, self.layout, self.plan.options.max_chunk_rows, p.purpose):
                    offset, length = qs.source_span(p.tensor, chunk.row_start, chunk.row_stop)
                    buf = pool.take()
                    fd = self._fd(src.file)
                    pread_exact(fd, memoryview(buf)[:length], offset, src.file)
                    release_cache(fd, offset, length)
                    _put(out_q, ("chunk", chunk, buf, length), self._cancelled)
                if self.inputs is not None:
                    for f in _pass_files(p.tensor):
                        if last_read[f] == i and f not in self._companion_files:
                            os.close(self._fds.pop(f))  # its bytes are in our buffers now
                            self.inputs.release(f)
            _put(out_q, None, self._cancelled)
        except _Stop:
            pass
        except BaseException as exc:
            self._fail(exc)

    # -- writer thread: sequential appends; hasher thread: sha256, journal, commit by rename

    def _stage(self, work: Callable[..., None], *args) -> None:
        """A writing thread's body: its failure stops the run (a full disk as DiskFullError)."""
        try:
            work(*args)
        except _Stop:
            pass
        except OSError as exc:
            cls = DiskFullError if exc.errno in DISK_FULL_ERRNOS else OutputError
            self._fail(cls(f"writing {self.out_dir}: {exc.strerror or exc}"))
        except BaseException as exc:
            self._fail(exc)

    def _writer(self, in_q: queue.Queue, hash_q: queue.Queue, bar) -> None:
        """Writes each chunk at its place and hands it on: the hashing runs beside the writes."""
        while (item := _get(in_q, self._cancelled)) is not None:
            kind = item[0]
            if kind == "open":
                shard = item[1]
                header, _ = build_header([TensorSpec(t.name, t.dtype, t.shape) for t in shard.tensors], SHARD_METADATA)
                path = self.out_dir / shard.filename
                point = self.partial.get(shard.filename)
                if point is None:
                    writer = ShardWriter(path, header, shard.size)
                else:
                    writer = ShardWriter(path, header, shard.size, resume_at=point.offset, prefix_hash=point.sha256.copy())
                self._open_writers.append(writer)  # closed by the hasher's commit, or by run() on failure
                item = ("open", shard, writer)
                if bar is not None:
                    bar.update(writer.position)
            elif kind == "data":
                writer.write(item[1], hash=False)
                if bar is not None:
                    bar.update(len(item[1]))
            _put(hash_q, item, self._cancelled)
        _put(hash_q, None, self._cancelled)

    def _hasher(self, in_q: queue.Queue, stats: RunStats) -> None:
        """After the writer: the shard's running sha256 (its digest at each tensor's end goes to the
        journal), then the callbacks, which so only ever name bytes already written; commits each
        finished shard."""
        writer: ShardWriter | None = None
        shard: OutputShard | None = None
        while (item := _get(in_q, self._cancelled)) is not None:
            kind = item[0]
            if kind == "open":
                _, shard, writer = item
                if self.on_shard_open is not None:
                    self.on_shard_open(shard)
            elif kind == "data":
                _, data, release = item
                writer.absorb(data)
                release()
                stats.bytes_written += len(data)
            elif kind == "tensor":
                stats.tensors_done += 1
                if self.on_tensor_done is not None:
                    self.on_tensor_done(shard, item[1], writer.running_sha256())
            elif kind == "close":
                sha = writer.commit(rename=item[1].filename not in self.hold)
                self._open_writers.remove(writer)
                writer = None
                stats.shards.append(ShardResult(item[1].filename, item[1].size, sha))
                if self.on_shard_done is not None:
                    self.on_shard_done(item[1].filename, item[1].size, sha)
        self._finished_run = True

    # -- compute (calling thread)

    def _read_whole(self, src: Source) -> torch.Tensor:
        buf = bytearray(src.end - src.start)
        pread_exact(self._fd(src.file), memoryview(buf), src.start, src.file)
        if not buf:
            return torch.empty(src.shape, dtype=torch_dtype(src.dtype))
        return torch.frombuffer(buf, dtype=torch_dtype(src.dtype)).reshape(src.shape)

    _read_source = _read_whole

    def _load_factors(self, tensor: OutputTensor) -> TensorMath:
        return TensorMath.load(tensor, self._read_whole, self.device)

    def _begin(self, chunk: Chunk) -> _PassState:
        """Per-pass state: LoRA factors, the source's decoded statistics, the quantizers."""
        t, purpose = chunk.tensor, chunk.purpose
        st = _PassState()
        if purpose == "roundtrip":
            st.roundtrip = qs.RoundTrip(t, self.device)
            return st
        if purpose != "prepass" and self._prepassed is not None and self._prepassed[0] == t.name:
            st.math = self._prepassed[1]  # the column norms its prepass just measured
        elif t.loras:
            st.math = self._load_factors(t)
        self._prepassed = None
        if t.quant_in is not None:
            st.decoder = qs.Decoder(t, self._read_whole, self.device)
        if t.roundtrip is not None:
            if t.roundtrip.double_quant:
                if self._roundtrip is None or self._roundtrip[0] != t.name:
                    raise ExecutionError(f"internal error: no round-trip statistics for {t.name}")
                st.roundtrip = self._roundtrip[1]
            else:
                st.roundtrip = qs.RoundTrip(t, self.device)
        if t.quant_out is not None:
            st.quantizer = qs.OutputQuantizer(t.quant_out)
        return st

    def _end(self, chunk: Chunk, st: _PassState) -> None:
        t = chunk.tensor
        if chunk.purpose == "roundtrip":
            st.roundtrip.finish_stats()
            self._roundtrip = (t.name, st.roundtrip)
            return
        if chunk.purpose == "prepass":  # the next pass over this tensor merges with these norms
            self._prepassed = (t.name, st.math)
            return
        self._roundtrip = None
        if st.quantizer is not None:
            self._remember(t.name, t.quant_out, st.quantizer.finish())

    def _weight_rows(self, chunk: Chunk, buf, length: int, st: _PassState, *, raw_base: bool = False) -> torch.Tensor:
        """The base weight's rows W on the compute device: float32 for a bitsandbytes or round-tripped
        source (what bitsandbytes' dequantization returns, widened), else the stored dtype."""
        t = chunk.tensor
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=length)
        if self.device.type != "cpu":
            raw = raw.to(self.device, non_blocking=True)
        if st.decoder is not None:
            return st.decoder.rows(raw, chunk.row_start, chunk.row_stop)
        base = raw.view(torch_dtype(t.source.dtype)).reshape(chunk.rows, _rows_and_width(t.weight_shape)[1])
        if st.roundtrip is not None and not raw_base:
            return st.roundtrip.rows(base, chunk.row_start)
        return base

    def _merged_f32(self, chunk: Chunk, buf, length: int, st: _PassState, tiles) -> torch.Tensor:
        """float32 rows of W + sum(w*s*B@A) (no rounding: a 4-bit output quantizes these)."""
        w = self._weight_rows(chunk, buf, length, st)
        fresh = st.decoder is not None or st.roundtrip is not None  # a tensor of our own: merge in place
        if st.math is None:
            return w if fresh else w.float()
        return st.math.compute(w, chunk.row_start, torch.float32, tiles, out=w if fresh else None)

    def _merged_pieces(self, chunk: Chunk, buf, length: int, st: _PassState, tiles) -> Iterator[tuple[int, torch.Tensor]]:
        """The float32 rows of :meth:`_merged_f32` for a 4-bit output, as (first row in the chunk, rows):
        on the CPU, tile by tile (whole quantization blocks) when LoRA terms merge into a 16-bit
        source, so the chunk's float32 rows never exist whole; else the whole chunk at once (a GPU
        quantizes a chunk in one kernel per operation)."""
        if self.device.type == "cpu" and st.math is not None and st.decoder is None and st.roundtrip is None:
            width = _rows_and_width(chunk.tensor.weight_shape)[1]
            align = qs.row_alignment(chunk.tensor)
            if ops.tile_rows(width, tiles, align) > 0:
                w = self._weight_rows(chunk, buf, length, st)
                for t0, _, acc in st.math.tiles(w, chunk.row_start, tiles, align):
                    yield t0, acc
                return
        yield 0, self._merged_f32(chunk, buf, length, st, tiles)

    def _observe(self, chunk: Chunk, buf, length: int, st: _PassState, tiles) -> None:
        """A statistics pass: block absmax of the merged rows (or of the base, for a round trip)."""
        if chunk.purpose == "roundtrip":
            st.roundtrip.observe(self._weight_rows(chunk, buf, length, st, raw_base=True))
        elif chunk.purpose == "prepass":
            st.math.prepass(self._weight_rows(chunk, buf, length, st), chunk.row_start, tiles)
        else:
            for _, rows in self._merged_pieces(chunk, buf, length, st, tiles):
                st.quantizer.measure(rows)

    def _compute_into(self, chunk: Chunk, buf: bytearray, length: int, out_buf: bytearray, st: _PassState, tiles) -> int:
        """Math for one chunk, written into `out_buf`; returns the number of output bytes."""
        tensor = chunk.tensor
        if tensor.op == "quant":  # the packed bytes of a 4-bit output weight
            width = _rows_and_width(tensor.weight_shape)[1]
            out_len = (chunk.rows * width + 1) // 2
            packed = torch.frombuffer(out_buf, dtype=torch.uint8, count=out_len)
            for t0, rows in self._merged_pieces(chunk, buf, length, st, tiles):
                out = packed[t0 * width // 2: (t0 * width + rows.numel() + 1) // 2]
                if rows.device.type == "cpu":
                    st.quantizer.pack(rows, out)
                else:
                    out.copy_(st.quantizer.pack(rows))
            return out_len
        width = _rows_and_width(tensor.weight_shape)[1]
        out_dtype = torch_dtype(tensor.dtype)
        out_len = chunk.rows * width * ITEMSIZE[tensor.dtype]
        out = torch.frombuffer(out_buf, dtype=torch.uint8, count=out_len).view(out_dtype).reshape(chunk.rows, width)
        if tensor.op in ("cast", "replace"):  # a dtype change needs no device
            base = torch.frombuffer(buf, dtype=torch.uint8, count=length).view(torch_dtype(tensor.source.dtype))
            base = base.reshape(chunk.rows, width)
            out.copy_(base)
        else:
            base = self._weight_rows(chunk, buf, length, st)
            if st.math is None:  # a dequantized bitsandbytes weight, nothing to add
                out.copy_(base)
            elif self.device.type != "cpu":
                out.copy_(st.math.compute(base, chunk.row_start, out_dtype, tiles))
            else:
                st.math.compute(base, chunk.row_start, out_dtype, tiles, out=out)
        if not self.plan.options.allow_nonfinite:
            _refuse_nonfinite(chunk, base, out)
        return out_len

    # -- 4-bit output statistics (see `schedule`)

    def _remember(self, weight: str, qo, stats: dict[str, torch.Tensor]) -> None:
        small = {"quant_state": qs.part_tensor(stats, replace(qo, part="quant_state"))}
        if "nested_absmax" in stats:
            small["nested_absmax"] = stats["nested_absmax"]
        before = self._small.get(weight)
        if before is not None and not torch.equal(before["quant_state"], small["quant_state"]):
            raise ExecutionError(f"internal error: the statistics of {weight} differ between two passes")
        self._small[weight] = small
        self._stash = (weight, stats["absmax"])

    def _resolve(self, shard: OutputShard) -> OutputShard:
        """The shard with the double-quant JSON lengths its statistics pass found (see resize_shard)."""
        shapes = {
            t.name: (int(self._small[t.quant_out.weight]["quant_state"].numel()),)
            for t in shard.tensors
            if t.quant_out is not None and not t.quant_out.exact_size
        }
        resolved = resize_shard(shard, shapes)
        recorded = self._recorded.get(shard.filename)
        if shard.filename in self.partial and recorded is not None and recorded != resolved:
            raise ExecutionError(
                f"internal error: {shard.filename} resolves to another layout than the interrupted run's; "
                "re-run with --overwrite to start over"
            )
        self._resolved[shard.filename] = resolved
        self._current = {t.name: t for t in resolved.tensors}
        return resolved

    def _part_bytes(self, tensor: OutputTensor) -> memoryview:
        """Bytes of a 4-bit output's statistic tensor, from the code books or its weight's statistics."""
        qo = tensor.quant_out
        data = qs.constant_part(qo)
        if data is None and qo.part == "absmax":
            if self._stash is None or self._stash[0] != qo.weight:
                raise ExecutionError(f"internal error: the absmax of {qo.weight} is not at hand")
            data, self._stash = self._stash[1], None
        elif data is None:
            data = self._small[qo.weight][qo.part]
        want = self._current[tensor.name]
        got = data.numel() * data.element_size()
        if got != want.nbytes or data.dtype != torch_dtype(want.dtype):
            raise ExecutionError(f"internal error: {tensor.name} is {got} bytes of {data.dtype}, planned {want.nbytes} of {want.dtype}")
        self._parts_left[qo.weight] -= 1
        if self._parts_left[qo.weight] == 0:
            self._small.pop(qo.weight, None)
        return memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy())

    @property
    def final_plan(self) -> MergePlan:
        """The plan with the shard layouts as written (exact double-quant JSON lengths)."""
        return replace(self.plan, shards=tuple(self._resolved.get(s.filename, s) for s in self.plan.shards))

    def run(self) -> RunStats:
        if self._cancelled.is_set():
            raise Interrupted("interrupted before the first tensor")
        threads = torch.get_num_threads()
        torch.set_num_threads(_compute_threads(self.plan, self.device, threads))
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> RunStats:
        _fix_malloc_threshold()
        stats = RunStats()
        start = time.perf_counter()
        size = self.layout.buffer_bytes
        pinned = self.device.type == "cuda"
        read_pool = _Pool(READ_BUFFERS, size, self._cancelled, pinned)
        write_pool = _Pool(WRITE_BUFFERS, size, self._cancelled, pinned) if not all(map(is_passthrough, self.plan.tensors)) else None
        tiles = ops.Tiles.allocate(self.layout.tile_elements, self.device) if self.layout.tile_elements else None
        read_q: queue.Queue = queue.Queue(maxsize=1)
        write_q: queue.Queue = queue.Queue(maxsize=WRITE_BUFFERS)
        bar = None
        if self.progress:
            from tqdm import tqdm

            kept = sum(s.size for s in self.plan.shards if s.filename in self.finished)
            bar = tqdm(total=self.plan.file_bytes, initial=kept, unit="B", unit_scale=True, unit_divisor=1000, desc="merging",
                       file=terminal(), dynamic_ncols=True)
        reader = threading.Thread(target=self._reader, args=(read_pool, read_q), name="streammerge-read", daemon=True)
        hash_q: queue.Queue = queue.Queue(maxsize=WRITE_BUFFERS)
        writer = threading.Thread(target=self._stage, args=(self._writer, write_q, hash_q, bar), name="streammerge-write", daemon=True)
        hasher = threading.Thread(target=self._stage, args=(self._hasher, hash_q, stats), name="streammerge-hash", daemon=True)
        if self.inputs is not None:
            self.inputs.begin([f for item in self._schedule if item[0] == "pass" for f in _pass_files(item[1].tensor)])
        reader.start()
        writer.start()
        hasher.start()
        state: _PassState | None = None
        on_device = self.device.type != "cpu"
        try:
            while (item := _get(read_q, self._cancelled)) is not None:
                kind = item[0]
                if kind == "open":
                    _put(write_q, ("open", self._resolve(item[1])), self._cancelled)
                    continue
                if kind == "close":
                    _put(write_q, ("close", self._resolved[item[1].filename]), self._cancelled)
                    continue
                if kind == "part":
                    data = self._part_bytes(item[1])
                    _put(write_q, ("data", data, lambda: None), self._cancelled)
                    _put(write_q, ("tensor", self._current[item[1].name]), self._cancelled)
                    continue
                _, chunk, buf, length = item
                if chunk.first:
                    state = self._begin(chunk)
                if chunk.purpose != "write":  # a statistics pass or a DoRA prepass: nothing is written
                    self._observe(chunk, buf, length, state, tiles)
                    if on_device:
                        torch.cuda.current_stream(self.device).synchronize()
                    read_pool.give(buf)
                elif is_passthrough(chunk.tensor):  # bytes as they are: hand the read buffer to the writer
                    _put(write_q, ("data", memoryview(buf)[:length], lambda b=buf: read_pool.give(b)), self._cancelled)
                else:
                    out_buf = write_pool.take()
                    out_len = self._compute_into(chunk, buf, length, out_buf, state, tiles)
                    if on_device:
                        torch.cuda.current_stream(self.device).synchronize()
                    read_pool.give(buf)
                    _put(write_q, ("data", memoryview(out_buf)[:out_len], lambda b=out_buf: write_pool.give(b)), self._cancelled)
                if chunk.last:
                    self._end(chunk, state)
                    state = None
                    if chunk.purpose == "write":
                        _put(write_q, ("tensor", self._current.get(chunk.tensor.name, chunk.tensor)), self._cancelled)
            _put(write_q, None, self._cancelled)
        except _Stop:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            reader.join()
            writer.join()
            hasher.join()
            for open_writer in self._open_writers:  # an unfinished shard: what was written stays, for
                open_writer.close(sync=True)  # the next run to verify and keep
            self._open_writers.clear()
            if self.inputs is not None:
                self.inputs.end()
            if bar is not None:
                bar.close()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        if self._errors:
            raise self._errors[0]
        if not self._finished_run:
            raise Interrupted(f"interrupted after {stats.tensors_done} more tensor(s)")
        stats.seconds = time.perf_counter() - start
        return stats
