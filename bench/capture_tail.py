"""What a capture writes after its last forward (issue 17): the time ``StoreWriter.close`` takes, with and
without the early commit of the buffer while the last batch runs (``interp.capture.EARLY_FLUSH_BYTES``).

The forward is replaced by a fixed sleep with zero activations of MiniLM's shape, so the figure is the store's
own tail, not the model's: 310 texts (one slice of ``bench/fastpath.py``), 6 hooks x 384, float16, batch 32.
The two settings alternate, ``--repeats`` times each; medians.

Run: python bench/capture_tail.py [--texts 310] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fastpath import texts  # noqa: E402  (bench/fastpath.py)

from interp.model import load_model  # noqa: E402

capture_mod = importlib.import_module("interp.capture")
writer_mod = importlib.import_module("interp.store.writer")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=310)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    data = texts(args.texts)
    model = load_model("minilm", device="cpu")
    tmp = Path(tempfile.mkdtemp())

    def stand_in(model, toks, hook_names, stop_early=True, fast=True):
        time.sleep(0.15)  # a forward's time, which the worker thread's writing overlaps
        B, T = toks.input_ids.shape
        return {h: torch.zeros(B, T, int(model.cfg.d_model)) for h in hook_names}

    capture_mod.run_hooks = stand_in
    real_close = writer_mod.StoreWriter.close
    spent: list[float] = []

    def timed_close(self, *a, **k):
        t0 = time.perf_counter()
        real_close(self, *a, **k)
        spent.append(time.perf_counter() - t0)

    writer_mod.StoreWriter.close = timed_close
    settings = {"early commit (default)": capture_mod.EARLY_FLUSH_BYTES, "no early commit": 1 << 50}
    res: dict[str, list[float]] = {k: [] for k in settings}
    shards: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, threshold in settings.items():
            capture_mod.EARLY_FLUSH_BYTES = threshold
            spent.clear()
            store = capture_mod.capture(model, data, "resid_post", "all", tmp / "s", batch_size=32, progress=False)
            res[name].append(spent[0])
            shards[name] = len(store.manifest["shards"])
            shutil.rmtree(tmp / "s")
    print(f"{args.texts} texts; time in close(), after the last forward:")
    for name, v in res.items():
        print(f"  {name:<24} median {1e3 * statistics.median(v):6.1f} ms  (runs {' '.join(f'{1e3 * x:.1f}' for x in v)};"
              f" {shards[name]} shard(s))")


if __name__ == "__main__":
    main()
