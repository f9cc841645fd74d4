"""``interp detect fit|score|monitor|report``: build a detector from a store, score text, watch generation."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect", help="detectors: fit on a store, score text per token, monitor generation")
    s = p.add_subparsers(dest="detect_command", metavar="ACTION")
    s.required = True

    f = s.add_parser("fit", help="fit a probe or direction detector on a store and calibrate its threshold")
    f.add_argument("store", help="activation store directory")
    f.add_argument("--label", default="label", help="example field (one label per text) or token_label")
    f.add_argument("--out", required=True, help="directory to save the detector in")
    f.add_argument("--hook", default=None, help="hook name or layer (default: the store's only hook; 'best' picks)")
    f.add_argument("--method", default="probe", choices=["probe", "diff_in_means"])
    f.add_argument("--aggregation", default=None, choices=["mean", "max", "topk", "last"],
                   help="how token scores make a text's score (default: last for last-token stores, else mean)")
    f.add_argument("--k", type=int, default=5, help="tokens averaged by --aggregation topk")
    f.add_argument("--mask", default=None, help="tokens that count when scoring text: all, text, spans, or a region")
    f.add_argument("--target-fpr", type=float, default=0.01, help="false-positive rate the threshold is set for")
    f.add_argument("--control", default=None, help="store of ordinary text to calibrate the threshold on")
    f.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the probe")
    f.add_argument("--val-size", type=float, default=0.25, help="share of training examples held out to calibrate")
    f.add_argument("--group-by", default=None,
                   help="example field keeping examples together in that split (default: pair_id / group / pair /"
                        " country when the examples pair on it; 'none' for no grouping)")
    f.add_argument("--group", dest="group_by", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spelling
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--json", action="store_true", help="print the summary as JSON")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=run_fit)

    sc = s.add_parser("score", help="score texts token by token with a saved detector")
    sc.add_argument("detector", help="detector directory")
    sc.add_argument("--model", required=True, help="model name or directory (the one the detector was made for)")
    sc.add_argument("--text", action="append", default=[], help="text to score (repeatable)")
    sc.add_argument("--file", default=None, help="jsonl dataset (text, optional regions/spans) to score")
    sc.add_argument("--mask", default=None, help="override the detector's mask: all, text, spans, or a region")
    sc.add_argument("--batch-size", type=int, default=32)
    sc.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    sc.add_argument("--color", default="auto", choices=["auto", "always", "never"], help="ANSI colours")
    sc.add_argument("--json", action="store_true", help="print per-token scores as JSON lines")
    sc.add_argument("--quiet", action="store_true", help="no progress bar")
    sc.set_defaults(func=run_score)

    m = s.add_parser("monitor", help="generate from a prompt and score each new token as it is produced")
    m.add_argument("detector", help="detector directory")
    m.add_argument("--model", required=True, help="decoder-only model name or directory")
    m.add_argument("--prompt", required=True)
    m.add_argument("--max-new-tokens", type=int, default=64)
    m.add_argument("--stop-above", default=None,
                   help="stop right after the first token scoring above this number, or 'threshold'")
    m.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    m.add_argument("--temperature", type=float, default=1.0)
    m.add_argument("--top-k", type=int, default=None)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-eos-stop", action="store_true", help="keep generating past the end-of-text token")
    m.add_argument("--steer", default=None, metavar="DIRECTION",
                   help="a saved direction to steer along while monitoring (the monitor sees the steered run)")
    m.add_argument("--alpha", type=float, default=None, help="with --steer: scale for add, value for clamp")
    m.add_argument("--op", default="add", help="with --steer: add | ablate | clamp")
    m.add_argument("--steer-positions", dest="positions", default="generated",
                   help="with --steer: where to steer: all | prompt | generated | indices")
    m.add_argument("--positions", dest="positions", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spelling
    m.add_argument("--device", default=None)
    m.add_argument("--color", default="auto", choices=["auto", "always", "never"])
    m.add_argument("--json", action="store_true", help="print one JSON line per token, then a summary")
    m.add_argument("--quiet", action="store_true", help="print only the summary, not a line per token")
    m.set_defaults(func=run_monitor)

    r = s.add_parser("report", help="AUROC, accuracy, recall at 1%% FPR at example, token and span level")
    r.add_argument("detector", help="detector directory")
    r.add_argument("--model", default=None, help="model to score --dataset with")
    r.add_argument("--dataset", default=None, help="dataset name or jsonl (with --model)")
    r.add_argument("--data", dest="dataset", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the old spelling
    r.add_argument("--store", default=None, help="or an activation store to score without a model")
    r.add_argument("--split", default="test", help="test | train | all")
    r.add_argument("--device", default=None)
    r.add_argument("--html", default=None, help="write the token heatmap to this .html file (with --model)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=run_report)


def _use_color(choice: str) -> bool:
    return choice == "always" or (choice == "auto" and sys.stdout.isatty())


def _hook(text: str | None):
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def run_fit(args: argparse.Namespace) -> int:
    from interp.detectors import Detector
    from interp.store import ActivationStore

    store = ActivationStore(args.store)
    control = ActivationStore(args.control) if args.control else None
    det = Detector(
        method=args.method,
        hook=_hook(args.hook),
        aggregation=args.aggregation,
        k=args.k,
        mask=args.mask,
        target_fpr=args.target_fpr,
        C=args.C,
        val_size=args.val_size,
        group=False if args.group_by == "none" else args.group_by,
        seed=args.seed,
    ).fit(store, args.label, control=control, progress=not args.quiet)
    det.save(args.out)
    summary = {
        "out": args.out,
        "hook": det.hook_,
        "level": det.level_,
        "threshold": det.threshold_,
        "calibration": det.calibration_,
        "validation": det.metrics_,
    }
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        m = det.metrics_.get(det.level_, {})
        print(f"saved {det!r} to {args.out}")
        print(
            f"validation ({det.level_} level): AUROC {m.get('auroc', float('nan')):.4f}, "
            f"recall@1%FPR {m.get('recall_at_1pct_fpr', float('nan')):.4f}, "
            f"accuracy {m.get('accuracy', float('nan')):.4f}"
        )
        cal = det.calibration_
        print(f"threshold {det.threshold_:+.4f} at target FPR {cal['target_fpr']:g} on {cal['n_negatives']} "
              f"{cal['source']} negatives (FPR there {cal['fpr']:.4f})")
    return 0


def _load(args: argparse.Namespace):
    from interp.detectors import Detector
    from interp.model import load_model

    model = load_model(args.model, device=args.device)
    return Detector.load(args.detector, model=model), model


def run_score(args: argparse.Namespace) -> int:
    from interp.datasets import load_dataset
    from interp.errors import ConfigError

    if not args.text and not args.file:
        raise ConfigError("give --text \"...\" (repeatable) or --file data.jsonl to score")
    det, model = _load(args)
    inputs = list(args.text) if args.text else load_dataset(args.file, require_label=False)
    scores = det.score(model, inputs, mask=args.mask, batch_size=args.batch_size,
                       progress=not (args.json or args.quiet))
    if args.json:
        for rec in scores.to_records():
            print(json.dumps(rec))
        return 0
    color = _use_color(args.color)
    for i in range(len(scores)):
        if len(scores) > 1:
            print(f"--- text {i}")
        print(scores.format(i, color=color))
    return 0


def run_monitor(args: argparse.Namespace) -> int:
    from interp.cli.steer import _load_direction, _positions
    from interp.detectors import _ansi
    from interp.steering import Intervention

    steering = []
    if args.steer:
        steering = [Intervention(_load_direction(args.steer), op=args.op, alpha=args.alpha,
                                 positions=_positions(args.positions))]
    det, model = _load(args)
    stop = None
    if args.stop_above is not None:
        stop = True if args.stop_above == "threshold" else float(args.stop_above)
    color = _use_color(args.color)
    line_thr = det.threshold_ if stop is None or stop is True else stop

    def show(i: int, token_id: int, token: str, score: float) -> None:
        if args.quiet:
            return
        if args.json:
            print(json.dumps({"index": i, "token_id": token_id, "token": token, "score": score}), flush=True)
            return
        flag = "!" if line_thr is not None and score > line_thr else " "
        row = f"{i:5d} {flag} {token!r:<18} {score:+9.4f}"
        print(_ansi(row, score, line_thr, 4.0) if color else row, flush=True)

    res = det.monitor(
        model,
        args.prompt,
        args.max_new_tokens,
        on_token=show,
        stop_above=stop,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        stop_at_eos=not args.no_eos_stop,
        steering=steering,
    )
    summary = {
        "text": res.text,
        "tokens": len(res.token_ids),
        "stopped": res.stopped,
        "stop_index": res.stop_index,
        "reason": res.reason,
        det.aggregation_: res.aggregate,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"generated: {res.text!r}")
        print(f"{len(res.token_ids)} tokens, {det.aggregation_} score {res.aggregate:+.4f}, stopped by {res.reason}"
              + (f" at token {res.stop_index}" if res.stopped else ""))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from interp.detectors import Detector
    from interp.errors import ConfigError
    from interp.model import load_model
    from interp.store import ActivationStore

    split = None if args.split == "all" else args.split
    if args.store:
        det = Detector.load(args.detector)
        rep = det.report(ActivationStore(args.store), split=split)
    elif args.model and args.dataset:
        model = load_model(args.model, device=args.device)
        det = Detector.load(args.detector, model=model)
        rep = det.report(model, args.dataset, split=split, progress=not (args.json or args.quiet))
        if args.html:
            from interp.reports import write_html

            write_html(args.html, rep.plot())
    else:
        raise ConfigError("give --store STORE, or --model MODEL with --dataset DATASET")
    print(json.dumps(rep.to_dict()) if args.json else rep)
    return 0
