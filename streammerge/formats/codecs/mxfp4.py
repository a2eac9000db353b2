"""MXFP4 expert weights as gpt-oss ships them (OCP microscaling: e2m1 values, one E8M0 scale per 32).

On disk, for the fused expert parameter ``<m>.gate_up_proj`` (and ``<m>.down_proj``)::

    <m>.gate_up_proj_blocks  uint8 [E, out, in/32, 16]   two e2m1 codes per byte, low nibble first
    <m>.gate_up_proj_scales  uint8 [E, out, in/32]       E8M0: the block's scale is 2**(byte - 127)

with ``quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [...]}``. Each
expert is stored [out, in] and quantized along `in`; transformers dequantizes it and transposes it
into the model's parameter ``[E, in, out]`` (gate and up interleaved along `out`, untouched). The
logical weight here is that parameter, so a LoRA on it (PEFT's ``target_parameters``) merges as on
a 16-bit gpt-oss; one row of it is one expert.

Quantizing follows the reference quantizer that serves these models (triton_kernels' torch
``downcast_to_mxfp``, scale rounding up): per block of 32 along `in`, the scale is ``max|x| / 6``
rounded up to a power of two (its float32 exponent field is the stored byte; an all-zero block
gets byte 0 and codes 0), each value is ``x / scale`` rounded to the nearest e2m1 value with ties
away from zero, saturating at 6, keeping the sign bit (so -0.0 is code 8). Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from . import register
from .base import ScaledWeightCodec, refuse_nonfinite

BLOCK = 32  # elements per scale
BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# |x / scale| at or above the k-th midpoint rounds to code k + 1 (ties away from zero)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

Read = Callable[[str], torch.Tensor]


def blocks_name(param: str) -> str:
    return param + BLOCKS_SUFFIX


def scales_name(param: str) -> str:
    return param + SCALES_SUFFIX


@dataclass(frozen=True)
class Mxfp4Format:
    """One MXFP4 expert parameter (JSON-friendly, goes into the MergePlan): the model's shape [E, in, out]."""

    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if len(self.shape) != 3 or min(self.shape) <= 0 or self.shape[1] % BLOCK:
            raise ValueError(f"an MXFP4 expert parameter is [experts, in, out] with `in` a multiple of {BLOCK}, "
                             f"got {list(self.shape)}")

    @property
    def stored_blocks(self) -> tuple[int, int, int, int]:
        e, i, o = self.shape
        return e, o, i // BLOCK, BLOCK // 2

    @property
    def stored_scales(self) -> tuple[int, int, int]:
        e, i, o = self.shape
        return e, o, i // BLOCK

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Mxfp4Format":
        unknown = set(d) - {"shape"}
        if unknown:
            raise ValueError(f"unknown Mxfp4Format field(s) {sorted(unknown)}")
        return cls(tuple(d["shape"]))


