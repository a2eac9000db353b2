"""float32 rows -> the bytes of a stored encoding: the container's row transform, then the codec.

The executor calls these for every tensor whose plan names an `encoding` (GGUF's types, a
registered codec); they are module functions so that a test can replace one to write a wrong file.
"""

from __future__ import annotations

import torch

from ..formats import codecs


def permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k permutation on a block of whole heads: HF's rotate-half row order ->
    Meta's interleaved order (row h*d + i*d/2 + j moves to h*d + 2j + i)."""
    n, width = rows.shape
    return rows.reshape(heads, 2, n // heads // 2, width).transpose(1, 2).reshape(n, width)


def transform_rows(rows: torch.Tensor, transform, chunk_rows: int, tensor_rows: int) -> torch.Tensor:
    """`transform` (planning.types.RowTransform) applied to a chunk of whole heads, in float32."""
    if transform.shift:
        rows = rows + transform.shift  # float32, as llama.cpp adds it to the float32 tensor
    if transform.permute_heads:
        rows = permute_rows(rows, transform.permute_heads * chunk_rows // tensor_rows)
    return rows


def encode(rows: torch.Tensor, encoding: str, gguf=None) -> memoryview:
    """float32 rows on the CPU -> the stored bytes of `encoding` (`gguf` is unused: the codec finds it)."""
    return codecs.get(encoding).encode(rows)
