"""Probe metrics in torch (no scikit-learn at runtime): accuracy, AUROC (tie-aware Mann-Whitney) and the recall
at a 1% false-positive rate, for one score vector or batched over many probes scored on the same rows (a sweep's
hooks and values of C); for several classes, AUROC and recall are one-vs-rest macro averages."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import AnalysisError


def _as_1d(x: Any, dtype: torch.dtype) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().reshape(-1).to("cpu", dtype)


def auroc(scores: Float[Tensor, " n"], y: Int[Tensor, " n"]) -> float:
    """Area under the ROC curve of ``scores`` for the positive class ``y == 1`` (ties count one half).

    NaN when ``y`` has only one class.
    """
    return float(_auroc_rows(_as_1d(scores, torch.float64)[None], _as_1d(y, torch.int64) == 1)[0])


def _auroc_rows(s: Float[Tensor, "B n"], pos: Tensor) -> Float[Tensor, " B"]:
    """:func:`auroc` of every row of ``s`` (float64) against the same positives ``pos`` [n] (bool)."""
    B, n = s.shape
    n_pos = int(pos.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.full((B,), math.nan, dtype=torch.float64)
    sorted_s, order = torch.sort(s, dim=1)
    idx = torch.arange(n).expand(B, n)
    differs = sorted_s[:, 1:] != sorted_s[:, :-1]
    true = torch.ones(B, 1, dtype=torch.bool)
    first = torch.where(torch.cat([true, differs], 1), idx, 0).cummax(1).values  # start of each tie group
    last = torch.where(torch.cat([differs, true], 1), idx, n).flip(1).cummin(1).values.flip(1)  # its end
    ranks = torch.empty_like(s).scatter_(1, order, (first + last).double() / 2 + 1)  # 1-based average ranks
    return (ranks[:, pos].sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def recall_at_fpr(
    scores: Float[Tensor, " n"], y: Int[Tensor, " n"], fpr: float = 0.01, min_negatives: int | None = None
) -> float:
    """The largest recall among thresholds whose false-positive rate is at most ``fpr``.

    NaN (undefined, not a number to report) with one class, or with fewer than ``min_negatives`` negatives
    (default ``ceil(1 / fpr)``: 100 at 1%): with fewer, a false-positive rate of ``fpr`` cannot even be observed."""
    s = _as_1d(scores, torch.float64)
    return float(_recall_rows(s[None], _as_1d(y, torch.int64) == 1, fpr, min_negatives)[0])


def _recall_rows(s: Float[Tensor, "B n"], pos: Tensor, fpr: float = 0.01, min_negatives: int | None = None) -> Tensor:
    """:func:`recall_at_fpr` of every row of ``s`` against the same positives ``pos`` [n] (bool)."""
    B = s.shape[0]
    need = math.ceil(1.0 / fpr - 1e-9) if min_negatives is None else int(min_negatives)
    n_neg = int((~pos).sum())
    if not bool(pos.any()) or n_neg == 0 or n_neg < need:
        return torch.full((B,), math.nan, dtype=torch.float64)
    neg_sorted = torch.sort(s[:, ~pos], dim=1, descending=True).values
    k = int(math.floor(fpr * n_neg + 1e-9))  # negatives allowed above the threshold
    thr = neg_sorted[:, k : k + 1] if k < n_neg else torch.full((B, 1), -math.inf, dtype=torch.float64)
    return (s[:, pos] > thr).double().mean(1)


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the defined values; NaN (not a warning) when none is defined, e.g. recall with too few negatives."""
    v = [x for x in values if not math.isnan(x)]
    return sum(v) / len(v) if v else float("nan")  # as np.mean for a handful of values, without its overhead


def binary_metrics(scores: Float[Tensor, " n"], y: Int[Tensor, " n"], threshold: float = 0.0) -> dict[str, float]:
    """``accuracy`` (score > threshold means class 1), ``auroc`` and ``recall_at_1pct_fpr`` of binary scores."""
    s = _as_1d(scores, torch.float64)
    yy = _as_1d(y, torch.int64)
    if s.numel() != yy.numel():
        raise AnalysisError(f"{s.numel()} scores for {yy.numel()} labels")
    return _binary_rows(s[None], yy, threshold)[0]


def _binary_rows(s: Float[Tensor, "B n"], y: Int[Tensor, " n"], threshold: float = 0.0) -> list[dict[str, float]]:
    """:func:`binary_metrics` of every row of ``s`` (float64) against the same labels ``y``."""
    pos = y == 1
    acc = ((s > threshold).long() == y).double().mean(1) if s.shape[1] else torch.full((s.shape[0],), math.nan)
    cols = zip(acc.tolist(), _auroc_rows(s, pos).tolist(), _recall_rows(s, pos, 0.01).tolist())
    return [{"accuracy": a, "auroc": u, "recall_at_1pct_fpr": r} for a, u, r in cols]


def multiclass_metrics(scores: Float[Tensor, "n k"], y: Int[Tensor, " n"]) -> dict[str, float]:
    """Accuracy of the arg-max class; AUROC and recall at 1% FPR as one-vs-rest macro averages."""
    s = scores.detach().to("cpu", torch.float64)
    yy = _as_1d(y, torch.int64)
    acc = float((s.argmax(1) == yy).double().mean()) if yy.numel() else float("nan")
    aucs, recalls = [], []
    for c in range(s.shape[1]):
        yc = (yy == c).long()
        if 0 < int(yc.sum()) < yc.numel():
            aucs.append(auroc(s[:, c], yc))
            recalls.append(recall_at_fpr(s[:, c], yc))
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"accuracy": acc, "auroc": mean(aucs), "recall_at_1pct_fpr": mean(recalls)}


def _metrics(scores: Tensor, y: Tensor) -> dict[str, float]:
    """Binary metrics for ``[n]`` logits, multi-class for ``[n, k]`` one-vs-rest logits."""
    return binary_metrics(scores, y) if scores.dim() == 1 else multiclass_metrics(scores, y)
