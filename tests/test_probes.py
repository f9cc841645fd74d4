"""Probes: planted signals, agreement with scikit-learn, sweeps over stores, bad input, CLI and notebook."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import math

import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from interp.errors import AnalysisError, HookError, InterpError, StoreError
from interp.probes import LinearProbe, ProbeSweep, auroc, binary_metrics, recall_at_fpr, train_probes
from interp.probes.linear import group_folds
from interp.store import ActivationStore

REPO = Path(__file__).resolve().parents[1]


def cos(a, b) -> float:
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64).reshape(-1)
    return float(a @ b / (a.norm() * b.norm()))


def planted(n=3000, d=32, strength=(0.0, 0.3, 0.6, 1.2), seed=0, offset=3.0, classes=2):
    """Hooks whose class means differ along one known unit direction, more with depth; anisotropic offsets."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g)
    v /= v.norm()
    y = torch.randint(0, classes, (n,), generator=g)
    acts = {}
    for layer, a in enumerate(strength):
        noise = torch.randn(n, d, generator=g)
        acts[f"blocks.{layer}.hook_out"] = noise + offset + (y[:, None].float() - (classes - 1) / 2) * a * v
    return acts, y, v


@pytest.fixture
def store(tmp_path):
    acts, y, v = planted()
    return ActivationStore.from_tensors(tmp_path / "s", acts, y.tolist()), y, v


# ----------------------------------------------------------------------------------------------- metrics


def test_metrics_match_sklearn_with_ties():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (2000,), generator=g)
    s = (y.float() * 0.8 + torch.randn(2000, generator=g)).round(decimals=1)  # many ties
    assert auroc(s, y) == pytest.approx(roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)
    fpr, tpr, _ = roc_curve(y.numpy(), s.numpy())
    assert recall_at_fpr(s, y, 0.01) == pytest.approx(tpr[fpr <= 0.01].max(), abs=1e-12)
    assert recall_at_fpr(s, y, 0.1) == pytest.approx(tpr[fpr <= 0.1].max(), abs=1e-12)
    m = binary_metrics(s, y)
    assert m["accuracy"] == pytest.approx(float(((s > 0).long() == y).float().mean()))
    assert set(m) == {"accuracy", "auroc", "recall_at_1pct_fpr"}
    assert np.isnan(auroc(s, torch.ones_like(y)))


# ----------------------------------------------------------------------------------------------- LinearProbe vs sklearn


@pytest.mark.parametrize("C,precondition", [(0.05, "auto"), (1.0, "auto"), (1.0, False)])
def test_linear_probe_matches_sklearn(C, precondition):
    acts, y, _ = planted(n=4000, d=48, strength=(0.5,), seed=2)
    X = acts["blocks.0.hook_out"]
    X = X * torch.linspace(0.2, 5, 48)  # badly scaled features: standardisation matters
    tr, te = slice(0, 3000), slice(3000, None)
    probe = LinearProbe(C=C, precondition=precondition).fit(X[tr], y[tr])
    assert probe.converged_
    scaler = StandardScaler().fit(X[tr].double().numpy())
    ref = LogisticRegression(C=C, tol=1e-8, max_iter=5000).fit(scaler.transform(X[tr].double().numpy()), y[tr].numpy())
    assert cos(probe.coef_standardized_, ref.coef_) > 0.99
    acc_ref = ref.score(scaler.transform(X[te].double().numpy()), y[te].numpy())
    assert abs(probe.score(X[te], y[te]) - acc_ref) <= 0.01
    # raw-space weights reproduce the standardised decision function
    z_ref = ref.decision_function(scaler.transform(X[te].double().numpy()))
    assert np.corrcoef(probe.decision_function(X[te]).numpy(), z_ref)[0, 1] > 0.999
    assert torch.allclose(probe.decision_function(X[te]), X[te] @ probe.coef_[0] + probe.intercept_[0], atol=1e-4)
    # numpy in, numpy out; sklearn-shaped attributes
    assert isinstance(probe.predict_proba(X[te].numpy()), np.ndarray)
    assert probe.coef_.shape == (1, 48) and probe.intercept_.shape == (1,)
    assert list(probe.classes_) == [0, 1]


