"""Interventions (add / ablate / clamp at positions), the position tracking they need, and the steer() context."""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interp.errors import ConfigError, SteeringError, close_matches
from interp.generation import Act, Positions, check_positions, position_mask
from interp.model import cache_length, canonical_hook

OPS = ("add", "ablate", "clamp")
METHODS = ("diff_in_means", "pca")
_MLP_HIDDEN = re.compile(r"(^|\.)mlp\.(hook_pre|hook_post|in\.hook_out|out\.hook_in)$")




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
        object.__setattr__(self, "positions", check_positions(self.positions))
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

    def acts(self, model) -> list[Act]:
        """This intervention as hooks that act in :func:`interp.generation.generate` (one per hook)."""
        hooks = self.hooks_for(model)
        _check_width(model, self, hooks)
        fn = _op_fn(self)
        return [Act(h, fn, self.positions, name=f"{self.op}@{h}") for h in hooks]

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
        past = kwargs.get("past_key_values")
        cached = cache_length(past if past is not None else kwargs.get("cache"))
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
        assert self.pos is not None and self.prompt_len is not None
        m = position_mask(self.pos, self.prompt_len, positions, self.padded)
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


def _op_fn(iv: Intervention) -> Callable[[Tensor], Tensor]:
    """``act -> new act`` for every position: the operation of the module docstring's table."""
    op, alpha = iv.op, iv.alpha
    base = iv.vector
    unit = base / base.norm() if op != "add" else None
    cache: dict[tuple[Any, Any], Tensor] = {}

    def fn(act: Tensor) -> Tensor:
        if act.shape[-1] != base.numel():
            raise SteeringError(
                f"an activation has width {act.shape[-1]} but the direction has {base.numel()} dimensions; "
                "use a direction computed at this hook"
            )
        key = (act.device, act.dtype)
        v = cache.get(key)
        if v is None:
            v = cache[key] = (alpha * base).to(act.device, act.dtype) if op == "add" else unit.to(act.device)  # type: ignore[operator,union-attr]
        if op == "add":
            return act + v
        x = act.float()
        coef = x @ v
        target = -coef if op == "ablate" else float(alpha) - coef  # type: ignore[arg-type]
        return (x + target[..., None] * v).to(act.dtype)

    return fn


def _make_hook(iv: Intervention, idx: int, handle: SteeringHandle, tracker: _Tracker) -> Callable:
    positions = iv.positions
    fn = _op_fn(iv)

    def hook_fn(act: Tensor, hook) -> Tensor:
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
        new = fn(act)
        handle.calls += 1
        return new if m is None else torch.where(m[..., None], new, act)

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


