"""``interp sae train|eval|compare``: train a TopK SAE on a store, measure one, compare it with probes."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sae", help="sparse autoencoders: train on a store, evaluate, compare with probes")
    s = p.add_subparsers(dest="sae_command", metavar="ACTION")
    s.required = True

    t = s.add_parser("train", help="train a TopK SAE on one hook of a store (SAELens layout, resumable)")
    t.add_argument("store", help="activation store directory")
    t.add_argument("--hook", required=True, help="hook name (aliases accepted) or layer index")
    t.add_argument("--d-sae", type=int, required=True, help="number of latents")
    t.add_argument("--k", type=int, required=True, help="active latents per row (TopK)")
    t.add_argument("--out", required=True, help="output directory: cfg.json, sae_weights.safetensors, checkpoints/")
    t.add_argument("--steps", type=int, default=None, help="training steps (default: from --tokens)")
    t.add_argument("--tokens", type=int, default=None, help="rows to train on, repeating the store (default 2M)")
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-4 / sqrt(d_sae / 16384))")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--device", default="cpu", help="cpu | cuda")
    t.add_argument("--json", action="store_true", help="print the saved SAE's config and final metrics as JSON")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)

    e = s.add_parser("eval", help="reconstruction metrics of an SAE over a store: MSE, FVE, L0, dead latents")
    e.add_argument("sae", help="SAE directory (SAELens or EleutherAI layout)")
    e.add_argument("store", help="activation store directory")
    e.add_argument("--hook", default=None, help="store hook to read (default: the SAE's hook_name)")
    e.add_argument("--batch-size", type=int, default=8192)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=run_eval)

    t = s.add_parser("top", help="the store rows (tokens or examples) on which given latents fire most")
    t.add_argument("sae", help="SAE directory (SAELens or EleutherAI layout)")
    t.add_argument("store", help="activation store directory")
    t.add_argument("--latent", type=int, action="append", required=True, help="a latent index (repeat for more)")
    t.add_argument("-n", type=int, default=20, help="rows per latent")
    t.add_argument("--hook", default=None, help="store hook to read (default: the SAE's hook_name)")
    t.add_argument("--batch-size", type=int, default=8192)
    t.add_argument("--device", default="cpu")
    t.add_argument("--json", action="store_true", help="print JSON records")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=run_top)

    c = s.add_parser("compare", help="dense probe vs diff-in-means vs best SAE latent vs sparse probes on a label")
    c.add_argument("sae", help="SAE directory (SAELens or EleutherAI layout)")
    c.add_argument("store", help="activation store directory")
    c.add_argument("--label", default="label", help="binary example field, or token_label")
    c.add_argument("--hook", default=None, help="store hook to read (default: the SAE's hook_name)")
    c.add_argument("--ks", default="1,2,4,8,16", help="sparse-probe sizes, comma-separated")
    c.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic probes")
    c.add_argument("--test-size", type=float, default=0.25)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu")
    c.add_argument("--out", default=None, help="directory to save comparison.json + latents.safetensors")
    c.add_argument("--html", default=None, help="write the plotly figure to this .html file")
    c.add_argument("--json", action="store_true", help="print the table as JSON")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    g = c.add_argument_group(
        "steering",
        "also steer a model along the best latent's decoder row and along the"
        " diff-in-means direction (interp.comparisons.compare_sae_steering)",
    )
    g.add_argument("--steer-model", default=None, help="the decoder model the store was captured from (dir or name)")
    g.add_argument("--prompt", action="append", default=[], help="a prompt to steer (repeat for a batch)")
    g.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    g.add_argument("--alphas", default="-1,-0.5,0,0.5,1", help="in units of the mean activation norm at the hook")
    g.add_argument("--latent", type=int, default=None, help="steer with this latent (default: the best latent)")
    g.add_argument("--max-new-tokens", type=int, default=24)
    c.set_defaults(func=run_compare)


def _hook(text: str | None) -> str | int | None:
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def run_train(args: argparse.Namespace) -> int:
    from interp.sae import train_topk_sae

    sae = train_topk_sae(
        args.store,
        _hook(args.hook),
        args.d_sae,
        args.k,
        out_dir=args.out,
        n_steps=args.steps,
        n_tokens=args.tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        device=args.device,
        progress=not args.quiet,
    )
    history = getattr(sae, "history_", [])
    if args.json:
        from interp.artifacts import jsonable

        print(json.dumps(jsonable({"out": str(args.out), "sae": sae.describe(), "final": history[-1] if history else None})))
        return 0
    last = f", final normalised MSE {history[-1]['fvu']:.4f}" if history else ""
    print(f"saved {sae} to {args.out}{last}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from interp.sae import SAE, evaluate

    sae = SAE.load(args.sae, device=args.device)
    metrics = evaluate(sae, args.store, _hook(args.hook), batch_size=args.batch_size, progress=not args.quiet)
    print(json.dumps(metrics.to_dict(), indent=2) if args.json else metrics)
    return 0


def run_top(args: argparse.Namespace) -> int:
    from interp.sae import SAE, top_activations

    sae = SAE.load(args.sae, device=args.device)
    table = top_activations(
        args.store, sae, args.latent, hook=_hook(args.hook), n=args.n, batch_size=args.batch_size,
        progress=not args.quiet,
    )  # fmt: skip
    if args.json:
        print(table.to_json(orient="records"))
    elif table.empty:
        print("these latents never fire on this store")
    else:
        shown = table.drop(columns=["row"]).copy()
        shown["text"] = [t if t is None or len(t) <= 70 else t[:67] + "..." for t in shown["text"]]
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from interp.comparisons import compare
    from interp.errors import ConfigError
    from interp.sae import SAE

    try:
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--ks {args.ks!r}: give comma-separated integers such as 1,2,4,8,16") from None
    steer = _steering_args(args)  # checked before the long work
    sae = SAE.load(args.sae, device=args.device)
    result = compare(
        args.store,
        _hook(args.hook),
        args.label,
        sae,
        ks=ks,
        C=args.C,
        test_size=args.test_size,
        seed=args.seed,
        progress=not args.quiet,
    )
    steering = _compare_steering(args, sae, result, *steer) if steer else None
    status = sys.stderr if args.json else sys.stdout  # with --json, stdout holds one JSON document
    if args.json:
        body = {"comparison": result.table.to_dict(orient="records")}
        if steering is not None:
            body["steering"] = {"config": steering.config, "rows": json.loads(steering.table.to_json(orient="records"))}
        print(json.dumps(body if steering is not None else body["comparison"], indent=2, default=str))
    else:
        print(result)
        if steering is not None:
            print()
            print(steering)
    if args.out:
        print(f"saved to {result.save(args.out)}", file=status)
        if steering is not None:
            print(f"steering comparison saved to {steering.save(Path(args.out) / 'steering')}", file=status)
    if args.html:
        from interp.reports import write_html

        write_html(args.html, result.plot())
        print(f"figure written to {args.html}", file=status)
        if steering is not None:
            html = Path(args.html)
            html = html.with_name(f"{html.stem}-steering{html.suffix or '.html'}")
            write_html(html, steering.plot())
            print(f"steering figure written to {html}", file=status)
    return 0


def _steering_args(args: argparse.Namespace) -> tuple[list[str], list[float]] | None:
    from interp.cli.steer import _prompts
    from interp.errors import ConfigError

    if args.steer_model is None:
        if args.prompt or args.prompts_file or args.latent is not None:
            raise ConfigError("--prompt/--prompts-file/--latent are for steering: give the model with --steer-model")
        return None
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        raise ConfigError(f"--alphas {args.alphas!r}: give comma-separated numbers such as -1,0,1") from None
    if not alphas:
        raise ConfigError("--alphas is empty: give comma-separated numbers such as -1,0,1")
    return _prompts(args), alphas


def _compare_steering(args: argparse.Namespace, sae, comparison, prompts: list[str], alphas: list[float]):
    from interp.comparisons import compare_sae_steering
    from interp.model import load_model

    model = load_model(args.steer_model, device=args.device)
    return compare_sae_steering(
        model,
        prompts,
        args.store,
        args.label,
        sae,
        comparison=comparison,
        latent=args.latent,
        hook=_hook(args.hook),
        alphas=alphas,
        test_size=args.test_size,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        progress=not args.quiet,
    )
