"""Plotly figures. Functions take plain tensors, arrays and frames and return ``plotly.graph_objects.Figure``.

Results' ``.plot()`` methods import this module lazily, so analyses never depend on plotly at import time.
"""

from __future__ import annotations

import plotly.graph_objects as go  # noqa: F401

# ---------------------------------------------------------------------------------------------- SAEs (interp.sae)


def sae_comparison(table, title: str = "probes vs SAE latents") -> go.Figure:
    """Held-out accuracy and AUROC per method (a ``SAEComparison.table``: method, accuracy, auroc, ...)."""
    methods = list(table["method"])
    fig = go.Figure()
    for metric, color in (("accuracy", "#4c78a8"), ("auroc", "#f58518")):
        values = [float(v) for v in table[metric]]
        fig.add_trace(
            go.Bar(
                x=methods,
                y=values,
                name=metric.upper() if metric == "auroc" else metric,
                marker_color=color,
                text=[f"{v:.3f}" for v in values],
                textposition="outside",
            )
        )
    low = min([0.5] + [float(v) for m in ("accuracy", "auroc") for v in table[m]])
    fig.update_layout(
        title=title,
        barmode="group",
        yaxis=dict(title="held-out score", range=[max(0.0, low - 0.05), 1.05]),
        xaxis=dict(title="method"),
        template="plotly_white",
        legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"),
    )
    return fig


def sae_feature_density(firing_frequency, title: str = "latent firing frequency") -> go.Figure:
    """Histogram of log10 firing frequency per latent; latents that never fired are counted in the title."""
    import numpy as np

    freq = np.asarray(firing_frequency, dtype=np.float64).reshape(-1)
    alive = freq[freq > 0]
    fig = go.Figure(go.Histogram(x=np.log10(alive), nbinsx=50, marker_color="#4c78a8"))
    fig.update_layout(
        title=f"{title}: {int((freq == 0).sum())} of {freq.size} latents never fired",
        xaxis=dict(title="log10(fraction of rows the latent fires on)"),
        yaxis=dict(title="latents"),
        template="plotly_white",
    )
    return fig


def sae_training_curve(history, title: str = "SAE training") -> go.Figure:
    """Normalised MSE (FVU) and dead latents against step, from ``train_topk_sae``'s history."""
    steps = [h["step"] for h in history]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=steps, y=[h["fvu"] for h in history], name="1 - FVE (normalised MSE)"))
    fig.add_trace(go.Scatter(x=steps, y=[h["n_dead"] for h in history], name="dead latents", yaxis="y2"))
    fig.update_layout(
        title=title,
        xaxis=dict(title="step"),
        yaxis=dict(title="normalised MSE", type="log"),
        yaxis2=dict(title="dead latents", overlaying="y", side="right", rangemode="tozero"),
        template="plotly_white",
    )
    return fig


# ---------------------------------------------------------------------------------------------- detectors (interp.detectors)


def token_heatmap(
    tokens,
    scores,
    threshold: float | None = None,
    masks=None,
    row_labels=None,
    width: int = 16,
    title: str = "token scores",
) -> go.Figure:
    """Token scores as a heatmap that reads like text: each text wrapped into lines of ``width`` tokens.

    ``tokens``: one list of token strings per text (or a single list); ``scores``: matching per-token scores.
    The colour scale is diverging and centred on ``threshold`` (red above, blue below; 0 when None). Tokens
    outside ``masks`` (when given) are drawn faded with their score in the hover text only.
    """
    import numpy as np

    if tokens and isinstance(tokens[0], str):
        tokens, scores = [tokens], [scores]
        masks = None if masks is None else [masks]
    width = max(1, int(width))
    z_rows, text_rows, hover_rows, y_labels = [], [], [], []
    for t, (toks, sc) in enumerate(zip(tokens, scores)):
        sc = np.asarray(sc.tolist() if hasattr(sc, "tolist") else sc, dtype=np.float64).reshape(-1)
        mk = np.ones(len(toks), dtype=bool) if masks is None else np.asarray(
            masks[t].tolist() if hasattr(masks[t], "tolist") else masks[t], dtype=bool
        )
        label = row_labels[t] if row_labels is not None else f"text {t}"
        for line, start in enumerate(range(0, max(1, len(toks)), width)):
            z = np.full(width, np.nan)
            txt, hov = [""] * width, [""] * width
            for j, p in enumerate(range(start, min(start + width, len(toks)))):
                shown = toks[p].replace("\n", "\\n")
                z[j] = sc[p] if mk[p] else np.nan
                txt[j] = shown
                hov[j] = f"token {p}: {shown!r}<br>score {sc[p]:+.4f}" + ("" if mk[p] else " (not in mask)")
            z_rows.append(z)
            text_rows.append(txt)
            hover_rows.append(hov)
            y_labels.append(label if line == 0 else f"{label} ·{line}")
    z_all = np.array(z_rows) if z_rows else np.zeros((0, width))
    finite = z_all[np.isfinite(z_all)]
    centre = 0.0 if threshold is None else float(threshold)
    span = float(np.max(np.abs(finite - centre))) if finite.size else 1.0
    span = span if span > 0 else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z_all,
            text=text_rows,
            customdata=hover_rows,
            texttemplate="%{text}",
            hovertemplate="%{customdata}<extra></extra>",
            colorscale="RdBu_r",
            zmin=centre - span,
            zmax=centre + span,
            zmid=centre,
            colorbar=dict(title="score" if threshold is None else f"score (threshold {threshold:+.2f})"),
            xgap=1,
            ygap=1,
        )
    )
    fig.update_layout(
        title=title,
        template="plotly_white",
        height=max(200, 40 * len(y_labels) + 120),
        xaxis=dict(showticklabels=False, showgrid=False),
        yaxis=dict(
            tickmode="array",
            tickvals=list(range(len(y_labels))),
            ticktext=y_labels,
            autorange="reversed",
            showgrid=False,
        ),
    )
    return fig


