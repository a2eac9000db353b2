"""The executor's codec dispatch: bitsandbytes weights in row chunks, on the CPU or a CUDA device.

- where rows of a (possibly quantized) source live on disk (:func:`source_span`) and at which row
  multiples a chunk may start (:func:`row_alignment`);
- :class:`Decoder`: a quantized source's rows as float32 (the statistics are read and decoded once
  per tensor, on the CPU, so every device sees the same absmax);
- :class:`RoundTrip`: ``--base-roundtrip``'s dequantize(quantize(W)) of 16-bit rows;
- :class:`OutputQuantizer`: the merged rows of a merged_4bit weight, packed or only measured.

Every function returns the values bitsandbytes computes (see :mod:`.bnb4`, :mod:`.int8`).
"""

from __future__ import annotations

import json
import math
from typing import Callable

import torch

from ..io.safetensors import ITEMSIZE, TORCH_NAME
from ..planner import OutputTensor, QuantOut, Roundtrip, Source
from . import bnb4, int8

ReadFn = Callable[[Source], torch.Tensor]


def rows_and_width(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:])) if shape else (1, 1)


def involves_quant(t: OutputTensor) -> bool:
    return t.quant_in is not None or t.quant_out is not None or t.roundtrip is not None


def _bnb4_in(t: OutputTensor) -> bnb4.Bnb4Format | None:
    if t.quant_in is None or t.quant_in.codec != "bnb4":
        return None
    return bnb4.Bnb4Format.from_json(t.quant_in.format)


def row_alignment(t: OutputTensor) -> int:
    """Chunks of `t` must start at multiples of this many rows: every 4-bit format involved (source,
    output, round trip) then starts on a whole block and a whole packed byte."""
    width = rows_and_width(t.weight_shape)[1]
    align = 1
    fmt = _bnb4_in(t)
    if fmt is not None:
        align = math.lcm(align, bnb4.row_alignment(fmt.n_cols, fmt.blocksize))
    if t.quant_out is not None and t.quant_out.part == "weight":
        align = math.lcm(align, bnb4.row_alignment(width, t.quant_out.blocksize))
    if t.roundtrip is not None:
        align = math.lcm(align, bnb4.row_alignment(width, t.roundtrip.blocksize))
    return align


def source_span(t: OutputTensor, row_start: int, row_stop: int) -> tuple[int, int]:
    """(file offset, length) of the source bytes holding rows [row_start, row_stop) of `t`."""
    src = t.source
    fmt = _bnb4_in(t)
    if fmt is not None:
        cr = bnb4.chunk_ranges(fmt, row_start, row_stop)
        return src.start + cr.byte_start, cr.byte_end - cr.byte_start
    row_bytes = rows_and_width(src.shape)[1] * ITEMSIZE[src.dtype]
    return src.start + row_start * row_bytes, (row_stop - row_start) * row_bytes


