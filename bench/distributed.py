"""Data-parallel capture (issue 16 A): a capture by N torchrun ranks against the same capture by one process.

Each run is a fresh launch (``python bench/distributed.py --worker`` for one process, ``torchrun --standalone
--nproc-per-node N bench/distributed.py --worker`` for N ranks) on the same dataset, interleaved run by run and
repeated. Inside each rank the clock starts after the model is loaded and every rank is ready (a barrier) and
stops when ``capture`` returns, which on rank 0 includes committing the parts; the job's time is the slowest
rank's (every rank returns once rank 0 has committed, so a rank's time is the job's and its throughput is its
share of the examples over it). Compared: the N-rank job with one thread per rank, one process on one thread (a
rank's share of the machine: the ratio is the data-parallel scaling, N on N free cores), and one process on
every core (the same hardware as the job: about 1 where the ranks share the cores with intra-op threads).

Run: .venv/bin/python bench/distributed.py [--ranks 2] [--repeats 3] [--copies 2]
(every launch runs with OMP_WAIT_POLICY=PASSIVE unless the environment sets it: on cores shared with other jobs,
spinning OpenMP threads make a multi-threaded process many times slower)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from interp import capture, distributed, load_model
    from interp.datasets import load_dataset

    rank, world = distributed.init_from_env()
    data = load_dataset("capitals").examples * args.copies
    data = [{**e.to_record(), "id": f"{e.id}-{i}"} for i, e in enumerate(data)]
    model = load_model("minilm", device="cpu")
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    store = capture(model, data, hooks="resid_post", positions="all", batch_size=BATCH, out=args.out, progress=False)
    seconds = time.perf_counter() - t0
    a, b = distributed.split_range(0, len(data), BATCH, world)[rank]
    rows = distributed.gather({"rank": rank, "examples": b - a, "seconds": seconds})
    if rank == 0:
        Path(args.report).write_text(json.dumps({"world": world, "ranks": rows, "n_examples": store.n_examples,
                                                 "n_rows": store.n_rows}))
    if world > 1:
        dist.destroy_process_group()


def launch(ranks: int, threads: int, copies: int, tmp: Path, tag: str) -> dict:
    out, report = tmp / f"store-{tag}", tmp / f"report-{tag}.json"
    me = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--report", str(report), "--copies", str(copies)]
    cmd = [sys.executable, *me] if ranks == 1 else [
        str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", str(ranks), *me]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning on shared cores
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return json.loads(report.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--copies", type=int, default=2, help="times the 350 capitals texts are repeated")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    cores = os.cpu_count() or 1
    # (ranks, threads per rank): the N-rank job, one process on one thread (a rank's share), one process on
    # every core (the same hardware as the job)
    configs = [(args.ranks, 1), (1, 1), (1, cores)]
    tp: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    ratios: dict[tuple[int, int], list[float]] = {c: [] for c in configs[1:]}
    with tempfile.TemporaryDirectory() as d:
        for k in range(args.repeats):
            order = configs[k % 3:] + configs[: k % 3]  # rotate which goes first
            res = {c: launch(*c, args.copies, Path(d), f"{c[0]}x{c[1]}-{k}") for c in order}
            n = res[configs[0]]["n_examples"]
            assert len({(r["n_rows"], r["n_examples"]) for r in res.values()}) == 1
            times = {c: max(r["seconds"] for r in res[c]["ranks"]) for c in configs}
            for c in configs:
                tp[c].append(n / times[c])
            for c in configs[1:]:
                ratios[c].append(times[c] / times[configs[0]])
            per_rank = ", ".join(f"rank {r['rank']} {r['examples'] / r['seconds']:.0f} ex/s ({r['examples']} ex)"
                                 for r in res[configs[0]]["ranks"])
            print(f"repeat {k}: {args.ranks} ranks x 1 thread {n / times[configs[0]]:.0f} ex/s [{per_rank}];"
                  f" 1 process x 1 thread {n / times[(1, 1)]:.0f} ex/s; 1 process x {cores} threads"
                  f" {n / times[(1, cores)]:.0f} ex/s", flush=True)
    med = statistics.median
    print(f"capture of {n} texts (MiniLM, 6 hooks, positions=all, batch {BATCH}, float16), {cores} cores, median of"
          f" {args.repeats}: {args.ranks} ranks x 1 thread {med(tp[configs[0]]):.0f} ex/s")
    for c, label in ((configs[1], "1 process x 1 thread"), (configs[2], f"1 process x {cores} threads")):
        r = ratios[c]
        print(f"  vs {label} {med(tp[c]):.0f} ex/s -> ratio {med(r):.3f} (per-repeat {min(r):.3f}-{max(r):.3f})")


if __name__ == "__main__":
    main()
