"""The hot paths against the bare model (issue 17), side by side in one run, interleaved and repeated.

On a shared machine a whole pass per side drifts by +-10% between passes; so capture runs in ``--chunks``
slices of the texts, every side taking each slice in turn (one capture call per slice, store created and
committed each time: its fixed costs count against it), and the figures are the ratio of total times and the
quartiles of the per-slice ratios.

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

Run: python bench/fastpath.py [--examples 3100] [--chunks 10] [--repeats 3] [--shard-mb 256] [--new-tokens 32]
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
import json, sys, time, torch
from transformers import AutoModel, AutoTokenizer
from nnsight import NNsight
path, data, bs, repeats = sys.argv[1], json.loads(open(sys.argv[2]).read()), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
chunks = int(sys.argv[6])
tok = AutoTokenizer.from_pretrained(path); hf = AutoModel.from_pretrained(path).eval(); nn = NNsight(hf)
def bare(texts):
    with torch.inference_mode():
        for i in range(0, len(texts), bs):
            hf(**tok(texts[i:i + bs], padding=True, truncation=True, max_length=512, return_tensors="pt"))
def traced(texts):
    kept = []
    with torch.inference_mode():
        for i in range(0, len(texts), bs):
            enc = tok(texts[i:i + bs], padding=True, truncation=True, max_length=512, return_tensors="pt")
            box = {}
            with nn.trace(**enc):
                box["outs"] = [layer.output.save() for layer in nn.encoder.layer]
            m = enc["attention_mask"].bool()
            kept.append([(o[0] if isinstance(o, tuple) else o)[m].to(torch.float16) for o in box["outs"]])
step = -(-len(data) // chunks)
parts = [data[i:i + step] for i in range(0, len(data), step)]
bare(parts[0][:64]); traced(parts[0][:64])
t = {"bare": [], "nnsight": []}
for r in range(repeats):
    for c, part in enumerate(parts):
        sides = (("bare", bare), ("nnsight", traced))
        for k, f in sides if (r + c) % 2 == 0 else sides[::-1]:
            t0 = time.perf_counter(); f(part); t[k].append(time.perf_counter() - t0)
print(json.dumps(t))
"""


