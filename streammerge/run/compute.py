"""The math of one chunk: the base rows decoded, the LoRA terms added in float32, the result cast,
quantized or encoded into the write buffer. Runs on the compute thread, on the CPU or a CUDA device;
it reads nothing but what `read` returns (the tensor's LoRA factors) and what the reader hands it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .. import ops
from ..errors import ExecutionError
from ..formats.safetensors import ITEMSIZE, TORCH_NAME
from ..planning import streaming as qs
from ..planning.types import MergePlan, OutputTensor, Source
from . import encoded
from .schedule import Chunk, _rows_and_width
from .terms import TensorMath

def torch_dtype(safetensors_dtype: str) -> torch.dtype:
    return getattr(torch, TORCH_NAME[safetensors_dtype])


@dataclass
class PassState:
    """What one pass over a tensor's rows needs (built at its first chunk, dropped after its last)."""

    math: TensorMath | None = None  # the LoRA/DoRA/MoE/bias/token terms (None: nothing to add)
    decoder: Any | None = None
    roundtrip: Any | None = None
    quantizer: Any | None = None


def _compute_threads(plan: MergePlan, device: torch.device, available: int) -> int:
    """torch's intra-op threads for the math. Writing a 16-bit output, the reader, writer and hasher
    threads keep about one core busy, and torch threads competing with them for it cost time (on 2
    cores: 5.0 s with one thread against 6.0 s with two, on the 1.1B bench); a 4-bit output is
    bound by its quantizer, which uses them all. The FMA chain and the quantizer are elementwise, so
    the bytes do not depend on this."""
    if device.type != "cpu" or any(t.quant_out is not None or t.encoding is not None for t in plan.tensors):
        return available
    return max(1, available - 1)


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


class ChunkCompute:
    """Per-pass state (factors, decoders, quantizers) and the math of each chunk of a pass.

    `read(source)` returns a small tensor whole (LoRA factors); `remember(weight, quant_out, stats)`
    receives a 4-bit output weight's statistics when its pass ends.
    """

    def __init__(self, device: torch.device, read: Callable[[Source], torch.Tensor],
                 remember: Callable[[str, Any, dict], None], allow_nonfinite: bool):
        self.device = device
        self._read = read
        self._remember = remember
        self.allow_nonfinite = allow_nonfinite
        self._roundtrip: tuple[str, Any] | None = None  # a double-quant round trip's statistics, for the next pass
        self._prepassed: tuple[str, TensorMath] | None = None  # a column-norm DoRA's norms, for the next pass
        self._measured: tuple[str, dict] | None = None  # a statistics pass's results, for the writing pass

    def _load_factors(self, tensor: OutputTensor) -> TensorMath:
        return TensorMath.load(tensor, self._read, self.device)

    def begin(self, chunk: Chunk, stats: dict[str, torch.Tensor] | None) -> PassState:
        """Per-pass state: LoRA factors, the source's decoded statistics (read by the reader with
        the pass's first chunk), the quantizers."""
        t, purpose = chunk.tensor, chunk.purpose
        st = PassState()
        if purpose == "roundtrip":
            st.roundtrip = qs.roundtrip(t, self.device)
            return st
        if purpose != "prepass" and self._prepassed is not None and self._prepassed[0] == t.name:
            st.math = self._prepassed[1]  # the column norms its prepass just measured
        elif t.loras:
            st.math = self._load_factors(t)
        self._prepassed = None
        if t.quant_in is not None:
            st.decoder = qs.decoder(t, lambda src: stats[src.name], self.device)
        if t.roundtrip is not None:
            if t.roundtrip.double_quant:
                if self._roundtrip is None or self._roundtrip[0] != t.name:
                    raise ExecutionError(f"internal error: no round-trip statistics for {t.name}")
                st.roundtrip = self._roundtrip[1]
            else:
                st.roundtrip = qs.roundtrip(t, self.device)
        if t.quant_out is not None:
            st.quantizer = qs.output_quantizer(t.quant_out)
            if purpose == "write" and qs.measured_first(t.quant_out):
                if self._measured is None or self._measured[0] != t.name:
                    raise ExecutionError(f"internal error: no measured statistics for {t.name}")
                st.quantizer.use_measured(self._measured[1])
        self._measured = None
        return st

    def end(self, chunk: Chunk, st: PassState) -> None:
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
            stats = st.quantizer.finish()
            self._remember(t.name, t.quant_out, stats)
            if chunk.purpose == "stats":
                self._measured = (t.name, stats)

    def _weight_rows(self, chunk: Chunk, buf, length: int, st: PassState, *, raw_base: bool = False) -> torch.Tensor:
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

    def _merged_f32(self, chunk: Chunk, buf, length: int, st: PassState, tiles) -> torch.Tensor:
        """float32 rows of W + sum(w*s*B@A) (no rounding: a 4-bit output quantizes these)."""
        w = self._weight_rows(chunk, buf, length, st)
        fresh = st.decoder is not None or st.roundtrip is not None  # a tensor of our own: merge in place
        if st.math is None:
            return w if fresh else w.float()
        return st.math.compute(w, chunk.row_start, torch.float32, tiles, out=w if fresh else None)

    def _merged_pieces(self, chunk: Chunk, buf, length: int, st: PassState, tiles) -> Iterator[tuple[int, torch.Tensor]]:
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

    def observe(self, chunk: Chunk, buf, length: int, st: PassState, tiles) -> None:
        """A statistics pass: block absmax of the merged rows (or of the base, for a round trip)."""
        if chunk.purpose == "roundtrip":
            st.roundtrip.observe(self._weight_rows(chunk, buf, length, st, raw_base=True))
        elif chunk.purpose == "prepass":
            st.math.prepass(self._weight_rows(chunk, buf, length, st), chunk.row_start, tiles)
        else:
            for _, rows in self._merged_pieces(chunk, buf, length, st, tiles):
                st.quantizer.measure(rows)

    def compute_into(self, chunk: Chunk, buf: bytearray, length: int, out_buf: bytearray, st: PassState, tiles) -> int:
        """Math for one chunk, written into `out_buf`; returns the number of output bytes."""
        tensor = chunk.tensor
        if tensor.encoding is not None:
            return self._encode_into(chunk, buf, length, out_buf, st, tiles)
        if tensor.op == "quant":  # the codes of a quantized output weight (4-bit packed, FP8)
            width = _rows_and_width(tensor.weight_shape)[1]
            size = qs.output_codec(tensor.quant_out).out_bytes
            out_len = size(chunk.rows * width)
            packed = torch.frombuffer(out_buf, dtype=torch.uint8, count=out_len)
            for t0, rows in self._merged_pieces(chunk, buf, length, st, tiles):
                out = packed[size(t0 * width): size(t0 * width + rows.numel())]
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
        if not self.allow_nonfinite:
            _refuse_nonfinite(chunk, base, out)
        return out_len

    def _encode_into(self, chunk: Chunk, buf, length: int, out_buf: bytearray, st: PassState, tiles) -> int:
        """An encoded output: the merged float32 rows, the container's row transform, the codec's bytes."""
        t = chunk.tensor
        rows = self._merged_f32(chunk, buf, length, st, tiles)
        if rows.device.type != "cpu":
            rows = rows.cpu()
        if t.transform is not None:
            rows = encoded.transform_rows(rows, t.transform, chunk.rows, _rows_and_width(t.weight_shape)[0])
        data = encoded.encode(rows, t.encoding, None)
        del rows
        n = len(data)
        memoryview(out_buf)[:n] = data
        return n
