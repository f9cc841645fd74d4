"""Experiments that combine two analyses: SAE latents against a dense probe and diff-in-means, in reading
(:func:`compare`, :class:`SAEComparison`) and in steering (:func:`compare_sae_steering`,
:func:`sweep_directions`, :class:`SteeringComparison`).

This module sits above both sides (layer 5 in DESIGN.md): it imports :mod:`interp.sae` and
:mod:`interp.steering`, and neither of them imports it.
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.artifacts import jsonable as _jsonable
from interp.artifacts import load_tensors, save_tensors
from interp.errors import AnalysisError, ConfigError, SAEError, SteeringError
from interp.model import canonical_hook, model_identity
from interp.sae import SAE, _as_sae, _as_store, resolve_sae_hook
from interp.steering import Positions, SweepResult, _as_vector, _metrics, probe_score, projection, sweep
from interp.store import ActivationStore, atomic_write_json

# ================================================================================================ reading


@dataclass
class SAEComparison:
    """How well one concept is read out by a dense probe, diff-in-means, the best SAE latent and sparse probes.

    ``table`` has one row per method: ``method``, ``n_features``, ``latents`` (SAE latent ids used, if any),
    held-out ``accuracy``, ``auroc`` and ``recall_at_1pct_fpr``. ``gap`` is, per latent, the mean activation
    on positive minus negative training rows; ``ranking`` orders latents by ``|gap|`` (training rows only).
    """

    table: Any  # pandas.DataFrame
    gap: Float[Tensor, " d_sae"]
    ranking: Int[Tensor, " d_sae"]
    best_latent: int
    provenance: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        t = self.table.copy()
        t["latents"] = [", ".join(map(str, v)) if isinstance(v, list) else "" for v in t["latents"]]
        head = (
            f"{self.provenance.get('label')}={self.provenance.get('positive_class')!r} on {self.provenance.get('hook')}"
            f" ({self.provenance.get('n_train')} train / {self.provenance.get('n_test')} test rows)"
        )
        return head + "\n" + t.to_string(index=False, float_format=lambda v: f"{v:.3f}")

    def plot(self):
        """Grouped bars of held-out accuracy and AUROC per method."""
        from interp.plots import sae_comparison

        p = self.provenance
        model = (p.get("model") or {}).get("name", "") if isinstance(p.get("model"), dict) else ""
        title = f"Reading '{p.get('label')}' at {p.get('hook')}{f' of {model}' if model else ''}: probes vs SAE latents"
        return sae_comparison(self.table, title=title, n_test=p.get("n_test"), n_positive=p.get("n_test_positive"))

    def save(self, path: str | os.PathLike) -> Path:
        """``path/comparison.json`` (table + provenance) and ``path/latents.safetensors`` (gap, ranking)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_tensors(path / "latents.safetensors", {"gap": self.gap.float(), "ranking": self.ranking}, {"format": "pt"})
        body = {
            "table": self.table.to_dict(orient="records"),
            "best_latent": self.best_latent,
            "provenance": self.provenance,
        }
        atomic_write_json(path / "comparison.json", _jsonable(body))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SAEComparison:
        import pandas as pd

        path = Path(path)
        try:
            body = json.loads((path / "comparison.json").read_text())
        except (OSError, ValueError) as e:
            raise SAEError(f"{path} does not hold a readable comparison.json ({e})") from None
        tensors = load_tensors(path / "latents.safetensors", "SAE comparison", SAEError)
        table = pd.DataFrame(body["table"])
        for col in ("accuracy", "auroc", "recall_at_1pct_fpr"):  # JSON null is an undefined metric: NaN again
            if col in table:
                table[col] = pd.to_numeric(table[col]).astype(float)
        return cls(table, tensors["gap"], tensors["ranking"], int(body["best_latent"]), body["provenance"])


def _binary(y: Tensor, label: str, classes: Sequence[Any]) -> tuple[Tensor, Any]:
    labelled = y[y >= 0]
    vals = torch.unique(labelled)
    if vals.numel() != 2:
        raise AnalysisError(
            f"compare needs a binary label; {label!r} has {vals.numel()} classes among labelled rows"
            f" ({list(classes)[:6]}): make a two-valued field"
        )
    pos = int(vals[1])
    positive = classes[pos] if 0 <= pos < len(classes) else pos
    return torch.where(y >= 0, (y == pos).long(), torch.full_like(y, -1)), positive


