"""scikit-learn's estimator protocol for :class:`~interp.probes.LinearProbe`, without importing scikit-learn.

scikit-learn stays optional: nothing here imports it at module level. What its tools (``clone``,
``Pipeline``, ``cross_val_score``, ``GridSearchCV``, ``check_is_fitted``, ``check_estimator``) need is a
protocol, implemented here as a mixin:

* parameters: ``get_params`` / ``set_params`` over the ``__init__`` arguments, which ``__init__`` only stores;
* ``__sklearn_tags__`` (a classifier on dense 2-D input, imported from scikit-learn when it asks) and
  ``__sklearn_is_fitted__``;
* input checks that raise what scikit-learn's own estimators raise: :class:`ProbeInputError` is an
  ``InterpError`` and a ``ValueError``; calling an unfitted probe raises an ``InterpError`` that is also
  scikit-learn's ``NotFittedError`` when scikit-learn is installed;
* feature names: a pandas frame with string column names records ``feature_names_in_``, checked on predict.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from interp.errors import AnalysisError


class ProbeInputError(AnalysisError, ValueError):
    """Input a probe cannot use (shape, dtype, NaN, labels); a ``ValueError`` for scikit-learn's tools."""


class ProbeNotFittedError(AnalysisError, ValueError, AttributeError):
    """A probe used before ``fit``."""


@functools.lru_cache(maxsize=1)
def _not_fitted_class() -> type[Exception]:
    try:
        from sklearn.exceptions import NotFittedError
    except ImportError:
        return ProbeNotFittedError
    return type("ProbeNotFittedError", (ProbeNotFittedError, NotFittedError), {"__module__": __name__})


def _feature_names(X: Any) -> np.ndarray | None:
    """A frame's column names when all of them are strings (as scikit-learn records them), else None."""
    cols = getattr(X, "columns", None)
    if cols is None or isinstance(X, (Tensor, np.ndarray)):
        return None
    names = np.asarray(list(cols), dtype=object)
    return names if names.size and all(isinstance(n, str) for n in names) else None


def _data_conversion_warning() -> type[Warning]:
    try:
        from sklearn.exceptions import DataConversionWarning
    except ImportError:
        return UserWarning
    return DataConversionWarning


