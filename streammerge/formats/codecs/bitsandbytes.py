"""bitsandbytes' quantized weights as codecs: 4-bit nf4/fp4 (`bnb4`) and LLM.int8() (`int8`).

A stored weight is its packed tensor plus companion statistics (absmax, code books, quant state;
SCB); `format` is the codec's JSON (`Bnb4Format` / `Int8Format`) that the planner recorded. The
values are bitsandbytes' own (see :mod:`.bnb4` and :mod:`.int8`): decoding is
``float32(dequantize_4bit(W))`` / ``int8_vectorwise_dequant(W)``; a merged_4bit output is
``quantize_4bit`` of the merged float32 rows, with a statistics pass where the layout needs it.
Statistics are decoded once per tensor, on the CPU, so that every device sees the same absmax.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch

from . import bnb4, bnb4_quantize, int8, register
from .base import Codec
from ..safetensors import FROM_TORCH_NAME

Read = Callable[[str], torch.Tensor]  # companion tensor name -> its stored values


class Bnb4Codec(Codec):
    name = "bnb4"
    description = "bitsandbytes 4-bit (nf4/fp4) blocks, statistics in companion tensors"
    stash_part = "absmax"  # the statistic kept from the weight's last pass for its tensor
    small_parts = ("quant_state", "nested_absmax")  # statistics kept until written

    @staticmethod
    def format(fmt_json: dict[str, Any]) -> bnb4.Bnb4Format:
        return bnb4.Bnb4Format.from_json(fmt_json)

    def block_alignment(self, width: int, blocksize: int) -> int:
        """Rows at which a chunk starts on a whole block and a whole packed byte."""
        return bnb4.row_alignment(width, blocksize)

    def source_alignment(self, fmt_json: dict[str, Any]) -> int:
        fmt = self.format(fmt_json)
        return bnb4.row_alignment(fmt.n_cols, fmt.blocksize)

    def source_span(self, fmt_json: dict[str, Any], row_start: int, row_stop: int) -> tuple[int, int]:
        cr = bnb4.chunk_ranges(self.format(fmt_json), row_start, row_stop)
        return cr.byte_start, cr.byte_end - cr.byte_start

    def source_state_bytes(self, fmt_json: dict[str, Any], rows: int) -> int:
        return self.format(fmt_json).n_blocks * 9  # stored absmax (<= 4 B) + decoded float32 + nested

    def output_state_bytes(self, elements: int, blocksize: int) -> int:
        return -(-elements // blocksize) * 4 * 6  # chunk absmax list, concatenation, double quant, stash

    def out_bytes(self, elements: int) -> int:
        """Packed bytes of the first `elements` values (two per byte)."""
        return (elements + 1) // 2

    def decoded_dtype(self, fmt_json: dict[str, Any]) -> str:
        """Safetensors dtype of the rows `decoder` returns (bitsandbytes dequantizes to the quant state's dtype)."""
        return FROM_TORCH_NAME[self.format(fmt_json).dtype]

    def decoder(self, fmt_json: dict[str, Any], name: str, read: Read, device: torch.device) -> "Bnb4Decoder":
        return Bnb4Decoder(self.format(fmt_json), name, read, device)

    def roundtrip(self, shape: tuple[int, ...], dtype_name: str, rt, device: torch.device) -> "RoundTrip":
        return RoundTrip(shape, dtype_name, rt, device)

    def quantizer(self, qo) -> "OutputQuantizer":
        return OutputQuantizer(qo)

    @staticmethod
    def constant_part(qo) -> torch.Tensor | None:
        """The statistic tensors that do not depend on the data (bitsandbytes' code books), else None."""
        if qo.part == "quant_map":
            return bnb4.codebook(qo.quant_type).to(torch.float32).contiguous()
        if qo.part == "nested_quant_map":
            return bnb4.bitsandbytes_functional().create_dynamic_map().to(torch.float32).contiguous()
        return None

    @staticmethod
    def part_tensor(stats: dict[str, torch.Tensor], qo) -> torch.Tensor:
        """The finished statistic tensor for part `qo.part` of ``Bnb4Quantizer.finish()``'s output."""
        key = bnb4.QUANT_STATE_PREFIX + qo.quant_type if qo.part == "quant_state" else qo.part
        return stats[key]

    @staticmethod
    def quant_state_dict(stats: dict[str, torch.Tensor], quant_type: str) -> dict:
        return json.loads(bytes(stats[bnb4.QUANT_STATE_PREFIX + quant_type].numpy()).decode("utf-8"))


class Bnb4Decoder:
    """Rows of a 4-bit weight as float32, sliced from ``dequantize_4bit``'s result."""

    def __init__(self, fmt: bnb4.Bnb4Format, name: str, read: Read, device: torch.device):
        self.fmt = fmt
        nested = [read(f"{name}.{k}") for k in ("nested_absmax", "nested_quant_map")] if fmt.nested else [None, None]
        self.absmax = bnb4.decode_absmax(fmt, read(f"{name}.absmax"), *nested).to(device)
        self.code = bnb4.codebook(fmt.quant_type).to(device)

    def rows(self, raw: torch.Tensor, row_start: int, row_stop: int) -> torch.Tensor:
        """float32 [rows, width] from the chunk's raw source bytes (uint8, on the device)."""
        cr = bnb4.chunk_ranges(self.fmt, row_start, row_stop)
        out = bnb4.dequantize_range(self.fmt, raw, self.absmax[cr.block_start:cr.block_end], self.code, cr.n_elements)
        return out.view(row_stop - row_start, self.fmt.n_cols)


class RoundTrip:
    """``--base-roundtrip``: rows of ``dequantize_4bit(quantize_4bit(W))`` in W's dtype, as float32.

    quantize_4bit is block-local, so a chunk quantizes on its own; with double quantization the
    decoded absmax depends on the whole tensor, so a statistics pass (:meth:`observe`) runs first.
    """

    def __init__(self, shape: tuple[int, ...], dtype_name: str, rt, device: torch.device):
        self.shape = tuple(shape)
        self.rt = rt
        self.device = device
        self.fmt = bnb4_quantize._fmt_for(self.shape, rt.quant_type, rt.blocksize, rt.double_quant, dtype_name, "uint8", 0.0)
        self.code = bnb4.codebook(rt.quant_type).to(device)
        self._stats = bnb4_quantize.Bnb4Quantizer(self.shape, rt.quant_type, rt.blocksize, rt.double_quant, dtype_name)
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
        packed, absmax = bnb4_quantize.quantize_4bit_chunk(flat, self.rt.blocksize, self.rt.quant_type)
        if self.rt.double_quant:
            if self._decoded is None:
                raise RuntimeError("internal error: round-trip statistics pass did not run")
            b0 = row_start * self.fmt.n_cols // self.rt.blocksize
            absmax = self._decoded[b0:b0 + -(-n // self.rt.blocksize)]
        return bnb4.dequantize_range(self.fmt, packed, absmax.float(), self.code, n).view(base_rows.shape)


class OutputQuantizer:
    """The merged_4bit side of one weight: a :class:`bnb4_quantize.Bnb4Quantizer` over its merged float32 rows."""

    def __init__(self, qo):
        self.qo = qo
        self.q = bnb4_quantize.Bnb4Quantizer(tuple(qo.shape), qo.quant_type, qo.blocksize, qo.double_quant, qo.dtype, qo.quant_storage)

    def pack(self, merged: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.q.add(merged, out)

    def measure(self, merged: torch.Tensor) -> None:
        self.q.add_absmax(merged)

    def finish(self) -> dict[str, torch.Tensor]:
        return self.q.finish()


class Int8Codec(Codec):
    name = "int8"
    description = "bitsandbytes LLM.int8(): int8 rows with a per-row absmax (SCB)"

    def source_alignment(self, fmt_json: dict[str, Any]) -> int:
        return 1

    def source_span(self, fmt_json: dict[str, Any], row_start: int, row_stop: int) -> tuple[int, int]:
        width = int8.Int8Format.from_json(fmt_json).shape[1]
        return row_start * width, (row_stop - row_start) * width

    def source_state_bytes(self, fmt_json: dict[str, Any], rows: int) -> int:
        return rows * 8  # SCB, raw and on the device

    def decoded_dtype(self, fmt_json: dict[str, Any]) -> str:
        return "F32"  # int8_vectorwise_dequant returns float32

    def decoder(self, fmt_json: dict[str, Any], name: str, read: Read, device: torch.device) -> "Int8Decoder":
        return Int8Decoder(int8.Int8Format.from_json(fmt_json), name, read, device)


class Int8Decoder:
    def __init__(self, fmt: int8.Int8Format, name: str, read: Read, device: torch.device):
        self.fmt = fmt
        self.scb = read(f"{name[: -len('weight')]}SCB").to(device)

    def rows(self, raw: torch.Tensor, row_start: int, row_stop: int) -> torch.Tensor:
        rows = raw.view(torch.int8).view(row_stop - row_start, self.fmt.shape[1])
        return int8.dequantize_int8_rows(rows, self.scb[row_start:row_stop])


BNB4 = register(Bnb4Codec())
INT8 = register(Int8Codec())
