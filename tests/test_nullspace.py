"""INLP: a planted k-dimensional concept subspace is found and removed; projection algebra; stores and hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from interp.errors import AnalysisError, HookError
from interp.nullspace import INLPResult, inlp, inlp_tensors, projection_from_directions
from interp.store import ActivationStore

K, N, DIM = 3, 8000, 24


def concept_subspace(seed=0, n=N, d=DIM, k=K, snr=0.6):
    """Label y shifts k orthonormal directions U (each with its own noise scale); the rest is label-free.

    Every direction of U alone classifies y (~70%), so a linear probe keeps finding signal until all of U is
    gone: INLP should need k iterations.
    """
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    U = Q[:, :k].T
    y = torch.randint(0, 2, (n,), generator=g)
    X = torch.randn(n, d, generator=g)
    X = X - (X @ U.T) @ U
    sig = torch.logspace(-0.5, 0.5, k)
    Z = ((2 * y[:, None] - 1) * snr + torch.randn(n, k, generator=g)) * sig
    return X + Z @ U + 2.0, y, U


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    X, y, U = concept_subspace()
    store = ActivationStore.from_tensors(tmp_path_factory.mktemp("inlp") / "s", {"blocks.1.hook_out": X}, y.tolist())
    result = inlp(store, 1, C=0.001, progress=False)
    return store, X, y, U, result


def test_inlp_finds_the_planted_subspace(planted):
    store, X, y, U, r = planted
    assert abs(r.n_directions - K) <= 1
    assert r.accuracies[0] > 0.75 and r.reached_chance
    assert r.accuracies[-1] <= r.majority + 0.02
    assert r.removed == list(range(len(r.accuracies)))
    # the directions found lie in U (the first K almost entirely)
    assert float(torch.linalg.norm(r.directions[:K] @ U.T, dim=1).min()) > 0.95
    # a fresh scikit-learn classifier on the projected activations is at chance (within 3 points)
    tr, te = store.train_test_split()
    Xp = r.apply(X).double().numpy()
    clf = LogisticRegression(max_iter=3000).fit(Xp[tr], y[tr].numpy())
    assert abs(clf.score(Xp[te], y[te].numpy()) - r.majority) <= 0.03
    # while on the raw activations it is not
    raw = LogisticRegression(max_iter=3000).fit(X[tr].numpy(), y[tr].numpy()).score(X[te].numpy(), y[te].numpy())
    assert raw > 0.75


def test_projection_algebra(planted):
    *_, r = planted
    P = r.projection.double()
    assert torch.allclose(P @ P, P, atol=1e-5)
    assert torch.allclose(P, P.T, atol=1e-6)
    x = torch.randn(100, DIM, dtype=torch.float64)
    for w in r.directions.double():
        assert float((x @ P @ w).abs().max()) < 1e-4  # w . P x = 0 for any x
    assert torch.allclose(r.directions @ r.directions.T, torch.eye(r.n_directions), atol=1e-5)
    assert int(round(float(torch.trace(P)))) == DIM - r.n_directions
    Q = projection_from_directions(r.directions)
    assert torch.allclose(Q, r.projection, atol=1e-5)


def test_inlp_matches_sklearn_built_loop(planted):
    """The same algorithm built on scikit-learn (explicitly projected data) finds the same directions."""
    store, X, y, _, r = planted
    tr, te = store.train_test_split()
    Xd = X.double()
    mu = Xd[tr].mean(0)
    s = float(torch.sqrt(Xd[tr].var(0, unbiased=False).mean()))
    Z = ((Xd - mu) / s).numpy()
    P = np.eye(DIM)
    found = []
    for _ in range(r.n_directions):
        clf = LogisticRegression(C=0.001, tol=1e-8, max_iter=5000).fit(Z[tr] @ P, y[tr].numpy())
        w = P @ clf.coef_[0]
        w /= np.linalg.norm(w)
        found.append(w)
        B = np.array(found)
        P = np.eye(DIM) - B.T @ np.linalg.pinv(B @ B.T) @ B
    for ours, theirs in zip(r.directions.double().numpy(), found):
        assert abs(float(ours @ theirs)) > 0.99


def test_apply_to_store_hook_fn_and_save_load(planted, tmp_path):
    store, X, y, _, r = planted
    out = r.apply_to_store(store, tmp_path / "projected", progress=False)
    assert out.hooks == ["blocks.1.hook_out"] and len(out) == len(store)
    assert torch.allclose(out.activations(1), r.apply(X), atol=1e-5)
    assert out.examples()[5]["label"] == store.examples()[5]["label"]
    assert out.manifest["dataset"]["inlp"]["directions_removed"] == r.n_directions
    again = inlp(out, 1, C=0.001, max_iter=3, progress=False)
    assert again.accuracies[0] <= r.majority + 0.03
    fn = r.hook_fn()
    acts = X[:6].reshape(2, 3, DIM).half()
    live = fn(acts, hook=None)
    assert live.dtype == torch.float16 and live.shape == (2, 3, DIM)
    assert torch.allclose(live.float(), r.apply(acts.float()), atol=1e-2)
    # centring keeps the mean; the linear form kills the directions outright
    assert float((r.apply(X, center=False) @ r.directions.T).abs().max()) < 1e-3
    r.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "inlp.json").read_text())
    assert meta["format"] == "interp.inlp" and meta["n_directions"] == r.n_directions
    back = INLPResult.load(tmp_path / "saved")
    assert torch.equal(back.projection, r.projection) and back.accuracies == r.accuracies
    assert back.hook == "blocks.1.hook_out" and back.removed == r.removed
    assert len(r.plot().data) >= 1


def test_inlp_multiclass_and_margin_none(tmp_path):
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 3, (3000,), generator=g)
    means = torch.randn(3, 16, generator=g) * 1.5
    X = torch.randn(3000, 16, generator=g) + means[y]
    st = ActivationStore.from_tensors(tmp_path / "m", {"blocks.0.hook_out": X}, y.tolist())
    r = inlp(st, 0, C=0.01, progress=False)
    assert r.reached_chance and r.removed[1] == 3  # one-vs-rest: three directions per iteration
    tr, te = st.train_test_split()
    Xp = r.apply(X).numpy()
    acc = LogisticRegression(max_iter=3000).fit(Xp[tr], y[tr].numpy()).score(Xp[te], y[te].numpy())
    assert acc <= r.majority + 0.03
    full = inlp_tensors(X, y, torch.arange(3000) % 4 != 0, torch.arange(3000) % 4 == 0, max_iter=2, margin=None,
                        progress=False)
    assert len(full["accuracies"]) == 3 and not full["reached_chance"]


def test_inlp_bad_input(tmp_path, planted):
    store, *_ = planted
    with pytest.raises(HookError, match="not in store"):
        inlp(store, "blocks.4.hook_out", progress=False)
    with pytest.raises(Exception, match="not a field"):
        inlp(store, 1, label="sentiment", progress=False)
    one = ActivationStore.from_tensors(tmp_path / "one", {"blocks.0.hook_out": torch.randn(30, 4)}, [1] * 30)
    with pytest.raises(AnalysisError, match="single class"):
        inlp(one, 0, progress=False)
    X = torch.randn(40, 4)
    X[5, 1] = float("nan")
    bad = ActivationStore.from_tensors(tmp_path / "bad", {"blocks.0.hook_out": X}, [0, 1] * 20)
    with pytest.raises(AnalysisError, match="NaN or inf"):
        inlp(bad, 0, progress=False)


def test_cli_inlp(planted, tmp_path, capsys):
    from interp.cli import main

    store, *_ = planted
    out = tmp_path / "o"
    assert main(["inlp", str(store.path), "--hook", "1", "--C", "0.001", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "majority class" in text and "reached chance" in text
    assert (out / "inlp.safetensors").exists() and (out / "inlp.html").exists()
    assert main(["inlp", str(store.path), "--hook", "blocks.9.hook_out", "--quiet"]) == 2


def test_apply_to_store_keeps_token_rows(tmp_path):
    g = torch.Generator().manual_seed(8)
    counts = [3, 1, 4, 2, 5] * 40
    ex = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    n = ex.numel()
    tl = torch.randint(-1, 2, (n,), generator=g)
    X = torch.randn(n, 8, generator=g) + 2.0 * tl.clamp_min(0)[:, None] * torch.eye(8)[0]
    examples = [{"id": i, "label": i % 2} for i in range(len(counts))]
    st = ActivationStore.from_tensors(tmp_path / "tok", {"blocks.0.hook_out": X}, examples=examples, example_id=ex,
                                      token_label=tl, position=torch.arange(n) % 7, positions="all",
                                      dtype="float16")
    r = inlp(st, 0, label="token_label", C=0.01, progress=False)
    assert r.n_directions >= 1 and abs(float(r.directions[0, 0])) > 0.9
    out = r.apply_to_store(st, tmp_path / "tok-proj", batch_size=64, progress=False)
    assert torch.equal(out.example_ids(), st.example_ids()) and torch.equal(out.token_labels(), st.token_labels())
    assert torch.equal(out.token_positions(), st.token_positions()) and out.dtype == torch.float16
    assert torch.allclose(out.activations(0).float(), r.apply(st.activations(0)), atol=2e-2)
