"""Logistic-regression probes: one estimator (:class:`LinearProbe`) and layer sweeps over a store.

Every fit, whether one probe or a sweep over hooks x CV folds x values of C x classes, goes through the batched
L-BFGS in :mod:`interp.probes.solver`, which reads activations only through the fused loss/gradient kernel.
Features are standardised per hook with the training rows' mean and standard deviation (kept in the probe);
the activations themselves are never copied or upcast as a whole.

Multi-class labels are fit one-vs-rest: class ``c`` is one more column of the batched problem with targets
``y == c``; ``predict_proba`` normalises the per-class sigmoids (as scikit-learn's ``OneVsRestClassifier``).
Metrics (accuracy, AUROC, recall at 1% FPR) are computed in torch by :mod:`interp.probes.metrics`, batched
over a sweep's hooks and values of C.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.artifacts import jsonable as _jsonable
from interp.artifacts import load_json as _load_json
from interp.artifacts import load_tensors as _load_tensors
from interp.artifacts import save_tensors as _save_tensors
from interp.devices import resolve_device
from interp.distributed import local_device, rank_world
from interp.errors import AnalysisError, ConfigError, InterpError
from interp.probes.estimator import EstimatorProtocol, ProbeInputError, validate_sample_weight
from interp.probes.kernel import get_loss_grad
from interp.probes.metrics import (  # noqa: F401  (public here too)
    _binary_rows,
    _metrics,
    _nanmean,
    auroc,
    binary_metrics,
    multiclass_metrics,
    recall_at_fpr,
)
from interp.probes.solver import (
    column_stats,
    covariance_rows,
    feature_covariance,
    feature_rows,
    fit_logistic,
    linear_scores,
    precondition_worthwhile,
)
from interp.distributed import split_range
from interp.probes.streaming import StoreRows, check_budget, chunk_rows
from interp.store import ActivationStore, atomic_write_json, layer_of

PROBE_FORMAT = "interp.linear_probe"
_PARAMS = ("C", "max_iter", "tol", "backend", "device", "standardize", "precondition")
SWEEP_FORMAT = "interp.probe_sweep"
# L-BFGS memory of sweeps (scipy's default is 10). With the preconditioner a sweep takes ~10-50 iterations; on
# small stores the bookkeeping over the pairs (each one a read of a [hooks, problems, d] tensor per loop of the
# recursion) is most of an iteration's cost: 5 pairs take a few more passes than 10 (bench/probes.py --small: 71
# vs 69; the 20k-row sweep: 13 vs 13) and the small sweep 10-15% less time (bench/RESULTS.md, issue 17)
SWEEP_MEMORY = 5
FORMAT_VERSION = 1

# ----------------------------------------------------------------------------------------------- helpers


def check_finite(X: Tensor, what: str) -> None:
    """A ProbeInputError (an AnalysisError and a ValueError) naming ``what`` when ``X`` holds NaN or inf."""
    bad = ~torch.isfinite(X)
    if bool(bad.any()):
        rows = int(bad.reshape(X.shape[0], -1).any(1).sum()) if X.dim() > 1 else int(bad.sum())
        raise ProbeInputError(
            f"{what}: {rows} row(s) contain NaN or inf activations; recapture in float32 or bfloat16, or pass "
            "rows= without them"
        )


def store_provenance(store: ActivationStore, **extra: Any) -> dict[str, Any]:
    """What a result was made from: the store's path, model, positions and dataset, plus ``extra``."""
    from interp import __version__

    return {
        "store": str(store.path),
        "model": store.model_info,
        "positions": store.positions,
        "dataset": store.manifest.get("dataset", {}),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "interp_version": __version__,
        **extra,
    }


def _open(store: ActivationStore | str | os.PathLike) -> ActivationStore:
    return store if isinstance(store, ActivationStore) else ActivationStore(store)


def use_preconditioner(setting: bool | str, H: int, d: int, n_rows: int, n_groups: int, device: torch.device) -> bool:
    """``precondition`` is True, False or "auto" (on when the covariance estimate is cheap, see the solver)."""
    if setting not in (True, False, "auto"):
        raise ConfigError(f"precondition={setting!r}: use True, False or 'auto'")
    return precondition_worthwhile(H, d, n_rows, n_groups, device) if setting == "auto" else bool(setting)


def preconditioner(
    setting: bool | str, X: Tensor, weights: Tensor, mean: Tensor, scale: Tensor, n_groups: int
) -> dict[str, Tensor | None]:
    """``fit_logistic``'s preconditioner arguments: the rows of the covariance estimate when they are fewer than
    ``d`` (``precond_rows``), else the covariance (``precond``), or neither (see :func:`use_preconditioner`)."""
    H, N, d = X.shape
    if not use_preconditioner(setting, H, d, int((weights > 0).sum()), n_groups, X.device):
        return {}
    rows = feature_rows(X, weights, mean, scale)
    if rows is not None:
        return {"precond_rows": rows}
    return {"precond": feature_covariance(X, weights, mean, scale)}


# ----------------------------------------------------------------------------------------------- LinearProbe


