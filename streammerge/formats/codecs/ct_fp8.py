"""FP8 weights as llm-compressor saves them (compressed-tensors, format "float-quantized").

On disk, for a linear module ``<m>``::

    <m>.weight        float8_e4m3fn [out, in]
    <m>.weight_scale  the model's dtype (bf16 / f16 / f32):  [1] (strategy "tensor"),
                      [out, 1] ("channel"), [ceil(out/B), ceil(in/B)] ("block", B×B tiles)

(plus ``<m>.input_scale`` for static activation scales, an ordinary tensor here). Dequantizing is
compressed-tensors' ``dequantize``: ``float(code) · scale`` computed in the scale's dtype (the exact
product rounded once to it). Quantizing follows compressed-tensors' ``calculate_qparams`` and
``quantize`` for a symmetric 8-bit float scheme, given the float32 weight: with ``a`` the group's
max |W|, ``scale = a / 448`` in float32 (an all-zero group gets float32's eps, so nothing divides
by zero), stored in the scale dtype; the codes are ``clamp(W / stored scale, ±448)`` cast to e4m3.
A "tensor" scale needs the whole tensor's maximum before its first code: its quantizer is fed a
measuring pass first. Pure torch, device-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ...errors import ExecutionError
from ..safetensors import FROM_TORCH_NAME, TORCH_NAME
from . import register
from .base import ScaledWeightCodec, refuse_nonfinite
from .fp8 import E4M3, FP8_MAX, _tile_view, expand_rows, tile_amax

STRATEGIES = ("tensor", "channel", "block")
SCALE_DTYPES = ("BF16", "F16", "F32")
SCALE_SUFFIX = "_scale"  # "<m>.weight" -> "<m>.weight_scale"
EPS = torch.finfo(torch.float32).eps

Read = Callable[[str], torch.Tensor]


def scale_name(weight: str) -> str:
    return weight + SCALE_SUFFIX


@dataclass(frozen=True)
class CtFp8Format:
    """One compressed-tensors FP8 weight (JSON-friendly, goes into the MergePlan)."""

    shape: tuple[int, int]
    strategy: str
    scale_dtype: str  # safetensors dtype of weight_scale
    block: int = 0  # the tile side of strategy "block"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"an FP8 weight must be 2-D [out, in] with positive sizes, got {list(self.shape)}")
        if self.strategy not in STRATEGIES or self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"unknown FP8 strategy/scale dtype {self.strategy!r}/{self.scale_dtype!r}")
        if (self.strategy == "block") != (self.block > 0):
            raise ValueError("strategy 'block' needs a positive block size, and only it")

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return scale_shape(self.shape, self.strategy, self.block)

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "strategy": self.strategy, "scale_dtype": self.scale_dtype, "block": self.block}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "CtFp8Format":
        unknown = set(d) - {"shape", "strategy", "scale_dtype", "block"}
        if unknown:
            raise ValueError(f"unknown CtFp8Format field(s) {sorted(unknown)}")
        return cls(tuple(d["shape"]), d["strategy"], d["scale_dtype"], int(d.get("block", 0)))


def scale_shape(shape: tuple[int, ...], strategy: str, block: int) -> tuple[int, ...]:
    if strategy == "tensor":
        return (1,)
    if strategy == "channel":
        return (shape[0], 1)
    return -(-shape[0] // block), -(-shape[1] // block)


def _torch_dtype(safetensors_dtype: str) -> torch.dtype:
    return getattr(torch, TORCH_NAME[safetensors_dtype])


def group_amax(rows: torch.Tensor, strategy: str, block: int) -> torch.Tensor:
    """max |x| per scale group of `rows` [n, width]: [1] | [n, 1] | per tile (n: whole tiles or the last rows)."""
    if strategy == "tensor":
        return rows.abs().amax().reshape(1)
    if strategy == "channel":
        return rows.abs().amax(dim=1, keepdim=True)
    return tile_amax(rows, block)


def scales_of(amax: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """The stored scales of groups whose max |x| is `amax` (float32): a / 448, eps for a zero group."""
    scale = amax.float() / FP8_MAX
    scale = torch.where(scale == 0, torch.full_like(scale, EPS), scale)
    return scale.to(_torch_dtype(scale_dtype))


def _apply(rows: torch.Tensor, scales: torch.Tensor, strategy: str, row_start: int, block: int, op) -> None:
    """`op(values, their scales)` in place over `rows` [n, width], each element with its group's float32
    scale; `row_start` is the first row's index into `scales` ("block": its row within the first tile row given)."""
    s = scales.float()
    if strategy != "block":
        op(rows, s[row_start:row_start + rows.shape[0]] if strategy == "channel" else s)
        return
    s = expand_rows(s, row_start, rows.shape[0], block)
    tiles, rest = _tile_view(rows, block)
    op(tiles, s[:, : tiles.shape[1], None])
    if rest.shape[1]:
        op(rest, s[:, tiles.shape[1]:])


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, fmt: CtFp8Format, row_start: int) -> torch.Tensor:
    """float32 rows of e4m3 `codes` [n, in]: the product with the group's scale, rounded to the scale dtype.
    `scales`: the whole scale tensor ("block": its tile rows from row_start // B on)."""
    w = codes.view(E4M3).float()
    _apply(w, scales, fmt.strategy, row_start % fmt.block if fmt.strategy == "block" else row_start, fmt.block,
           lambda v, s: v.mul_(s))
    if fmt.scale_dtype != "F32":
        w = w.to(_torch_dtype(fmt.scale_dtype)).float()
    return w