def bench_capture(args) -> dict:
    from transformers import AutoModel, AutoTokenizer

    data = texts(args.examples)
    model = load_model("minilm", device="cpu")
    path = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    hf_loop(hf, tok, data[:64], args.batch, False)  # warm-up
    tmp = Path(tempfile.mkdtemp())
    step = -(-len(data) // args.chunks)
    parts = [data[i : i + step] for i in range(0, len(data), step)]

    def run_capture(texts: list[str], fast: bool):
        capture(model, texts, "resid_post", "all", tmp / "store", batch_size=args.batch, dtype="float16",
                progress=False, fast=fast, shard_mb=args.shard_mb)

    sides = {
        "bare HF forward": lambda t: hf_loop(hf, tok, t, args.batch, False),
        "HF output_hidden_states loop": lambda t: hf_loop(hf, tok, t, args.batch, True),
        "interp capture": lambda t: run_capture(t, True),
        "interp capture, bridge (fast=False)": lambda t: run_capture(t, False),
    }
    def remove_store():
        shutil.rmtree(tmp / "store", ignore_errors=True)

    for f in sides.values():
        f(data[:64])
        remove_store()
    tokens = hf_loop(hf, tok, data, args.batch, False)
    wall, cpu = timed({k: [(lambda f=f, t=t: f(t)) for t in parts] for k, f in sides.items()}, args.repeats,
                      after=remove_store)
    base = "bare HF forward"
    ratios, cpu_ratios = paired(wall, base), paired(cpu, base)
    res = {"examples": len(data), "tokens": tokens, "chunks": len(parts), "runs": wall, "cpu_runs": cpu,
           "ratios": ratios, "cpu_ratios": cpu_ratios}
    print(f"\ncapture: {len(data)} texts, {tokens} tokens, all 6 layers of all-MiniLM-L6-v2, float16, batch "
          f"{args.batch}, shards of {args.shard_mb:g} MiB; {args.repeats} repeats of {len(parts)} slices, the sides "
          "interleaved on each slice (one capture call per slice); total wall time per pass over the texts, ratio of"
          " totals, and the per-slice ratios' median [quartiles]")
    for k, v in wall.items():
        r, c = ratios[k], cpu_ratios[k]
        print(f"  {k:<38} wall {sum(v) / args.repeats:7.2f} s  {tokens * args.repeats / sum(v):7.0f} tok/s  / bare "
              f"{r['ratio']:.3f}  per slice {r['median']:.3f} [{r['q1']:.3f}-{r['q3']:.3f}]   CPU / bare "
              f"{c['ratio']:.3f}")
    if args.nnsight:
        res["nnsight"] = run_nnsight(args, path, data, tmp)
    if res.get("nnsight"):
        r = res["nnsight"]["ratios"]["nnsight"]
        print(f"  {'nnsight (own process)':<38} / bare in that process {r['ratio']:.3f}  per slice {r['median']:.3f} "
              f"[{r['q1']:.3f}-{r['q3']:.3f}]")
    print("  target: interp capture / bare >= 0.95 and >= the output_hidden_states and nnsight ratios")
    return res


def run_nnsight(args, path: str, data: list[str], tmp: Path) -> dict | None:
    """The nnsight loop and a bare forward, interleaved, in another interpreter (nnsight is not a dependency)."""
    f = tmp / "data.json"
    f.write_text(json.dumps(data))
    run = subprocess.run([args.nnsight, "-c", _NNSIGHT, path, str(f), str(args.batch), str(args.repeats),
                          str(torch.get_num_threads()), str(args.chunks)], capture_output=True, text=True)
    if run.returncode != 0:
        print(f"  nnsight failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
        return None
    t = json.loads(run.stdout.strip().splitlines()[-1])
    return {"runs": t, "ratios": paired(t, "bare")}


def timed(sides: dict, repeats: int, after=lambda: None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU (this process, all threads) seconds of each side's calls. A side is one call or a list of
    calls (one per slice of the work); each repeat runs every slice on every side back to back, the order of the
    sides rotating from slice to slice so that drift hits every side alike; ``after`` runs untimed after every call
    (removing a store). Returns one time per (repeat, slice)."""
    names = list(sides)
    calls = {k: v if isinstance(v, list) else [v] for k, v in sides.items()}
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    turn = 0
    for _ in range(repeats):
        for c in range(len(calls[names[0]])):
            for k in names[turn % len(names) :] + names[: turn % len(names)]:
                t0, c0 = time.perf_counter(), time.process_time()
                calls[k][c]()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
                after()
            turn += 1
    return wall, cpu


def paired(runs: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    """Per side: ``ratio``, the base's total time over the side's (throughput ratio over all runs), and the
    quartiles of the paired ratios (each base run over the side's run on the same slice, moments apart)."""
    out = {}
    for k, v in runs.items():
        rr = np.array([b / s for b, s in zip(runs[base], v)])
        q1, med, q3 = (float(x) for x in np.quantile(rr, [0.25, 0.5, 0.75]))
        out[k] = {"ratio": sum(runs[base]) / sum(v), "median": med, "q1": q1, "q3": q3}
    return out


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
    wall, cpu = timed(sides, args.repeats)
    base = "HF generate (bare model)"
    ratios, cpu_ratios = paired(wall, base), paired(cpu, base)
    print(f"\ngeneration: {name}, {len(prompts)} prompts x {n} new tokens, greedy, {args.repeats} interleaved "
          f"repeats (median wall; ratio of total times, per-repeat ratios' median [quartiles]); greedy tokens identical to"
          f" HF generate: {same}")
    for k, v in wall.items():
        t, r = statistics.median(v), ratios[k]
        print(f"  {k:<38} wall {t * 1e3:8.1f} ms  {len(prompts) * n / t:7.1f} tok/s  / HF {r['ratio']:.3f}  per "
              f"repeat {r['median']:.3f} [{r['q1']:.3f}-{r['q3']:.3f}]   CPU / HF "
              f"{cpu_ratios[k]['ratio']:.3f}")
    print("  target: interp generate / HF generate >= 0.95")
    return {"model": name, "same_tokens": same, "runs": wall, "cpu_runs": cpu, "ratios": ratios,
            "cpu_ratios": cpu_ratios}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=3100, help="texts captured (the issue's size: 3100)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=10,
                    help="capture: slices of the texts; every side runs each slice in turn, so pairs are moments apart")
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
