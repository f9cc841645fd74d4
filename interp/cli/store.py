"""``interp store info|verify DIR``: look at a store, check every shard's hash."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="inspect or verify an activation store")
    s = p.add_subparsers(dest="store_command", metavar="ACTION")
    s.required = True
    info = s.add_parser("info", help="print a store's summary")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--quiet", action="store_true",
                      help="print nothing: exit 0 when the store opens and is complete, 1 when a capture must resume")
    info.set_defaults(func=run_info)
    verify = s.add_parser("verify", help="check every shard's size, header and sha256 (exit 1 on damage)")
    verify.add_argument("path")
    verify.add_argument("--json", action="store_true", help="print the report as one JSON document on stdout")
    verify.add_argument("--quiet", action="store_true", help="print nothing: the exit status says it (0 OK, 1 damaged)")
    verify.set_defaults(func=run_verify)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def print_info(store) -> None:
    i = store.info()
    model = i["model"]
    print(f"store      {i['path']}  ({i['format']}{'' if i['complete'] else ', INCOMPLETE: resume the capture'})")
    print(f"model      {model.get('name')}  d_model={i['d_model']} n_layers={model.get('n_layers')}")
    print(f"hooks      {len(i['hooks'])}: {', '.join(i['hooks'])}")
    print(f"positions  {i['positions']}   dtype {i['dtype']}")
    print(f"examples   {i['examples']}   rows {i['rows']}   shards {i['shards']}   size {_human(i['bytes'])}")
    if "label_counts" in i:
        print("labels     " + ", ".join(f"{k}: {v}" for k, v in i["label_counts"].items()))
    if i["token_labels"]:
        print("token labels: yes")
    if "examples_error" in i:
        print(f"examples   DAMAGED: {i['examples_error']}")
    v = i.get("last_verified")
    if v is None:
        print("verified   never (run `interp store verify`)")
    else:
        state = "OK" if v["ok"] else "FAILED"
        print(f"verified   {v['verified']}: {state}" + ("" if v["current"] else " (the store changed since)"))


def run_info(args: argparse.Namespace) -> int:
    from interp.store import ActivationStore

    store = ActivationStore(args.path)
    if args.quiet:
        return 0 if store.info()["complete"] else 1
    if args.json:
        print(json.dumps(store.info(), indent=2))
    else:
        print_info(store)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from interp.store import ActivationStore

    report = ActivationStore(args.path).verify()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif not args.quiet:
        print(report)
    return 0 if report.ok else 1
