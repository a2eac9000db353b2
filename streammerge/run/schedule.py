"""How a plan is streamed: the memory layout the budget fixes, row chunks, and the work in file order.

All tensor data lives in two fixed pools of buffers allocated once (plus a float32 tile workspace,
the LoRA factors of the tensor in flight and a codec's per-tensor state), so the budget is what is
resident, not an estimate. Pure functions of the plan: nothing here reads or writes a file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Iterator

from .. import ops
from ..errors import PlanError
from ..formats import codecs
from ..formats.safetensors import ITEMSIZE
from ..options import format_size
from ..planning import streaming as qs
from ..planning.streaming import factor_bytes, needs_prepass
from ..planning.types import MergePlan, OutputTensor

READ_BUFFERS = 4  # one being read, one queued, one being computed on, one written or hashed (copies)

WRITE_BUFFERS = 3  # one being filled by the math, one being written, one being hashed

QUANT_ROW_COST = 12  # bytes per element of a bitsandbytes chunk: float32 rows, scaled copy, int32 codes

ENCODE_ROW_COST = 16  # bytes per element of an encoded chunk: float32 rows, transformed copy, the codec's pieces

def _rows_and_width(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:])) if shape else (1, 1)


@dataclass(frozen=True)
class Layout:
    """How the `--max-memory` budget is spent: buffer sizes fixed before the first read."""

    buffer_bytes: int  # each read and write buffer (a chunk's stored bytes, in or out)
    tile_elements: int  # float32 elements per tile (two tiles)
    factor_bytes: int  # the largest tensor's LoRA factors, raw and float32
    quant_bytes: int = 0  # the largest codec per-tensor state (see planning.streaming.state_bytes)
    work_bytes: int = 0  # a decoded or quantized chunk's float32 rows and temporaries (0: no such tensor)

    @property
    def total(self) -> int:
        return ((READ_BUFFERS + WRITE_BUFFERS) * self.buffer_bytes + self.work_bytes + 8 * self.tile_elements
                + self.factor_bytes + self.quant_bytes)


MATH_OPS = ("merge", "bias_add", "token_rows")  # ops computed in float32 from base + terms


def _factor_bytes(tensor: OutputTensor) -> int:
    return factor_bytes(tensor)


def is_passthrough(tensor: OutputTensor) -> bool:
    """Bytes written as read: a copy, or an adapter's full tensor already in the output dtype."""
    if tensor.encoding is not None:
        return False
    return tensor.op == "copy" or (tensor.op == "replace" and tensor.source.dtype == tensor.dtype)


def _io_row_bytes(tensor: OutputTensor) -> int:
    """Stored bytes of one row in a read or a write buffer: the larger of the source's and the output's."""
    width = _rows_and_width(tensor.weight_shape)[1]
    if not (qs.involves_quant(tensor) or tensor.encoding is not None):
        return width * max(ITEMSIZE[tensor.source.dtype], ITEMSIZE[tensor.dtype])
    source = qs.source_span(tensor, 0, 1)[1] if tensor.source is not None else 0
    if tensor.quant_out is not None:
        out = qs.output_codec(tensor.quant_out).out_bytes(width)
    elif tensor.encoding is not None:
        out = codecs.get(tensor.encoding).row_bytes(width)
    else:
        out = width * ITEMSIZE[tensor.dtype]
    return max(source, out, 1)


def _work_row_bytes(tensor: OutputTensor) -> int:
    """float32 bytes of one row of a chunk whose rows are decoded, quantized or encoded whole (0: tiled)."""
    width = _rows_and_width(tensor.weight_shape)[1]
    if qs.involves_quant(tensor):
        return width * QUANT_ROW_COST
    if tensor.encoding is not None:
        return width * ENCODE_ROW_COST
    return 0


def _streamed(plan: MergePlan) -> list[OutputTensor]:
    """Tensors whose source rows are streamed (a 4-bit output's statistic parts and generated
    tensors are derived instead)."""
    return [t for t in plan.tensors if (t.quant_out is None or t.quant_out.part == "weight") and t.op != "constant"]


def _group_work(tensor: OutputTensor) -> int:
    """An encoding's fixed temporaries, whatever the chunk's size (gguf's quantizers work per row group)."""
    if tensor.encoding is None:
        return 0
    group = getattr(codecs.get(tensor.encoding), "group_work_bytes", None)
    return group(_rows_and_width(tensor.weight_shape)[1]) if group is not None else 0


