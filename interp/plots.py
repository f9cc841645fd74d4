"""Plotly figures. Functions take plain tensors, arrays, dicts and frames and return
``plotly.graph_objects.Figure``; results' ``.plot()`` methods import this module lazily, so analyses never depend
on plotly at import time.

Every figure has a title naming what it shows (and, when its caller knows them, the model and dataset), axis
titles with units, and error bars where a number is an estimate: 95% intervals, Wilson for accuracies and
Hanley-McNeil for AUROCs, over the rows that were scored. HTML pages that hold figures: :mod:`interp.reports`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from interp.stats import Z95, wilson_interval  # noqa: F401  (plots.wilson_interval: public here too)

PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d"]
LEGEND_TOP = dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom")

# ---------------------------------------------------------------------------------------------- uncertainty


def auroc_interval(auc: float, n_pos: int, n_neg: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of an AUROC from its Hanley-McNeil (1982) standard error with ``n_pos``/``n_neg`` rows."""
    if not n_pos or not n_neg or n_pos <= 0 or n_neg <= 0 or auc is None or not math.isfinite(auc):
        return float("nan"), float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    se = math.sqrt(max(var, 0.0))
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def error_bars(values: Sequence[float], lows: Sequence[float], highs: Sequence[float]) -> dict[str, Any] | None:
    """Plotly ``error_y`` for intervals ``[low, high]`` around ``values`` (None when no interval is known)."""
    up = [h - v if math.isfinite(h) and math.isfinite(v) else 0.0 for v, h in zip(values, highs)]
    down = [v - lo if math.isfinite(lo) and math.isfinite(v) else 0.0 for v, lo in zip(values, lows)]
    if not any(up) and not any(down):
        return None
    return dict(type="data", symmetric=False, array=up, arrayminus=down, visible=True, thickness=1.2, width=4)


def as_floats(x: Any) -> list[float]:
    import numpy as np

    arr = x.tolist() if hasattr(x, "tolist") else x
    return [float(v) if v is not None else float("nan") for v in np.asarray(arr, dtype=object).reshape(-1)]


def format_ci(v: float, lo: float, hi: float) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else f"{v:.3f}"


# ---------------------------------------------------------------------------------------------- probes, directions, INLP


def source_text(provenance: Mapping[str, Any] | None) -> dict[str, str]:
    """``model``, ``dataset`` and ``positions`` of a result's provenance as short strings ('' when unknown)."""
    p = dict(provenance or {})
    model = p.get("model") or {}
    name = model.get("name") if isinstance(model, Mapping) else str(model)
    dataset = p.get("dataset") or {}
    ds = dataset.get("name") if isinstance(dataset, Mapping) else str(dataset)
    return {"model": str(name or ""), "dataset": str(ds or ""), "positions": str(p.get("positions") or "")}


def positions_text(positions: str) -> str:
    return {"mean": "mean-pooled", "last": "last-token", "all": "every-token"}.get(positions, positions)


def probe_sweep_title(label: str, provenance: Mapping[str, Any] | None) -> str:
    s = source_text(provenance)
    where = f" of {s['dataset']}" if s["dataset"] else ""
    model = f" from {s['model']}'s" if s["model"] else " from the"
    pos = f" {positions_text(s['positions'])}" if s["positions"] else ""
    return f"Linear probe per layer: '{label}'{where}{model}{pos} residual stream"


def sweep_intervals(frame, config: Mapping[str, Any]) -> dict[str, tuple[list[float], list[float]]]:
    """95% intervals of each plotted metric column: given ``*_ci_low``/``*_ci_high`` columns when the sweep has
    them, else Wilson (accuracy) and Hanley-McNeil (binary AUROC) over the rows each metric was scored on."""
    n_fit, n_test = int(config.get("n_fit") or 0), int(config.get("n_test") or 0)
    n_of = {"heldout": n_fit if config.get("cv") else n_test, "test": n_test}
    binary = not config.get("multiclass")
    majority = as_floats(frame["majority"]) if "majority" in frame else [float("nan")] * len(frame)
    out: dict[str, tuple[list[float], list[float]]] = {}
    for kind, n in n_of.items():
        for metric in ("accuracy", "auroc"):
            key = f"{kind}_{metric}"
            if key not in frame:
                continue
            if f"{key}_ci_low" in frame and f"{key}_ci_high" in frame:
                out[key] = (as_floats(frame[f"{key}_ci_low"]), as_floats(frame[f"{key}_ci_high"]))
                continue
            ivs = []
            for v, maj in zip(as_floats(frame[key]), majority):
                if metric == "accuracy":
                    ivs.append(wilson_interval(v, n))
                elif binary and math.isfinite(maj):
                    n_major = round(maj * n)
                    ivs.append(auroc_interval(v, n_major, n - n_major))
                else:
                    ivs.append((float("nan"), float("nan")))
            out[key] = ([lo for lo, _ in ivs], [hi for _, hi in ivs])
    return out


