"""Run the five real-model evaluations on SmolLM2-135M-Instruct and print one summary table.

    python eval/run_all.py            # all five
    python eval/run_all.py streaming  # some of them, by script name

Each writes ``runs/eval/<name>.json`` (numbers, CIs, the command) and ``runs/eval/<name>.html`` (figure);
model passes are cached under ``runs/eval/cache``, so a second run reuses the generations and captures.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

SCRIPTS = ("probe_layers", "hallucination", "transfer", "steer_sweep", "streaming")


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        print(f"unknown evaluation(s) {unknown}; choose from {', '.join(SCRIPTS)}", file=sys.stderr)
        return 2
    table = []
    for name in names or SCRIPTS:
        timer = c.Timer()
        mod = importlib.import_module(name)
        result = mod.run(progress=sys.stderr.isatty())
        table += [(name, k, v) for k, v in mod.summary(result)]
        table.append((name, "wall time (s)", f"{timer():.0f}"))
    width = max(len(k) for _, k, _ in table)
    print(f"\n{'script':14s} {'measure':{width}s} value [95% CI]")
    for name, k, v in table:
        print(f"{name:14s} {k:{width}s} {v}")
    print(f"\nfigures and numbers: {c.out_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