def _lookup(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 value of each 4-bit code, float32 2**(b - 127) of each scale byte b; exact, 2**-127 included)."""
    half = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    codes = torch.cat([half, -half])
    powers = torch.ldexp(torch.ones(256, dtype=torch.float32, device=device),
                         torch.arange(-127, 129, dtype=torch.int32, device=device))
    return codes, powers


def dequantize_experts(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [n, in, out] of `blocks` uint8 [n, out, in/2] and `scales` uint8 [n, out, in/32]:
    each code's value times its block's power of two, one exact product, in the model's layout
    (the bytes are transposed, not the float32 values)."""
    codes, powers = _lookup(blocks.device)
    n, out, half = blocks.shape
    raw = blocks.transpose(1, 2).contiguous()  # [n, in/2, out]
    values = torch.empty((n, half, 2, out), dtype=torch.float32, device=blocks.device)
    values[:, :, 0] = codes[(raw & 0x0F).long()]
    values[:, :, 1] = codes[(raw >> 4).long()]
    values = values.view(n, half * 2 // BLOCK, BLOCK, out)
    values.mul_(powers[scales.reshape(n, out, -1).transpose(1, 2).long()].unsqueeze(2))
    return values.view(n, half * 2, out)


def scale_bits(amax: torch.Tensor) -> torch.Tensor:
    """float32 bits of each block's scale: max|x| / 6 rounded up to a power of two (a mantissa carries
    into the exponent; 0 stays 0)."""
    return ((amax / 6.0).view(torch.int32) + 0x007FFFFF) & 0x7F800000


def quantize_experts(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [n, in, out] (the model's layout) -> (blocks uint8 [n, out, in/2], scales uint8 [n, out, in/32]).
    A block is 32 consecutive `in` rows of one column: the values stay in place, only the bytes are
    transposed to the stored [out, in] layout."""
    n, width, out = weights.shape
    x = weights.view(n, width // BLOCK, BLOCK, out)
    bits = scale_bits(x.abs().amax(dim=2, keepdim=True))
    scale = bits.view(torch.float32)
    q = x * torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    code = torch.signbit(q).view(torch.uint8) << 3
    q.abs_()
    above = torch.empty(q.shape, dtype=torch.bool, device=q.device)
    for midpoint in _MIDPOINTS:  # the magnitude's code is how many midpoints |q| reaches (ties go up)
        code += torch.ge(q, midpoint, out=above)
    del q, above
    pairs = code.view(n, width // 2, 2, out)
    blocks = pairs[:, :, 0] | (pairs[:, :, 1] << 4)
    stored_scales = (bits.view(n, width // BLOCK, out) >> 23).to(torch.uint8)
    return blocks.transpose(1, 2).contiguous(), stored_scales.transpose(1, 2).contiguous()


class Mxfp4Codec(ScaledWeightCodec):
    name = "mxfp4"
    block = BLOCK
    method = None  # --method merged_mxfp4 is planned with the quantized weights (planning/quant.py)
    description = "MXFP4 (e2m1 codes, an E8M0 scale per 32 values; gpt-oss experts)"
    format_class = Mxfp4Format
    stash_part = "scales"

    # -- as a source (rows are experts)

    def source_span(self, fmt_json: dict[str, Any], row_start: int, row_stop: int) -> tuple[int, int]:
        _, i, o = self.format(fmt_json).shape
        per_expert = i * o // 2
        return row_start * per_expert, (row_stop - row_start) * per_expert

    def source_state_bytes(self, fmt_json: dict[str, Any], rows: int) -> int:
        e, i, o = self.format(fmt_json).shape
        return e * o * (i // BLOCK) * 2  # the stored scales and their copy on the device

    def decoder(self, fmt_json: dict[str, Any], name: str, read: Read, device: torch.device) -> "Mxfp4Decoder":
        fmt = self.format(fmt_json)
        return Mxfp4Decoder(fmt, read(scales_name(name.removesuffix(BLOCKS_SUFFIX))).to(device))

    # -- as an output (--method merged_mxfp4)

    def block_alignment(self, width: int, blocksize: int) -> int:
        return 1

    def output_state_bytes(self, elements: int, blocksize: int) -> int:
        return elements // BLOCK * 2  # the scales of each expert, then their concatenation (kept as the stash)

    def out_bytes(self, elements: int) -> int:
        return elements // 2

    def quantizer(self, qo) -> "Mxfp4Quantizer":
        return Mxfp4Quantizer(qo)

    @staticmethod
    def output_format(qo) -> dict[str, Any]:
        """The source-format JSON of an output weight of this codec (verify decodes what was written)."""
        return Mxfp4Format(tuple(qo.shape)).to_json()

    @staticmethod
    def element_scales_of(values: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """The scale the reference quantizer gives each element's block of `values` (rows of experts in
        the model's layout, [n, in*out]), per element (for verify)."""
        _, width, out = shape
        n = values.shape[0]
        amax = values.view(n, width // BLOCK, BLOCK, out).abs().amax(dim=2, keepdim=True)
        scale = scale_bits(amax).view(torch.float32)
        return scale.expand(n, width // BLOCK, BLOCK, out).reshape(n, width * out)

    @staticmethod
    def output_specs(name: str, qo) -> list[tuple[str, str, tuple[int, ...]]]:
        """(tensor name, safetensors dtype, shape) of each stored part of parameter `name`: blocks, then scales."""
        fmt = Mxfp4Format(tuple(qo.shape))
        return [(blocks_name(name), "U8", fmt.stored_blocks), (scales_name(name), "U8", fmt.stored_scales)]


class Mxfp4Decoder:
    def __init__(self, fmt: Mxfp4Format, scales: torch.Tensor):
        self.fmt = fmt
        self.scales = scales

    def rows(self, raw: torch.Tensor, row_start: int, row_stop: int) -> torch.Tensor:
        _, i, o = self.fmt.shape
        n = row_stop - row_start
        w = dequantize_experts(raw.view(n, o, i // 2), self.scales[row_start:row_stop])
        return w.reshape(n, i * o)

    def element_scales(self, row_start: int, row_stop: int) -> torch.Tensor:
        """The scale of every element of experts [row_start, row_stop), in the model's layout (for verify)."""
        _, i, o = self.fmt.shape
        _, powers = _lookup(self.scales.device)
        s = powers[self.scales[row_start:row_stop].long()]  # [n, out, in/32]
        return s.repeat_interleave(BLOCK, dim=2).transpose(1, 2).reshape(row_stop - row_start, i * o)


class Mxfp4Quantizer:
    """The merged_mxfp4 side of one expert parameter: codes of its merged float32 experts, in order,
    and the scales of every expert seen (the `_scales` part)."""

    def __init__(self, qo):
        self.qo = qo
        self.shape = tuple(qo.shape)
        self._scales: list[torch.Tensor] = []
        self._row = 0

    def _quantize(self, merged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        refuse_nonfinite(merged, self.qo.weight, self._row, "expert", "MXFP4")
        _, i, o = self.shape
        blocks, scales = quantize_experts(merged.view(merged.shape[0], i, o))
        self._scales.append(scales.cpu())
        self._row += merged.shape[0]
        return blocks

    def pack(self, merged: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        blocks = self._quantize(merged).reshape(-1)
        if out is None:
            return blocks
        out.copy_(blocks)
        return out

    def measure(self, merged: torch.Tensor) -> None:
        self._quantize(merged)

    def finish(self) -> dict[str, torch.Tensor]:
        return {"scales": torch.cat(self._scales).contiguous() if self._scales else torch.empty(0, dtype=torch.uint8)}


MXFP4 = register(Mxfp4Codec())
