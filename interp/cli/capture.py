"""``interp capture``: run a dataset through a model into an activation store."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("capture", help="capture activations of a dataset into a store")
    p.add_argument("--model", default="minilm", help="'minilm' (bundled default), a model directory, or a HF name")
    p.add_argument("--dataset", required=True, help="a .jsonl file or a bundled dataset: capitals, deception, entities")
    p.add_argument("--hooks", default="resid_post", help="resid_post (every layer), a shorthand, or hook names, comma-separated")
    p.add_argument("--layers", default=None, help="comma-separated layer indices (e.g. 2,4,-1)")
    p.add_argument("--positions", default="all", help="all | last | mean | REGION | mean:REGION | last:REGION")
    p.add_argument("--out", required=True, help="store directory (created; an unfinished store there is resumed)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float16", help="store dtype: float16 | bfloat16 | float32")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--device-map", default=None,
                   help="split a model too large for one device: auto | balanced | sequential | a JSON object of module -> device")
    p.add_argument("--shard-mb", type=float, default=256, help="shard size in MiB")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens kept per text (default: the model's context; longer texts are truncated, with a warning)")
    p.add_argument("--json", action="store_true", help="print the store's summary as one JSON document on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary (errors still go to stderr)")
    p.set_defaults(func=run)


def parse_layers(text: str | None) -> list[int] | None:
    from interp.errors import ConfigError

    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--layers {text!r}: give comma-separated integers such as 0,3,-1") from None


def parse_device_map(text: str):
    """``auto`` (a name accelerate knows) or a JSON object ``{"module": "device", ...}``."""
    from interp.errors import ConfigError

    if not text.lstrip().startswith("{"):
        return text.strip()
    try:
        return json.loads(text)
    except ValueError as e:
        raise ConfigError(f"--device-map {text[:60]!r} is not a JSON object ({e}); give auto or {{\"module\": \"cpu\"}}") from None


def run(args: argparse.Namespace) -> int:
    """Under ``torchrun`` every rank runs this: the process group starts from torchrun's variables, each rank
    captures its slice (on ``cuda:LOCAL_RANK`` when GPUs are visible and no --device is given), rank 0 alone
    shows progress and prints the summary."""
    from interp import distributed

    rank, world = distributed.init_from_env()
    try:
        return _run(args, rank, world)
    finally:
        if world > 1:
            distributed.shutdown()


def _run(args: argparse.Namespace, rank: int, world: int) -> int:
    from interp import distributed
    from interp.capture import capture
    from interp.cli.store import print_info
    from interp.model import load_model

    hooks = [h.strip() for h in args.hooks.split(",") if h.strip()]
    layers = parse_layers(args.layers)
    if args.device_map is not None:
        model = load_model(args.model, device=args.device, device_map=parse_device_map(args.device_map))
    else:
        model = load_model(args.model, device=args.device or distributed.local_device())
    store = capture(
        model,
        args.dataset,
        hooks=hooks[0] if len(hooks) == 1 else hooks,
        positions=args.positions,
        out=args.out,
        batch_size=args.batch_size,
        dtype=args.dtype,
        layers=layers,
        shard_mb=args.shard_mb,
        max_length=args.max_length,
        progress=not (args.quiet or args.json),
    )
    if rank != 0:
        return 0
    if args.json:
        print(json.dumps(store.info(), indent=2))
    elif not args.quiet:
        print_info(store)
    return 0