def test_linear_probe_multiclass_matches_one_vs_rest():
    acts, y, _ = planted(n=3000, d=24, strength=(1.5,), seed=3, classes=3)
    g = torch.Generator().manual_seed(9)
    X = acts["blocks.0.hook_out"] + (y[:, None] == 2).float() * torch.randn(24, generator=g)  # class 2 elsewhere
    labels = np.array(["cat", "dog", "eel"])[y.numpy()]
    probe = LinearProbe(C=0.5).fit(X[:2400], labels[:2400])
    assert probe.coef_.shape == (3, 24) and list(probe.classes_) == ["cat", "dog", "eel"]
    scaler = StandardScaler().fit(X[:2400].numpy())
    ref = OneVsRestClassifier(LogisticRegression(C=0.5, tol=1e-8, max_iter=5000)).fit(
        scaler.transform(X[:2400].numpy()), labels[:2400]
    )
    for k, est in enumerate(ref.estimators_):
        assert cos(probe.coef_standardized_[k], est.coef_) > 0.99
    acc_ref = ref.score(scaler.transform(X[2400:].numpy()), labels[2400:])
    assert abs(probe.score(X[2400:], labels[2400:]) - acc_ref) <= 0.01
    proba = probe.predict_proba(X[2400:])
    assert proba.shape == (600, 3) and torch.allclose(proba.sum(1), torch.ones(600), atol=1e-5)
    assert set(probe.predict(X[2400:].numpy())) <= {"cat", "dog", "eel"}


def test_linear_probe_float16_and_save_load(tmp_path):
    acts, y, v = planted(n=2000, d=32, strength=(1.0,), seed=4)
    X = acts["blocks.0.hook_out"]
    p32 = LinearProbe(C=1.0).fit(X, y)
    p16 = LinearProbe(C=1.0).fit(X.half(), y)
    assert cos(p16.coef_, p32.coef_) > 0.999
    assert cos(p32.coef_, v) > 0.95
    p32.save(tmp_path / "p")
    back = LinearProbe.load(tmp_path / "p")
    assert torch.equal(back.coef_, p32.coef_) and back.C == 1.0 and list(back.classes_) == [0, 1]
    assert torch.allclose(back.predict_proba(X), p32.predict_proba(X))
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert meta["format"] == "interp.linear_probe"


def test_linear_probe_bad_input():
    X = torch.randn(50, 4)
    with pytest.raises(AnalysisError, match="single class"):
        LinearProbe().fit(X, np.zeros(50))
    Xn = X.clone()
    Xn[3, 1] = float("nan")
    with pytest.raises(AnalysisError, match="NaN or inf"):
        LinearProbe().fit(Xn, np.arange(50) % 2)
    with pytest.raises(AnalysisError, match="not fitted"):
        LinearProbe().predict(X)


# ----------------------------------------------------------------------------------------------- sweeps


def test_sweep_recovers_planted_direction(store, tmp_path):
    st, y, v = store
    sweep = train_probes(st, cv=5, seed=0, progress=False)
    assert sweep.best_hook == "blocks.3.hook_out"
    acc = sweep.metric("heldout_accuracy")
    assert acc[0] < 0.56 and acc[3] > 0.65 and acc[3] > acc[1]
    assert cos(sweep.best_probe.coef_, v) > 0.95
    frame = sweep.to_frame()
    for col in ("hook", "layer", "train_accuracy", "heldout_accuracy", "heldout_auroc", "heldout_recall_at_1pct_fpr"):
        assert col in frame
    assert list(frame["layer"]) == [0, 1, 2, 3]
    fig = sweep.plot()
    assert len(fig.data) >= 4
    sweep.save(tmp_path / "sw")
    back = ProbeSweep.load(tmp_path / "sw")
    assert back.best_hook == sweep.best_hook and back.hooks == sweep.hooks
    assert torch.equal(back.best_probe.coef_, sweep.best_probe.coef_)
    assert back.metric("heldout_accuracy") == pytest.approx(acc)
    assert "blocks.3.hook_out" in sweep.table()
    assert sweep[3] is sweep["blocks.3.hook_resid_post"] is sweep.best_probe
    with pytest.raises(HookError, match="did you mean"):
        sweep["blocks.3.hook_outt"]


