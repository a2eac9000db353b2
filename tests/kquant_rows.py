"""Inputs for the K-quant golden test: the corners of llama.cpp's super-block quantizers, built from
integer draws and exact scalings only (no libm function), so every machine makes the same floats."""

from __future__ import annotations

import numpy as np

WIDTH = 512  # two super-blocks per row


def golden_rows(seed: int = 11) -> np.ndarray:
    rng = np.random.RandomState(seed)

    def uniform(n: int) -> np.ndarray:  # exact: 53-bit integers over 2^53, centred
        return rng.random_sample(n) - 0.5

    def powers(n: int, lo: int, hi: int) -> np.ndarray:
        return np.ldexp(1.0, rng.randint(lo, hi, n))

    k = np.arange(256)
    blocks = [
        np.zeros(256),
        np.full(256, 0.0123),
        np.full(256, -0.5),
        np.where(k == 17, 3.0, 1e-3 * uniform(256)),  # one outlier
        1e-7 * uniform(256),
        1e-41 * uniform(256),  # subnormal in float32
        -np.abs(uniform(256)),  # only negative: the min is the whole range
        np.abs(uniform(256)) + 0.25,  # only positive: the min is clamped to 0
        np.round(uniform(256) * 64) / 8,  # a coarse grid: rounding ties
        powers(256, -20, 4) * np.sign(uniform(256)),
        uniform(256) * powers(256, -12, 6),  # wide dynamic range within a block
        np.concatenate([np.zeros(128), uniform(128)]),
        np.concatenate([uniform(16) * 100, uniform(240) * 1e-3]),
        np.tile([0.0, -0.0], 128),
        np.where(k % 32 == 0, 1.0, 0.0),
        np.where(k < 16, uniform(256), 0.0),  # one 16-value group alive (Q6_K)
        np.where((k // 32) % 2 == 0, 0.0, uniform(256)),  # every other 32-value group zero (Q4_K/Q5_K)
        np.full(256, 7.0) + np.where(k == 3, 1e-6, 0.0),
    ]
    while len(blocks) < 128:
        blocks.append(uniform(256) * float(np.ldexp(1.0, int(rng.randint(-14, 3)))))
    return np.concatenate(blocks).astype(np.float32).reshape(-1, WIDTH)