class EstimatorProtocol:
    """Mixin: scikit-learn's estimator protocol for a classifier whose parameters are its ``__init__`` arguments
    (listed in ``_PARAMS``)."""

    _PARAMS: tuple[str, ...] = ()

    # ---- parameters
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments (scikit-learn's ``get_params``)."""
        return {k: getattr(self, k) for k in self._PARAMS}

    def set_params(self, **params: Any):
        """Set constructor arguments; an unknown name raises a ``ValueError`` naming the valid ones."""
        for k, v in params.items():
            if k not in self._PARAMS:
                raise ProbeInputError(
                    f"{type(self).__name__} has no parameter {k!r}; valid parameters: {', '.join(self._PARAMS)}"
                )
            setattr(self, k, v)
        return self

    # ---- scikit-learn hooks (called by scikit-learn only, so importing it here costs nothing otherwise)
    def __sklearn_tags__(self):
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        return Tags(
            estimator_type="classifier",
            target_tags=TargetTags(required=True),
            classifier_tags=ClassifierTags(multi_class=True, multi_label=False),
            input_tags=InputTags(two_d_array=True, sparse=False, allow_nan=False),
        )

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "coef_")

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise _not_fitted_class()(
                f"this {type(self).__name__} is not fitted yet; call fit(X, y) before using it"
            )

    # ---- input checks
    def _validate_x(self, X: Any, reset: bool) -> tuple[Tensor, bool]:
        """``X`` as a ``[n, d]`` float tensor (tensors are not copied), and whether it came as an array.

        ``reset`` (in ``fit``) records ``n_features_in_``'s source names; otherwise they are checked.
        """
        names = _feature_names(X)
        if reset:
            self._fit_feature_names = names
        else:
            self._check_feature_names(names)
        if isinstance(X, Tensor):
            t, is_np = X.detach(), False
        else:
            is_np = True
            if hasattr(X, "toarray") or type(X).__module__.startswith("scipy.sparse"):
                raise ProbeInputError("sparse input is not supported: pass a dense array (X.toarray())")
            a = np.asarray(X)
            if np.iscomplexobj(a):
                raise ProbeInputError("Complex data not supported: X must be real")
            if a.dtype.kind not in "biuf":
                a = a.astype(np.float64)  # object arrays of numbers; anything else raises TypeError here
            if a.dtype == np.float16 or a.dtype.kind in "biu" or a.dtype == np.bool_:
                a = a.astype(np.float32)
            if not a.flags.writeable or not a.flags.c_contiguous:
                a = np.array(a, order="C")
            t = torch.from_numpy(a)
        if t.dim() != 2:
            raise ProbeInputError(
                f"Expected 2D array, got shape {list(t.shape)}: X must be [n_rows, d_model]; Reshape your data "
                "with X.reshape(-1, 1) for a single feature or X.reshape(1, -1) for a single row"
            )
        for axis, what in ((0, "sample"), (1, "feature")):
            if t.shape[axis] == 0:
                raise ProbeInputError(
                    f"Found array with 0 {what}(s) (shape=({t.shape[0]}, {t.shape[1]})) while a minimum of 1 is "
                    "required: X is empty"
                )
        if not t.is_floating_point():
            t = t.float()
        if not reset:
            d = self.n_features_in_  # type: ignore[attr-defined]
            if t.shape[1] != d:
                raise ProbeInputError(
                    f"X has {t.shape[1]} features, but {type(self).__name__} is expecting {d} features as input"
                )
        return t, is_np

    def _check_feature_names(self, names: np.ndarray | None) -> None:
        fitted = getattr(self, "_fit_feature_names", None)
        me = type(self).__name__
        if fitted is None and names is not None:
            warnings.warn(f"X has feature names, but {me} was fitted without feature names", UserWarning,
                          stacklevel=3)
        elif fitted is not None and names is None:
            warnings.warn(f"X does not have valid feature names, but {me} was fitted with feature names",
                          UserWarning, stacklevel=3)
        elif fitted is not None and names is not None and (len(fitted) != len(names) or (fitted != names).any()):
            raise ProbeInputError(
                "The feature names should match those that were passed during fit: "
                f"fit with {list(fitted)[:5]}, now {list(names)[:5]}"
            )

    @property
    def feature_names_in_(self) -> np.ndarray:
        """Column names of the frame ``fit`` was given (only when all were strings)."""
        names = getattr(self, "_fit_feature_names", None)
        if names is None:
            raise AttributeError(f"{type(self).__name__} was not fitted on a frame with string column names")
        return names

    @staticmethod
    def _validate_y(y: Any, n: int) -> np.ndarray:
        """Class labels as a 1-D array of ``n`` values (a column vector is accepted with a warning)."""
        if y is None:
            raise ProbeInputError("a probe requires y to be passed, but the target y is None")
        a = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
        if a.ndim == 2 and a.shape[1] == 1:
            warnings.warn("A column-vector y was passed when a 1d array was expected; using y.ravel()",
                          _data_conversion_warning(), stacklevel=3)
            a = a.ravel()
        if a.ndim != 1:
            raise ProbeInputError(f"y should be a 1d array of class labels, got shape {list(a.shape)}")
        if a.shape[0] != n:
            raise ProbeInputError(f"X has {n} rows but y has {a.shape[0]} labels")
        if a.dtype.kind == "f":
            if not np.isfinite(a).all():
                raise ProbeInputError("Input y contains NaN or infinity: every row needs a class label")
            if (a != np.round(a)).any():
                raise ProbeInputError(
                    "Unknown label type: y holds continuous values; a probe classifies, pass class labels"
                )
        return a


def validate_sample_weight(sample_weight: Any, n: int) -> Tensor:
    """One finite, non-negative float32 weight per row (all ones for None)."""
    if sample_weight is None:
        return torch.ones(n)
    w = sample_weight if isinstance(sample_weight, Tensor) else torch.as_tensor(np.asarray(sample_weight, float))
    w = w.detach().to("cpu", torch.float32)
    if w.dim() == 0:
        w = w.expand(n).clone()
    if w.dim() != 1 or w.numel() != n:
        raise ProbeInputError(f"sample_weight must be one weight per row: shape {list(w.shape)} for {n} rows")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ProbeInputError("sample_weight must be finite and non-negative")
    return w
