"""LinearProbe as a scikit-learn estimator (issue 11): the protocol, scikit-learn's own checks, its tools."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone, is_classifier
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import check_is_fitted

from interp.errors import InterpError
from interp.probes import LinearProbe

ROOT = Path(__file__).resolve().parents[1]

EXPECTED_FAILED = {
    "check_sample_weight_equivalence_on_dense_data": (
        "integer weights equal repeated rows only up to the solver's float32 tolerance (max |dproba| 2e-4 at "
        "tol=1e-4, 6e-8 at tol=1e-8), not to the check's rtol=1e-7"
    ),
}


@parametrize_with_checks([LinearProbe()], expected_failed_checks=lambda est: EXPECTED_FAILED)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def blobs(n=600, d=12, seed=0, shift=0.8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    v = rng.normal(size=d)
    X = rng.normal(size=(n, d)) * np.linspace(0.5, 4, d) + np.outer(2 * y - 1, v) * shift + 3.0
    return X, y


def test_cross_val_score_pipeline_and_grid_search_agree_with_logistic_regression():
    X, y = blobs()
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    ours = cross_val_score(LinearProbe(C=0.1), X, y, cv=cv, error_score="raise")
    ref = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(C=0.1)), X, y, cv=cv)
    assert np.isfinite(ours).all() and np.abs(ours - ref).max() <= 0.02
    pipe = Pipeline([("scale", StandardScaler()), ("probe", LinearProbe(C=0.1))])
    in_pipe = cross_val_score(pipe, X, y, cv=cv)  # the issue: NaN scores (errors swallowed by error_score=nan)
    assert np.isfinite(in_pipe).all() and np.abs(in_pipe - ref).max() <= 0.02
    grid = GridSearchCV(LinearProbe(), {"C": [1e-4, 0.1, 10.0]}, cv=cv, error_score="raise").fit(X, y)
    ref_grid = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression()),
                            {"logisticregression__C": [1e-4, 0.1, 10.0]}, cv=cv).fit(X, y)
    assert np.abs(grid.cv_results_["mean_test_score"] - ref_grid.cv_results_["mean_test_score"]).max() <= 0.02
    assert grid.best_params_["C"] == ref_grid.best_params_["logisticregression__C"]


def test_protocol_clone_fitted_tags_and_errors():
    X, y = blobs(n=200)
    probe = LinearProbe(C=0.5, max_iter=300)
    assert is_classifier(probe)
    with pytest.raises(NotFittedError):
        check_is_fitted(probe)
    with pytest.raises(NotFittedError) as e:
        probe.predict(X)
    assert isinstance(e.value, InterpError) and "fit(X, y)" in str(e.value)
    assert probe.fit(X, y) is probe
    check_is_fitted(probe)
    twin = clone(probe)
    assert twin.get_params() == probe.get_params() and not hasattr(twin, "coef_")
    with pytest.raises(ValueError, match="no parameter 'c'") as e:
        probe.set_params(c=1.0)
    assert isinstance(e.value, InterpError)
    with pytest.raises(ValueError, match="expecting 12 features"):
        probe.predict(X[:, :5])
    # tensors in, tensors out; arrays in, arrays out; both agree
    zt = probe.decision_function(torch.from_numpy(X).float())
    assert isinstance(zt, torch.Tensor) and np.allclose(zt.numpy(), probe.decision_function(X), atol=1e-4)


def test_interp_imports_and_probes_work_without_sklearn():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["sklearn"] = None  # any import of scikit-learn now raises ImportError
        import numpy as np, torch
        import interp
        from interp.probes import LinearProbe
        from interp.probes.estimator import ProbeNotFittedError
        rng = np.random.default_rng(0)
        X = rng.normal(size=(200, 6)); y = (X[:, 0] > 0).astype(int)
        p = LinearProbe().fit(X, y)
        assert p.score(X, y) > 0.9 and LinearProbe().get_params()["C"] == 1.0
        try:
            LinearProbe().predict(X)
        except ProbeNotFittedError as e:
            assert "not fitted" in str(e)
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