def labelled_split(
    store: ActivationStore, label: str, *, test_size: float = 0.25, seed: int = 0
) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"], Int[Tensor, " rows"], Any]:
    """``(train_rows, test_rows, y, positive_class)`` for a binary ``label``: rows split by example
    (:meth:`ActivationStore.train_test_split`), unlabelled rows dropped, ``y`` in {0, 1} (-1 unlabelled) per
    store row. Both splits must hold both classes."""
    y_all, positive = _binary(store.labels(label), label, store.label_classes(label))
    train, test = store.train_test_split(test_size=test_size, seed=seed)
    train, test = train[y_all[train] >= 0].sort().values, test[y_all[test] >= 0].sort().values
    for name, rows in (("training", train), ("test", test)):
        y = y_all[rows]
        if y.numel() == 0 or y.min() == y.max():
            raise AnalysisError(f"the {name} split has only one class of {label!r}: label more examples of each class")
    return train, test, y_all, positive


def _class_gap(
    store: ActivationStore, hook: str, sae: SAE, rows: Tensor, y_all: Tensor, batch_size: int, progress: bool
) -> tuple[Tensor, Tensor]:
    """Per latent, mean activation on positive minus negative ``rows``; and latents ordered by ``|gap|``."""
    sums = torch.zeros(2, sae.d_sae, dtype=torch.float64)
    for rows_b, f in sae.iter_encode(store, hook, rows=rows, batch_size=batch_size, progress=progress):
        yb = y_all[rows_b]
        f = f.double().cpu()
        sums[1] += f[yb == 1].sum(0)
        sums[0] += f[yb == 0].sum(0)
    y = y_all[rows]
    counts = torch.stack([(y == 0).sum(), (y == 1).sum()]).double()
    gap = (sums[1] / counts[1] - sums[0] / counts[0]).float()
    return gap, torch.sort(-gap.abs(), stable=True).indices


def rank_latents(
    store: ActivationStore | str | os.PathLike,
    hook: str | int | None,
    label: str,
    sae: SAE | str | os.PathLike,
    *,
    test_size: float = 0.25,
    seed: int = 0,
    batch_size: int = 8192,
    progress: bool = True,
) -> tuple[Float[Tensor, " d_sae"], Int[Tensor, " d_sae"]]:
    """``(gap, ranking)``: per latent, the mean activation on positive minus negative training rows of the
    binary ``label``, and the latents ordered by ``|gap|`` (largest first). Only training rows are read: the
    same split and ranking :func:`compare` uses."""
    store, sae = _as_store(store), _as_sae(sae)
    hook = resolve_sae_hook(store, sae, hook)
    train, _, y_all, _ = labelled_split(store, label, test_size=test_size, seed=seed)
    return _class_gap(store, hook, sae, train, y_all, batch_size, progress)