def probe_sweep_figure(
    frame,
    title: str | None = None,
    cv_frame=None,
    config: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    label: str = "label",
) -> go.Figure:
    """Accuracy and AUROC per layer (train, CV held-out, test split), from ``ProbeSweep.to_frame()``.

    Held-out and test points carry 95% intervals (see :func:`sweep_intervals`; needs ``config`` with
    ``n_fit``/``n_test``/``cv``); the x ticks name the C each layer kept; with ``cv_frame`` (the sweep's
    ``cv_results``) a second row shows CV held-out accuracy for every C of the grid, the chosen one starred.
    Dotted lines: the majority-class rate (accuracy) and 0.5 (AUROC).
    """
    from plotly.subplots import make_subplots

    config = dict(config or {})
    hooks = list(frame["hook"])
    layers = list(frame["layer"]) if "layer" in frame else [None] * len(hooks)
    known = all(v is not None and v == v for v in layers)
    x = [int(v) if known else i for i, v in enumerate(layers)]
    chosen = as_floats(frame["C"]) if "C" in frame else [float("nan")] * len(hooks)
    ticks = [f"{v}<br>C={c:g}" if math.isfinite(c) else str(v) for v, c in zip(x, chosen)]
    grid = cv_frame is not None and len(cv_frame) and len(set(as_floats(cv_frame["C"]))) > 1
    n_h = config.get("n_fit") if config.get("cv") else config.get("n_test")
    cv_name = f"{config['cv']}-fold CV" if config.get("cv") else "held-out"
    fig = make_subplots(
        rows=2 if grid else 1, cols=2, vertical_spacing=0.2, horizontal_spacing=0.08,
        specs=[[{}, {}], [{"colspan": 2}, None]] if grid else [[{}, {}]],
        row_heights=[0.62, 0.38] if grid else None,
        subplot_titles=("accuracy", "AUROC", f"{cv_name} held-out accuracy for each C (★ = C kept)") if grid
        else ("accuracy", "AUROC"),
    )
    intervals = sweep_intervals(frame, config) if config else {}
    n_text = {"heldout": f" ({n_h} rows, 95% CI)" if n_h else "", "test": f" ({config.get('n_test')} rows, 95% CI)"}
    styles = {"train": dict(color="#9ecae9", dash="dash"), "heldout": dict(color="#4c78a8"),
              "test": dict(color="#f58518")}
    names = {"train": "train rows (in-sample)", "heldout": f"{cv_name} held-out" + n_text["heldout"],
             "test": "test split" + n_text["test"]}
    lows = []
    for col, metric in ((1, "accuracy"), (2, "auroc")):
        for kind in ("train", "heldout", "test"):
            key = f"{kind}_{metric}"
            if key not in frame:
                continue
            y = as_floats(frame[key])
            lo, hi = intervals.get(key, ([float("nan")] * len(y), [float("nan")] * len(y)))
            lows += [v for v in lo + y if math.isfinite(v)]
            hover = [f"{h}<br>C={c:g}<br>{metric}: {format_ci(v, a, b)}" for h, c, v, a, b in zip(hooks, chosen, y, lo, hi)]
            shift = {"heldout": -0.06, "test": 0.06}.get(kind, 0.0)  # side by side, so the bars do not overlap
            fig.add_trace(
                go.Scatter(
                    x=[v + shift for v in x], y=y, mode="lines+markers", name=names[kind], line=styles[kind],
                    error_y=error_bars(y, lo, hi), legendgroup=kind, showlegend=col == 1,
                    hovertext=hover, hoverinfo="text",
                ),
                row=1, col=col,
            )
    if "majority" in frame and len(frame):
        fig.add_hline(y=float(frame["majority"].iloc[0]), line=dict(color="grey", dash="dot"), row=1, col=1,
                      annotation_text="majority class", annotation_position="bottom right")
    fig.add_hline(y=0.5, line=dict(color="grey", dash="dot"), row=1, col=2, annotation_text="chance",
                  annotation_position="bottom right")
    x_title = "layer (residual stream after the block); C kept by CV" if known else "hook index; C kept by CV"
    fig.update_xaxes(title_text=x_title, tickmode="array", tickvals=x, ticktext=ticks, row=1)
    low = min([0.45] + lows) - 0.03
    fig.update_yaxes(range=[max(0.0, low), 1.02], row=1)
    fig.update_yaxes(title_text="accuracy (fraction correct)", row=1, col=1)
    fig.update_yaxes(title_text="AUROC", row=1, col=2)
    if grid:
        Cs = sorted(set(as_floats(cv_frame["C"])))
        by = {(h, float(c)): float(a) for h, c, a in zip(cv_frame["hook"], cv_frame["C"], cv_frame["heldout_accuracy"])}
        z = [[by.get((h, c), float("nan")) for h in hooks] for c in Cs]
        text = [[("★ " if c == ch else "") + (f"{v:.3f}" if v == v else "") for h, ch, v in zip(hooks, chosen, row)]
                for c, row in zip(Cs, z)]
        fig.add_trace(
            go.Heatmap(
                x=x, y=[f"{c:g}" for c in Cs], z=z, text=text, texttemplate="%{text}", colorscale="Blues",
                colorbar=dict(title="CV acc.", len=0.34, y=0.0, yanchor="bottom", thickness=14),
                hovertemplate="layer %{x}, C=%{y}<br>CV held-out accuracy %{z:.3f}<extra></extra>",
                name="CV accuracy per C",
            ),
            row=2, col=1,
        )
        fig.update_xaxes(title_text="layer" if known else "hook index", tickmode="array", tickvals=x,
                         ticktext=[str(v) for v in x], row=2, col=1)
        fig.update_yaxes(title_text="C (inverse L2 strength)", type="category", row=2, col=1)
    fig.update_layout(
        title=dict(text=title or probe_sweep_title(label, provenance), y=0.985, yanchor="top"),
        template="plotly_white", height=860 if grid else 540, margin=dict(t=130),
        legend=dict(orientation="h", x=0, xanchor="left", y=1.05, yanchor="bottom"),
    )
    return fig


