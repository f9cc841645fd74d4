"""Steering vectors from contrast prompts: diff-in-means or PCA of pooled activations at one hook."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from interp.capture import run_hooks
from interp.errors import ConfigError, SteeringError, close_matches
from interp.model import canonical_hook, model_device, model_identity, tokenize

OPS = ("add", "ablate", "clamp")
METHODS = ("diff_in_means", "pca")
_MLP_HIDDEN = re.compile(r"(^|\.)mlp\.(hook_pre|hook_post|in\.hook_out|out\.hook_in)$")





# ----------------------------------------------------------------------------------------------- steering vectors


def _pooled(model, prompts: Sequence[str], hook: str, positions: str, batch_size: int, progress: bool, desc: str):
    out = []
    with torch.inference_mode():
        for b0 in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
            toks = tokenize(model, prompts[b0 : b0 + batch_size]).to(model_device(model))
            acts = run_hooks(model, toks, [hook])[hook]
            for i, n in enumerate(toks.lengths):
                a = acts[i, :n].cpu()
                out.append(a[n - 1].float() if positions == "last" else a.float().mean(0))
    return torch.stack(out)


def steering_vector(
    model,
    positive_prompts: Sequence[str],
    negative_prompts: Sequence[str],
    hook: str,
    method: str = "diff_in_means",
    positions: str = "last",
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
):
    """A steering :class:`~interp.directions.Direction` computed live from contrast prompts.

    Each prompt is run through ``model`` in right-padded, masked batches; its activation at ``hook`` is
    taken at the last real token (``positions="last"``) or averaged over its real tokens (``"mean"``), as
    ``capture`` would store it. ``method="diff_in_means"``: mean(positive) - mean(negative), the same
    computation as :func:`interp.directions.diff_in_means` on a store of those activations.
    ``method="pca"``: the prompts are contrast pairs (``positive_prompts[i]`` with ``negative_prompts[i]``);
    the direction is the top principal axis of the pair differences (uncentred, i.e. the direction with the
    largest mean squared projection of the differences; :func:`interp.directions.pca_direction_tensor`),
    signed so that positives project higher. The result is a unit :class:`Direction` whose ``norm`` is the
    raw difference's length, ``stats`` the projections of the prompts (class means, pooled std: scales for
    alpha), and ``provenance`` the model, hook, method and prompt counts. ``seed`` fixes the random pair
    signs of the pca recipe (the uncentred axis does not depend on them).
    """
    from interp.directions import Direction, diff_in_means_tensor, pca_direction_tensor

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; {close_matches(method, METHODS)}")
    if positions not in ("last", "mean"):
        raise ConfigError(f"positions must be 'last' or 'mean' for a steering vector, got {positions!r}")
    pos, neg = list(positive_prompts), list(negative_prompts)
    if not pos or not neg:
        raise ConfigError("steering_vector needs at least one positive and one negative prompt")
    if method == "pca" and (len(pos) != len(neg) or len(pos) < 2):
        raise ConfigError(f"method='pca' takes at least 2 contrast pairs: got {len(pos)} positive and "
                          f"{len(neg)} negative prompts")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    hook = canonical_hook(model, hook)
    Xp = _pooled(model, pos, hook, positions, batch_size, progress, "positive")
    Xn = _pooled(model, neg, hook, positions, batch_size, progress, "negative")
    if not (torch.isfinite(Xp).all() and torch.isfinite(Xn).all()):
        raise SteeringError(f"the activations at {hook} have NaN or infinite values; check the model and dtype")
    X = torch.cat([Xp, Xn])
    y = torch.cat([torch.ones(len(pos), dtype=torch.long), torch.zeros(len(neg), dtype=torch.long)])
    if method == "diff_in_means":
        raw = diff_in_means_tensor(X, y)
        norm = float(raw.norm())
    else:
        raw = pca_direction_tensor(Xp - Xn, seed=seed)
        norm = float(((Xp - Xn) @ raw).mean())  # the mean pair separation along the axis
    if float(raw.norm()) == 0.0:
        raise SteeringError(f"the positive and negative prompts have identical activations at {hook}; "
                            "use prompts that differ in the concept")
    unit = raw / raw.norm()
    proj = (X @ unit).double()
    pp, pn = proj[y == 1], proj[y == 0]
    pooled = float(torch.sqrt(0.5 * (pp.var(unbiased=False) + pn.var(unbiased=False))))
    stats = {
        "mean_pos": float(pp.mean()), "mean_neg": float(pn.mean()),
        "std_pos": float(pp.std(unbiased=False)), "std_neg": float(pn.std(unbiased=False)),
        "pooled_std": pooled, "threshold": float(0.5 * (pp.mean() + pn.mean())),
        "separation": float((pp.mean() - pn.mean()) / max(pooled, 1e-12)),
        "act_norm_mean": float(X.norm(dim=1).mean()),
    }
    provenance = {
        "from": "steering_vector", "model": model_identity(model), "hook": hook, "method": method,
        "positions": positions, "n_positive": len(pos), "n_negative": len(neg),
    }
    return Direction(vector=raw, hook=hook, method=method, label=None, norm=norm, stats=stats,
                     provenance=provenance)


