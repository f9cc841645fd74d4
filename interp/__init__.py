"""interp: activations are data. Capture them once into a store; probe, steer and detect from there.

The public API is re-exported here lazily, so ``import interp`` stays fast and light::

    from interp import load_model, capture, ActivationStore, train_probes, diff_in_means, steer, Detector
"""

from __future__ import annotations

import importlib
from typing import Any

from interp.errors import InterpError
from interp.store import ActivationStore, StoreWriter

__version__ = "0.1.0"

_LAZY = {
    "load_model": "interp.model",
    "resolve_hooks": "interp.model",
    "tokenize": "interp.model",
    "capture": "interp.capture",
    "load_dataset": "interp.datasets",
    "Dataset": "interp.datasets",
    "LinearProbe": "interp.probes.linear",
    "ProbeSweep": "interp.probes.linear",
    "train_probes": "interp.probes.linear",
    "auroc": "interp.probes.linear",
    "binary_metrics": "interp.probes.linear",
    "recall_at_fpr": "interp.probes.linear",
    "Direction": "interp.directions",
    "diff_in_means": "interp.directions",
    "pca_direction": "interp.directions",
    "diff_in_means_tensor": "interp.directions",
    "pca_direction_tensor": "interp.directions",
    "inlp": "interp.nullspace",
    "INLPResult": "interp.nullspace",
    "inlp_tensors": "interp.nullspace",
    "projection_from_directions": "interp.nullspace",
    "steer": "interp.steering",
    "steering_vector": "interp.steering",
    "generate": "interp.steering",
    "sweep": "interp.steering",
    "Intervention": "interp.steering",
    "logit_diff": "interp.steering",
    "projection": "interp.steering",
    "probe_score": "interp.steering",
    "sweep_directions": "interp.steering",
    "compare_sae_steering": "interp.steering",
    "SAE": "interp.sae",
    "train_topk_sae": "interp.sae",
    "compare": "interp.sae",
    "evaluate": "interp.sae",
    "rank_latents": "interp.sae",
    "top_activations": "interp.sae",
    "Detector": "interp.detectors",
}

__all__ = ["ActivationStore", "InterpError", "StoreWriter", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'interp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