def inlp_accuracy_figure(
    accuracies,
    majority: float,
    margin: float | None = None,
    title: str = "INLP",
    n_test: int | None = None,
    removed: Sequence[int] | None = None,
) -> go.Figure:
    """Held-out accuracy of each INLP iteration's classifier, with Wilson 95% intervals over the ``n_test``
    held-out rows, against the majority-class rate (and the stopping margin above it, shaded)."""
    acc = as_floats(accuracies)
    x = list(removed) if removed is not None and len(removed) == len(acc) else list(range(len(acc)))
    ivs = [wilson_interval(a, n_test) for a in acc] if n_test else [(float("nan"),) * 2] * len(acc)
    lo, hi = [a for a, _ in ivs], [b for _, b in ivs]
    name = "held-out accuracy" + (f" ({n_test} rows, 95% CI)" if n_test else "")
    fig = go.Figure(go.Scatter(
        x=x, y=acc, mode="lines+markers", name=name, line=dict(color="#4c78a8"), error_y=error_bars(acc, lo, hi),
        hovertext=[f"{r} removed: {format_ci(a, p, q)}" for r, a, p, q in zip(x, acc, lo, hi)], hoverinfo="text",
    ))
    fig.add_hline(y=float(majority), line=dict(color="grey", dash="dot"), annotation_text="majority class",
                  annotation_position="bottom right")
    if margin is not None:
        fig.add_hrect(y0=float(majority), y1=float(majority) + float(margin), fillcolor="grey", opacity=0.15,
                      line_width=0, annotation_text="stopping margin", annotation_position="top right")
    bottom = min([float(majority)] + [v for v in lo + acc if math.isfinite(v)]) - 0.05
    fig.update_layout(title=title, template="plotly_white", legend=LEGEND_TOP, showlegend=True,
                      xaxis=dict(title="directions removed before the fit (count)", dtick=1),
                      yaxis=dict(title="held-out accuracy (fraction correct)", range=[max(0.0, bottom), 1.02]))
    return fig


def projection_scatter_figure(x, y, labels, x_title: str = "projection on the direction",
                              y_title: str = "top principal component", title: str = "") -> go.Figure:
    """2-D scatter of activations: projection on a direction vs another axis, one colour per label value."""
    import numpy as np

    xs = np.asarray(as_floats(x))
    ys = np.asarray(as_floats(y))
    lab = [str(v) for v in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    fig = go.Figure()
    for k, value in enumerate(sorted(set(lab))):
        m = np.array([v == value for v in lab])
        fig.add_trace(go.Scattergl(x=xs[m], y=ys[m], mode="markers", name=f"label {value} ({int(m.sum())} rows)",
                                   marker=dict(size=5, opacity=0.6, color=PALETTE[k % len(PALETTE)])))
    fig.update_layout(title=title, template="plotly_white", xaxis=dict(title=x_title), yaxis=dict(title=y_title),
                      legend=LEGEND_TOP)
    return fig


# ---------------------------------------------------------------------------------------------- detectors (interp.detectors)


def _yes_no(v: Any) -> int | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, str):
        return 1 if v.strip().lower() in ("1", "true", "yes", "positive", "pos") else 0
    return int(bool(v))