class LinearProbe(EstimatorProtocol):
    """L2-regularised logistic regression on standardised features, with scikit-learn's estimator API.

    ``LinearProbe(C=1.0).fit(X, y)`` minimises ``sum_n BCE + ||w||^2 / (2C)`` on ``(X - mean_) / scale_`` (the
    intercept is not penalised) with the batched L-BFGS solver. ``X`` is a ``[n, d]`` tensor (any float dtype,
    never copied as a whole) or array; outputs are numpy for numpy input and tensors for tensor input.

    Fitted attributes: ``classes_``, ``coef_`` ``[1 or n_classes, d]`` and ``intercept_`` in raw activation
    space (``decision_function(X) = X @ coef_.T + intercept_``), ``coef_standardized_`` /
    ``intercept_standardized_`` (the weights on standardised features, comparable to scikit-learn fit on
    standardised data), ``mean_``, ``scale_``, ``n_iter_``, ``converged_``, ``n_features_in_`` (and
    ``feature_names_in_`` after a fit on a pandas frame with string column names).

    It follows scikit-learn's estimator protocol (:mod:`interp.probes.estimator`) without importing it: it
    works in ``clone``, ``Pipeline``, ``cross_val_score``, ``GridSearchCV`` and passes ``check_estimator``.
    Bad input raises :class:`~interp.probes.estimator.ProbeInputError`, an ``InterpError`` and a ``ValueError``.

    A feature that is (numerically) constant on the training rows (see :func:`~interp.probes.solver.column_stats`:
    a standard deviation below 1e-6 of the typical feature's scale, as float32 rounding jitter is) gets
    ``scale_ = inf`` and weight exactly 0, instead of a weight that blows its jitter up to a unit feature.
    """

    _PARAMS = _PARAMS
    hook: str | None = None  # set by train_probes and load: a class default, so __init__ stores parameters only

    def __init__(
        self,
        C: float = 1.0,
        max_iter: int = 500,
        tol: float = 1e-4,
        backend: str = "auto",
        device: str | torch.device | None = None,
        standardize: bool = True,
        precondition: bool | str = "auto",
    ):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.backend = backend
        self.device = device
        self.standardize = standardize
        self.precondition = precondition

    @property
    def provenance(self) -> dict[str, Any]:
        """What the probe was made from (store, hook, label, ...); empty for a probe fit by hand."""
        if "_provenance" not in self.__dict__:
            self._provenance: dict[str, Any] = {}
        return self._provenance

    @provenance.setter
    def provenance(self, value: dict[str, Any]) -> None:
        self._provenance = dict(value)

    def __repr__(self) -> str:
        fitted = f", hook={self.hook!r}" if self.hook else ""
        return f"LinearProbe(C={self.C}{fitted})"

    # ---- fit
    def fit(self, X: Float[Tensor, "n d"] | np.ndarray, y: Any, sample_weight: Any = None) -> LinearProbe:
        """Fit on rows ``X`` with labels ``y`` (any values; two or more classes). Returns ``self``."""
        Xt, _ = self._validate_x(X, reset=True)
        y_np = self._validate_y(y, Xt.shape[0])
        sw = validate_sample_weight(sample_weight, Xt.shape[0])
        dev = resolve_device(self.device, Xt.device)
        Xt = Xt.to(dev)
        if Xt.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            Xt = Xt.float()
        check_finite(Xt, "X")
        classes, y_idx = np.unique(y_np, return_inverse=True)
        if not bool((sw > 0).any()):
            raise ProbeInputError("sample_weight is all zero: at least one row needs a positive weight")
        present = np.unique(y_idx[sw.numpy() > 0])
        if present.size < 2:
            raise ProbeInputError(
                f"y has a single class ({classes[present].tolist()}) among the rows with positive weight: a probe "
                "needs more than one class"
            )
        n = Xt.shape[0]
        yi = torch.from_numpy(y_idx.astype(np.int64))
        K = classes.size
        Y = (yi[None] == (torch.arange(K)[:, None] if K > 2 else torch.ones(1, 1, dtype=torch.int64))).float()
        S = sw[None].expand(Y.shape[0], n).contiguous()
        X3 = Xt.unsqueeze(0)
        if self.standardize:
            mean, scale = column_stats(X3, S[:1].to(dev), constant_scale=math.inf)
        else:
            mean = torch.zeros(1, 1, Xt.shape[1], device=dev)
            scale = torch.ones(1, 1, Xt.shape[1], device=dev)
        pre = preconditioner(self.precondition, X3, S[0], mean[:, 0], scale[:, 0], 1)
        res = fit_logistic(
            X3, Y, S, float(self.C), mean=mean, scale=scale, **pre, max_iter=self.max_iter, tol=self.tol,
            backend=self.backend,
        )
        W, b = res.effective(mean, scale)
        self._set_fitted(
            classes=classes,
            coef=W[0],
            intercept=b[0],
            mean=mean[0, 0],
            scale=scale[0, 0],
            coef_std=res.coef[0],
            intercept_std=res.intercept[0],
            n_iter=res.n_iter[0].cpu().numpy(),
            converged=bool(res.converged.all()),
        )
        return self

    def _set_fitted(self, *, classes, coef, intercept, mean, scale, coef_std, intercept_std, n_iter, converged):
        self.classes_ = np.asarray(classes)
        self.coef_ = coef.detach().float().cpu()
        self.intercept_ = intercept.detach().float().cpu()
        self.mean_ = mean.detach().float().cpu()
        self.scale_ = scale.detach().float().cpu()
        self.coef_standardized_ = coef_std.detach().float().cpu()
        self.intercept_standardized_ = intercept_std.detach().float().cpu()
        self.n_iter_ = np.asarray(n_iter)
        self.converged_ = bool(converged)
        self.n_features_in_ = int(self.coef_.shape[1])
        return self

    # ---- predict
    def decision_function(self, X: Float[Tensor, "n d"] | np.ndarray) -> Any:
        """Logits: ``[n]`` for two classes (positive = ``classes_[1]``), ``[n, n_classes]`` one-vs-rest.

        Tensors are scored in float32 chunks on their device (never upcast whole); arrays in float64 numpy.
        """
        self._check_fitted()
        Xt, is_np = self._validate_x(X, reset=False)
        check_finite(Xt, "X")
        if is_np:
            z = Xt.numpy().astype(np.float64, copy=False) @ self.coef_.double().numpy().T
            z = z + self.intercept_.double().numpy()
            return z[:, 0] if z.shape[1] == 1 else z
        z = linear_scores(Xt.unsqueeze(0), self.coef_[None].to(Xt.device), self.intercept_[None].to(Xt.device))[0]
        z = z.T  # [n, k]
        return z[:, 0] if z.shape[1] == 1 else z

    def predict_proba(self, X: Float[Tensor, "n d"] | np.ndarray) -> Any:
        """Class probabilities ``[n, n_classes]`` (one-vs-rest sigmoids normalised to sum to 1)."""
        z = self.decision_function(X)
        t = torch.as_tensor(z)
        p = torch.sigmoid(t if t.dtype == torch.float64 else t.float())
        out = torch.stack([1 - p, p], 1) if t.dim() == 1 else p / p.sum(1, keepdim=True).clamp_min(1e-30)
        return out.numpy() if isinstance(z, np.ndarray) else out

    def predict(self, X: Float[Tensor, "n d"] | np.ndarray) -> Any:
        """Predicted class values (from ``classes_``)."""
        z = self.decision_function(X)
        t = torch.as_tensor(z)
        idx = (t > 0).long() if t.dim() == 1 else t.argmax(1)
        values = self.classes_[idx.cpu().numpy()]
        if isinstance(z, np.ndarray) or values.dtype.kind not in "biuf":
            return values
        return torch.from_numpy(values).to(t.device)

    def score(self, X: Float[Tensor, "n d"] | np.ndarray, y: Any, sample_weight: Any = None) -> float:
        """Mean accuracy on ``(X, y)`` (weighted by ``sample_weight``)."""
        pred = self.predict(X)
        pred = pred.cpu().numpy() if isinstance(pred, Tensor) else np.asarray(pred)
        y_np = self._validate_y(y, pred.shape[0])
        hit = torch.from_numpy((pred == y_np).astype(np.float64))
        w = validate_sample_weight(sample_weight, hit.numel()).double()
        return float((hit * w).sum() / w.sum().clamp_min(1e-300))

    def metrics(self, X: Float[Tensor, "n d"] | np.ndarray, y: Any) -> dict[str, float]:
        """``accuracy``, ``auroc``, ``recall_at_1pct_fpr`` on ``(X, y)`` (one-vs-rest macro for many classes)."""
        z = torch.as_tensor(self.decision_function(X))
        y_np = (y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)).reshape(-1)
        index = {v: i for i, v in enumerate(self.classes_.tolist())}
        missing = sorted({v for v in y_np.tolist() if v not in index}, key=str)
        if missing:
            raise AnalysisError(f"labels {missing[:5]} were not seen in fit; known classes: {self.classes_.tolist()}")
        yi = torch.tensor([index[v] for v in y_np.tolist()], dtype=torch.int64)
        return _metrics(z, yi)

    # ---- save / load
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``probe.safetensors`` (weights, standardisation) and ``probe.json`` (classes, settings, provenance)."""
        self._check_fitted()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _save_tensors(d / "probe.safetensors", self._tensors())
        atomic_write_json(d / "probe.json", {"format": PROBE_FORMAT, "version": FORMAT_VERSION, **self._meta()})
        return d

    def _tensors(self) -> dict[str, Tensor]:
        return {
            "coef": self.coef_,
            "intercept": self.intercept_,
            "mean": self.mean_,
            "scale": self.scale_,
            "coef_standardized": self.coef_standardized_,
            "intercept_standardized": self.intercept_standardized_,
        }

    def _meta(self) -> dict[str, Any]:
        params = {k: (str(v) if k == "device" and v is not None else v) for k, v in self.get_params().items()}
        return _jsonable(
            {
                "classes": self.classes_.tolist(),
                "params": params,
                "hook": self.hook,
                "n_iter": self.n_iter_.tolist(),
                "converged": self.converged_,
                "d_model": self.n_features_in_,
                "provenance": self.provenance,
            }
        )

    @classmethod
    def _from_parts(cls, tensors: dict[str, Tensor], meta: dict[str, Any], prefix: str = "") -> LinearProbe:
        params = dict(meta.get("params", {}))
        probe = cls(**{k: v for k, v in params.items() if k in _PARAMS})
        try:
            t = {k: tensors[prefix + k] for k in ("coef", "intercept", "mean", "scale", "coef_standardized",
                                                  "intercept_standardized")}
        except KeyError as e:
            raise InterpError(f"saved probe is missing tensor {e}; save it again") from None
        probe._set_fitted(
            classes=np.asarray(meta["classes"]),
            coef=t["coef"],
            intercept=t["intercept"],
            mean=t["mean"],
            scale=t["scale"],
            coef_std=t["coef_standardized"],
            intercept_std=t["intercept_standardized"],
            n_iter=np.asarray(meta.get("n_iter", [])),
            converged=bool(meta.get("converged", True)),
        )
        probe.hook = meta.get("hook")
        probe.provenance = dict(meta.get("provenance") or {})
        return probe

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LinearProbe:
        """Read a probe written by :meth:`save` (safetensors + JSON only)."""
        d = Path(directory)
        meta = _load_json(d / "probe.json", PROBE_FORMAT, FORMAT_VERSION, "probe")
        return cls._from_parts(_load_tensors(d / "probe.safetensors", "probe"), meta)


# ----------------------------------------------------------------------------------------------- sweeps


@dataclass
class ProbeSweep:
    """A probe per hook with its cross-validated and held-out metrics (see :func:`train_probes`)."""

    hooks: list[str]
    rows: list[dict[str, Any]]
    probes: dict[str, LinearProbe]
    best_hook: str
    label: str
    classes: list[Any]
    config: dict[str, Any] = field(default_factory=dict)
    cv_results: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def best_probe(self) -> LinearProbe:
        return self.probes[self.best_hook]

    @property
    def best_layer(self) -> int | None:
        return layer_of(self.best_hook)

    def __getitem__(self, hook: str | int) -> LinearProbe:
        """The probe of a hook: its name, a classic alias (``blocks.3.hook_resid_post``) or a layer index."""
        from interp.errors import HookError, close_matches
        from interp.store import static_canonical

        if isinstance(hook, int) and not isinstance(hook, bool):
            matches = [h for h in self.hooks if layer_of(h) == hook]
            if len(matches) == 1:
                return self.probes[matches[0]]
            raise HookError(f"layer {hook} matches {len(matches)} hooks of this sweep; pass one of {self.hooks}")
        name = hook if hook in self.probes else static_canonical(str(hook))
        if name not in self.probes:
            raise HookError(f"no probe for hook {hook!r} in this sweep; {close_matches(str(hook), self.hooks)}")
        return self.probes[name]

    def metric(self, name: str) -> list[float]:
        """One metric per hook, in hook order (e.g. ``"heldout_accuracy"``)."""
        return [r.get(name, float("nan")) for r in self.rows]

    def to_frame(self):
        """A pandas DataFrame, one row per hook."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def plot(self, title: str | None = None):
        """Plotly figure: accuracy and AUROC per layer, train vs held-out (and test when there is one), with 95%
        intervals, the C each layer kept, and CV accuracy for every C of the grid."""
        import pandas as pd

        from interp import plots

        return plots.probe_sweep_figure(self.to_frame(), title=title, cv_frame=pd.DataFrame(self.cv_results),
                                        config=self.config, provenance=self.provenance, label=self.label)

    def table(self) -> str:
        """A fixed-width text table of the per-hook metrics (what the CLI prints)."""
        has_test = any("test_accuracy" in r for r in self.rows)
        head = f"{'hook':<28} {'layer':>5} {'C':>8} {'train acc':>9} {'held-out acc':>14} {'AUROC':>6} {'R@1%FPR':>7}"
        head += f" {'test acc':>8}" if has_test else ""
        lines = [head]
        fmt = lambda v: "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
        for r in self.rows:
            std = r.get("heldout_accuracy_std")
            acc = fmt(r["heldout_accuracy"]) + (f"±{std:.3f}" if std is not None and not math.isnan(std) else "      ")
            layer = "" if r["layer"] is None else str(r["layer"])
            line = (
                f"{r['hook']:<28} {layer:>5} {r['C']:>8.3g} {fmt(r['train_accuracy']):>9} {acc:>14} "
                f"{fmt(r['heldout_auroc']):>6} {fmt(r['heldout_recall_at_1pct_fpr']):>7}"
            )
            if has_test:
                line += f" {fmt(r.get('test_accuracy')):>8}"
            lines.append(line + ("  <- best" if r["hook"] == self.best_hook else ""))
        if any(isinstance(r.get("heldout_recall_at_1pct_fpr"), float) and math.isnan(r["heldout_recall_at_1pct_fpr"])
               for r in self.rows):
            lines.append("R@1%FPR n/a: fewer than 100 held-out negatives, too few to observe a 1% false-positive rate")
        return "\n".join(lines)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``sweep.json`` (metrics, settings, provenance) and ``probes.safetensors`` (every hook's probe)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        probes_meta = {}
        for h, p in self.probes.items():
            for k, v in p._tensors().items():
                tensors[f"{h}/{k}"] = v
            probes_meta[h] = p._meta()
        _save_tensors(d / "probes.safetensors", tensors)
        meta = {
            "format": SWEEP_FORMAT,
            "version": FORMAT_VERSION,
            "label": self.label,
            "classes": self.classes,
            "hooks": self.hooks,
            "best_hook": self.best_hook,
            "config": self.config,
            "rows": self.rows,
            "cv_results": self.cv_results,
            "provenance": self.provenance,
            "probes": probes_meta,
        }
        atomic_write_json(d / "sweep.json", _jsonable(meta))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ProbeSweep:
        """Read a sweep written by :meth:`save`."""
        d = Path(directory)
        meta = _load_json(d / "sweep.json", SWEEP_FORMAT, FORMAT_VERSION, "probe sweep")
        tensors = _load_tensors(d / "probes.safetensors", "probe sweep")
        probes = {h: LinearProbe._from_parts(tensors, m, prefix=f"{h}/") for h, m in meta["probes"].items()}

        def nan(r: dict[str, Any]) -> dict[str, Any]:  # JSON null back to NaN (layer may be None)
            return {k: (float("nan") if v is None and k != "layer" else v) for k, v in r.items()}

        return cls(
            hooks=list(meta["hooks"]),
            rows=[nan(r) for r in meta["rows"]],
            probes=probes,
            best_hook=meta["best_hook"],
            label=meta["label"],
            classes=list(meta["classes"]),
            config=dict(meta.get("config", {})),
            cv_results=list(meta.get("cv_results", [])),
            provenance=dict(meta.get("provenance", {})),
        )


def load(directory: str | os.PathLike) -> ProbeSweep | LinearProbe:
    """Load a saved :class:`ProbeSweep` (``sweep.json``) or :class:`LinearProbe` (``probe.json``)."""
    d = Path(directory)
    if (d / "sweep.json").exists():
        return ProbeSweep.load(d)
    if (d / "probe.json").exists():
        return LinearProbe.load(d)
    raise InterpError(f"{d} holds neither sweep.json nor probe.json: not a saved probe or sweep")


def labelled_rows(store: ActivationStore, label: str) -> tuple[Tensor, Tensor, list[Any]]:
    """``(row indices, class index per row, class values)`` of the rows that carry ``label`` (-1 = none)."""
    y = store.labels(label)
    classes = store.label_classes(label)
    keep = y >= 0
    rows = torch.nonzero(keep).flatten()
    return rows, y[rows], classes


def split_rows(
    store: ActivationStore, rows: Tensor, test: str = "auto", test_size: float = 0.25, seed: int = 0, need: bool = True
) -> tuple[Tensor, Tensor | None, str]:
    """Positions (into ``rows``) of the fit rows and the test rows, and the kind of split used.

    ``test="auto"`` uses the dataset's ``split`` field when every example has ``train`` or ``test``; ``"none"``
    keeps every row for fitting (returns no test rows unless ``need``, then a seeded split by example).
    """
    if test not in ("auto", "none", "random"):
        raise ConfigError(f"test={test!r}: use 'auto' (dataset split when present), 'random' or 'none'")
    splits = store.example_splits()
    has_split = bool(splits) and all(s in ("train", "test") for s in splits)
    if test == "auto" and has_split:
        _, te = store.train_test_split(use_dataset_split=True)
        kind = "dataset"
    elif test == "random" or need:
        _, te = store.train_test_split(test_size=test_size, seed=seed, use_dataset_split=False)
        kind = "random"
    else:
        return torch.arange(rows.numel()), None, "none"
    is_test = torch.zeros(len(store), dtype=torch.bool)
    is_test[te] = True
    t = is_test[rows]
    return torch.nonzero(~t).flatten(), torch.nonzero(t).flatten(), kind


def example_groups(store: ActivationStore, group_by: str | None = "auto") -> Tensor:
    """A group id per row: its example, or the value of the example field ``group_by`` (``"auto"``: ``pair_id``
    when every example has one, else the example)."""
    ex = store.example_ids()
    examples = store.examples()
    if group_by == "auto":
        group_by = "pair_id" if examples and all("pair_id" in e for e in examples) else None
    if group_by is None:
        return ex
    missing = [i for i, e in enumerate(examples) if group_by not in e]
    if missing:
        from interp.errors import close_matches

        keys = sorted({k for e in examples for k in e})
        raise ConfigError(f"group_by={group_by!r} is not a field of every example; {close_matches(group_by, keys)}")
    ids: dict[str, int] = {}
    per_example = torch.tensor([ids.setdefault(json.dumps(e[group_by], sort_keys=True), len(ids)) for e in examples],
                               dtype=torch.int64)
    return per_example[ex]


def group_folds(groups: Tensor, strata: Tensor, k: int, seed: int = 0) -> Tensor:
    """A fold in ``[0, k)`` per row: whole groups (examples) per fold, stratified by each group's main class."""
    uniq, inv = torch.unique(groups, return_inverse=True)
    G = uniq.numel()
    if G < k:
        raise AnalysisError(f"cv={k} needs at least {k} examples, got {G}; use a smaller cv")
    n_cls = int(strata.max()) + 1 if strata.numel() else 1
    counts = torch.zeros(G, n_cls, dtype=torch.int64)
    counts.index_put_((inv, strata), torch.ones_like(inv), accumulate=True)
    key = counts.argmax(1)  # each example's most common class
    gen = torch.Generator().manual_seed(seed)
    fold_of_group = torch.empty(G, dtype=torch.int64)
    offset = 0
    for c in range(n_cls):
        members = torch.nonzero(key == c).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)]
        fold_of_group[members] = (torch.arange(members.numel()) + offset) % k
        offset += members.numel()
    return fold_of_group[inv]


