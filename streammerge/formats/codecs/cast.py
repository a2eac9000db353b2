"""Plain floating-point storage (F32, F16, BF16): one value per element, rounded to nearest-even.

torch's casts round as the gguf package and safetensors' writers do, so a float32 row encoded here
is the same bytes whichever container holds it.
"""

from __future__ import annotations

import torch

from . import register
from .base import Codec, copy_into

U16 = 2.0**-8  # bfloat16's unit roundoff: another tool may round the merge (or its delta) to 16 bits


class FloatCast(Codec):
    deterministic = True

    def __init__(self, name: str, dtype: torch.dtype, unit_roundoff: float):
        self.name = name  # type: ignore[misc]
        self.dtype = dtype
        self.unit_roundoff = unit_roundoff
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.description = f"{name}, one value per element"  # type: ignore[misc]

    def row_bytes(self, width: int) -> int:
        return width * self.itemsize

    def stored(self, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        return self.name, tuple(shape)

    def encode(self, rows: torch.Tensor, out: memoryview | None = None) -> memoryview:
        values = rows.contiguous() if self.dtype == torch.float32 else rows.to(self.dtype)
        return copy_into(memoryview(values.reshape(-1).view(torch.uint8).numpy()), out)

    def decode(self, raw: torch.Tensor, width: int) -> torch.Tensor:
        return raw.contiguous().view(self.dtype).float().reshape(-1, width)

    def tolerance(self, expected: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        mag = expected.abs()
        tol = self.unit_roundoff * mag
        if delta is not None:
            tol += U16 * (mag + delta.abs())
        finfo = torch.finfo(self.dtype)
        return tol.add_(finfo.smallest_normal * finfo.eps)


F32 = register(FloatCast("F32", torch.float32, 2.0**-24))
F16 = register(FloatCast("F16", torch.float16, 2.0**-11))
BF16 = register(FloatCast("BF16", torch.bfloat16, 2.0**-8))
