"""Reading SAE directories: SAELens configs of any version and EleutherAI sparsify directories."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from interp.devices import resolve_device
from interp.errors import SAEError
from interp.sae.autoencoder import (
    _LEGACY_METADATA,
    ARCHITECTURES,
    CFG_FILE,
    EAI_WEIGHTS_FILE,
    NORMALIZATIONS,
    SAE,
    WEIGHTS_FILE,
    _parse_dtype,
)
from torch import Tensor


def _read_cfg(path: Path) -> dict[str, Any]:
    p = path / CFG_FILE
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise SAEError(f"{path} has no {CFG_FILE}: not an SAE directory (SAELens or EleutherAI layout)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SAEError(f"{p} is not valid JSON ({e}); re-download or re-save the SAE") from None
    if not isinstance(cfg, dict):
        raise SAEError(f"{p} must hold a JSON object")
    return cfg


def _read_weights(p: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except Exception as e:  # SafetensorError, OSError, ValueError: all mean the file cannot be used
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SAEError(f"weights file {p} is corrupt or unreadable ({msg}); re-download or re-save the SAE") from None


def _normalization(cfg: Mapping[str, Any], where: str) -> str:
    norm = cfg.get("normalize_activations", "none")
    if norm is False or norm is None:
        norm = "none"
    elif norm is True:  # early SAELens: a boolean meaning "scale to the expected average norm at training"
        norm = "expected_average_only_in"
    if norm not in NORMALIZATIONS:
        raise SAEError(
            f"{where}: normalize_activations={norm!r} is not supported (interp supports {', '.join(NORMALIZATIONS)});"
            " fold the normalisation into the weights and save with 'none'"
        )
    if norm == "expected_average_only_in":
        warnings.warn(
            f"{where}: normalize_activations='expected_average_only_in' means the SAE was trained on activations"
            " scaled to norm sqrt(d_in) on average; like SAELens, encode() applies no scaling, so scale inputs"
            " yourself unless the factor was folded into the weights",
            stacklevel=3,
        )
    return str(norm)


def _from_saelens(path: Path, cfg: dict[str, Any], device: Any, dtype: Any) -> SAE:
    tensors = _read_weights(path / WEIGHTS_FILE)
    return _build(cfg, tensors, str(path), device, dtype)


def _build(cfg: dict[str, Any], tensors: dict[str, Tensor], where: str, device: Any, dtype: Any) -> SAE:
    cfg = dict(cfg)
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    k = cfg.get("k")
    if arch == "standard" and act == "topk":  # SAELens 5: TopK as a standard SAE with a topk activation
        arch = "topk"
        k = (cfg.get("activation_fn_kwargs") or {}).get("k", k)
    elif act not in ("relu", "topk", None):
        raise SAEError(f"{where}: activation function {act!r} is not supported; interp supports relu and topk")
    if arch not in ARCHITECTURES:
        raise SAEError(
            f"{where}: SAE architecture {arch!r} is not supported; interp reads {', '.join(ARCHITECTURES)}"
        )
    if arch == "topk" and k is None:
        raise SAEError(f"{where}: a topk SAE's cfg.json must give k")
    if cfg.get("finetuning_scaling_factor"):
        raise SAEError(f"{where}: cfg sets finetuning_scaling_factor=true, which interp does not apply; fold it into "
                       "the weights")
    fold_norms = bool(cfg.get("rescale_acts_by_decoder_norm"))
    if fold_norms and arch != "topk":
        raise SAEError(f"{where}: cfg sets rescale_acts_by_decoder_norm=true on a {arch} SAE; SAELens defines it for "
                       "topk SAEs only: fold the decoder norms into the weights and save without it")
    if cfg.get("hook_head_index") is not None or (cfg.get("metadata") or {}).get("hook_head_index") is not None:
        raise SAEError(f"{where}: SAEs on a single attention head (hook_head_index) are not supported")
    norm = _normalization(cfg, where)
    required = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    missing = [n for n in required if n not in tensors]
    if missing:
        raise SAEError(
            f"{where}: weights file lacks {', '.join(missing)} (has {', '.join(sorted(tensors)) or 'nothing'});"
            " it is not a complete SAELens SAE"
        )
    W_enc = tensors["W_enc"]
    if W_enc.ndim != 2:
        raise SAEError(f"{where}: W_enc must be 2-D [d_in, d_sae], got shape {list(W_enc.shape)}")
    d_in, d_sae = int(W_enc.shape[0]), int(W_enc.shape[1])
    for name, want in (("d_in", d_in), ("d_sae", d_sae)):
        if name in cfg and cfg[name] is not None and int(cfg[name]) != want:
            raise SAEError(f"{where}: cfg says {name}={cfg[name]} but W_enc has shape {[d_in, d_sae]}")
    shapes = {"b_enc": [d_sae], "W_dec": [d_sae, d_in], "b_dec": [d_in], "threshold": [d_sae]}
    for name, shape in shapes.items():
        if name in required and list(tensors[name].shape) != shape:
            raise SAEError(f"{where}: {name} has shape {list(tensors[name].shape)}, expected {shape}")
    for name in required:
        t = tensors[name]
        if not t.is_floating_point() or not torch.isfinite(t.float()).all():
            raise SAEError(f"{where}: weight {name} holds non-finite or non-float values; the file is damaged")
    metadata = dict(cfg.get("metadata") or {})
    for key in _LEGACY_METADATA:  # SAELens < 6 kept these at the top level
        if key in cfg and key not in metadata:
            metadata[key] = cfg[key]
    if metadata.get("hook_name") is None and cfg.get("hook_point") is not None:  # SAELens < 2
        metadata["hook_name"] = cfg["hook_point"]
        if cfg.get("hook_point_layer") is not None:
            metadata.setdefault("hook_layer", cfg["hook_point_layer"])
    dt = _parse_dtype(dtype) if dtype is not None else _parse_dtype(cfg.get("dtype"), torch.float32)
    sae = SAE(
        d_in,
        d_sae,
        arch,
        k=int(k) if arch == "topk" else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        normalize_activations=norm,
        metadata=metadata,
        dtype=dt,
    )
    if cfg.get("reshape_activations") not in (None, "none"):  # "hook_z": SAELens flattens heads; stores are flat
        sae.extra_cfg["reshape_activations"] = cfg["reshape_activations"]
    if fold_norms:
        tensors = fold_decoder_norms(tensors)
    with torch.no_grad():
        for name in required:
            getattr(sae, name).copy_(tensors[name].to(dt))
    return sae.to(resolve_device(device))


def fold_decoder_norms(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Fold SAELens's ``rescale_acts_by_decoder_norm`` into the weights (as SAELens's ``fold_W_dec_norm``).

    With the flag, a SAELens TopK SAE multiplies its pre-activations by the decoder row norms ``n`` (clamped
    at 1e-8) before TopK, and divides the activations by ``n`` before decoding. Because ``n > 0`` commutes with
    TopK and ReLU, the same SAE with ``W_enc`` and ``b_enc`` times ``n`` and ``W_dec``'s rows divided by ``n``
    computes identical latents and reconstructions with the plain formula. Done in float64, then stored in
    the SAE's dtype.
    """
    W_dec = tensors["W_dec"].double()
    n = W_dec.norm(dim=-1).clamp_min(1e-8)  # [d_sae]
    return {
        **tensors,
        "W_enc": tensors["W_enc"].double() * n,
        "b_enc": tensors["b_enc"].double() * n,
        "W_dec": W_dec / n[:, None],
    }


