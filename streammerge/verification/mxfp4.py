"""Verify check of a merged_mxfp4 expert parameter: OUT's e2m1 codes decoded with OUT's own scales,
element by element against E = W + Δ (both in the model's [E, in, out] layout).

A block of 32 quantized with the power of two s stores x/s rounded to the nearest e2m1 value
(ties away from zero, saturating at 6). The grid's spacing is 0.5 below 2, 1 up to 4 and 2 up to
6, so a decoded value O is within half the spacing above |O|/s: `h = s · (0.25 | 0.5 | 1)` for
|O|/s in [0, 2) | [2, 4) | [4, 6]. The reference scale is the smallest power of two at or above
max|x|/6, so s never exceeds twice that of E's own block maximum; s is capped there, so an
inflated stored scale (every code rounding to 0) shows as values that differ. Then
`|O − E| ≤ h + 2u32·(|O| + |E|) + ε·Σ|f|(|col|ᵀ|row|) + floor`. A delta much smaller than the
block's step cannot be told from quantization noise.
"""

from __future__ import annotations

import torch

from ..formats import codecs
from ..planning.types import OutputTensor
from .base import U32, Chunk, Context, Fault, TensorResult
from .checks import RecomputeCheck


class Mxfp4WeightCheck(RecomputeCheck):
    """The e2m1 codes of a merged_mxfp4 expert parameter (see the module docstring)."""

    def __init__(self, tensor: OutputTensor, ctx: Context):
        self.qo = tensor.quant_out
        self.broken: str | None = None
        super().__init__(tensor, ctx)
        self.category = "quant"
        self.codec = codec = codecs.get("mxfp4")
        scale_name, _, scale_shape = codec.output_specs(self.param, self.qo)[1]
        scales = ctx.out_tensor(scale_name)
        if scales is None or tuple(scales.shape) != tuple(scale_shape) or scales.dtype != torch.uint8:
            self.broken = f"its scale tensor {scale_name} is missing or is not uint8 {list(scale_shape)}"
            return
        self.decoder = codec.decoder({"shape": list(self.qo.shape)}, self.qo.weight, lambda _name: scales, ctx.device)

    @property
    def param(self) -> str:
        return self.qo.weight.removesuffix("_blocks")

    def _value_dtype(self) -> str:
        return "F32"  # decoded values are exact products; the quantization step is in _tolerance

    def _unit_roundoff(self) -> float:
        return U32

    def out_span(self, r0: int, r1: int) -> tuple[int, int]:
        return r0 * self.width // 2, (r1 - r0) * self.width // 2

    def feed(self, chunk: Chunk) -> None:
        if self.broken is None:
            super().feed(chunk)

    def _observed(self, chunk: Chunk, a: int, b: int, o: torch.Tensor) -> None:
        half = self.width // 2
        raw = torch.frombuffer(chunk.out, dtype=torch.uint8, count=len(chunk.out))[a * half: b * half]
        r0 = chunk.row_start + a
        o.copy_(self.decoder.rows(raw.to(self.ctx.device), r0, r0 + (b - a)))

    def _tolerance(self, o, w, e, ab, bound, scratch, r0, a, chunk) -> None:
        row0 = chunk.row_start + a
        s = self.decoder.element_scales(row0, row0 + o.shape[0])
        torch.minimum(s, self.codec.element_scales_of(e, self.qo.shape).mul_(2), out=bound)
        magnitude = o.abs() / s
        step = torch.where(magnitude < 2, 0.25, torch.where(magnitude < 4, 0.5, 1.0))
        bound.mul_(step)
        bound.add_(scratch.copy_(o).abs_(), alpha=2 * U32)
        bound.add_(scratch.copy_(e).abs_(), alpha=2 * U32 + self.rho)
        bound.add_(ab, alpha=self.eps)
        bound.add_(self.floor)

    def finish(self):
        if self.broken is not None:
            name = self.tensor.name
            return TensorResult(name, "quant", False), Fault("unreadable", name, f"cannot check the MXFP4 weight: {self.broken}")
        return super().finish()
