"""Detector benchmarks (issue 7), each a ratio measured side by side in one run (runs interleaved, medians).

1. monitoring cost: ``Detector.monitor`` (greedy, scoring every generated token) vs unmonitored generation of
   the same tokens: TransformerBridge's ``generate`` with the KV cache, and the same step-by-step KV-cache loop
   without the hook. Target: monitor time <= 1.05x unmonitored.
2. batch scoring throughput: ``Detector.score`` over texts in batches (tokenise, forward to the hook's layer,
   score, aggregate) vs a bare batched forward of the same batches (tokenise + the whole model, nothing kept).
   Target: scoring throughput >= 0.8x bare forward.

Models: a random GPT-2 of realistic-ish CPU size (4 layers, d_model 256, written by interp.testing.tiny_gpt2)
and the bundled MiniLM (6-layer BERT, batch scoring only). Hooks: the last layer (no early stop: the worst
case) and a middle layer.

Run: .venv/bin/python bench/detectors.py [--repeats 5] [--new-tokens 64] [--texts 256]
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

from interp.datasets import load_dataset
from interp.detectors import Detector
from interp.model import load_model, model_identity, tokenize
from interp.testing import tiny_gpt2


def detector_for(model, hook: str, seed: int = 0) -> Detector:
    v = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(seed))
    return Detector.from_direction(v, model_identity(model), hook=hook, threshold=1e9, mask="all")


def kv_loop(model, prompt: str, n: int) -> list[int]:
    """Unmonitored greedy generation: the same KV-cache step loop as monitor, without any hook."""
    toks = tokenize(model, [prompt])
    ids = toks.input_ids[:, : toks.lengths[0]]
    out = []
    with torch.inference_mode():
        logits, cache = model(ids, return_type="logits_and_cache")
        for _ in range(n):
            nxt = logits[0, -1].argmax(-1)
            out.append(int(nxt))
            if len(out) == n:
                break
            logits, cache = model(nxt.view(1, 1), return_type="logits_and_cache", past_key_values=cache)
    return out


def bridge_generate(model, prompt: str, n: int) -> list[int]:
    toks = tokenize(model, [prompt])
    ids = toks.input_ids[:, : toks.lengths[0]]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False,
                             use_past_kv_cache=True, return_type="tokens")
    return out[0, ids.shape[1]:].tolist()


def timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def bench_monitor(model, hooks: list[str], n_new: int, repeats: int) -> list[str]:
    prompt = "Question: Did you finish the report? Answer:"
    lines = []
    for hook in hooks:
        det = detector_for(model, hook)
        mon = lambda: det.monitor(model, prompt, n_new, stop_at_eos=False).token_ids.tolist()  # noqa: E731
        gen = lambda: bridge_generate(model, prompt, n_new)  # noqa: E731
        loop = lambda: kv_loop(model, prompt, n_new)  # noqa: E731
        ref = mon()
        assert ref == loop() == gen(), "monitor must generate exactly the unmonitored tokens"
        times = {"monitor": [], "generate": [], "kv_loop": []}
        for _ in range(repeats):  # interleaved, so machine load hits all three alike
            for name, fn in (("monitor", mon), ("generate", gen), ("kv_loop", loop)):
                times[name].append(timed(fn)[0])
        med = {k: statistics.median(v) for k, v in times.items()}
        lines.append(
            f"monitor {hook:<18} {n_new} tokens: monitor {med['monitor'] * 1e3:8.1f} ms | "
            f"bridge generate {med['generate'] * 1e3:8.1f} ms (ratio {med['monitor'] / med['generate']:.3f}) | "
            f"same KV loop, no hook {med['kv_loop'] * 1e3:8.1f} ms (ratio {med['monitor'] / med['kv_loop']:.3f})"
        )
        print(lines[-1], flush=True)
    return lines


def bare_forward(model, batches: list[list[str]]) -> int:
    tokens = 0
    with torch.inference_mode():
        for batch in batches:
            t = tokenize(model, batch)
            model(t.input_ids, attention_mask=t.attention_mask, return_type=None)
            tokens += int(t.attention_mask.sum())
    return tokens


def bench_score(name: str, model, hooks: list[str], texts: list[str], batch_size: int, repeats: int) -> list[str]:
    # the batches score() forms: texts sorted by length, then chunks of batch_size
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    ordered = [texts[i] for i in order]
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    lines = []
    for hook in hooks:
        det = detector_for(model, hook)
        times = {"score": [], "bare": []}
        n_tok = bare_forward(model, batches)
        det.score(model, texts, batch_size=batch_size)
        for _ in range(repeats):
            times["score"].append(timed(lambda: det.score(model, texts, batch_size=batch_size))[0])
            times["bare"].append(timed(bare_forward, model, batches)[0])
        med = {k: statistics.median(v) for k, v in times.items()}
        lines.append(
            f"score   {name:<8} {hook:<18} {len(texts)} texts, {n_tok} tokens, batch {batch_size}: "
            f"score {n_tok / med['score']:9.0f} tok/s | bare forward {n_tok / med['bare']:9.0f} tok/s | "
            f"throughput ratio {med['bare'] / med['score']:.3f}"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        gpt2 = load_model(str(tiny_gpt2(tmp, n_layer=4, d_model=256, n_head=4, n_ctx=256)), device="cpu")
        bench_monitor(gpt2, ["blocks.3.hook_out", "blocks.1.hook_out"], args.new_tokens, args.repeats)
        pool = load_dataset("deception").texts() + load_dataset("entities").texts() + load_dataset("capitals").texts()
        texts = (pool * (args.texts // len(pool) + 1))[: args.texts]
        bench_score("gpt2-4L", gpt2, ["blocks.3.hook_out", "blocks.1.hook_out"], texts, args.batch_size, args.repeats)
        minilm = load_model("minilm", device="cpu")
        bench_score("minilm", minilm, ["blocks.5.hook_out", "blocks.3.hook_out"], texts, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
