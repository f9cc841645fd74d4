"""Capture and store-read benchmarks (issue 2), each a ratio measured side by side in one run.

1. capture throughput (tokens/s into a float16 store, all 6 layers of the default model, positions=all)
   divided by a bare batched forward over the same batches (tokenise + forward through the same blocks,
   no hooks, nothing kept). Target >= 0.85.
2. reading one hook of a store back vs a raw sequential read of the same bytes. Target >= 0.7.
3. peak RSS during a capture at 1x and 4x the examples (fresh subprocesses, RSS sampled every 5 ms after the
   model is loaded). Target: within 1.2x.

Run: .venv/bin/python bench/capture.py [--examples 1024] [--repeats 3]
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from interp.capture import capture
from interp.model import load_model, tokenize
from interp.store import ActivationStore

WORDS = ("the capital of france is paris and the river runs through a city of light where people walk and talk "
         "about history science music art and the weather on a long summer evening").split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 48)))) for _ in range(n)]


def bare_forward(model, data: list[str], batch_size: int, same_depth: bool = False) -> int:
    """Tokenise and run each batch, keeping nothing. ``same_depth``: stop after the last block, as capture
    does (through the same hook mechanism, with no activation kept); otherwise the model's full forward."""
    from interp.capture import run_hooks

    last = f"blocks.{model.cfg.n_layers - 1}.hook_out"
    tokens = 0
    with torch.inference_mode():
        for i in range(0, len(data), batch_size):
            t = tokenize(model, data[i : i + batch_size])
            if same_depth:
                run_hooks(model, t, [last])
            else:
                model(t.input_ids, attention_mask=t.attention_mask, return_type=None)
            tokens += int(t.attention_mask.sum())
    return tokens


