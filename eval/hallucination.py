"""Figure 2: a hallucination detector on SmolLM2's own answers, against a text-only baseline.

The model answers every question of ``questions.jsonl`` (greedy, 16 new tokens, through its chat template);
each answer is graded automatically (correct when the answer or an alias occurs as a whole phrase). A
logistic probe on the residual stream of the answer's tokens (each token labelled with its answer's
grade; an answer's score is the mean of its tokens' scores) is fit on the ``train`` questions, its layer
chosen by 5-fold cross-validation on ``train`` only (folds keep an answer's tokens together), and evaluated
on the ``test`` questions. Positive class: the answer is wrong. Baseline: minus the mean log-probability the
model gave its own answer tokens (sees only the text). A second probe reads the last prompt token, before
any answer token exists.

    python eval/hallucination.py
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

FOLDS = 5


@functools.cache
def prepare(progress: bool = True) -> dict[str, Any]:
    """The graded, cached answers: questions, answers (see ``common.answer_questions``), labels and splits."""
    questions = c.rows("questions")
    ans = c.answer_questions(questions, progress=progress)
    wrong = np.array([not c.is_correct(t, q["answer"], q.get("aliases", [])) for q, t in zip(questions, ans["texts"])])
    split = np.array([q["split"] for q in questions])
    n_tok = torch.minimum(ans["n_acts"], c.content_lengths(ans)).clamp(min=1)
    return {"questions": questions, "ans": ans, "wrong": wrong.astype(int), "split": split, "n_tok": n_tok}


def token_matrix(data: dict[str, Any], idx: np.ndarray, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer-token activations at ``layer`` for the examples ``idx``, and each row's position in ``idx``."""
    acts, n_tok = data["ans"]["acts"], data["n_tok"]
    xs = [acts[i, 1 : 1 + int(n_tok[i]), layer].float() for i in idx]
    owner = torch.cat([torch.full((x.shape[0],), j) for j, x in enumerate(xs)])
    return torch.cat(xs), owner


def example_scores(probe, X: torch.Tensor, owner: torch.Tensor, n: int) -> np.ndarray:
    """Mean token score (probe logit) per example."""
    s = torch.as_tensor(np.asarray(probe.decision_function(X))).double().flatten()
    tot = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, s)
    return (tot / torch.bincount(owner, minlength=n).double()).numpy()


def cv_layers(data: dict[str, Any], features: str, progress: bool = True) -> dict[str, Any]:
    """Per-layer AUROC of out-of-fold answer scores on the train questions (5 folds, stratified)."""
    from tqdm.auto import tqdm

    from interp import LinearProbe
    from interp.probes.linear import group_folds

    tr = np.flatnonzero(data["split"] == "train")
    y = data["wrong"][tr]
    folds = group_folds(torch.arange(len(tr)), torch.as_tensor(y), FOLDS, seed=c.SEED).numpy()
    L = data["ans"]["acts"].shape[2]
    per_fold = np.zeros((L, FOLDS))
    for layer in tqdm(range(L), desc=f"CV layers ({features})", disable=not progress):
        for f in range(FOLDS):
            fit, held = tr[folds != f], tr[folds == f]
            if features == "answer":
                X, own = token_matrix(data, fit, layer)
                probe = LinearProbe(C=0.1).fit(X, torch.as_tensor(data["wrong"][fit])[own])
                Xh, oh = token_matrix(data, held, layer)
                s = example_scores(probe, Xh, oh, len(held))
            else:  # the last prompt token
                X = data["ans"]["acts"][fit, 0, layer].float()
                probe = LinearProbe(C=0.1).fit(X, torch.as_tensor(data["wrong"][fit]))
                s = np.asarray(probe.decision_function(data["ans"]["acts"][held, 0, layer].float()))
            per_fold[layer, f] = c.delong(s, data["wrong"][held])["auroc"]
    mean = per_fold.mean(1)
    ci = [c.bootstrap_ci(per_fold[l]) for l in range(L)]
    return {"per_fold": per_fold, "mean": mean, "ci": ci, "best_layer": int(np.argmax(mean))}


@functools.cache
def fit_detector(progress: bool = True) -> dict[str, Any]:
    """The answer-token probe at the CV-chosen layer, fit on every train question, as an ``interp.Detector``."""
    from interp import Detector, LinearProbe
    from interp.detectors import threshold_at_fpr
    from interp.model import model_identity

    data = prepare(progress)
    cv = cv_layers(data, "answer", progress)
    layer = cv["best_layer"]
    tr = np.flatnonzero(data["split"] == "train")
    X, own = token_matrix(data, tr, layer)
    probe = LinearProbe(C=0.1).fit(X, torch.as_tensor(data["wrong"][tr])[own])
    hook = c.hook_names()[layer]
    det = Detector.from_probe(probe, hook, model_identity(c.model()), aggregation="mean", mask="all",
                              target_fpr=0.05)
    # threshold: 5% of the train questions answered correctly score above it (out-of-sample it is only roughly 5%)
    train_scores = example_scores(probe, X, own, len(tr))
    det.threshold_ = threshold_at_fpr(torch.as_tensor(train_scores[data["wrong"][tr] == 0]), 0.05)
    det.calibration_ = {"source": "train questions answered correctly", "target_fpr": 0.05}
    return {"detector": det, "probe": probe, "layer": layer, "hook": hook, "cv": cv, "data": data}


