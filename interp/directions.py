"""Directions in activation space: a unit vector at a hook, where it came from, and how data projects on it.

Three ways to find one from a store:

* :func:`diff_in_means`: the difference between the class means (positive minus negative), normalised;
* :func:`pca_direction`: the LAT / RepE recipe: the top principal axis of paired differences
  (positive minus negative example; uncentred, so the axis of largest mean squared projection);
* :meth:`Direction.from_probe`: a probe's weight vector, in raw activation space.

A :class:`Direction` projects activations (``project``), scores a store as a classifier (``auroc``,
``metrics``), and is saved as ``direction.safetensors`` + ``direction.json`` for steering and detectors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.artifacts import jsonable as _jsonable
from interp.artifacts import load_json as _load_json
from interp.artifacts import load_tensors as _load_tensors
from interp.artifacts import save_tensors as _save_tensors
from interp.errors import AnalysisError, ConfigError, HookError
from interp.probes.linear import (
    FORMAT_VERSION,
    _open,
    binary_metrics,
    check_finite,
    labelled_rows,
    store_provenance,
)
from interp.probes.linear import (
    auroc as _auroc,
)
from interp.store import ActivationStore, atomic_write_json, layer_of

DIRECTION_FORMAT = "interp.direction"


@dataclass
class Direction:
    """A unit vector at a hook, with scale statistics and provenance.

    ``vector`` is float32 ``[d_model]``, normalised on construction (``norm`` keeps the length it had: the
    raw mean difference for diff-in-means, the weight norm for a probe). ``stats`` holds what steering and
    detectors need to pick scales: per-class mean and std of the projections, their pooled std, a midpoint
    ``threshold`` and the mean activation norm at the hook, when the direction was computed from data.
    """

    vector: Float[Tensor, " d_model"]
    hook: str
    method: str = "custom"
    label: str | None = None
    norm: float = 1.0
    stats: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = torch.as_tensor(self.vector).detach().reshape(-1).to("cpu", torch.float32)
        n = float(v.norm())
        if not torch.isfinite(v).all() or n == 0.0:
            raise AnalysisError(
                f"direction at {self.hook}: the vector is zero or not finite; the classes may not differ"
            )
        self.vector = v / n
        self.hook = str(self.hook)

    # ---- facts
    @property
    def layer(self) -> int | None:
        return layer_of(self.hook)

    @property
    def d_model(self) -> int:
        return int(self.vector.numel())

    def __repr__(self) -> str:
        return f"Direction(hook={self.hook!r}, method={self.method!r}, d_model={self.d_model}, norm={self.norm:.4g})"

    def cosine(self, other: Direction | Tensor) -> float:
        """Cosine similarity with another direction or vector."""
        o = other.vector if isinstance(other, Direction) else torch.as_tensor(other).reshape(-1).float()
        return float(self.vector @ o / o.norm().clamp_min(1e-30))

    # ---- projections
    def project(self, acts: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
        """Dot products of activations (any leading shape, any float dtype) with the unit vector, in float32."""
        a = torch.as_tensor(acts)
        if a.shape[-1] != self.d_model:
            raise AnalysisError(f"activations have d_model {a.shape[-1]}, the direction has {self.d_model}")
        return a.float() @ self.vector.to(a.device)

    def scores(
        self, store: ActivationStore | str | os.PathLike, rows: Int[Tensor, " n"] | Sequence[int] | None = None
    ) -> Float[Tensor, " n"]:
        """Projections of a store's rows at this direction's hook (streamed in batches)."""
        store = _open(store)
        hook = _check_hook(store, self.hook, self.d_model)
        out = []
        for batch in store.iter_batches(hook, batch_size=8192, rows=None if rows is None else torch.as_tensor(rows)):
            out.append(self.project(batch.acts[hook]))
        return torch.cat(out) if out else torch.empty(0)

    def auroc(
        self,
        store: ActivationStore | str | os.PathLike,
        label: str = "label",
        rows: Int[Tensor, " n"] | Sequence[int] | None = None,
    ) -> float:
        """AUROC of the projection as a classifier of ``label`` (class index 1 positive) on the store's rows."""
        proj, y = self._labelled_scores(store, label, rows)
        return _auroc(proj, y)

    def metrics(
        self,
        store: ActivationStore | str | os.PathLike,
        label: str = "label",
        rows: Int[Tensor, " n"] | Sequence[int] | None = None,
        threshold: float | None = None,
    ) -> dict[str, float]:
        """Accuracy (at ``threshold``, default ``stats["threshold"]``), AUROC and recall at 1% FPR."""
        proj, y = self._labelled_scores(store, label, rows)
        if threshold is None:
            threshold = self.stats.get("threshold")
            if threshold is None:
                threshold = float(0.5 * (proj[y == 1].mean() + proj[y == 0].mean()))
        return binary_metrics(proj, y, threshold=float(threshold))

    def _labelled_scores(self, store, label: str, rows) -> tuple[Tensor, Tensor]:
        store = _open(store)
        lab_rows, y, classes = labelled_rows(store, label)
        lab_rows, y = _narrow(lab_rows, y, rows, len(store))
        if len(classes) != 2:
            raise AnalysisError(
                f"label {label!r} has {len(classes)} classes {classes[:6]}: a direction scores two classes; use "
                "a binary label"
            )
        return self.scores(store, lab_rows), y

    def compute_stats(
        self,
        store: ActivationStore | str | os.PathLike,
        label: str = "label",
        rows: Int[Tensor, " n"] | Sequence[int] | None = None,
    ) -> Direction:
        """Fill ``stats`` from a store's labelled rows (in place; returns self)."""
        store = _open(store)
        hook = _check_hook(store, self.hook, self.d_model)
        lab_rows, y, _ = labelled_rows(store, label)
        lab_rows, y = _narrow(lab_rows, y, rows, len(store))
        self.stats = _projection_stats(store, hook, self.vector, lab_rows, y)
        return self

    # ---- figures
    def plot(
        self,
        store: ActivationStore | str | os.PathLike,
        label: str = "label",
        rows: Int[Tensor, " n"] | Sequence[int] | None = None,
        max_points: int = 5000,
        seed: int = 0,
    ):
        """Scatter of the rows' projection on this direction vs their top principal component, coloured by label."""
        from interp import plots

        store = _open(store)
        hook = _check_hook(store, self.hook, self.d_model)
        lab_rows, y, classes = labelled_rows(store, label)
        lab_rows, y = _narrow(lab_rows, y, rows, len(store))
        if lab_rows.numel() > max_points:
            g = torch.Generator().manual_seed(seed)
            pick = torch.sort(torch.randperm(lab_rows.numel(), generator=g)[:max_points]).values
            lab_rows, y = lab_rows[pick], y[pick]
        X = store.activations(hook, lab_rows).float()
        proj = X @ self.vector
        R = X - X.mean(0) - torch.outer(proj - proj.mean(), self.vector)  # the rest, centred
        _, _, Vh = torch.linalg.svd(R, full_matrices=False)
        pc = R @ Vh[0]
        names = [str(classes[int(i)]) for i in y]
        return plots.projection_scatter_figure(
            proj, pc, names, x_title=f"projection on {self.method} direction", y_title="top principal component (rest)",
            title=f"'{label}' along the {self.method} direction at {hook} of {store.model_info.get('name', 'the model')}"
            f" ({store.manifest.get('dataset', {}).get('name', store.path.name)}, {len(names)} rows)",
        )

    # ---- save / load
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``direction.safetensors`` (the vector) and ``direction.json`` (hook, method, stats, provenance)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _save_tensors(d / "direction.safetensors", {"vector": self.vector})
        meta = {
            "format": DIRECTION_FORMAT,
            "version": FORMAT_VERSION,
            "hook": self.hook,
            "layer": self.layer,
            "method": self.method,
            "label": self.label,
            "d_model": self.d_model,
            "norm": self.norm,
            "stats": self.stats,
            "provenance": self.provenance,
        }
        atomic_write_json(d / "direction.json", _jsonable(meta))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Direction:
        """Read a direction written by :meth:`save` (safetensors + JSON only)."""
        d = Path(directory)
        meta = _load_json(d / "direction.json", DIRECTION_FORMAT, FORMAT_VERSION, "direction")
        tensors = _load_tensors(d / "direction.safetensors", "direction")
        if "vector" not in tensors:
            raise AnalysisError(f"{d / 'direction.safetensors'} has no 'vector' tensor; save the direction again")
        return cls(
            vector=tensors["vector"],
            hook=meta["hook"],
            method=meta.get("method", "custom"),
            label=meta.get("label"),
            norm=float(meta.get("norm", 1.0)),
            stats=dict(meta.get("stats") or {}),
            provenance=dict(meta.get("provenance") or {}),
        )

    # ---- from a probe
    @classmethod
    def from_probe(cls, probe, hook: str | None = None, cls_index: int | None = None) -> Direction:
        """The probe's weight vector in raw activation space (``coef_``), as a direction at ``hook``.

        ``hook`` defaults to the probe's own (probes from :func:`train_probes` know theirs). For a multi-class
        probe pick the one-vs-rest row with ``cls_index``. ``stats`` records the decision threshold along the
        unit vector (``-intercept / norm``); call :meth:`compute_stats` for data statistics.
        """
        if not hasattr(probe, "coef_"):
            raise AnalysisError("the probe is not fitted; fit it before taking its direction")
        hook = hook or getattr(probe, "hook", None)
        if hook is None:
            raise ConfigError("this probe does not know its hook; pass hook='blocks.N.hook_out'")
        coef = probe.coef_
        if coef.shape[0] > 1 and cls_index is None:
            raise ConfigError(f"the probe has {coef.shape[0]} one-vs-rest rows; pass cls_index= to choose one")
        row = 0 if coef.shape[0] == 1 else int(cls_index)  # type: ignore[arg-type]
        w = coef[row].float()
        norm = float(w.norm())
        b = float(probe.intercept_[row])
        prov = dict(getattr(probe, "provenance", {}) or {})
        positive = probe.classes_.tolist()[row if coef.shape[0] > 1 else 1]
        prov.update({"from": "probe", "C": getattr(probe, "C", None), "class": positive})
        return cls(
            vector=w,
            hook=hook,
            method="probe",
            label=prov.get("label"),
            norm=norm,
            stats={"threshold": -b / norm if norm > 0 else 0.0, "intercept": b},
            provenance=prov,
        )


