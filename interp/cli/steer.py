"""``interp steer``: generate with a saved direction added, ablated or clamped, or sweep alpha.

    interp steer --model runs/gpt2 --direction dirs/sentiment --alpha 4 --op add --prompt "I think that"
    interp steer --model runs/gpt2 --direction dirs/sentiment --alphas -4,-2,0,2,4 --prompt "I think that"
"""

from __future__ import annotations

import argparse
import re

# "-4,-2,0" must read as a value, not an option: widen argparse's idea of a negative number for this parser
_NUMBER_LIST = re.compile(r"^-\d+$|^-\d*\.\d+$|^-[\d.eE+\-]*(,[\d.eE+\-]*)+$")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("steer", help="generate with a direction added / ablated / clamped, or sweep alpha")
    p._negative_number_matcher = _NUMBER_LIST  # type: ignore[attr-defined]
    p.add_argument("--model", required=True, help="a model directory, a HF name (a decoder such as GPT-2)")
    p.add_argument("--direction", required=True, help="a saved direction directory (direction.json + .safetensors)")
    p.add_argument("--hook", default=None, help="steer here (comma-separate several) instead of the direction's hook")
    p.add_argument("--op", default="add", help="add (x + alpha v) | ablate (remove it) | clamp (set it to alpha)")
    p.add_argument("--alpha", type=float, default=None, help="scale for add, value for clamp")
    p.add_argument("--alphas", default=None, metavar="A,B,...", help="sweep these comma-separated alphas, e.g. -4,0,4")
    p.add_argument("--sweep", dest="alphas", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--steer-positions", dest="positions", default="all",
                   help="where to steer: all | prompt | generated | comma-separated token indices")
    # capture's --positions means which tokens a store keeps; the old spelling here still works, unlisted
    p.add_argument("--positions", dest="positions", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", default="projection", help="sweep metric: projection | logit_diff")
    p.add_argument("--pos-tokens", default=None, help="logit_diff: comma-separated single-token strings")
    p.add_argument("--neg-tokens", default=None, help="logit_diff: comma-separated single-token strings")
    p.add_argument("--no-baseline", action="store_true", help="do not also generate unsteered")
    p.add_argument("--out", default=None, help="directory to save the generation or sweep (JSON + safetensors/HTML)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.set_defaults(func=run)


def _floats(text: str, what: str) -> list[float]:
    from interp.errors import ConfigError

    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r}: give comma-separated numbers such as -4,-2,0,2,4") from None
    if not vals:
        raise ConfigError(f"{what} is empty; give comma-separated numbers such as -4,-2,0,2,4")
    return vals


def _positions(text: str):
    from interp.errors import ConfigError

    if text in ("all", "prompt", "generated"):
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--steer-positions {text!r}: use all, prompt, generated or comma-separated integers") from None


def _prompts(args) -> list[str]:
    from pathlib import Path

    from interp.errors import ConfigError

    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            prompts += [ln for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise ConfigError(f"cannot read --prompts-file {args.prompts_file} ({e.strerror})") from None
    if not prompts:
        raise ConfigError('no prompt given; pass --prompt "..." (repeatable) or --prompts-file FILE')
    return prompts


def _load_direction(path: str):
    from pathlib import Path

    from interp.directions import Direction
    from interp.errors import ConfigError

    if not (Path(path) / "direction.json").exists():
        raise ConfigError(f"{path} is not a saved direction (no direction.json); save one with Direction.save(dir)")
    return Direction.load(path)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from interp.errors import ConfigError
    from interp.model import load_model
    from interp.steering import Intervention, generate, logit_diff, projection, sweep

    prompts = _prompts(args)
    positions = _positions(args.positions)
    hook = [h.strip() for h in args.hook.split(",") if h.strip()] if args.hook else None
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: give a positive number of tokens to sample from (or leave it out)")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: give a positive number")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is an existing file; give a directory to save the results in")
    direction = _load_direction(args.direction)
    if args.alphas is not None and args.alpha is not None:
        raise ConfigError("give --alpha for one run or --alphas for a sweep, not both")
    progress = not (args.json or args.quiet)
    model = load_model(args.model, device=args.device)
    gen_kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed)

    if args.alphas is not None:
        alphas = _floats(args.alphas, "--alphas")
        if args.metric == "projection":
            metric = projection(direction)
        elif args.metric == "logit_diff":
            if not args.pos_tokens or not args.neg_tokens:
                raise ConfigError("--metric logit_diff needs --pos-tokens and --neg-tokens")
            metric = logit_diff(args.pos_tokens.split(","), args.neg_tokens.split(","))
        else:
            raise ConfigError(f"unknown --metric {args.metric!r}: use projection or logit_diff")
        res = sweep(model, prompts, direction, alphas, metric={args.metric: metric}, op=args.op, positions=positions,
                    hook=hook, progress=progress, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, seed=args.seed)
        if args.out:
            res.save(args.out)
        if args.json:
            print(json.dumps({"config": res.config, "rows": json.loads(res.table.to_json(orient="records"))}))
            return 0
        for p in prompts:
            print(f"prompt: {p!r}")
            sub = res.table[res.table["prompt"] == p]
            for _, row in sub.iterrows():
                print(f"  alpha {row['alpha']:>+8.3g}  {args.metric} {row[args.metric]:>+9.4f}  {row['text']!r}")
        if args.out:
            print(f"saved {args.out}/sweep.json and sweep.html")
        return 0

    iv = Intervention(direction, op=args.op, alpha=args.alpha, positions=positions, hook=hook)
    steered = generate(model, prompts, steering=[iv], project=direction, progress=progress, **gen_kw)
    base = None if args.no_baseline else generate(model, prompts, project=direction, progress=progress, **gen_kw)
    if args.out:
        steered.save(args.out)
    def proj(g, i: int) -> float:
        return float(g.projections[i].nanmean())

    if args.json:
        out = {"config": steered.config, "rows": []}
        for i, p in enumerate(prompts):
            row = {"prompt": p, "steered": steered.texts[i], "steered_projection": proj(steered, i)}
            if base is not None:
                row |= {"unsteered": base.texts[i], "unsteered_projection": proj(base, i)}
            out["rows"].append(row)
        print(json.dumps(out))
        return 0
    what = f"{args.op}" + ("" if args.op == "ablate" else f" {args.alpha:g}")
    print(f"{what} at {', '.join(iv.hooks_for(model))}, positions {args.positions}")
    for i, p in enumerate(prompts):
        print(f"prompt: {p!r}")
        if base is not None:
            print(f"  unsteered  (proj {proj(base, i):+.3f}): {base.texts[i]!r}")
        print(f"  steered    (proj {proj(steered, i):+.3f}): {steered.texts[i]!r}")
    if args.out:
        print(f"saved {args.out}/generation.json and generation.safetensors")
    return 0
