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

import torch

from ..formats import codecs
from ..formats.safetensors import TORCH_NAME
from ..planning.types import OutputTensor
from .base import U32, Chunk, Context, Fault, TensorResult
from .checks import RecomputeCheck

E4M3_HALF_ULP = 2.0**-4  # relative, normal values
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10


class Fp8WeightCheck(RecomputeCheck):
    """The e4m3 codes of a merged_fp8 weight (see the module docstring)."""

    def __init__(self, tensor: OutputTensor, ctx: Context):
        self.qo = tensor.quant_out
        self.broken: str | None = None
        super().__init__(tensor, ctx)
        self.category = "quant"
        codec = codecs.get(self.qo.codec)  # block FP8 or compressed-tensors FP8
        scale_name, scale_dtype, scale_shape = codec.output_specs(self.qo.weight, self.qo)[1]
        scales = ctx.out_tensor(scale_name)
        if scales is None or tuple(scales.shape) != tuple(scale_shape) or scales.dtype != getattr(torch, TORCH_NAME[scale_dtype]):
            self.broken = f"its scale tensor {scale_name} is missing or is not {scale_dtype} {list(scale_shape)}"
            return
        self.decoder = codec.decoder(codec.output_format(self.qo), self.qo.weight, lambda _name: scales, ctx.device)

    def _value_dtype(self) -> str:
        return "F32"  # decoded values are float32 products; the quantization step is in _tolerance

    def _unit_roundoff(self) -> float:
        return U32

    def out_span(self, r0: int, r1: int) -> tuple[int, int]:
        return r0 * self.width, (r1 - r0) * self.width

    def feed(self, chunk: Chunk) -> None:
        if self.broken is None:
            super().feed(chunk)

    def _observed(self, chunk: Chunk, a: int, b: int, o: torch.Tensor) -> None:
        raw = torch.frombuffer(chunk.out, dtype=torch.uint8, count=len(chunk.out))[a * self.width: b * self.width]
        r0 = chunk.row_start + a
        o.copy_(self.decoder.rows(raw.to(self.ctx.device), r0, r0 + (b - a)))

    def _tolerance(self, o, w, e, ab, bound, scratch, r0, a, chunk) -> None:
        row0 = chunk.row_start + a
        bound.copy_(self.decoder.element_scales(row0, row0 + o.shape[0])).mul_(E4M3_SUBNORMAL_HALF_STEP)
        bound.add_(scratch.copy_(o).abs_(), alpha=E4M3_HALF_ULP + 2 * U32 + self.decoder.value_roundoff)
        bound.add_(scratch.copy_(e).abs_(), alpha=2 * U32 + self.rho)
        bound.add_(ab, alpha=self.eps)
        bound.add_(self.floor)

    def finish(self):
        if self.broken is not None:
            name = self.tensor.name
            return TensorResult(name, "quant", False), Fault("unreadable", name, f"cannot check the FP8 weight: {self.broken}")
        return super().finish()
