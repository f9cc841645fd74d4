"""Fitting a detector on stores and calibrating its threshold: token scorers, aggregation, thresholds at a
target false-positive rate, validation metrics."""

from __future__ import annotations

import datetime as _dt
import json
import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.artifacts import jsonable as _jsonable
from interp.errors import ConfigError, DetectorError, StoreError, close_matches
from interp.store import ActivationStore, static_canonical

if TYPE_CHECKING:
    from interp.detectors.detector import Detector

AGGREGATIONS = ("mean", "max", "topk", "last")
PAIR_FIELDS = ("pair_id", "group", "pair", "country")  # example fields that say which rows belong together
METHODS = ("probe", "diff_in_means")


def aggregate_scores(scores: Float[Tensor, " n"], how: str = "mean", k: int = 5) -> float:
    """One number from the token scores a mask selected: their mean, max, mean of the top ``k``, or last.

    An empty selection aggregates to NaN (nothing to judge), which callers report rather than hide.
    """
    if how not in AGGREGATIONS:
        raise ConfigError(f"unknown aggregation {how!r}; {close_matches(how, AGGREGATIONS)}")
    if scores.numel() == 0:
        return float("nan")
    s = scores.double()
    if how == "mean":
        return float(s.mean())
    if how == "max":
        return float(s.max())
    if how == "last":
        return float(s[-1])
    return float(torch.topk(s, min(int(k), s.numel())).values.mean())


def threshold_at_fpr(negative_scores: Float[Tensor, " n"], target_fpr: float = 0.01) -> float:
    """The threshold ``t`` such that at most ``floor(target_fpr * n)`` of the negatives score strictly above it.

    ``t`` is the ``floor(target_fpr * n) + 1``-th largest negative score, so on the calibration negatives the
    rate of ``score > t`` never exceeds the target (ties can only lower it).
    """
    if not 0.0 <= target_fpr < 1.0:
        raise ConfigError(f"target_fpr must be in [0, 1), got {target_fpr}")
    s = negative_scores.double().flatten()
    s = s[~torch.isnan(s)]
    if s.numel() == 0:
        raise DetectorError("no negative examples to calibrate the threshold on; give a validation split with"
                            " negatives or a control store of ordinary text")
    allowed = int(math.floor(target_fpr * s.numel() + 1e-9))
    return float(torch.sort(s, descending=True).values[allowed])


def _metrics(scores: Tensor, y: Tensor, threshold: float | None) -> dict[str, float]:
    """AUROC, recall at 1% FPR, and accuracy / FPR / recall at ``threshold`` (score > threshold is positive)."""
    from interp.probes.linear import binary_metrics

    scores = scores.double()
    keep = ~torch.isnan(scores)
    scores, y = scores[keep], y[keep].long()
    out: dict[str, float] = {"n": int(y.numel()), "n_positive": int(y.sum())}
    if y.numel() == 0:
        return out
    if 0 < int(y.sum()) < y.numel():
        m = binary_metrics(scores.float(), y)
        out["auroc"] = float(m["auroc"])
        out["recall_at_1pct_fpr"] = float(m["recall_at_1pct_fpr"])
    else:
        out["auroc"] = float("nan")
        out["recall_at_1pct_fpr"] = float("nan")
    if threshold is not None:
        pred = scores > threshold
        out["accuracy"] = float((pred == y.bool()).double().mean())
        neg, pos = y == 0, y == 1
        out["fpr"] = float(pred[neg].double().mean()) if neg.any() else float("nan")
        out["recall"] = float(pred[pos].double().mean()) if pos.any() else float("nan")
    return out


def _check_finite(X: Tensor, store: ActivationStore, hook: str, what: str) -> None:
    bad = ~torch.isfinite(X)
    if bool(bad.any()):
        n = int(bad.any(-1).sum())
        raise DetectorError(f"store {store.path} has NaN or infinite activations at {hook} in {n} {what} rows; a "
                            "threshold fitted on them means nothing: recapture the store (e.g. in float32)")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class _hybridmethod:
    """``Detector.fit(store, ...)`` builds a detector from keyword settings; ``det.fit(store)`` fits ``det``."""

    def __init__(self, func):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj, cls):
        def bound(*args, **kwargs):
            if obj is not None:
                return self.func(obj, *args, **kwargs)
            settings = {k: kwargs.pop(k) for k in list(kwargs) if k in cls._SETTINGS}
            return self.func(cls(**settings), *args, **kwargs)

        bound.__doc__ = self.func.__doc__
        bound.__name__ = self.func.__name__
        return bound


