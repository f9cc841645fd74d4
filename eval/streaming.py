"""Figure 5: the hallucination detector monitoring SmolLM2's generations token by token.

The detector of figure 2 (``hallucination.py``: a probe at the CV-chosen layer, scores averaged over the
answer's tokens) scores each answer token as it is generated. Early warning: the test AUROC of the mean
score of the first k answer tokens, for k = 1..16, against the same text-only baseline (minus the mean
log-probability of the first k tokens). The per-token picture: ``Detector.monitor`` run live on test
questions (greedy), checked against the scores computed from the answer pass (same tokens, same scores).

    python eval/streaming.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402
import hallucination  # noqa: E402
from interp.reports import write_html  # noqa: E402

N_MONITORED = 8


def run(progress: bool = True) -> dict[str, Any]:
    import plotly.graph_objects as go

    from interp.plots import token_heatmap

    timer = c.Timer()
    fitted = hallucination.fit_detector(progress)
    det, data, layer = fitted["detector"], fitted["data"], fitted["layer"]
    te = np.flatnonzero(data["split"] == "test")
    y = data["wrong"][te]
    acts, lp, n_tok = data["ans"]["acts"], data["ans"]["logprobs"], data["n_tok"]
    tok_scores = [det.token_scores(acts[i, 1 : 1 + int(n_tok[i]), layer].float()) for i in te]
    tok_lp = [lp[i, : int(n_tok[i])] for i in te]
    K = int(max(len(s) for s in tok_scores))
    curve = []
    for k in range(1, K + 1):
        d = c.delong([float(s[:k].mean()) for s in tok_scores], y)
        b = c.delong([-float(v[:k].mean()) for v in tok_lp], y)
        reached = int(sum(len(s) >= k for s in tok_scores))
        curve.append({"k": k, "detector": d, "baseline": b, "answers_with_k_tokens": reached})
    # live monitoring of a few test questions: wrong and right answers alternately
    wrong_idx = [int(i) for i in te[y == 1][: N_MONITORED // 2]]
    right_idx = [int(i) for i in te[y == 0][: N_MONITORED // 2]]
    picked = [i for pair in zip(wrong_idx, right_idx) for i in pair]
    monitored, max_diff, same_tokens = [], 0.0, 0
    for i in picked:
        mon = det.monitor(c.model(), data["ans"]["prompts"][i], max_new_tokens=16)
        n = int(n_tok[i])
        cached = det.token_scores(acts[i, 1 : 1 + n, layer].float())
        ids = data["ans"]["token_ids"][i, : len(mon.token_ids)]
        same = bool(torch.equal(ids, mon.token_ids))
        same_tokens += same
        if same:
            max_diff = max(max_diff, float((mon.scores[:n] - cached).abs().max()))
        monitored.append({"question": data["questions"][i]["question"], "expected": data["questions"][i]["answer"],
                          "response": mon.text, "wrong": int(data["wrong"][i]), "tokens": mon.tokens,
                          "scores": mon.scores.tolist(), "aggregate": mon.aggregate})
    result = {
        "figure": "streaming hallucination detection on SmolLM2 (early warning)",
        "command": "python eval/streaming.py", "model": c.MODEL, "layer": layer, "hook": fitted["hook"],
        "threshold": det.threshold_, "n_test": int(len(te)), "n_wrong": int(y.sum()),
        "auroc_by_tokens_seen": curve,
        "monitor_check": {"monitored": len(picked), "same_tokens_as_batched_pass": same_tokens,
                          "max_abs_score_diff": max_diff},
        "monitored": monitored,
    }
    ks = [p["k"] for p in curve]
    fig = go.Figure()
    for key, name, colour in (("detector", f"detector (layer {layer}): mean of first k token scores", "#d62728"),
                              ("baseline", "baseline: -mean log-prob of first k tokens", "#7f7f7f")):
        v = np.array([p[key]["auroc"] for p in curve])
        fig.add_trace(go.Scatter(x=ks, y=v, name=name, line={"color": colour},
                                 error_y={"type": "data", "symmetric": False,
                                          "array": np.array([p[key]["hi"] for p in curve]) - v,
                                          "arrayminus": v - np.array([p[key]["lo"] for p in curve])}))
    fig.add_hline(y=0.5, line_dash="dot", line_color="#999")
    fig.update_layout(title=f"early warning: test AUROC after k answer tokens ({len(te)} questions, "
                            f"{int(y.sum())} wrong; DeLong 95% CI)", xaxis_title="answer tokens seen (k)",
                      yaxis_title="AUROC (positive = wrong answer)", height=450, width=900)
    heat = token_heatmap([m["tokens"] for m in monitored], [m["scores"] for m in monitored],
                         threshold=det.threshold_, width=16,
                         row_labels=[("WRONG " if m["wrong"] else "right ") + m["question"][:40] for m in monitored],
                         title=f"Detector.monitor on test questions (layer {layer}; red: above the threshold)")
    result["wall_s"] = timer()
    c.save("streaming", result, fig)
    write_html(c.out_dir() / "streaming_tokens.html", heat)
    return result


def summary(r: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    curve = r["auroc_by_tokens_seen"]
    for k in (1, 2, 4, len(curve)):
        if k <= len(curve):
            p = curve[k - 1]
            out.append((f"streaming AUROC after {k} tokens: detector | baseline",
                        f"{c.fmt_auc(p['detector'])} | {c.fmt_auc(p['baseline'])}"))
    mc = r["monitor_check"]
    out.append(("monitor vs batched pass: same tokens, max |diff|",
                f"{mc['same_tokens_as_batched_pass']}/{mc['monitored']}, {mc['max_abs_score_diff']:.2e}"))
    return out


if __name__ == "__main__":
    for k, v in summary(run()):
        print(f"{k:48s} {v}")
