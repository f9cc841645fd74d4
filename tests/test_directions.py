"""Directions: diff-in-means, PCA on paired differences and probe weights recover a planted direction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from interp.directions import Direction, diff_in_means, diff_in_means_tensor, pca_direction, pca_direction_tensor
from interp.errors import AnalysisError, ConfigError, HookError, InterpError
from interp.probes import train_probes
from interp.store import ActivationStore

D = 32


def make_store(path, n_pairs=400, strength=1.0, seed=0, dtype="float32"):
    """Pairs of examples (pair_id) sharing a base vector; the positive member is shifted along a planted v.

    Large per-pair variation plus a strong common offset, so that only the contrast reveals v.
    """
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(D, generator=g)
    v /= v.norm()
    base = 3.0 * torch.randn(n_pairs, D, generator=g) + 5.0
    rows, examples = [], []
    for i in range(n_pairs):
        order = [0, 1] if bool(torch.rand(1, generator=g) < 0.5) else [1, 0]
        for lab in order:
            rows.append(base[i] + lab * strength * v + 0.5 * torch.randn(D, generator=g))
            split = "test" if i % 5 == 0 else "train"
            examples.append({"id": f"{i}-{lab}", "label": lab, "pair_id": f"p{i}", "split": split})
    X = torch.stack(rows)
    store = ActivationStore.from_tensors(path, {"blocks.2.hook_out": X, "blocks.5.hook_out": X.flip(1)},
                                         examples=examples, dtype=dtype)
    return store, v


@pytest.fixture
def paired(tmp_path):
    return make_store(tmp_path / "s")


def test_diff_in_means_recovers_planted_direction(paired):
    store, v = paired
    d = diff_in_means(store, "blocks.2.hook_resid_post")  # alias accepted
    assert d.hook == "blocks.2.hook_out" and d.layer == 2 and d.method == "diff_in_means"
    assert d.cosine(v) > 0.95
    assert float(d.vector.norm()) == pytest.approx(1.0, abs=1e-6) and d.vector.dtype == torch.float32
    assert d.norm == pytest.approx(1.0, abs=0.15)  # the planted shift has length 1
    X, y = store.activations(2), store.labels()
    raw = diff_in_means_tensor(X, y)
    assert torch.allclose(raw / raw.norm(), d.vector, atol=1e-5)
    assert d.stats["mean_pos"] > d.stats["mean_neg"] and d.stats["act_norm_mean"] > 0
    assert d.provenance["store"] == str(store.path) and d.provenance["label"] == "label"


def test_pca_direction_paired_and_random(paired):
    store, v = paired
    paired_dir = pca_direction(store, 2)  # pair_id found automatically
    assert paired_dir.cosine(v) > 0.95 and "pair_id" in paired_dir.provenance["pairing"]
    assert paired_dir.provenance["n_pairs"] == 400
    # the sign puts positives on the high side
    assert paired_dir.stats["mean_pos"] > paired_dir.stats["mean_neg"]
    # pairs by another field: same as pair_id here
    assert pca_direction(store, 2, pair_by="pair_id").cosine(paired_dir) > 0.999
    # the plain tensor recipe on exact differences
    diffs = torch.outer(torch.rand(50) + 0.5, v) + 0.05 * torch.randn(50, D)
    assert float(pca_direction_tensor(diffs) @ v) > 0.99


def test_pca_on_random_pairs_finds_the_axis(tmp_path):
    store, v = planted_store(tmp_path / "r")
    d = pca_direction(store, 2, pair_by=None, seed=1)
    assert d.cosine(v) > 0.95 and d.provenance["pairing"] == "random pairs"


def planted_store(path, n=2000, seed=3, scale=0.3, shift=3.0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(D, generator=g)
    v /= v.norm()
    y = torch.randint(0, 2, (n,), generator=g)
    X = torch.randn(n, D, generator=g) * scale + y[:, None] * shift * v
    return ActivationStore.from_tensors(path, {"blocks.2.hook_out": X}, y.tolist()), v


def test_direction_from_probe_and_as_classifier(tmp_path):
    store, v = planted_store(tmp_path / "p", scale=1.0, shift=1.0)
    sweep = train_probes(store, cv=3, C=0.1, progress=False)
    d = Direction.from_probe(sweep.best_probe)
    assert d.hook == "blocks.2.hook_out" and d.method == "probe"
    assert d.cosine(v) > 0.95
    proj = d.scores(store)
    y = store.labels()
    assert d.auroc(store) == pytest.approx(roc_auc_score(y.numpy(), proj.numpy()), abs=1e-9)
    m = d.metrics(store)
    assert set(m) == {"accuracy", "auroc", "recall_at_1pct_fpr"} and m["auroc"] == pytest.approx(d.auroc(store))
    # the decision threshold along the unit vector reproduces the probe's predictions
    pred = (proj > d.stats["threshold"]).long()
    assert (pred == torch.as_tensor(sweep.best_probe.predict(store.activations(2)))).float().mean() > 0.999
    with pytest.raises(ConfigError, match="hook"):
        from interp.probes import LinearProbe

        Direction.from_probe(LinearProbe().fit(torch.randn(20, D), [0, 1] * 10))


def test_direction_save_load_project(paired, tmp_path):
    store, v = paired
    d = diff_in_means(store, 2)
    d.save(tmp_path / "dir")
    meta = json.loads((tmp_path / "dir" / "direction.json").read_text())
    assert meta["format"] == "interp.direction" and meta["hook"] == "blocks.2.hook_out" and meta["layer"] == 2
    back = Direction.load(tmp_path / "dir")
    assert torch.equal(back.vector, d.vector) and back.stats == pytest.approx(d.stats) and back.norm == d.norm
    acts = torch.randn(3, 7, D, dtype=torch.float16)
    p = back.project(acts)
    assert p.shape == (3, 7) and p.dtype == torch.float32
    assert torch.allclose(p, acts.float() @ d.vector, atol=1e-5)
    with pytest.raises(InterpError, match="not a saved direction"):
        Direction.load(tmp_path)
    with pytest.raises(AnalysisError, match="d_model"):
        d.project(torch.randn(4, D + 1))
    fig = d.plot(store)
    assert len(fig.data) == 2


def test_direction_bad_input(paired, tmp_path):
    store, _ = paired
    with pytest.raises(HookError, match="not in store"):
        diff_in_means(store, "blocks.7.hook_out")
    with pytest.raises(InterpError, match="not a field"):
        diff_in_means(store, 2, label="colour")
    one = ActivationStore.from_tensors(tmp_path / "one", {"blocks.0.hook_out": torch.randn(10, 4)}, [0] * 10)
    with pytest.raises(AnalysisError, match="single class"):
        diff_in_means(one, 0)
    X = torch.randn(10, 4)
    X[2, 0] = float("inf")
    bad = ActivationStore.from_tensors(tmp_path / "bad", {"blocks.0.hook_out": X}, [0, 1] * 5)
    with pytest.raises(AnalysisError, match="NaN or inf"):
        diff_in_means(bad, 0)
    multi = ActivationStore.from_tensors(tmp_path / "m", {"blocks.0.hook_out": torch.randn(30, 4)}, [0, 1, 2] * 10)
    with pytest.raises(AnalysisError, match="positive="):
        diff_in_means(multi, 0)
    assert diff_in_means(multi, 0, positive=2).provenance["positive"] == 2
    with pytest.raises(AnalysisError, match="zero"):
        Direction(torch.zeros(4), "blocks.0.hook_out")


def test_float16_store_matches_float32(tmp_path):
    s32, v = make_store(tmp_path / "a", n_pairs=100, seed=4)
    s16, _ = make_store(tmp_path / "b", n_pairs=100, seed=4, dtype="float16")
    assert diff_in_means(s16, 2).cosine(diff_in_means(s32, 2)) > 0.999
    assert np.isfinite(diff_in_means(s16, 2).auroc(s16))


# ----------------------------------------------------------------------------------------------- constant features


def constant_columns_store(path, n=3000, d=24, seed=0):
    """float32 activations of scale ~0.3 with a planted direction ``v`` over the varying features, plus three
    numerically constant features as a real residual stream has them (issue 11, MiniLM layer 5): exactly 0,
    1e-32 jitter, and a mean of -1e-7 with float32-rounding jitter of std 1e-9 that leans with the label."""
    g = torch.Generator().manual_seed(seed)
    const = [3, 11, 19]
    live = [j for j in range(d) if j not in const]
    v = torch.zeros(d)
    v[live] = torch.randn(len(live), generator=g)
    v /= v.norm()
    y = torch.randint(0, 2, (n,), generator=g)
    X = 0.3 * torch.randn(n, d, generator=g) + 0.3 * (2 * y[:, None].float() - 1) * v + 0.1
    X[:, const[0]] = 0.0
    X[:, const[1]] = 1e-32 * torch.randn(n, generator=g)
    X[:, const[2]] = -1e-7 + 1e-9 * (torch.randn(n, generator=g) + 0.8 * (2 * y.float() - 1))
    store = ActivationStore.from_tensors(path, {"blocks.5.hook_out": X}, y.tolist(), dtype="float32")
    return store, v, const


def test_probe_direction_ignores_numerically_constant_features(tmp_path):
    """Issue 11: a feature of std 1e-9 passed the old near-constant test, was standardised into a unit
    feature, got a coefficient ~1e8 in raw space, and the probe's direction became that basis vector."""
    store, v, const = constant_columns_store(tmp_path / "s")
    sweep = train_probes(store, cv=3, C=1.0, progress=False)
    probe = sweep.best_probe
    d = Direction.from_probe(probe)
    assert d.cosine(v) > 0.99
    assert d.cosine(diff_in_means(store, "blocks.5.hook_out")) > 0.95
    assert torch.isinf(probe.scale_[const]).all()
    assert bool((probe.coef_[0, const] == 0).all()) and bool((probe.coef_standardized_[0, const] == 0).all())
    # the single-matrix estimator standardises the same way
    from interp.probes import LinearProbe

    X, y = store.activations("blocks.5.hook_out"), store.labels()
    p = LinearProbe(C=1.0).fit(X, y)
    assert bool((p.coef_[0, const] == 0).all()) and cos_t(p.coef_[0], v) > 0.99
    assert p.score(X, y) == pytest.approx(probe.score(X, y), abs=0.01)


def cos_t(a, b) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


def test_probe_direction_on_a_float32_minilm_capture(minilm, tmp_path):
    """The issue's own case: MiniLM layer 5, mean-pooled capitals statements, float32. Three features there
    are constant (std 0, 0 and 1.3e-9); the probe must give them weight 0, and its direction must agree with
    diff-in-means far better than a basis vector does (cosine 2e-8 before the fix)."""
    from interp.capture import capture

    store = capture(minilm, "capitals", hooks="resid_post", layers=[5], positions="mean", dtype="float32",
                    out=tmp_path / "caps", progress=False)
    hook = store.hooks[0]
    X = store.activations(hook).double()
    flat = torch.nonzero(X.std(0) < 1e-6 * X.pow(2).mean().sqrt()).flatten()
    assert flat.numel() >= 1  # the model's constant features are there to be ignored
    probe = train_probes(store, hooks=hook, cv=5, C=1.0, progress=False).best_probe
    d = Direction.from_probe(probe)
    assert d.cosine(diff_in_means(store, hook)) > 0.2
    assert float(probe.coef_.abs().max()) < 1e3
    assert bool((probe.coef_[0, flat] == 0).all())
