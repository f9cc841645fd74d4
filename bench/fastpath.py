"""The hot paths against the bare model (issue 17), side by side in one run, interleaved, repeated, medians.

1. capture: tokens/s of ``interp.capture`` (float16 store, every layer of all-MiniLM-L6-v2, positions ``all``,
   batch 32) divided by a bare Hugging Face forward of the same batches (``AutoModel`` loaded from the same
   directory with transformers' default attention; tokenise + forward, no outputs kept). Beside it, in the
   same run: a plain ``output_hidden_states`` loop that keeps the same rows (every layer's real tokens, cast
   to float16, held in memory), the bridge path (``capture(..., fast=False)``), and nnsight (``--nnsight
   PYTHON``: a separate interpreter with nnsight installed runs the same loop; it is timed in its own process,
   so its ratio is against a bare forward timed in that process). Targets: capture / bare >= 0.95, and >= the
   ``output_hidden_states`` and nnsight ratios.
2. generation: ``interp.generation.generate`` with no hooks vs Hugging Face ``generate`` of a bare model
   (``AutoModelForCausalLM`` from the same directory, default attention) on the same left-padded prompts,
   greedy, ``min_new_tokens = max_new_tokens``; the bridge path (``fast=False``) beside it. Target >= 0.95.
   Greedy tokens are checked equal first (EOS off on HF's side).

Run: python bench/fastpath.py [--examples 1024] [--repeats 3] [--shard-mb 256] [--new-tokens 32]
     [--models smollm2,tiny-gpt2]
     [--nnsight /tmp/nnsight-venv/bin/python] [--skip-generation] [--skip-capture]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from interp.generation import generate, left_pad, render_prompts
from interp.model import load_model, minilm_path, model_device, resolve_model_path
from interp.testing import tiny_gpt2

sys.path.insert(0, str(Path(__file__).parent))
from steering import prompt_batch  # noqa: E402  (bench/steering.py)

WORDS = ("the capital of france is paris and the river runs through a city of light where people walk and talk "
         "about history science music art and the weather on a long summer evening").split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 48)))) for _ in range(n)]


def hf_loop(hf, tok, data: list[str], batch_size: int, hidden: bool) -> int:
    """Tokenise and run each batch through a bare HF model; ``hidden``: keep every layer's real-token rows in
    float16 (what a capture stores), else keep nothing. Returns the real tokens seen."""
    kept, tokens = [], 0
    with torch.inference_mode():
        for i in range(0, len(data), batch_size):
            enc = tok(data[i : i + batch_size], padding=True, truncation=True, max_length=512, return_tensors="pt")
            out = hf(**enc, output_hidden_states=hidden)
            mask = enc["attention_mask"].bool()
            tokens += int(mask.sum())
            if hidden:
                kept.append([h[mask].to(torch.float16) for h in out.hidden_states[1:]])
    return tokens


_NNSIGHT = r"""
import json, statistics, sys, time, torch
from transformers import AutoModel, AutoTokenizer
from nnsight import NNsight
path, data, bs, repeats = sys.argv[1], json.loads(open(sys.argv[2]).read()), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
tok = AutoTokenizer.from_pretrained(path); hf = AutoModel.from_pretrained(path).eval(); nn = NNsight(hf)
def bare():
    with torch.inference_mode():
        for i in range(0, len(data), bs):
            hf(**tok(data[i:i + bs], padding=True, truncation=True, max_length=512, return_tensors="pt"))
def traced():
    kept = []
    with torch.inference_mode():
        for i in range(0, len(data), bs):
            enc = tok(data[i:i + bs], padding=True, truncation=True, max_length=512, return_tensors="pt")
            box = {}
            with nn.trace(**enc):
                box["outs"] = [layer.output.save() for layer in nn.encoder.layer]
            m = enc["attention_mask"].bool()
            kept.append([(o[0] if isinstance(o, tuple) else o)[m].to(torch.float16) for o in box["outs"]])
t = {"bare": [], "nnsight": []}
bare(); traced()
for r in range(repeats):
    for k, f in (("bare", bare), ("nnsight", traced)) if r % 2 == 0 else (("nnsight", traced), ("bare", bare)):
        t0 = time.perf_counter(); f(); t[k].append(time.perf_counter() - t0)
