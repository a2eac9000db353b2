"""Verify check of a merged_fp8 weight (block FP8, or compressed-tensors FP8): OUT's e4m3 codes decoded
with OUT's own scales, element by element against E = W + Δ.

A tile quantized with multiplier m stores y = fl(x·m) rounded to e4m3 (nearest even), so the code
is within half an e4m3 ulp of y: at most 2⁻⁴·|y| for normal values and 2⁻¹⁰ below 2⁻⁶ (the
subnormal spacing is 2⁻⁹). Decoded with the stored inverse s ≈ 1/m, O = fl(code·s), so
`|O − E| ≤ 2⁻⁴·|O| + 2⁻¹⁰·s + 2u32·(|O| + |E|) + ε·Σ|f|(|col|ᵀ|row|) + floor` (plus the scale
dtype's unit roundoff times |O| where the product is rounded to it: compressed-tensors' bf16 scales). A stored scale
too small clamps the tile's largest values at ±448 and shows as values that differ; a delta much
smaller than the FP8 step (~6 % of a value) cannot be told from quantization noise.
"""

from __future__ import annotations

from .base import U32
from .scaled import ScaledWeightCheck

E4M3_HALF_ULP = 2.0**-4  # relative, normal values
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10


class Fp8WeightCheck(ScaledWeightCheck):
    """The e4m3 codes of a merged_fp8 weight (see the module docstring)."""

    label = "FP8"

    def _tolerance(self, o, w, e, ab, bound, scratch, r0, a, chunk) -> None:
        row0 = chunk.row_start + a
        bound.copy_(self.decoder.element_scales(row0, row0 + o.shape[0])).mul_(E4M3_SUBNORMAL_HALF_STEP)
        bound.add_(scratch.copy_(o).abs_(), alpha=E4M3_HALF_ULP + 2 * U32 + self.decoder.value_roundoff)
        bound.add_(scratch.copy_(e).abs_(), alpha=2 * U32 + self.rho)
        bound.add_(ab, alpha=self.eps)
        bound.add_(self.floor)
