"""Encoding a store through an SAE vs reading the store alone, timed side by side in one run.

    .venv/bin/python bench/sae.py                      # 200k rows x 384 float16, SAE 384 -> 3072 TopK k=32
    .venv/bin/python bench/sae.py --rows 50000 --store /tmp/sae-bench-store

Builds (or reuses) a store of random activations in several shards, then times, alternately and ``--repeats``
times each, (a) one sequential pass reading the hook batch by batch (``store.activations(hook, rows)``, the
read that encoding does) and (b) one pass of ``sae.iter_encode`` (read + encode; the reader runs one batch
ahead in a thread) with the SAE in each of ``--dtypes``; a pass of ``store.iter_batches`` is shown for
reference. Prints rows/s for each and the ratio encode/read (target >= 0.5); the best of the repeats counts.

``--cold`` evicts the store's shard files from the page cache (``posix_fadvise(DONTNEED)``) before every pass
and opens the store afresh, so both passes read from disk: the case of a store larger than memory.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from interp.sae import SAE
from interp.store import ActivationStore, StoreWriter

HOOK = "blocks.6.hook_out"


def build_store(path: Path, rows: int, d: int, shard_mb: float, seed: int = 0) -> ActivationStore:
    if (path / "manifest.json").exists():
        store = ActivationStore(path)
        if len(store) == rows and store.d_model == d:
            return store
        raise SystemExit(f"{path} holds a different store ({len(store)} x {store.d_model}); use another --store")
    g = torch.Generator().manual_seed(seed)
    chunk = 10_000
    with StoreWriter(
        path, hooks=[HOOK], d_model=d, dtype="float16", model={"name": "bench", "d_model": d},
        positions="all", shard_bytes=int(shard_mb * 2**20),
    ) as w:  # fmt: skip
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            x = torch.randn(n, d, generator=g).half()
            w.add_example({"id": start}, {HOOK: x}, torch.arange(n), torch.zeros(n, dtype=torch.int32))
    return ActivationStore(path)


def evict(path: Path) -> ActivationStore:
    """Drop the store's shard files from the page cache and return a freshly opened store (the caller has let go
    of the old one, so no pages stay mapped)."""
    gc.collect()
    for shard in ActivationStore(path).manifest["shards"]:
        fd = os.open(path / shard["file"], os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return ActivationStore(path)


def time_read(store: ActivationStore, batch_size: int) -> float:
    """One sequential pass reading the hook's activations, batch by batch (what encoding has to read)."""
    t = time.perf_counter()
    total = 0.0
    for start in range(0, len(store), batch_size):
        x = store.activations(HOOK, torch.arange(start, min(start + batch_size, len(store))))
        total += float(x[:, 0].float().sum())  # touch the batch
    return time.perf_counter() - t


def time_iter_batches(store: ActivationStore, batch_size: int) -> float:
    """For reference: a pass of ``store.iter_batches`` (activations plus per-row metadata)."""
    t = time.perf_counter()
    for batch in store.iter_batches(HOOK, batch_size=batch_size):
        float(batch.acts[HOOK][:, 0].float().sum())
    return time.perf_counter() - t


def time_compute(sae: SAE, x: torch.Tensor, passes: int) -> float:
    """Encoding alone: the same number of rows from one batch already in memory (no reading)."""
    t = time.perf_counter()
    total = 0.0
    with torch.no_grad():
        for _ in range(passes):
            total += float(sae.encode(x)[:, 0].float().sum())
    return time.perf_counter() - t


def time_encode(sae: SAE, store: ActivationStore, batch_size: int) -> float:
    t = time.perf_counter()
    total = 0.0
    for _, f in sae.iter_encode(store, HOOK, batch_size=batch_size, progress=False):
        total += float(f[:, 0].float().sum())
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--d-sae", type=int, default=3072)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--shard-mb", type=float, default=32)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the SAE runs: cpu | cuda")
    ap.add_argument("--cold", action="store_true", help="evict the store from the page cache before each pass")
    ap.add_argument("--store", default=None, help="store directory to build or reuse (default: a temp dir)")
    args = ap.parse_args()

    path = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="interp-bench-sae-")) / "store"
    t = time.perf_counter()
    store = build_store(path, args.rows, args.d, args.shard_mb)
    mib = sum(s["bytes"] for s in store.manifest["shards"]) / 2**20
    print(f"store: {len(store)} rows x {store.d_model} float16, {len(store.manifest['shards'])} shards, "
          f"{mib:.0f} MiB ({time.perf_counter() - t:.1f}s)")  # fmt: skip
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()},"
        f" SAE on {args.device}"
    )
    saes = {}
    for name in args.dtypes.split(","):
        sae = SAE(args.d, args.d_sae, "topk", k=args.k, hook_name=HOOK, seed=0, dtype=name, device=args.device)
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.1)
        saes[name] = sae
    time_read(store, args.batch_size)  # warm the page cache (evicted again before each pass with --cold)
    read_s, iter_s, enc_s, comp_s = [], [], {name: [] for name in saes}, {name: [] for name in saes}
    x_mem = store.activations(HOOK, torch.arange(min(args.batch_size, len(store))))
    passes = max(1, len(store) // x_mem.shape[0])
    runs = [
        (read_s, lambda s: time_read(s, args.batch_size)),
        (iter_s, lambda s: time_iter_batches(s, args.batch_size)),
    ]
    runs += [(enc_s[name], lambda s, sae=sae: time_encode(sae, s, args.batch_size)) for name, sae in saes.items()]
    for _ in range(args.repeats):
        for times, run in runs:
            if args.cold:
                del store
                store = evict(path)
            times.append(run(store))
        for name, sae in saes.items():  # encoding rows already in memory: no store involved
            comp_s[name].append(time_compute(sae, x_mem, passes) * len(store) / (passes * x_mem.shape[0]))
    read_rate = len(store) / min(read_s)
    results = {"date": datetime.date.today().isoformat(), "rows": len(store), "d": args.d, "d_sae": args.d_sae,
               "k": args.k, "batch_size": args.batch_size, "cold": args.cold, "read_rows_per_s": round(read_rate)}  # fmt: skip
    results["iter_batches_rows_per_s"] = round(len(store) / min(iter_s))
    print(f"page cache: {'evicted before every pass (reads from disk)' if args.cold else 'warm'}")
    print(f"read alone:            {read_rate:12,.0f} rows/s  ({read_rate * args.d * 2 / 2**20:,.0f} MiB/s)")
    print(f"(iter_batches:         {len(store) / min(iter_s):12,.0f} rows/s, with per-row metadata)")
    for name, times in enc_s.items():
        rate = len(store) / min(times)
        compute = len(store) / min(comp_s[name])
        results[f"encode_{name}_rows_per_s"] = round(rate)
        results[f"compute_only_{name}_rows_per_s"] = round(compute)
        results[f"ratio_{name}"] = round(rate / read_rate, 4)
        print(
            f"read + encode {name:>8}: {rate:12,.0f} rows/s  ratio encode/read = {rate / read_rate:.3f}  "
            f"(target >= 0.5: {'met' if rate / read_rate >= 0.5 else 'NOT met'}); encoding in-memory rows "
            f"alone: {compute:,.0f} rows/s, so the pass runs at {rate / compute:.2f}x the compute bound"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
