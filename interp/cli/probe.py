"""``interp probe STORE``: a logistic probe per layer with cross-validation; table, saved sweep, HTML figure."""

from __future__ import annotations

import argparse
import html
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="train a logistic probe per hook (layer sweep with cross-validation)")
    p.add_argument("store", help="activation store directory")
    p.add_argument("--label", default="label", help="example field to predict, or token_label (default: label)")
    p.add_argument("--hooks", default="all", help="'all' or comma-separated hook names / layer indices")
    p.add_argument("--cv", type=int, default=5, help="cross-validation folds (0: score on the test split only)")
    p.add_argument("--C", default="1.0",
                   help="inverse L2 strength; comma-separated values are all fit, the best CV kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test", default="auto", choices=["auto", "none", "random"],
                   help="held-out test rows: the dataset's split column (auto), none, or a random 25%% of examples")
    p.add_argument("--group-by", default="auto",
                   help="example field whose equal values share a CV fold (auto: pair_id when present; 'none')")
    p.add_argument("--max-rows", type=int, default=None, help="subsample this many labelled rows (seeded)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--out", default=None, help="directory for sweep.json, probes.safetensors and sweep.html")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def parse_hooks(text: str):
    if text == "all":
        return "all"
    return [int(h) if h.strip().lstrip("-").isdigit() else h.strip() for h in text.split(",") if h.strip()]


def parse_floats(text: str, flag: str) -> list[float]:
    from interp.errors import ConfigError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give comma-separated numbers such as 0.1,1,10") from None


def figure_html(fig, title: str, body_html: str = "") -> str:
    """A standalone HTML page (plotly.js inlined: works offline) with a title, optional HTML and the figure."""
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2em} table{border-collapse:collapse;font-size:13px}"
        "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{body_html}"
        + fig.to_html(full_html=False, include_plotlyjs=True)
        + "</body></html>\n"
    )


def sweep_html(sweep, title: str) -> str:
    frame = sweep.to_frame()
    cols = [c for c in ("hook", "layer", "C", "train_accuracy", "heldout_accuracy", "heldout_accuracy_std",
                        "heldout_auroc", "heldout_recall_at_1pct_fpr", "test_accuracy", "test_auroc") if c in frame]
    summary = (
        f"<p>label <code>{html.escape(sweep.label)}</code>, store "
        f"<code>{html.escape(str(sweep.provenance.get('store')))}</code>, {sweep.config.get('n_rows')} rows, "
        f"cv={sweep.config.get('cv')}, split={sweep.config.get('split')}."
        f" Best hook: <b>{html.escape(sweep.best_hook)}</b>.</p>"
    )
    table = frame[cols].to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="")
    return figure_html(sweep.plot(title=title), title, summary + table)


def sweep_report(
    store,
    out_dir: str | os.PathLike,
    label: str = "label",
    cv: int | None = 5,
    sweep=None,
    progress: bool = True,
    **kwargs,
) -> Path:
    """Run (or take) a probe layer sweep on ``store`` and write ``out_dir/report.html`` with its figure and table.

    The sweep itself is saved next to it (``sweep.json``, ``probes.safetensors``). Returns the report's path.
    """
    from interp.probes.linear import train_probes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if sweep is None:
        sweep = train_probes(store, label=label, cv=cv, progress=progress, **kwargs)
    sweep.save(out)
    path = out / "report.html"
    path.write_text(sweep_html(sweep, f"Probe layer sweep: {sweep.label}"), encoding="utf-8")
    return path


def run(args: argparse.Namespace) -> int:
    from interp.probes.linear import train_probes

    sweep = train_probes(
        args.store,
        label=args.label,
        hooks=parse_hooks(args.hooks),
        cv=args.cv if args.cv >= 2 else None,
        C=parse_floats(args.C, "--C"),
        seed=args.seed,
        test=args.test,
        group_by=None if args.group_by == "none" else args.group_by,
        max_rows=args.max_rows,
        backend=args.backend,
        device=args.device,
        progress=not args.quiet,
    )
    print(sweep.table())
    best = next(r for r in sweep.rows if r["hook"] == sweep.best_hook)
    print(f"best hook: {sweep.best_hook} (held-out accuracy {best['heldout_accuracy']:.3f}, "
          f"majority class {best['majority']:.3f})")
    if args.out:
        out = Path(args.out)
        sweep.save(out)
        (out / "sweep.html").write_text(sweep_html(sweep, f"Probe sweep: {sweep.label}"), encoding="utf-8")
        print(f"wrote {out / 'sweep.json'}, {out / 'probes.safetensors'}, {out / 'sweep.html'}")
    return 0
