"""Stream a GGUF plan to disk: read -> merge (float32) -> transform -> encode -> write, in row chunks.

The float32 rows are exactly what merged_16bit computes before its final cast (`ops.merge_rows`
with a float32 output), so a bf16 GGUF holds the same values as a bf16 merged_16bit checkpoint.
A reader thread keeps the next chunk's positioned read going while the calling thread computes,
encodes and appends to the file; each file is written as `NAME.partial` and renamed when complete.
Row chunks are independent for every type written here: BF16/F16/F32 per element, Q8_0/Q4_0 per
block of 32 along a row; the q/k permutation moves rows only within a head, and chunks of permuted
tensors are whole heads, so chunking never changes a byte.

A bitsandbytes base weight is read packed (chunks start on whole 4-bit block rows) and decoded to
float32 rows by `quant.stream.Decoder`, bitsandbytes' own dequantization, exactly as merged_16bit
decodes it; its statistics tensors are read by the reader with the first chunk (so the reader owns
every read of a base file) and decoded once per tensor.

Input files that arrive while merging (a Hub base, `inputs`: execute.InputFiles) are acquired by the
reader before a tensor's first read and released after its last one (with --low-disk the Prefetcher
then deletes a shard it downloaded, a 4-bit base's shards included). Files the compute thread reads
(LoRA factors) are kept until the run ends.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..console import terminal
from .. import ops
from ..errors import ExecutionError, OutputError
from ..io.safetensors import TORCH_NAME, ShardWriter, pread_exact, release_cache
from ..quant import stream as qs
from ..terms import TensorMath
from . import require
from .plan import READS_IN_FLIGHT, GGUFPlan, GGUFTensor, pad


@dataclass
class FileResult:
    filename: str
    size: int
    sha256: str


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, TORCH_NAME[name])


def permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` on a block of whole heads: HF's rotate-half row order ->
    Meta's interleaved order (row h*d + i*d/2 + j moves to h*d + 2j + i)."""
    n, width = rows.shape
    return rows.reshape(heads, 2, n // heads // 2, width).transpose(1, 2).reshape(n, width)


def encode(rows: torch.Tensor, ggml_type: str, gguf) -> memoryview:
    """float32 rows -> the stored bytes of `ggml_type` (torch's casts round to nearest-even, as
    gguf.quants does for BF16/F16; the block quantizers are the gguf package's own)."""
    if ggml_type == "F32":
        return memoryview(rows.contiguous().numpy()).cast("B")
    if ggml_type in ("BF16", "F16"):
        out = rows.to(torch.bfloat16 if ggml_type == "BF16" else torch.float16)
        return memoryview(out.view(torch.int16).numpy()).cast("B")
    data = gguf.quants.quantize(rows.numpy(), gguf.GGMLQuantizationType[ggml_type])
    return memoryview(np.ascontiguousarray(data)).cast("B")


class GGUFExecutor:
    """Writes every file of a GGUF plan into `out_dir`."""

    def __init__(self, plan: GGUFPlan, out_dir: Path, *, device: torch.device, progress: bool = False, inputs=None):
        self.plan = plan
        self.out_dir = Path(out_dir)
        self.device = device
        self.progress = progress
        self.inputs = inputs  # execute.InputFiles, or None when every input is on disk
        self.gguf = require()
        sources = [t.source for t in plan.tensors if t.source is not None]
        # files the compute thread reads at a tensor's start (LoRA factors): never released before the end
        self._kept = {s.file for o in sources for term in o.loras for s in term.sources()}
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self._cancelled = threading.Event()
        self._error: BaseException | None = None
        # Read buffers alive at once: the chunk being computed and the one being read ahead.
        self._slots = threading.Semaphore(READS_IN_FLIGHT)

    def _fd(self, path: str) -> int:
        with self._fd_lock:  # the reader (base files) and the compute thread (adapter files) both open
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise ExecutionError(f"cannot open {path}: {exc.strerror or exc}") from None
                self._fds[path] = fd
            return fd

    # -- reader thread: positioned reads of each chunk's source rows, one chunk ahead

    def _chunks(self) -> Iterator[tuple[GGUFTensor, int, int]]:
        for f in self.plan.files:
            for t in f.tensors:
                for start in range(0, t.rows, t.chunk_rows):
                    yield t, start, min(t.rows, start + t.chunk_rows)

    def read_order(self) -> list[str]:
        """The input files of every tensor with a source, in read order (InputFiles.begin)."""
        from ..execute import _pass_files

        return [f for t in self.plan.tensors if t.source is not None for f in _pass_files(t.source)]

    def _release_after(self, t: GGUFTensor, last_read: dict[str, GGUFTensor]) -> None:
        """After `t`'s last chunk is read: release the input files no later tensor reads."""
        from ..execute import _pass_files

        for f in _pass_files(t.source):
            if last_read[f] is t and f not in self._kept:
                with self._fd_lock:
                    fd = self._fds.pop(f, None)
                if fd is not None:
                    os.close(fd)  # its bytes are in our buffers now; an evicted file must not stay open
                self.inputs.release(f)

    def _reader(self, out_q: queue.Queue) -> None:
        from ..execute import _pass_files

        last_read: dict[str, GGUFTensor] = {}
        for t in self.plan.tensors:
            if t.source is not None:
                for f in _pass_files(t.source):
                    last_read[f] = t
        try:
            for t, start, stop in self._chunks():
                buf = None
                if self.inputs is not None and t.source is not None and start == 0:
                    for f in _pass_files(t.source):
                        self.inputs.acquire(f, self._cancelled)
                    if self._cancelled.is_set():
                        return
                while not self._slots.acquire(timeout=0.1):  # a read buffer may be allocated
                    if self._cancelled.is_set():
                        return
                stats = None
                if t.source is not None and t.source.quant_in is not None and start == 0:
                    stats = {c.name: self._read_whole(c) for c in t.source.quant_in.companions}
                if t.source is not None:
                    src = t.source.source
                    offset, length = qs.source_span(t.source, start, stop)
                    buf = bytearray(length)
                    fd = self._fd(src.file)
                    pread_exact(fd, memoryview(buf), offset, src.file)
                    release_cache(fd, offset, length)
                    if self.inputs is not None and stop == t.rows:
                        self._release_after(t, last_read)
                while not self._cancelled.is_set():
                    try:
                        out_q.put((t, start, stop, buf, stats), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._cancelled.is_set():
                    return
            out_q.put(None)
        except BaseException as exc:  # handed to the calling thread
            self._error = exc
            self._cancelled.set()

    # -- compute (calling thread)

    def _read_whole(self, src) -> torch.Tensor:
        buf = bytearray(src.end - src.start)
        pread_exact(self._fd(src.file), memoryview(buf), src.start, src.file)
        if not buf:
            return torch.empty(src.shape, dtype=_torch_dtype(src.dtype))
        return torch.frombuffer(buf, dtype=_torch_dtype(src.dtype)).reshape(src.shape)

    def _terms(self, t: GGUFTensor) -> TensorMath:
        """Every term kind (LoRA, DoRA rows, bias, token rows, experts) as merged_16bit applies it."""
        return TensorMath.load(t.source, self._read_whole, self.device)

    def _rows_f32(self, t: GGUFTensor, start: int, stop: int, buf: bytearray | None, terms, tiles,
                  decoder: qs.Decoder | None = None) -> torch.Tensor:
        """Rows [start, stop) of the merged tensor in float32, transformed as llama.cpp stores them."""
        if t.source is None:
            return torch.tensor(t.values[start:stop], dtype=torch.float32).reshape(stop - start, 1)
        if decoder is not None:  # bitsandbytes: float32 rows of our own, merged in place (as merged_16bit's W)
            raw = torch.frombuffer(buf, dtype=torch.uint8)
            rows = decoder.rows(raw.to(self.device) if self.device.type != "cpu" else raw, start, stop)
            if terms:
                rows = terms.compute(rows, start, torch.float32, tiles, out=rows)
            rows = rows.cpu()
        else:
            rows = self._float_rows(t, start, stop, buf, terms, tiles)
        if t.shift:
            rows = rows + t.shift  # float32, as llama.cpp adds it to the float32 tensor
        if t.permute_heads:
            rows = permute_rows(rows, t.permute_heads * (stop - start) // t.rows)
        return rows

    def _float_rows(self, t: GGUFTensor, start: int, stop: int, buf: bytearray, terms, tiles) -> torch.Tensor:
        base = torch.frombuffer(buf, dtype=_torch_dtype(t.source.source.dtype)).reshape(stop - start, t.width)
        if terms:
            if self.device.type == "cpu":
                rows = torch.empty((stop - start, t.width), dtype=torch.float32)
                terms.compute(base, start, torch.float32, tiles, out=rows)
            else:
                rows = terms.compute(base.to(self.device), start, torch.float32, tiles).cpu()
        else:
            rows = base.to(torch.float32)
        return rows

    def run(self) -> list[FileResult]:
        from ..execute import _fix_malloc_threshold

        _fix_malloc_threshold()
        tiles = None
        widths = [t.width for t in self.plan.tensors if t.source is not None and t.source.loras]
        if widths:
            tiles = ops.Tiles.allocate(max(ops.TILE_ELEMENTS, max(widths)), self.device)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.plan.file_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                       desc="writing gguf", file=terminal(), dynamic_ncols=True)
        read_q: queue.Queue = queue.Queue(maxsize=1)
        reader = threading.Thread(target=self._reader, args=(read_q,), name="streammerge-gguf-read", daemon=True)
        if self.inputs is not None:
            self.inputs.begin(self.read_order())
        reader.start()
        results: list[FileResult] = []
        writer: ShardWriter | None = None
        try:
            for f in self.plan.files:
                writer = ShardWriter(self.out_dir / f.filename, f.header, f.size)
                if bar is not None:
                    bar.update(len(f.header))
                for t in f.tensors:
                    terms = self._terms(t) if t.source is not None and t.source.loras else None
                    decoder = None
                    for expected in range(0, t.rows, t.chunk_rows):
                        got, start, stop, buf, stats = self._next(read_q)
                        if got is not t or start != expected:
                            raise ExecutionError("internal error: GGUF chunks out of order")
                        if stats is not None:  # the statistics the reader read with the first chunk
                            decoder = qs.Decoder(t.source, lambda src, stats=stats: stats[src.name], self.device)
                            del stats
                        rows = self._rows_f32(t, start, stop, buf, terms, tiles, decoder)
                        del buf  # the chunk's read buffer is free once its rows are computed
                        self._slots.release()
                        data = encode(rows, t.ggml_type, self.gguf)
                        del rows
                        writer.write(data)
                        if bar is not None:
                            bar.update(len(data))
                        del data
                    terms = decoder = None
                    if writer.position - len(f.header) != t.offset + t.nbytes:
                        raise ExecutionError(f"internal error: {t.name} wrote {writer.position - len(f.header) - t.offset} of {t.nbytes} bytes")
                    padding = pad(t.nbytes) - t.nbytes
                    if padding:
                        writer.write(b"\0" * padding)
                results.append(FileResult(f.filename, f.size, writer.commit()))
                writer = None
            if self._next(read_q) is not None:
                raise ExecutionError("internal error: GGUF reader produced more chunks than planned")
        except OSError as exc:
            raise OutputError(f"writing {self.out_dir}: {exc.strerror or exc}") from None
        finally:
            self._cancelled.set()
            reader.join()
            if self.inputs is not None:
                self.inputs.end()
            if writer is not None:
                writer.close()
            if bar is not None:
                bar.close()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        return results

    def _next(self, read_q: queue.Queue):
        while True:
            if self._error is not None:
                raise self._error
            try:
                return read_q.get(timeout=0.1)
            except queue.Empty:
                continue


def run_plan(plan: GGUFPlan, out_dir: Path, *, device: torch.device, progress: bool = False,
             inputs=None) -> tuple[list[FileResult], float]:
    started = time.perf_counter()
    results = GGUFExecutor(plan, out_dir, device=device, progress=progress, inputs=inputs).run()
    return results, time.perf_counter() - started
