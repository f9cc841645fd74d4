"""Figure 1: where SmolLM2 represents the truth of a statement — a probe per layer and the concept depth.

Every true/false statement of ``truth.jsonl`` (``kind == "statement"``) is captured at its last token, every
layer's residual stream (``interp.capture``). A logistic probe per layer is cross-validated on the ``train``
statements (5 folds, both statements of a pair in one fold, repeated with 2 seeds: 10 fold curves) and the
final probes (``interp.train_probes``, fit on all train statements) are scored on the ``test`` statements,
whose topics are held out of training. Concept depth: the shallowest layer whose CV accuracy reaches 95% of
the best layer's; its CI comes from resampling the fold curves.

    python eval/probe_layers.py
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

FOLDS, REPEATS, FRACTION = 5, 2, 0.95
QA_TRAIN_PAIRS = 120


@functools.cache
def statement_store(progress: bool = True):
    """Last-token activations of every truth statement (every layer), cached."""
    rows = [r for r in c.rows("truth") if r.get("kind", "statement") == "statement"]
    meta = [{"label": r["label"], "split": r["split"], "pair_id": r["pair_id"], "topic": r["topic"]} for r in rows]
    return c.capture_last("statements", [r["text"] for r in rows], meta, progress)


@functools.cache
def qa_store(progress: bool = True):
    """Activations at the last answer token of every question-answer chat of ``truth.jsonl``, cached."""
    rows = [r for r in c.rows("truth") if r.get("kind") == "qa"]
    # every test chat, and QA_TRAIN_PAIRS seeded train pairs (a chat costs ~5 statements' compute)
    train_pairs = sorted({r["pair_id"] for r in rows if r["split"] == "train"})
    keep = set(np.random.default_rng(c.SEED).permutation(train_pairs)[:QA_TRAIN_PAIRS].tolist())
    rows = [r for r in rows if r["split"] == "test" or r["pair_id"] in keep]
    meta = [{"label": r["label"], "split": r["split"], "pair_id": r["pair_id"], "topic": r["topic"]} for r in rows]
    return c.capture_last("qa", [c.chat_with_answer(r["messages"]) for r in rows], meta, progress)


def layer_arrays(store) -> tuple[torch.Tensor, np.ndarray, np.ndarray, list[str]]:
    """All layers' activations ``[layers, n, d]``, labels, splits and pair ids of a last-token store."""
    X = torch.stack([store.activations(h).float() for h in store.hooks])
    ex = store.examples()
    return X, np.array([e["label"] for e in ex]), np.array([e["split"] for e in ex]), [e["pair_id"] for e in ex]


def depth(curve: np.ndarray, fraction: float = FRACTION, chance: float = 0.0) -> int:
    """The shallowest layer whose value reaches ``fraction`` of the curve's best; with ``chance``, of the
    best's margin over chance (``curve - chance >= fraction * (best - chance)``)."""
    return int(np.flatnonzero(curve - chance >= fraction * (np.nanmax(curve) - chance))[0])


def fold_curves(X: torch.Tensor, y: np.ndarray, groups: list[str], progress: bool = True) -> np.ndarray:
    """Held-out accuracy per (fold curve, layer): ``[REPEATS * FOLDS, layers]``."""
    from tqdm.auto import tqdm

    from interp import LinearProbe
    from interp.probes.linear import group_folds

    ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    g = torch.tensor([ids[x] for x in groups])
    yt = torch.as_tensor(y)
    out = np.zeros((REPEATS * FOLDS, X.shape[0]))
    bar = tqdm(total=REPEATS * FOLDS * X.shape[0], desc="CV probes", disable=not progress)
    for r in range(REPEATS):
        fold = group_folds(g, yt, FOLDS, seed=r).numpy()
        for f in range(FOLDS):
            fit, held = fold != f, fold == f
            for layer in range(X.shape[0]):
                probe = LinearProbe(C=1.0).fit(X[layer][fit], yt[fit])
                out[r * FOLDS + f, layer] = probe.score(X[layer][held], yt[held])
                bar.update()
    bar.close()
    return out


