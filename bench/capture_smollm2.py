"""SmolLM2 benchmarks (issue 12), each a ratio measured side by side in one run, interleaved and repeated.

1. capture throughput on SmolLM2-135M-Instruct: tokens/s of ``capture`` (the bundled capitals texts, every one of
   the 30 layers' ``resid_post``, float16 store, positions ``all``) divided by a bare forward of the same padded
   batches: the Hugging Face model (``model.original_model``) called with the attention mask, nothing kept. Both
   tokenise their batches the same way. Target >= 0.9. Also printed: the ratio against the HF model without its
   LM head (``original_model.model``), the same depth as the capture.
2. load time: a cached ``load_model("smollm2")`` (cache checks, identity, KV-cache patch included) divided by
   ``TransformerBridge.boot_transformers`` of the same cached directory. Target <= 1.2.

Run: .venv/bin/python bench/capture_smollm2.py [--repeats 5] [--copies 2] [--batch-size 32] [--load-only]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from interp.capture import capture
from interp.datasets import load_dataset
from interp.model import load_model, model_identity, tokenize


def bare_forward(module, model, data: list[str], batch_size: int) -> int:
    """Tokenise each batch as capture does and run ``module`` (an HF model) on it with its mask, keeping nothing."""
    tokens = 0
    with torch.inference_mode():
        for i in range(0, len(data), batch_size):
            t = tokenize(model, data[i : i + batch_size])
            module(input_ids=t.input_ids, attention_mask=t.attention_mask, use_cache=False)
            tokens += int(t.attention_mask.sum())
    return tokens


def bench_capture(model, data: list[str], repeats: int, batch_size: int) -> dict:
    hf = model.original_model
    times: dict[str, list[float]] = {"hf": [], "hf_body": [], "capture": []}
    tokens = bare_forward(hf, model, data[:batch_size], batch_size)  # warm-up
    for _ in range(repeats):  # interleaved: drift and neighbours' load hit all three alike
        t0 = time.perf_counter()
        tokens = bare_forward(hf, model, data, batch_size)
        times["hf"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bare_forward(hf.model, model, data, batch_size)
        times["hf_body"].append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            capture(model, data, "resid_post", "all", Path(d) / "s", batch_size=batch_size, dtype="float16",
                    progress=False)
            times["capture"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [h / c for h, c in zip(times["hf"], times["capture"])]
    return {"tokens": tokens, "texts": len(data), "hf_tok_s": tokens / med["hf"],
            "hf_body_tok_s": tokens / med["hf_body"], "capture_tok_s": tokens / med["capture"],
            "ratio": med["hf"] / med["capture"], "ratio_body": med["hf_body"] / med["capture"],
            "ratio_min": min(ratios), "ratio_max": max(ratios), "times": times}


def bench_load(repeats: int) -> dict:
    from transformer_lens.model_bridge import TransformerBridge

    directory = model_identity(load_model("smollm2", device="cpu"))["path"]  # converted (once) and warm
    def boot():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TransformerBridge.boot_transformers(directory, device="cpu", dtype=torch.float32)

    runs = {"load_model": lambda: load_model("smollm2", device="cpu"), "boot": boot}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeats):
        for name in sorted(runs, reverse=bool(r % 2)):  # alternate which goes first
            gc.collect()  # the previous model is freed before the clock starts
            t0 = time.perf_counter()
            m = runs[name]()
            times[name].append(time.perf_counter() - t0)
            del m
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"load_model_s": med["load_model"], "boot_s": med["boot"], "ratio": med["load_model"] / med["boot"],
            "times": times}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--copies", type=int, default=2, help="passes over the capitals texts per measurement")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--load-repeats", type=int, default=5)
    ap.add_argument("--load-only", action="store_true", help="measure only the load time")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    ld = bench_load(args.load_repeats)
    print(f"cached load_model('smollm2') {ld['load_model_s']:.2f} s vs TransformerBridge.boot_transformers of the "
          f"same directory {ld['boot_s']:.2f} s -> ratio {ld['ratio']:.3f} (target <= 1.2)")
    if args.load_only:
        print(json.dumps({"load": ld}))
        return
    model = load_model("smollm2", device="cpu")
    data = load_dataset("capitals").texts() * args.copies
    c = bench_capture(model, data, args.repeats, args.batch_size)
    print(f"capture SmolLM2 (30 layers resid_post, float16): {c['capture_tok_s']:.0f} tok/s vs bare HF forward "
          f"{c['hf_tok_s']:.0f} tok/s over {c['tokens']} tokens ({c['texts']} texts) -> ratio {c['ratio']:.3f} "
          f"(per-repeat {c['ratio_min']:.3f}-{c['ratio_max']:.3f}; target >= 0.9)")
    print(f"  vs the HF model without its LM head (same depth) {c['hf_body_tok_s']:.0f} tok/s -> ratio "
          f"{c['ratio_body']:.3f}")
    print(json.dumps({"capture": c, "load": ld}))


if __name__ == "__main__":
    main()
