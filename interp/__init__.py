"""interp: activations are data. Capture them once into a store; probe, steer and detect from there.

The public API is re-exported here lazily, so ``import interp`` stays fast and light::

    from interp import load_model, capture, ActivationStore, train_probes, diff_in_means, steer, Detector
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from interp.errors import InterpError
from interp.store import ActivationStore, StoreWriter

__version__ = "0.1.0"

_LAZY = {
    "load_model": "interp.model",
    "resolve_hooks": "interp.model",
    "tokenize": "interp.model",
    "capture": "interp.capture",
    "render_chat": "interp.chat",
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
    "sweep_directions": "interp.comparisons",
    "compare_sae_steering": "interp.comparisons",
    "SAE": "interp.sae",
    "train_topk_sae": "interp.sae",
    "compare": "interp.comparisons",
    "evaluate": "interp.sae",
    "rank_latents": "interp.comparisons",
    "top_activations": "interp.sae",
    "Detector": "interp.detectors",
    "SAEComparison": "interp.comparisons",
    "SteeringComparison": "interp.comparisons",
    "GenerationResult": "interp.generation",
    "Act": "interp.generation",
    "Watch": "interp.generation",
    "TunedLens": "interp.lenses",
    "train_tuned_lens": "interp.lenses",
    "linear_shortcut": "interp.lenses",
    "layer_metrics": "interp.layers",
    "concept_depth": "interp.layers",
}

__all__ = ["ActivationStore", "InterpError", "StoreWriter", *_LAZY]


class _Package(types.ModuleType):
    """The package's module type: a public name that is also a submodule's name stays the public object.

    Importing a submodule sets it as an attribute of its package (``interp.capture`` the module, once
    anything imports it), which would shadow the lazily exported function ``capture``. Here such an
    assignment binds the exported object instead; the submodule stays reachable in ``sys.modules``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            name in _LAZY
            and isinstance(value, types.ModuleType)
            and value.__name__ == f"{__name__}.{name}"
            and hasattr(value, name)
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'interp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