def state_bytes(t: OutputTensor) -> int:
    """Per-tensor memory the codecs hold while `t` streams (decoded statistics, absmax vectors and
    the temporaries that finish them; the previous weight's statistics kept for its absmax part)."""
    if not involves_quant(t):
        return 0
    n = math.prod(t.weight_shape)
    total = 0
    fmt = _bnb4_in(t)
    if fmt is not None:
        total += fmt.n_blocks * 9  # stored absmax (<= 4 B) + decoded float32 + nested
    elif t.quant_in is not None:
        total += rows_and_width(t.weight_shape)[0] * 8  # SCB, raw and on the device
    for bs in ([t.quant_out.blocksize] if t.quant_out is not None else []) + (
        [t.roundtrip.blocksize] if t.roundtrip is not None else []
    ):
        total += -(-n // bs) * 4 * 6  # chunk absmax list, concatenation, double quant, stash of the last weight
    return total


# ----------------------------------------------------------------------------------- decoding


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class Decoder:
    """Rows of a bitsandbytes source as float32: ``float32(dequantize_4bit(W))`` or
    ``int8_vectorwise_dequant(W)``, sliced; statistics decoded once, here, on the CPU."""

    def __init__(self, t: OutputTensor, read: ReadFn, device: torch.device):
        qi = t.quant_in
        assert qi is not None
        self.codec = qi.codec
        self.device = device
        comps = {c.name: c for c in qi.companions}
        name = t.source.name
        if qi.codec == "bnb4":
            self.fmt = bnb4.Bnb4Format.from_json(qi.format)
            nested = [read(comps[f"{name}.{k}"]) for k in ("nested_absmax", "nested_quant_map")] if self.fmt.nested else [None, None]
            absmax = bnb4.decode_absmax(self.fmt, read(comps[f"{name}.absmax"]), *nested)
            self.absmax = absmax.to(device)
            self.code = bnb4.codebook(self.fmt.quant_type).to(device)
        elif qi.codec == "int8":
            self.fmt = int8.Int8Format.from_json(qi.format)
            prefix = name[: -len("weight")]
            self.scb = read(comps[f"{prefix}SCB"]).to(device)
        else:
            raise ValueError(f"unknown codec {qi.codec!r}")

    def rows(self, raw: torch.Tensor, row_start: int, row_stop: int) -> torch.Tensor:
        """float32 [rows, width] from the chunk's raw source bytes (uint8, on the device)."""
        if self.codec == "bnb4":
            cr = bnb4.chunk_ranges(self.fmt, row_start, row_stop)
            out = bnb4.dequantize_range(
                self.fmt, raw, self.absmax[cr.block_start:cr.block_end], self.code, cr.n_elements
            )
            return out.view(row_stop - row_start, self.fmt.n_cols)
        rows = raw.view(torch.int8).view(row_stop - row_start, self.fmt.shape[1])
        return int8.dequantize_int8_rows(rows, self.scb[row_start:row_stop])


# ---------------------------------------------------------------------------------- round trip


class RoundTrip:
    """``--base-roundtrip``: rows of ``dequantize_4bit(quantize_4bit(W))`` in W's dtype, as float32.

    quantize_4bit is block-local, so a chunk quantizes on its own; with double quantization the
    decoded absmax depends on the whole tensor, so a statistics pass (:meth:`observe`) runs first.
    """

    def __init__(self, t: OutputTensor, device: torch.device):
        rt: Roundtrip = t.roundtrip  # type: ignore[assignment]
        self.shape = tuple(t.weight_shape)
        self.dtype_name = TORCH_NAME[t.source.dtype]
        self.rt = rt
        self.device = device
        self.fmt = bnb4._fmt_for(self.shape, rt.quant_type, rt.blocksize, rt.double_quant, self.dtype_name, "uint8", 0.0)
        self.code = bnb4.codebook(rt.quant_type).to(device)
        self._stats = bnb4.Bnb4Quantizer(self.shape, rt.quant_type, rt.blocksize, rt.double_quant, self.dtype_name)
        self._decoded: torch.Tensor | None = None

    @property
    def needs_stats(self) -> bool:
        return self.rt.double_quant

    def observe(self, base_rows: torch.Tensor) -> None:
        self._stats.add_absmax(base_rows.float())

    def finish_stats(self) -> None:
        stats = self._stats.finish()
        self._decoded = self._stats.decoded_absmax(stats).to(self.device)

    def rows(self, base_rows: torch.Tensor, row_start: int) -> torch.Tensor:
        flat = base_rows.reshape(-1).float()
        n = flat.numel()
        packed, absmax = bnb4.quantize_4bit_chunk(flat, self.rt.blocksize, self.rt.quant_type)
        if self.rt.double_quant:
            if self._decoded is None:
                raise RuntimeError("internal error: round-trip statistics pass did not run")
            b0 = row_start * self.fmt.n_cols // self.rt.blocksize
            absmax = self._decoded[b0:b0 + -(-n // self.rt.blocksize)]
        return bnb4.dequantize_range(self.fmt, packed, absmax.float(), self.code, n).view(base_rows.shape)


# ---------------------------------------------------------------------------------- 4-bit output


class OutputQuantizer:
    """The merged_4bit side of one weight: a :class:`bnb4.Bnb4Quantizer` over its merged float32 rows."""

    def __init__(self, qo: QuantOut):
        self.qo = qo
        self.q = bnb4.Bnb4Quantizer(tuple(qo.shape), qo.quant_type, qo.blocksize, qo.double_quant, qo.dtype, qo.quant_storage)

    def pack(self, merged: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.q.add(merged, out)

    def measure(self, merged: torch.Tensor) -> None:
        self.q.add_absmax(merged)

    def finish(self) -> dict[str, torch.Tensor]:
        return self.q.finish()


def constant_part(qo: QuantOut) -> torch.Tensor | None:
    """The statistic tensors that do not depend on the data (bitsandbytes' code books), else None."""
    if qo.part == "quant_map":
        return bnb4.codebook(qo.quant_type).to(torch.float32).contiguous()
    if qo.part == "nested_quant_map":
        return bnb4.bitsandbytes_functional().create_dynamic_map().to(torch.float32).contiguous()
    return None


def json_length(stats: dict[str, torch.Tensor], quant_type: str) -> int:
    return int(stats[bnb4.QUANT_STATE_PREFIX + quant_type].numel())


def part_tensor(stats: dict[str, torch.Tensor], qo: QuantOut) -> torch.Tensor:
    """The finished statistic tensor for part `qo.part` of ``Bnb4Quantizer.finish()``'s output."""
    key = bnb4.QUANT_STATE_PREFIX + qo.quant_type if qo.part == "quant_state" else qo.part
    return stats[key]


def quant_state_dict(stats: dict[str, torch.Tensor], quant_type: str) -> dict:
    return json.loads(bytes(stats[bnb4.QUANT_STATE_PREFIX + quant_type].numpy()).decode("utf-8"))


def torch_dtype_of(name: str) -> torch.dtype:
    return _torch_dtype(TORCH_NAME[name])
