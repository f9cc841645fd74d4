"""Figure 4: steering SmolLM2 with a contrast-pair vector — behaviour and fluency against alpha.

The sentiment contrast pairs of ``contrast.jsonl`` (``train`` split; ``label`` 1 = positive) give a
diff-in-means steering vector at ``STEER_LAYER`` (``interp.steering_vector``, mean over each sentence's
tokens). The neutral sentiment prompts of ``steer_prompts.jsonl`` are continued greedily (24 new tokens)
with the vector added at every position, for each alpha (``interp.sweep``). Behaviour: a sentiment probe
(logistic, trained on the ``train`` contrast sentences at ``READ_LAYER``, checked on the ``test`` ones)
scores each continuation on the unsteered model. Fluency: the perplexity of each continuation, given its
prompt, under the unsteered model. Alphas are multiples of the vector's raw length (the distance between
the class means).

    python eval/steer_sweep.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

STEER_LAYER, READ_LAYER = 9, 20
MULTIPLES = (-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0)
MAX_NEW = 24


def perplexity_metric(prompts: list[str]):
    """A sweep metric: perplexity of each generated continuation given its prompt, under the unsteered model
    (one right-padded, masked forward for all of them; the end-of-turn token is not scored)."""
    from interp.model import tokenize

    def metric(model, texts, token_ids) -> list[float]:
        eos = model.tokenizer.eos_token_id
        prompt_ids = [tokenize(model, [p]).input_ids[0].tolist() for p in prompts]
        gens = [[int(t) for t in g if int(t) != eos] for g in token_ids]
        seqs = [p + g for p, g in zip(prompt_ids, gens)]
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids, attention_mask=mask, return_type="logits").float(), -1)
        out = []
        for i, (p, g) in enumerate(zip(prompt_ids, gens)):
            if not g:
                out.append(float("nan"))
                continue
            lp = logp[i, len(p) - 1 : len(p) - 1 + len(g)].gather(-1, torch.tensor(g)[:, None])
            out.append(float(torch.exp(-lp.mean())))
        return out

    return metric


def sentiment_probe(progress: bool = True) -> dict[str, Any]:
    """A logistic sentiment probe on mean-pooled activations at READ_LAYER: train pairs fit, test pairs check."""
    from interp import LinearProbe
    from interp.capture import capture

    rows = [r for r in c.rows("contrast") if r["concept"] == "sentiment"]
    examples = [{"text": r["text"], "label": r["label"], "split": r["split"], "pair_id": r["pair_id"]} for r in rows]
    store = capture(c.model(), examples, hooks="resid_post", layers=[READ_LAYER], positions="mean",
                    out=c.cache_dir("stores") / f"sentiment-{c.digest(examples)}", dtype="float32",
                    progress=progress)
    X = store.activations(store.hooks[0]).float()
    y = np.array([e["label"] for e in store.examples()])
    split = np.array([e["split"] for e in store.examples()])
    probe = LinearProbe(C=1.0).fit(X[split == "train"], torch.as_tensor(y[split == "train"]))
    probe.hook = store.hooks[0]
    test = c.auroc_summary(np.asarray(probe.decision_function(X[split == "test"])), y[split == "test"])
    return {"probe": probe, "test": test, "rows": rows}


def run(progress: bool = True) -> dict[str, Any]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from interp import probe_score, steering_vector, sweep

    timer = c.Timer()
    m = c.model()
    sp = sentiment_probe(progress)
    train = [r for r in sp["rows"] if r["split"] == "train"]
    direction = steering_vector(m, [r["text"] for r in train if r["label"] == 1],
                                [r["text"] for r in train if r["label"] == 0],
                                hook=c.hook_names()[STEER_LAYER], positions="mean", progress=progress)
    prompts = [r["text"] for r in c.rows("steer_prompts") if r["concept"] == "sentiment"]
    alphas = [k * direction.norm for k in MULTIPLES]
    res = sweep(m, prompts, direction, alphas,
                metric={"sentiment": probe_score(sp["probe"], pool="mean"), "perplexity": perplexity_metric(prompts)},
                max_new_tokens=MAX_NEW, batch_size=len(prompts), progress=progress)
    table = res.table
    rows = []
    for k, a in zip(MULTIPLES, alphas):
        t = table[table["alpha"] == a]
        s, ppl = t["sentiment"].to_numpy(), t["perplexity"].to_numpy()
        logppl = np.log(ppl[np.isfinite(ppl)])
        rows.append({
            "multiple": k, "alpha": a,
            "sentiment_mean": float(s.mean()), "sentiment_ci95": c.bootstrap_ci(s),
            "positive_share": float((s > 0).mean()), "positive_share_wilson95": c.wilson(int((s > 0).sum()), len(s)),
            "perplexity_geomean": float(np.exp(logppl.mean())),
            "perplexity_ci95": [float(np.exp(x)) for x in c.bootstrap_ci(logppl)],
            "examples": t["text"].head(3).tolist(),
        })
    result = {
        "figure": "steering sweep on SmolLM2: sentiment vector, behaviour and fluency",
        "command": "python eval/steer_sweep.py", "model": c.MODEL,
        "steer_hook": direction.hook, "read_hook": sp["probe"].hook, "direction_norm": direction.norm,
        "separation_train": direction.stats["separation"], "n_prompts": len(prompts), "max_new_tokens": MAX_NEW,
        "sentiment_probe_test": sp["test"], "alphas": rows,
    }
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    ks = list(MULTIPLES)
    sm = np.array([r["sentiment_mean"] for r in rows])
    fig.add_trace(go.Scatter(x=ks, y=sm, name="sentiment probe score (mean, bootstrap 95% CI)",
                             line={"color": "#2ca02c"},
                             error_y={"type": "data", "symmetric": False,
                                      "array": [r["sentiment_ci95"][1] for r in rows] - sm,
                                      "arrayminus": sm - [r["sentiment_ci95"][0] for r in rows]}),
                  secondary_y=False)
    pm = np.array([r["perplexity_geomean"] for r in rows])
    fig.add_trace(go.Scatter(x=ks, y=pm, name="perplexity under the unsteered model (geometric mean, 95% CI)",
                             line={"color": "#9467bd", "dash": "dash"},
                             error_y={"type": "data", "symmetric": False,
                                      "array": [r["perplexity_ci95"][1] for r in rows] - pm,
                                      "arrayminus": pm - [r["perplexity_ci95"][0] for r in rows]}),
                  secondary_y=True)
    fig.update_xaxes(title_text=f"alpha / |mean difference| (|d| = {direction.norm:.2f}, added at layer {STEER_LAYER})")
    fig.update_yaxes(title_text=f"sentiment probe logit (layer {READ_LAYER})", secondary_y=False)
    fig.update_yaxes(title_text="perplexity", type="log", secondary_y=True)
    fig.update_layout(title=f"SmolLM2 steered along a sentiment vector ({len(prompts)} prompts, {MAX_NEW} tokens)",
                      height=480, width=950, legend={"orientation": "h", "y": -0.2})
    result["wall_s"] = timer()
    c.save("steer_sweep", result, fig)
    res.save(c.out_dir() / "steer_sweep_result")
    return result


def summary(r: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("sentiment probe test AUROC", c.fmt_auc(r["sentiment_probe_test"]))]
    for row in r["alphas"]:
        if row["multiple"] in (MULTIPLES[0], 0.0, MULTIPLES[-1]):
            lo, hi = row["sentiment_ci95"]
            out.append((f"steer x{row['multiple']:+g}: sentiment | perplexity",
                        f"{row['sentiment_mean']:+.2f} [{lo:+.2f}, {hi:+.2f}] | {row['perplexity_geomean']:.1f}"))
    return out


if __name__ == "__main__":
    for k, v in summary(run()):
        print(f"{k:48s} {v}")