def token_heatmap(
    tokens,
    scores,
    threshold: float | None = None,
    masks=None,
    row_labels=None,
    width: int = 16,
    title: str = "token scores",
    labels=None,
    flags=None,
    aggregates=None,
    label_names: Sequence[str] = ("negative", "positive"),
) -> go.Figure:
    """Token scores as a heatmap that reads like text: each text wrapped into lines of ``width`` tokens.

    ``tokens``: one list of token strings per text (or a single list); ``scores``: matching per-token scores.
    The colour scale is diverging and centred on ``threshold`` (red above, blue below; 0 when None). Tokens
    outside ``masks`` (when given) are left uncoloured, their score in the hover text only. ``labels`` (the
    true label of each text, truthy = positive) and ``flags`` (the detector's verdict, e.g. aggregate >
    threshold) add a two-column panel on the right of each text's first line: true label, flag, and whether
    they agree; ``aggregates`` are shown in the row labels' hover.
    """
    import numpy as np
    from plotly.subplots import make_subplots

    if tokens and isinstance(tokens[0], str):
        tokens, scores = [tokens], [scores]
        masks = None if masks is None else [masks]
        labels = None if labels is None else [labels] if not isinstance(labels, (list, tuple)) else labels
        flags = None if flags is None else [flags] if not isinstance(flags, (list, tuple)) else flags
    width = max(1, int(width))
    labels = None if labels is None else [_yes_no(v) for v in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    flags = None if flags is None else [_yes_no(v) for v in (flags.tolist() if hasattr(flags, "tolist") else flags)]
    agg = None if aggregates is None else as_floats(aggregates)
    z_rows, text_rows, hover_rows, y_labels, first_line = [], [], [], [], []
    for t, (toks, sc) in enumerate(zip(tokens, scores)):
        sc = np.asarray(as_floats(sc), dtype=np.float64)
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
            if line == 0:
                first_line.append(len(z_rows))
            z_rows.append(z)
            text_rows.append(txt)
            hover_rows.append(hov)
            y_labels.append(label if line == 0 else "⋯")
    z_all = np.array(z_rows) if z_rows else np.zeros((0, width))
    finite = z_all[np.isfinite(z_all)]
    centre = 0.0 if threshold is None else float(threshold)
    span = float(np.max(np.abs(finite - centre))) if finite.size else 1.0
    span = span if span > 0 else 1.0
    side = labels is not None or flags is not None
    fig = make_subplots(rows=1, cols=2 if side else 1, shared_yaxes=True, horizontal_spacing=0.01,
                        column_widths=[0.88, 0.12] if side else None)
    fig.add_trace(
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
            colorbar=dict(title="token score" if threshold is None else f"token score<br>(centre = threshold<br>"
                                                                        f"{threshold:+.3f})", x=1.02),
            xgap=1,
            ygap=1,
            name="token scores",
        ),
        row=1, col=1,
    )
    n_lines = len(y_labels)
    if side:
        cols = (["true label"] if labels is not None else []) + (["flag"] if flags is not None else [])
        z_side = np.full((n_lines, len(cols)), np.nan)
        t_side = [[""] * len(cols) for _ in range(n_lines)]
        h_side = [[""] * len(cols) for _ in range(n_lines)]
        for t, r in enumerate(first_line):
            truth = labels[t] if labels is not None else None
            flag = flags[t] if flags is not None else None
            agree = "" if truth is None or flag is None else (" ✓" if truth == flag else " ✗")
            score = "" if agg is None else f"<br>aggregate score {agg[t]:+.4f}"
            for c, name in enumerate(cols):
                v = truth if name == "true label" else flag
                if v is None:
                    continue
                z_side[r, c] = v
                shown = label_names[v] if name == "true label" else ("flagged" if v else "not flagged")
                t_side[r][c] = ("pos" if v else "neg") if name == "true label" else ("FLAG" if v else "no")
                t_side[r][c] += agree if name == "flag" else ""
                h_side[r][c] = f"{name}: {shown}{agree.replace('✓', '(correct)').replace('✗', '(wrong)')}{score}"
        fig.add_trace(
            go.Heatmap(
                z=z_side, x=cols, text=t_side, customdata=h_side, texttemplate="%{text}",
                hovertemplate="%{customdata}<extra></extra>", colorscale=[[0, "#c6dbef"], [1, "#fcae91"]],
                zmin=0, zmax=1, showscale=False, xgap=1, ygap=1, name="true label / flag",
            ),
            row=1, col=2,
        )
        fig.update_xaxes(side="top", showgrid=False, row=1, col=2)
    what = "" if threshold is None else f"; colour centred at the threshold {threshold:+.3f} (red = above)"
    fig.update_layout(
        title=dict(text=f"{title}<br><sup>one row per text, {width} tokens a line{what}</sup>"),
        template="plotly_white",
        height=max(220, 34 * n_lines + 140),
        margin=dict(t=100),
    )
    fig.update_xaxes(showticklabels=False, showgrid=False, title_text=f"token position within the line "
                     f"(wrapped every {width} tokens)", title_font_size=11, row=1, col=1)
    fig.update_yaxes(tickmode="array", tickvals=list(range(n_lines)), ticktext=y_labels, autorange="reversed",
                     showgrid=False, row=1, col=1)
    return fig