# ------------------------------------------------------------------------------------- steering (interp.steering)


def steering_curve(table, metrics=None, title: str = "steering sweep") -> go.Figure:
    """Each metric's mean over prompts against alpha, with standard-error bars and every prompt's value as a
    faint point (a ``SweepResult.table``: alpha, prompt, text, one column per metric; hover shows the text)."""
    import numpy as np

    if metrics is None:
        metrics = [c for c in table.columns if c not in ("alpha", "prompt", "text")]
    palette = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2"]
    fig = go.Figure()
    for k, name in enumerate(metrics):
        color = palette[k % len(palette)]
        axis = "y" if k == 0 else f"y{k + 1}"
        fig.add_trace(go.Scatter(
            x=table["alpha"], y=table[name], mode="markers", name=f"{name} (per prompt)", yaxis=axis,
            marker=dict(color=color, opacity=0.3, size=6), showlegend=False,
            hovertext=[f"{p!r} → {t[:80]!r}" for p, t in zip(table["prompt"], table["text"])], hoverinfo="x+y+text",
        ))
        g = table.groupby("alpha")[name]
        mean, sem = g.mean(), g.sem().fillna(0.0)
        fig.add_trace(go.Scatter(
            x=list(mean.index), y=mean.values, mode="lines+markers", name=name, yaxis=axis,
            line=dict(color=color), error_y=dict(type="data", array=np.asarray(sem.values), visible=True),
        ))
    layout = dict(title=title, xaxis=dict(title="alpha"), yaxis=dict(title=metrics[0] if metrics else ""),
                  template="plotly_white", legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    for k, name in enumerate(metrics[1:], start=2):
        layout[f"yaxis{k}"] = dict(title=name, overlaying="y", side="right", showgrid=False)
    fig.update_layout(**layout)
    return fig


def steering_comparison(table, metrics=None, scale: float = 1.0, title: str = "steering comparison") -> go.Figure:
    """One panel per metric: each method's mean over prompts against alpha, with standard-error bars (a
    ``SteeringComparison.table``: method, alpha, alpha_raw, prompt, text, one column per metric)."""
    import numpy as np
    from plotly.subplots import make_subplots

    if metrics is None:
        metrics = [c for c in table.columns if c not in ("method", "alpha", "alpha_raw", "prompt", "text")]
    palette = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2"]
    fig = make_subplots(rows=1, cols=max(1, len(metrics)), subplot_titles=list(metrics))
    for k, method in enumerate(dict.fromkeys(table["method"])):
        part = table[table["method"] == method]
        color = palette[k % len(palette)]
        for col, name in enumerate(metrics, start=1):
            g = part.groupby("alpha")[name]
            mean, sem = g.mean(), g.sem().fillna(0.0)
            fig.add_trace(go.Scatter(
                x=list(mean.index), y=mean.values, mode="lines+markers", name=method, legendgroup=method,
                showlegend=col == 1, line=dict(color=color),
                error_y=dict(type="data", array=np.asarray(sem.values), visible=True),
            ), row=1, col=col)
    x_title = "alpha" if scale == 1.0 else f"alpha (x {scale:.3g})"
    fig.update_xaxes(title_text=x_title)
    fig.update_layout(title=title, template="plotly_white",
                      legend=dict(orientation="h", y=1.08, x=1, xanchor="right", yanchor="bottom"))
    return fig


#--------------------------------------------------------------------------------------------- probes, directions, INLP


def probe_sweep_figure(frame, title: str = "probe sweep") -> go.Figure:
    """Accuracy and AUROC per layer, train vs held-out (and test when present), from ``ProbeSweep.to_frame()``.

    Held-out accuracy carries the CV fold standard deviation as error bars; the dotted line is the majority
    class rate (chance).
    """
    from plotly.subplots import make_subplots

    hooks = list(frame["hook"])
    layers = list(frame["layer"]) if "layer" in frame else [None] * len(hooks)
    x = [int(v) if v is not None and v == v else i for i, v in enumerate(layers)]
    x_title = "layer" if all(v is not None and v == v for v in layers) else "hook index"
    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy", "AUROC"), horizontal_spacing=0.1)
    styles = {"train": dict(color="#9ecae9", dash="dash"), "heldout": dict(color="#4c78a8"),
              "test": dict(color="#f58518")}
    names = {"train": "train", "heldout": "held-out", "test": "test split"}
    for col, metric in ((1, "accuracy"), (2, "auroc")):
        for kind in ("train", "heldout", "test"):
            key = f"{kind}_{metric}"
            if key not in frame:
                continue
            err = None
            if kind == "heldout" and metric == "accuracy" and "heldout_accuracy_std" in frame:
                std = [float(v) if v == v else 0.0 for v in frame["heldout_accuracy_std"]]
                err = dict(type="data", array=std, visible=any(std))
            fig.add_trace(
                go.Scatter(
                    x=x, y=[float(v) for v in frame[key]], mode="lines+markers", name=names[kind],
                    line=styles[kind], error_y=err, legendgroup=kind, showlegend=col == 1,
                    hovertext=hooks, hoverinfo="text+y",
                ),
                row=1, col=col,
            )
    if "majority" in frame and len(frame):
        fig.add_hline(y=float(frame["majority"].iloc[0]), line=dict(color="grey", dash="dot"), row=1, col=1,
                      annotation_text="majority class", annotation_position="bottom right")
    fig.add_hline(y=0.5, line=dict(color="grey", dash="dot"), row=1, col=2)
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(range=[0.4, 1.02])
    fig.update_layout(title=title, template="plotly_white",
                      legend=dict(orientation="h", y=1.08, x=1, xanchor="right", yanchor="bottom"))
    return fig


def inlp_accuracy_figure(accuracies, majority: float, margin: float | None = None, title: str = "INLP") -> go.Figure:
    """Held-out accuracy of each INLP iteration's classifier against the majority-class rate (and margin)."""
    acc = [float(a) for a in accuracies]
    fig = go.Figure(go.Scatter(x=list(range(len(acc))), y=acc, mode="lines+markers", name="held-out accuracy",
                               line=dict(color="#4c78a8")))
    fig.add_hline(y=float(majority), line=dict(color="grey", dash="dot"), annotation_text="majority class")
    if margin is not None:
        fig.add_hrect(y0=float(majority), y1=float(majority) + float(margin), fillcolor="grey", opacity=0.15,
                      line_width=0)
    fig.update_layout(title=title, template="plotly_white",
                      xaxis=dict(title="directions removed before the fit", dtick=1),
                      yaxis=dict(title="held-out accuracy", range=[min(acc + [majority]) - 0.05, 1.02]))
    return fig


def projection_scatter_figure(x, y, labels, x_title: str = "projection on the direction",
                              y_title: str = "top principal component", title: str = "") -> go.Figure:
    """2-D scatter of activations: projection on a direction vs another axis, one colour per label value."""
    import numpy as np

    xs = np.asarray(x.tolist() if hasattr(x, "tolist") else x, dtype=np.float64)
    ys = np.asarray(y.tolist() if hasattr(y, "tolist") else y, dtype=np.float64)
    lab = [str(v) for v in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    palette = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d"]
    fig = go.Figure()
    for k, value in enumerate(sorted(set(lab))):
        m = np.array([v == value for v in lab])
        fig.add_trace(go.Scattergl(x=xs[m], y=ys[m], mode="markers", name=f"label {value}",
                                   marker=dict(size=5, opacity=0.6, color=palette[k % len(palette)])))
    fig.update_layout(title=title, template="plotly_white", xaxis=dict(title=x_title), yaxis=dict(title=y_title))
    return fig
