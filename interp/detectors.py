"""Detectors: a probe or direction, how its token scores are aggregated, and a calibrated threshold.

A :class:`Detector` turns the activations at one hook into a score per token (a probe's logit, or a
direction's projection mapped through a fitted scale and offset: both are one affine map ``x . w + b``),
aggregates the tokens a detection mask selects (``mean``, ``max``, ``topk``, ``last``) into one score per text,
and flags texts (or tokens) whose score is above a threshold chosen for a target false-positive rate::

    store = capture(model, "deception", hooks="resid_post", layers=[4], positions="response", out="runs/dec")
    det = Detector.fit(store, label="label")               # probe on response tokens, threshold at 1% FPR
    det.save("detectors/deception")
    det = Detector.load("detectors/deception", model=model)
    s = det.score(model, ["Question: ...\\nAnswer: ..."])   # per-token scores + one aggregate per text
    det.monitor(gpt2, "Tell me about", max_new_tokens=40, on_token=print, stop_above=det.threshold_)

Streaming convention (``monitor``): a generated token is scored by the activation at its own position, the
same activation that scoring the finished text in one pass uses. That activation exists only in the forward
step that consumes the token, which is also the step that produces the next token's logits; so each token's
score arrives with the next step (no second pass), and the last token's score costs one forward that stops
at the hook's layer. ``stop_above`` stops right after the first token whose score is above it: that token is
the last one returned.

On disk (``save(dir)``): ``detector.json`` (settings, threshold and its calibration, model identity,
provenance, validation metrics, the sha256 of the tensors file) and ``detector.safetensors`` (``weight``
``[d_model]`` and ``bias`` ``[1]`` of the affine token scorer; for a direction also ``direction`` ``[d_model]``
and ``scale_offset`` ``[2]``). Nothing else is read back: no pickle, and no training code is needed to score.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.artifacts import jsonable as _jsonable
from interp.artifacts import load_json, save_tensors
from interp.capture import StopForward, forward_to_stop
from interp.datasets import Dataset, Example, load_dataset, token_labels_from_spans, token_mask_for_region
from interp.errors import ConfigError, DetectorError, HookError, InterpError, StoreError, close_matches
from interp.model import model_device
from interp.store import ActivationStore, atomic_write_json, static_canonical

FORMAT_NAME = "interp.detector"
FORMAT_VERSION = 1
CONFIG_FILE = "detector.json"
TENSORS_FILE = "detector.safetensors"
AGGREGATIONS = ("mean", "max", "topk", "last")
METHODS = ("probe", "diff_in_means")


# ----------------------------------------------------------------------------------------------- helpers


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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _run_to_hook(model, input_ids: Tensor, out: dict[str, Tensor], **kwargs: Any) -> None:
    """One forward that ends at the detector's hook (which stores its scores in ``out`` and raises
    :class:`~interp.capture.StopForward`: ``stop_at_layer`` does not stop every architecture)."""
    forward_to_stop(model, input_ids, **kwargs)
    if "scores" not in out:
        raise DetectorError("the detector's hook did not fire during the forward pass; the model does not run it")


_identities: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _identity(model) -> dict[str, Any]:
    """``model_identity`` cached per model object (it hashes the weight files' ends, which costs milliseconds)."""
    ident = _identities.get(model)
    if ident is None:
        from interp.model import model_identity

        ident = _identities[model] = model_identity(model)
    return ident


_encoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_encoder(model) -> bool:
    """``interp.model.is_encoder``, cached per model object."""
    if model not in _encoders:
        from interp.model import is_encoder

        _encoders[model] = is_encoder(model)
    return _encoders[model]


class _hybridmethod:
    """``Detector.fit(store, ...)`` builds a detector from keyword settings; ``det.fit(store)`` fits ``det``."""

    def __init__(self, func):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj, cls):
        def bound(*args, **kwargs):
            if obj is not None:
                return self.func(obj, *args, **kwargs)
            settings = {k: kwargs.pop(k) for k in list(kwargs) if k in Detector._SETTINGS}
            return self.func(cls(**settings), *args, **kwargs)

        bound.__doc__ = self.func.__doc__
        bound.__name__ = self.func.__name__
        return bound


# ----------------------------------------------------------------------------------------------- results


