"""``interp inlp STORE --hook H``: iterative nullspace projection of a label; curve, saved result, HTML figure."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inlp", help="remove a label's linear directions at one hook (INLP)")
    p.add_argument("store", help="activation store directory")
    p.add_argument("--hook", required=True, help="hook name or layer index")
    p.add_argument("--label", default="label", help="example field, or token_label (default: label)")
    p.add_argument("--max-iter", type=int, default=20, help="most directions to remove (iterations)")
    p.add_argument("--margin", type=float, default=0.02,
                   help="stop when held-out accuracy is within this of the majority class (negative: never stop)")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of each classifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test", default="auto", choices=["auto", "random"],
                   help="held-out rows: the dataset's split column when present (auto) or a random 25%% of examples")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="directory for inlp.json, inlp.safetensors and inlp.html")
    p.add_argument("--json", action="store_true", help="print the accuracy per iteration as one JSON document")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from interp.nullspace import inlp
    from interp.reports import write_html

    hook = int(args.hook) if args.hook.lstrip("-").isdigit() else args.hook
    result = inlp(
        args.store, hook, label=args.label, max_iter=args.max_iter, margin=None if args.margin < 0 else args.margin,
        C=args.C, seed=args.seed, test=args.test, backend=args.backend, device=args.device, progress=not args.quiet,
    )
    if args.out:
        out = Path(args.out)
        result.save(out)
        write_html(out / "inlp.html", result.plot())
    if args.json:
        import json

        from interp.artifacts import jsonable

        print(json.dumps(jsonable({
            "hook": result.hook, "label": result.label, "majority": result.majority, "accuracies": result.accuracies,
            "removed": result.removed, "n_directions": result.n_directions, "reached_chance": result.reached_chance,
            "out": args.out,
        })))
        return 0
    print(f"INLP on {result.hook}, label {result.label!r}: majority class {result.majority:.3f}")
    print(f"{'iteration':>9} {'directions removed':>18} {'held-out acc':>12}")
    for i, a in enumerate(result.accuracies):
        print(f"{i:>9} {result.removed[i]:>18} {a:>12.3f}")
    state = "reached chance" if result.reached_chance else "stopped at --max-iter before reaching chance"
    print(f"{result.n_directions} direction(s) removed; {state}")
    if args.out:
        print(f"wrote {out / 'inlp.json'}, {out / 'inlp.safetensors'}, {out / 'inlp.html'}")
    return 0
