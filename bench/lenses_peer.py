"""The tuned-lens package (0.2.0) trained from the model: the peer side of bench/lenses.py.

Runs in the separate environment that holds tuned-lens (it cannot sit next to TransformerLens 4); never imports
interp. Reads packed token chunks (JSON), trains the package's ``TunedLens`` the way its ``train`` command does
(a forward pass of the Hugging Face model per batch, KL to the model's final logits per layer under bfloat16
autocast, gradient clipping at 1, the package's default optimizer: SGD with Nesterov momentum 0.9, lr 1.0, and
its linear schedule) for the chosen layers only, and writes the translators as affine maps
(``weight = I + W``, ``bias = b``) in safetensors. Prints one JSON line: training seconds, steps, tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import torch as th
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup
from tuned_lens import TunedLens

# tuned_lens.scripts.ingredients.Optimizer's defaults (that module imports torchdata.dataloader2, which torchdata
# 0.11 no longer has, so they are restated here): SGD, Nesterov momentum 0.9, lr = lr_scale * (1 - momentum) with
# lr_scale 1, weight decay 1e-3, no warm-up, linear decay to 0 over the steps.
MOMENTUM, LR_SCALE, WEIGHT_DECAY = 0.9, 1.0, 1e-3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--chunks", required=True, help="JSON list of equal-length token id lists")
    p.add_argument("--layers", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--chunks-per-step", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    th.set_num_threads(args.threads)
    th.manual_seed(args.seed)
    layers = [int(x) for x in args.layers.split(",")]
    chunks = th.tensor(json.load(open(args.chunks)))
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=th.float32).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    lens = TunedLens.from_model(model)
    params = [q for i in layers for q in lens[i + 1].parameters()]  # translator i+1 reads hidden_states[i+1]
    opt = th.optim.SGD(params, lr=LR_SCALE * (1 - MOMENTUM), momentum=MOMENTUM, nesterov=True,
                       weight_decay=WEIGHT_DECAY)
    sched = get_linear_schedule_with_warmup(opt, 0, args.steps)
    g = th.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        batch = chunks[th.randint(len(chunks), (args.chunks_per_step,), generator=g)]
        with th.no_grad():
            out = model(input_ids=batch, output_hidden_states=True)
        labels = out.logits.float().log_softmax(-1)
        for i in layers:
            with th.autocast("cpu", dtype=th.bfloat16):
                logits = lens(out.hidden_states[i + 1], idx=i + 1)
                loss = th.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
            loss.backward()
        th.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        sched.step()
    seconds = time.perf_counter() - t0
    d = model.config.hidden_size
    weight = th.stack([th.eye(d) + lens[i + 1].weight.detach().float() for i in layers])
    bias = th.stack([lens[i + 1].bias.detach().float() for i in layers])
    save_file({"weight": weight.contiguous(), "bias": bias.contiguous()}, args.out)
    print(json.dumps({"seconds": seconds, "steps": args.steps, "tokens": args.steps * args.chunks_per_step
                      * chunks.shape[1]}))


if __name__ == "__main__":
    main()