def compare(
    store: ActivationStore | str | os.PathLike,
    hook: str | int | None,
    label: str,
    sae: SAE | str | os.PathLike,
    *,
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    C: float = 1.0,
    test_size: float = 0.25,
    seed: int = 0,
    n_candidates: int = 64,
    batch_size: int = 8192,
    progress: bool = True,
) -> SAEComparison:
    """Compare, for one binary concept ``label``, a dense logistic probe, the diff-in-means direction, the single
    best SAE latent and sparse probes on the top-k SAE latents, by held-out accuracy and AUROC.

    Rows are split by example (:meth:`ActivationStore.train_test_split`: the dataset's split column when it
    has one). Everything is chosen and fitted on training rows only: latents are ranked by the gap between
    class means of their activations on training rows (``|mean_pos - mean_neg|``, as in sparse-probing
    evaluations); the sparse probe with ``k`` latents is a logistic probe (``C``, standardised features) on the
    top ``k``; the best single latent is, among the top ``n_candidates``, the one with the highest
    training AUROC, scored on test by its (sign-corrected) activation. Diff-in-means and single latents get
    their accuracy from a one-feature logistic fit on training rows (a learned threshold). ``hook`` defaults
    to the SAE's ``hook_name`` resolved in the store.
    """
    import pandas as pd

    from interp.directions import diff_in_means_tensor
    from interp.probes.linear import LinearProbe, auroc, recall_at_fpr

    store, sae = _as_store(store), _as_sae(sae)
    hook = resolve_sae_hook(store, sae, hook)
    train, test, y_all, positive = labelled_split(store, label, test_size=test_size, seed=seed)
    y_tr, y_te = y_all[train], y_all[test]

    def fit_1d(s_tr: Tensor, s_te: Tensor) -> float:  # accuracy with a threshold learned on training rows
        return float(LinearProbe(C=C).fit(s_tr[:, None], y_tr).score(s_te[:, None], y_te))

    def record(method: str, n_features: int, latents: list[int] | None, accuracy: float, scores: Tensor) -> None:
        records.append(
            {
                "method": method,
                "n_features": n_features,
                "latents": latents,
                "accuracy": accuracy,
                "auroc": float(auroc(scores, y_te)),
                "recall_at_1pct_fpr": float(recall_at_fpr(scores, y_te, 0.01)),
            }
        )

    records: list[dict[str, Any]] = []
    X_tr, X_te = store.activations(hook, train).float(), store.activations(hook, test).float()
    dense = LinearProbe(C=C).fit(X_tr, y_tr)
    record("dense probe", store.d_model, None, float(dense.score(X_te, y_te)), dense.decision_function(X_te))
    direction = diff_in_means_tensor(X_tr, y_tr).float()
    p_tr, p_te = X_tr @ direction, X_te @ direction
    record("diff-in-means", 1, None, fit_1d(p_tr, p_te), p_te)
    del X_tr, X_te

    # pass 1, training rows only: class means of every latent
    gap, ranking = _class_gap(store, hook, sae, train, y_all, batch_size, progress)
    ks = sorted({int(k) for k in ks if 0 < int(k) <= sae.d_sae})
    m = min(sae.d_sae, max([n_candidates, *ks]))
    cand = ranking[:m]

    # pass 2: the candidate latents on training and test rows
    both = torch.cat([train, test]).sort().values
    Z = torch.empty(both.numel(), m)
    for rows_b, f in sae.iter_encode(store, hook, rows=both, batch_size=batch_size, progress=progress):
        Z[torch.searchsorted(both, rows_b)] = f[:, cand.to(f.device)].float().cpu()
    Z_tr, Z_te = Z[torch.searchsorted(both, train)], Z[torch.searchsorted(both, test)]

    sign = torch.where(gap[cand] >= 0, 1.0, -1.0)
    train_aurocs = torch.tensor([float(auroc(sign[j] * Z_tr[:, j], y_tr)) for j in range(m)])
    j = int(torch.argmax(train_aurocs))  # first maximum: ties go to the larger gap
    best = int(cand[j])
    record("best SAE latent", 1, [best], fit_1d(Z_tr[:, j], Z_te[:, j]), sign[j] * Z_te[:, j])
    for k in ks:
        probe = LinearProbe(C=C).fit(Z_tr[:, :k], y_tr)
        scores = probe.decision_function(Z_te[:, :k])
        record(f"sparse probe k={k}", k, [int(v) for v in cand[:k]], float(probe.score(Z_te[:, :k], y_te)), scores)
    provenance = {
        "store": str(store.path),
        "hook": hook,
        "label": label,
        "positive_class": positive,
        "model": store.model_info,
        "sae": sae.describe(),
        "n_train": int(train.numel()),
        "n_test": int(test.numel()),
        "n_test_positive": int(y_te.sum()),
        "test_size": test_size,
        "seed": seed,
        "C": C,
        "ranking": "abs(mean_pos - mean_neg) on training rows",
    }  # fmt: skip
    return SAEComparison(pd.DataFrame.from_records(records), gap, ranking, best, provenance)


# ================================================================================================ steering


@dataclass
class SteeringComparison(SweepResult):
    """Several directions swept over the same alphas, prompts and seed, scored by the same metrics.

    ``table``: one row per method, alpha and prompt: ``method``, ``alpha`` (in units of ``config["scale"]``),
    ``alpha_raw`` (the norm of the vector added), ``prompt``, ``text`` and one column per metric. ``config``
    records the hooks, the scale, the pairwise cosines of the directions and, from
    :func:`compare_sae_steering`, the latent, its class gap and where the directions came from. ``summary()``
    gives mean and standard error per method and alpha; ``save(dir)`` writes ``steering_comparison.json`` and
    ``steering_comparison.html``.
    """

    _group: ClassVar[tuple[str, ...]] = ("method", "alpha")
    _columns: ClassVar[tuple[str, ...]] = ("method", "alpha", "alpha_raw", "prompt", "text")
    _file: ClassVar[str] = "steering_comparison"

    def __str__(self) -> str:
        cos = self.config.get("cosines") or {}
        head = f"steering comparison at {self.config.get('hook')} (scale {self.config.get('scale', 1.0):.4g})"
        if cos:
            head += "; cosines " + ", ".join(f"{k}: {v:+.3f}" for k, v in cos.items())
        means = self.table.groupby(list(self._group), sort=False)[self.metrics].mean()
        return head + "\n" + means.to_string(float_format=lambda v: f"{v:.4f}")