def _load_hooks(
    store: ActivationStore, hooks: list[str], rows: Tensor | None, device: torch.device, progress: bool
) -> Tensor:
    """``[H, N, d]`` activations of ``hooks`` for ``rows`` in the store dtype on ``device``."""
    n = len(store) if rows is None else rows.numel()
    X = torch.empty(len(hooks), n, store.d_model, dtype=store.dtype, device=device)
    it = hooks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(hooks, desc="reading activations", leave=False)
    for i, h in enumerate(it):
        X[i] = store.activations(h, rows).to(device)
    return X


def _check_stats_finite(X: Tensor | StoreRows, hooks: list[str], *stats: Tensor) -> None:
    """NaN/inf anywhere in ``X`` makes its column statistics NaN (:func:`column_stats`; an infinite scale
    marks a constant feature): check those, and only on failure look for the offending hook, so that finite
    data costs no extra pass."""
    if not any(bool(t.isnan().any()) for t in stats):
        return
    for i, h in enumerate(hooks):
        if isinstance(X, Tensor):
            check_finite(X[i], f"hook {h}")
        elif any(bool(t[i].isnan().any()) for t in stats):  # streamed: the hook's statistics name it
            raise ProbeInputError(
                f"hook {h}: its activations contain NaN or inf (or overflow float32); recapture in float32 or "
                "bfloat16, or pass rows= without them"
            )
    raise AnalysisError(
        "activations are too large to standardise in float32 (|x| above ~1e18); rescale or recapture them"
    )