# ------------------------------------------------------------------------------------- steering (interp.steering)

_UNITS = {"logit_diff": "logits", "projection": "activation units along the unit direction",
          "probe_score": "probe score, logit"}


def metric_axis_title(key: str, name: str | None = None) -> str:
    """An axis title for a sweep metric: its table column ``key``, the metric's own ``name`` when it says more
    (``logit_diff(' love' - ' hate')``), and the unit of a built-in metric."""
    name = name or key
    text = name if name == key or name.startswith(f"{key}(") else f"{key} = {name}"
    unit = next((u for k, u in _UNITS.items() if name.startswith(k)), None)
    return f"{text} ({unit})" if unit else text


def _alpha_title(op: str, scale: float | None = None) -> str:
    """The x title of a sweep: a multiple of the vector as given, or (``scale``) of ``scale`` x a unit direction."""
    if op == "clamp":
        return "clamp value (projection set on the direction)"
    if scale is None:
        return "alpha (multiple of the steering vector)"
    return "alpha (multiple of the unit direction)" if scale == 1.0 else f"alpha (multiple of {scale:.4g} × unit direction)"


def _short(text: Any, n: int = 160) -> str:
    s = str(text).replace("\n", "⏎ ")
    return s if len(s) <= n else s[: n - 1] + "…"


def generations_table(table, n_prompts: int = 2, by: Sequence[str] = ("alpha",), n_chars: int = 160) -> go.Table:
    """A plotly table of generated texts: the first ``n_prompts`` prompts at every value of ``by``."""
    prompts = list(dict.fromkeys(table["prompt"]))[: max(1, n_prompts)]
    part = table[table["prompt"].isin(prompts)]
    cols = [*by, "prompt", "generated text"]
    values = [[f"{v:+g}" if isinstance(v, float) else str(v) for v in part[c]] for c in by]
    values += [[_short(p, 60) for p in part["prompt"]], [_short(t, n_chars) for t in part["text"]]]
    widths = [1] * len(by) + [3, 9]
    return go.Table(
        header=dict(values=[f"<b>{c}</b>" for c in cols], fill_color="#eef2f7", align="left"),
        cells=dict(values=values, align="left", height=22, font=dict(size=11)),
        columnwidth=widths,
        name="generated texts",
    )


def _panels_over_table(n_panels: int, n_table_rows: int, titles: Sequence[str]) -> go.Figure:
    """A figure with ``n_panels`` plots side by side over a full-width table of ``n_table_rows`` rows, sized in
    pixels so that the table shows every row; the legend sits under the title."""
    from plotly.subplots import make_subplots

    plot_px, table_px, gap_px = 360, 48 + 27 * n_table_rows, 110
    body = plot_px + table_px + gap_px
    fig = make_subplots(
        rows=2, cols=n_panels, vertical_spacing=gap_px / body, horizontal_spacing=0.08,
        specs=[[{}] * n_panels, [{"type": "table", "colspan": n_panels}] + [None] * (n_panels - 1)],
        row_heights=[plot_px, table_px], subplot_titles=list(titles),
    )
    fig.update_layout(
        template="plotly_white", height=body + 150, margin=dict(t=150), title=dict(y=0.99, yanchor="top"),
        legend=dict(orientation="h", x=0, xanchor="left", y=1 + 50 / body, yanchor="bottom"),
    )
    return fig


