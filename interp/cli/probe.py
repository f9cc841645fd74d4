"""``interp probe STORE``: a logistic probe per layer with cross-validation; table, saved sweep, HTML figure."""

from __future__ import annotations

import argparse
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
    p.add_argument("--max-memory-mb", type=float, default=4096,
                   help="hold the selected rows in memory up to this many MiB, else stream the store in chunks "
                        "(default: 4096). Under torchrun, each rank handles a slice of the rows (gloo)")
    p.add_argument("--out", default=None, help="directory for sweep.json, probes.safetensors and sweep.html")
    p.add_argument("--json", action="store_true", help="print the per-hook table and the best hook as one JSON document")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verify", action="store_true",
                   help="check every shard's sha256 and examples.jsonl before training (refuse a damaged store)")
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


def sweep_report(
    store,
    out_dir: str | os.PathLike,
    label: str = "label",
    cv: int | None = 5,
    sweep=None,
    progress: bool = True,
    intro_html: str = "",
    self_contained: bool = False,
    title: str | None = None,
    **kwargs,
) -> Path:
    """Run (or take) a probe layer sweep on ``store`` and write ``out_dir/report.html`` with its figure and table.

    The sweep itself is saved next to it (``sweep.json``, ``probes.safetensors``), and so is the
    ``plotly.min.js`` the report loads (unless ``self_contained``). Returns the report's path.
    """
    from interp.probes.linear import train_probes
    from interp.reports import probe_sweep_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if sweep is None:
        sweep = train_probes(store, label=label, cv=cv, progress=progress, **kwargs)
    sweep.save(out)
    return probe_sweep_report(sweep, out / "report.html", title=title, intro_html=intro_html,
                              self_contained=self_contained)


def run(args: argparse.Namespace) -> int:
    from interp.distributed import init_from_env

    init_from_env()  # under torchrun: one gloo group; every rank sweeps a slice of the rows, rank 0 writes
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from interp.distributed import is_main
    from interp.errors import ConfigError
    from interp.probes.linear import train_probes
    from interp.store import ActivationStore

    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a directory for sweep.json, probes.safetensors, sweep.html")
    sweep = train_probes(
        ActivationStore(args.store, verify=args.verify),
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
        max_memory_mb=args.max_memory_mb,
        progress=not args.quiet,
    )
    if not is_main():  # every rank holds the same sweep; rank 0 writes and prints it
        return 0
    if args.out:
        out = Path(args.out)
        from interp.reports import probe_sweep_report

        sweep.save(out)
        probe_sweep_report(sweep, out / "sweep.html")
    if args.json:
        import json

        from interp.artifacts import jsonable

        print(json.dumps(jsonable({"best_hook": sweep.best_hook, "rows": sweep.rows, "out": args.out})))
        return 0
    print(sweep.table())
    best = next(r for r in sweep.rows if r["hook"] == sweep.best_hook)
    print(f"best hook: {sweep.best_hook} (held-out accuracy {best['heldout_accuracy']:.3f}, "
          f"majority class {best['majority']:.3f})")
    if args.out:
        print(f"wrote {out / 'sweep.json'}, {out / 'probes.safetensors'}, {out / 'sweep.html'}")
    return 0
