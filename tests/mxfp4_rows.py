"""Inputs for the MXFP4 golden test: the corners of the MX quantizer (all-zero and signed-zero
blocks, exact rounding ties, values one ulp either side of them, subnormals, the float32 extremes,
scales that are exact powers of two), built from integer draws and exact scalings only."""

from __future__ import annotations

import numpy as np

WIDTH = 512  # sixteen 32-value blocks per row


def golden_rows(seed: int = 5) -> np.ndarray:
    rng = np.random.RandomState(seed)

    def uniform(n: int) -> np.ndarray:
        return rng.random_sample(n) - 0.5

    k = np.arange(32)
    grid = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    f32 = np.float32

    def around(values: np.ndarray, direction: float) -> np.ndarray:
        return np.nextafter(values.astype(f32), f32(direction)).astype(np.float64)

    blocks = [
        np.zeros(32),
        np.tile([0.0, -0.0], 16),
        np.concatenate([ties, -ties, grid, -grid, [6.0, -6.0]]),  # amax 6: scale 1, exact ties
        np.concatenate([ties, -ties, grid, -grid, [6.0, -6.0]]) * 2.0 ** -20,
        np.concatenate([around(ties, 0), around(ties, 10), grid, [6.0] * 10]),
        np.concatenate([around(-ties, 0), around(-ties, -10), -grid, [-6.0] * 10]),
        np.where(k == 7, 5.9, 1e-3 * uniform(32)),  # one outlier: the rest round to zero
        np.where(k == 7, 6.0 * 2.0 ** 10, uniform(32)),
        1e-41 * uniform(32),  # subnormal in float32: the scale underflows to byte 0
        np.where(k == 0, 1e-38, 1e-40 * uniform(32)),
        3.0e38 * uniform(32),  # near the float32 maximum
        np.full(32, 6.0 * 2.0 ** 30),
        np.full(32, 6.0 * 2.0 ** 30) * (1 + 2.0 ** -23),  # just above a power of two: the scale doubles
        -np.abs(uniform(32)),
        np.round(uniform(32) * 96) / 8,  # a coarse grid
        uniform(32) * np.ldexp(1.0, rng.randint(-12, 6, 32)),  # wide dynamic range within a block
    ]
    while len(blocks) < 256:
        blocks.append(uniform(32) * float(np.ldexp(1.0, int(rng.randint(-20, 20)))))
    return np.concatenate(blocks).astype(np.float32).reshape(-1, WIDTH)
