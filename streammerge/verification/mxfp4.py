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

from .base import U32
from .scaled import ScaledWeightCheck


class Mxfp4WeightCheck(ScaledWeightCheck):
    """The e2m1 codes of a merged_mxfp4 expert parameter (see the module docstring)."""

    label = "MXFP4"

    @property
    def param(self) -> str:
        return self.qo.weight.removesuffix("_blocks")

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
