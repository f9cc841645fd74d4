"""HTML reports: pages of figures, tables and notes, and the one ``plotly.min.js`` they share.

:func:`write_html` writes every HTML report interp makes (probe sweeps, INLP, steering sweeps, detector
heatmaps, SAE comparisons): a ``plotly.min.js`` copied from the installed plotly package sits beside the
reports of a directory and each page loads it with a relative ``<script src>``, so a report is kilobytes, works
offline, and ten reports do not hold ten copies of plotly.js. ``self_contained=True`` inlines it instead (one
file to e-mail). :func:`probe_sweep_report` is the probe layer-sweep report (``interp probe``, ``interp demo``).
"""

from __future__ import annotations

import html as _html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

PLOTLY_JS = "plotly.min.js"


def plotly_js_source() -> Path:
    """The ``plotly.min.js`` bundled with the installed plotly package (what :func:`write_html` copies)."""
    import plotly

    from interp.errors import InterpError

    path = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    if not path.is_file():
        raise InterpError(f"the plotly package has no {PLOTLY_JS} at {path.parent}; reinstall plotly, "
                          "or write reports with self_contained=True")
    return path


def shared_plotly_js(directory: str | os.PathLike) -> Path:
    """``directory/plotly.min.js``: copied from the plotly package unless an identical copy is already there."""
    from interp.store import atomic_write_bytes

    data = plotly_js_source().read_bytes()
    dest = Path(directory) / PLOTLY_JS
    if not (dest.is_file() and dest.stat().st_size == len(data) and dest.read_bytes() == data):
        atomic_write_bytes(dest, data)
    return dest


def figure_title(fig: go.Figure) -> str:
    text = fig.layout.title.text if fig.layout.title is not None else None
    return _html.unescape(str(text or "")).replace("<br>", " ").split("<sup>")[0].strip()