def steering_curve(
    table,
    metrics=None,
    title: str = "steering sweep",
    labels: Mapping[str, str] | None = None,
    op: str = "add",
    n_prompts: int = 2,
) -> go.Figure:
    """One panel per metric: its mean over prompts against alpha, with standard-error bars and every prompt's
    value as a faint point whose hover shows the prompt and the generated text; below, a table of the
    generations of the first ``n_prompts`` prompts at every alpha (a ``SweepResult.table``: alpha, prompt,
    text, one column per metric). ``labels``: ``{column: metric name}`` for the axis titles."""
    import numpy as np

    if metrics is None:
        metrics = [c for c in table.columns if c not in ("alpha", "prompt", "text")]
    metrics = list(metrics)
    m = max(1, len(metrics))
    n_rows_table = len(table[table["prompt"].isin(list(dict.fromkeys(table["prompt"]))[:n_prompts])])
    fig = _panels_over_table(
        m, n_rows_table, [metric_axis_title(k, (labels or {}).get(k)) for k in metrics]
        + [f"generated texts (first {min(n_prompts, table['prompt'].nunique())} prompts)"],
    )
    for k, name in enumerate(metrics):
        color = PALETTE[0]
        hover = [f"alpha {a:+g}<br>{name} {v:+.4f}<br>prompt: {_short(p, 60)!r}<br>→ {_short(t, 120)!r}"
                 for a, v, p, t in zip(table["alpha"], table[name], table["prompt"], table["text"])]
        fig.add_trace(go.Scatter(
            x=table["alpha"], y=table[name], mode="markers", name="each prompt (hover: its generated text)",
            marker=dict(color=PALETTE[1], opacity=0.45, size=6), customdata=list(table["text"]), hovertext=hover,
            hoverinfo="text", legendgroup="prompts", showlegend=k == 0,
        ), row=1, col=k + 1)
        g = table.groupby("alpha")[name]
        mean, sem = g.mean(), g.sem().fillna(0.0)
        first = table.drop_duplicates("alpha").set_index("alpha")["text"]
        fig.add_trace(go.Scatter(
            x=list(mean.index), y=mean.values, mode="lines+markers", name="mean ± standard error over prompts",
            line=dict(color=color), error_y=dict(type="data", array=np.asarray(sem.values), visible=True),
            customdata=[first.get(a, "") for a in mean.index], legendgroup="mean", showlegend=k == 0,
            hovertemplate="alpha %{x:+g}: mean %{y:+.4f}<br>first prompt → %{customdata}<extra></extra>",
        ), row=1, col=k + 1)
        fig.update_yaxes(title_text=metric_axis_title(name, (labels or {}).get(name)), row=1, col=k + 1)
    fig.update_xaxes(title_text=_alpha_title(op), row=1)
    fig.add_trace(generations_table(table, n_prompts), row=2, col=1)
    fig.update_layout(title=title)
    return fig


def steering_comparison(
    table,
    metrics=None,
    scale: float = 1.0,
    title: str = "steering comparison",
    labels: Mapping[str, str] | None = None,
) -> go.Figure:
    """One panel per metric: each method's mean over prompts against alpha, with standard-error bars; hover
    shows the first prompt's generation; below, a table of the first prompt's generations per method and alpha
    (a ``SteeringComparison.table``: method, alpha, alpha_raw, prompt, text, one column per metric)."""
    import numpy as np

    if metrics is None:
        metrics = [c for c in table.columns if c not in ("method", "alpha", "alpha_raw", "prompt", "text")]
    metrics = list(metrics)
    m = max(1, len(metrics))
    first_prompt = table["prompt"].iloc[0] if len(table) else ""
    fig = _panels_over_table(
        m, int((table["prompt"] == first_prompt).sum()), [metric_axis_title(k, (labels or {}).get(k)) for k in metrics]
        + [f"generated texts for the prompt {_short(first_prompt, 60)!r}"],
    )
    for k, method in enumerate(dict.fromkeys(table["method"])):
        part = table[table["method"] == method]
        color = PALETTE[k % len(PALETTE)]
        first = part[part["prompt"] == first_prompt].set_index("alpha")["text"]
        for col, name in enumerate(metrics, start=1):
            g = part.groupby("alpha")[name]
            mean, sem = g.mean(), g.sem().fillna(0.0)
            fig.add_trace(go.Scatter(
                x=list(mean.index), y=mean.values, mode="lines+markers", name=method, legendgroup=method,
                showlegend=col == 1, line=dict(color=color),
                error_y=dict(type="data", array=np.asarray(sem.values), visible=True),
                customdata=[_short(first.get(a, ""), 120) for a in mean.index],
                hovertemplate=f"{method}, alpha %{{x:+g}}: mean %{{y:+.4f}}<br>→ %{{customdata}}<extra></extra>",
            ), row=1, col=col)
            fig.update_yaxes(title_text=metric_axis_title(name, (labels or {}).get(name)), row=1, col=col)
    fig.update_xaxes(title_text=_alpha_title("add", float(scale)), row=1)
    fig.add_trace(generations_table(table, 1, by=("method", "alpha")), row=2, col=1)
    fig.update_layout(title=title)
    return fig


