"""The executor: stream every output tensor of a plan through read -> compute -> write.

Three stages overlap: a reader thread fills buffers with positioned reads (a quantized source's
statistics with its first chunk, so the reader owns every read of a base file), the calling thread
does the math (`compute.ChunkCompute`, CPU or CUDA) into output buffers, and a writer thread
appends them to the output file, whatever its container (`containers`), beside a hasher whose
digests feed the journal. The memory is the layout `schedule.plan_layout` fixed.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import torch

from ..console import terminal
from .. import ops
from ..errors import DiskFullError, ExecutionError, Interrupted, OutputError
from ..formats.safetensors import DISK_FULL_ERRNOS, ShardWriter, pread_exact, release_cache
from ..planning import streaming as qs
from ..planning.types import MergePlan, OutputShard, OutputTensor, Source
from .compute import ChunkCompute, _compute_threads, torch_dtype
from .containers import header_bytes
from .parts import DerivedParts
from .pipeline import (
    InputFiles,
    Pool,
    Resume,
    RunStats,
    ShardResult,
    Stop,
    fix_malloc_threshold,
    _get,
    _put,
    done_tensors,
    tensors_in,
)
from .schedule import READ_BUFFERS, WRITE_BUFFERS, Layout, Pass, chunks_of, is_passthrough, plan_layout, schedule

def _plain_copy(tensor: OutputTensor) -> bool:
    """A tensor written as its source bytes, in one piece."""
    return (tensor.op == "copy" and tensor.encoding is None and tensor.quant_in is None and tensor.end > tensor.start
            and tensor.source.end - tensor.source.start == tensor.end - tensor.start)


def _pass_files(tensor: OutputTensor) -> list[str]:
    """Input files a pass over `tensor` reads: its source, and a bitsandbytes weight's statistics."""
    files = [tensor.source.file]
    if tensor.quant_in is not None:
        files += [c.file for c in tensor.quant_in.companions if c.file not in files]
    return files