def write_html(
    path: str | os.PathLike,
    content: go.Figure | str | Sequence[go.Figure | str],
    title: str | None = None,
    self_contained: bool = False,
) -> Path:
    """Write an HTML page of figures and HTML snippets (``content``: a figure, an HTML string, or a list of
    them, in page order) to ``path``, atomically; returns the path.

    By default the page loads ``plotly.min.js`` from its own directory (written there once, shared by every
    report in it: a page is kilobytes and works offline); ``self_contained=True`` inlines plotly.js (about
    4.8 MB) so the one file works anywhere. ``title`` defaults to the first figure's title.
    """
    from interp.store import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [content] if isinstance(content, (go.Figure, str)) else list(content)
    bad = [type(p).__name__ for p in parts if not isinstance(p, (go.Figure, str))]
    if bad:
        from interp.errors import ConfigError

        raise ConfigError(f"write_html takes plotly figures and HTML strings, got {', '.join(bad)}; "
                          "call .plot() on a result to get its figure")
    figs = [p for p in parts if isinstance(p, go.Figure)]
    if title is None:
        title = next((figure_title(f) for f in figs if figure_title(f)), path.stem)
    if self_contained:
        from plotly.offline import get_plotlyjs

        script = f'<script type="text/javascript">{get_plotlyjs()}</script>'
    else:
        shared_plotly_js(path.parent)
        script = f'<script src="{PLOTLY_JS}" charset="utf-8"></script>'
    body = []
    for p in parts:
        if isinstance(p, go.Figure):
            body.append(p.to_html(full_html=False, include_plotlyjs=False,
                                  config={"displaylogo": False, "toImageButtonOptions": {"scale": 2}}))
        else:
            body.append(str(p))
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{_html.escape(title)}</title>{script}"
        "<style>body{font-family:system-ui,sans-serif;margin:1.5em 2em;max-width:1400px;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:0.5em 0}"
        "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
        "td.l,th.l{text-align:left} .note{color:#555;font-size:13px} code{font-size:90%}</style>"
        f"</head><body>\n{''.join(body)}\n</body></html>\n"
    )
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A small HTML table (cells escaped; the first ``left`` columns left-aligned)."""
    cls = lambda j: " class='l'" if j < left else ""  # noqa: E731
    head = "".join(f"<th{cls(j)}>{_html.escape(str(h))}</th>" for j, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(j)}>{_html.escape(str(v))}</td>" for j, v in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def probe_sweep_report(
    sweep,
    path: str | os.PathLike,
    title: str | None = None,
    intro_html: str = "",
    self_contained: bool = False,
) -> Path:
    """An HTML report of a :class:`~interp.probes.linear.ProbeSweep`: what was probed (model, dataset, label,
    positions, rows, grouping, folds, C grid), a table per layer with the C kept and 95% intervals, and
    :func:`probe_sweep_figure`. ``intro_html`` goes under the title. Written with :func:`write_html`."""
    import pandas as pd

    from interp.plots import (
        as_floats,
        format_ci,
        positions_text,
        probe_sweep_figure,
        probe_sweep_title,
        source_text,
        sweep_intervals,
    )

    frame, config, prov = sweep.to_frame(), dict(sweep.config), dict(sweep.provenance)
    src = source_text(prov)
    model = prov.get("model") if isinstance(prov.get("model"), Mapping) else {}
    dataset = prov.get("dataset") if isinstance(prov.get("dataset"), Mapping) else {}
    title = title or probe_sweep_title(sweep.label, prov)
    cv = config.get("cv")
    group = config.get("group_by")
    group_text = ("by example (an example's rows never straddle folds)" if group in (None, "auto")
                  else f"examples with equal <code>{_html.escape(str(group))}</code> share a fold")
    Cs = ", ".join(f"{c:g}" for c in config.get("C", []))
    split = {"dataset": "the dataset's <code>split</code> column (train rows for CV, test rows held out)",
             "random": "a seeded random 25% of examples held out as test", "none": "no test split"}
    esc = _html.escape
    setup = [
        ("model", f"{esc(src['model'] or '?')} (d_model {model.get('d_model', '?')}, {model.get('n_layers', '?')} "
                  f"layers, weights {esc(str(model.get('weights_hash', '?')))})"),
        ("data", f"{esc(src['dataset'] or '?')}: {dataset.get('examples', '?')} examples; label "
                 f"<code>{esc(sweep.label)}</code>, classes {esc(', '.join(map(str, sweep.classes)))}; "
                 f"majority-class rate {float(frame['majority'].iloc[0]):.3f}"),
        ("activations", f"{esc(positions_text(src['positions']))} residual stream, store "
                        f"<code>{esc(Path(str(prov.get('store', '?'))).name)}</code>"),
        ("rows", f"{config.get('n_rows')} labelled; {config.get('n_fit')} fit, {config.get('n_test')} test; "
                 f"split: {split.get(str(config.get('split')), esc(str(config.get('split'))))}"),
        ("validation", (f"{cv}-fold cross-validation, stratified by label; grouping: {group_text}" if cv
                        else "no cross-validation: held-out = the test split")),
        ("C grid", f"{esc(Cs)} (inverse L2 strength on standardised features); each layer keeps the C with "
                   "the best CV held-out accuracy"),
        ("best layer", f"<b>{esc(sweep.best_hook)}</b> (best held-out accuracy)"),
    ]
    setup_html = "<table>" + "".join(f"<tr><th class='l'>{k}</th><td class='l'>{v}</td></tr>" for k, v in setup) + "</table>"
    ivs = sweep_intervals(frame, config)
    header = ["hook", "layer", "C kept", "train acc", "held-out acc [95% CI]", "fold sd", "held-out AUROC [95% CI]"]
    has_test = "test_accuracy" in frame and cv
    if has_test:
        header += ["test acc [95% CI]", "test AUROC [95% CI]"]
    rows = []
    for i, r in frame.iterrows():
        def cell(key: str) -> str:
            lo, hi = ivs.get(key, ([float("nan")] * len(frame),) * 2)
            return format_ci(float(r[key]), lo[i], hi[i])

        sd = r.get("heldout_accuracy_std", float("nan"))
        row = [r["hook"] + (" ★" if r["hook"] == sweep.best_hook else ""), "" if pd.isna(r["layer"]) else int(r["layer"]),
               f"{r['C']:g}", f"{r['train_accuracy']:.3f}", cell("heldout_accuracy"),
               "" if pd.isna(sd) else f"{sd:.3f}", cell("heldout_auroc")]
        if has_test:
            row += [cell("test_accuracy"), cell("test_auroc")]
        rows.append(row)
    n_neg = round((1 - float(frame["majority"].iloc[0])) * (config.get("n_fit") if cv else config.get("n_test") or 0)
                  / (cv or 1))
    recall = "heldout_recall_at_1pct_fpr" in frame and n_neg >= 100
    if recall:
        header.append("held-out recall at 1% FPR")
        for row, v in zip(rows, as_floats(frame["heldout_recall_at_1pct_fpr"])):
            row.append(f"{v:.3f}")
    recall_note = ("" if recall else f" Recall at 1% FPR is not shown: a held-out set has about {n_neg} "
                   "negatives, fewer than the 100 it needs.")
    note = (
        "<p class='note'>Intervals: 95% Wilson intervals for accuracy and Hanley-McNeil intervals for AUROC, over "
        "the rows scored (CV: every fit row is held out once; test: the test rows), treating rows as independent; "
        f"they leave out the variance of refitting. Fold sd: standard deviation of the per-fold accuracies.{recall_note}</p>"
    )
    fig_title = f"Probe accuracy and AUROC per layer ({src['model'] or 'model'}, {src['dataset'] or 'dataset'})"
    parts = [f"<h1>{esc(title)}</h1>", intro_html, setup_html, html_table(header, rows, left=1), note,
             probe_sweep_figure(frame, title=fig_title, cv_frame=pd.DataFrame(sweep.cv_results), config=config,
                                provenance=prov, label=sweep.label)]
    return write_html(path, parts, title=title, self_contained=self_contained)