def bench_throughput(model, n: int, repeats: int, batch_size: int = 32) -> dict:
    data = texts(n)
    times: dict[str, list[float]] = {"full": [], "depth": [], "capture": []}
    tokens = 0
    for r in range(repeats):  # interleaved, so drift hits all three equally
        t0 = time.perf_counter()
        tokens = bare_forward(model, data, batch_size)
        times["full"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bare_forward(model, data, batch_size, same_depth=True)
        times["depth"].append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            capture(model, data, "resid_post", "all", Path(d) / "s", batch_size=batch_size, dtype="float16", progress=False)
            times["capture"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"examples": n, "tokens": tokens, "bare_tok_s": tokens / med["full"], "depth_tok_s": tokens / med["depth"],
            "capture_tok_s": tokens / med["capture"], "ratio": med["full"] / med["capture"],
            "ratio_same_depth": med["depth"] / med["capture"]}


def bench_read(rows: int, repeats: int, shard_mb: float = 64) -> dict:
    """Read one hook of a float16 store (``rows`` x 384, 3 hooks) vs a raw sequential read of the same bytes."""
    with tempfile.TemporaryDirectory() as d:
        g = torch.Generator().manual_seed(0)
        acts = {f"blocks.{i}.hook_out": torch.randn(rows, 384, generator=g).half() for i in range(3)}
        store = ActivationStore.from_tensors(Path(d) / "s", acts, labels=[0] * rows, dtype="float16", shard_bytes=int(shard_mb * 2**20))
        del acts
        hook = "blocks.1.hook_out"
        from interp.store import _read_header

        spans = []
        for sh in store.manifest["shards"]:
            header, start = _read_header(store.path / sh["file"])
            lo, hi = header[hook]["data_offsets"]
            spans.append((store.path / sh["file"], start + lo, hi - lo))
        nbytes = sum(s[2] for s in spans)
        raw_t, store_t = [], []
        for _ in range(repeats):  # interleaved; both read from the page cache after the first round
            t0 = time.perf_counter()
            buf = np.empty(nbytes, dtype=np.uint8)  # uninitialised, like the store's output array
            view, at = memoryview(buf), 0
            for path, off, size in spans:  # the same bytes, read sequentially into one buffer
                with open(path, "rb", buffering=0) as f:
                    f.seek(off)
                    at += f.readinto(view[at : at + size])
            raw_t.append(time.perf_counter() - t0)
            del view, buf
            t0 = time.perf_counter()
            x = ActivationStore(store.path).activations(hook)
            store_t.append(time.perf_counter() - t0)
            assert x.numel() * 2 == nbytes
            del x
        raw, st = statistics.median(raw_t), statistics.median(store_t)
        return {"bytes": nbytes, "shards": len(spans), "raw_MB_s": nbytes / raw / 1e6, "store_MB_s": nbytes / st / 1e6, "ratio": raw / st}


_CHILD = """
import os, sys, tempfile, threading, time
os.environ['HF_HUB_OFFLINE'] = '1'
sys.path.insert(0, {bench_dir!r})
import psutil
from capture import texts
from interp.model import load_model
from interp.capture import capture
model = load_model('minilm', device='cpu')
data = texts({n}, 2)
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
t = threading.Thread(target=sample); t.start()
s = capture(model, data, 'resid_post', 'all', tempfile.mkdtemp() + '/s', dtype='float16', shard_mb={shard_mb}, progress=False)
done.set(); t.join()
print(base, peak[0], s.info()['bytes'])
"""


def _child_peak_rss(n: int, shard_mb: float) -> tuple[float, float, int]:
    """In a fresh process: RSS after loading the model and data, and the peak RSS during the capture (MiB)."""
    code = _CHILD.format(bench_dir=str(Path(__file__).parent), n=n, shard_mb=shard_mb)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    base, peak, nbytes = map(int, out.strip().splitlines()[-1].split())
    return base / 2**20, peak / 2**20, nbytes


def bench_memory(n: int, shard_mb: float) -> dict:
    base1, rss1, bytes1 = _child_peak_rss(n, shard_mb)
    base4, rss4, bytes4 = _child_peak_rss(4 * n, shard_mb)
    return {"examples_1x": n, "store_MB_1x": bytes1 / 1e6, "store_MB_4x": bytes4 / 1e6, "peak_rss_MiB_1x": rss1,
            "peak_rss_MiB_4x": rss4, "ratio": rss4 / rss1, "growth_MiB_1x": rss1 - base1,
            "growth_MiB_4x": rss4 - base4, "shard_mb": shard_mb}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mem-examples", type=int, default=1500)
    ap.add_argument("--read-rows", type=int, default=300_000)
    ap.add_argument("--shard-mb", type=float, default=32)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model("minilm", device="cpu")
    t = bench_throughput(model, args.examples, args.repeats)
    print(f"capture throughput: {t['capture_tok_s']:.0f} tok/s vs bare full forward {t['bare_tok_s']:.0f} tok/s "
          f"over {t['tokens']} tokens -> ratio {t['ratio']:.3f} (target >= 0.85)")
    print(f"  vs a bare forward stopped at the same depth (no MLM head) {t['depth_tok_s']:.0f} tok/s -> ratio "
          f"{t['ratio_same_depth']:.3f} (the capture's own overhead)")
    r = bench_read(args.read_rows, max(5, args.repeats))
    print(f"read one hook: store {r['store_MB_s']:.0f} MB/s vs raw sequential {r['raw_MB_s']:.0f} MB/s "
          f"({r['bytes'] / 1e6:.1f} MB in {r['shards']} shards) -> ratio {r['ratio']:.3f} (target >= 0.7)")
    m = bench_memory(args.mem_examples, args.shard_mb)
    print(f"peak RSS during capture: {m['peak_rss_MiB_1x']:.0f} MiB at {m['examples_1x']} examples "
          f"({m['store_MB_1x']:.0f} MB store) vs {m['peak_rss_MiB_4x']:.0f} MiB at 4x ({m['store_MB_4x']:.0f} MB store), "
          f"shards of {m['shard_mb']:.0f} MiB -> ratio {m['ratio']:.3f} (target <= 1.2); growth over the loaded "
          f"model: {m['growth_MiB_1x']:.0f} MiB vs {m['growth_MiB_4x']:.0f} MiB")
    print(json.dumps({"throughput": t, "read": r, "memory": m}))


if __name__ == "__main__":
    main()
