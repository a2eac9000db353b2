"""What the checks of codes-plus-scales output weights share (merged_fp8, merged_mxfp4): OUT's codes
are decoded with OUT's own scale tensor by the codec's decoder, then held element by element to
E = W + Δ within the codec's quantization step (each subclass's `_tolerance`)."""

from __future__ import annotations

import torch

from ..formats import codecs
from ..formats.safetensors import TORCH_NAME
from ..planning.types import OutputTensor
from .base import U32, Chunk, Context, Fault, TensorResult
from .checks import RecomputeCheck


class ScaledWeightCheck(RecomputeCheck):
    label = ""  # the format, in messages

    def __init__(self, tensor: OutputTensor, ctx: Context):
        self.qo = tensor.quant_out
        self.broken: str | None = None
        super().__init__(tensor, ctx)
        self.category = "quant"
        self.codec = codec = codecs.get(self.qo.codec)
        scale_name, scale_dtype, scale_shape = codec.output_specs(self.param, self.qo)[1]
        scales = ctx.out_tensor(scale_name)
        if scales is None or tuple(scales.shape) != tuple(scale_shape) or scales.dtype != getattr(torch, TORCH_NAME[scale_dtype]):
            self.broken = f"its scale tensor {scale_name} is missing or is not {scale_dtype} {list(scale_shape)}"
            return
        self.decoder = codec.decoder(codec.output_format(self.qo), self.qo.weight, lambda _name: scales, ctx.device)
        self.row_bytes = codec.out_bytes(self.width)

    @property
    def param(self) -> str:
        """The weight's name as the codec's output specs take it."""
        return self.qo.weight

    def _value_dtype(self) -> str:
        return "F32"  # decoded values are float32 products; the quantization step is in _tolerance

    def _unit_roundoff(self) -> float:
        return U32

    def out_span(self, r0: int, r1: int) -> tuple[int, int]:
        return r0 * self.row_bytes, (r1 - r0) * self.row_bytes

    def feed(self, chunk: Chunk) -> None:
        if self.broken is None:
            super().feed(chunk)

    def _observed(self, chunk: Chunk, a: int, b: int, o: torch.Tensor) -> None:
        raw = torch.frombuffer(chunk.out, dtype=torch.uint8, count=len(chunk.out))[a * self.row_bytes: b * self.row_bytes]
        r0 = chunk.row_start + a
        o.copy_(self.decoder.rows(raw.to(self.ctx.device), r0, r0 + (b - a)))

    def finish(self):
        if self.broken is not None:
            name = self.tensor.name
            return TensorResult(name, "quant", False), Fault("unreadable", name, f"cannot check the {self.label} weight: {self.broken}")
        return super().finish()
