"""Steering: push a model along a direction, or remove it, while it runs, and measure what changed.

Three operations act on the activation ``x`` at a hook, at the chosen token positions only:

==========  ==========================================  =================================================
op          what happens to ``x``                       ``alpha``
==========  ==========================================  =================================================
``add``     ``x + alpha * v``                           the scale (``v`` as given: unit for a Direction)
``ablate``  ``x - (x . u) u``                           not used
``clamp``   ``x + (alpha - x . u) u``                   the value the component along ``u`` is set to
==========  ==========================================  =================================================

``v`` is the direction's vector and ``u = v / |v|``. A :class:`~interp.directions.Direction` holds a unit
vector, so ``add`` moves its component by exactly ``alpha``; a raw tensor is used as given.

Positions
---------
A position is a token's index in its own row's sequence, padding excluded: ``0`` is the first prompt token
(BOS included when the model prepends one), ``L - 1`` the last of the row's ``L`` prompt tokens, ``L + k``
the ``k``-th generated token. The residual at position ``p`` is what the model reads token ``p`` into and
what its next-token prediction is made from, so **the output at ``L - 1`` is the first generated token**.

==================  ==================================================================================
``positions``       steered positions
==================  ==================================================================================
``"all"``           every real token (padding is never steered)
``"prompt"``        ``0 .. L-1``: every prompt token, the whole prefill
``"generated"``     ``L-1, L, L+1, ...``: every position whose output is a generated token, i.e. the last
                    prompt token (it produces the first generated token) and every generated token fed
                    back in. Prompt positions ``0 .. L-2`` are untouched.
``[i, j, ...]``     those positions; negative indices count back from the end of the prompt (``-1`` is
                    ``L - 1``)
==================  ==================================================================================

How ``L`` is known: a forward without a KV cache starts a sequence and its real tokens are the prompt, so a
plain forward or ``run_with_cache`` of a prompt steers under ``"generated"`` exactly the position that
would produce the first generated token. A forward that continues a KV cache (every decoding step of
``model.generate`` or :func:`generate`) continues that sequence; so does a forward without a cache whose
tokens extend the previous forward's by exactly one token (what ``model.generate(use_past_kv_cache=False)``
does each step). Padding is read from the attention mask the model is given (pass ``attention_mask`` with a
padded batch), so left- and right-padded batches are steered at the same real positions.

Use :func:`steer` around any model call (``model(...)``, ``run_with_cache``, ``model.generate``); contexts
nest, and inner interventions run after outer ones on the same hook. :func:`generate` runs its own batched,
seeded, KV-cached loop and reports which positions were steered and, optionally, the projection on a
direction at every generated token. :func:`sweep` generates over a range of alphas and scores the outputs.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.artifacts import save_tensors
from interp.capture import run_hooks
from interp.errors import ConfigError, SteeringError, close_matches
from interp.model import canonical_hook, is_encoder, model_device, model_identity, tokenize
from interp.store import atomic_write_bytes, atomic_write_json

OPS = ("add", "ablate", "clamp")
NAMED_POSITIONS = ("all", "prompt", "generated")
METHODS = ("diff_in_means", "pca")
_MLP_HIDDEN = re.compile(r"(^|\.)mlp\.(hook_pre|hook_post|in\.hook_out|out\.hook_in)$")

Positions = Union[str, Sequence[int]]


# ----------------------------------------------------------------------------------------------- interventions


def _as_vector(direction: Any) -> Tensor:
    vec = getattr(direction, "vector", direction)
    if not isinstance(vec, Tensor):
        try:
            vec = torch.as_tensor(vec)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(
                f"cannot steer along a {type(direction).__name__}; give an interp Direction or a 1-D tensor"
            ) from None
    if vec.ndim == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.ndim != 1:
        raise ConfigError(f"a steering direction must be one vector [d_model], got shape {tuple(vec.shape)}")
    if vec.numel() == 0 or not bool(torch.isfinite(vec).all()):
        raise SteeringError("the steering direction has NaN or infinite entries (or is empty); recompute it")
    return vec.detach().to("cpu", torch.float32)


def _check_positions(positions: Any) -> str | tuple[int, ...]:
    if isinstance(positions, str):
        if positions not in NAMED_POSITIONS:
            raise ConfigError(f"unknown positions {positions!r}; {close_matches(positions, NAMED_POSITIONS)} "
                              "(or a list of token indices)")
        return positions
    if isinstance(positions, Tensor):
        positions = positions.flatten().tolist()
    try:
        idx = tuple(positions)
    except TypeError:
        raise ConfigError(
            f"positions must be 'all', 'prompt', 'generated' or a list of ints, got {positions!r}"
        ) from None
    if not idx or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise ConfigError(
            f"positions must be 'all', 'prompt', 'generated' or a non-empty list of ints, got {positions!r}"
        )
    return idx


@dataclass(frozen=True, eq=False)
class Intervention:
    """One operation on one direction at one or more hooks, at some token positions.

    ``direction``: a :class:`~interp.directions.Direction` (its ``hook`` is used unless ``hook`` is given)
    or a 1-D tensor with ``hook``. ``hook``: a hook name or a list of them (aliases such as
    ``blocks.3.hook_resid_post`` accepted). ``op``: ``add`` | ``ablate`` | ``clamp``. ``alpha``: the scale
    for ``add``, the value for ``clamp`` (``value=`` is a synonym), unused for ``ablate``.
    """

    direction: Any
    op: str = "add"
    alpha: float | None = None
    positions: Positions = "all"
    hook: str | Sequence[str] | None = None
    value: float | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigError(f"unknown steering op {self.op!r}; {close_matches(str(self.op), OPS)}")
        alpha = self.alpha
        if self.value is not None:
            if self.op != "clamp":
                raise ConfigError(f"value= is the clamp value; for op={self.op!r} use alpha=")
            if alpha is not None and float(alpha) != float(self.value):
                raise ConfigError("give the clamp value once, as value= or alpha=, not both")
            alpha = self.value
        if self.op == "ablate":
            if alpha is not None:
                raise ConfigError("ablate removes the component along the direction and takes no alpha; drop alpha=")
        else:
            if alpha is None:
                raise ConfigError(f"op={self.op!r} needs alpha= (the {'scale' if self.op == 'add' else 'value'})")
            try:
                alpha = float(alpha)
            except (TypeError, ValueError):
                raise ConfigError(f"alpha must be a number, got {alpha!r}") from None
            if not math.isfinite(alpha):
                raise SteeringError(f"alpha is {alpha}; give a finite number")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "value", None)
        object.__setattr__(self, "positions", _check_positions(self.positions))
        vec = _as_vector(self.direction)
        if self.op in ("ablate", "clamp") and float(vec.norm()) == 0.0:
            raise SteeringError(f"{self.op} needs a non-zero direction; this one is all zeros")
        object.__setattr__(self, "_vector", vec)

    @property
    def vector(self) -> Float[Tensor, " d"]:
        return self._vector  # type: ignore[attr-defined]

    def hooks_for(self, model) -> list[str]:
        """The canonical hook names this intervention acts on in ``model``."""
        hooks = self.hook if self.hook is not None else getattr(self.direction, "hook", None)
        if hooks is None:
            raise SteeringError(
                "a raw tensor direction needs hook=...; say where to steer, e.g. hook='blocks.3.hook_out'"
            )
        names = [hooks] if isinstance(hooks, str) else list(hooks)
        if not names:
            raise SteeringError("hook=[] names no hook; give at least one hook name")
        return list(dict.fromkeys(canonical_hook(model, h) for h in names))

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (what a saved result records about the steering)."""
        hooks = self.hook if self.hook is not None else getattr(self.direction, "hook", None)
        return {
            "op": self.op,
            "alpha": self.alpha,
            "positions": self.positions if isinstance(self.positions, str) else list(self.positions),
            "hook": hooks if isinstance(hooks, (str, type(None))) else list(hooks),
            "direction_norm": float(self.vector.norm()),
            "direction_is_unit": not isinstance(self.direction, Tensor),
        }