def train_probes(
    store: ActivationStore | str | os.PathLike,
    label: str = "label",
    hooks: str | int | Sequence[str | int] = "all",
    cv: int | None = 5,
    C: float | Sequence[float] = 1.0,
    seed: int = 0,
    *,
    test: str = "auto",
    group_by: str | None = "auto",
    rows: Int[Tensor, " n"] | Sequence[int] | None = None,
    max_rows: int | None = None,
    max_iter: int = 500,
    tol: float = 1e-4,
    precondition: bool | str = "auto",
    backend: str = "auto",
    device: str | torch.device | None = None,
    max_memory_mb: float | None = 4096,
    progress: bool = True,
) -> ProbeSweep:
    """Train a logistic probe for every hook at once: one batched problem over hooks x folds x C x classes.

    Rows are the store's rows that carry ``label`` (an example field such as ``"label"``, or ``"token_label"``
    for token-level labels, where -1 rows are skipped), optionally narrowed by ``rows`` or subsampled to
    ``max_rows``. With ``test="auto"`` and a dataset ``split`` field, the ``test`` examples are held out: CV
    runs on the ``train`` examples and the final probes (fit on all of them) are scored on ``test``.

    ``cv`` folds group rows by example (an example's tokens never straddle folds), or by the example field
    ``group_by`` (``"auto"``: ``pair_id`` when the examples have it; e.g. ``"country"`` keeps both statements
    about a country in one fold), and are stratified by label; ``heldout_*`` metrics are fold means. With
    ``cv`` None or < 2, ``heldout_*`` is the test split (the dataset's, or a seeded 25% of examples). Several
    values of ``C`` are all fit; each hook keeps the one with the best CV accuracy. ``best_hook`` has the best
    held-out accuracy (ties: AUROC, then the earlier hook).

    The selected hooks' rows are held in memory (in the store dtype) on ``device`` (default: CUDA when
    available; under torchrun, each rank's ``cuda:LOCAL_RANK``) when they fit ``max_memory_mb`` (MiB; None: no limit); otherwise they are streamed from the store
    in chunks, every L-BFGS evaluation one pass over it: the same full-batch optimum, a pass costing a read of
    the store. Under ``torch.distributed`` (a process group already initialised, e.g. by torchrun) each rank
    holds or streams a slice of the rows and the sums are all-reduced: every rank returns the same sweep as one
    process would (:mod:`interp.probes.streaming`). ``precondition`` ("auto", True, False) uses each
    hook's feature covariance (estimated from at most 4096 rows) to precondition L-BFGS, which cuts the number
    of passes over the activations several-fold; "auto" skips it when ``d_model`` makes it costly, and when
    there are fewer training rows than features (there the passes are cheap and the preconditioner is not).
    """
    store = _open(store)
    budget = check_budget(max_memory_mb)
    hook_names = store.resolve_hooks(hooks)
    Cs = [float(c) for c in (C if isinstance(C, (list, tuple, np.ndarray, Tensor)) else [C])]
    if not Cs or any(c <= 0 or not math.isfinite(c) for c in Cs):
        raise ConfigError(f"C must be positive numbers, got {C!r}")
    k = int(cv) if cv is not None else 0
    if k == 1 or k < 0:
        raise ConfigError(f"cv={cv}: use cv >= 2 folds, or cv=None to score on the test split only")
    lab_rows, y_used, classes = labelled_rows(store, label)
    if rows is not None:
        want = torch.zeros(len(store), dtype=torch.bool)
        want[torch.as_tensor(rows, dtype=torch.int64)] = True
        keep = want[lab_rows]
        lab_rows, y_used = lab_rows[keep], y_used[keep]
    if max_rows is not None and lab_rows.numel() > max_rows:
        g = torch.Generator().manual_seed(seed)
        pick = torch.sort(torch.randperm(lab_rows.numel(), generator=g)[:max_rows]).values
        lab_rows, y_used = lab_rows[pick], y_used[pick]
    present = torch.unique(y_used)
    if present.numel() < 2:
        shown = [classes[int(i)] for i in present] if present.numel() else []
        raise AnalysisError(
            f"label {label!r} has a single class {shown} in the {lab_rows.numel()} rows used: a probe needs at least "
            "two classes; check the dataset or the label name"
        )
    # compact the class indices to those present
    remap = torch.full((len(classes),), -1, dtype=torch.int64)
    remap[present] = torch.arange(present.numel())
    y_used = remap[y_used]
    classes = [classes[int(i)] for i in present]
    K = len(classes)
    fit_pos, test_pos, split_kind = split_rows(store, lab_rows, test=test, seed=seed, need=k < 2)
    if test_pos is not None and test_pos.numel() == 0:
        test_pos = None
        if k < 2:
            raise AnalysisError("no test rows: the dataset's test split is empty for these rows; use cv >= 2")
    y_fit = y_used[fit_pos]
    if torch.unique(y_fit).numel() < 2:
        raise AnalysisError(f"the training rows of label {label!r} hold a single class; check the split column")
    N = lab_rows.numel()
    all_rows = lab_rows if not (N == len(store) and bool((lab_rows == torch.arange(N)).all())) else None

    H = len(hook_names)
    rank, world = rank_world()
    dev = resolve_device(device, local_device() if world > 1 else None)  # torchrun: each rank on its own GPU
    progress = progress and rank == 0
    itemsize = torch.empty(0, dtype=store.dtype).element_size()
    streamed = world > 1 or (budget is not None and H * N * store.d_model * itemsize > budget)

    # ---- problems: for each C, for each fold (then the final fit), for each class column
    n_folds = k if k >= 2 else 0
    fold = torch.full((N,), -1, dtype=torch.int64)
    if n_folds:
        ex = example_groups(store, group_by)[lab_rows[fit_pos]]
        fold[fit_pos] = group_folds(ex, y_fit, n_folds, seed)
    in_fit = torch.zeros(N, dtype=torch.bool)
    in_fit[fit_pos] = True
    cols = 1 if K == 2 else K
    masks = [in_fit & (fold != f) for f in range(n_folds)] + [in_fit]
    for f, m in enumerate(masks[:-1]):
        if torch.unique(y_used[m]).numel() < 2 or not bool((fold == f).any()):
            raise AnalysisError(f"CV fold {f} has a single class in its training rows; use a smaller cv")
    targets = (y_used[None] == torch.arange(K)[:, None]).float() if K > 2 else (y_used == 1).float()[None]
    Ylist, Slist, Clist = [], [], []
    for c in Cs:
        for m in masks:
            Ylist.append(targets)
            Slist.append(m.float()[None].expand(cols, N))
            Clist.append(torch.full((cols,), c))
    Y = torch.cat(Ylist).to(dev)
    S = torch.cat(Slist).to(dev)
    Cvec = torch.cat(Clist).to(dev)
    P = Y.shape[0]
    n_masks = len(masks)
    # standardisation statistics per training-row mask (shared by its class columns), plus one over every row
    # so that a NaN/inf anywhere is caught without a separate pass
    stat_w = torch.stack([m.float() for m in masks] + [torch.ones(N)]).to(dev)
    if precondition == "auto" and int(in_fit.sum()) < store.d_model:
        # fewer training rows than features: a pass is cheap, and the preconditioner (an eigendecomposition
        # per hook, two more products per iteration) costs more than the passes it saves (bench/probes.py
        # --small: 50 passes with it, 69 without, a quarter less time without; also at tol 1e-6)
        precondition = False
    if streamed:
        lo, hi = split_range(0, N, 1, world)[rank]
        X = StoreRows(store, hook_names, lab_rows, lo, hi, dev, chunk_rows(budget, H, store.d_model, itemsize, P),
                      hold=budget is None or H * (hi - lo) * store.d_model * itemsize <= budget,
                      base_loss_grad=get_loss_grad(backend, dev), distributed=world > 1)
        mean_m, scale_m = X.column_stats(stat_w, constant_scale=math.inf)
        Y, S = Y[:, lo:hi], S[:, lo:hi]
        cov_rows = covariance_rows(masks[-1].float(), 4096)
        cov_w = torch.ones(cov_rows.numel())
        # the covariance rows are read (row by row, not the spans around them) only when they will be used
        wanted = use_preconditioner(precondition, H, store.d_model, cov_rows.numel(), len(Cs), dev)
        cov_X = _load_hooks(store, hook_names, lab_rows[cov_rows], dev, False) if wanted else None
        solve = {"loss_grad": X.loss_grad, "reduce": X.reduce}
    else:
        X = _load_hooks(store, hook_names, all_rows, dev, progress)
        mean_m, scale_m = column_stats(X, stat_w, constant_scale=math.inf)
        cov_X, cov_w, solve = X, masks[-1].float(), {}
    _check_stats_finite(X, hook_names, mean_m, scale_m)
    mean_m, scale_m = mean_m[:, :-1], scale_m[:, :-1]
    sel = torch.arange(P) // cols % n_masks
    mean, scale = mean_m[:, sel], scale_m[:, sel]
    pre = {} if cov_X is None else preconditioner(precondition, cov_X, cov_w, mean_m[:, -1], scale_m[:, -1], len(Cs))
    del cov_X
    res = fit_logistic(
        X, Y, S, Cvec, mean=mean, scale=scale, **pre, max_iter=max_iter, tol=tol, backend=backend,
        progress=progress, desc=f"probes ({H} hooks x {P} problems)", memory=SWEEP_MEMORY, **solve,
    )
    W, b = res.effective(mean, scale)
    Z = X.scores(W, b) if streamed else linear_scores(X, W, b).cpu()  # [H, P, N]
    del X

    Zm = Z.reshape(H, len(Cs), n_masks, cols, N)

    def metrics_at(mi: int, rows: Tensor) -> list[list[dict[str, float]]]:
        """Metrics ``[hook][C]`` of the probes of mask ``mi`` on the rows ``rows`` (bool [N])."""
        z, yr = Zm[:, :, mi][..., rows], y_used[rows]  # [H, nC, cols, n]
        if cols == 1:  # binary: every hook and C in one batch
            flat = _binary_rows(z.reshape(-1, z.shape[-1]).double(), yr)
            return [flat[h * len(Cs) : (h + 1) * len(Cs)] for h in range(H)]
        return [[multiclass_metrics(z[h, ci].T, yr) for ci in range(len(Cs))] for h in range(H)]

    rows_out: list[dict[str, Any]] = []
    cv_results: list[dict[str, Any]] = []
    probes: dict[str, LinearProbe] = {}
    test_mask = torch.zeros(N, dtype=torch.bool)
    if test_pos is not None:
        test_mask[test_pos] = True
    majority_ref = y_used[test_mask] if test_pos is not None and n_folds == 0 else y_used[in_fit]
    majority = float(torch.bincount(majority_ref, minlength=K).max()) / max(1, majority_ref.numel())
    tr_m = [metrics_at(f, masks[f]) for f in range(n_folds)]
    ho_m = [metrics_at(f, fold == f) for f in range(n_folds)]
    final_m = metrics_at(n_masks - 1, in_fit)
    test_all = metrics_at(n_masks - 1, test_mask) if test_pos is not None else None
    for h, hook in enumerate(hook_names):
        best = None
        for ci, c in enumerate(Cs):
            entry: dict[str, Any] = {"hook": hook, "C": c}
            if n_folds:
                tr = [tr_m[f][h][ci] for f in range(n_folds)]
                ho = [ho_m[f][h][ci] for f in range(n_folds)]
                for name in ("accuracy", "auroc", "recall_at_1pct_fpr"):
                    entry[f"train_{name}"] = _nanmean([m[name] for m in tr])
                    entry[f"heldout_{name}"] = _nanmean([m[name] for m in ho])
                entry["heldout_accuracy_std"] = float(np.std([m["accuracy"] for m in ho]))
                entry["heldout_accuracy_folds"] = [m["accuracy"] for m in ho]
            final_train = final_m[h][ci]
            test_m = test_all[h][ci] if test_all is not None else None
            if not n_folds:
                for name in ("accuracy", "auroc", "recall_at_1pct_fpr"):
                    entry[f"train_{name}"] = final_train[name]
                    entry[f"heldout_{name}"] = test_m[name]  # type: ignore[index]
                entry["heldout_accuracy_std"] = float("nan")
            elif test_m is not None:
                for name in ("accuracy", "auroc", "recall_at_1pct_fpr"):
                    entry[f"test_{name}"] = test_m[name]
            cv_results.append(entry)
            key = (entry["heldout_accuracy"], _nz(entry["heldout_auroc"]), -c)
            if best is None or key > best[0]:
                best = (key, ci, entry)
        assert best is not None
        _, ci, entry = best
        p0 = (ci * n_masks + n_masks - 1) * cols
        probe = LinearProbe(C=Cs[ci], max_iter=max_iter, tol=tol, backend=backend, device=None)
        probe._set_fitted(
            classes=np.asarray(classes),
            coef=W[h, p0 : p0 + cols],
            intercept=b[h, p0 : p0 + cols],
            mean=mean[h, p0],
            scale=scale[h, p0],
            coef_std=res.coef[h, p0 : p0 + cols],
            intercept_std=res.intercept[h, p0 : p0 + cols],
            n_iter=res.n_iter[h, p0 : p0 + cols].cpu().numpy(),
            converged=bool(res.converged[h, p0 : p0 + cols].all()),
        )
        probe.hook = hook
        probe.provenance = store_provenance(store, hook=hook, label=label, C=Cs[ci], n_train=int(in_fit.sum()))
        probes[hook] = probe
        row = {
            "hook": hook,
            "layer": layer_of(hook),
            "C": Cs[ci],
            **{k_: v for k_, v in entry.items() if k_ not in ("hook", "C")},
            "majority": majority,
            "n_iter": int(res.n_iter[h].max()),
            "converged": bool(res.converged[h].all()),
        }
        rows_out.append(row)
    order = sorted(
        range(H), key=lambda i: (-rows_out[i]["heldout_accuracy"], -_nz(rows_out[i]["heldout_auroc"]), i)
    )
    best_hook = hook_names[order[0]]
    config = {
        "cv": n_folds or None,
        "group_by": group_by,
        "C": Cs,
        "seed": seed,
        "split": split_kind,
        "n_rows": N,
        "n_fit": int(in_fit.sum()),
        "n_test": int(test_mask.sum()),
        "max_iter": max_iter,
        "tol": tol,
        "backend": backend,
        "passes": res.n_passes,
        "multiclass": "one-vs-rest" if K > 2 else None,
    }
    return ProbeSweep(
        hooks=hook_names,
        rows=rows_out,
        probes=probes,
        best_hook=best_hook,
        label=label,
        classes=_jsonable(list(classes)),
        config=config,
        cv_results=cv_results,
        provenance=store_provenance(store, label=label, hooks=hook_names),
    )


def _nz(v: float) -> float:
    return -1.0 if v is None or math.isnan(v) else v
