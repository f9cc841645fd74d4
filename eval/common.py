"""Shared pieces of the real-model evaluations: data, chat rendering, grading, statistics, outputs.

Every script in ``eval/`` runs SmolLM2-135M-Instruct (``load_model("smollm2")``) on the bundled datasets
(``interp/data``), writes ``<out>/<name>.json`` (numbers) and ``<out>/<name>.html`` (plotly figure; a PNG as
well when kaleido is installed) under ``runs/eval`` (``INTERP_EVAL_OUT`` overrides it), and caches the
expensive model passes (generations, activation stores) under ``<out>/cache`` keyed by a hash of their inputs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.reports import write_html
from interp.grading import is_correct, normalize  # noqa: F401 (re-exported)
from interp.stats import auroc_ci, delong_placements  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2"
MIN_NEGATIVES = 100  # recall at 1% FPR is reported only with at least this many negatives
N_BOOT = 2000
SEED = 0


def out_dir() -> Path:
    d = Path(os.environ.get("INTERP_EVAL_OUT", ROOT / "runs" / "eval"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def cache_dir(*parts: str) -> Path:
    d = out_dir().joinpath("cache", *parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@functools.cache
def model():
    from interp import load_model

    torch.manual_seed(SEED)
    return load_model(MODEL)


# ----------------------------------------------------------------------------------------------- data


def rows(name: str) -> list[dict[str, Any]]:
    """The rows of a bundled dataset ``interp/data/<name>.jsonl`` (``INTERP_EVAL_DATA`` overrides the folder)."""
    folder = Path(os.environ.get("INTERP_EVAL_DATA", ROOT / "interp" / "data"))
    path = folder / f"{name}.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} is missing: the evaluations need the bundled dataset {name}.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def chat_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The model's chat template rendered to text, ready for the assistant's answer."""
    return model().tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def chat_with_answer(messages: Sequence[dict[str, str]]) -> str:
    """A rendered chat whose last message is the assistant's, cut right after its content (no end-of-turn
    token), so the last token of the text is the answer's last token."""
    msgs = list(messages)
    assert msgs and msgs[-1]["role"] == "assistant", "the last message must be the assistant's"
    return chat_prompt(msgs[:-1]) + msgs[-1]["content"]


# ----------------------------------------------------------------------------------------------- statistics


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (centre - half, centre + half)


def delong(scores: Any, y: Any) -> dict[str, float]:
    """AUROC with DeLong's 95% confidence interval (clipped to [0, 1])."""
    return auroc_ci(scores, y)


def delong_paired(a: Any, b: Any, y: Any) -> dict[str, float]:
    """AUROC(a) - AUROC(b) on the same examples, with DeLong's paired 95% CI and two-sided p-value."""
    yy = np.asarray(y).astype(int)
    va = delong_placements(a, yy)
    vb = delong_placements(b, yy)
    diff = float(va[0].mean() - vb[0].mean())
    var = 0.0
    for i in range(2):
        c = np.cov(np.stack([va[i], vb[i]]))
        var += (c[0, 0] + c[1, 1] - 2 * c[0, 1]) / va[i].size
    se = math.sqrt(max(var, 1e-300))
    p = math.erfc(abs(diff) / se / math.sqrt(2))
    return {"diff": diff, "lo": diff - 1.96 * se, "hi": diff + 1.96 * se, "p": p}