def _check_width(model, iv: Intervention, hooks: Sequence[str]) -> None:
    d = iv.vector.numel()
    d_model = int(model.cfg.d_model)
    d_mlp = int(getattr(model.cfg, "d_mlp", 0) or 0)
    for h in hooks:
        width = d_mlp if (_MLP_HIDDEN.search(h) and d_mlp) else d_model
        if d != width:
            raise SteeringError(
                f"the direction has {d} dimensions but {h} has width {width}; use a direction computed "
                "on this model at this hook"
            )


# ----------------------------------------------------------------------------------------------- position tracking


def _cache_len(past: Any) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:  # legacy tuple of (key, value) per layer
        return int(past[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


class _Tracker:
    """Watches every forward of the wrapped HF model to know, per call, each token's position in its row's
    sequence and each row's prompt length. One per model, shared by all open steering contexts."""

    def __init__(self, model) -> None:
        self.users = 0
        self.active = False
        self.pos: Tensor | None = None  # [B, T] positions of this call's tokens, -1 for padding
        self.padded = False
        self.prompt_len: Tensor | None = None  # [B]
        self.sequence = 0  # bumped whenever a new sequence (prompt) starts
        self._ids: Tensor | None = None  # the running sequence's ids, for continuation without a cache
        self._mask: Tensor | None = None
        self._masks: dict[Any, Tensor | None] = {}
        hf = model.original_model
        self._handles = [
            hf.register_forward_pre_hook(self._pre, with_kwargs=True),
            hf.register_forward_hook(self._post, with_kwargs=True, always_call=True),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _extends(self, ids: Tensor | None, full: Tensor | None) -> bool:
        prev = self._ids
        if ids is None or prev is None or self.prompt_len is None:
            return False
        if ids.shape[0] != prev.shape[0] or ids.shape[1] != prev.shape[1] + 1:
            return False
        if not torch.equal(ids[:, :-1], prev):
            return False
        pm = self._mask
        if pm is None and full is None:
            return True
        a = pm if pm is not None else torch.ones_like(prev)
        b = full[:, :-1] if full is not None else torch.ones_like(prev)
        return torch.equal(a.to(b.device, b.dtype), b)

    def _pre(self, module, args, kwargs) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        emb = kwargs.get("inputs_embeds")
        ref = ids if isinstance(ids, Tensor) else emb
        if not isinstance(ref, Tensor) or ref.ndim < 2:
            self.active = False
            return
        ids = ids if isinstance(ids, Tensor) else None
        B, T = int(ref.shape[0]), int(ref.shape[1])
        cached = _cache_len(kwargs.get("past_key_values"))
        am = kwargs.get("attention_mask")
        full = None
        if isinstance(am, Tensor) and am.ndim == 2 and am.shape[0] == B and am.shape[1] >= T:
            full = am.to(torch.long)
            if cached and full.shape[1] < cached + T:  # a mask over the new tokens only
                full = torch.cat([full.new_ones(B, cached + T - full.shape[1]), full], 1)
        if full is None:
            pos = torch.arange(cached, cached + T, device=ref.device).expand(B, T)
            self.padded = False
            real_cached = torch.full((B,), cached, device=ref.device)
            real_now = torch.full((B,), cached + T, device=ref.device)
        else:
            new = full[:, -T:] > 0
            pos = (full.cumsum(1) - 1)[:, -T:].masked_fill(~new, -1)
            self.padded = not bool(new.all())
            real_cached = full[:, : full.shape[1] - T].sum(1)
            real_now = full.sum(1)
        if cached == 0:
            if not self._extends(ids, full):
                self.prompt_len = real_now
                self.sequence += 1
            self._ids, self._mask = ids, full
        else:
            if self.prompt_len is None or self.prompt_len.shape[0] != B:
                self.prompt_len = real_cached  # a cache we did not see filled: everything in it is prompt
                self.sequence += 1
            if self._ids is not None and ids is not None and self._ids.shape[0] == B:
                self._ids = torch.cat([self._ids, ids], 1)
                self._mask = None if full is None else full
            else:
                self._ids, self._mask = None, None
        self.prompt_len = self.prompt_len.to(pos.device)
        self.pos = pos
        self._masks = {}
        self.active = True

    def _post(self, module, args, kwargs, output) -> None:
        self.active = False

    def mask(self, positions: str | tuple[int, ...]) -> Tensor | None:
        """Bool ``[B, T]`` of the tokens of this call to steer, or None for every token."""
        if positions in self._masks:
            return self._masks[positions]
        pos, L = self.pos, self.prompt_len
        assert pos is not None and L is not None
        if positions == "all":
            m = (pos >= 0) if self.padded else None
        elif positions == "prompt":
            m = (pos >= 0) & (pos < L[:, None])
        elif positions == "generated":
            m = (pos >= 0) & (pos >= (L - 1)[:, None])
        else:
            idx = torch.tensor(positions, device=pos.device)
            target = torch.where(idx < 0, L[:, None] + idx, idx)  # [B, K]
            m = (pos[:, :, None] == target[:, None, :]).any(-1) & (pos >= 0)
        self._masks[positions] = m
        return m


_trackers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def _tracking(model) -> Iterator[_Tracker]:
    tracker = _trackers.get(model)
    if tracker is None:
        tracker = _Tracker(model)
        _trackers[model] = tracker
    tracker.users += 1
    try:
        yield tracker
    finally:
        tracker.users -= 1
        if tracker.users == 0:
            tracker.remove()
            _trackers.pop(model, None)


# ----------------------------------------------------------------------------------------------- steer


class SteeringHandle:
    """What a :func:`steer` context yields: its interventions and the positions they acted on."""

    def __init__(self, interventions: Sequence[Intervention], tracker: _Tracker) -> None:
        self.interventions = list(interventions)
        self._tracker = tracker
        self._records: list[list[Tensor]] = [[] for _ in self.interventions]
        self._sequence = [-1] * len(self.interventions)
        self.calls = 0

    def _record(self, i: int, pos: Tensor) -> None:
        seq = self._tracker.sequence
        if self._sequence[i] != seq:
            self._sequence[i] = seq
            self._records[i] = []
        self._records[i].append(pos)

    def steered(self, i: int = 0) -> Bool[Tensor, "batch position"]:
        """Positions intervention ``i`` acted on (at any of its hooks) in the current sequence (since the last
        forward that started one): ``[batch, position]`` with positions as in the module docstring."""
        recs = self._records[i]
        if not recs:
            return torch.zeros(0, 0, dtype=torch.bool)
        B = recs[0].shape[0]
        width = max(int(r.max()) for r in recs) + 1
        out = torch.zeros(B, max(width, 0), dtype=torch.bool)
        for r in recs:
            r = r.cpu()
            if r.shape[0] != B:
                continue
            b, t = torch.nonzero(r >= 0, as_tuple=True)
            out[b, r[b, t]] = True
        return out


def _make_hook(iv: Intervention, idx: int, handle: SteeringHandle, tracker: _Tracker) -> Callable:
    op, alpha, positions = iv.op, iv.alpha, iv.positions
    base = iv.vector
    unit = base / base.norm() if op != "add" else None
    cache: dict[tuple[Any, Any], tuple[Tensor, Tensor | None]] = {}

    def vectors(device, dtype) -> tuple[Tensor, Tensor | None]:
        key = (device, dtype)
        if key not in cache:
            if op == "add":
                cache[key] = ((alpha * base).to(device, dtype), None)  # type: ignore[operator]
            else:
                assert unit is not None
                cache[key] = (unit.to(device, torch.float32), unit.to(device, dtype))
        return cache[key]

    def hook_fn(act: Tensor, hook) -> Tensor:
        if act.shape[-1] != base.numel():
            raise SteeringError(
                f"{hook.name} has width {act.shape[-1]} but the direction has {base.numel()} dimensions; "
                "use a direction computed at this hook"
            )
        pos = tracker.pos
        if tracker.active and pos is not None and act.ndim >= 2 and tuple(act.shape[:2]) == tuple(pos.shape):
            m = tracker.mask(positions)
            handle._record(idx, pos if m is None else pos.masked_fill(~m, -1))
        elif positions == "all":
            m = None
        else:
            raise SteeringError(
                f"positions={positions!r} needs a forward of the whole model (model(...), run_with_cache, generate); "
                f"{hook.name} ran outside one"
            )
        if m is not None and act.ndim > 3:
            m = m.view(*m.shape, *([1] * (act.ndim - 3)))
        mm = None if m is None else m[..., None]
        if op == "add":
            delta, _ = vectors(act.device, act.dtype)
            new = act + delta
        else:
            u32, _ = vectors(act.device, act.dtype)
            x = act.float()
            coef = x @ u32
            target = -coef if op == "ablate" else float(alpha) - coef  # type: ignore[arg-type]
            new = (x + target[..., None] * u32).to(act.dtype)
        handle.calls += 1
        return new if mm is None else torch.where(mm, new, act)

    return hook_fn


def _interventions(direction, alpha, op, positions, hook, value) -> list[Intervention]:
    if isinstance(direction, Intervention):
        direction = [direction]
    if isinstance(direction, (list, tuple)) and direction and all(isinstance(d, Intervention) for d in direction):
        if alpha is not None or op != "add" or positions != "all" or hook is not None or value is not None:
            raise ConfigError("give either Intervention objects or direction + alpha/op/positions/hook, not both")
        return list(direction)
    return [Intervention(direction, op=op, alpha=alpha, positions=positions, hook=hook, value=value)]


@contextmanager
def steer(
    model,
    direction: Any,
    alpha: float | None = None,
    op: str = "add",
    positions: Positions = "all",
    hook: str | Sequence[str] | None = None,
    value: float | None = None,
) -> Iterator[SteeringHandle]:
    """Steer every forward of ``model`` inside the ``with`` block.

    ``direction``: a Direction, a 1-D tensor (with ``hook=``), an :class:`Intervention` or a list of them.
    ``op``/``alpha``/``positions``: see the module docstring (``value=`` is the clamp value). Works for
    ``model(...)``, ``model.run_with_cache``, ``model.generate`` and :func:`generate`; contexts nest, inner
    interventions applied after outer ones at the same hook. Every hook is removed on exit, also when the
    block raises. Yields a :class:`SteeringHandle`.
    """
    ivs = _interventions(direction, alpha, op, positions, hook, value)
    bound = []
    for iv in ivs:
        hooks = iv.hooks_for(model)
        _check_width(model, iv, hooks)
        bound.append((iv, hooks))
    with ExitStack() as stack:
        tracker = stack.enter_context(_tracking(model))
        handle = SteeringHandle(ivs, tracker)
        fwd = [(h, _make_hook(iv, i, handle, tracker)) for i, (iv, hooks) in enumerate(bound) for h in hooks]
        stack.enter_context(model.hooks(fwd_hooks=fwd))
        yield handle


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


# ----------------------------------------------------------------------------------------------- generation


@dataclass
class GenerationResult:
    """What :func:`generate` returns.

    ``texts[i]``: the continuation of ``prompts[i]`` (without a final EOS). ``token_ids``: ``[batch, steps]``
    generated ids, padded with the pad id after each row's end; ``lengths[i]`` real generated tokens (a final
    EOS included). ``prompt_ids[i]``: the prompt's tokens as the model saw them. ``steered[j]``: ``[batch,
    position]`` bool, True where intervention ``j`` acted (positions as in the module docstring; generated
    token ``k`` of row ``i`` is position ``prompt_lengths[i] + k``). ``projections``: ``[batch, steps]``, the
    projection on ``project`` at its hook, after steering, at the position that produced each generated token
    (NaN past a row's end). ``logits``: ``[batch, steps, vocab]`` the (steered) logits each token was drawn from.
    """

    prompts: list[str]
    texts: list[str]
    token_ids: Int[Tensor, "batch steps"]
    lengths: Int[Tensor, " batch"]
    prompt_ids: list[Int[Tensor, " pos"]]
    steered: list[Bool[Tensor, "batch position"]]
    projections: Float[Tensor, "batch steps"] | None = None
    logits: Float[Tensor, "batch steps vocab"] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_lengths(self) -> Int[Tensor, " batch"]:
        return torch.tensor([len(p) for p in self.prompt_ids], dtype=torch.long)

    @property
    def full_texts(self) -> list[str]:
        return [p + t for p, t in zip(self.prompts, self.texts)]

    def generated(self, i: int) -> Int[Tensor, " n"]:
        """Row ``i``'s generated ids, real tokens only (a final EOS included)."""
        return self.token_ids[i, : int(self.lengths[i])]

    def sequences(self) -> list[Int[Tensor, " n"]]:
        """Prompt + generated ids per row, exactly what the model read."""
        return [torch.cat([p, self.generated(i)]) for i, p in enumerate(self.prompt_ids)]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"prompt": self.prompts, "text": self.texts, "n_tokens": self.lengths.tolist()})

    def save(self, path: str | os.PathLike) -> Path:
        """``generation.json`` (texts, config, provenance) + ``generation.safetensors`` (ids, masks, projections)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"token_ids": self.token_ids, "lengths": self.lengths}
        for i, p in enumerate(self.prompt_ids):
            tensors[f"prompt_ids.{i}"] = p
        for j, s in enumerate(self.steered):
            tensors[f"steered.{j}"] = s.to(torch.uint8)
        if self.projections is not None:
            tensors["projections"] = self.projections.float()
        if self.logits is not None:
            tensors["logits"] = self.logits.float()
        save_tensors(path / "generation.safetensors", tensors)
        atomic_write_json(path / "generation.json", {
            "format": "interp.generation", "version": 1, "prompts": self.prompts, "texts": self.texts,
            "n_steered": len(self.steered), "config": self.config,
        })
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GenerationResult:
        from safetensors.torch import load_file

        path = Path(path)
        try:
            meta = json.loads((path / "generation.json").read_text())
            t = load_file(path / "generation.safetensors")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} is not a saved generation ({e}); save one with GenerationResult.save") from None
        return cls(
            prompts=meta["prompts"], texts=meta["texts"], token_ids=t["token_ids"], lengths=t["lengths"],
            prompt_ids=[t[f"prompt_ids.{i}"] for i in range(len(meta["prompts"]))],
            steered=[t[f"steered.{j}"].bool() for j in range(meta["n_steered"])],
            projections=t.get("projections"), logits=t.get("logits"), config=meta["config"],
        )


def _left_pad(model, prompts: Sequence[str]) -> tuple[Tensor, Tensor, list[Tensor]]:
    toks = tokenize(model, prompts)
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else int(pad)
    B, T = toks.input_ids.shape
    ids = torch.full((B, T), pad, dtype=toks.input_ids.dtype)
    mask = torch.zeros(B, T, dtype=torch.long)
    rows = []
    for i, n in enumerate(toks.lengths):
        ids[i, T - n :] = toks.input_ids[i, :n]
        mask[i, T - n :] = 1
        rows.append(toks.input_ids[i, :n].clone())
    return ids, mask, rows


def _sample(logits: Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _projection_target(project: Any, steering: Sequence[Intervention], model) -> tuple[str, Tensor] | None:
    if project is None or project is False:
        return None
    if project is True:
        if not steering:
            raise ConfigError("project=True projects on the first steering direction, but no steering was given")
        iv = steering[0]
        hook = iv.hooks_for(model)[0]
        vec = iv.vector
    else:
        vec = _as_vector(project)
        hook = getattr(project, "hook", None)
        if hook is None:
            raise SteeringError("project= needs a Direction (with its hook); a raw tensor has no hook")
        hook = canonical_hook(model, hook)
        if vec.numel() != int(model.cfg.d_model):
            raise SteeringError(
                f"the projection direction has {vec.numel()} dimensions, the model's d_model is {model.cfg.d_model}"
            )
    return hook, vec / vec.norm()


def generate(
    model,
    prompts: str | Sequence[str],
    steering: Sequence[Intervention] | Intervention = (),
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    top_k: int | None = None,
    stop_at_eos: bool = True,
    project: Any = None,
    return_logits: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> GenerationResult:
    """Generate continuations of ``prompts`` with ``steering`` applied, batched and KV-cached.

    Prompts are left-padded with an attention mask (each row sees exactly its own tokens). ``temperature=0``
    is greedy; otherwise tokens are sampled from ``softmax(logits / temperature)`` (``top_k`` to truncate)
    with a ``torch.Generator`` seeded by ``seed``: the same prompts, batch size and seed give the same
    tokens. ``project``: a Direction (or ``True`` for the first steering direction) whose projection at its
    hook, after steering, is recorded at every position that produced a generated token.
    """
    if is_encoder(model):
        raise SteeringError("this model is an encoder (no next-token head); generate with a decoder such as GPT-2")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ConfigError("generate needs at least one prompt")
    if isinstance(steering, Intervention):
        steering = [steering]
    steering = list(steering)
    for s in steering:
        if not isinstance(s, Intervention):
            raise ConfigError(f"steering= takes Intervention objects, got {type(s).__name__}; "
                              "build one with Intervention(direction, op='add', alpha=4)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not math.isfinite(float(temperature)) or temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    target = _projection_target(project, steering, model)
    device = model_device(model)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    parts = []
    for b0 in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        parts.append(_generate_batch(model, prompts[b0 : b0 + batch_size], steering, max_new_tokens,
                                     float(temperature), top_k, stop_at_eos, target, return_logits, gen, device))
    steps = max(p["token_ids"].shape[1] for p in parts)
    pad = model.tokenizer.pad_token_id or 0

    def cat(key: str, fill: float) -> Tensor:
        ts = [p[key] for p in parts]
        return torch.cat([torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, steps - t.shape[1]), value=fill)
                          for t in ts])

    width = max((s.shape[1] for p in parts for s in p["steered"]), default=0)
    steered = [
        torch.cat([torch.nn.functional.pad(p["steered"][j], (0, width - p["steered"][j].shape[1])) for p in parts])
        for j in range(len(steering))
    ]
    config = {
        "model": model_identity(model), "max_new_tokens": max_new_tokens, "temperature": float(temperature),
        "top_k": top_k, "seed": int(seed), "batch_size": batch_size, "stop_at_eos": stop_at_eos,
        "steering": [s.describe() for s in steering],
        "project_hook": None if target is None else target[0],
    }
    return GenerationResult(
        prompts=prompts,
        texts=[t for p in parts for t in p["texts"]],
        token_ids=cat("token_ids", pad),
        lengths=torch.cat([p["lengths"] for p in parts]),
        prompt_ids=[r for p in parts for r in p["prompt_ids"]],
        steered=steered,
        projections=cat("projections", float("nan")) if target is not None else None,
        logits=cat("logits", float("nan")) if return_logits else None,
        config=config,
    )


def _generate_batch(model, prompts, steering, max_new_tokens, temperature, top_k, stop_at_eos, target,
                    return_logits, gen, device) -> dict[str, Any]:
    ids, mask, rows = _left_pad(model, prompts)
    ids, mask = ids.to(device), mask.to(device)
    B, T = ids.shape
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    if n_ctx and T + max_new_tokens - 1 > n_ctx:
        raise ConfigError(f"the longest prompt has {T} tokens; with max_new_tokens={max_new_tokens} that passes "
                          f"the model's context of {n_ctx}; shorten the prompt or generate fewer tokens")
    eos = model.tokenizer.eos_token_id
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    out_tokens, out_proj, out_logits = [], [], []
    step_proj: list[Tensor] = []

    def observe(act: Tensor, hook) -> None:
        step_proj.append(act[:, -1].float() @ unit)

    with ExitStack() as stack, torch.inference_mode():
        handle = stack.enter_context(steer(model, steering)) if steering else None
        if target is not None:
            unit = target[1].to(device)
            stack.enter_context(model.hooks(fwd_hooks=[(target[0], observe)]))
        logits, past = model(ids, attention_mask=mask, return_type="logits_and_cache", use_cache=True)
        for step in range(max_new_tokens):
            last = logits[:, -1]
            tok = _sample(last, temperature, top_k, gen)
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            out_tokens.append(tok)
            if return_logits:
                out_logits.append(last.float().masked_fill(finished[:, None], float("nan")))
            if target is not None:
                out_proj.append(step_proj[-1].masked_fill(finished, float("nan")))
            lengths += (~finished).long()
            if stop_at_eos and eos is not None:
                finished |= tok == eos
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            logits, past = model(tok[:, None], attention_mask=mask, past_key_values=past,
                                 return_type="logits_and_cache")
        steered = [handle.steered(j) for j in range(len(steering))] if handle is not None else []
    token_ids = torch.stack(out_tokens, 1).cpu()
    lengths = lengths.cpu()
    prompt_len = torch.tensor([len(r) for r in rows])
    # positions past a row's end produced nothing that was kept
    for j, s in enumerate(steered):
        limit = (prompt_len + lengths - 1)[:, None]
        steered[j] = s & (torch.arange(s.shape[1])[None, :] < limit)
    texts = []
    for i in range(B):
        g = token_ids[i, : int(lengths[i])].tolist()
        if stop_at_eos and g and eos is not None and g[-1] == eos:
            g = g[:-1]
        texts.append(model.tokenizer.decode(g))
    return {
        "texts": texts, "token_ids": token_ids, "lengths": lengths, "prompt_ids": rows, "steered": steered,
        "projections": torch.stack(out_proj, 1).cpu() if target is not None else None,
        "logits": torch.stack(out_logits, 1).cpu() if return_logits else None,
    }


# ----------------------------------------------------------------------------------------------- sweeps and metrics


class Metric:
    """A built-in sweep metric: ``evaluate(model, generation) -> one float per prompt``.

    ``steered`` metrics read what the steered model computed while generating (recorded during
    :func:`generate`); the others score the generated text with the unsteered model.
    """

    name = "metric"
    needs_logits = False
    project: Any = None

    def evaluate(self, model, gen: GenerationResult) -> list[float]:
        raise NotImplementedError


def _token_id(model, t: int | str) -> int:
    if isinstance(t, int) and not isinstance(t, bool):
        if not 0 <= t < int(model.cfg.d_vocab):
            raise ConfigError(f"token id {t} is outside the vocabulary (0..{model.cfg.d_vocab - 1})")
        return t
    ids = model.tokenizer.encode(str(t), add_special_tokens=False)
    if len(ids) != 1:
        pieces = model.tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(f"{t!r} is {len(ids)} tokens {pieces} for this tokenizer; give single-token strings or ids")
    return int(ids[0])


class logit_diff(Metric):  # noqa: N801 - used like a function: logit_diff([" love"], [" hate"])
    """Mean logit of ``pos_tokens`` minus mean logit of ``neg_tokens`` in the steered model's next-token
    logits, averaged over the positions that produced generated tokens (``at="generated"``) or taken at
    the first one only (``at="first"``). Tokens: single-token strings or ids."""

    needs_logits = True

    def __init__(self, pos_tokens: Sequence[int | str], neg_tokens: Sequence[int | str], at: str = "generated"):
        if at not in ("generated", "first"):
            raise ConfigError(f"at must be 'generated' or 'first', got {at!r}")
        if isinstance(pos_tokens, (str, int)):
            pos_tokens = [pos_tokens]
        if isinstance(neg_tokens, (str, int)):
            neg_tokens = [neg_tokens]
        if not pos_tokens or not neg_tokens:
            raise ConfigError("logit_diff needs at least one token in each set")
        self.pos_tokens, self.neg_tokens, self.at = list(pos_tokens), list(neg_tokens), at
        self.name = "logit_diff"

    def evaluate(self, model, gen: GenerationResult) -> list[float]:
        assert gen.logits is not None
        p = [_token_id(model, t) for t in self.pos_tokens]
        n = [_token_id(model, t) for t in self.neg_tokens]
        diff = gen.logits[..., p].mean(-1) - gen.logits[..., n].mean(-1)  # [B, steps], NaN past the end
        if self.at == "first":
            return diff[:, 0].tolist()
        return torch.nanmean(diff, 1).tolist()


class projection(Metric):  # noqa: N801
    """Mean projection on ``direction`` (unit) at its hook, after steering, over the positions that produced
    the generated tokens: how far along the direction the steered model actually was while writing."""

    def __init__(self, direction: Any):
        if getattr(direction, "hook", None) is None:
            raise ConfigError("projection() needs a Direction with a hook")
        self.project = direction
        self.name = "projection"

    def evaluate(self, model, gen: GenerationResult) -> list[float]:
        assert gen.projections is not None
        return torch.nanmean(gen.projections, 1).tolist()


class probe_score(Metric):  # noqa: N801
    """The score of the generated text under a probe, on the unsteered model.

    ``scorer``: a probe with ``decision_function`` (e.g. :class:`~interp.probes.linear.LinearProbe`) or a
    Direction, read at ``hook`` (default: the Direction's or the probe's hook) over the generated tokens,
    with the prompt as context. ``pool``: ``"tokens"`` (mean of per-token scores), ``"mean"`` (score of the
    mean activation, for probes trained with ``positions="mean"``) or ``"last"``. Or any callable / object
    with ``score_texts(texts)`` / ``score(texts)`` / ``score(model, texts)`` (a Detector: its ``aggregate`` is
    used) returning one score per continuation text.
    """

    def __init__(self, scorer: Any, hook: str | None = None, pool: str = "tokens", batch_size: int = 16):
        if pool not in ("tokens", "mean", "last"):
            raise ConfigError(f"pool must be 'tokens', 'mean' or 'last', got {pool!r}")
        self.scorer, self.hook, self.pool, self.batch_size = scorer, hook, pool, batch_size
        self.name = "probe_score"

    def _text_scores(self, model, texts: list[str]) -> list[float] | None:
        """Scores from a text scorer (Detector-like ``score(model, texts)``, ``score(texts)``, a callable), or
        None when the scorer reads activations (a probe or a Direction)."""
        import inspect

        s = self.scorer
        if hasattr(s, "decision_function") or hasattr(s, "vector"):
            return None
        fn = next((getattr(s, a) for a in ("score_texts", "score") if callable(getattr(s, a, None))), None)
        if fn is None:
            if not callable(s):
                raise ConfigError(f"cannot score texts with a {type(s).__name__}; give a probe, a Direction, "
                                  "a detector or a callable texts -> scores")
            fn = s
        try:
            takes_model = "model" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes_model = False
        out = fn(model, texts) if takes_model else fn(texts)
        out = getattr(out, "aggregate", out)
        return [float(x) for x in _to_list(out)]

    def evaluate(self, model, gen: GenerationResult) -> list[float]:
        text_scores = self._text_scores(model, gen.texts)
        if text_scores is not None:
            return text_scores
        hook = self.hook or getattr(self.scorer, "hook", None)
        if hook is None:
            raise ConfigError("probe_score needs hook= for a probe that does not record its hook")
        hook = canonical_hook(model, hook)
        seqs, L = gen.sequences(), gen.prompt_lengths
        scores: list[float] = []
        device = model_device(model)
        with torch.inference_mode():
            for b0 in range(0, len(seqs), self.batch_size):
                chunk = seqs[b0 : b0 + self.batch_size]
                T = max(len(s) for s in chunk)
                ids = torch.zeros(len(chunk), T, dtype=torch.long)
                mask = torch.zeros(len(chunk), T, dtype=torch.long)
                for i, s in enumerate(chunk):
                    ids[i, : len(s)], mask[i, : len(s)] = s, 1
                acts: dict[str, Tensor] = {}

                def save(a: Tensor, hook) -> None:
                    acts["x"] = a.detach()

                with model.hooks(fwd_hooks=[(hook, save)]):
                    model(ids.to(device), attention_mask=mask.to(device), return_type=None)
                for i, s in enumerate(chunk):
                    lo, hi = int(L[b0 + i]), len(s)
                    x = acts["x"][i, lo:hi].float().cpu()
                    if x.shape[0] == 0:
                        scores.append(float("nan"))
                        continue
                    if self.pool == "mean":
                        x = x.mean(0, keepdim=True)
                    elif self.pool == "last":
                        x = x[-1:]
                    scores.append(float(self._score_acts(x).mean()))
        return scores

    def _score_acts(self, x: Tensor) -> Tensor:
        s = self.scorer
        if hasattr(s, "decision_function"):
            return torch.as_tensor(_to_array(s.decision_function(x))).float().flatten()
        v = _as_vector(s)
        return x @ (v / v.norm())


def _to_array(x: Any):
    return x.detach().cpu() if isinstance(x, Tensor) else x


def _to_list(x: Any) -> list:
    if isinstance(x, Tensor):
        return x.detach().cpu().flatten().tolist()
    try:
        import numpy as np

        return np.asarray(x, dtype=float).ravel().tolist()
    except (TypeError, ValueError):
        return list(x)


@dataclass
class SweepResult:
    """A table (one row per alpha and prompt: ``alpha``, ``prompt``, ``text``, metric columns) and its figure."""

    table: Any
    figure: Any
    config: dict[str, Any] = field(default_factory=dict)

    _group: ClassVar[tuple[str, ...]] = ("alpha",)  # summary rows
    _columns: ClassVar[tuple[str, ...]] = ("alpha", "prompt", "text")  # the table's columns that are not metrics
    _file: ClassVar[str] = "sweep"  # save(): FILE.json (format interp.FILE) and FILE.html

    def __iter__(self):
        return iter((self.table, self.figure))

    def plot(self):
        return self.figure

    @property
    def metrics(self) -> list[str]:
        return [c for c in self.table.columns if c not in self._columns]

    def summary(self):
        """Mean and standard error of each metric per alpha (per method and alpha for a comparison)."""
        return self.table.groupby(list(self._group), sort=False)[self.metrics].agg(["mean", "sem"])

    def save(self, path: str | os.PathLike) -> Path:
        """``FILE.json`` (config + rows) and ``FILE.html`` (the figure); FILE is ``sweep`` or
        ``steering_comparison``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        rows = json.loads(self.table.to_json(orient="records"))
        body = {"format": f"interp.{self._file}", "version": 1, "config": self.config, "rows": rows}
        atomic_write_json(path / f"{self._file}.json", body)
        atomic_write_bytes(path / f"{self._file}.html", self.figure.to_html(include_plotlyjs=True).encode())
        return path


def _metrics(metric: Any, direction: Any) -> dict[str, Any]:
    if metric is None:
        return {"projection": projection(direction)}
    if isinstance(metric, Mapping):
        out = dict(metric)
    elif isinstance(metric, (list, tuple)):
        out = {}
        for m in metric:
            name = getattr(m, "name", None) or getattr(m, "__name__", "metric")
            out[name if name not in out else f"{name}_{len(out)}"] = m
    else:
        out = {"metric": metric}
    for name, m in out.items():
        if not (isinstance(m, Metric) or callable(m)):
            raise ConfigError(f"metric {name!r} is a {type(m).__name__}; give a Metric or fn(model, texts, token_ids)")
    return out


def sweep(
    model,
    prompts: str | Sequence[str],
    direction: Any,
    alphas: Sequence[float],
    metric: Any = None,
    op: str = "add",
    positions: Positions = "all",
    hook: str | Sequence[str] | None = None,
    max_new_tokens: int = 24,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> SweepResult:
    """Generate from ``prompts`` steered with each of ``alphas`` and score every continuation.

    ``metric``: a built-in (:class:`logit_diff`, :class:`projection`, :class:`probe_score`), a callable
    ``fn(model, texts, token_ids) -> list[float]`` (continuation texts and generated ids per prompt, scored
    on the unsteered model), or a dict ``{name: metric}``; default: the projection on ``direction``. Every
    alpha uses the same ``seed``, so differences come from steering, not from sampling noise. ``op="clamp"``
    sweeps the clamp value. Returns a :class:`SweepResult` (``table, figure = sweep(...)`` also works).
    """
    if op == "ablate":
        raise ConfigError("ablate has no alpha to sweep; compare generate() with and without it instead")
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ConfigError("sweep needs at least one alpha")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    metrics = _metrics(metric, direction)
    need_logits = any(getattr(m, "needs_logits", False) for m in metrics.values())
    projects = [m.project for m in metrics.values() if isinstance(m, Metric) and m.project is not None]
    if len({id(p) for p in projects}) > 1:
        raise ConfigError("one sweep records one projection; use one projection() metric per sweep")
    rows = []
    for a in tqdm(alphas, desc="sweep", disable=not progress):
        iv = Intervention(direction, op=op, alpha=a, positions=positions, hook=hook)
        gen = generate(model, prompts, steering=[iv], max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed, project=projects[0] if projects else None, return_logits=need_logits,
                       batch_size=batch_size)
        values = {}
        for name, m in metrics.items():
            if isinstance(m, Metric):
                v = m.evaluate(model, gen)
            else:
                v = m(model, gen.texts, [gen.generated(i) for i in range(len(prompts))])
            v = [float(x) for x in _to_list(v)]
            if len(v) != len(prompts):
                raise ConfigError(f"metric {name!r} returned {len(v)} values for {len(prompts)} prompts")
            values[name] = v
        for i, p in enumerate(prompts):
            rows.append({"alpha": a, "prompt": p, "text": gen.texts[i], **{k: v[i] for k, v in values.items()}})
    import pandas as pd

    from interp import plots

    table = pd.DataFrame(rows)
    config = {
        "model": model_identity(model), "op": op,
        "positions": positions if isinstance(positions, str) else list(positions),
        "hook": Intervention(direction, op=op, alpha=alphas[0], hook=hook).hooks_for(model),
        "alphas": alphas, "metrics": list(metrics), "max_new_tokens": max_new_tokens,
        "temperature": temperature, "seed": seed,
    }
    title = f"steering sweep ({op} at {', '.join(config['hook'])})"
    fig = plots.steering_curve(table, metrics=list(metrics), title=title)
    return SweepResult(table=table, figure=fig, config=config)


# ----------------------------------------------------------------------------------------------- comparing directions


@dataclass
class SteeringComparison(SweepResult):
    """Several directions swept over the same alphas, prompts and seed, scored by the same metrics.

    ``table``: one row per method, alpha and prompt: ``method``, ``alpha`` (in units of ``config["scale"]``),
    ``alpha_raw`` (the norm of the vector added), ``prompt``, ``text`` and one column per metric. ``config``
    records the hooks, the scale, the pairwise cosines of the directions and, from
    :func:`compare_sae_steering`, the latent, its class gap and where the directions came from. ``summary()``
    gives mean and standard error per method and alpha; ``save(dir)`` writes ``steering_comparison.json`` and
    ``steering_comparison.html``.
    """

    _group: ClassVar[tuple[str, ...]] = ("method", "alpha")
    _columns: ClassVar[tuple[str, ...]] = ("method", "alpha", "alpha_raw", "prompt", "text")
    _file: ClassVar[str] = "steering_comparison"

    def __str__(self) -> str:
        cos = self.config.get("cosines") or {}
        head = f"steering comparison at {self.config.get('hook')} (scale {self.config.get('scale', 1.0):.4g})"
        if cos:
            head += "; cosines " + ", ".join(f"{k}: {v:+.3f}" for k, v in cos.items())
        means = self.table.groupby(list(self._group), sort=False)[self.metrics].mean()
        return head + "\n" + means.to_string(float_format=lambda v: f"{v:.4f}")


def sweep_directions(
    model,
    prompts: str | Sequence[str],
    directions: Mapping[str, Any],
    alphas: Sequence[float],
    metric: Any = None,
    *,
    hook: str | None = None,
    scale: float = 1.0,
    positions: Positions = "all",
    max_new_tokens: int = 24,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> SteeringComparison:
    """:func:`sweep` each of ``directions`` (``{name: Direction or 1-D tensor}``) with ``op="add"`` over the
    same ``alphas``, prompts and seed, and put the results side by side.

    Every direction is made a unit vector and added as ``alpha * scale * u``, so methods are compared at equal
    norms. ``hook``: where to steer (default: each Direction's own hook; required for raw tensors).
    ``metric`` is as in :func:`sweep`; by default the projection on the first direction, the reference.
    """
    from interp import plots
    from interp.directions import Direction

    if not directions:
        raise ConfigError("sweep_directions needs at least one direction: {name: Direction or tensor}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ConfigError(f"scale must be a positive number, got {scale}")
    units: dict[str, tuple[Tensor, str]] = {}
    for name, d in directions.items():
        v = _as_vector(d)
        if float(v.norm()) == 0.0:
            raise SteeringError(f"direction {name!r} is all zeros; it cannot be compared")
        where = hook if hook is not None else getattr(d, "hook", None)
        if where is None:
            raise SteeringError(f"direction {name!r} is a raw tensor: pass hook=... to say where to steer")
        units[str(name)] = (v / v.norm(), canonical_hook(model, where))
    first_name, (first, first_hook) = next(iter(units.items()))
    if metric is None:
        metric = {"projection": projection(Direction(first, first_hook, method=first_name))}
    import pandas as pd

    frames = []
    for name, (u, where) in units.items():
        res = sweep(model, prompts, u * scale, alphas, metric=metric, op="add", positions=positions, hook=where,
                    max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size,
                    progress=progress)
        t = res.table
        t.insert(0, "method", name)
        t.insert(2, "alpha_raw", t["alpha"] * scale)
        frames.append(t)
    table = pd.concat(frames, ignore_index=True)
    names = list(units)
    cosines = {f"{a} | {b}": float(units[a][0] @ units[b][0]) for i, a in enumerate(names) for b in names[i + 1 :]}
    hooks = sorted({w for _, w in units.values()})
    config = {
        "model": model_identity(model), "hook": hooks[0] if len(hooks) == 1 else hooks,
        "hooks": {n: w for n, (_, w) in units.items()}, "scale": scale, "alphas": [float(a) for a in alphas],
        "metrics": [c for c in table.columns if c not in ("method", "alpha", "alpha_raw", "prompt", "text")],
        "cosines": cosines, "positions": positions if isinstance(positions, str) else list(positions),
        "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
    }  # fmt: skip
    title = f"steering along {len(names)} directions at {', '.join(hooks)}"
    fig = plots.steering_comparison(table, metrics=config["metrics"], scale=scale, title=title)
    return SteeringComparison(table=table, figure=fig, config=config)


def _store_pool(positions: str) -> str:
    """How ``probe_score`` pools generated tokens for a probe trained on a store captured with ``positions``."""
    if positions == "last":
        return "last"
    return "mean" if positions.startswith("mean") else "tokens"


def compare_sae_steering(
    model,
    prompts: str | Sequence[str],
    store: Any,
    label: str,
    sae: Any,
    *,
    latent: int | None = None,
    comparison: Any = None,
    hook: str | int | None = None,
    alphas: Sequence[float] = (-1.0, -0.5, 0.0, 0.5, 1.0),
    scale: float | str = "norm",
    metric: Any = None,
    positions: Positions = "all",
    test_size: float = 0.25,
    seed: int = 0,
    max_new_tokens: int = 24,
    temperature: float = 0.0,
    batch_size: int = 16,
    progress: bool = True,
) -> SteeringComparison:
    """Steer along an SAE latent's decoder row and along the diff-in-means direction of ``label``, side by side.

    The steering half of :func:`interp.sae.compare`: both directions are taken at the SAE's hook in the store
    (``hook`` overrides), from training rows only (the same split as ``compare``), made unit vectors and
    oriented towards the positive class (the decoder row is flipped when the latent fires more on negative
    rows), then added as ``alpha * scale * u`` through :func:`sweep` with the same prompts, alphas and seed.

    ``latent``: the SAE latent to steer with; default ``comparison.best_latent`` when a
    :class:`~interp.sae.SAEComparison` is given, else the latent with the largest class-mean gap on training
    rows. ``scale="norm"``: alphas are in units of the mean activation norm at the hook on training rows (a
    float gives raw units). ``metric``: as in :func:`sweep`; by default the score of a dense logistic probe
    for ``label`` (fitted on the same training rows) on the generated text, read by the unsteered model.
    """
    from interp.directions import diff_in_means_tensor
    from interp.probes.linear import LinearProbe
    from interp.sae import SAE, _class_gap, labelled_split, resolve_sae_hook
    from interp.store import ActivationStore

    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    sae = sae if isinstance(sae, SAE) else SAE.load(sae)
    hook = resolve_sae_hook(store, sae, hook)
    d_model = int(model.cfg.d_model)
    if d_model != store.d_model:
        raise SteeringError(
            f"the model's d_model is {d_model} but store {store.path} holds width {store.d_model}: steer the model"
            " the store was captured from"
        )
    model_hook = canonical_hook(model, hook)
    stored_name, name = (store.model_info or {}).get("name"), model_identity(model).get("name")
    if stored_name and name and stored_name != name:
        import warnings

        warnings.warn(f"store {store.path} was captured from {stored_name!r} but the model is {name!r}", stacklevel=2)
    train, _, y_all, positive = labelled_split(store, label, test_size=test_size, seed=seed)
    X_tr, y_tr = store.activations(hook, train).float(), y_all[train]

    if comparison is not None:
        prov = getattr(comparison, "provenance", {}) or {}
        if prov.get("hook") not in (None, hook) or prov.get("label") not in (None, label):
            raise ConfigError(
                f"the comparison was made on {prov.get('label')!r} at {prov.get('hook')}, not {label!r} at {hook}:"
                " pass the matching comparison or latent="
            )
        if (prov.get("test_size", test_size), prov.get("seed", seed)) != (test_size, seed):
            raise ConfigError(
                f"the comparison split the store with test_size={prov.get('test_size')}, seed={prov.get('seed')};"
                " pass the same test_size and seed so both use one training split"
            )
        gap = comparison.gap.float()
        if gap.numel() != sae.d_sae:
            raise ConfigError(f"the comparison ranks {gap.numel()} latents but the SAE has {sae.d_sae}")
        if latent is None:
            latent = int(comparison.best_latent)
    else:
        gap, ranking = _class_gap(store, hook, sae, train, y_all, 8192, progress)
        if latent is None:
            latent = int(ranking[0])
    try:  # ints, numpy ints and one-element tensors (such as comparison.ranking[0])
        index = None if isinstance(latent, bool) else int(operator.index(latent))
    except TypeError:
        index = None
    if index is None or not 0 <= index < sae.d_sae:
        raise ConfigError(f"latent must be an integer in 0..{sae.d_sae - 1}, got {latent!r}")
    latent = index
    row = sae.W_dec[latent].detach().float().cpu()
    if float(row.norm()) == 0.0:
        raise SteeringError(f"SAE latent {latent} has an all-zero decoder row; choose another latent")
    sign = 1.0 if float(gap[latent]) >= 0 else -1.0
    dim = diff_in_means_tensor(X_tr, y_tr).float()
    if scale == "norm":
        unit = float(X_tr.norm(dim=1).mean())
    elif isinstance(scale, str):
        raise ConfigError(f"scale must be 'norm' or a positive number, got {scale!r}")
    else:
        unit = float(scale)
    default_metric = metric is None
    if default_metric:
        probe = LinearProbe().fit(X_tr, y_tr)
        metric = {"probe_score": probe_score(probe, hook=model_hook, pool=_store_pool(store.positions))}
    del X_tr
    sae_name = f"SAE latent {latent} (decoder row)"
    result = sweep_directions(
        model, prompts, {sae_name: sign * row, "diff-in-means": dim}, alphas, metric, hook=model_hook, scale=unit,
        positions=positions, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    result.config.update({
        "store": str(store.path), "label": label, "positive_class": positive, "store_hook": hook,
        "latent": latent, "latent_gap": float(gap[latent]), "decoder_sign": sign,
        "scale_mode": "mean activation norm on training rows" if scale == "norm" else "raw",
        "n_train": int(train.numel()), "test_size": test_size, "split_seed": seed,
        "sae": sae.describe(),
        "metric_source": "dense logistic probe for the label, fitted on the training rows, scoring the generated"
                         " text" if default_metric else "given",
    })  # fmt: skip
    return result


__all__ = [
    "GenerationResult",
    "SteeringComparison",
    "compare_sae_steering",
    "sweep_directions",
    "Intervention",
    "Metric",
    "SteeringHandle",
    "SweepResult",
    "generate",
    "logit_diff",
    "probe_score",
    "projection",
    "steer",
    "steering_vector",
    "sweep",
]