# ----------------------------------------------------------------------------------------------- helpers


def _check_hook(store: ActivationStore, hook: str, d_model: int) -> str:
    name = store.resolve_hook(hook)
    if store.d_model != d_model:
        raise HookError(f"the direction has d_model {d_model} but store {store.path} has {store.d_model}")
    return name


def _narrow(lab_rows: Tensor, y: Tensor, rows, n_store: int) -> tuple[Tensor, Tensor]:
    if rows is None:
        return lab_rows, y
    want = torch.zeros(n_store, dtype=torch.bool)
    want[torch.as_tensor(rows, dtype=torch.int64)] = True
    keep = want[lab_rows]
    return lab_rows[keep], y[keep]


def _binary_target(y: Tensor, classes: list[Any], label: str, positive: Any) -> tuple[Tensor, Any]:
    """Labels as 0/1 (1 = ``positive``, default the second class) and the positive class value."""
    present = torch.unique(y)
    if present.numel() < 2:
        shown = [classes[int(i)] for i in present]
        raise AnalysisError(
            f"label {label!r} has a single class {shown} in the {y.numel()} rows used: a direction needs two classes"
        )
    if positive is None:
        if len(classes) != 2:
            raise AnalysisError(
                f"label {label!r} has {len(classes)} classes {classes[:6]}; pass positive=<class> for one-vs-rest"
            )
        return (y == 1).long(), classes[1]
    if positive not in classes:
        from interp.errors import close_matches

        hint = close_matches(str(positive), map(str, classes))
        raise AnalysisError(f"class {positive!r} is not a value of label {label!r}; {hint}")
    return (y == classes.index(positive)).long(), positive