def test_sweep_matches_sklearn_loop(store):
    st, y, _ = store
    hooks = ["blocks.1.hook_out", "blocks.3.hook_out"]
    sweep = train_probes(st, hooks=hooks, cv=4, C=0.5, seed=3, progress=False)
    folds = group_folds(st.example_ids(), y, 4, seed=3)  # the folds train_probes used
    for row, hook in zip(sweep.rows, hooks):
        X = st.activations(hook).double().numpy()
        accs = []
        for f in range(4):
            tr, te = (folds != f).numpy(), (folds == f).numpy()
            sc = StandardScaler().fit(X[tr])
            clf = LogisticRegression(C=0.5, max_iter=2000).fit(sc.transform(X[tr]), y.numpy()[tr])
            accs.append(clf.score(sc.transform(X[te]), y.numpy()[te]))
        assert abs(row["heldout_accuracy"] - np.mean(accs)) <= 0.01
        sc = StandardScaler().fit(X)
        clf = LogisticRegression(C=0.5, tol=1e-8, max_iter=5000).fit(sc.transform(X), y.numpy())
        assert cos(sweep[hook].coef_standardized_, clf.coef_) > 0.99


def test_group_folds_keep_examples_together_and_stratify():
    ex = torch.arange(300).repeat_interleave(3)
    y = (torch.arange(300) % 3 == 0).long().repeat_interleave(3)
    folds = group_folds(ex, y, 5, seed=0)
    for e in range(300):
        assert folds[ex == e].unique().numel() == 1
    for f in range(5):
        frac = float(y[folds == f].float().mean())
        assert abs(frac - 1 / 3) < 0.05


def test_group_by_field_keeps_pairs_in_one_fold(tmp_path):
    from interp.errors import ConfigError
    from interp.probes.linear import example_groups

    acts, y, _ = planted(n=200, d=8, strength=(1.0,), seed=7)
    examples = [{"id": i, "label": int(y[i]), "country": f"c{i // 2}"} for i in range(200)]
    st = ActivationStore.from_tensors(tmp_path / "g", acts, examples=examples)
    groups = example_groups(st, "country")
    assert groups.unique().numel() == 100 and bool((groups[0::2] == groups[1::2]).all())
    folds = group_folds(groups, st.labels(), 5, seed=0)
    assert bool((folds[0::2] == folds[1::2]).all())
    assert torch.equal(example_groups(st, "auto"), st.example_ids())  # no pair_id: by example
    sweep = train_probes(st, cv=5, group_by="country", progress=False)
    assert sweep.config["group_by"] == "country"
    with pytest.raises(ConfigError, match="group_by"):
        train_probes(st, group_by="contry", progress=False)


