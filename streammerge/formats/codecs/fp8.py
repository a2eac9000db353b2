"""Block FP8 weights as DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8 and GLM-4.5-FP8 ship them.

On disk, for a linear module ``<m>``::

    <m>.weight            float8_e4m3fn [out, in]
    <m>.weight_scale_inv  float32       [ceil(out/B), ceil(in/B)]   B = weight_block_size (128)

with ``quantization_config = {"quant_method": "fp8", "weight_block_size": [B, B], ...}``. The value of
element (i, j) is ``float32(weight[i, j]) * weight_scale_inv[i // B, j // B]``, one float32 product
(what transformers' ``Fp8Dequantize`` computes before casting to the model dtype).

Quantizing a tile follows transformers' fine-grained FP8 quantizer (``Fp8Quantize``): with ``a`` the
tile's max |W| (in float32), ``scale = 448 / a`` (1 for an all-zero tile), the stored inverse is
``float32(1 / scale)`` and the codes are ``clamp(W * scale, -448, 448)`` cast to e4m3 (round to
nearest even). Edge tiles of a shape that is not a multiple of B take the max over the elements
they hold, as DeepSeek's own checkpoints store them (transformers' quantizer, which leaves such
tensors unquantized, gives the same bytes on the zero-padded tensor). Pure torch, device-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from . import register
from .base import ScaledWeightCodec, refuse_nonfinite

FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"  # "<m>.weight" -> "<m>.weight_scale_inv"
DEFAULT_BLOCK = 128
E4M3 = torch.float8_e4m3fn

Read = Callable[[str], torch.Tensor]


def scale_name(weight: str) -> str:
    return weight + SCALE_SUFFIX


@dataclass(frozen=True)
class Fp8BlockFormat:
    """One block-FP8 weight (JSON-friendly, goes into the MergePlan)."""

    shape: tuple[int, int]
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(map(int, self.shape)))
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"block FP8 weight must be 2-D [out, in] with positive sizes, got {list(self.shape)}")
        if int(self.block) <= 0:
            raise ValueError(f"block size must be positive, got {self.block}")

    @property
    def scale_shape(self) -> tuple[int, int]:
        return scale_shape(self.shape, self.block)

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "block": self.block}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Fp8BlockFormat":
        unknown = set(d) - {"shape", "block"}
        if unknown:
            raise ValueError(f"unknown Fp8BlockFormat field(s) {sorted(unknown)}")
        return cls(tuple(d["shape"]), int(d.get("block", DEFAULT_BLOCK)))


def scale_shape(shape: tuple[int, ...], block: int) -> tuple[int, int]:
    return -(-shape[0] // block), -(-shape[1] // block)


def _tile_view(x: torch.Tensor, block: int):
    """`x` [n, width] as (full column tiles [n, full, block], the remaining columns [n, rest])."""
    width = x.shape[1]
    full = width // block
    return x[:, : full * block].unflatten(1, (full, block)), x[:, full * block:]


def expand_rows(scale_rows: torch.Tensor, row_start: int, n: int, block: int) -> torch.Tensor:
    """The scale row of each of rows [row_start, row_start + n) (`scale_rows` start at row_start // block)."""
    index = (torch.arange(row_start, row_start + n, device=scale_rows.device) // block) - row_start // block
    return scale_rows[index]


def dequantize_rows(codes: torch.Tensor, scale_rows: torch.Tensor, row_start: int, block: int) -> torch.Tensor:
    """float32 rows: e4m3 `codes` [n, width] (any integer/float8 view of the bytes) times their tile's scale."""
    w = codes.view(E4M3).float()
    s = expand_rows(scale_rows.float(), row_start, w.shape[0], block)
    tiles, rest = _tile_view(w, block)
    tiles.mul_(s[:, : tiles.shape[1], None])
    if rest.shape[1]:
        rest.mul_(s[:, tiles.shape[1]:])
    return w


def tile_amax(rows: torch.Tensor, block: int) -> torch.Tensor:
    """max |x| of each B×B tile of `rows` [n, width] (n: whole tiles, or the tensor's last rows)."""
    n, width = rows.shape
    n_tr, n_tc = -(-n // block), -(-width // block)
    out = torch.empty(n_tr, n_tc, dtype=torch.float32, device=rows.device)
    for i in range(n_tr):  # one tile row at a time: the temporaries stay within B rows
        part = rows[i * block:(i + 1) * block].abs()
        tiles, rest = _tile_view(part, block)
        if tiles.shape[1]:
            out[i, : tiles.shape[1]] = tiles.amax(dim=(0, 2))
        if rest.shape[1]:
            out[i, tiles.shape[1]:] = rest.amax()
    return out


def scales_of(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the multiplier each tile is quantized with, the float32 inverse stored as weight_scale_inv)."""
    positive = amax > 0
    scale = torch.where(positive, FP8_MAX / torch.where(positive, amax, torch.ones_like(amax)), torch.ones_like(amax))
    return scale, (1.0 / scale).to(torch.float32)


def quantize_rows(rows: torch.Tensor, row_start: int, block: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 `rows` [n, width] starting at a tile row (`row_start` % block == 0) -> (e4m3 codes as
    uint8 [n, width], written into `out` if given; weight_scale_inv rows [ceil(n/B), ceil(width/B)])."""
    if row_start % block:
        raise ValueError(f"internal error: an FP8 chunk starts at row {row_start}, inside a {block}-row tile")
    scale, inv = scales_of(tile_amax(rows, block))
    codes = out if out is not None else torch.empty(rows.shape, dtype=torch.uint8, device=rows.device)
    codes = codes.view(rows.shape)
    work = torch.empty((min(block, rows.shape[0]), rows.shape[1]), dtype=torch.float32, device=rows.device)
    for i in range(scale.shape[0]):  # one tile row at a time: one float32 temporary of B rows
        part = rows[i * block:(i + 1) * block]
        scaled = work[: part.shape[0]]
        tiles, rest = _tile_view(part, block)
        st, sr = _tile_view(scaled, block)
        torch.mul(tiles, scale[i, None, : tiles.shape[1], None], out=st)
        if rest.shape[1]:
            torch.mul(rest, scale[i, tiles.shape[1]:], out=sr)
        scaled.clamp_(-FP8_MAX, FP8_MAX)
        codes[i * block:(i + 1) * block].view(E4M3).copy_(scaled)
    return codes, inv


class Fp8BlockCodec(ScaledWeightCodec):
    name = "fp8"
    method = None  # --method merged_fp8 is planned with the quantized weights (planning/quant.py)
    description = "block FP8 (e4m3 weight, float32 weight_scale_inv per B×B tile; DeepSeek-V3 style)"
    format_class = Fp8BlockFormat
    stash_part = "weight_scale_inv"

    # -- as a source

    def source_state_bytes(self, fmt_json: dict[str, Any], rows: int) -> int:
        r, c = self.format(fmt_json).scale_shape
        return r * c * 4 * 2  # stored and on the device

    def decoder(self, fmt_json: dict[str, Any], name: str, read: Read, device: torch.device) -> "Fp8Decoder":
        return Fp8Decoder(self.format(fmt_json), read(scale_name(name)).to(device))

    # -- as an output (--method merged_fp8)

    def block_alignment(self, width: int, blocksize: int) -> int:
        return blocksize

    def output_state_bytes(self, elements: int, blocksize: int) -> int:
        return -(-elements // (blocksize * blocksize)) * 4 * 3  # tile scales, their concatenation, the stash

    def quantizer(self, qo) -> "Fp8Quantizer":
        return Fp8Quantizer(qo)

    @staticmethod
    def output_format(qo) -> dict[str, Any]:
        """The source-format JSON of an output weight of this codec (verify decodes what was written)."""
        return Fp8BlockFormat(tuple(qo.shape), qo.blocksize).to_json()

    @staticmethod
    def output_specs(name: str, qo) -> list[tuple[str, str, tuple[int, ...]]]:
        """(tensor name, safetensors dtype, shape) of each stored part: the codes, then the scales."""
        return [(name, "F8_E4M3", tuple(qo.shape)), (scale_name(name), "F32", scale_shape(qo.shape, qo.blocksize))]


class Fp8Decoder:
    value_roundoff = 0.0  # a decoded value is one float32 product

    def __init__(self, fmt: Fp8BlockFormat, scales: torch.Tensor):
        self.fmt = fmt
        self.scales = scales.float()

    def rows(self, raw: torch.Tensor, row_start: int, row_stop: int) -> torch.Tensor:
        b = self.fmt.block
        codes = raw.view(row_stop - row_start, self.fmt.shape[1])
        return dequantize_rows(codes, self.scales[row_start // b: -(-row_stop // b)], row_start, b)

    def element_scales(self, row_start: int, row_stop: int) -> torch.Tensor:
        """The scale of every element of rows [row_start, row_stop) (float32 [rows, width]; for verify)."""
        b = self.fmt.block
        s = expand_rows(self.scales[row_start // b: -(-row_stop // b)], row_start, row_stop - row_start, b)
        return s.repeat_interleave(b, dim=1)[:, : self.fmt.shape[1]]


class Fp8Quantizer:
    """The merged_fp8 side of one weight: codes of its merged float32 rows, in row order, and the
    scales of every tile row seen (the `weight_scale_inv` part)."""

    def __init__(self, qo):
        self.qo = qo
        self.block = qo.blocksize
        self._scales: list[torch.Tensor] = []
        self._row = 0

    def _check(self, merged: torch.Tensor) -> None:
        refuse_nonfinite(merged, self.qo.weight, self._row, "row", "FP8")

    def pack(self, merged: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check(merged)
        codes, inv = quantize_rows(merged, self._row, self.block, out)
        self._scales.append(inv.cpu())
        self._row += merged.shape[0]
        return codes

    def measure(self, merged: torch.Tensor) -> None:
        self._check(merged)
        self._scales.append(scales_of(tile_amax(merged, self.block))[1].cpu())
        self._row += merged.shape[0]

    def finish(self) -> dict[str, torch.Tensor]:
        scales = torch.cat(self._scales) if self._scales else torch.empty(0, 0)
        return {"weight_scale_inv": scales.contiguous()}


FP8 = register(Fp8BlockCodec())
