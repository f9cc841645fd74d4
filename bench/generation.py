"""The decoding loop's speed (issue 14), measured side by side in one run, interleaved, repeated, medians.

1. ``interp.generation.generate`` with no hooks vs the model's own KV-cached ``generate`` (the HF model's
   ``original_model.generate``: same left-padded prompts, greedy, ``min_new_tokens = max_new_tokens`` so both
   produce the same number of tokens). Ratio of tokens/s, target >= 0.95.
   Wall time is what a user waits; the process's CPU time is what the work costs even when other jobs share
   the cores (on a loaded machine wall times vary 2x between repeats); both are printed.
2. The engine with one steering intervention (``add`` at ``"generated"``) and one monitor (a detector's
   per-token scores) vs the engine with none. Ratio of times, target <= 1.05.

Models: SmolLM2-135M-Instruct (``load_model("smollm2")``) and a random tiny GPT-2 (``interp.testing.tiny_gpt2``,
2 layers, d_model 64). The engine's time includes tokenising the prompts; HF's does not.

Run: python bench/generation.py [--repeats 7] [--new-tokens 32] [--batch 8] [--models smollm2,tiny-gpt2]
     [--device cpu]
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

from interp.detectors import Detector
from interp.generation import generate, left_pad, render_prompts
from interp.model import load_model, model_device, model_identity
from interp.steering import Intervention
from interp.testing import tiny_gpt2
from steering import prompt_batch  # bench/steering.py: the same prompts


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(name: str, model, args) -> dict[str, float]:
    device = model_device(model)
    prompts = prompt_batch(args.batch)
    _, rows, _ = render_prompts(model, prompts)
    pad = model.tokenizer.pad_token_id or 0
    ids, mask = left_pad(rows, pad)
    ids, mask = ids.to(device), mask.to(device)
    hf = model.original_model
    n = args.new_tokens
    d = int(model.cfg.d_model)
    layer = (int(model.cfg.n_layers) - 1) // 2
    v = torch.randn(d, generator=torch.Generator().manual_seed(0))
    iv = Intervention(v / v.norm(), op="add", alpha=2.0, positions="generated", hook=f"blocks.{layer}.hook_out")
    det = Detector.from_direction(v / v.norm(), model_identity(model), hook=f"blocks.{layer + 1}.hook_out")

    def engine():
        return generate(model, prompts, max_new_tokens=n, stop_at_eos=False, batch_size=args.batch)

    def engine_hooked():
        return generate(model, prompts, act=[iv], watch=[det], max_new_tokens=n, stop_at_eos=False,
                        batch_size=args.batch)

    def hf_generate(check: bool = False):
        # timed with min_new_tokens = max_new_tokens (equal lengths); checked with EOS disabled instead, since
        # min_new_tokens masks the EOS logit and so changes the argmax wherever EOS would have won
        stop = dict(eos_token_id=None) if check else dict(min_new_tokens=n)
        with torch.inference_mode():
            return hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                               pad_token_id=pad, **stop)

    # same tokens (greedy, no interventions) before timing anything
    a = engine().token_ids
    b = hf_generate(check=True)[:, ids.shape[1] :].cpu()
    same = bool(torch.equal(a, b))
    sides = {"engine": engine, "hf": hf_generate, "engine+steer+monitor": engine_hooked}
    for fn in sides.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            sides[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    tokens = args.batch * n
    print(f"\n{name} on {device} ({args.batch} prompts x {n} new tokens, {args.repeats} repeats, median)")
    print(f"  greedy tokens identical to HF generate: {same}")
    for k, t in med.items():
        print(f"  {k:<22} wall {t * 1e3:9.1f} ms  {tokens / t:8.1f} tokens/s   CPU {cmed[k] * 1e3:9.1f} ms")
    for label, m in (("wall", med), ("CPU", cmed)):
        ratio = m["hf"] / m["engine"]  # tokens/s ratio: same token count on both sides
        over = m["engine+steer+monitor"] / m["engine"]
        print(f"  {label:<4} engine / HF generate tokens/s: {ratio:.3f} (target >= 0.95); "
              f"steer+monitor / none time: {over:.3f} (target <= 1.05)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--models", default="smollm2,tiny-gpt2")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    for name in args.models.split(","):
        if name == "tiny-gpt2":
            model = load_model(str(tiny_gpt2(tempfile.mkdtemp())), device=args.device)
        else:
            model = load_model(name, device=args.device)
        bench_model(name, model, args)


if __name__ == "__main__":
    main()