class _Fitting:
    """Detector methods that fit on stores, calibrate thresholds and wrap existing probes or directions."""

    # ------------------------------------------------------------------------------------------- fitting

    @_hybridmethod
    def fit(
        self,
        store: ActivationStore,
        label: str = "label",
        *,
        control: ActivationStore | None = None,
        rows: Int[Tensor, " n"] | None = None,
        progress: bool = True,
    ) -> Detector:
        """Fit on ``store``'s training rows and calibrate the threshold; returns the detector.

        ``label``: an example field (``"label"``: one label per text, broadcast to its token rows) or
        ``"token_label"`` (token-level labels from entity spans; unlabelled tokens are skipped). Training uses
        the store's train split (``store.train_test_split``: the dataset's split column when it has one) or
        ``rows``; ``val_size`` of those examples are held out. The threshold is set at ``target_fpr`` on the
        held-out negatives, or on every row of ``control`` (a store of ordinary text, all negatives) when given.
        Callable on the class with settings as keywords: ``Detector.fit(store, "label", aggregation="max")``.
        """
        self._check_settings()
        if not isinstance(store, ActivationStore):
            raise ConfigError(
                f"fit needs an ActivationStore, got {type(store).__name__}; open one with ActivationStore(path)"
            )
        level = "token" if label == "token_label" else "example"
        y_all, classes, positive = self._row_labels(store, label)
        if rows is None:
            rows, _test = store.train_test_split(seed=self.seed)
        rows = torch.as_tensor(rows, dtype=torch.int64)
        if level == "token":
            rows = rows[y_all[rows] >= 0]
        fit_rows, val_rows = self._val_split(store, rows)
        self.aggregation_ = self.aggregation or _default_aggregation(store.positions)
        hooks = self._candidate_hooks(store)
        best = None
        for hook in tqdm(hooks, desc="detector hooks", disable=not progress or len(hooks) == 1):
            w, b, obj = self._fit_scorer(store, hook, fit_rows, y_all[fit_rows], label)
            val_scores, val_y = self._unit_scores(store, hook, val_rows, y_all, level, w, b)
            m = _metrics(val_scores, val_y, None)
            key = m.get("auroc", float("nan"))
            key = -1.0 if key != key else key
            if best is None or key > best[0]:
                best = (key, hook, w, b, obj, val_scores, val_y)
        assert best is not None
        _key, hook, w, b, obj, val_scores, val_y = best
        self.hook_ = hook
        self._set_scorer(w, b)
        self.probe_ = obj if self.method == "probe" else None
        self.direction_ = obj if self.method == "diff_in_means" else None
        if self.direction_ is not None:
            self._direction_vec = obj.vector
            self._scale_offset = (float(w @ obj.vector), float(b))
        self.level_ = level
        self.label_ = label
        self.classes_ = [_jsonable(c) for c in classes]
        self.positive_ = _jsonable(positive)
        self.mask_ = self.mask or _default_mask(store.positions, level)
        self.model_ = store.model_info
        self.model_.setdefault("d_model", store.d_model)
        if control is not None:
            self.calibrate(control)
        else:
            negatives = val_scores[val_y == 0]
            self.threshold_ = threshold_at_fpr(negatives, self.target_fpr)
            self.calibration_ = {
                "source": "validation",
                "store": str(store.path),
                "level": level,
                "n_negatives": int(negatives.numel()),
                "target_fpr": float(self.target_fpr),
                "fpr": float((negatives > self.threshold_).double().mean()),
            }
        self.metrics_ = {level: _metrics(val_scores, val_y, self.threshold_)}
        val_auroc = self.metrics_[level].get("auroc", float("nan"))
        if val_auroc < 0.5:
            warnings.warn(
                f"the detector's validation AUROC is {val_auroc:.3f}, below chance: the hook may not carry the "
                f"label, or the validation split mixes rows that belong together (group={self._group_field(store)!r};"
                " pass group= the field that pairs them)", stacklevel=3)
        self.provenance_ = {
            "store": str(store.path),
            "dataset": store.manifest.get("dataset", {}),
            "positions": store.positions,
            "hook": hook,
            "label": label,
            "method": self.method,
            "C": self.C if self.method == "probe" else None,
            "train_examples": int(torch.unique(store.example_ids()[fit_rows]).numel()),
            "val_examples": int(torch.unique(store.example_ids()[val_rows]).numel()),
            "train_rows": int(fit_rows.numel()),
            "seed": self.seed,
            "group": self._group_field(store),
            "created": _now(),
        }
        return self

    def calibrate(self, control: ActivationStore, target_fpr: float | None = None) -> Detector:
        """Re-set the threshold at ``target_fpr`` (default: the detector's) on a control store of ordinary text.

        Every row of ``control`` is a negative; for an example-level detector each control example's rows are
        aggregated first, for a token-level detector each token counts.
        """
        self._check_fitted()
        if target_fpr is not None:
            self.target_fpr = float(target_fpr)
        if not isinstance(control, ActivationStore):
            raise ConfigError(f"control must be an ActivationStore of ordinary text, got {type(control).__name__}")
        if control.d_model != self.d_model:
            raise DetectorError(
                f"control store {control.path} has d_model={control.d_model}, the detector reads {self.d_model}; "
                "capture the control text with the detector's model"
            )
        hook = control.resolve_hook(self.hook_)
        rows = torch.arange(len(control))
        y = torch.zeros(len(control), dtype=torch.int64)
        scores, _ = self._unit_scores(control, hook, rows, y, self.level_, self.weight_, self.bias_)
        self.threshold_ = threshold_at_fpr(scores, self.target_fpr)
        self.calibration_ = {
            "source": "control",
            "store": str(control.path),
            "level": self.level_,
            "n_negatives": int(scores.numel()),
            "target_fpr": float(self.target_fpr),
            "fpr": float((scores > self.threshold_).double().mean()),
        }
        return self

    def _row_labels(self, store: ActivationStore, label: str) -> tuple[Tensor, list[Any], Any]:
        try:
            classes = store.label_classes(label)
            y = store.labels(label)
        except StoreError as e:
            raise DetectorError(f"cannot fit on label {label!r}: {e}") from None
        if len(classes) != 2:
            raise DetectorError(
                f"label {label!r} has {len(classes)} classes {classes[:5]}; a detector needs exactly two "
                "(negative and positive)"
            )
        positive = classes[1] if self.positive is None else self.positive
        if positive not in classes:
            raise DetectorError(f"positive={positive!r} is not a value of label {label!r}; its values are {classes}")
        # example fields come back as indices into ``classes``; token labels as their own values (-1 = none)
        target = positive if label == "token_label" else classes.index(positive)
        y01 = torch.where(y < 0, torch.full_like(y, -1), (y == target).long())
        return y01, classes, positive

    def _val_split(self, store: ActivationStore, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Hold out ``val_size`` of the examples behind ``rows`` (whole groups when ``group`` is set)."""
        eids = store.example_ids()[rows]
        uniq = torch.unique(eids)
        if uniq.numel() < 4:
            raise DetectorError(
                f"only {uniq.numel()} training examples; a detector needs at least 4 to fit and calibrate"
            )
        group = self._group_field(store)
        if group is not None:
            examples = store.examples()
            names = [json.dumps(examples[int(e)][group]) for e in uniq]
        else:
            names = [str(int(e)) for e in uniq]
        groups = sorted(set(names))
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(groups), generator=g).tolist()
        n_val = max(1, int(round(self.val_size * len(groups))))
        val_groups = {groups[i] for i in perm[:n_val]}
        val_examples = torch.tensor([n in val_groups for n in names])
        is_val = torch.zeros(int(store.n_examples), dtype=torch.bool)
        is_val[uniq[val_examples]] = True
        row_val = is_val[eids]
        return rows[~row_val], rows[row_val]

    def _group_field(self, store: ActivationStore) -> str | None:
        """The example field whose values keep examples together in the validation split: ``group`` when
        given (``False`` or ``""``: none), else the first of :data:`PAIR_FIELDS` that every example has and
        that pairs some of them (two statements about one country must not sit on both sides)."""
        if self.group is False or self.group == "":
            return None
        examples = store.examples()
        keys = sorted({k for e in examples for k in e})
        if self.group is not None:
            if any(self.group not in e for e in examples):
                raise ConfigError(
                    f"group field {self.group!r} is not in the store's examples; {close_matches(self.group, keys)}"
                )
            return str(self.group)
        for name in PAIR_FIELDS:
            if examples and all(name in e for e in examples):
                values = [json.dumps(e[name]) for e in examples]
                if len(set(values)) < len(values):
                    return name
        return None

    def _candidate_hooks(self, store: ActivationStore) -> list[str]:
        if self.hook is None:
            if len(store.hooks) == 1:
                return list(store.hooks)
            raise ConfigError(
                f"store {store.path} has {len(store.hooks)} hooks; choose one with hook=... (a name or layer) or "
                f"hook='best' to pick by validation AUROC; hooks: {', '.join(store.hooks[:6])}"
                + (", ..." if len(store.hooks) > 6 else "")
            )
        if self.hook == "best":
            return list(store.hooks)
        return [store.resolve_hook(self.hook)]

    def _fit_scorer(
        self, store: ActivationStore, hook: str, rows: Tensor, y: Tensor, label: str
    ) -> tuple[Tensor, float, Any]:
        """Train the probe or direction on ``rows`` and return its affine token scorer ``(w, b, object)``."""
        X = store.activations(hook, rows).float()
        _check_finite(X, store, hook, "training")
        if int(y.sum()) == 0 or int(y.sum()) == y.numel():
            raise DetectorError("the training rows hold only one class; a detector needs positives and negatives")
        if self.method == "probe":
            from interp.probes.linear import LinearProbe

            probe = LinearProbe(C=self.C).fit(X, y)
            w, b = _affine_of_probe(probe, X.shape[1])
            return w, b, probe
        from interp.directions import Direction, diff_in_means_tensor

        diff = diff_in_means_tensor(X, y)
        direction = Direction(vector=diff, hook=hook, method="diff_in_means", label=label,
                              norm=float(diff.norm()), provenance={"store": str(store.path), "rows": int(y.numel())})
        vec = direction.vector
        scale, offset = _fit_scale_offset(X @ vec, y)
        return vec * scale, offset, direction

    def _unit_scores(
        self, store: ActivationStore, hook: str, rows: Tensor, y_rows: Tensor, level: str, w: Tensor, b: float
    ) -> tuple[Tensor, Tensor]:
        """Scores and labels of the units a detector decides on: tokens, or examples (rows aggregated)."""
        if rows.numel() == 0:
            return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.int64)
        X = store.activations(hook, rows).float()
        _check_finite(X, store, hook, "validation or control")
        s = X @ w.float() + float(b)
        if level == "token":
            return s.double(), y_rows[rows]
        eids = store.example_ids()[rows]
        pos = store.token_positions()[rows]
        order = torch.argsort(eids * (1 << 20) + pos.long(), stable=True)
        eids, s, ys = eids[order], s[order], y_rows[rows][order]
        uniq, counts = torch.unique_consecutive(eids, return_counts=True)
        agg, labels = [], []
        start = 0
        for c in counts.tolist():
            agg.append(aggregate_scores(s[start : start + c], self.aggregation_, self.k))
            labels.append(int(ys[start]))
            start += c
        return torch.tensor(agg, dtype=torch.float64), torch.tensor(labels, dtype=torch.int64)

    # ------------------------------------------------------------------------------------------- wrapping

    @classmethod
    def from_direction(
        cls,
        direction,
        model_info: Mapping[str, Any],
        *,
        hook: str | None = None,
        scale: float = 1.0,
        offset: float = 0.0,
        threshold: float | None = None,
        **settings: Any,
    ) -> Detector:
        """A detector from an existing :class:`~interp.directions.Direction`: score = ``scale * proj + offset``.

        ``model_info`` is the identity of the model it reads (``store.model_info`` or
        ``interp.model.model_identity(model)``). Set a threshold with :meth:`calibrate` or ``threshold=``.
        """
        det = cls(method="diff_in_means", **settings)
        det._check_settings()
        vec = torch.as_tensor(getattr(direction, "vector", direction)).float().flatten()
        det.hook_ = hook or getattr(direction, "hook", None)
        if not det.hook_:
            raise ConfigError("the direction has no hook; pass hook='blocks.N.hook_out'")
        det.hook_ = static_canonical(str(det.hook_))
        det._scale_offset = (float(scale), float(offset))
        det._direction_vec = vec
        det.direction_ = direction
        det.probe_ = None
        det._set_scorer(vec * float(scale), float(offset))
        det._init_wrapped(model_info, threshold, "direction")
        return det

    @classmethod
    def from_probe(
        cls, probe, hook: str, model_info: Mapping[str, Any], *, threshold: float | None = None, **settings: Any
    ) -> Detector:
        """A detector from a fitted :class:`~interp.probes.linear.LinearProbe` read at ``hook``."""
        det = cls(method="probe", **settings)
        det._check_settings()
        d = int(model_info.get("d_model") or 0)
        coef = getattr(probe, "coef_", None)
        d = d or int(torch.as_tensor(coef).numel())
        w, b = _affine_of_probe(probe, d)
        det.hook_ = static_canonical(str(hook))
        det.probe_ = probe
        det.direction_ = None
        det._set_scorer(w, b)
        det._init_wrapped(model_info, threshold, "probe")
        return det

    def _init_wrapped(self, model_info: Mapping[str, Any], threshold: float | None, what: str) -> None:
        self.model_ = dict(model_info)
        if int(self.model_.get("d_model") or self.d_model) != self.d_model:
            raise DetectorError(
                f"the {what} has width {self.d_model} but model_info says d_model={self.model_['d_model']}"
            )
        self.model_["d_model"] = self.d_model
        self.level_ = "example"
        self.label_ = None
        self.classes_ = [0, 1]
        self.positive_ = 1
        self.mask_ = self.mask or "text"
        self.aggregation_ = self.aggregation or "mean"
        self.threshold_ = None if threshold is None else float(threshold)
        self.calibration_ = {"source": "given" if threshold is not None else None, "target_fpr": self.target_fpr}
        self.metrics_ = {}
        self.provenance_ = {"made_from": what, "hook": self.hook_, "created": _now()}


def _default_aggregation(positions: str) -> str:
    """``last`` for stores of last-token rows (``last``, ``last:REGION``), else ``mean``: then a text's aggregate
    equals the score of the row such a capture would store for it."""
    return "last" if positions.partition(":")[0] == "last" else "mean"


def _default_mask(positions: str, level: str) -> str:
    """The tokens a detector aggregates when scoring text, matching the rows it was trained on."""
    if level == "token":
        return "text"
    pool, _, region = positions.partition(":")
    if pool in ("all", "last", "mean") and not region:
        return "all"
    return region or positions


def _affine_of_probe(probe, d: int) -> tuple[Tensor, float]:
    """A binary probe's decision function as ``x . w + b`` on raw activations (``coef_`` and ``intercept_`` are
    in raw activation space: the probe's standardisation is already folded into them)."""
    coef = getattr(probe, "coef_", None)
    intercept = getattr(probe, "intercept_", None)
    if coef is None or intercept is None:
        raise DetectorError("the probe is not fitted (no coef_ / intercept_); fit it before wrapping it in a detector")
    coef = torch.as_tensor(coef).float()
    if coef.dim() == 2 and coef.shape[0] != 1:
        raise DetectorError(f"the probe has {coef.shape[0]} classes; a detector needs a binary probe")
    w = coef.reshape(-1)
    if w.numel() != d:
        raise DetectorError(f"the probe reads width {w.numel()} but the activations have d_model={d}")
    return w, float(torch.as_tensor(intercept).reshape(-1)[0])


def _fit_scale_offset(proj: Tensor, y: Tensor, l2: float = 1e-4, iters: int = 50) -> tuple[float, float]:
    """1-D logistic regression of ``y`` on ``proj`` (Newton's method): the scale and offset that make a
    projection a logit."""
    x = proj.double()
    mu, sd = x.mean(), x.std().clamp_min(1e-12)
    z = (x - mu) / sd
    t = y.double()
    a, c = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(a * z + c)
        r = p - t
        g = torch.stack([(r * z).mean() + l2 * a, r.mean()])
        wts = (p * (1 - p)).clamp_min(1e-12)
        H = torch.tensor(
            [[float((wts * z * z).mean()) + l2, float((wts * z).mean())], [float((wts * z).mean()), float(wts.mean())]],
            dtype=torch.float64,
        )
        step = torch.linalg.solve(H, g)
        a, c = a - step[0], c - step[1]
        if float(step.abs().max()) < 1e-10:
            break
    scale = float(a / sd)
    return scale, float(c - a * mu / sd)


def _runs(store: ActivationStore, rows: Tensor, scores: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Span scores from stored token rows: runs of consecutive positions with one label, scored by their max."""
    if rows.numel() == 0:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    eids = store.example_ids()[rows]
    pos = store.token_positions()[rows].long()
    order = torch.argsort(eids * (1 << 20) + pos, stable=True)
    eids, pos, scores, y = eids[order], pos[order], scores[order], y[order]
    out_s, out_y = [float(scores[0])], [int(y[0])]
    for j in range(1, rows.numel()):
        same = eids[j] == eids[j - 1] and pos[j] == pos[j - 1] + 1 and y[j] == y[j - 1]
        if same:
            out_s[-1] = max(out_s[-1], float(scores[j]))
        else:
            out_s.append(float(scores[j]))
            out_y.append(int(y[j]))
    return torch.tensor(out_s, dtype=torch.float64), torch.tensor(out_y, dtype=torch.int64)