def plan_layout(plan: MergePlan) -> Layout:
    """Seven read/write buffers of one size and, when some chunk is decoded or quantized whole, a
    work reservation for its float32 rows: a buffer's share of the budget, or one aligned row group
    of the widest such tensor when that is more (a gpt-oss expert: 66 MB of float32 for 8 MB of MXFP4)."""
    streamed = _streamed(plan)
    merges = [t for t in streamed if t.op in MATH_OPS or t.loras or qs.involves_quant(t)]
    tile = max([ops.TILE_ELEMENTS] + [_rows_and_width(t.weight_shape)[1] for t in merges]) if merges else 0
    factors = max((_factor_bytes(t) for t in merges), default=0)
    # a quantized source's statistics: the tensor's in flight, the next one's read ahead with its first chunk
    quant = 2 * max((qs.state_bytes(t) for t in streamed), default=0)
    quant += max((_group_work(t) for t in streamed), default=0)
    fixed = 8 * tile + factors + quant
    count = READ_BUFFERS + WRITE_BUFFERS
    # per tensor once: (name, rows, aligned row group's io bytes, work bytes, io and work bytes of one row)
    sizes = []
    for t in streamed:
        align, rows = qs.row_alignment(t), _rows_and_width(t.weight_shape)[0]
        io, work_row = _io_row_bytes(t), _work_row_bytes(t)
        sizes.append((t.name, rows, align * io, align * work_row, io, work_row))
    widest_io_name, _, widest_io = max(((n, 0, g) for n, _, g, _, _, _ in sizes), key=lambda x: x[2], default=("", 0, 1))
    widest_work_name, _, widest_work = max(((n, 0, w) for n, _, _, w, _, _ in sizes), key=lambda x: x[2], default=("", 0, 0))
    budget = plan.options.max_memory
    if widest_work:
        share = (budget - fixed) // (count + 1)
        work = max(widest_work, min(share, budget - fixed - count * widest_io))
        buffer_bytes = (budget - fixed - work) // count
    else:
        work, buffer_bytes = 0, (budget - fixed) // count
    if buffer_bytes < widest_io:
        need = fixed + count * widest_io + widest_work
        name = widest_io_name if widest_io * count >= widest_work else widest_work_name
        raise PlanError(
            f"--max-memory {format_size(budget)} is too small: one row (or block row group) of the widest tensor "
            f"({name}) does not fit beside the per-tensor state ({format_size(fixed)}); "
            f"use at least --max-memory {math.ceil(need / 1e6)}MB"
        )
    largest = max((rows * io for _, rows, _, _, io, _ in sizes), default=1)
    largest_work = max((rows * w for _, rows, _, _, _, w in sizes), default=0)
    return Layout(min(buffer_bytes, max(largest, 1)), tile, factors, quant, min(work, largest_work))


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
    step = max(1, layout.buffer_bytes // _io_row_bytes(tensor))
    work_row = _work_row_bytes(tensor)
    if work_row:
        step = max(1, min(step, layout.work_bytes // work_row))
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
    (column-norm DoRA) a first read of every row for the column norms, (a per-tensor scale) a
    statistics pass."""
    first = [Pass(tensor, "roundtrip")] if tensor.roundtrip is not None and tensor.roundtrip.double_quant else []
    if needs_prepass(tensor):
        first.append(Pass(tensor, "prepass"))
    qo = tensor.quant_out
    if purpose == "write" and qo is not None and qo.part == "weight" and qs.measured_first(qo):
        first.append(Pass(tensor, "stats"))  # the whole weight's statistic, handed to the writing pass
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
            if t.op == "constant":  # generated from the plan's values: nothing to read
                yield ("part", t)
                continue
            if qo is None or qo.part == "weight":
                for p in _passes(t, "write"):
                    yield ("pass", p)
                if qo is not None:
                    known.add(t.name)
                    last[0] = t.name
                continue
            if qo.part == qs.stash_part(qo):
                if last[0] != qo.weight:
                    yield from stats(qo.weight)
            elif qo.part in qs.small_parts(qo) and qo.weight not in known:
                yield from stats(qo.weight)
            yield ("part", t)
        yield ("close", shard)