_EAI_LAYER = re.compile(r"^layers\.(\d+)$")


def _from_eleuther(path: Path, cfg: dict[str, Any], device: Any, dtype: Any) -> SAE:
    """EleutherAI ``sparsify``: ``f = topk(relu(encoder(x - b_dec)))``, ``x_hat = f @ W_dec + b_dec``."""
    where = str(path)
    tensors = _read_weights(path / EAI_WEIGHTS_FILE)
    for flag in ("skip_connection", "transcode"):  # both change the computation; multi_topk is training-only
        if cfg.get(flag):
            raise SAEError(f"{where}: EleutherAI SAEs with {flag}=true are not supported")
    if cfg.get("activation", "topk") != "topk":  # sparsify's "groupmax" keeps one latent per group, not the top k
        raise SAEError(f"{where}: EleutherAI activation={cfg['activation']!r} is not supported; interp reads topk")
    missing = [n for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if n not in tensors]
    if missing:
        raise SAEError(
            f"{where}: {EAI_WEIGHTS_FILE} lacks {', '.join(missing)} (has {', '.join(sorted(tensors))}); it is not"
            " an EleutherAI sparsify SAE"
        )
    if "k" not in cfg:
        raise SAEError(f"{where}: EleutherAI cfg.json must give k")
    enc = tensors["encoder.weight"]
    if enc.ndim != 2:
        raise SAEError(f"{where}: encoder.weight must be 2-D [d_sae, d_in], got {list(enc.shape)}")
    d_sae, d_in = int(enc.shape[0]), int(enc.shape[1])
    if cfg.get("d_in") is not None and int(cfg["d_in"]) != d_in:
        raise SAEError(f"{where}: cfg says d_in={cfg['d_in']} but encoder.weight has shape {[d_sae, d_in]}")
    hookpoint = path.name
    m = _EAI_LAYER.match(hookpoint)
    metadata = {
        "model_name": cfg.get("model_name"),
        "hook_name": f"blocks.{m.group(1)}.hook_resid_post" if m else None,
        "source": "eleutherai/sparsify",
        "hookpoint": hookpoint,
    }
    sae_cfg = {
        "architecture": "topk",
        "d_in": d_in,
        "d_sae": d_sae,
        "k": int(cfg["k"]),
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "dtype": dtype if dtype is not None else "float32",
        "metadata": metadata,
    }
    st = {
        "W_enc": enc.T.contiguous(),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    return _build(sae_cfg, st, where, device, dtype)


# ================================================================================================ stores
