"""The tensor math, as pure device-agnostic functions on row chunks.

Numerics: `W' = cast(out, f32(W) + Σ wᵢ·sᵢ·(Bᵢ @ Aᵢ))`, computed in float32 and rounded once to
the output dtype. The rank-r dot products are accumulated element by element as a fused
multiply-add chain in k order (`acc = fma(b_k, a_k, acc)`): the arithmetic a BLAS micro-kernel
performs, but defined per element, so the bits do not depend on how rows are chunked, on the
thread count or on the device. (A plain float32 GEMM does not have that property: MKL and cuBLAS
change kernels and summation order with the number of rows.) On CPU this reproduces PEFT's
float32 `merge_and_unload` bit for bit for ranks up to 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TILE_ELEMENTS = 1 << 20  # rows are processed in tiles of ~4 MB of float32 so every pass stays in cache


@dataclass(frozen=True)
class LoraTermF32:
    """One LoRA term for one tensor, as float32 factors oriented by the rows of the base weight.

    `col[k, i]` multiplies `row[k, j]` into element (i, j) of the delta: for a weight `[out, in]`
    `col = Bᵀ` and `row = A`; for a weight stored `[in, out]` (GPT-2 Conv1D, embeddings)
    `col = A` and `row = Bᵀ`, which is the transposed delta.
    """

    col: torch.Tensor
    row: torch.Tensor
    factor: float

    @property
    def rank(self) -> int:
        return self.col.shape[0]


def lora_term(a: torch.Tensor, b: torch.Tensor, factor: float, transpose: bool, device: torch.device) -> LoraTermF32:
    a32 = a.to(device=device, dtype=torch.float32)
    b32 = b.to(device=device, dtype=torch.float32)
    col, row = (a32, b32.T) if transpose else (b32.T, a32)
    return LoraTermF32(col.contiguous(), row.contiguous(), factor)


def lora_delta(term: LoraTermF32, row_start: int, row_stop: int, out: torch.Tensor) -> torch.Tensor:
    """out[:] = factor · (delta rows [row_start, row_stop)), as an FMA chain over the rank."""
    out.zero_()
    for k in range(term.rank):
        out.addcmul_(term.col[k, row_start:row_stop].unsqueeze(1), term.row[k].unsqueeze(0))
    return out.mul_(term.factor)


@dataclass(frozen=True)
class Tiles:
    """Two float32 work tiles, allocated once per run: the accumulator and one term's delta."""

    acc: torch.Tensor
    delta: torch.Tensor

    @classmethod
    def allocate(cls, elements: int, device: torch.device) -> "Tiles":
        return cls(torch.empty(elements, dtype=torch.float32, device=device), torch.empty(elements, dtype=torch.float32, device=device))


def merge_rows(
    base_rows: torch.Tensor,
    terms: list[LoraTermF32],
    row_start: int,
    out_dtype: torch.dtype,
    tiles: Tiles | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows `[row_start, row_start + len(base_rows))` of the merged weight, in `out_dtype`
    (written into `out` when given, so the caller's buffer receives the result without a copy)."""
    rows, cols = base_rows.shape
    if tiles is None:
        tiles = Tiles.allocate(min(rows * cols, max(TILE_ELEMENTS, cols)), base_rows.device)
    if out is None:
        out = torch.empty((rows, cols), dtype=out_dtype, device=base_rows.device)
    tile_rows = max(1, tiles.acc.numel() // max(cols, 1))
    for t0 in range(0, rows, tile_rows):
        t1 = min(rows, t0 + tile_rows)
        n = (t1 - t0) * cols
        acc = tiles.acc[:n].view(t1 - t0, cols)
        acc.copy_(base_rows[t0:t1])
        for term in terms:
            acc.add_(lora_delta(term, row_start + t0, row_start + t1, tiles.delta[:n].view(t1 - t0, cols)))
        out[t0:t1].copy_(acc)
    return out


def count_nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum().item()) if t.is_floating_point() else 0


def first_nonfinite(t: torch.Tensor, where_finite: torch.Tensor | None = None, block: int = TILE_ELEMENTS) -> int | None:
    """Flat index of the first NaN/Inf of `t` (counting only places where `where_finite` is finite,
    when given), or None. Scans in blocks, so the temporary mask stays small whatever `t`'s size."""
    if not t.is_floating_point():
        return None
    flat = t.reshape(-1)
    ref = where_finite.reshape(-1) if where_finite is not None else None
    for i in range(0, flat.numel(), block):
        part = flat[i : i + block]
        if _all_finite(part):
            continue
        bad = ~torch.isfinite(part)
        if ref is not None:
            bad &= torch.isfinite(ref[i : i + block])
        hits = bad.nonzero()
        if hits.numel():
            return i + int(hits[0, 0])
    return None


def _all_finite(t: torch.Tensor) -> bool:
    """min and max propagate NaN and hold any ±inf: one pass, no temporary the size of `t`
    (isfinite(t).all() allocates a mask and is ~10x slower on CPU for half types)."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))
