"""Figure 3: a truthfulness probe trained on one kind of data and tested on another.

Two captures of ``truth.jsonl``: plain statements (``The capital of Japan is Tokyo.``) and question-answer
chats (the user asks, the assistant answers truly or falsely), each read at its last token (for chats: the
answer's last token, before the end-of-turn token). A probe per layer is trained on the ``train`` rows of
one kind and scored on the ``test`` rows (held-out topics) of the same kind (in-distribution) and of the
other kind (transfer). The reported layer is chosen by 5-fold CV on the training kind's train rows only.

    python eval/transfer.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402
import probe_layers  # noqa: E402

KINDS = ("statements", "qa")


def run(progress: bool = True) -> dict[str, Any]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from interp import LinearProbe, train_probes

    timer = c.Timer()
    stores = {"statements": probe_layers.statement_store(progress), "qa": probe_layers.qa_store(progress)}
    arrays = {k: probe_layers.layer_arrays(s) for k, s in stores.items()}
    L = arrays["statements"][0].shape[0]
    result: dict[str, Any] = {"figure": "truthfulness probe transfer: statements <-> question answers",
                              "command": "python eval/transfer.py", "model": c.MODEL, "directions": {}}
    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"trained on {a}" for a in KINDS])
    for col, (src, dst) in enumerate((("statements", "qa"), ("qa", "statements")), 1):
        Xs, ys, ss, _ = arrays[src]
        Xd, yd, sd, _ = arrays[dst]
        cv = train_probes(stores[src], cv=5, seed=c.SEED, progress=progress)
        layer = int(np.nanargmax(cv.metric("heldout_auroc")))  # chosen on the source's train rows only
        curves = {"in-distribution": [], "transfer": []}
        at_layer: dict[str, Any] = {}
        tr, te_s, te_d = ss == "train", ss == "test", sd == "test"
        for lay in range(L):
            probe = LinearProbe(C=1.0).fit(Xs[lay][tr], torch.as_tensor(ys[tr]))
            s_in = np.asarray(probe.decision_function(Xs[lay][te_s]))
            s_tr = np.asarray(probe.decision_function(Xd[lay][te_d]))
            curves["in-distribution"].append(c.delong(s_in, ys[te_s]))
            curves["transfer"].append(c.delong(s_tr, yd[te_d]))
            if lay == layer:
                at_layer = {"in_distribution": c.auroc_summary(s_in, ys[te_s]),
                            "transfer": c.auroc_summary(s_tr, yd[te_d])}
        result["directions"][f"{src}->{dst}"] = {
            "layer": layer, "cv_auroc_at_layer": cv.metric("heldout_auroc")[layer], **at_layer,
            "auroc_by_layer": {k: [d["auroc"] for d in v] for k, v in curves.items()},
            "ci95_by_layer": {k: [[d["lo"], d["hi"]] for d in v] for k, v in curves.items()},
        }
        for name, colour in (("in-distribution", "#1f77b4"), ("transfer", "#d62728")):
            v = curves[name]
            auc = np.array([d["auroc"] for d in v])
            fig.add_trace(go.Scatter(
                x=list(range(L)), y=auc, name=f"{name} ({src} -> {src if name[0] == 'i' else dst})",
                line={"color": colour, "dash": "solid" if col == 1 else "dash"},
                error_y={"type": "data", "symmetric": False, "array": np.array([d["hi"] for d in v]) - auc,
                         "arrayminus": auc - np.array([d["lo"] for d in v])}), row=1, col=col)
        fig.add_vline(x=layer, line_dash="dot", row=1, col=col, annotation_text=f"CV layer {layer}")
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_yaxes(title_text="test AUROC (held-out topics), DeLong 95% CI", row=1, col=1)
    fig.update_layout(title="SmolLM2: truth probes across data kinds", height=480, width=1150)
    result["n_test"] = {k: int((a[2] == "test").sum()) for k, a in arrays.items()}
    result["wall_s"] = timer()
    c.save("transfer", result, fig)
    return result


def summary(r: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for name, d in r["directions"].items():
        out.append((f"{name} in-distribution AUROC (layer {d['layer']})", c.fmt_auc(d["in_distribution"])))
        out.append((f"{name} transfer AUROC (layer {d['layer']})", c.fmt_auc(d["transfer"])))
    return out


if __name__ == "__main__":
    for k, v in summary(run()):
        print(f"{k:48s} {v}")
