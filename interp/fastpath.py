"""The hot paths at the speed of the bare model: the Hugging Face model a bridge wraps, run directly.

A ``TransformerBridge`` puts a bridge component around every Hugging Face module it maps (blocks, attention,
MLPs, norms, embeddings) and forces eager attention so that attention patterns can be hooked. Capture, scoring
and generation need none of that: they read or edit a few residual-stream-sized tensors at module boundaries.
:func:`fast_model` builds, once per bridge, a *twin* of the wrapped HF model: the same modules and the same
parameter tensors (nothing is copied but the container objects), with every bridge component replaced by the
HF module it wraps, and the fastest attention implementation transformers has for the architecture (``sdpa``
where the model class supports it). TransformerLens hook names are resolved through the bridge's own component
mapping: a component's ``hook_in`` is its HF module's input, its ``hook_out`` that module's output, so
``blocks.L.hook_out`` (``hook_resid_post``), ``hook_in`` (``hook_resid_pre``), ``attn.hook_out``
(``hook_attn_out``), ``mlp.hook_out`` (``hook_mlp_out``) and ``ln2.hook_in`` (``hook_resid_mid``) become plain
torch forward hooks on the twin's modules, and a hook function sees the same tensor, called the same way
(``fn(activation, hook=point)``, the bridge's own HookPoint), as under ``model.hooks``.

Where that is not exact the bridge runs instead (:func:`fast_points` returns None): a hook name with no module
boundary behind it (``attn.hook_pattern``, ``hook_q``, ...), a hook point with a tensor conversion, a bridge in
compatibility mode or with split-QKV / attention-result / ``hook_mlp_in`` options on (they change what the
bridge computes), or a bridge with hooks of its own already attached (a caller's ``model.hooks`` context around
a capture still acts).

Numerics: the twin computes what ``transformers`` computes; the bridge re-implements some modules (eager
attention for RoPE models, LayerNorm in Python), so the two agree to float rounding, not bit for bit (see
``tests/test_fastpath.py`` for the bounds and ``bench/RESULTS.md`` for why).
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from jaxtyping import Int
from torch import Tensor, nn

from interp.errors import ConfigError


_twins: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_asked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
_CHANGES_COMPUTATION = ("use_split_qkv_input", "use_attn_in", "use_attn_result", "use_hook_mlp_in",
                        "use_qk_norm_fork", "layer_norm_folding")


class StopForward(Exception):
    """Raised from the deepest hook once every activation asked for is in hand: the rest of the forward
    (later blocks, the unembedding or MLM head) is skipped. TransformerLens's ``stop_at_layer`` is not used
    because it does not stop every architecture (BERT runs to the end)."""


@dataclass
class FastModel:
    """A bridge's twin: ``hf`` (the HF model with its own modules back in place, sharing the bridge's
    parameters), its ``attn_implementation``, and ``points``: ``id(HookPoint) -> (twin module, "in" | "out")``
    for every bridge hook point that is a module boundary of the twin."""

    hf: nn.Module
    attn_implementation: str
    points: dict[int, tuple[nn.Module, str]]
    hook_points: list[nn.Module]
    takes_use_cache: bool
    resolved: dict[tuple[str, ...], list | None] = field(default_factory=dict)  # hook names -> their places


def _supported_components() -> tuple[type, ...]:
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    from transformer_lens.model_bridge.generalized_components.block import BlockBridge
    from transformer_lens.model_bridge.generalized_components.linear import LinearBridge
    from transformer_lens.model_bridge.generalized_components.mlp import MLPBridge
    from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

    # the components whose forward is hook_in(input) -> the HF module's computation -> hook_out(output[0])
    return BlockBridge, AttentionBridge, MLPBridge, NormalizationBridge, LinearBridge


def check_attn_implementation(name: str | None) -> None:
    """None (the fastest) or one of :data:`ATTN_IMPLEMENTATIONS`; a one-line error otherwise."""
    if name is not None and name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation must be None (the fastest), 'sdpa' or 'eager', got {name!r}")


def prepare(model, attn_implementation: str | None = None) -> FastModel | None:
    """Choose the attention the hot paths run ``model`` with (None: the fastest it supports) and build its twin
    now (``load_model`` calls this); returns the twin, or None where the bridge must run."""
    check_attn_implementation(attn_implementation)
    _asked[model] = attn_implementation
    _twins.pop(model, None)
    return fast_model(model)


def _best_attention(hf: nn.Module, asked: str | None = None) -> str:
    """``sdpa`` where the model class supports it and can switch at run time, else ``eager``; ``asked="eager"``
    keeps eager."""
    if asked == "eager":
        return "eager"
    can_switch = getattr(hf, "_can_set_attn_implementation", lambda: True)
    try:
        switchable = bool(can_switch())
    except Exception:  # noqa: BLE001 - a model that cannot say is left as it is
        switchable = False
    return "sdpa" if getattr(type(hf), "_supports_sdpa", False) and switchable else "eager"


def _unwrap(module: nn.Module, memo: dict[int, nn.Module], configs: dict[int, Any], impl: str) -> nn.Module:
    """``module`` with every bridge component below it replaced by the HF module it wraps. Modules with
    children are shallow-copied (fresh hook tables, their own config with ``impl``); leaves are shared."""
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    while isinstance(module, GeneralizedComponent):
        inner = module.original_component
        if inner is None:
            raise _Unsupported
        module = inner
    if hasattr(module, "_hf_hook"):  # placed by accelerate (device_map): its forward is bound to the original
        raise _Unsupported
    key = id(module)
    if key in memo:
        return memo[key]
    if not module._modules:
        memo[key] = module
        return module
    new = copy.copy(module)
    memo[key] = new
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            object.__setattr__(new, name, OrderedDict())
    children = OrderedDict()
    for name, child in module._modules.items():
        children[name] = None if child is None else _unwrap(child, memo, configs, impl)
    object.__setattr__(new, "_modules", children)
    cfg = new.__dict__.get("config")
    if cfg is not None and hasattr(cfg, "_attn_implementation"):
        if id(cfg) not in configs:
            twin_cfg = copy.deepcopy(cfg)
            twin_cfg._attn_implementation = impl
            configs[id(cfg)] = twin_cfg
        object.__setattr__(new, "config", configs[id(cfg)])
    if isinstance(new.__dict__.get("_attn_implementation"), str):
        object.__setattr__(new, "_attn_implementation", impl)
    return new


class _Unsupported(Exception):
    pass


def fast_model(model) -> FastModel | None:
    """The twin of bridge ``model`` (built once, then cached), or None where the fast path cannot be exact."""
    if model in _twins:
        return _twins[model]
    found = None
    hf = getattr(model, "original_model", None)
    if isinstance(hf, nn.Module) and _computes_like_hf(model):
        try:
            found = _build(model, hf)
        except _Unsupported:
            found = None
    _twins[model] = found
    return found


def _computes_like_hf(model) -> bool:
    """False once the bridge computes something else than its HF modules (compatibility mode's processed
    weights, split-QKV inputs, attention results, ``hook_mlp_in``); checked on every use, as these can be
    switched on after loading."""
    cfg = getattr(model, "cfg", None)
    return not getattr(model, "compatibility_mode", False) and not any(
        getattr(cfg, flag, False) for flag in _CHANGES_COMPUTATION)


def _build(model, hf: nn.Module) -> FastModel:
    from transformer_lens.hook_points import HookPoint

    impl = _best_attention(hf, _asked.get(model))
    memo: dict[int, nn.Module] = {}
    twin = _unwrap(hf, memo, {}, impl)
    kinds = _supported_components()
    points: dict[int, tuple[nn.Module, str]] = {}
    for comp in model.modules():
        if not isinstance(comp, kinds) or comp.name is None:
            continue
        inner = comp.original_component
        target = memo.get(id(inner)) if inner is not None else None
        if target is None:
            continue
        for kind in ("in", "out"):
            point = comp._modules.get(f"hook_{kind}")
            if isinstance(point, HookPoint):
                points[id(point)] = (target, kind)
    for comp in model.modules():  # placeholders (BERT's mlp): their hooks mirror their in/out submodules'
        if isinstance(comp, kinds) and comp.name is None and getattr(comp, "_placeholder_hooks_wired", False):
            for kind, sub in (("in", "in"), ("out", "out")):
                inner_point = getattr(comp.submodules.get(sub), f"hook_{kind}", None)
                point = comp._modules.get(f"hook_{kind}")
                if id(inner_point) in points and isinstance(point, HookPoint):
                    points[id(point)] = points[id(inner_point)]
    hook_points = [m for m in model.modules() if isinstance(m, HookPoint)]
    takes = "use_cache" in inspect.signature(twin.forward).parameters
    return FastModel(twin, impl, points, hook_points, takes)


def attn_implementation(model, bridge: bool = False) -> str:
    """The attention implementation the hot paths run ``model`` with (``bridge=True``: the bridge's own)."""
    fm = None if bridge else fast_model(model)
    if fm is not None:
        return fm.attn_implementation
    hf = getattr(model, "original_model", None)
    return str(getattr(getattr(hf, "config", None), "_attn_implementation", None) or "eager")


def fast_points(model, hook_names: Sequence[str]) -> tuple[FastModel, list[tuple[nn.Module, str, Any]]] | None:
    """``(twin, [(module, "in" | "out", HookPoint)] per name)`` when every name maps to a module boundary and
    the bridge has no hooks of its own attached; None means: run the bridge."""
    fm = fast_model(model)
    if fm is None or not _computes_like_hf(model) or any(_attached(p) for p in fm.hook_points):
        return None
    key = tuple(hook_names)
    if key not in fm.resolved:
        fm.resolved[key] = _resolve(model, fm, key)
    out = fm.resolved[key]
    return None if out is None else (fm, out)


def _resolve(model, fm: FastModel, hook_names: Sequence[str]) -> list[tuple[nn.Module, str, Any]] | None:
    from interp.model import canonical_hook

    out = []
    hook_dict = model.hook_dict
    for name in hook_names:
        point = hook_dict.get(canonical_hook(model, name))
        where = fm.points.get(id(point)) if point is not None else None
        if where is None:
            return None
        out.append((where[0], where[1], point))
    return out


def _attached(point) -> bool:
    """Whether a hook point has a hook of its own (the bridge's placeholder mirrors do not count)."""
    return any("_wire_symbolic_hooks" not in getattr(h, "__name__", "") for h in point._forward_hooks.values())


def _first(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def _replace_first(value: Any, new: Tensor) -> Any:
    return new if isinstance(value, Tensor) else (new, *value[1:])


def _call(fn: Callable, x: Tensor, point) -> Tensor | None:
    """``fn`` on ``x`` exactly as the bridge's HookPoint calls it (its tensor conversion, if any, around it)."""
    conv = point.hook_conversion
    if conv is None:
        return fn(x, hook=point)
    new = fn(conv.convert(x), hook=point)
    return None if new is None else conv.revert(new)


def _pre_hook(fn: Callable, point) -> Callable:
    def hook(module, args, kwargs):
        if args and isinstance(args[0], Tensor):
            new = _call(fn, args[0], point)
            return None if new is None else ((new, *args[1:]), kwargs)
        x = kwargs.get("hidden_states")
        if isinstance(x, Tensor):
            new = _call(fn, x, point)
            if new is not None:
                return args, {**kwargs, "hidden_states": new}
        return None

    return hook


def _post_hook(fn: Callable, point) -> Callable:
    def hook(module, args, output):
        x = _first(output)
        if x is None:
            return None
        new = _call(fn, x, point)
        return None if new is None else _replace_first(output, new)

    return hook


@contextmanager
def hooks(resolved: list[tuple[nn.Module, str, Any]], fns: Sequence[Callable]) -> Iterator[None]:
    """Attach ``fns[i]`` at ``resolved[i]`` (from :func:`fast_points`) for the duration of the block, in
    order, as TransformerLens hook functions (``fn(activation, hook=point) -> new activation or None``)."""
    handles = []
    try:
        for (module, kind, point), fn in zip(resolved, fns):
            if kind == "in":
                handles.append(module.register_forward_pre_hook(_pre_hook(fn, point), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_post_hook(fn, point)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def attach(model, fwd_hooks: Sequence[tuple[str, Callable]], fast: bool = True) -> Iterator[FastModel | None]:
    """Attach TransformerLens hook functions ``[(hook name, fn)]`` for the duration of the block and yield what
    to run: the twin (:class:`FastModel`, its ``hf`` called with HF keywords), its hooks plain torch hooks,
    when ``fast`` and every name maps to a module boundary; else None, the hooks attached to the bridge with
    ``model.hooks`` (run the bridge, or ``model.original_model``, inside the block)."""
    found = fast_points(model, [name for name, _ in fwd_hooks]) if fast else None
    if found is None:
        with model.hooks(fwd_hooks=list(fwd_hooks)) if fwd_hooks else nullcontext():
            yield None
        return
    fm, resolved = found
    with hooks(resolved, [fn for _, fn in fwd_hooks]):
        yield fm


def forward_to_stop(
    fm: FastModel, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None = None
) -> None:
    """One forward of the twin (no KV cache built) that any hook may end early by raising :class:`StopForward`."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if fm.takes_use_cache:
        kwargs["use_cache"] = False
    try:
        fm.hf(**kwargs)
    except StopForward:
        pass
