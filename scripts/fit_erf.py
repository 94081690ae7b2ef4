"""Fits the rational erf approximation of csrc/kernels/activation.h (the fused GELU).

erf(x) ~= x P(x^2) / Q(x^2) on [0, EDGE] with Q(0) = 1: linearised least squares on f Q - x P
re-solved with the last Q as divisor (Sanathanan-Koerner), then Lawson reweighting towards the largest
errors (near minimax). Prints the float32 coefficients and the max absolute error in float64 and of a
float32 Horner evaluation (what the kernel computes).

Usage: python scripts/fit_erf.py [EDGE] [DEGREE_P] [DEGREE_Q]   (defaults: 3.925 6 4)
"""

from __future__ import annotations

import math
import sys

import numpy as np

EDGE = float(sys.argv[1]) if len(sys.argv) > 1 else 3.925  # erf(EDGE) rounds to 1.0 in float32
DEG_P = int(sys.argv[2]) if len(sys.argv) > 2 else 6
DEG_Q = int(sys.argv[3]) if len(sys.argv) > 3 else 4

erf = np.vectorize(math.erf)


def fit(x: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    t = x * x
    divisor, weight = np.ones_like(x), np.ones_like(x)
    for step in range(60):
        cols = [x * t**k / divisor for k in range(DEG_P + 1)] + [-f * t**k / divisor for k in range(1, DEG_Q + 1)]
        design = np.stack(cols, 1) * weight[:, None]
        solution, *_ = np.linalg.lstsq(design, f / divisor * weight, rcond=None)
        p, q = solution[: DEG_P + 1], np.concatenate([[1.0], solution[DEG_P + 1:]])
        divisor = np.polyval(q[::-1], t)
        error = x * np.polyval(p[::-1], t) / divisor - f
        if step >= 10:
            weight = weight * np.sqrt(np.abs(error) / np.abs(error).max() + 1e-3)
            weight /= weight.mean()
    return p, q, float(np.abs(error).max())


def float32_error(p: np.ndarray, q: np.ndarray) -> float:
    p32, q32 = p.astype(np.float32), q.astype(np.float32)
    x = np.linspace(0, 6, 200001).astype(np.float32)
    c = np.minimum(x, np.float32(EDGE))
    t = c * c
    num, den = np.float32(0), np.float32(0)
    for k in reversed(range(DEG_P + 1)):
        num = num * t + p32[k]
    for k in reversed(range(DEG_Q + 1)):
        den = den * t + q32[k]
    approx = np.where(x >= np.float32(EDGE), np.float32(1), c * num / den)
    return float(np.abs(approx.astype(np.float64) - erf(x.astype(np.float64))).max())


if __name__ == "__main__":
    grid = np.linspace(1e-4, EDGE, 20001)
    p, q, err64 = fit(grid, erf(grid))
    print(f"max |error|: {err64:.3g} (float64), {float32_error(p, q):.3g} (float32 Horner)")
    print("P (t^0 first):", ", ".join(f"{v:.9e}" for v in p.astype(np.float32)))
    print("Q (t^0 first):", ", ".join(f"{v:.9e}" for v in q.astype(np.float32)))