def quantize_rows(rows: torch.Tensor, scales: torch.Tensor, fmt: CtFp8Format, row_start: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """e4m3 codes (uint8 [n, in], into `out` if given) of float32 `rows` with the stored `scales`
    (as in dequantize_rows)."""
    scaled = rows.clone()
    _apply(scaled, scales, fmt.strategy, row_start % fmt.block if fmt.strategy == "block" else row_start, fmt.block,
           lambda v, s: v.div_(s))
    scaled.clamp_(-FP8_MAX, FP8_MAX)
    codes = out if out is not None else torch.empty(rows.shape, dtype=torch.uint8, device=rows.device)
    codes = codes.view(rows.shape)
    codes.view(E4M3).copy_(scaled)
    return codes


def _format_of(qo) -> CtFp8Format:
    """The format a QuantOut of this codec describes (quant_type: strategy, blocksize: tile, dtype: scale dtype)."""
    return CtFp8Format(tuple(qo.shape), qo.quant_type, FROM_TORCH_NAME[qo.dtype], qo.blocksize)


class CtFp8Codec(ScaledWeightCodec):
    name = "ct_fp8"
    method = None  # --method merged_fp8 of a compressed-tensors base (planning/quant.py)
    description = "compressed-tensors FP8 (e4m3 weight, weight_scale per tensor / channel / tile; llm-compressor)"
    format_class = CtFp8Format
    stash_part = "weight_scale"

    # -- as a source

    def source_state_bytes(self, fmt_json: dict[str, Any], rows: int) -> int:
        n = 1
        for d in self.format(fmt_json).scale_shape:
            n *= d
        return n * 8  # stored and as float32 on the device

    def decoder(self, fmt_json: dict[str, Any], name: str, read: Read, device: torch.device) -> "CtFp8Decoder":
        return CtFp8Decoder(self.format(fmt_json), read(scale_name(name)).to(device))

    # -- as an output (merged_fp8 of a compressed-tensors base)

    def block_alignment(self, width: int, blocksize: int) -> int:
        return max(1, blocksize)

    def output_state_bytes(self, elements: int, blocksize: int) -> int:
        # tile scales, or one per row (rows of at least 64 elements in any real linear layer); three copies
        return (elements // (blocksize * blocksize if blocksize else 64) + 1) * 4 * 3

    @staticmethod
    def measured_first(qo) -> bool:
        """A per-tensor scale is the whole tensor's: a measuring pass runs before the codes are written."""
        return qo.quant_type == "tensor"

    def quantizer(self, qo) -> "CtFp8Quantizer":
        return CtFp8Quantizer(qo)

    @staticmethod
    def output_format(qo) -> dict[str, Any]:
        """The source-format JSON of an output weight of this codec (verify decodes what was written)."""
        return _format_of(qo).to_json()

    @staticmethod
    def output_specs(name: str, qo) -> list[tuple[str, str, tuple[int, ...]]]:
        """(tensor name, safetensors dtype, shape) of each stored part: the codes, then the scales."""
        fmt = _format_of(qo)
        return [(name, "F8_E4M3", fmt.shape), (scale_name(name), fmt.scale_dtype, fmt.scale_shape)]


class CtFp8Decoder:
    def __init__(self, fmt: CtFp8Format, scales: torch.Tensor):
        self.fmt = fmt
        self.scales = scales
        # a decoded value is the product rounded to the scale dtype: its unit roundoff (relative)
        self.value_roundoff = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 0.0}[fmt.scale_dtype]

    def _rows_scales(self, row_start: int, row_stop: int) -> torch.Tensor:
        if self.fmt.strategy != "block":
            return self.scales
        b = self.fmt.block
        return self.scales[row_start // b: -(-row_stop // b)]

    def rows(self, raw: torch.Tensor, row_start: int, row_stop: int) -> torch.Tensor:
        codes = raw.view(row_stop - row_start, self.fmt.shape[1])
        return dequantize_rows(codes, self._rows_scales(row_start, row_stop), self.fmt, row_start)

    def element_scales(self, row_start: int, row_stop: int) -> torch.Tensor:
        """The float32 scale of every element of rows [row_start, row_stop) (for verify)."""
        s = torch.ones(row_stop - row_start, self.fmt.shape[1], dtype=torch.float32, device=self.scales.device)
        fmt = self.fmt
        _apply(s, self._rows_scales(row_start, row_stop), fmt.strategy,
               row_start % fmt.block if fmt.strategy == "block" else row_start, fmt.block, lambda v, sc: v.mul_(sc))
        return s


class CtFp8Quantizer:
    """The merged side of one weight: its codes in row order and its `weight_scale` part. A per-tensor
    scale comes from the measuring pass before (`use_measured`)."""

    def __init__(self, qo):
        self.qo = qo
        self.fmt = _format_of(qo)
        self._scales: list[torch.Tensor] = []
        self._amax: torch.Tensor | None = None
        self._tensor_scale: torch.Tensor | None = None
        self._row = 0

    def use_measured(self, stats: dict[str, torch.Tensor]) -> None:
        self._tensor_scale = stats["weight_scale"]

    def _check(self, merged: torch.Tensor) -> None:
        refuse_nonfinite(merged, self.qo.weight, self._row, "row", "FP8")

    def _group_scales(self, merged: torch.Tensor) -> torch.Tensor:
        return scales_of(group_amax(merged, self.fmt.strategy, self.fmt.block), self.fmt.scale_dtype)

    def measure(self, merged: torch.Tensor) -> None:
        self._check(merged)
        if self.fmt.strategy == "tensor":
            amax = merged.abs().amax().reshape(1).cpu()
            self._amax = amax if self._amax is None else torch.maximum(self._amax, amax)
        else:
            self._scales.append(self._group_scales(merged).cpu())
        self._row += merged.shape[0]

    def pack(self, merged: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check(merged)
        if self.fmt.strategy == "tensor":
            if self._tensor_scale is None:
                raise ExecutionError(f"internal error: the per-tensor scale of {self.qo.weight} was not measured first")
            scales = self._tensor_scale.to(merged.device)
        else:
            scales = self._group_scales(merged)
            self._scales.append(scales.cpu())
        codes = quantize_rows(merged, scales, self.fmt, 0, out)  # the scales of these rows (chunks start on a tile)
        self._row += merged.shape[0]
        return codes

    def finish(self) -> dict[str, torch.Tensor]:
        if self.fmt.strategy == "tensor":
            scale = self._tensor_scale if self._tensor_scale is not None else scales_of(self._amax, self.fmt.scale_dtype)
            return {"weight_scale": scale.contiguous()}
        return {"weight_scale": torch.cat(self._scales).contiguous()}


CT_FP8 = register(CtFp8Codec())
