"""Figures a researcher can read without the JSON beside them: titles and axis titles, 95% intervals that match
reference formulas, detector heatmaps with label and flag centred at the threshold, steering figures that show
what was generated; and reports that share one plotly.min.js instead of inlining it each time."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from interp import plots, reports

BUNDLE_MARK = "* plotly.js v"  # the licence header at the top of the plotly.js bundle


def axis_titles(fig: go.Figure, prefix: str) -> list[str]:
    return [fig.layout[k].title.text for k in fig.layout if k.startswith(prefix) and fig.layout[k].title.text]


def bar_bounds(trace) -> tuple[list[float], list[float]]:
    """(low, high) of a trace's asymmetric error bars."""
    y, e = list(trace.y), trace.error_y
    return [v - d for v, d in zip(y, e.arrayminus)], [v + u for v, u in zip(y, e.array)]


# ----------------------------------------------------------------------------------------------- HTML pages


def small_figure(title: str) -> go.Figure:
    fig = go.Figure(go.Scatter(x=[0, 1, 2], y=[0.5, 0.7, 0.9], name="acc"))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="accuracy")
    return fig


def test_reports_in_one_directory_share_one_plotly_js(tmp_path):
    source = reports.plotly_js_source().read_bytes()
    a = reports.write_html(tmp_path / "a.html", small_figure("first report"))
    b = reports.write_html(tmp_path / "b.html", ["<p>notes</p>", small_figure("second"), small_figure("third")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html", "plotly.min.js"]
    assert (tmp_path / "plotly.min.js").read_bytes() == source  # the installed package's bundle, offline
    for page in (a, b):
        text = page.read_text()
        assert page.stat().st_size < 200_000 and BUNDLE_MARK not in text
        assert '<script src="plotly.min.js"' in text and "cdn.plot.ly" not in text and "https://cdn" not in text
    assert "<title>first report</title>" in a.read_text() and b.read_text().count("Plotly.newPlot") == 2
    # a stale or damaged copy is replaced; an identical one is left alone
    (tmp_path / "plotly.min.js").write_text("old")
    reports.write_html(tmp_path / "c.html", small_figure("c"))
    assert (tmp_path / "plotly.min.js").read_bytes() == source


def test_write_html_refuses_what_is_not_a_figure(tmp_path):
    from interp.errors import ConfigError

    with pytest.raises(ConfigError, match="got dict; call .plot"):
        reports.write_html(tmp_path / "x.html", [small_figure("ok"), {"data": []}])
    assert not (tmp_path / "x.html").exists()


def test_self_contained_report_inlines_plotly(tmp_path):
    page = reports.write_html(tmp_path / "one.html", small_figure("to e-mail"), self_contained=True)
    text = page.read_text()
    assert BUNDLE_MARK in text and page.stat().st_size > 3_000_000
    assert 'src="plotly.min.js"' not in text and not (tmp_path / "plotly.min.js").exists()


# ----------------------------------------------------------------------------------------------- intervals


def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest

    for k, n in ((0, 10), (3, 10), (50, 100), (262, 262), (711, 1000)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = plots.wilson_interval(k / n, n)
        assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)
    assert all(math.isnan(v) for v in plots.wilson_interval(0.5, 0))


def test_auroc_interval_matches_the_bootstrap():
    """The Hanley-McNeil half-width agrees with a 2000-draw bootstrap of the AUROC on planted normal scores."""
    from interp.probes.linear import auroc

    g = torch.Generator().manual_seed(0)
    n_pos, n_neg = 150, 250
    scores = torch.cat([torch.randn(n_pos, generator=g) + 1.2, torch.randn(n_neg, generator=g)])
    y = torch.cat([torch.ones(n_pos), torch.zeros(n_neg)]).long()
    a = float(auroc(scores, y))
    lo, hi = plots.auroc_interval(a, n_pos, n_neg)
    boots = []
    for _ in range(2000):
        i = torch.cat([torch.randint(0, n_pos, (n_pos,), generator=g), n_pos + torch.randint(0, n_neg, (n_neg,), generator=g)])
        boots.append(float(auroc(scores[i], y[i])))
    se_boot = float(torch.tensor(boots).std())
    assert (hi - lo) / (2 * plots.Z95) == pytest.approx(se_boot, rel=0.15)
    assert lo < a < hi


# ----------------------------------------------------------------------------------------------- probe sweeps


def planted_sweep():
    """A ProbeSweep as train_probes returns it: 3 layers, a C grid of 2, CV on 200 fit rows, 80 test rows."""
    from interp.probes.linear import ProbeSweep

    hooks = [f"blocks.{i}.hook_out" for i in range(3)]
    acc = {(0, 0.1): 0.60, (0, 1.0): 0.62, (1, 0.1): 0.81, (1, 1.0): 0.78, (2, 0.1): 0.70, (2, 1.0): 0.74}
    cv_results = [{"hook": hooks[h], "C": c, "heldout_accuracy": a} for (h, c), a in acc.items()]
    chosen = {0: 1.0, 1: 0.1, 2: 1.0}
    rows = [
        {"hook": hooks[h], "layer": h, "C": chosen[h], "train_accuracy": 0.95, "heldout_accuracy": acc[(h, chosen[h])],
         "heldout_accuracy_std": 0.03, "heldout_auroc": acc[(h, chosen[h])] + 0.05, "heldout_recall_at_1pct_fpr": 0.1,
         "test_accuracy": acc[(h, chosen[h])] - 0.01, "test_auroc": acc[(h, chosen[h])] + 0.04, "majority": 0.5}
        for h in range(3)
    ]
    config = {"cv": 5, "group_by": "country", "C": [0.1, 1.0], "split": "dataset", "n_rows": 280, "n_fit": 200,
              "n_test": 80, "multiclass": None}
    provenance = {"store": "/x/capitals", "model": {"name": "all-MiniLM-L6-v2", "d_model": 384, "n_layers": 6},
                  "positions": "mean", "dataset": {"name": "capitals", "examples": 280}}
    return ProbeSweep(hooks=hooks, rows=rows, probes={}, best_hook=hooks[1], label="label", classes=[0, 1],
                      config=config, cv_results=cv_results, provenance=provenance)


def test_probe_sweep_figure_names_the_run_and_carries_intervals():
    sweep = planted_sweep()
    fig = sweep.plot()
    title = fig.layout.title.text
    assert "all-MiniLM-L6-v2" in title and "capitals" in title and "mean-pooled" in title
    assert "accuracy (fraction correct)" in axis_titles(fig, "yaxis") and "AUROC" in axis_titles(fig, "yaxis")
    assert any(t.startswith("layer") for t in axis_titles(fig, "xaxis"))
    assert list(fig.layout.xaxis.ticktext) == ["0<br>C=1", "1<br>C=0.1", "2<br>C=1"]  # the C each layer kept
    curves = [t for t in fig.data if t.type == "scatter"]
    held = next(t for t in curves if t.name.startswith("5-fold CV held-out") and t.xaxis == "x")
    test = next(t for t in curves if t.name.startswith("test split") and t.xaxis == "x")
    held_auc = next(t for t in curves if t.name.startswith("5-fold CV held-out") and t.xaxis == "x2")
    lo, hi = bar_bounds(held)
    for v, a, b in zip(held.y, lo, hi):  # Wilson over the 200 CV rows
        assert (a, b) == pytest.approx(plots.wilson_interval(v, 200))
    lo, hi = bar_bounds(test)
    assert (lo[1], hi[1]) == pytest.approx(plots.wilson_interval(0.80, 80))
    lo, hi = bar_bounds(held_auc)
    assert (lo[1], hi[1]) == pytest.approx(plots.auroc_interval(0.86, 100, 100))
    assert held.error_y.array is not None and "(200 rows, 95% CI)" in held.name
    heat = next(t for t in fig.data if t.type == "heatmap")
    assert list(heat.y) == ["0.1", "1"] and heat.z[0][1] == pytest.approx(0.81)
    stars = [(r, c) for r, row in enumerate(heat.text) for c, v in enumerate(row) if v.startswith("★")]
    assert sorted(stars, key=lambda rc: rc[1]) == [(1, 0), (0, 1), (1, 2)]  # (C row, layer): C=1, 0.1, 1
    assert "C (inverse L2 strength)" in axis_titles(fig, "yaxis")


def test_probe_sweep_report_states_setup_and_intervals(tmp_path):
    sweep = planted_sweep()
    page = reports.probe_sweep_report(sweep, tmp_path / "report.html", intro_html="<p>why</p>")
    text = page.read_text()
    for needle in ("all-MiniLM-L6-v2", "capitals", "<code>country</code> share a fold", "5-fold", "0.1, 1",
                   "C kept", "held-out acc [95% CI]", "blocks.1.hook_out ★", "<p>why</p>", "Hanley-McNeil"):
        assert needle in text, needle
    lo, hi = plots.wilson_interval(0.81, 200)
    assert f"0.810 [{lo:.3f}, {hi:.3f}]" in text
    assert "Recall at 1% FPR is not shown" in text  # 100 negatives over 5 folds: 20 a fold
    assert page.stat().st_size < 200_000 and (tmp_path / "plotly.min.js").exists()


def test_demo_report(tmp_path, capsys):
    """`interp demo` on MiniLM: a small report that names model, grouping and C grid, beside one plotly.min.js."""
    from interp.cli import main

    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    report = tmp_path / "probes" / "report.html"
    assert str(report.resolve()) in capsys.readouterr().out
    text = report.read_text()
    for needle in ("all-MiniLM-L6-v2", "<code>country</code> share a fold", "0.001, 0.01, 0.1, 1", "C kept",
                   "held-out AUROC [95% CI]", "True vs false capital-city statements"):
        assert needle in text, needle
    assert report.stat().st_size < 200_000 and BUNDLE_MARK not in text
    assert (tmp_path / "probes" / "plotly.min.js").stat().st_size > 1_000_000


# ----------------------------------------------------------------------------------------------- detectors


def detector_scores(threshold: float | None = 0.5):
    from interp.detectors import DetectorScores

    toks = [["a", "b", "c", "d", "e"], ["f", "g", "h"]]
    scores = [torch.tensor([0.1, 0.9, 2.0, -1.0, 0.4]), torch.tensor([-0.3, 0.2, 0.0])]
    return DetectorScores(
        token_ids=[torch.arange(5), torch.arange(3)], scores=scores,
        masks=[torch.ones(5, dtype=torch.bool), torch.tensor([True, True, False])],
        aggregate=torch.tensor([0.48 + 0.1, -0.05]), threshold=threshold, aggregation="mean", _tokens=toks,
    )


def test_detector_heatmap_has_label_flag_and_threshold_centre():
    from interp.detectors import DetectorReport

    ds = detector_scores(0.5)
    fig = DetectorReport(metrics={}, threshold=0.5, scores=ds, source="toy (2 texts)", labels=[1, 1],
                         detector="probe at blocks.1.hook_out of tiny").plot(width=4)
    heat, side = fig.data[0], fig.data[1]
    assert heat.zmid == 0.5 and heat.zmin == pytest.approx(0.5 - 1.5) and heat.zmax == pytest.approx(0.5 + 1.5)
    assert heat.colorscale[0][1] != heat.colorscale[-1][1]  # diverging
    assert heat.z.shape == (3, 4) and math.isnan(heat.z[2][2])  # text 0 wraps onto 2 lines; 'h' is outside the mask
    assert list(side.x) == ["true label", "flag"]
    # text 0 (line 0): positive and flagged (0.58 > 0.5); text 1 (line 2): positive, not flagged: a miss
    assert list(side.text[0]) == ["pos", "FLAG ✓"] and list(side.text[2]) == ["pos", "no ✗"]
    assert list(side.text[1]) == ["", ""]
    assert "aggregate score +0.5800" in side.customdata[0][1] and "(wrong)" in side.customdata[2][1]
    assert "toy (2 texts)" in fig.layout.title.text and "threshold +0.500" in fig.layout.title.text
    assert "probe at blocks.1.hook_out of tiny" in fig.layout.title.text
    assert "threshold" in heat.colorbar.title.text


def test_detector_heatmap_without_threshold_or_labels():
    fig = detector_scores(None).plot()
    assert len(fig.data) == 1 and fig.data[0].zmid == 0.0
    flag_only = detector_scores(0.5).plot()  # no labels: the flag column alone
    assert list(flag_only.data[1].x) == ["flag"]


# ----------------------------------------------------------------------------------------------- INLP, SAE comparison


def test_inlp_figure_has_wilson_bars():
    from interp.nullspace import INLPResult

    r = INLPResult(hook="blocks.2.hook_out", label="label", directions=torch.zeros(0, 4), projection=torch.eye(4),
                   accuracies=[0.9, 0.7, 0.52], majority=0.5, margin=0.02, mean=torch.zeros(4),
                   removed=[0, 1, 2], config={"n_test": 120},
                   provenance={"model": {"name": "tiny"}, "dataset": {"name": "capitals"}})
    fig = r.plot()
    lo, hi = bar_bounds(fig.data[0])
    for v, a, b in zip([0.9, 0.7, 0.52], lo, hi):
        assert (a, b) == pytest.approx(plots.wilson_interval(v, 120))
    assert "tiny" in fig.layout.title.text and "capitals" in fig.layout.title.text
    assert fig.layout.xaxis.title.text.startswith("directions removed") and "held-out accuracy" in fig.layout.yaxis.title.text


def test_sae_comparison_bars_have_intervals():
    table = pd.DataFrame({"method": ["dense probe", "best SAE latent"], "accuracy": [0.9, 0.7], "auroc": [0.95, 0.75]})
    fig = plots.sae_comparison(table, n_test=200, n_positive=80)
    lo, hi = bar_bounds(fig.data[0])
    assert (lo[0], hi[0]) == pytest.approx(plots.wilson_interval(0.9, 200))
    lo, hi = bar_bounds(fig.data[1])
    assert (lo[1], hi[1]) == pytest.approx(plots.auroc_interval(0.75, 80, 120))
    assert fig.layout.yaxis.title.text and fig.layout.xaxis.title.text


# ----------------------------------------------------------------------------------------------- steering


def sweep_table() -> pd.DataFrame:
    rows = []
    for a in (-2.0, 0.0, 2.0):
        for p in ("I think this film", "The food was"):
            rows.append({"alpha": a, "prompt": p, "text": f" generated at {a:+g} after {p!r}", "ld": a / 2, "proj": a})
    return pd.DataFrame(rows)


def test_logit_diff_names_its_tokens():
    from interp.steering import logit_diff

    assert logit_diff([" love"], [" hate"]).name == "logit_diff(' love' - ' hate')"
    assert logit_diff([" good", " great"], 7, at="first").name == "logit_diff(mean(' good', ' great') - 7, first token)"


def test_steering_curve_shows_texts_and_names_tokens():
    table = sweep_table()
    fig = plots.steering_curve(table, ["ld", "proj"], title="Steering gpt2: add at blocks.3.hook_out",
                               labels={"ld": "logit_diff(' love' - ' hate')", "proj": "projection"})
    titles = axis_titles(fig, "yaxis")
    assert "ld = logit_diff(' love' - ' hate') (logits)" in titles
    assert any(t.startswith("proj = projection") for t in titles)
    assert all(t.startswith("alpha (") for t in axis_titles(fig, "xaxis"))
    points = [t for t in fig.data if t.type == "scatter" and t.mode == "markers"]
    assert list(points[0].customdata) == list(table["text"])
    assert all(any(text[:20] in h for h in points[0].hovertext) for text in table["text"])
    means = [t for t in fig.data if t.type == "scatter" and t.mode == "lines+markers"]
    assert means[0].error_y.array is not None and len(means[0].error_y.array) == 3
    gen = next(t for t in fig.data if t.type == "table")
    assert list(gen.cells.values[-1]) == list(table["text"]) and list(gen.cells.values[0]) == ["-2", "-2", "+0", "+0", "+2", "+2"]


def test_steering_comparison_shows_texts():
    t = sweep_table()
    table = pd.concat([t.assign(method="probe"), t.assign(method="SAE latent")], ignore_index=True)
    fig = plots.steering_comparison(table, ["ld"], scale=3.0, labels={"ld": "logit_diff(' a' - ' b')"})
    assert fig.layout.xaxis.title.text == "alpha (multiple of 3 × unit direction)"
    assert "ld = logit_diff(' a' - ' b') (logits)" in axis_titles(fig, "yaxis")
    gen = next(d for d in fig.data if d.type == "table")
    first = table[table.prompt == "I think this film"]
    assert list(gen.cells.values[0]) == list(first["method"]) and list(gen.cells.values[-1]) == list(first["text"])
    curve = next(d for d in fig.data if d.type == "scatter")
    assert all("after 'I think this film'" in c for c in curve.customdata)