def sweep_directions(
    model,
    prompts: str | Sequence[str],
    directions: Mapping[str, Any],
    alphas: Sequence[float],
    metric: Any = None,
    *,
    hook: str | None = None,
    scale: float = 1.0,
    positions: Positions = "all",
    max_new_tokens: int = 24,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> SteeringComparison:
    """:func:`sweep` each of ``directions`` (``{name: Direction or 1-D tensor}``) with ``op="add"`` over the
    same ``alphas``, prompts and seed, and put the results side by side.

    Every direction is made a unit vector and added as ``alpha * scale * u``, so methods are compared at equal
    norms. ``hook``: where to steer (default: each Direction's own hook; required for raw tensors).
    ``metric`` is as in :func:`sweep`; by default the projection on the first direction, the reference.
    """
    from interp import plots
    from interp.directions import Direction

    if not directions:
        raise ConfigError("sweep_directions needs at least one direction: {name: Direction or tensor}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ConfigError(f"scale must be a positive number, got {scale}")
    units: dict[str, tuple[Tensor, str]] = {}
    for name, d in directions.items():
        v = _as_vector(d)
        if float(v.norm()) == 0.0:
            raise SteeringError(f"direction {name!r} is all zeros; it cannot be compared")
        where = hook if hook is not None else getattr(d, "hook", None)
        if where is None:
            raise SteeringError(f"direction {name!r} is a raw tensor: pass hook=... to say where to steer")
        units[str(name)] = (v / v.norm(), canonical_hook(model, where))
    first_name, (first, first_hook) = next(iter(units.items()))
    if metric is None:
        metric = {"projection": projection(Direction(first, first_hook, method=first_name))}
    import pandas as pd

    frames = []
    for name, (u, where) in units.items():
        res = sweep(model, prompts, u * scale, alphas, metric=metric, op="add", positions=positions, hook=where,
                    max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size,
                    progress=progress)
        t = res.table
        t.insert(0, "method", name)
        t.insert(2, "alpha_raw", t["alpha"] * scale)
        frames.append(t)
    table = pd.concat(frames, ignore_index=True)
    names = list(units)
    cosines = {f"{a} | {b}": float(units[a][0] @ units[b][0]) for i, a in enumerate(names) for b in names[i + 1 :]}
    hooks = sorted({w for _, w in units.values()})
    config = {
        "model": model_identity(model), "hook": hooks[0] if len(hooks) == 1 else hooks,
        "hooks": {n: w for n, (_, w) in units.items()}, "scale": scale, "alphas": [float(a) for a in alphas],
        "metrics": [c for c in table.columns if c not in ("method", "alpha", "alpha_raw", "prompt", "text")],
        "cosines": cosines, "positions": positions if isinstance(positions, str) else list(positions),
        "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
    }  # fmt: skip
    title = f"Steering {config['model'].get('name', 'the model')} along {len(names)} directions at {', '.join(hooks)}"
    labels = {k: getattr(m, "name", k) for k, m in _metrics(metric, None).items()}
    fig = plots.steering_comparison(table, metrics=config["metrics"], scale=scale, title=title, labels=labels)
    return SteeringComparison(table=table, figure=fig, config=config)


def _store_pool(positions: str) -> str:
    """How ``probe_score`` pools generated tokens for a probe trained on a store captured with ``positions``."""
    if positions == "last":
        return "last"
    return "mean" if positions.startswith("mean") else "tokens"


def compare_sae_steering(
    model,
    prompts: str | Sequence[str],
    store: Any,
    label: str,
    sae: Any,
    *,
    latent: int | None = None,
    comparison: Any = None,
    hook: str | int | None = None,
    alphas: Sequence[float] = (-1.0, -0.5, 0.0, 0.5, 1.0),
    scale: float | str = "norm",
    metric: Any = None,
    positions: Positions = "all",
    test_size: float = 0.25,
    seed: int = 0,
    max_new_tokens: int = 24,
    temperature: float = 0.0,
    batch_size: int = 16,
    progress: bool = True,
) -> SteeringComparison:
    """Steer along an SAE latent's decoder row and along the diff-in-means direction of ``label``, side by side.

    The steering half of :func:`interp.sae.compare`: both directions are taken at the SAE's hook in the store
    (``hook`` overrides), from training rows only (the same split as ``compare``), made unit vectors and
    oriented towards the positive class (the decoder row is flipped when the latent fires more on negative
    rows), then added as ``alpha * scale * u`` through :func:`sweep` with the same prompts, alphas and seed.

    ``latent``: the SAE latent to steer with; default ``comparison.best_latent`` when a
    :class:`~interp.sae.SAEComparison` is given, else the latent with the largest class-mean gap on training
    rows. ``scale="norm"``: alphas are in units of the mean activation norm at the hook on training rows (a
    float gives raw units). ``metric``: as in :func:`sweep`; by default the score of a dense logistic probe
    for ``label`` (fitted on the same training rows) on the generated text, read by the unsteered model.
    """
    from interp.directions import diff_in_means_tensor
    from interp.probes.linear import LinearProbe

    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    sae = sae if isinstance(sae, SAE) else SAE.load(sae)
    hook = resolve_sae_hook(store, sae, hook)
    d_model = int(model.cfg.d_model)
    if d_model != store.d_model:
        raise SteeringError(
            f"the model's d_model is {d_model} but store {store.path} holds width {store.d_model}: steer the model"
            " the store was captured from"
        )
    model_hook = canonical_hook(model, hook)
    stored_name, name = (store.model_info or {}).get("name"), model_identity(model).get("name")
    if stored_name and name and stored_name != name:
        import warnings

        warnings.warn(f"store {store.path} was captured from {stored_name!r} but the model is {name!r}", stacklevel=2)
    train, _, y_all, positive = labelled_split(store, label, test_size=test_size, seed=seed)
    X_tr, y_tr = store.activations(hook, train).float(), y_all[train]

    if comparison is not None:
        prov = getattr(comparison, "provenance", {}) or {}
        if prov.get("hook") not in (None, hook) or prov.get("label") not in (None, label):
            raise ConfigError(
                f"the comparison was made on {prov.get('label')!r} at {prov.get('hook')}, not {label!r} at {hook}:"
                " pass the matching comparison or latent="
            )
        if (prov.get("test_size", test_size), prov.get("seed", seed)) != (test_size, seed):
            raise ConfigError(
                f"the comparison split the store with test_size={prov.get('test_size')}, seed={prov.get('seed')};"
                " pass the same test_size and seed so both use one training split"
            )
        gap = comparison.gap.float()
        if gap.numel() != sae.d_sae:
            raise ConfigError(f"the comparison ranks {gap.numel()} latents but the SAE has {sae.d_sae}")
        if latent is None:
            latent = int(comparison.best_latent)
    else:
        gap, ranking = _class_gap(store, hook, sae, train, y_all, 8192, progress)
        if latent is None:
            latent = int(ranking[0])
    try:  # ints, numpy ints and one-element tensors (such as comparison.ranking[0])
        index = None if isinstance(latent, bool) else int(operator.index(latent))
    except TypeError:
        index = None
    if index is None or not 0 <= index < sae.d_sae:
        raise ConfigError(f"latent must be an integer in 0..{sae.d_sae - 1}, got {latent!r}")
    latent = index
    row = sae.W_dec[latent].detach().float().cpu()
    if float(row.norm()) == 0.0:
        raise SteeringError(f"SAE latent {latent} has an all-zero decoder row; choose another latent")
    sign = 1.0 if float(gap[latent]) >= 0 else -1.0
    dim = diff_in_means_tensor(X_tr, y_tr).float()
    if scale == "norm":
        unit = float(X_tr.norm(dim=1).mean())
    elif isinstance(scale, str):
        raise ConfigError(f"scale must be 'norm' or a positive number, got {scale!r}")
    else:
        unit = float(scale)
    default_metric = metric is None
    if default_metric:
        probe = LinearProbe().fit(X_tr, y_tr)
        metric = {"probe_score": probe_score(probe, hook=model_hook, pool=_store_pool(store.positions))}
    del X_tr
    sae_name = f"SAE latent {latent} (decoder row)"
    result = sweep_directions(
        model, prompts, {sae_name: sign * row, "diff-in-means": dim}, alphas, metric, hook=model_hook, scale=unit,
        positions=positions, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    result.config.update({
        "store": str(store.path), "label": label, "positive_class": positive, "store_hook": hook,
        "latent": latent, "latent_gap": float(gap[latent]), "decoder_sign": sign,
        "scale_mode": "mean activation norm on training rows" if scale == "norm" else "raw",
        "n_train": int(train.numel()), "test_size": test_size, "split_seed": seed,
        "sae": sae.describe(),
        "metric_source": "dense logistic probe for the label, fitted on the training rows, scoring the generated"
                         " text" if default_metric else "given",
    })  # fmt: skip
    return result


__all__ = ["SAEComparison", "SteeringComparison", "compare", "compare_sae_steering", "labelled_split", "rank_latents",
           "sweep_directions"]