class Executor:
    """Runs a validated plan into `out_dir`; shards appear only once complete (`.partial` + rename).

    Resuming: with `resume`, finished shards are left out, a partial shard continues after its
    verified prefix; shards in `hold` are synced but left as NAME.partial for the caller to rename
    last; shards in `skip` are another partition's (run/partitions.py) and left alone.
    `on_shard_open(shard)` (the layout as resolved), `on_tensor_done(shard, tensor, prefix_sha256)`
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
        layout: Layout | None = None,  # the plan's, when the caller has it already
        skip: Collection[str] = (),
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
        self.skip = frozenset(skip)
        self.finished = frozenset(resume.finished) if resume is not None else frozenset()
        self.partial: Mapping[str, Any] = dict(resume.partial) if resume is not None else {}
        recorded = dict(resume.layouts) if resume is not None else {}
        self.done = done_tensors(plan, resume) | tensors_in(plan, self.skip)
        self.layout = layout if layout is not None else plan_layout(plan)
        self._schedule = list(schedule(plan, self.done, self.finished | self.skip))
        self._cancelled = cancel_event if cancel_event is not None else threading.Event()
        self._finished_run = False
        self._open_writers: list[ShardWriter] = []  # opened by the writer thread, not yet committed
        self._errors: list[BaseException] = []
        self._fds: dict[str, int] = {}
        self.parts = DerivedParts(plan, self.done, self.finished | self.skip, self.partial, recorded)
        self.compute = ChunkCompute(device, self._read_whole, self.parts.remember, plan.options.allow_nonfinite)
        # files the compute thread reads at a tensor's start (LoRA factors): kept until the run ends
        self._factor_files = {s.file for t in plan.tensors for term in t.loras for s in term.sources()}
        self._fd_lock = threading.Lock()  # the reader (inputs) and the compute thread (factors) both open files
        self._position = 0  # where the next byte handed to the writer lands in the open shard

    def cancel(self) -> None:
        self._cancelled.set()

    def _fd(self, path: str) -> int:
        with self._fd_lock:
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

    def _reader(self, pool: Pool, out_q: queue.Queue) -> None:
        try:
            items = self._schedule
            # the last pass reading each input file (its base rows, or a bitsandbytes weight's statistics)
            last_read: dict[str, int] = {}
            for i, item in enumerate(items):
                if item[0] == "pass":
                    for f in _pass_files(item[1].tensor):
                        last_read[f] = i
            i = 0
            exact = True  # the open shard's offsets are final (no data-dependent part sizes)
            while i < len(items):
                item = items[i]
                if item[0] != "pass":
                    if item[0] == "open":
                        exact = all(t.quant_out is None or t.quant_out.exact_size for t in item[1].tensors)
                    _put(out_q, item, self._cancelled)  # open / part / close pass through in order
                    i += 1
                    continue
                p: Pass = item[1]
                src = p.tensor.source
                if self.inputs is not None:
                    for f in _pass_files(p.tensor):
                        self.inputs.acquire(f, self._cancelled)
                    if self._cancelled.is_set():
                        raise Stop
                run = self._copy_run(items, i, self.layout.buffer_bytes) if exact else [p.tensor]
                if len(run) > 1:  # copies back to back in source and output: one read, one hand-over
                    length = run[-1].source.end - src.start
                    buf = pool.take()
                    fd = self._fd(src.file)
                    pread_exact(fd, memoryview(buf)[:length], src.start, src.file)
                    release_cache(fd, src.start, length)
                    _put(out_q, ("copies", tuple(run), buf, length), self._cancelled)
                    i += len(run) - 1
                else:
                    self._read_pass(p, pool, out_q)
                if self.inputs is not None:
                    for f in _pass_files(p.tensor):
                        if last_read[f] == i and f not in self._factor_files:
                            with self._fd_lock:
                                fd = self._fds.pop(f, None)
                            if fd is not None:
                                os.close(fd)  # its bytes are in our buffers now
                            self.inputs.release(f)
                i += 1
            _put(out_q, None, self._cancelled)
        except Stop:
            pass
        except BaseException as exc:
            self._fail(exc)

    def _read_pass(self, p: Pass, pool: Pool, out_q: queue.Queue) -> None:
        src = p.tensor.source
        # a quantized source's statistics, read here so that the reader owns every read of a base file
        stats = {c.name: self._read_whole(c) for c in p.tensor.quant_in.companions} if p.tensor.quant_in else None
        for chunk in chunks_of(p.tensor, self.layout, self.plan.options.max_chunk_rows, p.purpose):
            offset, length = qs.source_span(p.tensor, chunk.row_start, chunk.row_stop)
            buf = pool.take()
            fd = self._fd(src.file)
            pread_exact(fd, memoryview(buf)[:length], offset, src.file)
            release_cache(fd, offset, length)
            _put(out_q, ("chunk", chunk, buf, length, stats if chunk.first else None), self._cancelled)

    @staticmethod
    def _copy_run(items: list, i: int, limit: int) -> list[OutputTensor]:
        """The copies from items[i] on that lie back to back in one source file and in the output
        and fit one buffer together (a 90k-tensor checkpoint is mostly such runs): the per-tensor
        hand-overs between the threads, not the bytes, would bound its pace."""
        first = items[i][1].tensor
        if not _plain_copy(first):
            return [first]
        run, size = [first], first.end - first.start
        for j in range(i + 1, len(items)):
            item = items[j]
            if item[0] != "pass" or not _plain_copy(t := item[1].tensor) or item[1].purpose != "write":
                break
            prev = run[-1]
            if (t.source.file != prev.source.file or t.source.start != prev.source.end or t.start != prev.end
                    or size + t.end - t.start > limit):
                break
            run.append(t)
            size += t.end - t.start
        return run

    def _stage(self, work: Callable[..., None], *args) -> None:
        """A writing thread's body: its failure stops the run (a full disk as DiskFullError)."""
        try:
            work(*args)
        except Stop:
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
                header = header_bytes(shard)
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
            elif kind in ("data", "copies"):
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
            elif kind == "copies":  # a run of tensors: the shard's digest at each one's end, as if one by one
                _, data, release, placed = item
                at = 0
                for t in placed:
                    writer.absorb(data[at:at + t.end - t.start])
                    at += t.end - t.start
                    stats.tensors_done += 1
                    if self.on_tensor_done is not None:
                        self.on_tensor_done(shard, t, writer.running_sha256())
                release()
                stats.bytes_written += len(data)
            elif kind == "close":
                sha = writer.commit(rename=item[1].filename not in self.hold)
                self._open_writers.remove(writer)
                writer = None
                stats.shards.append(ShardResult(item[1].filename, item[1].size, sha))
                if self.on_shard_done is not None:
                    self.on_shard_done(item[1].filename, item[1].size, sha)
        self._finished_run = True

    def _read_whole(self, src: Source) -> torch.Tensor:
        buf = bytearray(src.end - src.start)
        pread_exact(self._fd(src.file), memoryview(buf), src.start, src.file)
        if not buf:
            return torch.empty(src.shape, dtype=torch_dtype(src.dtype))
        return torch.frombuffer(buf, dtype=torch_dtype(src.dtype)).reshape(src.shape)

    def _hand(self, write_q: queue.Queue, data, release: Callable[[], None]) -> None:
        """Bytes for the writer, which appends them at `self._position`."""
        _put(write_q, ("data", data, release), self._cancelled)
        self._position += len(data)

    def _fill_to(self, write_q: queue.Queue, offset: int) -> None:
        """Zeros up to `offset`: the alignment padding a container leaves between tensors."""
        if offset < self._position:
            raise ExecutionError(f"internal error: a tensor would start at {offset}, before byte {self._position} written")
        if offset > self._position:
            self._hand(write_q, bytes(offset - self._position), lambda: None)

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
        fix_malloc_threshold()
        stats = RunStats()
        start = time.perf_counter()
        size = self.layout.buffer_bytes
        pinned = self.device.type == "cuda"
        read_pool = Pool(READ_BUFFERS, size, self._cancelled, pinned)
        write_pool = Pool(WRITE_BUFFERS, size, self._cancelled, pinned) if not all(map(is_passthrough, self.plan.tensors)) else None
        tiles = ops.Tiles.allocate(self.layout.tile_elements, self.device) if self.layout.tile_elements else None
        read_q: queue.Queue = queue.Queue(maxsize=1)
        write_q: queue.Queue = queue.Queue(maxsize=WRITE_BUFFERS)
        bar = None
        if self.progress:
            from tqdm import tqdm

            kept = sum(s.size for s in self.plan.shards if s.filename in self.finished and s.filename not in self.skip)
            total = sum(s.size for s in self.plan.shards if s.filename not in self.skip)
            bar = tqdm(total=total, initial=kept, unit="B", unit_scale=True, unit_divisor=1000, desc="merging",
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
        state = None  # the pass in flight (compute.PassState)
        on_device = self.device.type != "cpu"
        try:
            while (item := _get(read_q, self._cancelled)) is not None:
                kind = item[0]
                if kind == "open":
                    shard = self.parts.resolve(item[1])
                    point = self.partial.get(shard.filename)
                    self._position = point.offset if point is not None else shard.header_size
                    _put(write_q, ("open", shard), self._cancelled)
                    continue
                if kind == "close":
                    shard = self.parts.resolved[item[1].filename]
                    self._fill_to(write_q, shard.size)  # a container's padding after the last tensor
                    _put(write_q, ("close", shard), self._cancelled)
                    continue
                if kind == "copies":
                    _, run, buf, length = item
                    placed = [self.parts.current.get(t.name, t) for t in run]
                    self._fill_to(write_q, placed[0].start)
                    _put(write_q, ("copies", memoryview(buf)[:length], lambda b=buf: read_pool.give(b), placed), self._cancelled)
                    self._position += length
                    continue
                if kind == "part":
                    self._fill_to(write_q, self.parts.current[item[1].name].start)
                    self._hand(write_q, self.parts.part_bytes(item[1]), lambda: None)
                    _put(write_q, ("tensor", self.parts.current[item[1].name]), self._cancelled)
                    continue
                _, chunk, buf, length, companions = item
                if chunk.first:
                    state = self.compute.begin(chunk, companions)
                    if chunk.purpose == "write":
                        self._fill_to(write_q, self.parts.current.get(chunk.tensor.name, chunk.tensor).start)
                del companions
                if chunk.purpose != "write":  # a statistics pass or a DoRA prepass: nothing is written
                    self.compute.observe(chunk, buf, length, state, tiles)
                    if on_device:
                        torch.cuda.current_stream(self.device).synchronize()
                    read_pool.give(buf)
                elif is_passthrough(chunk.tensor):  # bytes as they are: hand the read buffer to the writer
                    self._hand(write_q, memoryview(buf)[:length], lambda b=buf: read_pool.give(b))
                else:
                    out_buf = write_pool.take()
                    out_len = self.compute.compute_into(chunk, buf, length, out_buf, state, tiles)
                    if on_device:
                        torch.cuda.current_stream(self.device).synchronize()
                    read_pool.give(buf)
                    self._hand(write_q, memoryview(out_buf)[:out_len], lambda b=out_buf: write_pool.give(b))
                if chunk.last:
                    self.compute.end(chunk, state)
                    state = None
                    if chunk.purpose == "write":
                        _put(write_q, ("tensor", self.parts.current.get(chunk.tensor.name, chunk.tensor)), self._cancelled)
            _put(write_q, None, self._cancelled)
        except Stop:
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

    @property
    def final_plan(self) -> MergePlan:
        """The plan with the shard layouts as written (exact double-quant JSON lengths)."""
        return self.parts.final_plan(self.plan)


def run_plan(plan, out_dir: Path, *, device: torch.device, progress: bool = False,
             inputs: InputFiles | None = None) -> tuple[list[ShardResult], float]:
    """Run every shard of `plan` (a MergePlan, or a GGUFPlan's `output`) into `out_dir`, without a
    journal: each file committed by rename as it completes."""
    plan = getattr(plan, "output", None) or plan
    stats = Executor(plan, Path(out_dir), device=device, progress=progress, inputs=inputs).run()
    return stats.shards, stats.seconds
