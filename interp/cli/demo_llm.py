"""The real-LLM part of ``interp demo``: SmolLM2-135M-Instruct answers questions, a detector learns from its
own activations when its answer is wrong, watches a new generation token by token, and a sentiment vector
steers it. Everything lands in ``OUT/llm/`` with ``report.html`` linking the figures.

Steps (each one public-API call or two): ``generate`` (greedy answers to bundled questions through the chat
template) -> grading (answer or alias as a whole phrase) -> ``capture`` of the answers' tokens (region
``response``) at a few layers -> ``Detector.fit`` (layer chosen on a validation part of the train questions)
-> ``Detector.score`` on held-out questions (AUROC with a DeLong 95% CI) -> ``Detector.monitor`` on one
question, printed token by token -> ``steering_vector`` from sentiment contrast pairs -> ``sweep``.
"""

from __future__ import annotations

import html
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "smollm2"
N_TRAIN, N_TEST = 64, 32
DETECTOR_LAYERS = (8, 12, 16)  # eval/hallucination.py picks layer 12 by CV on the full question set
STEER_LAYER = 9


# ----------------------------------------------------------------------------------------------- grading and CIs


from interp.grading import is_correct
from interp.stats import auroc_ci


# ----------------------------------------------------------------------------------------------- printing


def token_line(tokens: Sequence[str], scores: Sequence[float], threshold: float, color: bool) -> str:
    """Generated tokens with their detector scores: ANSI colours on a terminal (red above the threshold,
    green below, brighter further from it), ``token[+1.23]`` otherwise."""
    out = []
    for t, s in zip(tokens, scores):
        t = t.replace("\n", "\\n")
        if color:
            frac = min(1.0, abs(s - threshold) / 4.0)
            level = int(80 + 175 * frac)
            rgb = (level, 60, 60) if s > threshold else (60, level, 60)
            out.append(f"\x1b[38;2;{rgb[0]};{rgb[1]};{rgb[2]}m{t}\x1b[0m")
        else:
            out.append(f"{t}[{s:+.2f}]")
    return ("" if color else " ").join(out)


def _say(quiet: bool, *args: Any) -> None:
    if not quiet:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------- the demo


