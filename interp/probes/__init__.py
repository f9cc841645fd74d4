"""Linear probes: batched logistic regression over many hooks, folds and regularisation strengths.

``train_probes(store, label)`` sweeps every hook at once and returns a :class:`ProbeSweep`; ``LinearProbe`` is
the scikit-learn-style estimator for a single ``[n, d]`` matrix. Metrics helpers (``auroc``,
``binary_metrics``) are plain torch.
"""

from interp.probes.linear import (
    LinearProbe,
    ProbeSweep,
    auroc,
    binary_metrics,
    load,
    multiclass_metrics,
    recall_at_fpr,
    train_probes,
)

__all__ = [
    "LinearProbe",
    "ProbeSweep",
    "auroc",
    "binary_metrics",
    "load",
    "multiclass_metrics",
    "recall_at_fpr",
    "train_probes",
]