print(json.dumps({k: statistics.median(v) for k, v in t.items()}))
"""


def bench_capture(args) -> dict:
    from transformers import AutoModel, AutoTokenizer

    data = texts(args.examples)
    model = load_model("minilm", device="cpu")
    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tokens = hf_loop(hf, tok, data[:64], args.batch, False)  # warm-up
    tmp = Path(tempfile.mkdtemp())

    def run_capture(fast: bool):
        out = tmp / "store"
        capture(model, data, "resid_post", "all", out, batch_size=args.batch, dtype="float16", progress=False,
                fast=fast, shard_mb=args.shard_mb)

    sides = {
        "bare HF forward": lambda: hf_loop(hf, tok, data, args.batch, False),
        "HF output_hidden_states loop": lambda: hf_loop(hf, tok, data, args.batch, True),
        "interp capture": lambda: run_capture(True),
        "interp capture, bridge (fast=False)": lambda: run_capture(False),
    }
    tokens = hf_loop(hf, tok, data, args.batch, False)
    times, cpu = timed(sides, args.repeats, after=lambda: shutil.rmtree(tmp / "store", ignore_errors=True))
    res = {"examples": len(data), "tokens": tokens, "seconds": times, "cpu_seconds": cpu,
           "ratios": {k: times["bare HF forward"] / v for k, v in times.items()},
           "cpu_ratios": {k: cpu["bare HF forward"] / v for k, v in cpu.items()}}
    print(f"\ncapture: {len(data)} texts, {tokens} tokens, all 6 layers of all-MiniLM-L6-v2, float16, batch "
          f"{args.batch}, shards of {args.shard_mb:g} MiB, {args.repeats} interleaved repeats (medians)")
    for k, v in times.items():
        print(f"  {k:<38} wall {v:7.2f} s  {tokens / v:7.0f} tok/s  / bare {res['ratios'][k]:.3f}   CPU {cpu[k]:7.2f} s"
              f"  / bare {res['cpu_ratios'][k]:.3f}")
    if args.nnsight:
        res["nnsight"] = run_nnsight(args, path, data, tmp)
    if res.get("nnsight"):
        n = res["nnsight"]
        print(f"  {'nnsight (own process)':<38} {n['seconds']['nnsight']:8.2f} s  / bare in that process "
              f"{n['ratio']:.3f}")
    print("  target: interp capture / bare >= 0.95 and >= the output_hidden_states and nnsight ratios")
    return res


def run_nnsight(args, path: str, data: list[str], tmp: Path) -> dict | None:
    """The nnsight loop and a bare forward, interleaved, in another interpreter (nnsight is not a dependency)."""
    f = tmp / "data.json"
    f.write_text(json.dumps(data))
    run = subprocess.run([args.nnsight, "-c", _NNSIGHT, path, str(f), str(args.batch), str(args.repeats),
                          str(torch.get_num_threads())], capture_output=True, text=True)
    if run.returncode != 0:
        print(f"  nnsight failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
        return None
    t = json.loads(run.stdout.strip().splitlines()[-1])
    return {"seconds": t, "ratio": t["bare"] / t["nnsight"]}


def timed(sides: dict, repeats: int, after=lambda: None) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU (this process, all threads) seconds of each side; ``after`` runs untimed after every
    call (removing a store)."""
    names = list(sides)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: drift hits every side alike
        for k in order:
            t0, c0 = time.perf_counter(), time.process_time()
            sides[k]()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
            after()
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def bench_generation(name: str, args) -> dict:
    from transformers import AutoModelForCausalLM

    path = str(tiny_gpt2(tempfile.mkdtemp())) if name == "tiny-gpt2" else resolve_model_path(name, progress=False)[1]
    model = load_model(path, device="cpu")
    bare = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = prompt_batch(args.batch_gen)
    _, rows, _ = render_prompts(model, prompts)
    pad = model.tokenizer.pad_token_id or 0
    ids, mask = left_pad(rows, pad)
    ids, mask = ids.to(model_device(model)), mask.to(model_device(model))
    n = args.new_tokens

    def engine(fast: bool = True):
        return generate(model, prompts, max_new_tokens=n, stop_at_eos=False, batch_size=args.batch_gen, fast=fast)

    def hf_generate(check: bool = False):
        stop = dict(eos_token_id=None) if check else dict(min_new_tokens=n)
        with torch.inference_mode():
            return bare.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 pad_token_id=pad, **stop)

    same = bool(torch.equal(engine().token_ids, hf_generate(check=True)[:, ids.shape[1] :].cpu()))
    sides = {"HF generate (bare model)": hf_generate, "interp generate": engine,
             "interp generate, bridge (fast=False)": lambda: engine(False)}
    for f in sides.values():
        f()
    times, cpu = timed(sides, args.repeats)
    base, cbase = times["HF generate (bare model)"], cpu["HF generate (bare model)"]
    print(f"\ngeneration: {name}, {len(prompts)} prompts x {n} new tokens, greedy, {args.repeats} interleaved "
          f"repeats (medians); greedy tokens identical to HF generate: {same}")
    for k, v in times.items():
        print(f"  {k:<38} wall {v * 1e3:8.1f} ms  {len(prompts) * n / v:7.1f} tok/s  / HF {base / v:.3f}   CPU "
              f"{cpu[k] * 1e3:8.1f} ms  / HF {cbase / cpu[k]:.3f}")
    print("  target: interp generate / HF generate >= 0.95")
    return {"model": name, "same_tokens": same, "seconds": times, "cpu_seconds": cpu,
            "ratios": {k: base / v for k, v in times.items()}, "cpu_ratios": {k: cbase / v for k, v in cpu.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shard-mb", type=float, default=256, help="capture's shard size (its default: 256)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-gen", type=int, default=8)
    ap.add_argument("--models", default="smollm2,tiny-gpt2")
    ap.add_argument("--nnsight", default=None, help="a python with nnsight installed (a venv outside the project)")
    ap.add_argument("--skip-capture", action="store_true")
    ap.add_argument("--skip-generation", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = {}
    if not args.skip_capture:
        out["capture"] = bench_capture(args)
    if not args.skip_generation:
        out["generation"] = [bench_generation(m, args) for m in args.models.split(",")]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