def run(progress: bool = True) -> dict[str, Any]:
    import plotly.graph_objects as go

    from interp import train_probes

    timer = c.Timer()
    store = statement_store(progress)
    X, y, split, pairs = layer_arrays(store)
    tr = split == "train"
    curves = fold_curves(X[:, tr], y[tr], [p for p, t in zip(pairs, tr) if t], progress)
    mean = curves.mean(0)
    rng = np.random.default_rng(c.SEED)
    boots = [curves[rng.integers(0, len(curves), len(curves))].mean(0) for _ in range(c.N_BOOT)]
    boot_depths = np.array([depth(b) for b in boots])
    band = np.percentile(np.stack(boots), [2.5, 97.5], axis=0)
    sweep = train_probes(store, cv=FOLDS, seed=c.SEED, progress=progress)
    n_test = int((~tr).sum())
    test_acc = np.array(sweep.metric("test_accuracy"))
    test_ci = [c.wilson(round(a * n_test), n_test) for a in test_acc]
    d = depth(mean)
    best = int(np.argmax(mean))
    L = X.shape[0]
    result = {
        "figure": "probe layer sweep on SmolLM2: truth of statements",
        "command": "python eval/probe_layers.py",
        "model": c.MODEL,
        "n_train": int(tr.sum()), "n_test": n_test, "test_topics_held_out": sorted(
            {e["topic"] for e in store.examples() if e["split"] == "test"}),
        "cv_accuracy": {"mean": mean, "ci95_lo": band[0], "ci95_hi": band[1], "fold_curves": curves},
        "interp_train_probes_heldout_accuracy": sweep.metric("heldout_accuracy"),
        "test_accuracy": {"value": test_acc, "wilson95": test_ci},
        "test_auroc": sweep.metric("test_auroc"),
        "best_layer": best, "best_cv_accuracy": float(mean[best]),
        "concept_depth": {"layer": d, "ci95": [int(np.percentile(boot_depths, 2.5)),
                                               int(np.percentile(boot_depths, 97.5))],
                          "per_fold": [depth(cv) for cv in curves], "fraction_of_best": FRACTION},
        "concept_depth_above_chance": {
            "layer": depth(mean, chance=0.5),
            "ci95": [int(np.percentile([depth(b, chance=0.5) for b in boots], q)) for q in (2.5, 97.5)],
            "definition": "shallowest layer with accuracy - 0.5 >= 0.95 * (best - 0.5)"},
        "test_accuracy_at_depth": {"value": float(test_acc[d]), "wilson95": test_ci[d]},
        "test_accuracy_at_best": {"value": float(test_acc[best]), "wilson95": test_ci[best]},
    }
    xs = list(range(L))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=xs + xs[::-1], y=list(band[1]) + list(band[0][::-1]), fill="toself",
                             fillcolor="rgba(214,39,40,0.2)", line={"width": 0}, name="CV 95% CI (folds resampled)"))
    fig.add_trace(go.Scatter(x=xs, y=mean, name="CV accuracy (train topics, 10 folds)", line={"color": "#d62728"}))
    fig.add_trace(go.Scatter(x=xs, y=test_acc, name="test accuracy (held-out topics), Wilson 95%",
                             line={"color": "#1f77b4"},
                             error_y={"type": "data", "symmetric": False,
                                      "array": [hi - a for a, (_, hi) in zip(test_acc, test_ci)],
                                      "arrayminus": [a - lo for a, (lo, _) in zip(test_acc, test_ci)]}))
    lo_d, hi_d = result["concept_depth"]["ci95"]
    fig.add_vrect(x0=lo_d - 0.5, x1=hi_d + 0.5, fillcolor="rgba(0,0,0,0.08)", line_width=0)
    fig.add_vline(x=d, line_dash="dash", annotation_text=f"concept depth {d} [{lo_d}, {hi_d}]")
    fig.add_hline(y=0.5, line_dash="dot", line_color="#999")
    fig.update_layout(title="SmolLM2-135M-Instruct: is the statement true? (last token, residual stream)",
                      xaxis_title="layer", yaxis_title="accuracy", height=480, width=900)
    result["wall_s"] = timer()
    c.save("probe_layers", result, fig)
    return result


def summary(r: dict[str, Any]) -> list[tuple[str, str]]:
    cd = r["concept_depth"]
    t = r["test_accuracy_at_best"]
    ca = r["concept_depth_above_chance"]
    return [
        ("truth probe: concept depth (layer)", f"{cd['layer']} [{cd['ci95'][0]}, {cd['ci95'][1]}]"),
        ("truth probe: concept depth above chance", f"{ca['layer']} [{ca['ci95'][0]}, {ca['ci95'][1]}]"),
        (f"truth probe: best CV accuracy (layer {r['best_layer']})", f"{r['best_cv_accuracy']:.3f}"),
        (f"truth probe: test accuracy at layer {r['best_layer']}",
         f"{t['value']:.3f} [{t['wilson95'][0]:.3f}, {t['wilson95'][1]:.3f}]"),
    ]


if __name__ == "__main__":
    for k, v in summary(run()):
        print(f"{k:48s} {v}")
