"""Steering overhead (issue 5): batched generation with one ``add`` intervention vs the same generation
unsteered, measured side by side in one run. Target: steered / unsteered <= 1.10.

Model: a random GPT-2 written by ``interp.testing.tiny_gpt2`` (4 layers, d_model 256, 4 heads), 8 prompts of
different lengths (left-padded batch), 32 new tokens, greedy, no early stop, so both runs do the same work.
Runs alternate (the order rotates every repeat) after a warm-up, and medians are compared. Also timed for
context: positions="generated" (one more mask per step) and TransformerBridge.generate on the same prompts,
and, measured directly, the time spent inside the steering code itself (robust to other load on the machine).

Run: .venv/bin/python bench/steering.py [--repeats 9] [--new-tokens 32] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from interp.model import load_model
from interp.steering import Intervention, generate
from interp.testing import tiny_gpt2

PROMPTS = [
    "The capital of France is",
    "Once upon a time a small model learned to count",
    "I love this movie, it is wonderful and happy.",
    "Question: Did you finish the report? Answer:",
    "Marie Curie studied radioactivity in Paris and",
    "Hi",
    "Steering vectors push a model's residual stream along a direction",
    "The quick brown fox",
]


def prompt_batch(n: int) -> list[str]:
    """``n`` prompts: PROMPTS repeated as often as needed (also used by bench/generation.py and bench/fastpath.py)."""
    return (PROMPTS * ((n + len(PROMPTS) - 1) // len(PROMPTS)))[:n]


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is what the work costs even when other
    processes share the cores; wall time is what a user waits."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    path = tiny_gpt2(tempfile.mkdtemp(), n_layer=4, d_model=256, n_head=4, n_ctx=256, vocab_size=512)
    model = load_model(str(path), device="cpu")
    prompts = prompt_batch(args.batch)
    v = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(0))
    add_all = Intervention(v / v.norm(), op="add", alpha=4.0, positions="all", hook="blocks.2.hook_resid_post")
    add_gen = Intervention(v / v.norm(), op="add", alpha=4.0, positions="generated", hook="blocks.2.hook_resid_post")
    kw = dict(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eos=False, batch_size=args.batch)

    runs = {
        "unsteered": lambda: generate(model, prompts, **kw),
        "add (positions=all)": lambda: generate(model, prompts, steering=[add_all], **kw),
        "add (positions=generated)": lambda: generate(model, prompts, steering=[add_gen], **kw),
        "TransformerBridge.generate, unsteered": lambda: model.generate(
            prompts, max_new_tokens=args.new_tokens, do_sample=False, stop_at_eos=False, verbose=False),
    }
    for fn in runs.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.repeats):  # rotate the order so no run always goes first
        for name in names[r % len(names):] + names[: r % len(names)]:
            w, c = timed(runs[name])
            wall[name].append(w)
            cpu[name].append(c)
    bw, bc = statistics.median(wall["unsteered"]), statistics.median(cpu["unsteered"])
    print(f"model: tiny GPT-2, 4 layers, d_model 256; batch {len(prompts)} prompts (left-padded), "
          f"{args.new_tokens} new tokens, greedy; {args.repeats} rotating repeats, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'run':40s} {'wall median s':>14s} {'ratio':>7s} {'CPU median s':>13s} {'ratio':>7s}")
    for name in runs:
        mw, mc = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:40s} {mw:14.4f} {mw / bw:6.3f}x {mc:13.4f} {mc / bc:6.3f}x")
    rw = statistics.median(wall["add (positions=all)"]) / bw
    rc = statistics.median(cpu["add (positions=all)"]) / bc
    verdict = "PASS" if max(rw, rc) <= 1.10 else "FAIL"
    print(f"steered/unsteered (one add): wall {rw:.3f}x, CPU {rc:.3f}x  target <= 1.10  {verdict}")
    inside, total = time_inside_steering(lambda: generate(model, prompts, steering=[add_all], **kw))
    print(f"time inside interp's steering hooks (position mask + the add) during one steered generate: "
          f"{inside * 1e3:.1f} ms of {total:.3f} s = {inside / total:.2%}")


def time_inside_steering(fn) -> tuple[float, float]:
    """Seconds spent in the intervention hooks during ``fn()`` (``interp.generation``'s hooks that act: the
    position mask and the op), and in total: the steering overhead measured directly, so that it is visible
    even when wall times are noisy."""
    import interp.generation as gen

    spent = [0.0]
    orig_make = gen._act_hook

    def make(*a, **k):
        hook_fn = orig_make(*a, **k)

        def timed_hook(act, hook):
            t = time.perf_counter()
            try:
                return hook_fn(act, hook)
            finally:
                spent[0] += time.perf_counter() - t

        return timed_hook

    gen._act_hook = make
    try:
        t0 = time.perf_counter()
        fn()
        return spent[0], time.perf_counter() - t0
    finally:
        gen._act_hook = orig_make


if __name__ == "__main__":
    main()