def _questions(seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from interp.datasets import DATA_DIR

    with open(DATA_DIR / "questions.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rng = random.Random(seed)
    train = rng.sample([r for r in rows if r["split"] == "train"], N_TRAIN)
    test = rng.sample([r for r in rows if r["split"] == "test"], N_TEST)
    return train, test


def _sentiment_pairs(n: int = 16) -> tuple[list[str], list[str], list[str]]:
    from interp.datasets import DATA_DIR

    def read(name: str) -> list[dict[str, Any]]:
        with open(DATA_DIR / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    rows = [r for r in read("contrast.jsonl") if r["concept"] == "sentiment" and r["split"] == "train"]
    pos = [r["text"] for r in rows if r["label"] == 1][:n]
    neg = [r["text"] for r in rows if r["label"] == 0][:n]
    prompts = [r["text"] for r in read("steer_prompts.jsonl") if r["concept"] == "sentiment"][:4]
    return pos, neg, prompts


def _report(path: Path, summary: dict[str, Any], answers: list[dict[str, Any]], monitor_html: str,
            steering_rows: list[dict[str, Any]]) -> None:
    det = summary["detector"]
    rows = "".join(
        f"<tr><td>{html.escape(a['question'])}</td><td>{html.escape(a['response'])}</td>"
        f"<td>{'wrong' if a['wrong'] else 'right'}</td><td>{a['score']:+.2f}</td></tr>" for a in answers)
    steer = "".join(f"<tr><td>{r['alpha']:+.1f}</td><td>{html.escape(r['prompt'])}</td>"
                    f"<td>{html.escape(r['text'])}</td></tr>" for r in steering_rows)
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>interp demo: SmolLM2</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}td,th{{border-bottom:1px solid #ddd;
padding:4px;text-align:left;vertical-align:top}}table{{border-collapse:collapse}}</style></head><body>
<h1>interp demo: a real chat model (SmolLM2-135M-Instruct)</h1>
<p>The model answered {summary['n_train']} train and {summary['n_test']} test questions greedily; it was right on
{summary['accuracy_train']:.0%} of the train and {summary['accuracy_test']:.0%} of the test questions.</p>
<h2>Hallucination detector</h2>
<p>A probe on the answer tokens' residual stream at <code>{det['hook']}</code> (layer chosen on a validation
part of the train questions), score = mean over the answer's tokens, positive = wrong answer.
Test AUROC {det['test_auroc']:.3f} [95% CI {det['test_lo']:.3f}, {det['test_hi']:.3f}] on {summary['n_test']}
questions ({det['test_wrong']} wrong) — a small sample: see <code>docs/real-model.md</code> for the full
evaluation. Recall at 1% FPR is undefined with fewer than 100 negatives.</p>
<p><a href="monitor.html">The detector monitoring one generation, token by token</a></p>
<table><tr><th>test question</th><th>model's answer</th><th>grade</th><th>detector score</th></tr>{rows}</table>
{monitor_html}
<h2>Steering</h2>
<p>A diff-in-means sentiment vector at <code>{summary['steering']['hook']}</code> from
{summary['steering']['pairs']} contrast pairs, added with alpha = k &times; |mean difference|.
<a href="steering.html">Projection on the vector against alpha</a>.</p>
<table><tr><th>alpha</th><th>prompt</th><th>continuation</th></tr>{steer}</table>
<p>Wall time {summary['wall_s']:.0f} s.</p></body></html>"""
    path.write_text(body, encoding="utf-8")


def run(out_dir: Path, quiet: bool = False) -> dict[str, Any]:
    """Run the real-LLM demo into ``out_dir/llm`` and return its numbers (also in ``llm/summary.json``)."""
    from interp import Detector, generate, load_model, steering_vector, sweep
    from interp.reports import write_html
    from interp.capture import capture  # not `from interp import capture`: that can be the submodule

    t0 = time.perf_counter()
    out = Path(out_dir) / "llm"
    out.mkdir(parents=True, exist_ok=True)
    color = sys.stdout.isatty()
    _say(quiet, "== SmolLM2-135M-Instruct: on-policy hallucination detection ==")
    model = load_model(MODEL)
    tok = model.tokenizer
    train, test = _questions()
    qs = train + test
    prompts = [tok.apply_chat_template(q["messages"], add_generation_prompt=True, tokenize=False) for q in qs]
    gen = generate(model, prompts, max_new_tokens=12, batch_size=32, progress=not quiet)
    rows = []
    for q, p, a in zip(qs, prompts, gen.texts):
        a = a.rstrip() or "."  # a region must hold at least one character
        rows.append({"text": p + a, "label": int(not is_correct(a, q["answer"], q.get("aliases", []))),
                     "split": q["split"], "regions": {"response": [len(p), len(p) + len(a)]}})
    wrong = np.array([r["label"] for r in rows])
    n_tr = len(train)
    _say(quiet, f"answered {len(qs)} questions: {1 - wrong[:n_tr].mean():.0%} right (train), "
                f"{1 - wrong[n_tr:].mean():.0%} right (test)")
    store = capture(model, rows, hooks="resid_post", layers=list(DETECTOR_LAYERS), positions="response",
                    out=out / "answers", batch_size=32, dtype="float32", progress=not quiet, resume=False)
    det = Detector(hook="best", aggregation="mean", mask="response", target_fpr=0.1, C=0.1, seed=0)
    det.fit(store, "label", progress=not quiet)
    scored = det.score(model, rows[n_tr:])
    test_scores = scored.aggregate.numpy()
    ci = auroc_ci(test_scores, wrong[n_tr:])
    _say(quiet, f"detector at {det.hook_}: test AUROC {ci['auroc']:.3f} [95% CI {ci['lo']:.3f}, {ci['hi']:.3f}] "
                f"({int(wrong[n_tr:].sum())} wrong of {len(test)})")
    # one monitored generation: a test question the model got wrong when there is one
    pick = next((i for i in range(len(test)) if wrong[n_tr + i]), 0)
    mon = det.monitor(model, prompts[n_tr + pick], max_new_tokens=16)
    _say(quiet, f"\nQ: {test[pick]['question']}  (expected: {test[pick]['answer']})")
    _say(quiet, "A: " + token_line(mon.tokens, mon.scores.tolist(), det.threshold_, color))
    _say(quiet, f"   mean score {mon.aggregate:+.2f} vs threshold {det.threshold_:+.2f}: "
                f"{'FLAGGED as likely wrong' if mon.aggregate > det.threshold_ else 'not flagged'}")
    write_html(out / "monitor.html", mon.plot())

    _say(quiet, "\n== steering along a sentiment vector ==")
    pos, neg, steer_prompts = _sentiment_pairs()
    hook = f"blocks.{STEER_LAYER}.hook_out"
    direction = steering_vector(model, pos, neg, hook=hook, positions="mean", progress=False)
    alphas = [k * direction.norm for k in (-4.0, 0.0, 4.0)]
    res = sweep(model, steer_prompts, direction, alphas, max_new_tokens=12, batch_size=len(steer_prompts),
                progress=not quiet)
    write_html(out / "steering.html", res.figure)
    steering_rows = [{"alpha": r["alpha"], "prompt": r["prompt"], "text": r["text"]}
                     for r in res.table.to_dict("records")]
    for r in steering_rows[:: len(steer_prompts)]:
        _say(quiet, f"alpha {r['alpha']:+6.1f}: {r['prompt']}{r['text']!r}")
    summary = {
        "model": MODEL, "n_train": n_tr, "n_test": len(test),
        "accuracy_train": float(1 - wrong[:n_tr].mean()), "accuracy_test": float(1 - wrong[n_tr:].mean()),
        "detector": {"hook": det.hook_, "threshold": det.threshold_, "test_auroc": ci["auroc"], "test_lo": ci["lo"],
                     "test_hi": ci["hi"], "test_wrong": int(wrong[n_tr:].sum())},
        "monitored": {"question": test[pick]["question"], "text": mon.text, "scores": mon.scores.tolist(),
                      "aggregate": mon.aggregate},
        "steering": {"hook": direction.hook, "pairs": len(pos), "alphas": alphas},
        "files": {"report": str(out / "report.html"), "monitor": str(out / "monitor.html"),
                  "steering": str(out / "steering.html")},
    }
    summary["wall_s"] = time.perf_counter() - t0
    answers = [{"question": q["question"], "response": r["text"][r["regions"]["response"][0]:],
                "wrong": r["label"], "score": float(s)} for q, r, s in zip(test, rows[n_tr:], test_scores)]
    mon_html = "<p>" + " ".join(
        f"<span style='background:{'#f4a6a6' if s > det.threshold_ else '#c8eac8'}' title='{s:+.2f}'>"
        f"{html.escape(t)}</span>" for t, s in zip(mon.tokens, mon.scores.tolist())) + "</p>"
    _report(out / "report.html", summary, answers, mon_html, steering_rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _say(quiet, f"\nreport: {(out / 'report.html').resolve()}  ({summary['wall_s']:.0f} s)")
    return summary


if __name__ == "__main__":
    run(Path(sys.argv[1] if len(sys.argv) > 1 else "demo"), quiet=False)
