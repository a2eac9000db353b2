"""GGUF's block types Q8_0, Q4_0, Q5_0 and Q5_1: 32 values per block, an f16 scale (and for Q5_1 an
f16 min) per block, inline in the row. Q5_0/Q5_1 are what llama-quantize falls back to when a row is
not whole K-quant super-blocks.

Encoding and decoding are the gguf package's own (llama.cpp's reference quantizers ported to numpy),
so the bytes are what llama.cpp's converter writes. Blocks never cross a row, so rows encode alone.
"""

from __future__ import annotations

import numpy as np
import torch

from ..gguf import require
from . import register
from .base import Codec, copy_into

U16 = 2.0**-8
QUANT_SLACK = 0.07  # the block scale is stored as f16: q·(fp16(d) − d) ≤ 127·2⁻¹¹·d
GROUP_ROWS = 16  # gguf.quants works on groups of 16 rows; its temporaries scale with that
TEMPORARIES = 8  # float32 temporaries per element of a group (abs, max, scaled, rounding steps)


class GGMLBlocks(Codec):
    block = 32

    def __init__(self, name: str, block_bytes: int, levels: float, clamps: bool):
        self.name = name  # type: ignore[misc]
        self.block_bytes = block_bytes
        self.levels = levels
        self.clamps = clamps
        self.description = f"GGUF {name}: blocks of 32 with an f16 scale"  # type: ignore[misc]
        if name == "Q5_1":
            self.description += " and min"  # type: ignore[misc]

    def check_width(self, name: str, width: int) -> str | None:
        return None if width % self.block == 0 else f"its rows ({width}) are not a multiple of {self.block}"

    def row_bytes(self, width: int) -> int:
        return width // self.block * self.block_bytes

    def work_bytes(self, width: int) -> int:
        return width * 4  # the encoded pieces the quantizer concatenates (per row, beside its output)

    def group_work_bytes(self, width: int) -> int:
        """The quantizer's temporaries for one group of rows, whatever the chunk's size."""
        return GROUP_ROWS * width * 4 * TEMPORARIES

    def _type(self):
        gguf = require()
        return gguf, gguf.GGMLQuantizationType[self.name]

    def encode(self, rows: torch.Tensor, out: memoryview | None = None) -> memoryview:
        gguf, kind = self._type()
        data = gguf.quants.quantize(rows.numpy(), kind)
        return copy_into(memoryview(np.ascontiguousarray(data)).cast("B"), out)

    def decode(self, raw: torch.Tensor, width: int) -> torch.Tensor:
        gguf, kind = self._type()
        data = gguf.quants.dequantize(raw.numpy(), kind)
        return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(-1, width)

    def tolerance(self, expected: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """Half the block's quantization step (a whole one where Q4_0 clamps), plus a 16-bit rounding."""
        mag = expected.abs()
        rows, width = expected.shape
        blocks = mag.reshape(rows, width // self.block, self.block)
        amax = blocks.amax(dim=2, keepdim=True)
        step = (amax / self.levels).expand_as(blocks)
        tol = (0.5 + QUANT_SLACK) * step
        if self.clamps:
            tol = tol + torch.where(blocks >= (self.levels - 0.5) * step, 0.5 * step, torch.zeros_like(step))
        return (tol.reshape(rows, width) + U16 * mag).add_(1e-30)


Q8_0 = register(GGMLBlocks("Q8_0", 34, 127.0, False))
Q4_0 = register(GGMLBlocks("Q4_0", 18, 8.0, True))
Q5_0 = register(GGMLBlocks("Q5_0", 22, 16.0, True))
Q5_1 = register(GGMLBlocks("Q5_1", 24, 15.5, False))  # step (max − min)/31 ≤ 2·amax/31