def bootstrap_ci(values: Any, stat: Callable[[np.ndarray], float] = np.mean, n: int = N_BOOT,
                 seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of ``stat`` over the first axis of ``values``."""
    v = np.asarray(values)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n, len(v)))
    stats = np.array([stat(v[i]) for i in idx])
    return float(np.nanpercentile(stats, 2.5)), float(np.nanpercentile(stats, 97.5))


def recall_at_1pct(scores: Any, y: Any) -> float | None:
    """Recall at 1% FPR, or None (undefined) when there are fewer than MIN_NEGATIVES negatives."""
    from interp import recall_at_fpr

    yy = torch.as_tensor(np.asarray(y)).long()
    if int((yy == 0).sum()) < MIN_NEGATIVES:
        return None
    return recall_at_fpr(torch.as_tensor(np.asarray(scores, dtype=np.float64)), yy, 0.01)


def auroc_summary(scores: Any, y: Any) -> dict[str, Any]:
    """AUROC with its DeLong CI, recall at 1% FPR (None when undefined) and the class counts."""
    yy = np.asarray(y).astype(int)
    return {**delong(scores, yy), "recall_at_1pct_fpr": recall_at_1pct(scores, yy),
            "n_pos": int(yy.sum()), "n_neg": int((yy == 0).sum())}


def fmt_auc(d: dict[str, float]) -> str:
    return f"{d['auroc']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


# ----------------------------------------------------------------------------------------------- model passes


def hook_names() -> list[str]:
    from interp import resolve_hooks

    return resolve_hooks(model(), "resid_post")[0]


def answer_questions(questions: Sequence[dict[str, Any]], max_new_tokens: int = 16, batch_size: int = 32,
                     progress: bool = True, reverse: bool = False) -> dict[str, Any]:
    """Greedy answers to ``questions`` (rows with ``messages``) with, from the same forward passes, each
    generated token's log-probability and the residual stream (every layer) at the last prompt token and
    at each answer token. Each batch is cached under ``<out>/cache/answers`` (key: its prompts), so an
    interrupted run resumes and two processes can share the work (``reverse`` walks the batches backwards).

    Returns ``texts``, ``prompts``, ``token_ids`` ``[n, steps]``, ``lengths`` (generated tokens, end-of-turn
    included), ``logprobs`` ``[n, steps]``, ``acts`` ``[n, 1 + steps, layers, d_model]`` float16 (index 0:
    last prompt token; index j + 1: answer token j; the last generated token is never fed back, so it has
    none) and ``n_acts`` (answer tokens with an activation).
    """
    from tqdm.auto import tqdm

    prompts = [chat_prompt(q["messages"]) for q in questions]
    starts = list(range(0, len(prompts), batch_size))
    parts: dict[int, dict[str, Any]] = {}
    for b0 in tqdm(starts[::-1] if reverse else starts, desc="answer (batches)", disable=not progress):
        parts[b0] = _answer_batch(prompts[b0 : b0 + batch_size], max_new_tokens)
    parts_in_order = [parts[b0] for b0 in starts]
    out: dict[str, Any] = {k: torch.cat([p[k] for p in parts_in_order]) for k in parts_in_order[0] if k != "texts"}
    out["texts"] = [t for p in parts_in_order for t in p["texts"]]
    out["prompts"] = prompts
    return out


def _answer_batch(prompts: list[str], max_new_tokens: int) -> dict[str, Any]:
    """One batch of :func:`answer_questions`, cached."""
    from safetensors.torch import load_file, save_file

    from interp import generate

    path = cache_dir("answers") / f"{digest({'prompts': prompts, 'max_new': max_new_tokens, 'model': MODEL})}"
    if path.with_suffix(".json").exists():
        return {**load_file(str(path.with_suffix(".safetensors"))),
                "texts": json.loads(path.with_suffix(".json").read_text())["texts"]}
    m = model()
    hooks = hook_names()
    calls: list[list[Tensor]] = []

    def record(act: Tensor, hook) -> None:
        if hook.name == hooks[0]:
            calls.append([])
        calls[-1].append(act[:, -1].detach().to(torch.float16).cpu())

    with m.hooks(fwd_hooks=[(h, record) for h in hooks]):
        g = generate(m, prompts, max_new_tokens=max_new_tokens, return_logits=True, batch_size=len(prompts))
    B, S = g.token_ids.shape
    token_ids = torch.zeros(B, max_new_tokens, dtype=torch.long)
    token_ids[:, :S] = g.token_ids
    logprobs = torch.full((B, max_new_tokens), float("nan"))
    logprobs[:, :S] = torch.log_softmax(g.logits.float(), -1).gather(-1, g.token_ids[..., None])[..., 0]
    stacked = torch.stack([torch.stack(c, 1) for c in calls], 1)  # [B, forward calls, layers, d]
    acts = torch.zeros(B, 1 + max_new_tokens, *stacked.shape[2:], dtype=torch.float16)
    acts[:, : stacked.shape[1]] = stacked
    n_acts = torch.minimum(g.lengths, torch.full_like(g.lengths, stacked.shape[1] - 1))
    out = {"token_ids": token_ids, "logprobs": logprobs, "lengths": g.lengths, "acts": acts, "n_acts": n_acts}
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp))
    os.replace(tmp, path.with_suffix(".safetensors"))
    path.with_suffix(".json").write_text(json.dumps({"texts": g.texts, "prompts": prompts}))
    return {**out, "texts": g.texts}


def content_lengths(ans: dict[str, Any]) -> Int[Tensor, " n"]:
    """Answer tokens before the end-of-turn token (the answer's content)."""
    eos = model().tokenizer.eos_token_id
    ids, lengths = ans["token_ids"], ans["lengths"]
    ended = ids.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0] == eos
    return lengths - ended.long()


def capture_last(name: str, texts: Sequence[str], meta: Sequence[dict[str, Any]], progress: bool = True):
    """An activation store (every layer's residual stream at each text's last token) through ``interp.capture``,
    cached by content under ``<out>/cache/stores``."""
    from interp.capture import capture  # `from interp import capture` can return the submodule (see report)

    examples = [{"text": t, **m} for t, m in zip(texts, meta)]
    out = cache_dir("stores") / f"{name}-{digest(examples)}"
    return capture(model(), examples, hooks="resid_post", positions="last", out=out, batch_size=32,
                   dtype="float32", progress=progress)


# ----------------------------------------------------------------------------------------------- outputs


def save(name: str, result: dict[str, Any], figure=None) -> dict[str, str]:
    """Write ``<out>/<name>.json`` and the figure as ``<out>/<name>.html`` (+ ``.png`` when kaleido is there)."""
    d = out_dir()
    files = {"json": str(d / f"{name}.json")}
    if figure is not None:
        write_html(d / f"{name}.html", figure)
        files["html"] = str(d / f"{name}.html")
        try:
            import kaleido  # noqa: F401

            figure.write_image(str(d / f"{name}.png"))
            files["png"] = str(d / f"{name}.png")
        except Exception:  # kaleido missing or unable to start: HTML only
            pass
    result = {**result, "files": files}
    Path(files["json"]).write_text(json.dumps(result, indent=2, default=_plain))
    return files


def _plain(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (np.ndarray, Tensor)):
        return x.tolist()
    return str(x)


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 1)