# ---------------------------------------------------------------------------------------------- SAEs (interp.sae)


def sae_comparison(
    table,
    title: str = "probes vs SAE latents",
    n_test: int | None = None,
    n_positive: int | None = None,
) -> go.Figure:
    """Held-out accuracy and AUROC per method (a ``SAEComparison.table``: method, accuracy, auroc, ...), with
    95% intervals over the ``n_test`` test rows (Wilson; Hanley-McNeil for AUROC, which needs ``n_positive``;
    without it the classes are taken as balanced)."""
    methods = list(table["method"])
    fig = go.Figure()
    lows = []
    for metric, color in (("accuracy", "#4c78a8"), ("auroc", "#f58518")):
        values = as_floats(table[metric])
        if n_test and metric == "accuracy":
            ivs = [wilson_interval(v, n_test) for v in values]
        elif n_test:
            pos = n_positive if n_positive is not None else n_test // 2
            ivs = [auroc_interval(v, pos, n_test - pos) for v in values]
        else:
            ivs = [(float("nan"), float("nan"))] * len(values)
        lo, hi = [a for a, _ in ivs], [b for _, b in ivs]
        lows += [v for v in lo + values if math.isfinite(v)]
        fig.add_trace(
            go.Bar(
                x=methods, y=values, name=("AUROC" if metric == "auroc" else metric)
                + (f" ({n_test} test rows, 95% CI)" if n_test else ""),
                marker_color=color, error_y=error_bars(values, lo, hi),
                hovertext=[f"{mth}: {metric} {format_ci(v, a, b)}" for mth, v, a, b in zip(methods, values, lo, hi)],
                hoverinfo="text",
            )
        )
    low = min([0.5] + lows)
    fig.add_hline(y=0.5, line=dict(color="grey", dash="dot"), annotation_text="chance (AUROC)")
    fig.update_layout(
        title=title,
        barmode="group",
        yaxis=dict(title="held-out score (accuracy: fraction correct; AUROC)", range=[max(0.0, low - 0.05), 1.05]),
        xaxis=dict(title="method (features used)"),
        template="plotly_white",
        legend=LEGEND_TOP,
    )
    return fig


def sae_feature_density(firing_frequency, title: str = "latent firing frequency") -> go.Figure:
    """Histogram of log10 firing frequency per latent; latents that never fired are counted in the title."""
    import numpy as np

    freq = np.asarray(as_floats(firing_frequency), dtype=np.float64)
    alive = freq[freq > 0]
    fig = go.Figure(go.Histogram(x=np.log10(alive), nbinsx=50, marker_color="#4c78a8", name="latents"))
    fig.update_layout(
        title=f"{title}: {int((freq == 0).sum())} of {freq.size} latents never fired",
        xaxis=dict(title="log10(fraction of rows the latent fires on)"),
        yaxis=dict(title="latents (count)"),
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
        xaxis=dict(title="training step"),
        yaxis=dict(title="normalised MSE (fraction of variance unexplained)", type="log"),
        yaxis2=dict(title="dead latents (count)", overlaying="y", side="right", rangemode="tozero"),
        template="plotly_white",
        legend=LEGEND_TOP,
    )
    return fig


# ---------------------------------------------------------------------------------------------- layer-wise analyses


def lens_kl_figure(frame, title: str = "KL to the final distribution per layer") -> go.Figure:
    """Mean ``KL(p_final || p_lens)`` (nats, held-out rows) per layer for the logit lens and, when the frame has a
    ``kl_tuned`` column, the tuned lens (a frame from :func:`interp.lenses.lens_kl`)."""
    fig = go.Figure()
    for col, name, color in (("kl_logit", "logit lens", PALETTE[0]), ("kl_tuned", "tuned lens", PALETTE[1])):
        if col in frame:
            fig.add_trace(go.Scatter(x=list(frame["layer"]), y=as_floats(frame[col]), mode="lines+markers",
                                     name=name, line=dict(color=color)))
    n = int(frame["n"].iloc[0]) if "n" in frame and len(frame) else None
    fig.update_layout(title=title + (f" ({n} held-out rows)" if n else ""), template="plotly_white",
                      legend=LEGEND_TOP, xaxis=dict(title="layer", dtick=1),
                      yaxis=dict(title="KL(final || lens) (nats, log scale)", type="log"))
    return fig


