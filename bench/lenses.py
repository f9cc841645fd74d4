"""interp's tuned lens (trained from a store) vs the tuned-lens package 0.2.0 (trained from the model), side by side.

    PYTHONPATH=$PWD .venv/bin/python bench/lenses.py --peer-python /tmp/tl-venv/bin/python

On SmolLM2-135M-Instruct (the bundled decoder): ``--texts`` statements from the bundled capitals and truth
datasets, split 80/20 by example. The train texts are captured once into a store (``resid_post`` at ``--layers``
and the last layer, every position); the same train texts, packed into ``--chunk``-token chunks, feed the
package. Both train translators for ``--layers`` only (CPU-sized: the unembedding, 49152 x 576, dominates the
cost of every layer on every token) with the same number of tokens per step: the package and interp's default
lens (identity start, SGD with Nesterov momentum) for ``--steps`` steps, and interp's lens started at the
least-squares shortcut (``init="shortcut"``) for ``--shortcut-steps``. Repeated ``--repeats``
times, alternating which side runs first. Then both lenses are scored by the same code (``interp.lenses.lens_kl``)
on the held-out texts' rows: mean KL(final || lens) per layer, with the logit lens beside. Prints training
seconds of each and their ratio (target: interp at least 5x faster), and the KL table (target: interp's tuned
lens at most the package's at every layer).

The peer environment: ``python3 -m venv /tmp/tl-venv && /tmp/tl-venv/bin/pip install torch==2.13.0 &&
/tmp/tl-venv/bin/pip install tuned-lens==0.2.0``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from interp.capture import capture
from interp.datasets import load_dataset
from interp.lenses import TunedLens, lens_kl, train_tuned_lens
from interp.model import load_model, resolve_model_path


def texts(n: int, seed: int) -> list[dict]:
    rows = [e.text for e in load_dataset("capitals")] + [e.text for e in load_dataset("truth") if e.text]
    rows = sorted(set(rows))
    random.Random(seed).shuffle(rows)
    rows = rows[:n]
    cut = int(0.8 * len(rows))
    return [{"text": t, "label": 0, "split": "train" if i < cut else "test"} for i, t in enumerate(rows)]


def packed_chunks(model, train: list[str], length: int) -> list[list[int]]:
    """The package's data layout: texts tokenised, joined by EOS, cut into equal chunks."""
    tok = model.tokenizer
    stream: list[int] = []
    for t in train:
        stream += tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]
    return [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-python", default="/tmp/tl-venv/bin/python")
    p.add_argument("--texts", type=int, default=600)
    p.add_argument("--layers", default="6,12,18,24")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tokens-per-step", type=int, default=128)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--shortcut-steps", type=int, default=4, help="steps of interp's lens started at the shortcut")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="lens-bench-"))
    model = load_model("smollm2", progress=False)
    model_dir = resolve_model_path("smollm2", progress=False)[1]
    n_layers = int(model.cfg.n_layers)
    data = texts(args.texts, 0)
    t0 = time.perf_counter()
    store = capture(model, data, hooks="resid_post", layers=[*layers, n_layers - 1], positions="all",
                    out=work / "store", progress=False)
    capture_s = time.perf_counter() - t0
    train_rows, test_rows = store.train_test_split()
    chunks = packed_chunks(model, [d["text"] for d in data if d["split"] == "train"], args.chunk)
    (work / "chunks.json").write_text(json.dumps(chunks))
    per_step = max(1, args.tokens_per_step // args.chunk)
    print(f"SmolLM2-135M-Instruct, layers {layers}; {len(data)} texts: {train_rows.numel()} train rows "
          f"({len(chunks)} chunks of {args.chunk} for the package), {test_rows.numel()} held-out rows; capture "
          f"{capture_s:.1f} s; {args.steps} steps x {per_step * args.chunk} tokens; threads {args.threads}")

    sides = ("interp", "interp_shortcut", "package")
    times: dict[str, list[float]] = {k: [] for k in sides}
    lenses: dict[str, TunedLens] = {}
    for r in range(args.repeats):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            if side.startswith("interp"):
                t0 = time.perf_counter()
                steps = args.shortcut_steps if side == "interp_shortcut" else args.steps
                lenses[side] = train_tuned_lens(store, model, layers, steps=steps,
                                                batch_size=per_step * args.chunk, progress=False,
                                                init="shortcut" if side == "interp_shortcut" else "identity")
                times[side].append(time.perf_counter() - t0)
            else:
                out = work / f"peer-{r}.safetensors"
                res = subprocess.run([args.peer_python, str(Path(__file__).with_name("lenses_peer.py")), "--model",
                                      str(model_dir), "--chunks", str(work / "chunks.json"), "--layers", args.layers,
                                      "--steps", str(args.steps), "--chunks-per-step", str(per_step), "--out", str(out),
                                      "--threads", str(args.threads)], capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(f"the tuned-lens side failed:\n{res.stderr[-3000:]}")
                times["package"].append(json.loads(res.stdout.strip().splitlines()[-1])["seconds"])
                from safetensors.torch import load_file

                t = load_file(str(out))
                lenses["package"] = TunedLens(layers, t["weight"], t["bias"])
            print(f"repeat {r} {side}: {times[side][-1]:.1f} s", flush=True)

    best = {k: min(v) for k, v in times.items()}
    print(f"\ntraining seconds (best of {args.repeats}), speed-up over tuned-lens from the model (target >= 5x):")
    for side in sides:
        print(f"  {side:16s} {best[side]:7.1f} s  {best['package'] / best[side]:5.2f}x")
    evals = {side: lens_kl(store, model, lenses[side], [*layers, n_layers - 1]) for side in sides}
    table = evals["interp"][["layer", "kl_logit"]].copy()
    for side in sides:
        table[f"kl_{side}"] = evals[side]["kl_tuned"]
    for side in sides:
        table[f"top1_{side}"] = evals[side]["top1_tuned"]
    print(f"held-out KL(final || lens), nats, mean over {int(evals['interp'].n.iloc[0])} rows; top-1 agreement:")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for side in sides[:2]:
        worse = table[table[f"kl_{side}"] > table.kl_package + 1e-6].layer.tolist()
        print(f"{side}: matches or beats the package at every layer" if not worse else
              f"{side}: worse than the package at layers {worse}")


if __name__ == "__main__":
    main()