def test_sweep_dataset_split_mean_positions_several_C(tmp_path):
    acts, y, v = planted(n=600, d=16, strength=(0.2, 1.5), seed=5)
    examples = [{"id": f"e{i}", "text": "t", "label": int(y[i]), "split": "test" if i % 4 == 0 else "train"}
                for i in range(600)]
    st = ActivationStore.from_tensors(tmp_path / "m", acts, examples=examples, positions="mean")
    assert st.positions == "mean"
    sweep = train_probes(st, cv=5, C=[0.01, 1.0], progress=False)
    assert sweep.config["split"] == "dataset" and sweep.config["n_test"] == 150 and sweep.config["n_fit"] == 450
    assert len(sweep.cv_results) == 4
    best = sweep.rows[1]
    assert best["test_accuracy"] > 0.8 and best["C"] in (0.01, 1.0)
    # cv=None: held-out is the dataset's test split itself
    s2 = train_probes(st, cv=None, progress=False)
    assert s2.rows[1]["heldout_accuracy"] == pytest.approx(
        s2.probes["blocks.1.hook_out"].score(st.activations(1)[st.train_test_split()[1]], y[st.train_test_split()[1]])
    )


def test_sweep_token_labels_and_multiclass(tmp_path):
    g = torch.Generator().manual_seed(6)
    n_ex, per = 200, 5
    ex = torch.arange(n_ex).repeat_interleave(per)
    tl = torch.randint(0, 2, (n_ex * per,), generator=g)
    tl[::per] = -1  # first token of each example unlabelled
    v = torch.randn(16, generator=g)
    v /= v.norm()
    X = torch.randn(n_ex * per, 16, generator=g) + 2.0 * tl.clamp_min(0)[:, None] * v
    examples = [{"id": i, "label": i % 3} for i in range(n_ex)]
    st = ActivationStore.from_tensors(tmp_path / "t", {"blocks.0.hook_out": X}, examples=examples, example_id=ex,
                                      token_label=tl, positions="all")
    sweep = train_probes(st, label="token_label", cv=3, progress=False)
    assert sweep.config["n_rows"] == n_ex * (per - 1)
    assert sweep.rows[0]["heldout_accuracy"] > 0.75
    assert cos(sweep.best_probe.coef_, v) > 0.9
    multi = train_probes(st, label="label", cv=3, progress=False)
    assert multi.classes == [0, 1, 2] and multi.best_probe.coef_.shape == (3, 16)
    assert multi.config["multiclass"] == "one-vs-rest"
    assert multi.rows[0]["heldout_accuracy"] < 0.45  # example labels unrelated to activations: chance


def test_sweep_bad_input(tmp_path, store):
    st, y, _ = store
    with pytest.raises(StoreError, match="not a field"):
        train_probes(st, label="lable", progress=False)
    with pytest.raises(HookError, match="not in store"):
        train_probes(st, hooks=["blocks.9.hook_out"], progress=False)
    one = ActivationStore.from_tensors(tmp_path / "one", {"blocks.0.hook_out": torch.randn(20, 4)}, [1] * 20)
    with pytest.raises(AnalysisError, match="single class"):
        train_probes(one, progress=False)
    for bad in (float("nan"), float("inf")):
        X = torch.randn(40, 4)
        X[7, 2] = bad
        s = ActivationStore.from_tensors(tmp_path / f"bad{bad}", {"blocks.0.hook_out": X}, [0, 1] * 20)
        with pytest.raises(AnalysisError, match="NaN or inf"):
            train_probes(s, progress=False)
    # a bad row in the test split (never trained on) is caught too, and in a float16 store
    X = torch.randn(2000, 4)
    X[1999, 0] = float("inf")
    examples = [{"id": i, "label": i % 2, "split": "test" if i >= 1500 else "train"} for i in range(2000)]
    s = ActivationStore.from_tensors(tmp_path / "badtest", {"blocks.0.hook_out": X}, examples=examples,
                                     dtype="float16")
    with pytest.raises(AnalysisError, match="hook blocks.0.hook_out: 1 row"):
        train_probes(s, progress=False)
    with pytest.raises(InterpError, match="cv"):
        train_probes(st, cv=1, progress=False)


# ----------------------------------------------------------------------------------------------- CLI and notebook


