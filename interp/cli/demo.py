"""``interp demo`` (what ``make demo`` runs): the main job on the bundled default model.

Captures the bundled capitals dataset (true and false statements about capital cities) from all-MiniLM-L6-v2,
mean-pooled, every layer's residual stream; prints a layer-by-layer summary of the store; runs a 5-fold probe
sweep over every layer; and writes ``demo/probes/report.html`` (with the ``plotly.min.js`` it loads beside it, or
inlined with ``--self-contained``). Then the real-LLM story on the bundled chat decoder, SmolLM2-135M-Instruct
(``interp.cli.demo_llm``): an on-policy capture of its own answers, a detector of its wrong answers, one monitored
generation printed token by token, a steering sweep, and ``demo/llm/report.html`` linking them (``--skip-llm``
leaves it out). Opens nothing: it prints the reports' paths. Running it again reuses the finished stores.
"""

from __future__ import annotations

import argparse
from pathlib import Path


C_GRID = [0.001, 0.01, 0.1, 1.0]
INTRO = (
    "<p>Can a linear read-out of the residual stream tell a true statement about a capital city from a false one "
    "(<i>The capital city of Belize is Belmopan</i>, label 1, vs <i>The national capital of Rwanda is "
    "Tegucigalpa</i>, label 0)? One logistic probe per layer on the "
    "mean-pooled activations of every statement; each country's true and false statement share a "
    "cross-validation fold, so no probe is scored on the twin of a statement it was trained on.</p>"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="capture the bundled capitals dataset from the default model and sweep probes")
    p.add_argument("--out", default="demo", help="directory for the store and the report (default: demo)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--device", default=None)
    p.add_argument("--self-contained", action="store_true",
                   help="inline plotly.js in the report (one ~5 MB file to send) instead of loading it from beside it")
    p.add_argument("--skip-llm", action="store_true", help="only the MiniLM probe sweep, not the SmolLM2 part")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def layer_summary(store) -> str:
    """Per hook: mean activation norm and the class-mean gap relative to the spread (a quick look at signal)."""
    y = store.labels()
    lines = [f"{'hook':<22} {'mean |x|':>9} {'class gap / spread':>19}"]
    for hook in store.hooks:
        x = store.activations(hook).float()
        gap = (x[y == 1].mean(0) - x[y == 0].mean(0)).norm() / x.std(0).norm()
        lines.append(f"{hook:<22} {x.norm(dim=1).mean():>9.2f} {gap:>19.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from interp.capture import capture
    from interp.cli.probe import sweep_report
    from interp.cli.store import print_info
    from interp.model import load_model

    out = Path(args.out)
    model = load_model(args.model, device=args.device)
    store = capture(model, "capitals", hooks="resid_post", positions="mean", out=out / "capitals", batch_size=64,
                    dtype="float16", progress=not args.quiet)
    print_info(store)
    print()
    print(layer_summary(store))
    print()
    from interp.probes.linear import train_probes

    # the two statements about a country share a CV fold (group_by), so no fold trains on its twin
    sweep = train_probes(store, label="label", cv=5, C=C_GRID, group_by="country", seed=0, progress=not args.quiet)
    print(sweep.table())
    report = sweep_report(store, out / "probes", sweep=sweep, intro_html=INTRO, self_contained=args.self_contained,
                          title=f"True vs false capital-city statements: a linear probe per layer of "
                                f"{store.model_info.get('name', args.model)}")
    print(f"\nbest layer: {sweep.best_hook}; report written to {report.resolve()}")
    if not args.skip_llm:
        from interp.cli import demo_llm

        print()
        demo_llm.run(out, quiet=args.quiet)  # prints its report's path
    return 0
