"""Layer-wise metrics match plain numpy implementations of their definitions; concept depth finds planted depths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from interp.errors import ConfigError
from interp.layers import concept_depth, layer_metrics, t_interval
from interp.store import ActivationStore


def _np_entropy(Z, alpha=1.0):
    lam = np.clip(np.linalg.eigvalsh(Z @ Z.T), 0, None)
    lam = lam / lam.sum()
    lam = lam[lam > 1e-15]
    return float(-(lam * np.log(lam)).sum()) if alpha == 1 else float(np.log((lam**alpha).sum()) / (1 - alpha))


def _np_curvature(Z):
    v = np.diff(Z, axis=0)
    angles = [np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1)) for a, b in zip(v[:-1], v[1:])]
    return float(np.mean(angles))


def _np_effective_rank(Z):
    s = np.linalg.svd(Z - Z.mean(0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.fixture
def random_store(tmp_path):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 7, 2, 6, 4]
    n, d = sum(lengths), 6
    acts = {f"blocks.{i}.hook_out": torch.randn(n, d, generator=g) * (i + 1) for i in range(3)}
    store = ActivationStore.from_tensors(
        tmp_path / "rand", acts, examples=[{"id": i} for i in range(len(lengths))],
        example_id=torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths)),
        position=torch.cat([torch.arange(k) for k in lengths]), positions="all")
    return store, acts, lengths


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_metrics_match_numpy(random_store, alpha):
    store, acts, lengths = random_store
    frame = layer_metrics(store, alpha=alpha, progress=False).frame
    for i in range(3):
        X = acts[f"blocks.{i}.hook_out"].double().numpy()
        parts = np.split(X, np.cumsum(lengths)[:-1])
        row = frame.iloc[i]
        assert row.layer == i
        np.testing.assert_allclose(row.prompt_entropy, np.mean([_np_entropy(z, alpha) for z in parts]), rtol=1e-9)
        np.testing.assert_allclose(row.dataset_entropy, _np_entropy(np.stack([z.mean(0) for z in parts]), alpha),
                                   rtol=1e-9)
        np.testing.assert_allclose(row.curvature, np.mean([_np_curvature(z) for z in parts if len(z) >= 3]), rtol=1e-9)
        np.testing.assert_allclose(row.effective_rank, _np_effective_rank(X), rtol=1e-9)
    fig = layer_metrics(store, skip_first=True, progress=False).plot()
    assert len(fig.data) == 4


def test_metrics_need_every_position(tmp_path):
    store = ActivationStore.from_tensors(tmp_path / "m", {"blocks.0.hook_out": torch.randn(4, 3)}, positions="last")
    with pytest.raises(ConfigError, match="positions='all'"):
        layer_metrics(store)


def _planted_concepts(tmp_path, n=240, d=10, n_layers=6, seed=0):
    """'easy' is linearly readable from layer 1 on, 'hard' only from layer 4 on; before that, noise."""
    g = torch.Generator().manual_seed(seed)
    easy, hard = torch.randint(2, (n,), generator=g), torch.randint(2, (n,), generator=g)
    acts = {}
    for layer in range(n_layers):
        X = torch.randn(n, d, generator=g)
        if layer >= 1:
            X[:, 0] += 4 * (2 * easy - 1)
        if layer >= 4:
            X[:, 1] += 4 * (2 * hard - 1)
        acts[f"blocks.{layer}.hook_out"] = X
    examples = [{"id": i, "easy": int(e), "hard": int(h), "half": "ab"[i % 2]} for i, (e, h) in enumerate(zip(easy, hard))]
    return ActivationStore.from_tensors(tmp_path / "concepts", acts, examples=examples, positions="last")


def test_concept_depth_finds_planted_depths(tmp_path):
    store = _planted_concepts(tmp_path)
    cd = concept_depth(store, ["easy", "hard"], fraction=0.9, cv=4, progress=False)
    f = cd.frame.set_index("concept")
    assert f.depth["easy"] == 1 and f.depth["hard"] == 4
    assert f.best_accuracy.min() > 0.95 and (cd.curve_frame.query("concept == 'hard' and layer < 4").accuracy < 0.7).all()
    by_map = concept_depth({"H": (store, "hard")}, cv=4, above_chance=True, progress=False).frame
    assert by_map.depth[0] == 4 and by_map.folds[0] == 4
    assert len(cd.plot().data) == 4
    halves = concept_depth(store, "hard", by="half", cv=3, progress=False).frame  # one concept per value of 'half'
    assert halves.concept.tolist() == ["a", "b"] and halves.depth.tolist() == [4, 4]


def test_t_interval_matches_scipy():
    from scipy import stats  # scikit-learn's dependency, in the dev extras

    v = [3, 4, 4, 5, 7]
    m, lo, hi = t_interval(v)
    half = stats.t.ppf(0.975, len(v) - 1) * np.std(v, ddof=1) / np.sqrt(len(v))
    np.testing.assert_allclose([m, lo, hi], [np.mean(v), np.mean(v) - half, np.mean(v) + half], rtol=1e-3)  # a 3-decimal table


def test_notebook_runs():
    import warnings

    import nbformat
    from nbclient import NotebookClient

    root = Path(__file__).resolve().parent.parent
    nb = nbformat.read(root / "notebooks" / "06_layers.ipynb", as_version=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors[0]
    table = next(o for c in nb.cells if "lens_kl(" in c.source for o in c.outputs if o.output_type == "execute_result")
    assert "kl_tuned" in table["data"]["text/plain"]
