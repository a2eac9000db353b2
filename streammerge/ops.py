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
from typing import Iterator

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

    def apply(self, acc: torch.Tensor, row_start: int, scratch: torch.Tensor) -> None:
        acc.add_(lora_delta(self, row_start, row_start + acc.shape[0], scratch))


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


def expert_factors(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT ParamWrapper layout -> per-expert factors: A [r*E, in] -> [E, r, in] (expert-major rows),
    B [out, r*E] -> [E, out, r] (column k*E + e belongs to expert e)."""
    a_e = a.reshape(experts, -1, a.shape[-1])
    b_e = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)
    return a_e, b_e


@dataclass(frozen=True)
class ExpertsTermF32:
    """Per-expert LoRA on a 3-D expert tensor whose rows (dim 0) are experts: expert e's matrix
    gets `factor · (B_e @ A_e)` (transposed when the tensor stores experts as [in, out]), the
    einsum PEFT's ParamWrapper computes, element by element as an FMA chain over the rank."""

    terms: tuple[LoraTermF32, ...]  # one per expert
    shape: tuple[int, int]  # each expert's matrix

    def apply(self, acc: torch.Tensor, row_start: int, scratch: torch.Tensor) -> None:
        d1, d2 = self.shape
        for i in range(acc.shape[0]):
            term = self.terms[row_start + i]
            acc[i].view(d1, d2).add_(lora_delta(term, 0, d1, scratch.view(-1)[: d1 * d2].view(d1, d2)))


def experts_term(a, b, factor, experts, transpose, shape, device) -> ExpertsTermF32:
    a_e, b_e = expert_factors(a, b, experts)
    return ExpertsTermF32(tuple(lora_term(a_e[e], b_e[e], factor, transpose, device) for e in range(experts)), shape)


@dataclass(frozen=True)
class BiasTermF32:
    """`factor · b` added to a bias (rows of width 1), as PEFT merges lora_B.bias."""

    values: torch.Tensor
    factor: float

    def apply(self, acc: torch.Tensor, row_start: int, scratch: torch.Tensor) -> None:
        rows = acc.shape[0]
        acc.add_((self.values[row_start:row_start + rows] * self.factor).view(rows, -1))


@dataclass(frozen=True)
class RowsTermF32:
    """Rows `indices` replaced by `values` (PEFT's trainable tokens: index_copy, not add)."""

    indices: tuple[int, ...]
    values: torch.Tensor

    def apply(self, acc: torch.Tensor, row_start: int, scratch: torch.Tensor) -> None:
        stop = row_start + acc.shape[0]
        for j, i in enumerate(self.indices):
            if row_start <= i < stop:
                acc[i - row_start].copy_(self.values[j])


def row_norms(acc: torch.Tensor) -> torch.Tensor:
    """‖row‖₂ of each row, as PEFT's DoRA computes it on CPU (`torch.linalg.norm(w, dim=1)` over
    contiguous rows: a per-row reduction, so it does not depend on how rows are chunked)."""
    return torch.linalg.norm(acc.to("cpu"), dim=1).to(acc.device)


@dataclass(frozen=True)
class DoraRowsF32:
    """DoRA for a weight stored [out, in]: `W' = (m / ‖W + ΔW‖_row) · (W + ΔW)`, per output row."""

    magnitude: torch.Tensor

    def apply(self, acc: torch.Tensor, row_start: int, scratch: torch.Tensor) -> None:
        scale = self.magnitude[row_start:row_start + acc.shape[0]] / row_norms(acc)
        acc.mul_(scale.view(-1, 1))


class ColumnNorms:
    """Column norms of `W + ΔW` accumulated over row chunks in row order, for DoRA on a weight
    stored [in, out] (GPT-2 Conv1D, embeddings), whose norm runs down the columns.

    PEFT computes `torch.linalg.norm` over a strided dimension; on CPU that is a sequential
    float32 sum of squares in row order, then a correctly rounded square root. Adding the squared
    rows one at a time in row order reproduces it bit for bit, whatever the chunking.
    """

    def __init__(self, cols: int, device: torch.device):
        self.sumsq = torch.zeros(cols, dtype=torch.float32, device=device)

    def add(self, acc: torch.Tensor) -> None:
        squares = acc * acc
        for i in range(squares.shape[0]):
            self.sumsq.add_(squares[i])

    def norms(self) -> torch.Tensor:
        import numpy as np

        return torch.from_numpy(np.sqrt(self.sumsq.cpu().numpy())).to(self.sumsq.device)  # IEEE sqrt


@dataclass(frozen=True)
class DoraColumnsF32:
    """DoRA for a weight stored [in, out]: every element of column j scaled by m_j / ‖column j‖."""

    scale: torch.Tensor  # magnitude / column norms, [cols]

    def apply(self, acc: torch.Tensor, row_start: int, scratch: torch.Tensor) -> None:
        acc.mul_(self.scale.view(1, -1))


@dataclass(frozen=True)
class Tiles:
    """Two float32 work tiles, allocated once per run: the accumulator and one term's delta."""

    acc: torch.Tensor
    delta: torch.Tensor

    @classmethod
    def allocate(cls, elements: int, device: torch.device) -> "Tiles":
        return cls(torch.empty(elements, dtype=torch.float32, device=device), torch.empty(elements, dtype=torch.float32, device=device))


def tile_rows(cols: int, tiles: Tiles, align: int = 1) -> int:
    """Rows per tile: as many as fit the tile, a multiple of `align` (0 when `align` rows do not fit)."""
    return tiles.acc.numel() // max(cols, 1) // align * align


def _tile_rows(base_rows: torch.Tensor, tiles: Tiles, align: int = 1) -> Iterator[tuple[int, int, torch.Tensor]]:
    rows, cols = base_rows.shape
    step = max(1, tile_rows(cols, tiles, align))
    for t0 in range(0, rows, step):
        t1 = min(rows, t0 + step)
        yield t0, t1, tiles.acc[: (t1 - t0) * cols].view(t1 - t0, cols)


def merge_rows(
    base_rows: torch.Tensor,
    terms: list,
    row_start: int,
    out_dtype: torch.dtype,
    tiles: Tiles | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows `[row_start, row_start + len(base_rows))` of the merged weight, in `out_dtype`
    (written into `out` when given, so the caller's buffer receives the result without a copy).

    Each term's `apply(acc, row_start, scratch)` changes the float32 rows in order: LoRA deltas
    add, DoRA rescales what the terms before it produced, token rows replace."""
    rows, cols = base_rows.shape
    if tiles is None:
        tiles = Tiles.allocate(min(rows * cols, max(TILE_ELEMENTS, cols)), base_rows.device)
    if out is None:
        out = torch.empty((rows, cols), dtype=out_dtype, device=base_rows.device)
    for t0, t1, acc in merged_tiles(base_rows, terms, row_start, tiles):
        out[t0:t1].copy_(acc)
    return out


def merged_tiles(
    base_rows: torch.Tensor, terms: list, row_start: int, tiles: Tiles, align: int = 1
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The merged float32 rows tile by tile, `(t0, t1, acc)` with `acc` = rows [t0, t1) of the chunk,
    valid until the next tile: a consumer that reduces each tile at once (a 4-bit quantizer) never
    needs the chunk's float32 rows in memory. Tiles are whole multiples of `align` rows (but the last)."""
    for t0, t1, acc in _tile_rows(base_rows, tiles, align):
        acc.copy_(base_rows[t0:t1])
        for term in terms:
            term.apply(acc, row_start + t0, tiles.delta[: acc.numel()].view(acc.shape))
        yield t0, t1, acc


def accumulate_columns(base_rows: torch.Tensor, terms: list, row_start: int, norms: ColumnNorms, tiles: Tiles) -> None:
    """First pass of column-norm DoRA: add the squared rows of `W + ΔW` to `norms`, in row order."""
    for t0, t1, acc in _tile_rows(base_rows, tiles):
        acc.copy_(base_rows[t0:t1])
        for term in terms:
            term.apply(acc, row_start + t0, tiles.delta[: acc.numel()].view(acc.shape))
        norms.add(acc)


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