def test_cli_probe_and_report(store, tmp_path, capsys):
    from interp.cli import main
    from interp.cli.probe import sweep_report

    st, _, _ = store
    out = tmp_path / "out"
    assert main(["probe", str(st.path), "--cv", "3", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "best hook: blocks.3.hook_out" in printed and "blocks.0.hook_out" in printed
    assert (out / "sweep.json").exists() and (out / "probes.safetensors").exists()
    assert "plotly" in (out / "sweep.html").read_text()
    assert main(["probe", str(st.path), "--label", "lable", "--quiet"]) == 2
    assert "did you mean" in capsys.readouterr().err
    report = sweep_report(st, tmp_path / "demo", cv=3, progress=False)
    assert report.name == "report.html" and report.exists() and "blocks.3.hook_out" in report.read_text()


def test_notebook_runs():
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "02_probes_and_directions.ipynb", as_version=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


# ----------------------------------------------------------------------------------------------- solver preconditioners


@pytest.mark.parametrize("Cs", [[0.1, 0.1, 1.0, 1.0], [0.1, 1.0, 0.1, 1.0]])  # C in blocks (batched) or interleaved
def test_solver_preconditioners_reach_the_same_optimum(Cs):
    """Fewer rows than features (a small store): the covariance's rows (their Gram matrix's eigenvectors), the dense
    covariance and no preconditioner all reach scikit-learn's optimum, whatever the layout of the values of C."""
    from interp.probes.solver import column_stats, feature_covariance, feature_rows, fit_logistic

    g = torch.Generator().manual_seed(5)
    H, N, d = 2, 90, 120
    X = torch.randn(H, N, d, generator=g) * torch.logspace(-1, 1, d) + 1.0
    y = (X[:, :, :5].sum(-1) + torch.randn(H, N, generator=g) > 5.0).float()[0]
    P = len(Cs)
    S = torch.ones(P, N)
    S[0, :20] = 0  # one problem on fewer rows
    Y = y[None].expand(P, N).contiguous()
    mean, scale = column_stats(X, S)
    w_all = torch.ones(N)
    m0, s0 = mean[:, 1], scale[:, 1]
    Z = feature_rows(X, w_all, m0, s0)
    assert Z is not None and Z.shape == (H, N, d)
    cov = feature_covariance(X, w_all, m0, s0)
    torch.testing.assert_close(Z.transpose(1, 2) @ Z, cov, rtol=1e-4, atol=1e-4)
    kw = dict(mean=mean, scale=scale, tol=1e-6, max_iter=2000)
    fits = [fit_logistic(X, Y, S, torch.tensor(Cs), precond_rows=Z, **kw),
            fit_logistic(X, Y, S, torch.tensor(Cs), precond=cov, **kw),
            fit_logistic(X, Y, S, torch.tensor(Cs), **kw)]
    assert all(bool(f.converged.all()) for f in fits)
    for f in fits[1:]:
        assert cos(f.coef, fits[0].coef) > 0.9999
    # the same initial matrix either way: the first step (w = 0 -> -H0 g) is the same with the rows and the dense
    # covariance, and differs without a preconditioner
    first = [fit_logistic(X, Y, S, torch.tensor(Cs), warn=False, **pre, **{**kw, "max_iter": 1})
             for pre in ({"precond_rows": Z}, {"precond": cov}, {})]
    torch.testing.assert_close(first[0].coef, first[1].coef, rtol=2e-3, atol=2e-4)
    assert cos(first[0].coef, first[2].coef) < 0.99
    for h in range(H):
        for p, c in enumerate(Cs):
            rows = S[p] > 0
            Xs = ((X[h][rows] - mean[h, p]) / scale[h, p]).double().numpy()
            ref = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(Xs, y[rows].numpy())
            assert cos(fits[0].coef[h, p], ref.coef_) > 0.999


@pytest.mark.parametrize("project", [False, True])
def test_solver_standardisation_weights_and_projection_reach_sklearns_optimum(project):
    """The sweep's solver settings (memory 5, problems leaving the batch as they converge) with per-problem
    standardisation (a constant feature included), sample weights, one-vs-rest columns and an INLP projection reach
    scikit-learn's optimum: the same weights, and an objective no higher than scikit-learn's."""
    from interp.probes.solver import column_stats, effective_weights, fit_logistic

    g = torch.Generator().manual_seed(11)
    H, N, d = 2, 150, 40
    X = torch.randn(H, N, d, generator=g) * torch.logspace(-1, 0.5, d) + 2.0
    X[:, :, 7] = 3.0  # constant: scale inf, weight 0
    cls = (X[:, :, :3].sum(-1) * 4 + torch.randn(H, N, generator=g)).argsort(-1)[0] % 3  # 3 classes
    Cs = [0.05, 0.05, 0.05, 10.0, 10.0, 10.0]  # one-vs-rest columns at two values of C: they converge apart
    Y = torch.stack([(cls == k).float() for k in range(3)] * 2)  # [6, N]
    S = (0.5 + torch.rand(N, generator=g))[None].expand(6, N).clone()  # sample weights
    S[:, :15] = 0  # rows held out of every problem
    mean, scale = column_stats(X, S, constant_scale=math.inf)
    assert bool(torch.isinf(scale[..., 7]).all())
    proj = None
    if project:  # INLP's projection: two directions removed
        B = torch.linalg.qr(torch.randn(d, 2, generator=g))[0]
        proj = torch.eye(d) - B @ B.T
    res = fit_logistic(X, Y, S, torch.tensor(Cs), mean=mean, scale=scale, proj=proj, tol=1e-7, max_iter=3000, memory=5)
    assert bool(res.converged.all())
    W, b = effective_weights(res.coef, res.intercept, mean, scale, proj)
    rows = (S[0] > 0).numpy()
    for h in range(H):
        for p, c in enumerate(Cs):
            Xs = ((X[h] - mean[h, p]) / scale[h, p]).double()
            if proj is not None:
                Xs = Xs @ proj.double()
            ref = LogisticRegression(C=c, tol=1e-10, max_iter=20000).fit(
                Xs.numpy()[rows], Y[p].numpy()[rows], sample_weight=S[p].numpy()[rows]
            )
            w = res.coef[h, p].double() @ (proj.double() if proj is not None else torch.eye(d, dtype=torch.float64))
            assert cos(w, ref.coef_) > 0.9999
            torch.testing.assert_close(w, torch.from_numpy(ref.coef_[0]), rtol=0, atol=2e-3 * float(w.abs().max()))

            def objective(wv, bv):
                z = torch.from_numpy(Xs.numpy()[rows]) @ wv + bv
                yv, sv = Y[p].double()[rows], S[p].double()[rows]
                return float((sv * torch.nn.functional.softplus(z) - sv * yv * z).sum() + wv @ wv / (2 * c))

            ours = objective(w, float(res.intercept[h, p]))
            theirs = objective(torch.from_numpy(ref.coef_[0]), float(ref.intercept_[0]))
            assert ours <= theirs * (1 + 1e-6) + 1e-6
            # raw-space weights score raw activations as the standardised ones do
            raw = (X[h].double() @ W[h, p].double() + float(b[h, p]))[rows]
            torch.testing.assert_close(raw, torch.from_numpy(Xs.numpy()[rows]) @ w + float(res.intercept[h, p]),
                                       rtol=1e-4, atol=1e-3)


def test_recall_at_fpr_is_undefined_below_100_negatives():
    y = torch.tensor([0] * 99 + [1] * 50)
    s = torch.cat([torch.zeros(99), torch.ones(50)])
    assert math.isnan(recall_at_fpr(s, y, 0.01))
    y2 = torch.tensor([0] * 100 + [1] * 50)
    s2 = torch.cat([torch.zeros(100), torch.ones(50)])
    assert recall_at_fpr(s2, y2, 0.01) == 1.0
    assert recall_at_fpr(s, y, 0.1) == 1.0  # 10% needs only 10 negatives
