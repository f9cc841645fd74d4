"""The :class:`Detector`: settings, fitted state, the affine token scorer, save and load."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interp.artifacts import jsonable as _jsonable
from interp.artifacts import load_json, save_tensors
from interp.detectors.calibration import AGGREGATIONS, METHODS, _Fitting
from interp.detectors.reports import _Reporting
from interp.detectors.scoring import _Scoring
from interp.errors import ConfigError, DetectorError, close_matches
from interp.store import atomic_write_json

FORMAT_NAME = "interp.detector"
FORMAT_VERSION = 1
CONFIG_FILE = "detector.json"
TENSORS_FILE = "detector.safetensors"


class Detector(_Fitting, _Scoring, _Reporting):
    """A probe or direction at one hook, an aggregation of token scores, and a calibrated threshold.

    Settings (constructor): ``method`` (``"probe"``: a logistic probe with its standardisation inside;
    ``"diff_in_means"``: the class-mean difference direction, with a scale and offset fitted so its scores are
    logits), ``hook`` (a stored hook name or layer, ``"best"`` to pick the hook with the best validation AUROC,
    or None when the store has one hook), ``aggregation`` (``mean``/``max``/``topk``/``last``, with ``k`` for
    ``topk``; None = ``last`` for a store of last-token rows, else ``mean``), ``mask`` (which tokens count when
    scoring text: ``"all"`` tokens, ``"text"`` tokens (special tokens left out), ``"spans"`` (the examples'
    spans), or a region name such as ``"response"``; None = from the store's position policy), ``target_fpr``, ``C`` (probe inverse regularisation), ``val_size`` (share of the
    training examples held out to calibrate), ``group`` (an example field whose values keep examples together
    in that split, e.g. ``"pair_id"``; default: the first of ``pair_id``, ``group``, ``pair``, ``country`` that
    the store's examples have and that pairs some of them; ``False`` for none; a validation AUROC below 0.5
    warns), ``positive`` (the label value that is the positive class; default 1 or
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