def _class_sums(store: ActivationStore, hook: str, rows: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
    """Per-class float32 sums ``[2, d]``, counts ``[2]`` and the mean activation L2 norm, streamed."""
    sums = torch.zeros(2, store.d_model)
    counts = torch.zeros(2)
    norm_sum = 0.0
    pos = 0
    for batch in store.iter_batches(hook, batch_size=8192, rows=rows):
        a = batch.acts[hook].float()
        check_finite(a, f"hook {hook}")
        yb = y[pos : pos + a.shape[0]]
        pos += a.shape[0]
        sums.index_add_(0, yb, a)
        counts += torch.bincount(yb, minlength=2).float()
        norm_sum += float(a.norm(dim=1).sum())
    return sums, counts, norm_sum / max(1, pos)


def _projection_stats(store: ActivationStore, hook: str, v: Tensor, rows: Tensor, y: Tensor) -> dict[str, float]:
    proj_parts, norms = [], []
    for batch in store.iter_batches(hook, batch_size=8192, rows=rows):
        a = batch.acts[hook].float()
        proj_parts.append(a @ v)
        norms.append(a.norm(dim=1))
    proj = torch.cat(proj_parts).double()
    pos, neg = proj[y == 1], proj[y == 0]
    out: dict[str, float] = {"act_norm_mean": float(torch.cat(norms).mean()), "proj_mean": float(proj.mean()),
                             "proj_std": float(proj.std()) if proj.numel() > 1 else 0.0}
    if pos.numel() and neg.numel():
        pooled = float(torch.sqrt(0.5 * (pos.var(unbiased=False) + neg.var(unbiased=False))))
        out.update(
            {
                "mean_pos": float(pos.mean()),
                "mean_neg": float(neg.mean()),
                "std_pos": float(pos.std(unbiased=False)),
                "std_neg": float(neg.std(unbiased=False)),
                "pooled_std": pooled,
                "threshold": float(0.5 * (pos.mean() + neg.mean())),
                "separation": float((pos.mean() - neg.mean()) / max(pooled, 1e-12)),
                "auroc": _auroc(proj, y),
            }
        )
    return out


# ----------------------------------------------------------------------------------------------- constructors


def diff_in_means_tensor(X: Float[Tensor, "n d"], y: Int[Tensor, " n"]) -> Float[Tensor, " d"]:
    """``mean(X[y == 1]) - mean(X[y == 0])`` in float32 (not normalised), for plain tensors."""
    X = torch.as_tensor(X)
    y = torch.as_tensor(y).reshape(-1).to(X.device)
    if X.dim() != 2 or X.shape[0] != y.numel():
        raise AnalysisError(f"X must be [n, d] with one label per row; got X {list(X.shape)} and {y.numel()} labels")
    pos, neg = y == 1, y == 0
    if not bool(pos.any()) or not bool(neg.any()):
        raise AnalysisError("diff-in-means needs rows of both classes (labels 0 and 1)")
    check_finite(X, "X")
    return X[pos].float().mean(0) - X[neg].float().mean(0)


def diff_in_means(
    store: ActivationStore | str | os.PathLike,
    hook: str | int,
    label: str = "label",
    rows: Int[Tensor, " n"] | Sequence[int] | None = None,
    positive: Any = None,
) -> Direction:
    """The normalised difference between the mean activation of the positive and the negative class at ``hook``.

    Binary labels: positive = the second class (1 for 0/1 labels). Multi-class: pass ``positive=<class>`` for
    that class against the rest. ``rows`` narrows the rows used (e.g. a train split). Streamed in float32.
    """
    store = _open(store)
    hook_name = store.resolve_hook(hook)
    lab_rows, y, classes = labelled_rows(store, label)
    lab_rows, y = _narrow(lab_rows, y, rows, len(store))
    yb, pos_class = _binary_target(y, classes, label, positive)
    counts_check = torch.bincount(yb, minlength=2)
    if int(counts_check.min()) == 0:
        raise AnalysisError(
            f"label {label!r} has a single class in the {lab_rows.numel()} rows used: diff-in-means needs both"
        )
    sums, counts, act_norm = _class_sums(store, hook_name, lab_rows, yb)
    diff = sums[1] / counts[1] - sums[0] / counts[0]
    direction = Direction(
        vector=diff,
        hook=hook_name,
        method="diff_in_means",
        label=label,
        norm=float(diff.norm()),
        provenance=store_provenance(
            store, hook=hook_name, label=label, positive=pos_class, n_rows=int(lab_rows.numel())
        ),
    )
    direction.stats = _projection_stats(store, hook_name, direction.vector, lab_rows, yb)
    return direction


def pca_direction_tensor(diffs: Float[Tensor, "m d"], seed: int = 0) -> Float[Tensor, " d"]:
    """Top principal axis of paired differences (each row ``positive - negative``), oriented so that the
    differences project positively on average: the LAT / RepE recipe.

    RepE flips each pair's order at random before a PCA so that the PCA sees an axis rather than a mean; an
    uncentred PCA (the top right-singular vector, used here) gives that axis directly and does not depend on
    the flips, so the result is deterministic (``seed`` is accepted for symmetry with the other recipes).
    """
    D = torch.as_tensor(diffs).float()
    if D.dim() != 2 or D.shape[0] < 2:
        raise AnalysisError(f"pca_direction needs at least 2 paired differences [m, d], got {list(D.shape)}")
    check_finite(D, "paired differences")
    _, _, Vh = torch.linalg.svd(D, full_matrices=False)
    v = Vh[0]
    return -v if float(D.mean(0) @ v) < 0 else v


def pca_direction(
    store: ActivationStore | str | os.PathLike,
    hook: str | int,
    label: str = "label",
    pair_by: str | None = "auto",
    rows: Int[Tensor, " n"] | Sequence[int] | None = None,
    positive: Any = None,
    seed: int = 0,
) -> Direction:
    """LAT / RepE direction: the top principal component of positive-minus-negative paired differences.

    Rows are first averaged per example. ``pair_by`` names an example field whose equal values form a pair
    (``"pair_id"``, ``"country"``); each pair gives (mean positive) - (mean negative). ``"auto"`` uses
    ``pair_id`` when the examples have it; ``None`` (or no such field) pairs positive and negative examples at
    random (seeded).
    """
    store = _open(store)
    hook_name = store.resolve_hook(hook)
    lab_rows, y, classes = labelled_rows(store, label)
    lab_rows, y = _narrow(lab_rows, y, rows, len(store))
    yb, pos_class = _binary_target(y, classes, label, positive)
    # per-example mean activations of the labelled rows (an example may span many token rows)
    ex = store.example_ids()[lab_rows]
    uniq, inv = torch.unique(ex, return_inverse=True)
    sums = torch.zeros(uniq.numel(), store.d_model)
    cnt = torch.zeros(uniq.numel())
    lab_sum = torch.zeros(uniq.numel())
    pos = 0
    for batch in store.iter_batches(hook_name, batch_size=8192, rows=lab_rows):
        a = batch.acts[hook_name].float()
        check_finite(a, f"hook {hook_name}")
        ib = inv[pos : pos + a.shape[0]]
        sums.index_add_(0, ib, a)
        cnt.index_add_(0, ib, torch.ones(a.shape[0]))
        lab_sum.index_add_(0, ib, yb[pos : pos + a.shape[0]].float())
        pos += a.shape[0]
    means = sums / cnt[:, None]
    ex_label = (lab_sum / cnt) >= 0.5
    examples = store.examples()
    field_name = pair_by
    if pair_by == "auto":
        field_name = "pair_id" if examples and all("pair_id" in examples[int(e)] for e in uniq) else None
    diffs = []
    if field_name is not None:
        if not all(field_name in examples[int(e)] for e in uniq):
            from interp.errors import close_matches

            keys = sorted({k for e in examples for k in e})
            hint = close_matches(field_name, keys)
            raise AnalysisError(f"pair_by={field_name!r} is not a field of every example; {hint}")
        groups: dict[Any, tuple[list[int], list[int]]] = {}
        for i, e in enumerate(uniq.tolist()):
            key = str(examples[e][field_name])
            groups.setdefault(key, ([], []))[1 if bool(ex_label[i]) else 0].append(i)
        for neg_i, pos_i in groups.values():
            if pos_i and neg_i:
                diffs.append(means[pos_i].mean(0) - means[neg_i].mean(0))
        how = f"pairs by {field_name}"
    else:
        g = torch.Generator().manual_seed(seed)
        pi = torch.nonzero(ex_label).flatten()
        ni = torch.nonzero(~ex_label).flatten()
        pi = pi[torch.randperm(pi.numel(), generator=g)]
        ni = ni[torch.randperm(ni.numel(), generator=g)]
        m = min(pi.numel(), ni.numel())
        diffs = list(means[pi[:m]] - means[ni[:m]])
        how = "random pairs"
    if len(diffs) < 2:
        raise AnalysisError(
            f"only {len(diffs)} positive/negative pair(s) for label {label!r}"
            + (f" grouped by {field_name!r}" if field_name else "")
            + "; pca_direction needs at least 2 (pass pair_by=None for random pairs)"
        )
    D = torch.stack(diffs)
    v = pca_direction_tensor(D, seed=seed)
    explained = float((D @ v).pow(2).sum() / D.pow(2).sum().clamp_min(1e-30))
    direction = Direction(
        vector=v,
        hook=hook_name,
        method="pca",
        label=label,
        norm=float((D @ v).mean()),
        provenance=store_provenance(
            store, hook=hook_name, label=label, positive=pos_class, pairing=how, n_pairs=len(diffs),
            explained_variance=explained,
        ),
    )
    direction.stats = _projection_stats(store, hook_name, direction.vector, lab_rows, yb)
    return direction
