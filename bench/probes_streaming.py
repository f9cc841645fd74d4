"""Out-of-core probe sweeps (issue 16 B): peak memory and time of ``train_probes`` streaming a store.

1. Peak RSS: a streamed sweep (``max_memory_mb=--budget``) on a store and on one 4x as large, each in a fresh
   subprocess (``VmHWM`` from /proc/self/status after the sweep), alternating ``--repeats`` times. Target: the
   larger store's peak within 1.2x of the smaller's.
2. Time: on the smaller store (which fits), the streamed sweep vs the in-memory sweep (default budget),
   alternating ``--repeats`` times in this process. Target: streamed / in-memory <= 1.5.

The stores are bench/probes.py's synthetic anisotropic activations (5-fold CV, C=1, float32).

Run: PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/probes_streaming.py [--rows 10000] [--hooks 6]
     [--d 384] [--budget 64] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(store: str, budget: float) -> None:
    """One streamed sweep in this fresh process; prints its peak RSS (MiB) and time."""
    from interp.probes import train_probes

    t0 = time.perf_counter()
    sweep = train_probes(store, cv=5, C=1.0, max_memory_mb=budget, progress=False)
    print(f"{vm_hwm_mb():.1f} {time.perf_counter() - t0:.3f} {sweep.config['passes']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--hooks", type=int, default=6)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--budget", type=float, default=64.0, help="streaming budget, MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("STORE", "BUDGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], float(args.child[1]))
        return
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from probes import synthetic

    from interp.probes import train_probes
    from interp.store import ActivationStore

    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, n in (("1x", args.rows), ("4x", 4 * args.rows)):
            acts, y = synthetic(n, args.d, args.hooks)
            paths[name] = ActivationStore.from_tensors(Path(tmp) / name, acts, y.tolist()).path
            del acts
            mb = n * args.hooks * args.d * 4 / 2**20
            print(f"store {name}: {n} rows x {args.hooks} hooks x {args.d}, float32: {mb:.0f} MiB of activations")
        # 1. peak RSS, fresh processes, alternating
        hwm: dict[str, list[float]] = {"1x": [], "4x": []}
        for _ in range(args.repeats):
            for name in ("1x", "4x"):
                r = subprocess.run([sys.executable, __file__, "--child", str(paths[name]), str(args.budget)],
                                   capture_output=True, text=True, check=True)
                peak, secs, passes = r.stdout.split()
                hwm[name].append(float(peak))
                print(f"  streamed sweep, store {name}: VmHWM {float(peak):.0f} MiB, {float(secs):.2f} s, "
                      f"{passes} passes")
        m1, m4 = float(np.median(hwm["1x"])), float(np.median(hwm["4x"]))
        print(f"\n== peak RSS (VmHWM, budget {args.budget:g} MiB, medians of {args.repeats}) ==")
        print(f"store 1x: {m1:.0f} MiB   store 4x: {m4:.0f} MiB   ratio {m4 / m1:.2f} (target <= 1.2)")
        # 2. time on the store that fits: streamed vs in memory, alternating in this process
        store = ActivationStore(paths["1x"])
        train_probes(store, cv=5, C=1.0, progress=False)  # warm-up (and the page cache)
        t_mem, t_str = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            a = train_probes(store, cv=5, C=1.0, progress=False)
            t_mem.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = train_probes(store, cv=5, C=1.0, max_memory_mb=args.budget, progress=False)
            t_str.append(time.perf_counter() - t0)
        diff = max(float((a.probes[h].coef_standardized_ - b.probes[h].coef_standardized_).abs().max())
                   for h in a.hooks)
        tm, ts = float(np.median(t_mem)), float(np.median(t_str))
        print(f"\n== time on the 1x store (fits in memory), medians of {args.repeats} interleaved ==")
        print(f"in memory: {tm:.2f} s (runs {' '.join(f'{t:.2f}' for t in t_mem)}; {a.config['passes']} passes)")
        print(f"streamed:  {ts:.2f} s (runs {' '.join(f'{t:.2f}' for t in t_str)}; {b.config['passes']} passes)")
        print(f"streamed / in memory: {ts / tm:.2f} (target <= 1.5); largest weight difference {diff:.1e}")


if __name__ == "__main__":
    main()
