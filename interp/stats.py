"""Uncertainty of classifier metrics: Wilson intervals for proportions, DeLong's for the AUROC (numpy only)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Z95 = 1.959963984540054


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a proportion ``p`` observed over ``n`` trials; NaNs without data."""
    if n is None or n <= 0 or p is None or not math.isfinite(p):
        return float("nan"), float("nan")
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def delong_placements(scores: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components of the AUROC: one per positive (V10) and one per negative (V01)."""
    s, yy = np.asarray(scores, dtype=np.float64), np.asarray(y).astype(int)
    pos, neg = s[yy == 1], s[yy == 0]
    gt = (pos[:, None] > neg[None, :]).astype(np.float64) + 0.5 * (pos[:, None] == neg[None, :])
    return gt.mean(1), gt.mean(0)


def auroc_ci(scores: Any, y: Any) -> dict[str, float]:
    """AUROC (positive class ``y == 1``) with DeLong's 95% confidence interval, clipped to [0, 1]."""
    yy = np.asarray(y).astype(int)
    if yy.size == 0 or yy.min() == yy.max():
        return {"auroc": float("nan"), "lo": float("nan"), "hi": float("nan")}
    v10, v01 = delong_placements(scores, yy)
    auc = float(v10.mean())
    var = (v10.var(ddof=1) / v10.size if v10.size > 1 else 0.0) + (v01.var(ddof=1) / v01.size if v01.size > 1 else 0.0)
    se = math.sqrt(var)
    return {"auroc": auc, "lo": max(0.0, auc - 1.96 * se), "hi": min(1.0, auc + 1.96 * se)}
