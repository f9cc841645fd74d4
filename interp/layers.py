"""Layer-wise reports from a store: representation metrics per layer, and the depth at which concepts form.

Representation metrics (``layer_metrics``), each computed per layer from the store's token rows:

- **prompt entropy**: for each example's token matrix ``Z`` (``[tokens, d]``), the matrix entropy of its Gram
  matrix ``K = Z Z^T``: with ``lambda_i`` the eigenvalues of ``K / tr(K)``, ``-sum lambda_i log lambda_i``
  (``alpha = 1``) or ``log(sum lambda_i^alpha) / (1 - alpha)``; averaged over examples.
- **dataset entropy**: the same entropy of the Gram matrix of the examples' mean token vectors (``[examples, d]``).
- **curvature**: for each example, the mean angle (radians) between successive token differences
  ``v_k = z_{k+1} - z_k`` and ``v_{k+1}``; averaged over examples with at least three tokens.
- **effective rank** (Roy and Vetterli): ``exp(-sum p_i log p_i)`` with ``p_i = s_i / sum s`` the normalised singular
  values of the centred matrix of every token row.

Concept depth (``concept_depth``): for each concept, a probe sweep over layers with cross-validation folds; in each
fold, the shallowest layer whose held-out accuracy reaches ``fraction`` of that fold's best; the depth is the mean
over folds with a t-interval over them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import AnalysisError, ConfigError
from interp.store import ActivationStore, layer_of

# ------------------------------------------------------------------------------------------------------ definitions


def matrix_entropy(Z: Float[Tensor, "n d"], alpha: float = 1.0) -> float:
    """Entropy of the trace-normalised Gram matrix ``Z Z^T`` (its eigenvalues are the squared singular values of
    ``Z``): Shannon's for ``alpha = 1``, Renyi's of order ``alpha`` otherwise."""
    s2 = torch.linalg.svdvals(Z.double()) ** 2
    total = s2.sum()
    if total <= 0:
        return 0.0
    lam = s2 / total
    lam = lam[lam > 0]
    if alpha == 1:
        return float(-(lam * lam.log()).sum())
    return float(torch.log((lam**alpha).sum()) / (1 - alpha))


def curvature(Z: Float[Tensor, "tokens d"]) -> float:
    """Mean angle (radians) between successive differences of a token trajectory; NaN below three tokens."""
    if Z.shape[0] < 3:
        return float("nan")
    v = torch.diff(Z.double(), dim=0)
    cos = torch.nn.functional.cosine_similarity(v[:-1], v[1:], dim=-1, eps=1e-12)
    return float(torch.arccos(cos.clamp(-1, 1)).mean())


def effective_rank(Z: Float[Tensor, "n d"]) -> float:
    """Roy and Vetterli's effective rank of the centred ``Z``: ``exp`` of the entropy of its normalised singular
    values."""
    s = torch.linalg.svdvals(Z.double() - Z.double().mean(0))
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


# ------------------------------------------------------------------------------------------------------ metrics


@dataclass
class LayerMetrics:
    """Representation metrics, one row per layer (see the module docstring for the definitions)."""

    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def plot(self):
        """One panel per metric, across layers."""
        from interp.plots import layer_metrics_figure

        return layer_metrics_figure(self.frame, title=f"representation metrics: {self.config.get('store', '')}")


def _layer_hooks(store: ActivationStore, layers: Sequence[int] | None) -> dict[int, str]:
    """``{layer: hook}``: the residual hooks (``blocks.l.hook_out``) when the store has them, else one hook a layer."""
    by_layer: dict[int, list[str]] = {}
    for h in store.hooks:
        if layer_of(h) is not None:
            by_layer.setdefault(int(layer_of(h)), []).append(h)
    if not by_layer:
        raise ConfigError(f"store {store.path} has no per-layer hooks (blocks.L....); capture hooks='resid_post'")
    out = {}
    for x, hooks in sorted(by_layer.items()):
        resid = [h for h in hooks if h == f"blocks.{x}.hook_out"]
        if not resid and len(hooks) > 1:
            raise ConfigError(f"layer {x} of store {store.path} has several hooks {hooks}; capture hooks='resid_post'")
        out[x] = (resid or hooks)[0]
    if layers is not None:
        missing = [x for x in layers if x not in out]
        if missing:
            raise ConfigError(f"layers {missing} are not in store {store.path} (it has {sorted(out)})")
        out = {x: out[x] for x in layers}
    return out


def _open(store: ActivationStore | str | os.PathLike) -> ActivationStore:
    return store if isinstance(store, ActivationStore) else ActivationStore(store)


def layer_metrics(
    store: ActivationStore | str | os.PathLike, layers: Sequence[int] | None = None, *, alpha: float = 1.0,
    max_examples: int | None = 500, max_rows: int = 20_000, skip_first: bool = False, seed: int = 0,
    progress: bool = True,
) -> LayerMetrics:
    """Prompt entropy, dataset entropy, curvature and effective rank of every layer of a ``positions='all'`` store,
    from at most ``max_examples`` examples (seeded) and ``max_rows`` rows for the effective rank. ``skip_first``
    drops each example's first token (a BOS token's residual, often far larger than the rest, dominates Gram
    matrices)."""
    from tqdm.auto import tqdm

    store = _open(store)
    if store.positions != "all":
        raise ConfigError(f"store {store.path} holds positions={store.positions!r}; prompt entropy and curvature "
                          "need every token: capture with positions='all'")
    hooks = _layer_hooks(store, layers)
    ex, pos = store.example_ids(), store.token_positions()
    keep = pos > 0 if skip_first else torch.ones(len(store), dtype=torch.bool)
    chosen = torch.unique(ex)
    g = torch.Generator().manual_seed(seed)
    if max_examples is not None and chosen.numel() > max_examples:
        chosen = chosen[torch.randperm(chosen.numel(), generator=g)[:max_examples]].sort().values
    rows = torch.nonzero(torch.isin(ex, chosen) & keep).flatten()
    if rows.numel() == 0:
        raise AnalysisError(f"store {store.path} has no rows to measure")
    counts = torch.unique_consecutive(ex[rows], return_counts=True)[1].tolist()
    sample = torch.randperm(rows.numel(), generator=g)[:max_rows]
    out = []
    for x, hook in tqdm(hooks.items(), desc="layer metrics", disable=not progress):
        X = store.activations(hook, rows).double()
        per_example = torch.split(X, counts)
        means = torch.stack([z.mean(0) for z in per_example])
        curv = [c for c in (curvature(z) for z in per_example) if not math.isnan(c)]
        out.append({
            "layer": x, "hook": hook,
            "prompt_entropy": float(np.mean([matrix_entropy(z, alpha) for z in per_example])),
            "dataset_entropy": matrix_entropy(means, alpha),
            "curvature": float(np.mean(curv)) if curv else float("nan"),
            "effective_rank": effective_rank(X[sample]),
        })
    config = {"store": str(store.path), "alpha": alpha, "examples": int(chosen.numel()), "rows": int(rows.numel()),
              "skip_first": skip_first, "seed": seed}
    return LayerMetrics(out, config)


# ------------------------------------------------------------------------------------------------------ concept depth

_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean with its 95% Student-t interval."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if v.size < 2:
        return m, float("nan"), float("nan")
    half = (_T975[v.size - 2] if v.size - 2 < len(_T975) else 1.96) * v.std(ddof=1) / math.sqrt(v.size)
    return m, m - half, m + half


def depth_of(accuracy: Sequence[float], layers: Sequence[int], fraction: float, floor: float = 0.0) -> int:
    """The shallowest layer whose accuracy reaches ``floor + fraction * (best - floor)``."""
    acc = np.asarray(accuracy, dtype=np.float64)
    threshold = floor + fraction * (acc.max() - floor)
    return int(layers[int(np.flatnonzero(acc >= threshold - 1e-12)[0])])


@dataclass
class ConceptDepth:
    """Per concept: its depth (mean over folds) with a 95% interval, and its accuracy curve across layers."""

    rows: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    @property
    def curve_frame(self):
        import pandas as pd

        return pd.DataFrame(self.curves)

    def plot(self):
        """Held-out accuracy across layers for every concept side by side, each depth marked with its interval."""
        from interp.plots import concept_depth_figure

        return concept_depth_figure(self.frame, self.curve_frame, fraction=self.config.get("fraction", 0.9))


def _concepts(source, labels: str | Sequence[str], by: str | None) -> list[tuple[str, ActivationStore, str, Any]]:
    """``(name, store, label, rows or None)`` for every concept."""
    if isinstance(source, Mapping):
        out = []
        for name, spec in source.items():
            store, label = (spec, "label") if not isinstance(spec, tuple) else spec
            out.append((str(name), _open(store), label, None))
        return out
    store = _open(source)
    labels = [labels] if isinstance(labels, str) else list(labels)
    if by is None:
        return [(label, store, label, None) for label in labels]
    values = store._example_field(by)
    ex = store.example_ids()
    out = []
    for v in sorted(set(values), key=str):
        mask = torch.tensor([val == v for val in values])[ex]
        out += [(str(v) if len(labels) == 1 else f"{v}/{label}", store, label, torch.nonzero(mask).flatten())
                for label in labels]
    return out


def concept_depth(
    source: ActivationStore | str | os.PathLike | Mapping[str, Any], labels: str | Sequence[str] = "label", *,
    by: str | None = None, fraction: float = 0.9, above_chance: bool = False, cv: int = 5,
    C: float | Sequence[float] = 1.0, seed: int = 0, device: str | None = None, progress: bool = True,
    **probe_options: Any,
) -> ConceptDepth:
    """For each concept, the shallowest layer at which held-out probe accuracy reaches ``fraction`` of its best.

    Concepts: each of ``labels`` (example fields) of one store; with ``by`` (an example field such as
    ``"concept"``), each value of that field, probed on its own rows; or a mapping ``{name: store}`` /
    ``{name: (store, label)}`` of separate stores. Probes come from :func:`interp.probes.train_probes` with ``cv``
    folds (extra keyword arguments go to it). The depth is found per fold and reported as the mean over folds with
    a 95% t-interval; ``above_chance=True`` measures the fraction of the best accuracy's margin over the majority
    class instead of the raw accuracy.
    """
    from interp.probes.linear import train_probes

    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    if not isinstance(cv, int) or cv < 2:
        raise ConfigError(f"concept depth needs cv >= 2 folds for its interval, got {cv!r}")
    rows_out, curves = [], []
    for name, store, label, rows in _concepts(source, labels, by):
        hooks = _layer_hooks(store, None)
        layer_list = list(hooks)
        sweep = train_probes(store, label, hooks=list(hooks.values()), cv=cv, C=C, seed=seed, rows=rows,
                             device=device, progress=progress, **probe_options)
        by_hook = {r["hook"]: r for r in sweep.rows}  # each hook's row at its best C
        folds = np.array([by_hook[hooks[x]]["heldout_accuracy_folds"] for x in layer_list])  # [layer, fold]
        majority = float(sweep.rows[0]["majority"])
        floor = majority if above_chance else 0.0
        depths = [depth_of(folds[:, f], layer_list, fraction, floor) for f in range(folds.shape[1])]
        mean, lo, hi = t_interval(depths)
        lo, hi = max(lo, layer_list[0]), min(hi, layer_list[-1])  # a depth lies among the probed layers
        curve = folds.mean(1)
        rows_out.append({"concept": name, "label": label, "depth": mean, "ci_low": lo, "ci_high": hi,
                         "depth_of_mean_curve": depth_of(curve, layer_list, fraction, floor),
                         "best_layer": layer_list[int(curve.argmax())], "best_accuracy": float(curve.max()),
                         "majority": majority, "folds": len(depths)})
        for x, acc, sd in zip(layer_list, curve, folds.std(1)):
            curves.append({"concept": name, "layer": x, "accuracy": float(acc), "std": float(sd)})
    config = {"fraction": fraction, "above_chance": above_chance, "cv": cv, "seed": seed, "by": by}
    return ConceptDepth(rows_out, curves, config)


__all__ = ["LayerMetrics", "ConceptDepth", "layer_metrics", "concept_depth", "matrix_entropy", "curvature",
           "effective_rank", "t_interval", "depth_of"]
