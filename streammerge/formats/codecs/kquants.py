"""GGUF's K-quants Q4_K, Q5_K and Q6_K: super-blocks of 256 values, inline in the row.

The encoder reproduces llama.cpp's reference quantizers (`quantize_row_q{4,5,6}_K_ref` in
ggml-quants.c, what `llama-quantize` runs without an importance matrix) bit for bit, as an
FMA-free x86-64 build computes them: float32 everywhere, every sum a left-to-right loop (here
`cumsum` along the block, which is sequential, never a pairwise or matmul reduction), strict
comparisons with the first maximum winning ties, the scale search updating the minimum as it
goes, `nearest_int`'s magic-number rounding, uint8 wrap-around before the 6-bit clamp, and f16
conversions rounding to nearest even. It is vectorized across blocks: each step of the C loops runs
once over every block of the chunk. Decoding is the gguf package's.

Layout per super-block (ggml-common.h):
  Q4_K (144 bytes): d f16, dmin f16, scales[12] (6-bit scale and min per 32 values), qs[128]
  Q5_K (176 bytes): d, dmin, scales[12], qh[32] (the fifth bits), qs[128]
  Q6_K (210 bytes): ql[128], qh[64], scales[16] (int8 per 16 values), d f16
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..gguf import require
from . import register
from .base import Codec, copy_into

QK_K = 256
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
MAGIC = F32(12582912.0)  # 1.5 · 2^23: adding it leaves round-to-nearest-even(x) in the mantissa
U16 = 2.0**-8
PIECE_ELEMENTS = 1 << 18  # values quantized at once by one thread: large enough that the threads rarely wait for the GIL
PIECE_TEMPORARIES = 16  # float32 copies of a piece alive during the search (transposes, buffers, results)
MAX_WORKERS = 8


def nearest_int(x: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int: the float32 sum x + 1.5·2^23, its low mantissa bits read back."""
    bits = (x.astype(F32, copy=False) + MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def seq_sum(a: np.ndarray) -> np.ndarray:
    """Σ over the last axis in C's order (((a0 + a1) + a2) + ...), in float32 (see `colsum`)."""
    return colsum(np.ascontiguousarray(a.T))


def first_max(values: np.ndarray, start: np.ndarray | float = 0.0, key: np.ndarray | None = None):
    """The C loop `if (k > best) best = k`: strict, so the first of equal maxima wins.
    Returns (the winning key, the winning value) along the last axis."""
    key = values if key is None else key
    best_key = np.full(values.shape[:-1], start, dtype=F32)
    best_val = np.zeros(values.shape[:-1], dtype=F32)
    for j in range(values.shape[-1]):
        better = key[..., j] > best_key
        best_key = np.where(better, key[..., j], best_key)
        best_val = np.where(better, values[..., j], best_val)
    return best_key, best_val


def f16_round(x: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) as float16."""
    return x.astype(F32, copy=False).astype(np.float16)


# ------------------------------------------------------------------------------ the two searches


def colsum(a: np.ndarray) -> np.ndarray:
    """Σ down the rows of a C-contiguous (n, groups) array: for every group ((a0 + a1) + a2) + ...,
    in float32. numpy adds whole rows in order here; only a reduction along the contiguous axis is
    pairwise, which is why `a` must be C-contiguous (the golden test would see it otherwise)."""
    assert a.flags.c_contiguous
    return np.add.reduce(a, axis=0, dtype=F32)


def _levels(xt: np.ndarray, lo: np.ndarray | None, iscale: np.ndarray, lowest: int, highest: int,
            work: np.ndarray, out: np.ndarray, reach: np.ndarray) -> np.ndarray:
    """out = clamp(nearest_int(iscale · (x − lo)), lowest, highest) as float32.

    For |iscale · (x − lo)| < 2^22 llama.cpp's magic-number rounding is round-to-nearest-even, so
    adding and subtracting 1.5·2^23 gives it in float32. `reach` bounds |x − lo| per group; groups
    that may leave that range (a subnormal spread makes iscale huge or infinite) are redone with the
    integer trick itself."""
    if lo is None:
        np.multiply(xt, iscale, out=work)
    else:
        np.subtract(xt, lo, out=work)
        work *= iscale
    work += MAGIC
    work -= MAGIC
    np.clip(work, F32(lowest), F32(highest), out=out)
    with np.errstate(invalid="ignore", over="ignore"):
        safe = np.abs(iscale) * reach < F32(2**21)
    if not safe.all():
        risky = np.nonzero(~safe)[0]
        v = xt[:, risky] * iscale[risky] if lo is None else (xt[:, risky] - lo[risky]) * iscale[risky]
        out[:, risky] = np.clip(nearest_int(v), lowest, highest)
    return out


def _weighted_error(levels, scale, lo, xt, wt, tmp) -> np.ndarray:
    """Σ w·(scale·l + min − x)² per group, each product and sum as the C loop rounds it."""
    np.multiply(levels, scale, out=tmp)
    tmp += lo
    tmp -= xt
    tmp *= tmp
    tmp *= wt
    return colsum(tmp)


def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Scale and min of each group (rows of x) minimising the weighted squared error over levels
    0..nmax, searching nstep + 1 candidate scales. Returns (scale, -min, levels uint8 like x).
    Works on the transpose (one row per position in the group), so that each C loop over a group is
    one operation over all groups."""
    xt = np.ascontiguousarray(x.T)
    wt = np.ascontiguousarray(weights.T)
    lo = xt[0].copy()
    hi = xt[0].copy()
    for row in xt[1:]:
        np.copyto(lo, row, where=row < lo)
        np.copyto(hi, row, where=row > hi)
    low_x = lo.copy()

    def reach(lo):  # a bound on |x − lo| over the group
        return np.maximum(np.abs(hi - lo), np.abs(low_x - lo)) * F32(1.001)

    sum_w = colsum(wt)
    sum_x = colsum(wt * xt)
    lo[lo > 0] = 0
    flat = hi == lo
    fnmax = F32(nmax)
    work, trial, levels, tmp = (np.empty_like(xt) for _ in range(4))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = fnmax / (hi - lo)
        scale = F32(1) / iscale
        _levels(xt, lo, iscale, 0, nmax, work, levels, reach(lo))
        best = _weighted_error(levels, scale, lo, xt, wt, tmp)
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + fnmax) / (hi - lo)
            _levels(xt, lo, iscale, 0, nmax, work, trial, reach(lo))
            wl = np.multiply(wt, trial, out=work)
            sum_l = colsum(wl)
            sum_l2 = colsum(np.multiply(wl, trial, out=tmp))
            sum_xl = colsum(np.multiply(wl, xt, out=tmp))
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_min = np.where(positive, F32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            error = _weighted_error(trial, this_scale, this_min, xt, wt, tmp)
            better = (det > 0) & (error < best) & ~flat
            np.copyto(levels, trial, where=better)
            best = np.where(better, error, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    levels[:, flat] = 0
    scale = np.where(flat, F32(0), scale)
    return scale.astype(F32), (-lo).astype(F32), levels.T.astype(np.uint8)


def make_qx_quants(x: np.ndarray, nmax: int):
    """Symmetric scale of each group (rows of x) over levels -nmax..nmax-1, weights x² (rmse_type 1),
    searching 18 candidates around nmax / max. Returns (scale, levels + nmax as uint8 like x)."""
    xt = np.ascontiguousarray(x.T)
    amax = np.zeros(xt.shape[1], dtype=F32)
    signed_max = np.zeros(xt.shape[1], dtype=F32)
    for row in xt:
        ax = np.abs(row)
        better = ax > amax
        np.copyto(amax, ax, where=better)
        np.copyto(signed_max, row, where=better)
    zero = amax < GROUP_MAX_EPS
    w = xt * xt
    wx = w * xt
    work, lv, levels, tmp = (np.empty_like(xt) for _ in range(4))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):

        def sums(isc, out):
            _levels(xt, None, isc, -nmax, nmax - 1, work, out, amax * F32(1.001))
            sumlx = colsum(np.multiply(wx, out, out=tmp))
            np.multiply(w, out, out=tmp)
            np.multiply(tmp, out, out=tmp)
            return sumlx, colsum(tmp)

        sumlx, suml2 = sums(F32(-nmax) / signed_max, levels)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            isc = -(F32(nmax) + F32(0.1) * F32(step)) / signed_max
            sumlx, suml2 = sums(isc, lv)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            np.copyto(levels, lv, where=better)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    levels[:, zero] = -nmax
    scale = np.where(zero, F32(0), scale)
    levels += F32(nmax)
    return scale.astype(F32), levels.T.astype(np.uint8)


# ------------------------------------------------------------------------------ super-blocks


def _scales_and_mins(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Q4_K / Q5_K: per 32 values a scale and a min, both stored as 6-bit multiples of the super-block's
    d and dmin; then every value's level from the stored (rounded) scale and min."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    av_x = np.sqrt(seq_sum(sub * sub) / F32(32))
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, levels = make_qkx2_quants(sub, weights, nmax, rmin, rdelta, nstep)
    scales, mins, levels = scales.reshape(nb, 8), mins.reshape(nb, 8), levels.reshape(nb, 256)
    max_scale, _ = first_max(scales)
    max_min, _ = first_max(mins)
    with np.errstate(divide="ignore", over="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d = f16_round(max_scale / F32(63))
    dmin = f16_round(max_min / F32(63))
    packed = np.zeros((nb, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    step = d.astype(F32)[:, None] * ls.astype(F32)  # per 32 values
    offset = dmin.astype(F32)[:, None] * lm.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = (x.reshape(nb, 8, 32) + offset[:, :, None]) / step[:, :, None]
        fresh = np.clip(nearest_int(q), 0, nmax).astype(np.uint8)
    keep = (step == 0)[:, :, None]  # `if (!d) continue;`: the search's levels stay
    levels = np.where(keep, levels.reshape(nb, 8, 32), fresh).reshape(nb, 256)
    head = np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), packed], axis=1)
    return head, levels


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    head, levels = _scales_and_mins(x, 15, -1.0, 0.1, 20)
    lv = levels.reshape(-1, 4, 2, 32)
    qs = (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([head, qs], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    head, levels = _scales_and_mins(x, 31, -0.5, 0.1, 15)
    lv = levels.reshape(-1, 4, 2, 32)
    high = lv >> 4  # the fifth bit of each level
    low = lv & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)
    qh = ((high[:, :, 0] << shifts) | (high[:, :, 1] << (shifts + 1))).sum(axis=1, dtype=np.uint8)
    return np.concatenate([head, qh, qs], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, levels = make_qx_quants(sub, 32)
    scales, levels = scales.reshape(nb, 16), levels.reshape(nb, 256)
    max_abs, max_scale = first_max(scales, 0.0, key=np.abs(scales))
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-128) / max_scale
        d = f16_round(np.where(zero, F32(0), F32(1) / iscale))
        stored = np.minimum(nearest_int(iscale[:, None] * scales), 127)
    stored = np.where(zero[:, None], 0, stored).astype(np.int8)
    step = d.astype(F32)[:, None] * stored.astype(F32)  # per 16 values
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        fresh = (np.clip(nearest_int(x.reshape(nb, 16, 16) / step[:, :, None]), -32, 31) + 32).astype(np.uint8)
    levels = np.where((step == 0)[:, :, None], levels.reshape(nb, 16, 16), fresh).reshape(nb, 2, 4, 32)
    low = levels & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2).reshape(nb, 128)
    high = levels >> 4
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, stored.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)
    out[zero] = 0  # memset: an all-zero super-block is all zero bytes
    return out


# ------------------------------------------------------------------------------ the codecs


def workers() -> int:
    """Threads for the search: the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


class KQuant(Codec):
    block = QK_K

    def __init__(self, name: str, block_bytes: int, quantize, levels: float, description: str):
        self.name = name  # type: ignore[misc]
        self.block_bytes = block_bytes
        self.quantize = quantize
        self.levels = levels
        self.description = description  # type: ignore[misc]

    def check_width(self, name: str, width: int) -> str | None:
        return None if width % self.block == 0 else f"its rows ({width}) are not a multiple of {self.block}"

    def row_bytes(self, width: int) -> int:
        return width // self.block * self.block_bytes

    def work_bytes(self, width: int) -> int:
        return width * 4  # the encoded rows before they are copied out

    def group_work_bytes(self, width: int) -> int:
        """The search's temporaries: one piece per worker thread, whatever the chunk's size."""
        return workers() * max(PIECE_ELEMENTS, width) * 4 * PIECE_TEMPORARIES

    def encode(self, rows: torch.Tensor, out: memoryview | None = None) -> memoryview:
        """Pieces of whole rows on every core (numpy releases the GIL in its loops); each row's
        super-blocks are independent, so the pieces do not change a byte."""
        x = np.ascontiguousarray(rows.numpy(), dtype=F32)
        n, width = x.shape
        row_bytes = self.row_bytes(width)
        result = np.empty((n, row_bytes), dtype=np.uint8)
        step = max(1, PIECE_ELEMENTS // max(width, 1))

        def piece(r0: int) -> None:
            part = x[r0 : r0 + step]
            result[r0 : r0 + len(part)] = self.quantize(part.reshape(-1, QK_K)).reshape(len(part), row_bytes)

        starts = range(0, n, step)
        if len(starts) > 1 and workers() > 1:
            with ThreadPoolExecutor(min(workers(), len(starts))) as pool:
                list(pool.map(piece, starts))
        else:
            for r0 in starts:
                piece(r0)
        return copy_into(memoryview(result).cast("B"), out)

    def decode(self, raw: torch.Tensor, width: int) -> torch.Tensor:
        gguf = require()
        data = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[self.name])
        return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(-1, width)

    def tolerance(self, expected: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """A whole quantization step of the value's group (its range over the levels: the scale is a
        fitted one, and values at a clamped end may sit a step away), plus a 16-bit rounding."""
        rows, width = expected.shape
        group = 16 if self.name == "Q6_K" else 32
        blocks = expected.reshape(rows, width // group, group)
        span = blocks.amax(dim=2, keepdim=True) - blocks.amin(dim=2, keepdim=True).clamp(max=0)
        if self.name == "Q6_K":
            span = 2 * blocks.abs().amax(dim=2, keepdim=True)
        step = (span / self.levels).expand_as(blocks).reshape(rows, width)
        return (1.5 * step + U16 * expected.abs()).add_(1e-30)


Q4_K = register(KQuant("Q4_K", 144, quantize_q4_k, 15.0, "GGUF Q4_K: super-blocks of 256, 4-bit levels with 6-bit scales and mins"))
Q5_K = register(KQuant("Q5_K", 176, quantize_q5_k, 31.0, "GGUF Q5_K: super-blocks of 256, 5-bit levels with 6-bit scales and mins"))
Q6_K = register(KQuant("Q6_K", 210, quantize_q6_k, 63.0, "GGUF Q6_K: super-blocks of 256, 6-bit levels with 8-bit scales"))