def roc_curve(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    ys = y[order]
    tpr = np.concatenate([[0], np.cumsum(ys) / max(1, ys.sum())])
    fpr = np.concatenate([[0], np.cumsum(1 - ys) / max(1, (1 - ys).sum())])
    return fpr, tpr


def run(progress: bool = True) -> dict[str, Any]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    timer = c.Timer()
    fitted = fit_detector(progress)
    data, probe, layer = fitted["data"], fitted["probe"], fitted["layer"]
    pre = cv_layers(data, "prompt", progress)
    from interp import LinearProbe

    tr = np.flatnonzero(data["split"] == "train")
    te = np.flatnonzero(data["split"] == "test")
    y_te = data["wrong"][te]
    Xt, ot = token_matrix(data, te, layer)
    det_scores = example_scores(probe, Xt, ot, len(te))
    lp = data["ans"]["logprobs"]
    n_tok = data["n_tok"]
    baseline = np.array([-float(lp[i, : int(n_tok[i])].mean()) for i in te])
    pre_probe = LinearProbe(C=0.1).fit(data["ans"]["acts"][tr, 0, pre["best_layer"]].float(),
                                       torch.as_tensor(data["wrong"][tr]))
    pre_scores = np.asarray(pre_probe.decision_function(data["ans"]["acts"][te, 0, pre["best_layer"]].float()))
    n_right = {s: int((data["wrong"][data["split"] == s] == 0).sum()) for s in ("train", "test")}
    n_all = {s: int((data["split"] == s).sum()) for s in ("train", "test")}
    result = {
        "figure": "hallucination detector on SmolLM2's own answers",
        "command": "python eval/hallucination.py",
        "model": c.MODEL,
        "n_questions": n_all,
        "model_accuracy": {s: {"accuracy": n_right[s] / n_all[s], "wilson95": c.wilson(n_right[s], n_all[s])}
                           for s in n_all},
        "layer": layer,
        "hook": fitted["hook"],
        "cv_auroc_by_layer": {"mean": fitted["cv"]["mean"], "ci95": fitted["cv"]["ci"]},
        "detector_test": c.auroc_summary(det_scores, y_te),
        "baseline_test": c.auroc_summary(baseline, y_te),
        "detector_minus_baseline": c.delong_paired(det_scores, baseline, y_te),
        "pre_answer_layer": pre["best_layer"],
        "pre_answer_cv_auroc_by_layer": {"mean": pre["mean"], "ci95": pre["ci"]},
        "pre_answer_test": c.auroc_summary(pre_scores, y_te),
        "positive_class": "wrong answer",
        "examples": [{"question": data["questions"][i]["question"], "answer": data["questions"][i]["answer"],
                      "response": data["ans"]["texts"][i], "wrong": int(data["wrong"][i]),
                      "detector_score": float(s)} for i, s in zip(te[:12], det_scores[:12])],
    }
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "layer choice: 5-fold CV AUROC on train questions", "test questions: ROC (positive = wrong answer)"))
    L = len(fitted["cv"]["mean"])
    for name, cv, colour in (("answer tokens", fitted["cv"], "#d62728"), ("last prompt token", pre, "#1f77b4")):
        lo = [x[0] for x in cv["ci"]]
        hi = [x[1] for x in cv["ci"]]
        fig.add_trace(go.Scatter(x=list(range(L)), y=cv["mean"], name=f"probe on {name}", line={"color": colour},
                                 error_y={"type": "data", "symmetric": False,
                                          "array": np.array(hi) - cv["mean"], "arrayminus": cv["mean"] - np.array(lo)}),
                      row=1, col=1)
    for name, s, colour in ((f"detector (layer {layer})", det_scores, "#d62728"),
                            ("baseline: -mean token log-prob", baseline, "#7f7f7f"),
                            (f"pre-answer probe (layer {pre['best_layer']})", pre_scores, "#1f77b4")):
        fpr, tpr = roc_curve(s, y_te)
        d = c.delong(s, y_te)
        fig.add_trace(go.Scatter(x=fpr, y=tpr, name=f"{name}: AUROC {c.fmt_auc(d)}", line={"color": colour}),
                      row=1, col=2)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], line={"dash": "dot", "color": "#bbb"}, showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="layer", row=1, col=1)
    fig.update_yaxes(title_text="CV AUROC", row=1, col=1)
    fig.update_xaxes(title_text="false-positive rate", row=1, col=2)
    fig.update_yaxes(title_text="true-positive rate", row=1, col=2)
    fig.update_layout(title=f"SmolLM2 hallucination detector (test: {n_all['test']} questions, "
                            f"{int(y_te.sum())} wrong)", height=480, width=1150)
    result["wall_s"] = timer()
    c.save("hallucination", result, fig)
    fitted["detector"].save(c.out_dir() / "hallucination_detector")
    return result


def summary(r: dict[str, Any]) -> list[tuple[str, str]]:
    acc = r["model_accuracy"]["test"]
    return [
        ("model accuracy (test)", f"{acc['accuracy']:.3f} [{acc['wilson95'][0]:.3f}, {acc['wilson95'][1]:.3f}]"),
        (f"hallucination detector AUROC (layer {r['layer']})", c.fmt_auc(r["detector_test"])),
        ("text baseline AUROC (-mean log-prob)", c.fmt_auc(r["baseline_test"])),
        (f"pre-answer probe AUROC (layer {r['pre_answer_layer']})", c.fmt_auc(r["pre_answer_test"])),
    ]


if __name__ == "__main__":
    res = run()
    for k, v in summary(res):
        print(f"{k:48s} {v}")
    print(f"recall at 1% FPR: {res['detector_test']['recall_at_1pct_fpr'] or 'undefined (<100 negatives)'}")