@dataclass
class DetectorScores:
    """Scores of a batch of texts: per-token scores (every token), the mask of tokens that count, and the
    aggregate per text. ``flagged`` is ``aggregate > threshold``."""

    token_ids: list[Int[Tensor, " pos"]]
    scores: list[Float[Tensor, " pos"]]
    masks: list[Tensor]
    aggregate: Float[Tensor, " texts"]
    threshold: float | None
    aggregation: str
    texts: list[str] | None = None
    offsets: list[list[tuple[int, int]]] | None = None
    tokenizer: Any = field(default=None, repr=False)
    _tokens: list[list[str]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def tokens(self) -> list[list[str]]:
        """Each text's tokens as strings (decoded on first use, so batch scoring pays nothing for them)."""
        if self._tokens is None:
            self._tokens = [_token_strings(self.tokenizer, t) for t in self.token_ids]
        return self._tokens

    @property
    def flagged(self) -> Tensor:
        """Texts whose aggregate score is above the threshold (all False when the detector has none)."""
        if self.threshold is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return self.aggregate > self.threshold

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-able dict per text: tokens, token scores, mask, aggregate, flagged."""
        out = []
        for i in range(len(self)):
            out.append(
                _jsonable(
                    {
                        "text": None if self.texts is None else self.texts[i],
                        "tokens": self.tokens[i],
                        "token_ids": self.token_ids[i].tolist(),
                        "scores": self.scores[i].tolist(),
                        "mask": self.masks[i].tolist(),
                        "aggregate": float(self.aggregate[i]),
                        "flagged": bool(self.flagged[i]),
                    }
                )
            )
        return out

    def format(self, i: int = 0, color: bool = False, only_mask: bool = False) -> str:
        """Text ``i`` as a token table (position, token, score, bar), coloured with ANSI codes when ``color``."""
        lines = []
        thr = self.threshold
        scale = max(1e-6, float(self.scores[i].abs().max()) if self.scores[i].numel() else 1.0)
        for p, (tok, s, m) in enumerate(zip(self.tokens[i], self.scores[i].tolist(), self.masks[i].tolist())):
            if only_mask and not m:
                continue
            bar = "#" * int(round(10 * min(1.0, abs(s) / scale)))
            flag = "!" if thr is not None and s > thr else " "
            row = f"{p:5d} {flag} {tok!r:<18} {s:+9.4f} {bar}" + ("" if m else "   (not in mask)")
            if color:
                row = _ansi(row, s, thr, scale)
            lines.append(row)
        verdict = "" if thr is None else ("  FLAGGED" if bool(self.flagged[i]) else "  below threshold")
        thr_text = "none" if thr is None else f"{thr:+.4f}"
        lines.append(f"{self.aggregation} over mask: {float(self.aggregate[i]):+.4f}  threshold: {thr_text}{verdict}")
        return "\n".join(lines)

    def plot(self, indices: int | Sequence[int] | None = None, width: int = 16, title: str | None = None):
        """A plotly token heatmap of texts ``indices`` (default: the first up to 4), centred on the threshold."""
        from interp.plots import token_heatmap

        if indices is None:
            indices = list(range(min(4, len(self))))
        elif isinstance(indices, int):
            indices = [indices]
        return token_heatmap(
            [self.tokens[i] for i in indices],
            [self.scores[i] for i in indices],
            threshold=self.threshold,
            masks=[self.masks[i] for i in indices],
            row_labels=[f"text {i}: {self.aggregation}={float(self.aggregate[i]):+.2f}" for i in indices],
            width=width,
            title=title or "detector token scores",
        )


def _ansi(row: str, score: float, thr: float | None, scale: float) -> str:
    """Colour a row: red above the threshold (brighter when further), green below it."""
    centre = 0.0 if thr is None else thr
    frac = max(0.0, min(1.0, abs(score - centre) / max(scale, 1e-6)))
    level = int(round(80 + 175 * frac))
    rgb = (level, 60, 60) if score > centre else (60, level, 60)
    return f"\x1b[38;2;{rgb[0]};{rgb[1]};{rgb[2]}m{row}\x1b[0m"


@dataclass
class DetectorReport:
    """Metrics of a detector on labelled data at each level it could be judged on.

    ``metrics[level]`` for level ``example`` (aggregate per text vs text label), ``token`` (each labelled token)
    and ``span`` (each labelled span scored by its maximum token) holds ``auroc``, ``recall_at_1pct_fpr``, and
    ``accuracy``, ``fpr``, ``recall`` at the detector's threshold, with ``n`` and ``n_positive``.
    """

    metrics: dict[str, dict[str, float]]
    threshold: float | None
    scores: DetectorScores | None = None
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({"metrics": self.metrics, "threshold": self.threshold, "source": self.source})

    def __str__(self) -> str:
        cols = [("auroc", "auroc"), ("recall_at_1pct_fpr", "rec@1%fpr"), ("accuracy", "accuracy"), ("fpr", "fpr"),
                ("recall", "recall"), ("n", "n"), ("n_positive", "n_pos")]
        thr = "none" if self.threshold is None else f"{self.threshold:+.4f}"
        lines = [f"detector report on {self.source}; threshold {thr}",
                 f"{'level':<8}" + "".join(f"{head:>11}" for _, head in cols)]
        for level, m in self.metrics.items():
            vals = []
            for key, _ in cols:
                v = m.get(key, float("nan"))
                vals.append(f"{v:>11d}" if isinstance(v, int) else f"{v:>11.4f}")
            lines.append(f"{level:<8}" + "".join(vals))
        return "\n".join(lines)

    def plot(self, indices: int | Sequence[int] | None = None, width: int = 16):
        """Token heatmap of the scored texts (reports made from a model and a dataset)."""
        if self.scores is None:
            raise DetectorError("this report was made from a store: it has no token strings to draw; "
                                "use detector.report(model, dataset) for a heatmap")
        return self.scores.plot(indices, width=width, title=f"detector token scores ({self.source})")


@dataclass
class MonitorResult:
    """What :meth:`Detector.monitor` generated and how each generated token scored.

    ``scores[i]`` is the score of generated token ``token_ids[i]`` (from the activation at its own position);
    ``prompt_scores`` are the prompt's tokens' scores from the prefill pass. ``full_ids`` is prompt + generated,
    the token sequence that ``detector.score(model, result.full_ids)`` scores identically in one pass.
    """

    prompt: str
    text: str
    token_ids: Int[Tensor, " new"]
    tokens: list[str]
    scores: Float[Tensor, " new"]
    prompt_ids: Int[Tensor, " prompt"]
    prompt_scores: Float[Tensor, " prompt"]
    stopped: bool
    stop_index: int | None
    threshold: float | None
    aggregate: float = float("nan")
    aggregation: str = "mean"
    reason: str = "max_new_tokens"

    @property
    def full_ids(self) -> Int[Tensor, " total"]:
        return torch.cat([self.prompt_ids, self.token_ids])

    def plot(self, width: int = 16):
        from interp.plots import token_heatmap

        return token_heatmap(
            [self.tokens], [self.scores], threshold=self.threshold, width=width,
            row_labels=[f"generated: {self.aggregation}={self.aggregate:+.2f}"],
            title="detector scores during generation"
            + (f" (stopped at token {self.stop_index})" if self.stopped else ""),
        )


# ----------------------------------------------------------------------------------------------- detector


class Detector:
    """A probe or direction at one hook, an aggregation of token scores, and a calibrated threshold.

    Settings (constructor): ``method`` (``"probe"``: a logistic probe with its standardisation inside;
    ``"diff_in_means"``: the class-mean difference direction, with a scale and offset fitted so its scores are
    logits), ``hook`` (a stored hook name or layer, ``"best"`` to pick the hook with the best validation AUROC,
    or None when the store has one hook), ``aggregation`` (``mean``/``max``/``topk``/``last``, with ``k`` for
    ``topk``; None = ``last`` for a store of last-token rows, else ``mean``), ``mask`` (which tokens count when
    scoring text: ``"all"`` tokens, ``"text"`` tokens (special tokens left out), ``"spans"`` (the examples'
    spans), or a region name such as ``"response"``; None = from the store's position policy), ``target_fpr``, ``C`` (probe inverse regularisation), ``val_size`` (share of the
    training examples held out to calibrate), ``group`` (an example field whose values keep examples together
    in that split, e.g. ``"pair_id"``), ``positive`` (the label value that is the positive class; default 1 or
    the larger of two classes), ``seed``.

    Fitted attributes: ``hook_``, ``weight_`` ``[d_model]``, ``bias_``, ``threshold_``, ``aggregation_``, ``level_``
    (``"example"`` or ``"token"``), ``label_``, ``mask_``, ``model_`` (the identity of the model whose
    activations it reads), ``calibration_``, ``metrics_`` (validation), ``provenance_``; in memory only,
    ``probe_`` or ``direction_`` (the fitted object).
    """

    _SETTINGS = ("method", "hook", "aggregation", "k", "mask", "target_fpr", "C", "val_size", "group", "positive",
                 "seed")

    def __init__(
        self,
        method: str = "probe",
        hook: str | int | None = None,
        aggregation: str | None = None,
        k: int = 5,
        mask: str | None = None,
        target_fpr: float = 0.01,
        C: float = 1.0,
        val_size: float = 0.25,
        group: str | None = None,
        positive: Any = None,
        seed: int = 0,
    ):
        self.method = method
        self.hook = hook
        self.aggregation = aggregation
        self.k = k
        self.mask = mask
        self.target_fpr = target_fpr
        self.C = C
        self.val_size = val_size
        self.group = group
        self.positive = positive
        self.seed = seed

    def __repr__(self) -> str:
        if not hasattr(self, "weight_"):
            return f"Detector(method={self.method!r}, aggregation={self.aggregation!r}, unfitted)"
        thr = "none" if self.threshold_ is None else f"{self.threshold_:.4g}"
        return (
            f"Detector({self.method}, hook={self.hook_!r}, level={self.level_}, aggregation={self.aggregation_!r}, "
            f"mask={self.mask_!r}, threshold={thr} at {self.target_fpr:g} FPR, model={self.model_.get('name')!r}, "
            f"d_model={self.d_model})"
        )

    @property
    def d_model(self) -> int:
        self._check_fitted()
        return int(self.weight_.numel())

    def _check_fitted(self) -> None:
        if not hasattr(self, "weight_"):
            raise DetectorError(
                "this detector is not fitted; call Detector.fit(store, label=...) or Detector.load(dir)"
            )

    def _check_settings(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; {close_matches(self.method, METHODS)}")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"unknown aggregation {self.aggregation!r}; {close_matches(self.aggregation, AGGREGATIONS)}"
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"k must be a positive integer (tokens averaged by topk), got {self.k!r}")
        if not 0.0 <= float(self.target_fpr) < 1.0:
            raise ConfigError(f"target_fpr must be in [0, 1), got {self.target_fpr}")
        if not 0.0 < float(self.val_size) < 1.0:
            raise ConfigError(f"val_size must be in (0, 1), got {self.val_size}")

    # ------------------------------------------------------------------------------------------- token scores

    def token_scores(self, acts: Float[Tensor, "... d_model"]) -> Float[Tensor, "..."]:
        """The per-token score of activations at the detector's hook: ``acts . weight_ + bias_`` (float32)."""
        self._check_fitted()
        if acts.shape[-1] != self.d_model:
            raise DetectorError(
                f"activations have width {acts.shape[-1]} but this detector reads d_model={self.d_model} "
                f"(made for {self.model_.get('name')!r}); use a detector made for this model"
            )
        w = self.weight_.to(acts.device)
        return acts.float() @ w + float(self.bias_)

    def _set_scorer(self, weight: Tensor, bias: float) -> None:
        self.weight_ = weight.detach().float().cpu().contiguous()
        self.bias_ = float(bias)

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
        if self.group is not None:
            examples = store.examples()
            if any(self.group not in e for e in examples):
                keys = sorted({k for e in examples for k in e})
                raise ConfigError(
                    f"group field {self.group!r} is not in the store's examples; {close_matches(self.group, keys)}"
                )
            names = [json.dumps(examples[int(e)][self.group]) for e in uniq]
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
        if torch.isnan(X).any():
            raise DetectorError(f"hook {hook} has NaN activations in the training rows; recapture the store")
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

    # ------------------------------------------------------------------------------------------- save / load

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``detector.json`` and ``detector.safetensors`` into ``directory`` (created if needed)."""
        self._check_fitted()
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ConfigError(f"{directory} is a file; give a directory to save the detector in")
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight_, "bias": torch.tensor([self.bias_], dtype=torch.float32)}
        if getattr(self, "_direction_vec", None) is not None and self.method == "diff_in_means":
            tensors["direction"] = self._direction_vec.float()
            tensors["scale_offset"] = torch.tensor(self._scale_offset, dtype=torch.float32)
        data = save_tensors(directory / TENSORS_FILE, tensors, {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)})
        config = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "method": self.method,
            "hook": self.hook_,
            "d_model": self.d_model,
            "level": self.level_,
            "label": self.label_,
            "classes": self.classes_,
            "positive": self.positive_,
            "aggregation": self.aggregation_,
            "k": self.k,
            "mask": self.mask_,
            "threshold": self.threshold_,
            "target_fpr": float(self.target_fpr),
            "calibration": self.calibration_,
            "model": self.model_,
            "metrics": self.metrics_,
            "provenance": self.provenance_,
            "settings": {k: getattr(self, k) for k in ("C", "val_size", "group", "seed")},
            "tensors_sha256": hashlib.sha256(data).hexdigest(),
        }
        atomic_write_json(directory / CONFIG_FILE, _jsonable(config))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, model=None) -> Detector:
        """Read a saved detector; with ``model``, refuse it unless it was made for that model and width."""
        directory = Path(directory)
        if not directory.is_dir():
            raise DetectorError(f"no detector directory at {directory}; save one with detector.save(dir)")
        for name in (CONFIG_FILE, TENSORS_FILE):
            if not (directory / name).is_file():
                raise DetectorError(
                    f"detector directory {directory} is missing {name}; it is incomplete: save the detector again"
                )
        config = load_json(directory / CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, "detector", DetectorError)
        raw = (directory / TENSORS_FILE).read_bytes()
        expected = config.get("tensors_sha256")
        if expected and hashlib.sha256(raw).hexdigest() != expected:
            raise DetectorError(f"{directory / TENSORS_FILE} does not match its recorded sha256: the file changed "
                                "or is damaged; save the detector again")
        from safetensors.torch import load as st_load

        try:
            tensors = st_load(raw)
        except Exception as e:  # safetensors raises its own error types
            raise DetectorError(f"{directory / TENSORS_FILE} is not a readable safetensors file ({e})") from None
        for name in ("weight", "bias"):
            if name not in tensors:
                raise DetectorError(f"{directory / TENSORS_FILE} has no tensor {name!r}; save the detector again")
        d = int(config.get("d_model", -1))
        if tuple(tensors["weight"].shape) != (d,):
            raise DetectorError(
                f"{directory / TENSORS_FILE}: weight has shape {list(tensors['weight'].shape)} but detector.json "
                f"says d_model={d}; the directory mixes files of two detectors"
            )
        settings = dict(config.get("settings", {}))
        det = cls(
            method=config["method"],
            hook=config["hook"],
            aggregation=config["aggregation"],
            k=int(config.get("k", 5)),
            mask=config.get("mask"),
            target_fpr=float(config.get("target_fpr", 0.01)),
            C=float(settings.get("C", 1.0)),
            val_size=float(settings.get("val_size", 0.25)),
            group=settings.get("group"),
            positive=config.get("positive"),
            seed=int(settings.get("seed", 0)),
        )
        det._check_settings()
        det.hook_ = config["hook"]
        det._set_scorer(tensors["weight"], float(tensors["bias"].reshape(-1)[0]))
        det.level_ = config.get("level", "example")
        det.label_ = config.get("label")
        det.classes_ = config.get("classes", [0, 1])
        det.positive_ = config.get("positive", 1)
        det.mask_ = config.get("mask") or "text"
        det.aggregation_ = config["aggregation"]
        det.threshold_ = None if config.get("threshold") is None else float(config["threshold"])
        det.calibration_ = config.get("calibration", {})
        det.model_ = dict(config.get("model", {}))
        det.metrics_ = config.get("metrics", {})
        det.provenance_ = config.get("provenance", {})
        det.provenance_["loaded_from"] = str(directory)
        det.probe_ = None
        det.direction_ = None
        if "direction" in tensors:
            from interp.directions import Direction

            det._direction_vec = tensors["direction"].float()
            so = tensors.get("scale_offset", torch.tensor([1.0, 0.0]))
            det._scale_offset = (float(so[0]), float(so[1]))
            det.direction_ = Direction(vector=det._direction_vec, hook=det.hook_, method="diff_in_means",
                                       label=det.label_, provenance=dict(det.provenance_))
        if model is not None:
            det.check_model(model)
        return det

    # ------------------------------------------------------------------------------------------- model checks

    def check_model(self, model) -> str:
        """Refuse a model this detector was not made for (other width, other weights, missing hook).

        Returns the canonical name of the detector's hook in ``model``.
        """
        self._check_fitted()
        from interp.model import canonical_hook

        ident = _identity(model)
        if int(ident["d_model"]) != self.d_model:
            raise DetectorError(
                f"model {ident.get('name')!r} has d_model={ident['d_model']} but this detector reads width "
                f"{self.d_model} (made for {self.model_.get('name')!r}); use a detector made for this model"
            )
        mine_hash, their_hash = self.model_.get("weights_hash"), ident.get("weights_hash")
        mine_name = str(self.model_.get("name") or "")
        if mine_hash and their_hash and mine_hash != their_hash:
            raise DetectorError(
                f"this detector was made for model {mine_name!r} (weights {mine_hash}) but the model given is "
                f"{ident.get('name')!r} (weights {their_hash}); load the model it was made for"
            )
        if not (mine_hash and their_hash) and mine_name not in ("", "synthetic", "unknown"):
            if Path(mine_name).name != Path(str(ident.get("name"))).name:
                raise DetectorError(
                    f"this detector was made for model {mine_name!r} but the model given is {ident.get('name')!r};"
                    " load the model it was made for"
                )
        try:
            return canonical_hook(model, self.hook_)
        except HookError:
            raise HookError(
                f"model {ident.get('name')!r} has no hook {self.hook_!r} (it has {ident['n_layers']} layers); "
                "use a detector made for this model"
            ) from None

    # ------------------------------------------------------------------------------------------- scoring text

    def score(
        self,
        model,
        texts: str | Sequence[str] | Dataset | Sequence[Mapping[str, Any]] | Tensor | Sequence[Sequence[int]],
        *,
        mask: str | Sequence[Any] | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        progress: bool = False,
    ) -> DetectorScores:
        """Score every token of ``texts`` with one forward per batch (stopped after the hook's layer) and
        aggregate the tokens ``mask`` selects.

        ``texts``: a string, a list of strings, a Dataset or list of row dicts (their ``regions`` and
        ``spans`` serve region and span masks), or token ids (a ``[batch, pos]`` tensor or lists of ids,
        e.g. ``monitor(...).full_ids``). ``mask``: the detector's default, ``"all"``, ``"text"``, ``"spans"``, a
        region name, or one character range ``[start, end]`` (or a list of them) per text.
        """
        hook = self.check_model(model)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        from interp.model import tokenize

        examples, id_rows = _as_inputs(texts)
        n = len(examples) if examples is not None else len(id_rows)  # type: ignore[arg-type]
        mask = self.mask_ if mask is None else mask
        if not isinstance(mask, str) and (isinstance(mask, (list, tuple)) and len(mask) != n):
            raise DetectorError(f"mask has {len(mask)} entries for {n} texts; give one character range per text")
        device = model_device(model)
        w = self.weight_.to(device)
        b = float(self.bias_)
        if examples is not None:
            lengths_guess = [len(e.text) for e in examples]
        else:
            lengths_guess = [len(r) for r in id_rows]  # type: ignore[union-attr]
        order = sorted(range(n), key=lambda i: lengths_guess[i])  # similar lengths share a batch: less padding
        per_scores: list[Tensor | None] = [None] * n
        per_ids: list[Tensor | None] = [None] * n
        per_offsets: list[list[tuple[int, int]] | None] = [None] * n
        out: dict[str, Tensor] = {}

        def grab(act: Tensor, hook) -> None:
            out["scores"] = act.float() @ w + b
            raise StopForward  # nothing after the hook is needed

        tok = model.tokenizer
        with torch.inference_mode(), model.hooks(fwd_hooks=[(hook, grab)]):
            for b0 in tqdm(range(0, n, batch_size), desc="detector score", disable=not progress):
                idx = order[b0 : b0 + batch_size]
                if examples is not None:
                    toks = tokenize(model, [examples[i].text for i in idx], max_length)
                else:
                    toks = _pad_ids([id_rows[i] for i in idx], tok)  # type: ignore[index]
                toks = toks.to(device)
                _run_to_hook(model, toks.input_ids, out, attention_mask=toks.attention_mask)
                s = out.pop("scores").cpu()
                ids = toks.input_ids.cpu()
                for j, i in enumerate(idx):
                    L = toks.lengths[j]
                    per_scores[i] = s[j, :L].clone()
                    per_ids[i] = ids[j, :L].clone()
                    per_offsets[i] = toks.offsets[j] if toks.offsets is not None else None
        scores = [t for t in per_scores if t is not None]
        token_ids = [t for t in per_ids if t is not None]
        special = set(getattr(tok, "all_special_ids", []) or [])
        masks = []
        for i in range(n):
            masks.append(self._mask_for(i, mask, examples, token_ids[i], per_offsets[i], special))
        agg = torch.tensor(
            [aggregate_scores(scores[i][masks[i]], self.aggregation_, self.k) for i in range(n)], dtype=torch.float64
        )
        return DetectorScores(
            token_ids=token_ids,
            scores=scores,
            masks=masks,
            aggregate=agg,
            threshold=self.threshold_,
            aggregation=self.aggregation_,
            texts=None if examples is None else [e.text for e in examples],
            offsets=None if examples is None else per_offsets,  # type: ignore[arg-type]
            tokenizer=tok,
        )

    def _mask_for(
        self,
        i: int,
        mask: Any,
        examples: list[Example] | None,
        ids: Tensor,
        offsets: list[tuple[int, int]] | None,
        special: set[int],
    ) -> Tensor:
        n_tok = int(ids.numel())
        if isinstance(mask, str) and mask == "all":
            return torch.ones(n_tok, dtype=torch.bool)
        if isinstance(mask, str) and mask == "text":
            if offsets is not None:
                return torch.tensor([b > a for a, b in offsets], dtype=torch.bool)
            return torch.tensor([int(t) not in special for t in ids.tolist()], dtype=torch.bool)
        if examples is None or offsets is None:
            raise DetectorError(
                f"mask {mask!r} needs character offsets; score texts (not token ids) or use mask='all' or 'text'"
            )
        ex = examples[i]
        if isinstance(mask, str) and mask == "spans":
            if not ex.spans:
                raise DetectorError(f"text {i} has no spans for mask='spans'; give rows with 'spans' or another mask")
            ranges = [(s["start"], s["end"]) for s in ex.spans]
        elif isinstance(mask, str):
            if mask not in ex.regions:
                raise DetectorError(
                    f"text {i} has no region {mask!r} for the detector's mask; give rows with "
                    f"'regions': {{\"{mask}\": [start, end]}}, a character range per text, or mask='text'"
                )
            ranges = [tuple(ex.regions[mask])]
        else:
            ranges = _ranges_of(mask[i])
        keep = torch.zeros(n_tok, dtype=torch.bool)
        for start, end in ranges:
            if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start < end <= len(ex.text):
                raise DetectorError(
                    f"span [{start}, {end}) lies outside text {i} (length {len(ex.text)}); character offsets "
                    "must satisfy 0 <= start < end <= len(text)"
                )
            keep |= torch.tensor(token_mask_for_region(offsets, [start, end]), dtype=torch.bool)
        return keep

    # ------------------------------------------------------------------------------------------- report

    def report(
        self,
        model_or_store,
        data: Any = None,
        *,
        split: str | None = "test",
        batch_size: int = 32,
        progress: bool = False,
    ) -> DetectorReport:
        """Metrics at example, token and span level: ``report(model, dataset)`` or ``report(store)``.

        With a model, ``data`` is a dataset (name, path, Dataset, rows) whose ``label`` gives example-level
        truth and whose ``spans`` give token- and span-level truth (a span is scored by its maximum token);
        the report keeps the scores for a token heatmap (``report.plot()``). With a store, its rows are scored
        without a model; token-level needs stored token labels, and spans are runs of consecutive tokens with
        the same label. ``split``: ``"test"`` (default; every example when the data has no split column),
        ``"train"``, or None for all.
        """
        self._check_fitted()
        if isinstance(model_or_store, ActivationStore):
            if data is not None:
                raise ConfigError("report(store) takes no dataset: the store holds its own examples")
            return self._report_store(model_or_store, split)
        if data is None:
            raise ConfigError("report(model, data) needs a dataset to score; or pass an ActivationStore alone")
        ds = load_dataset(data, require_label=False)
        if split is not None and any(e.split is not None for e in ds):
            ds = Dataset([e for e in ds if e.split == split], ds.name, ds.source)
            if not len(ds):
                raise DetectorError(f"dataset has no examples in split {split!r}; use split=None for all of them")
        scores = self.score(model_or_store, ds, batch_size=batch_size, progress=progress)
        metrics: dict[str, dict[str, float]] = {}
        labels = [e.label for e in ds]
        if all(lab is not None for lab in labels):
            y = torch.tensor([self._is_positive(lab) for lab in labels], dtype=torch.int64)
            metrics["example"] = _metrics(scores.aggregate, y, self.threshold_)
        if ds.has_spans:
            tok_s, tok_y, span_s, span_y = [], [], [], []
            for i, ex in enumerate(ds):
                offsets = scores.offsets[i]  # type: ignore[index]
                spans01 = [{**s, "label": self._is_positive(s["label"])} for s in ex.spans]
                labs = token_labels_from_spans(offsets, spans01)
                labs_t = torch.tensor(labs, dtype=torch.int64)
                keep = labs_t >= 0
                tok_s.append(scores.scores[i][keep].double())
                tok_y.append(labs_t[keep])
                for s in ex.spans:
                    m = torch.tensor(token_mask_for_region(offsets, [s["start"], s["end"]]), dtype=torch.bool)
                    if m.any():
                        span_s.append(float(scores.scores[i][m].max()))
                        span_y.append(self._is_positive(s["label"]))
            metrics["token"] = _metrics(torch.cat(tok_s), torch.cat(tok_y), self.threshold_)
            metrics["span"] = _metrics(torch.tensor(span_s), torch.tensor(span_y), self.threshold_)
        if not metrics:
            raise DetectorError("the dataset has neither labels nor spans; nothing to report on")
        return DetectorReport(metrics, self.threshold_, scores, source=f"{ds.name} ({len(ds)} texts)")

    def _is_positive(self, value: Any) -> int:
        return int(value == self.positive_ or (isinstance(value, bool) and int(value) == self.positive_))

    def _report_store(self, store: ActivationStore, split: str | None) -> DetectorReport:
        if store.d_model != self.d_model:
            raise DetectorError(f"store {store.path} has d_model={store.d_model}, the detector reads {self.d_model}")
        hook = store.resolve_hook(self.hook_)
        if split is None:
            rows = torch.arange(len(store))
        elif split in ("train", "test"):
            train, test = store.train_test_split(seed=self.seed)
            rows = test if split == "test" else train
        else:
            raise ConfigError(f"split must be 'train', 'test' or None, got {split!r}")
        metrics: dict[str, dict[str, float]] = {}
        try:
            y_ex, _classes, _pos = self._row_labels(store, "label")
            s, y = self._unit_scores(store, hook, rows, y_ex, "example", self.weight_, self.bias_)
            metrics["example"] = _metrics(s, y, self.threshold_)
        except (DetectorError, StoreError):
            pass
        if store.manifest.get("has_token_labels"):
            y_tok, _c, _p = self._row_labels(store, "token_label")
            lab_rows = rows[y_tok[rows] >= 0]
            s, y = self._unit_scores(store, hook, lab_rows, y_tok, "token", self.weight_, self.bias_)
            metrics["token"] = _metrics(s, y, self.threshold_)
            span_s, span_y = _runs(store, lab_rows, s, y)
            metrics["span"] = _metrics(span_s, span_y, self.threshold_)
        if not metrics:
            raise DetectorError(f"store {store.path} has no binary 'label' and no token labels to report on")
        return DetectorReport(metrics, self.threshold_, None, source=f"store {store.path} ({split or 'all'} rows)")

    # ------------------------------------------------------------------------------------------- streaming

    def monitor(
        self,
        model,
        prompt: str,
        max_new_tokens: int = 64,
        *,
        on_token: Callable[[int, int, str, float], Any] | None = None,
        stop_above: float | bool | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
        stop_at_eos: bool = True,
    ) -> MonitorResult:
        """Generate from ``prompt`` and score each generated token as it is produced, in the same forward pass.

        Generation runs step by step with the model's KV cache; a hook at the detector's hook reads the
        activation of the token fed in at each step (the same forward produces the next token's logits), so a
        token's score equals its score when the finished text is scored in one pass. ``on_token(index,
        token_id, token_str, score)`` is called for each generated token (return True from it to stop there).
        ``stop_above``: a score (or True for the detector's threshold); generation stops right after the first
        token scoring above it. Greedy by default; ``do_sample`` samples with ``temperature`` and ``top_k``
        from a generator seeded with ``seed``.
        """
        hook = self.check_model(model)
        from interp.model import max_length, tokenize

        if _is_encoder(model):
            raise DetectorError(
                f"model {_identity(model).get('name')!r} is an encoder (BERT-like) and cannot generate; "
                "monitor needs a decoder-only model such as GPT-2 (use detector.score for encoders)"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if stop_above is True:
            if self.threshold_ is None:
                raise DetectorError(
                    "stop_above=True needs a calibrated threshold; calibrate the detector or give a number"
                )
            stop_above = self.threshold_
        elif stop_above is False:
            stop_above = None
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError("prompt must be a non-empty string")
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive (use do_sample=False for greedy), got {temperature}")
        toks = tokenize(model, [prompt])
        n_prompt = toks.lengths[0]
        limit = max_length(model)
        if n_prompt + max_new_tokens > limit:
            raise ConfigError(
                f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
                f"{limit} tokens; lower max_new_tokens"
            )
        device = model_device(model)
        ids = toks.input_ids[:, :n_prompt].to(device)
        w = self.weight_.to(device)
        b = float(self.bias_)
        eos = getattr(model.tokenizer, "eos_token_id", None)
        gen = torch.Generator(device=device).manual_seed(int(seed))
        out: dict[str, Tensor] = {}
        final = [False]

        def grab(act: Tensor, hook) -> None:
            out["scores"] = act[0].float() @ w + b
            if final[0]:
                raise StopForward  # the last token: its score is all that is left to compute

        new_ids: list[int] = []
        new_scores: list[float] = []
        stopped, stop_index, reason = False, None, "max_new_tokens"
        with torch.inference_mode(), model.hooks(fwd_hooks=[(hook, grab)]):
            logits, cache = model(ids, return_type="logits_and_cache")
            prompt_scores = out.pop("scores").cpu()
            next_logits = logits[0, -1]
            for i in range(max_new_tokens):
                token = _pick_token(next_logits, do_sample, temperature, top_k, gen)
                is_eos = stop_at_eos and eos is not None and int(token) == eos
                last = i == max_new_tokens - 1 or is_eos
                step = token.view(1, 1)
                if last:  # nothing more to generate: run only as far as the hook to score this token
                    final[0] = True
                    _run_to_hook(model, step, out, past_key_values=cache)
                else:
                    logits, cache = model(step, return_type="logits_and_cache", past_key_values=cache)
                    next_logits = logits[0, -1]
                score = float(out.pop("scores")[-1])
                tid = int(token)
                new_ids.append(tid)
                new_scores.append(score)
                asked_stop = False
                if on_token is not None:
                    asked_stop = on_token(i, tid, _token_strings(model.tokenizer, [tid])[0], score) is True
                if stop_above is not None and score > float(stop_above):
                    stopped, stop_index, reason = True, i, "stop_above"
                    break
                if asked_stop:
                    stopped, stop_index, reason = True, i, "callback"
                    break
                if is_eos:
                    reason = "eos"
                    break
        token_ids = torch.tensor(new_ids, dtype=torch.int64)
        scores_t = torch.tensor(new_scores, dtype=torch.float32)
        return MonitorResult(
            prompt=prompt,
            text=model.tokenizer.decode(new_ids),
            token_ids=token_ids,
            tokens=_token_strings(model.tokenizer, token_ids),
            scores=scores_t,
            prompt_ids=ids[0].cpu(),
            prompt_scores=prompt_scores,
            stopped=stopped,
            stop_index=stop_index,
            threshold=None if stop_above is None else float(stop_above),
            aggregate=aggregate_scores(scores_t, self.aggregation_, self.k),
            aggregation=self.aggregation_,
            reason=reason,
        )


# ----------------------------------------------------------------------------------------------- internals


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


def _as_inputs(texts: Any) -> tuple[list[Example] | None, list[list[int]] | None]:
    """Texts (with their regions and spans) or token-id rows."""
    if isinstance(texts, Tensor):
        if texts.dtype.is_floating_point:
            raise ConfigError("token ids must be an integer tensor [batch, pos]")
        t = texts.unsqueeze(0) if texts.ndim == 1 else texts
        if t.ndim != 2 or t.shape[1] == 0:
            raise ConfigError(f"token ids must be [batch, pos], got shape {list(texts.shape)}")
        return None, [row.tolist() for row in t]
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, Dataset):
        return list(texts), None
    seq = list(texts)
    if not seq:
        raise ConfigError("no texts to score; give a string or a list of strings")
    if all(isinstance(r, (list, tuple)) and r and all(isinstance(v, int) for v in r) for r in seq):
        return None, [list(r) for r in seq]
    if all(isinstance(r, str) for r in seq):
        if any(not r for r in seq):
            raise ConfigError("cannot score an empty string; every text needs at least one character")
        return [Example(text=r, id=i) for i, r in enumerate(seq)], None
    if all(isinstance(r, Mapping) for r in seq):
        try:
            ds = load_dataset(seq, require_label=False)
        except InterpError as e:
            raise DetectorError(f"bad row to score: {e}") from None
        return list(ds), None
    raise ConfigError("texts must be a string, a list of strings, a Dataset, a list of row dicts, or token ids")


def _ranges_of(entry: Any) -> list[tuple[Any, Any]]:
    """One ``[start, end]`` or a list of them."""
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(v, int) for v in entry):
        return [(entry[0], entry[1])]
    if isinstance(entry, (list, tuple)) and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in entry):
        return [(r[0], r[1]) for r in entry]
    raise DetectorError(f"mask entry {entry!r} is not a character range [start, end] or a list of them")


@dataclass
class _IdTokens:
    input_ids: Tensor
    attention_mask: Tensor
    lengths: list[int]
    offsets: None = field(default=None)

    def to(self, device) -> _IdTokens:
        return _IdTokens(self.input_ids.to(device), self.attention_mask.to(device), self.lengths)


def _pad_ids(rows: list[list[int]], tokenizer) -> _IdTokens:
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), int(pad), dtype=torch.int64)
    mask = torch.zeros((len(rows), L), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[i, : len(r)] = 1
    return _IdTokens(ids, mask, [len(r) for r in rows])


def _token_strings(tokenizer, ids: Tensor | Sequence[int]) -> list[str]:
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if tokenizer is None:
        return [str(i) for i in ids]
    return list(tokenizer.batch_decode([[i] for i in ids]))


def _pick_token(logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, gen: torch.Generator) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    z = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(z, min(int(top_k), z.numel())).values[-1]
        z = torch.where(z < kth, torch.full_like(z, float("-inf")), z)
    probs = torch.softmax(z, -1)
    return torch.multinomial(probs, 1, generator=gen)[0]