def lens_trajectory_figure(trajectories: Sequence[Any], color: str = "entropy") -> go.Figure:
    """Layers x token positions, each cell the lens's top token, coloured by ``entropy`` or ``kl`` (nats); one panel
    per trajectory (e.g. logit lens and tuned lens side by side) on a shared colour scale."""
    from plotly.subplots import make_subplots

    if color not in ("entropy", "kl"):
        from interp.errors import ConfigError

        raise ConfigError(f"color must be 'entropy' or 'kl', got {color!r}")
    grids = [getattr(t, color).tolist() for t in trajectories]
    top = max((max(max(r) for r in g) for g in grids), default=1.0)
    fig = make_subplots(rows=1, cols=len(trajectories), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[t.lens for t in trajectories])
    for i, (t, grid) in enumerate(zip(trajectories, grids)):
        x = [f"{j}:{tok}" for j, tok in enumerate(t.tokens)]
        text = [[cell[0] for cell in layer] for layer in t.top_tokens]
        hover = [[f"layer {lay}, input {x[j]}<br>top: " + ", ".join(
            f"{tok!r} {float(p):.2f}" for tok, p in zip(cell, t.top_probs[li, j].tolist()))
            + f"<br>{color}: {grid[li][j]:.3f} nats" for j, cell in enumerate(layer)]
            for li, (lay, layer) in enumerate(zip(t.layers, t.top_tokens))]
        fig.add_trace(go.Heatmap(z=grid, x=x, y=t.layers, text=text, texttemplate="%{text}", hovertext=hover,
                                 hoverinfo="text", colorscale="Viridis", zmin=0, zmax=top, showscale=i == 0,
                                 colorbar=dict(title=f"{color} (nats)")), row=1, col=i + 1)
        fig.update_xaxes(title_text="input token (position: token)", row=1, col=i + 1)
    fig.update_yaxes(title_text="layer", dtick=1, row=1, col=1)
    fig.update_layout(title=f"what each layer predicts next, coloured by {color}", template="plotly_white",
                      height=max(320, 28 * len(trajectories[0].layers) + 160))
    return fig


def layer_metrics_figure(frame, title: str = "representation metrics") -> go.Figure:
    """Prompt entropy, dataset entropy (nats), curvature (radians) and effective rank across layers, one panel
    each (a frame from :func:`interp.layers.layer_metrics`)."""
    from plotly.subplots import make_subplots

    panels = [("prompt_entropy", "prompt entropy (nats)"), ("dataset_entropy", "dataset entropy (nats)"),
              ("curvature", "curvature (radians)"), ("effective_rank", "effective rank (dimensions)")]
    fig = make_subplots(rows=1, cols=4, subplot_titles=[t for _, t in panels], horizontal_spacing=0.07)
    for i, (col, name) in enumerate(panels):
        fig.add_trace(go.Scatter(x=list(frame["layer"]), y=as_floats(frame[col]), mode="lines+markers", name=name,
                                 line=dict(color=PALETTE[i]), showlegend=False), row=1, col=i + 1)
        fig.update_xaxes(title_text="layer", row=1, col=i + 1)
    fig.update_layout(title=title, template="plotly_white", height=360)
    return fig


def concept_depth_figure(frame, curves, fraction: float = 0.9, title: str | None = None) -> go.Figure:
    """Held-out probe accuracy (CV fold mean +- std) across layers for several concepts side by side; each
    concept's depth (the shallowest layer reaching ``fraction`` of its best) is marked with its 95% interval."""
    fig = go.Figure()
    for i, row in enumerate(frame.itertuples()):
        c = curves[curves["concept"] == row.concept]
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=list(c["layer"]), y=as_floats(c["accuracy"]), mode="lines+markers",
                                 name=f"{row.concept} (depth {row.depth:.1f})", line=dict(color=color),
                                 error_y=dict(type="data", array=as_floats(c["std"]), visible=True, thickness=1)))
        lo, hi = row.ci_low, row.ci_high
        err = dict(type="data", symmetric=False, array=[hi - row.depth], arrayminus=[row.depth - lo], visible=True) \
            if math.isfinite(lo) and math.isfinite(hi) else None
        fig.add_trace(go.Scatter(x=[row.depth], y=[row.best_accuracy * fraction], mode="markers", showlegend=False,
                                 marker=dict(symbol="diamond", size=11, color=color), error_x=err,
                                 hovertext=f"{row.concept}: depth {row.depth:.2f} [{lo:.2f}, {hi:.2f}]",
                                 hoverinfo="text"))
    fig.update_layout(title=title or f"concept depth: shallowest layer at {fraction:.0%} of the best accuracy",
                      template="plotly_white", legend=LEGEND_TOP, xaxis=dict(title="layer", dtick=1),
                      yaxis=dict(title="held-out accuracy (fraction correct, CV fold mean +- std)"))
    return fig
