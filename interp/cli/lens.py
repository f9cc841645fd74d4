"""``interp lens train STORE --out DIR``, ``interp lens show --model M --prompt "..."`` and ``interp layers STORE``:
tuned lenses trained from a store, what each layer predicts on a prompt, and layer-wise metrics and concept depth."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    lens = sub.add_parser("lens", help="logit lens and tuned lens: train from a store, show on a prompt")
    lsub = lens.add_subparsers(dest="lens_command", metavar="SUBCOMMAND")
    lsub.required = True
    t = lsub.add_parser("train", help="train a tuned lens from a store holding every layer's residual")
    t.add_argument("store", help="activation store with blocks.L.hook_out for the last layer (hooks='resid_post')")
    t.add_argument("--out", required=True, help="directory for tuned_lens.safetensors, tuned_lens.json, lens_kl.html")
    t.add_argument("--model", default=None, help="the store's model (default: the one its manifest names)")
    t.add_argument("--layers", default=None, help="comma-separated layers to train (default: every stored layer)")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=512)
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    t.add_argument("--lr", type=float, default=None,
                   help="default: 1.0 for sgd (Nesterov, scaled by 0.1), 1e-3 for adam")
    t.add_argument("--init", default="identity", choices=["identity", "shortcut"],
                   help="start each translator at the identity or at the least-squares map to the last layer")
    t.add_argument("--max-rows", type=int, default=50_000, help="most train rows held in memory (seeded sample)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None)
    t.add_argument("--json", action="store_true", help="print the held-out KL table as one JSON document")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)
    s = lsub.add_parser("show", help="what each layer predicts at each position of a prompt")
    s.add_argument("--model", required=True, help="a decoder: 'smollm2', a model directory or a Hugging Face name")
    s.add_argument("--prompt", required=True)
    s.add_argument("--lens", default=None, help="a tuned lens directory (from `interp lens train`) shown beside")
    s.add_argument("--k", type=int, default=3, help="top tokens per cell (default 3)")
    s.add_argument("--target", default=None, help="a token whose rank is printed per layer at the last position")
    s.add_argument("--color", default="entropy", choices=["entropy", "kl"])
    s.add_argument("--out", default=None, help="HTML file for the trajectory figure")
    s.add_argument("--device", default=None)
    s.set_defaults(func=run_show)
    y = sub.add_parser("layers", help="representation metrics per layer and concept depth from a store")
    y.add_argument("store")
    y.add_argument("--label", default="label", help="comma-separated example fields: one concept each")
    y.add_argument("--by", default=None, help="an example field: one concept per value (e.g. concept)")
    y.add_argument("--fraction", type=float, default=0.9, help="depth: first layer at this fraction of the best")
    y.add_argument("--cv", type=int, default=5)
    y.add_argument("--no-depth", action="store_true", help="metrics only")
    y.add_argument("--max-examples", type=int, default=500)
    y.add_argument("--skip-first", action="store_true", help="leave each example's first token out of the metrics")
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--out", default=None, help="directory for layers.json and layers.html")
    y.add_argument("--json", action="store_true")
    y.add_argument("--quiet", action="store_true")
    y.set_defaults(func=run_layers)


def store_model(store) -> str:
    """What to load for a store's model: the name it was loaded by (``load_model`` resolves bundled names, local
    directories and GGUF files from it), else its recorded path."""
    from interp.errors import ConfigError

    info = store.model_info
    where = info.get("name") or info.get("path")  # the name load_model was given: an alias, a path, a GGUF file
    if not where:
        raise ConfigError(f"store {store.path} does not name its model; pass --model")
    return str(where)


def run_train(args: argparse.Namespace) -> int:
    from interp.artifacts import jsonable
    from interp.lenses import lens_kl, train_tuned_lens
    from interp.cli.capture import parse_layers
    from interp.model import load_model
    from interp.plots import lens_kl_figure
    from interp.reports import write_html
    from interp.store import ActivationStore

    store = ActivationStore(args.store)
    model = load_model(args.model or store_model(store), device=args.device, progress=not args.quiet)
    layers = parse_layers(args.layers or None)
    lens = train_tuned_lens(store, model, layers, steps=args.steps, batch_size=args.batch_size,
                            optimizer=args.optimizer, lr=args.lr, init=args.init,
                            max_rows=args.max_rows, seed=args.seed, device=args.device, progress=not args.quiet)
    out = lens.save(args.out)
    table = lens_kl(store, model, lens, None if layers is None else [*lens.layers, int(model.cfg.n_layers) - 1])
    write_html(out / "lens_kl.html", lens_kl_figure(table))
    if args.json:
        print(json.dumps(jsonable({"out": str(out), "layers": table.to_dict("records")})))
        return 0
    print(f"held-out KL(final || lens) in nats, {int(table.n.iloc[0])} rows:")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {out / 'tuned_lens.safetensors'}, {out / 'tuned_lens.json'}, {out / 'lens_kl.html'}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from interp.lenses import TunedLens, trajectory
    from interp.model import load_model
    from interp.reports import write_html

    tuned = TunedLens.load(args.lens) if args.lens else None
    model = load_model(args.model, device=args.device)
    shown = [trajectory(model, args.prompt, k=args.k, target=args.target)]
    if tuned is not None:
        shown.append(trajectory(model, args.prompt, tuned, k=args.k, target=args.target))
    for t in shown:
        print(f"{t.lens}: top tokens after {t.tokens[-1]!r} (last position)")
        for i, layer in enumerate(t.layers):
            tops = ", ".join(f"{tok!r} {p:.2f}" for tok, p in zip(t.top_tokens[i][-1], t.top_probs[i, -1].tolist()))
            rank = f"  rank of {args.target!r}: {int(t.target_rank[i, -1])}" if t.target_rank is not None else ""
            print(f"  layer {layer:>3}  entropy {float(t.entropy[i, -1]):6.3f}  KL {float(t.kl[i, -1]):7.4f}  "
                  f"{tops}{rank}")
    if args.out:
        path = write_html(Path(args.out), shown[0].plot(shown[1] if len(shown) > 1 else None, color=args.color))
        print(f"wrote {path}")
    return 0


def run_layers(args: argparse.Namespace) -> int:
    from interp.artifacts import jsonable
    from interp.layers import concept_depth, layer_metrics
    from interp.reports import write_html
    from interp.store import ActivationStore, atomic_write_json

    store = ActivationStore(args.store)
    figures, result = [], {"store": str(store.path)}
    if store.positions == "all":
        metrics = layer_metrics(store, max_examples=args.max_examples, skip_first=args.skip_first, seed=args.seed,
                                progress=not args.quiet)
        figures.append(metrics.plot())
        result["metrics"] = metrics.rows
    elif args.no_depth:
        from interp.errors import ConfigError

        raise ConfigError(f"store {store.path} holds positions={store.positions!r}: representation metrics need "
                          "positions='all'; drop --no-depth to get concept depth")
    if not args.no_depth:
        labels = [x.strip() for x in args.label.split(",") if x.strip()]
        depth = concept_depth(store, labels, by=args.by, fraction=args.fraction, cv=args.cv, seed=args.seed,
                              progress=not args.quiet)
        figures.append(depth.plot())
        result["concept_depth"] = depth.rows
        result["accuracy_curves"] = depth.curves
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "layers.json", jsonable(result))
        write_html(out / "layers.html", figures)
    if args.json:
        print(json.dumps(jsonable(result)))
        return 0
    import pandas as pd

    if "metrics" in result:
        print("representation metrics per layer:")
        frame = pd.DataFrame(result["metrics"]).drop(columns="hook")
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if "concept_depth" in result:
        print(f"concept depth (first layer at {args.fraction:.0%} of the best held-out accuracy, 95% CI over folds):")
        cols = ["concept", "depth", "ci_low", "ci_high", "best_layer", "best_accuracy"]
        print(pd.DataFrame(result["concept_depth"])[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        print(f"wrote {out / 'layers.json'}, {out / 'layers.html'}")
    return 0
