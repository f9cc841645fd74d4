"""Sparse autoencoders on stored activations: SAELens-format I/O, encode/decode, metrics and TopK training.
Comparing SAE latents with a dense probe and a difference-in-means direction lives in :mod:`interp.comparisons`.

On disk an SAE is a directory in SAELens's layout (version 6)::

    cfg.json                   {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                                "normalize_activations", "reshape_activations", "metadata": {"model_name",
                                "hook_name", ...}, "k" (topk only)}
    sae_weights.safetensors    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in],
                               threshold [d_sae] (jumprelu only)

:meth:`SAE.load` also reads older SAELens configs (top-level ``hook_name`` / ``hook_point``, TopK written as
``architecture="standard"`` with ``activation_fn_str="topk"``) and EleutherAI ``sparsify`` directories
(``cfg.json`` + ``sae.safetensors`` holding ``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec``,
``b_dec``). The ``sae-lens`` package is not needed.

The encoder follows SAELens::

    x' = normalize(x) - b_dec * apply_b_dec_to_input
    pre = x' @ W_enc + b_enc
    standard:  f = relu(pre)
    jumprelu:  f = relu(pre) * (pre > threshold)
    topk:      f = scatter(topk(pre, k).indices, relu(topk(pre, k).values))   # top k of the raw
               pre-activations, then ReLU: identical to the top k of relu(pre), and what EleutherAI does
    decode(f) = f @ W_dec + b_dec

This module reads stores only: it never imports :mod:`interp.model` or :mod:`interp.capture`.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from interp.artifacts import jsonable as _jsonable
from interp.artifacts import save_tensors
from interp.devices import resolve_device
from interp.errors import AnalysisError, ConfigError, HookError, SAEError
from interp.store import ActivationStore, atomic_write_json

ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"  # SAELens
EAI_WEIGHTS_FILE = "sae.safetensors"  # EleutherAI sparsify
TRAINING_STATE = "training_state.json"
OPTIMIZER_STATE = "optimizer.safetensors"
_FLOAT_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
# metadata fields SAELens 6 keeps under cfg["metadata"]; older versions had them at the top level
_LEGACY_METADATA = (
    "model_name",
    "hook_name",
    "hook_head_index",
    "hook_layer",
    "prepend_bos",
    "context_size",
    "dataset_path",
    "dataset_trust_remote_code",
    "neuronpedia_id",
    "model_class_name",
    "model_from_pretrained_kwargs",
    "seqpos_slice",
    "exclude_special_tokens",
    "sae_lens_training_version",
    "sae_lens_version",
)


SAELENS_LAYOUT_VERSION = "6.0.0"  # written as metadata.sae_lens_version: "this cfg is in SAELens 6's layout"


def _is_saelens6(version: Any) -> bool:
    m = re.match(r"^\s*v?(\d+)\.", str(version)) if version is not None else None
    return bool(m) and int(m.group(1)) >= 6


def _dtype_name(dtype: torch.dtype) -> str:
    for k, v in _FLOAT_DTYPES.items():
        if v == dtype:
            return k
    raise ConfigError(f"unsupported SAE dtype {dtype}: use one of {', '.join(_FLOAT_DTYPES)}")


def _parse_dtype(name: Any, default: torch.dtype = torch.float32) -> torch.dtype:
    if name is None:
        return default
    if isinstance(name, torch.dtype):
        _dtype_name(name)
        return name
    key = str(name).replace("torch.", "")
    aliases = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    key = aliases.get(key, key)
    if key not in _FLOAT_DTYPES:
        raise ConfigError(f"unsupported SAE dtype {name!r}: use one of {', '.join(_FLOAT_DTYPES)}")
    return _FLOAT_DTYPES[key]


# ================================================================================================ the SAE


class SAE(nn.Module):
    """A sparse autoencoder with SAELens's parameters and formulas (standard ReLU, TopK or JumpReLU).

    >>> sae = SAE.load("saes/gpt2-l8")                 # SAELens or EleutherAI directory
    >>> f = sae.encode(x)                              # [n, d_sae]
    >>> x_hat = sae.decode(f)                          # [n, d_in]
    >>> sae.evaluate(store).fve                        # fraction of variance explained over a store
    >>> sae.save("saes/copy")                          # SAELens 6 layout

    A new SAE (``SAE(d_in, d_sae, "topk", k=32)``) starts from a seeded random init: unit-norm decoder rows and
    the encoder set to the decoder's transpose.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        architecture: str = "topk",
        *,
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
        normalize_activations: str = "none",
        hook_name: str | None = None,
        model_name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        dtype: str | torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise SAEError(f"unsupported SAE architecture {architecture!r}: interp supports {', '.join(ARCHITECTURES)}")
        if int(d_in) <= 0 or int(d_sae) <= 0:
            raise SAEError(f"SAE sizes must be positive, got d_in={d_in}, d_sae={d_sae}")
        if architecture == "topk":
            if k is None or not 0 < int(k) <= int(d_sae):
                raise SAEError(f"a topk SAE needs 0 < k <= d_sae ({d_sae}), got k={k}")
        if normalize_activations not in NORMALIZATIONS:
            raise SAEError(
                f"unsupported normalize_activations {normalize_activations!r}: interp supports "
                f"{', '.join(NORMALIZATIONS)}"
            )
        self.d_in, self.d_sae = int(d_in), int(d_sae)
        self.architecture = architecture
        self.k = int(k) if architecture == "topk" else None
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.normalize_activations = normalize_activations
        self.metadata: dict[str, Any] = dict(metadata or {})
        if hook_name is not None:
            self.metadata["hook_name"] = hook_name
        if model_name is not None:
            self.metadata["model_name"] = model_name
        self.extra_cfg: dict[str, Any] = {}  # cfg fields interp does not use, kept on save
        dt = _parse_dtype(dtype)
        g = torch.Generator().manual_seed(int(seed))
        W_dec = torch.randn(self.d_sae, self.d_in, generator=g, dtype=torch.float64)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec.T.contiguous().to(dt))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, dtype=dt))
        self.W_dec = nn.Parameter(W_dec.to(dt))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in, dtype=dt))
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(self.d_sae, dtype=dt))
        else:
            self.threshold = None
        self.to(resolve_device(device))

    # ---- facts
    @property
    def hook_name(self) -> str | None:
        return self.metadata.get("hook_name")

    @hook_name.setter
    def hook_name(self, value: str | None) -> None:
        self.metadata["hook_name"] = value

    @property
    def model_name(self) -> str | None:
        return self.metadata.get("model_name")

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (
            f"SAE({self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{k}, hook={self.hook_name!r}, "
            f"dtype={_dtype_name(self.dtype)})"
        )

    def describe(self) -> dict[str, Any]:
        """What a saved result records about the SAE: architecture, sizes, k, hook and model names."""
        return {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "k": self.k,
                "hook_name": self.hook_name, "model_name": self.model_name}  # fmt: skip

    # ---- the formulas
    def _normalize(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """SAELens's run-time input normalisation; returns the normalised input and what undoes it."""
        if self.normalize_activations == "constant_norm_rescale":
            coeff = (self.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            return x * coeff, (coeff,)
        if self.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            std = xc.std(dim=-1, keepdim=True)
            return xc / (std + 1e-5), (mu, std)
        return x, None  # "none"; "expected_average_only_in" is applied by the data pipeline, not the SAE

    def _denormalize(self, x: Tensor, state: tuple[Tensor, ...] | None) -> Tensor:
        if state is None:
            return x
        if self.normalize_activations == "constant_norm_rescale":
            return x / state[0]
        mu, std = state
        return x * std + mu

    def _pre(self, xn: Tensor) -> Tensor:
        if self.apply_b_dec_to_input:
            xn = xn - self.b_dec
        if xn.dim() == 2:
            return torch.addmm(self.b_enc, xn, self.W_enc)  # fused bias: one pass less over [n, d_sae]
        return xn @ self.W_enc + self.b_enc

    def _activate(self, pre: Tensor) -> Tensor:
        if self.architecture == "standard":
            return torch.relu_(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        out = torch.zeros_like(pre) if pre.requires_grad else pre.zero_()  # reuse the buffer when no autograd
        return out.scatter_(-1, idx, torch.relu(vals))

    def _input(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        if x.shape[-1] != self.d_in:
            raise SAEError(f"input has width {x.shape[-1]} but the SAE's d_in is {self.d_in}: use the SAE's hook")
        if x.device != self.device:  # move in the stored dtype (fewer bytes over PCIe), convert on arrival
            x = x.to(self.device, non_blocking=True)
        return x.to(self.dtype)

    def encode_pre(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Pre-activations ``normalize(x) - b_dec * apply_b_dec_to_input) @ W_enc + b_enc``."""
        xn, _ = self._normalize(self._input(x))
        return self._pre(xn)

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Latent activations (dense, zeros where a latent is off), in the SAE's dtype."""
        return self._activate(self.encode_pre(x))

    def decode(self, f: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_in"]:
        """``f @ W_dec + b_dec``: the reconstruction in the SAE's (normalised) input space."""
        return f.to(self.device, self.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_in"]:
        """Reconstruct ``x``: encode, decode, and undo run-time normalisation (as SAELens's ``forward``)."""
        return self.reconstruct(x)[0]

    def reconstruct(
        self, x: Float[Tensor, "*batch d_in"]
    ) -> tuple[Float[Tensor, "*batch d_in"], Float[Tensor, "*batch d_sae"]]:
        """``(x_hat, f)``: the reconstruction in the input's space and the latents it came from.

        For TopK SAEs without autograd the decoder reads only the ``k`` active rows of ``W_dec`` per input
        (``embedding_bag``): ``k * d_in`` instead of ``d_sae * d_in`` multiply-adds, the same sum up to rounding.
        """
        xn, state = self._normalize(self._input(x))
        pre = self._pre(xn)
        if self.architecture == "topk" and pre.dim() == 2 and not torch.is_grad_enabled():
            vals, idx = pre.topk(self.k, dim=-1, sorted=False)
            vals = torch.relu(vals)
            x_hat = nn.functional.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum") + self.b_dec
            f = pre.zero_().scatter_(-1, idx, vals)
        else:
            f = self._activate(pre)
            x_hat = self.decode(f)
        return self._denormalize(x_hat, state), f

    # ---- over a store
    def iter_encode(
        self,
        store: ActivationStore | str | os.PathLike,
        hook: str | int | None = None,
        *,
        rows: Int[Tensor, " n"] | None = None,
        batch_size: int = 8192,
        progress: bool = True,
    ) -> Iterator[tuple[Int[Tensor, " b"], Float[Tensor, "b d_sae"]]]:
        """Stream ``(rows, latents)`` over a store's hook; the next batch is read while this one is encoded.

        The hook and width are checked now, not at the first batch.
        """
        store = _as_store(store)
        hook = resolve_sae_hook(store, self, hook)
        return self._iter_encode(store, hook, rows, batch_size, progress)

    def _iter_encode(
        self, store: ActivationStore, hook: str, rows: Tensor | None, batch_size: int, progress: bool
    ) -> Iterator[tuple[Tensor, Tensor]]:
        pin = self.device.type == "cuda"
        for idx, x in _prefetch(store, hook, rows, batch_size, progress, desc="encode", pin_memory=pin):
            with torch.no_grad():  # not around the yield: grad mode must not leak into the caller's loop
                f = self.encode(x)
            yield idx, f

    def evaluate(
        self,
        store: ActivationStore | str | os.PathLike,
        hook: str | int | None = None,
        *,
        rows: Int[Tensor, " n"] | None = None,
        batch_size: int = 8192,
        progress: bool = True,
    ) -> SAEMetrics:
        """Reconstruction metrics over a store (see :func:`evaluate`)."""
        return evaluate(self, store, hook, rows=rows, batch_size=batch_size, progress=progress)

    # ---- disk
    def cfg(self) -> dict[str, Any]:
        """The ``cfg.json`` contents, laid out as SAELens 6 writes them."""
        cfg: dict[str, Any] = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": _dtype_name(self.dtype),
            "device": str(self.device),
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "reshape_activations": self.extra_cfg.get("reshape_activations", "none"),
        }
        if self.architecture == "topk":
            cfg["k"] = self.k
        for key, value in self.extra_cfg.items():
            cfg.setdefault(key, value)
        meta = {"model_name": None, "hook_name": None, "hook_head_index": None, "prepend_bos": True}
        meta.update(self.metadata)
        # SAELens 6 reads a cfg as its own layout only when metadata.sae_lens_version is >= 6; without it (or with
        # an older version, kept from a loaded pre-6 SAE) it re-parses the cfg as pre-6 and loses this metadata
        old = meta.get("sae_lens_version")
        if not _is_saelens6(old):
            if old is not None:
                meta["source_sae_lens_version"] = old
            meta["sae_lens_version"] = SAELENS_LAYOUT_VERSION
        cfg["metadata"] = meta
        return cfg

    def state_tensors(self) -> dict[str, Tensor]:
        """The weights as SAELens names them (contiguous CPU copies)."""
        out = {n: getattr(self, n).detach().cpu().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if self.threshold is not None:
            out["threshold"] = self.threshold.detach().cpu().contiguous()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` (SAELens 6 layout) into directory ``path``."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise SAEError(f"{path} is a file: give a directory to save the SAE into")
        path.mkdir(parents=True, exist_ok=True)
        save_tensors(path / WEIGHTS_FILE, self.state_tensors(), {"format": "pt"})
        atomic_write_json(path / CFG_FILE, _jsonable(self.cfg()))
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> SAE:
        """Load an SAE directory in SAELens's layout (any version) or EleutherAI's ``sparsify`` layout.

        ``dtype`` defaults to the cfg's dtype. Unknown architectures, normalisations or options that would
        change the encoding raise :class:`SAEError` instead of encoding wrongly.
        """
        path = Path(path)
        if path.is_file() and (path.name == CFG_FILE or path.suffix == ".safetensors"):
            path = path.parent
        if not path.is_dir():
            raise SAEError(f"no SAE directory at {path}: give a directory holding cfg.json and the weights file")
        cfg = _read_cfg(path)
        if (path / WEIGHTS_FILE).exists():
            return _from_saelens(path, cfg, device, dtype)
        if (path / EAI_WEIGHTS_FILE).exists():
            return _from_eleuther(path, cfg, device, dtype)
        raise SAEError(
            f"{path} has cfg.json but neither {WEIGHTS_FILE} (SAELens) nor {EAI_WEIGHTS_FILE} (EleutherAI): "
            "copy the weights file next to cfg.json"
        )

    @classmethod
    def from_tensors(cls, cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], **kwargs: Any) -> SAE:
        """Build an SAE from a SAELens-style cfg dict and its weight tensors (checked like a loaded file)."""
        return _build(dict(cfg), dict(tensors), "<tensors>", kwargs.get("device", "cpu"), kwargs.get("dtype"))


# ================================================================================================ loading


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


def _as_store(store: ActivationStore | str | os.PathLike) -> ActivationStore:
    return store if isinstance(store, ActivationStore) else ActivationStore(store)


def _as_sae(sae: SAE | str | os.PathLike) -> SAE:
    return sae if isinstance(sae, SAE) else SAE.load(sae)


def resolve_sae_hook(store: ActivationStore, sae: SAE, hook: str | int | None = None) -> str:
    """The store hook an SAE reads: ``hook`` if given, else the SAE's ``hook_name`` (aliases accepted), else
    the store's only hook; the SAE's ``d_in`` must match the store's width."""
    if hook is not None:
        name = store.resolve_hook(hook)
    elif sae.hook_name:
        try:
            name = store.resolve_hook(sae.hook_name)
        except HookError:
            raise HookError(
                f"the SAE reads hook {sae.hook_name!r}, which store {store.path} lacks (stored: "
                f"{', '.join(store.hooks[:6])}{', ...' if len(store.hooks) > 6 else ''}); pass hook=... (--hook)"
            ) from None
    elif len(store.hooks) == 1:
        name = store.hooks[0]
    else:
        raise HookError(f"the SAE names no hook and the store has {len(store.hooks)}; pass hook=... (--hook)")
    if sae.d_in != store.d_model:
        raise SAEError(
            f"SAE d_in={sae.d_in} does not match store hook {name} width {store.d_model}: use an SAE trained on"
            " this model and hook"
        )
    return name


_DONE = object()


def _prefetch(
    store: ActivationStore,
    hook: str,
    rows: Tensor | None,
    batch_size: int,
    progress: bool,
    desc: str,
    depth: int = 2,
    pin_memory: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(rows, activations)`` batches of one hook (all rows, or ``rows`` in that order), read by a background
    thread ``depth`` batches ahead, with a progress bar."""
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    order = torch.arange(len(store)) if rows is None else torch.as_tensor(rows, dtype=torch.int64).flatten()
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for start in range(0, order.numel(), batch_size):
                idx = order[start : start + batch_size]
                x = store.activations(hook, idx)
                item = (idx, x.pin_memory() if pin_memory else x)  # pinned: the copy to the GPU overlaps
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    total = int(order.numel())
    thread = threading.Thread(target=work, daemon=True, name="interp-prefetch")
    thread.start()
    bar = tqdm(total=total, desc=desc, unit="row", unit_scale=True, disable=not progress, leave=False)
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            bar.update(int(item[0].numel()))
            yield item
    finally:
        stop.set()
        bar.close()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


# ================================================================================================ metrics


@dataclass
class SAEMetrics:
    """Reconstruction quality of an SAE over store rows.

    ``mse``: mean over rows and dimensions of ``(x_hat - x)**2``; ``fve``: fraction of variance explained,
    ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``; ``l0``: mean number of active latents per row;
    ``n_dead``: latents that never fired on these rows; ``firing_frequency``: per latent, the fraction of
    rows it fired on.
    """

    mse: float
    fve: float
    l0: float
    n_dead: int
    dead_fraction: float
    n_rows: int
    firing_frequency: Float[Tensor, " d_sae"]
    hook: str
    store: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mse": self.mse,
            "fve": self.fve,
            "l0": self.l0,
            "n_dead": self.n_dead,
            "dead_fraction": self.dead_fraction,
            "n_rows": self.n_rows,
            "hook": self.hook,
            "store": self.store,
            **({"provenance": self.provenance} if self.provenance else {}),
        }

    def __str__(self) -> str:
        return (
            f"SAE on {self.hook} over {self.n_rows} rows: FVE {self.fve:.4f}, MSE {self.mse:.4g}, L0 {self.l0:.2f}, "
            f"dead {self.n_dead} ({100 * self.dead_fraction:.1f}%)"
        )

    def plot(self):
        """Histogram of log10 latent firing frequency (dead latents counted apart)."""
        from interp.plots import sae_feature_density

        model = (self.provenance.get("model") or {}).get("name", "") if self.provenance else ""
        where = f"{self.hook} of {model}" if model else self.hook
        return sae_feature_density(self.firing_frequency, title=f"SAE latent firing frequency at {where}")


def evaluate(
    sae: SAE | str | os.PathLike,
    store: ActivationStore | str | os.PathLike,
    hook: str | int | None = None,
    *,
    rows: Int[Tensor, " n"] | None = None,
    batch_size: int = 8192,
    progress: bool = True,
) -> SAEMetrics:
    """MSE, fraction of variance explained, L0 and dead latents of ``sae`` over a store, streamed in batches."""
    sae, store = _as_sae(sae), _as_store(store)
    hook = resolve_sae_hook(store, sae, hook)
    n = 0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
    sum_x2 = torch.zeros((), dtype=torch.float64)
    sum_err = torch.zeros((), dtype=torch.float64)
    sum_l0 = torch.zeros((), dtype=torch.float64)
    fires = torch.zeros(sae.d_sae, dtype=torch.int64)
    with torch.no_grad():
        for _, x in _prefetch(store, hook, rows, batch_size, progress, desc="evaluate"):
            x = x.to(sae.device, torch.float32)
            x_hat, f = sae.reconstruct(x)
            err = (x_hat.float() - x).pow(2).sum()
            if not torch.isfinite(err):
                raise AnalysisError(f"non-finite reconstruction error on hook {hook}: check the store and the SAE")
            active = f != 0
            n += x.shape[0]
            sum_x += x.sum(0).double().cpu()
            sum_x2 += x.double().pow(2).sum().cpu()
            sum_err += err.double().cpu()
            sum_l0 += active.sum().double().cpu()
            fires += active.sum(0).cpu()
    if n == 0:
        raise AnalysisError("no rows to evaluate the SAE on")
    total_var = sum_x2 - sum_x.pow(2).sum() / n
    fve = float(1 - sum_err / total_var) if total_var > 0 else float("nan")
    n_dead = int((fires == 0).sum())
    return SAEMetrics(
        mse=float(sum_err / (n * sae.d_in)),
        fve=fve,
        l0=float(sum_l0 / n),
        n_dead=n_dead,
        dead_fraction=n_dead / sae.d_sae,
        n_rows=n,
        firing_frequency=(fires.double() / n).float(),
        hook=hook,
        store=str(store.path),
        provenance={"sae": repr(sae), "model": store.model_info},
    )


# ================================================================================================ training


def _geometric_median(X: Tensor, iters: int = 64, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's iterations, started from the mean."""
    m = X.mean(0)
    for _ in range(iters):
        w = 1.0 / (X - m).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * X).sum(0) / w.sum()
        if (new - m).norm() <= tol * max(1.0, float(m.norm())):
            return new
        m = new
    return m


def _epoch_order(rows: Tensor, epoch: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return rows[torch.randperm(rows.numel(), generator=g)]


def _lr_at(step: int, cfg: Mapping[str, Any]) -> float:
    total, warm, decay = cfg["total_steps"], cfg["warmup_steps"], cfg["decay_frac"]
    scale = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    start_decay = total * (1 - decay)
    if decay > 0 and step >= start_decay:
        scale *= max(0.0, (total - step) / (total * decay))
    return cfg["lr"] * scale


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    root = out / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(r"step_(\d+)", p.name)
            if m and (p / TRAINING_STATE).exists():
                found.append((int(m.group(1)), p))
    return sorted(found)


_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _save_checkpoint(
    path: Path, sae: SAE, opt: torch.optim.Optimizer, since_fired: Tensor, state: dict[str, Any]
) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    sae.save(tmp)
    tensors: dict[str, Tensor] = {"since_fired": since_fired}
    for name in _PARAMS:
        st = opt.state.get(getattr(sae, name), {})
        if st:
            tensors[f"exp_avg.{name}"] = st["exp_avg"]
            tensors[f"exp_avg_sq.{name}"] = st["exp_avg_sq"]
            tensors[f"step.{name}"] = torch.as_tensor(st["step"]).float().reshape(1)
    save_tensors(tmp / OPTIMIZER_STATE, tensors, {"format": "pt"})
    atomic_write_json(tmp / TRAINING_STATE, _jsonable(state))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _load_checkpoint(
    path: Path, device: Any
) -> tuple[SAE, dict[str, Tensor], dict[str, Any]]:
    try:
        state = json.loads((path / TRAINING_STATE).read_text())
    except (OSError, ValueError) as e:
        raise SAEError(f"checkpoint {path} has a damaged {TRAINING_STATE} ({e}); delete that checkpoint") from None
    sae = SAE.load(path, device=device, dtype=torch.float32)
    opt_tensors = _read_weights(path / OPTIMIZER_STATE) if (path / OPTIMIZER_STATE).exists() else {}
    if "since_fired" not in opt_tensors:
        raise SAEError(
            f"checkpoint {path} lacks {OPTIMIZER_STATE}; delete that checkpoint to resume from an earlier one"
        )
    return sae, opt_tensors, state


def train_topk_sae(
    store: ActivationStore | str | os.PathLike,
    hook: str | int,
    d_sae: int,
    k: int,
    *,
    out_dir: str | os.PathLike | None = None,
    n_tokens: int | None = None,
    n_steps: int | None = None,
    batch_size: int = 4096,
    lr: float | None = None,
    warmup_steps: int | None = None,
    decay_frac: float = 0.2,
    aux_k: int | None = None,
    aux_coef: float = 1 / 32,
    dead_after_tokens: int | None = None,
    rows: Int[Tensor, " n"] | None = None,
    seed: int = 0,
    checkpoint_every: int = 1000,
    keep_checkpoints: int | None = 3,
    log_every: int = 50,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SAE:
    """Train a TopK sparse autoencoder (Gao et al. 2024) on one hook of a store; returns the trained SAE.

    Batches are streamed from the store in a seeded random order (a new permutation each pass over ``rows``,
    default all rows). Loss: normalised MSE ``||x - x_hat||^2 / ||x - mean(x)||^2`` per batch, plus
    ``aux_coef`` times the AuxK loss, in which latents that have not fired for ``dead_after_tokens`` rows
    (default: one pass over the rows, at least 20 batches, at most 10M) reconstruct the residual with their
    top ``aux_k`` (default ``d_in // 2``) pre-activations. ``b_dec`` starts at the geometric median of a
    sample; decoder rows are kept unit-norm and their gradient's parallel component removed; Adam, with
    linear warm-up and a linear decay over the last ``decay_frac`` of the steps; ``lr`` defaults to
    ``2e-4 / sqrt(d_sae / 2**14)``. Steps: ``n_steps``, else ``ceil(n_tokens / batch_size)`` (default
    ``n_tokens`` = max(2M, one pass)).

    With ``out_dir``, a checkpoint (SAELens layout + ``training_state.json`` + ``optimizer.safetensors``) is
    written to ``out_dir/checkpoints/step_NNNNNN`` every ``checkpoint_every`` steps (the last
    ``keep_checkpoints`` kept), and the final SAE to ``out_dir``. ``resume=True`` continues from the latest
    checkpoint and reproduces an uninterrupted run bit for bit on the same machine and thread count.
    """
    from tqdm.auto import tqdm

    store = _as_store(store)
    device = resolve_device(device)
    hook = store.resolve_hook(hook)
    d_in, d_sae, k = store.d_model, int(d_sae), int(k)
    if d_sae <= 0 or not 0 < k <= d_sae:
        raise ConfigError(f"need d_sae > 0 and 0 < k <= d_sae, got d_sae={d_sae}, k={k}")
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    rows_t = torch.arange(len(store)) if rows is None else torch.as_tensor(rows, dtype=torch.int64).flatten()
    n = int(rows_t.numel())
    if n < batch_size:
        raise ConfigError(f"{n} training rows is fewer than one batch of {batch_size}: lower batch_size (--batch-size)")
    steps_per_epoch = n // batch_size
    if n_steps is None:
        n_tokens = max(2_000_000, n) if n_tokens is None else int(n_tokens)
        n_steps = math.ceil(n_tokens / batch_size)
    total = int(n_steps)
    if total <= 0:
        raise ConfigError(f"the number of training steps must be positive, got {total}")
    import hashlib

    cfg: dict[str, Any] = {
        "hook": hook,
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "batch_size": int(batch_size),
        "total_steps": total,
        "lr": float(lr) if lr is not None else 2e-4 / math.sqrt(d_sae / 2**14),
        "warmup_steps": int(warmup_steps) if warmup_steps is not None else min(1000, total // 20),
        "decay_frac": float(decay_frac),
        "aux_k": int(aux_k) if aux_k is not None else max(1, min(d_in // 2, d_sae)),
        "aux_coef": float(aux_coef),
        "dead_after_tokens": int(dead_after_tokens) if dead_after_tokens else min(10_000_000, max(n, 20 * batch_size)),
        "seed": int(seed),
        "n_rows": n,
        "rows_sha256": hashlib.sha256(rows_t.numpy().tobytes()).hexdigest(),
    }
    out = Path(out_dir) if out_dir is not None else None
    start_from: Path | None = None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise SAEError(f"{out} is a file: choose a directory for --out")
        started = out.is_dir() and ((out / CFG_FILE).exists() or bool(_checkpoints(out)))
        if started and not resume:
            raise SAEError(
                f"{out} already holds an SAE training run: pass resume=True (--resume) or choose a new --out"
            )
        if started and resume:
            final = out / TRAINING_STATE
            if final.exists() and (out / WEIGHTS_FILE).exists():
                done = json.loads(final.read_text())
                _check_same_config(done.get("config", {}), cfg, out)
                if done.get("step") == total:
                    return SAE.load(out, device=device, dtype=torch.float32)
            ckpts = _checkpoints(out)
            start_from = ckpts[-1][1] if ckpts else None
        out.mkdir(parents=True, exist_ok=True)

    metadata = {
        "model_name": store.model_info.get("name"),
        "hook_name": hook,
        "hook_head_index": None,
        "prepend_bos": True,
        "context_size": None,
        "dataset_path": str(store.path),
        "interp": {
            "trained_by": "interp.sae.train_topk_sae",
            "store": str(store.path),
            "hook": hook,
            "positions": store.positions,
            "model": store.model_info,
            "dataset": store.manifest.get("dataset", {}),
        },
    }
    since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
    history: list[dict[str, Any]] = []
    step = 0
    if start_from is not None:
        sae, opt_tensors, state = _load_checkpoint(start_from, device)
        _check_same_config(state.get("config", {}), cfg, start_from)
        step, history = int(state["step"]), list(state.get("history", []))
        since_fired = opt_tensors["since_fired"].to(device)
    else:
        sae = SAE(d_in, d_sae, "topk", k=k, metadata=metadata, seed=seed, device=device)
        sample = torch.sort(_epoch_order(rows_t, -1, seed)[: min(n, 16384)]).values
        with torch.no_grad():
            sae.b_dec.copy_(_geometric_median(store.activations(hook, sample).float().to(device)))
        opt_tensors = {}
    params = [getattr(sae, name) for name in _PARAMS]
    opt = torch.optim.Adam(params, lr=cfg["lr"], betas=(0.9, 0.999), eps=6.25e-10)
    for name, p in zip(_PARAMS, params):
        if f"exp_avg.{name}" in opt_tensors:
            opt.state[p] = {
                "step": opt_tensors[f"step.{name}"].reshape(()).float(),
                "exp_avg": opt_tensors[f"exp_avg.{name}"].to(device, torch.float32),
                "exp_avg_sq": opt_tensors[f"exp_avg_sq.{name}"].to(device, torch.float32),
            }

    def state_dict(at: int) -> dict[str, Any]:
        return {"step": at, "config": cfg, "history": history, "store": str(store.path)}

    bar = tqdm(total=total, initial=step, desc=f"train SAE {hook}", unit="step", disable=not progress)
    try:
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            order = _epoch_order(rows_t, epoch, seed)[offset * batch_size : steps_per_epoch * batch_size]
            order = order.view(-1, batch_size).sort(dim=1).values.flatten()  # same batches, read in disk order
            batches = _prefetch(store, hook, order, batch_size, False, desc="batches")
            try:
                for _, x in batches:
                    x = x.to(device, torch.float32)
                    fvu, aux, n_dead = _train_step(sae, opt, x, since_fired, cfg, _lr_at(step, cfg))
                    step += 1
                    bar.update(1)
                    if step % max(1, log_every) == 0 or step == total:
                        history.append({"step": step, "fvu": fvu, "aux": aux, "n_dead": n_dead})
                        bar.set_postfix(fvu=f"{fvu:.4f}", dead=n_dead)
                    if out is not None and step < total and checkpoint_every and step % checkpoint_every == 0:
                        _save_checkpoint(
                            out / "checkpoints" / f"step_{step:06d}", sae, opt, since_fired, state_dict(step)
                        )
                        _prune(out, keep_checkpoints)
                    if step >= total:
                        break
            finally:
                batches.close()
    finally:
        bar.close()
    sae.metadata.setdefault("interp", {})["training"] = {k_: v for k_, v in cfg.items() if k_ != "rows_sha256"}
    if out is not None:
        sae.save(out)
        atomic_write_json(out / TRAINING_STATE, _jsonable(state_dict(step)))
    sae.history_ = history
    return sae


def _check_same_config(old: Mapping[str, Any], new: Mapping[str, Any], where: Path) -> None:
    diff = [f"{key}: {old.get(key)!r} there vs {new[key]!r} now" for key in new if old.get(key) != new[key]]
    if diff:
        raise SAEError(
            f"cannot resume {where}: it was trained with other settings ({'; '.join(diff)}); use the same settings"
            " or a new --out"
        )


def _prune(out: Path, keep: int | None) -> None:
    if keep is None or keep <= 0:
        return
    for _, p in _checkpoints(out)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _train_step(
    sae: SAE, opt: torch.optim.Optimizer, x: Tensor, since_fired: Tensor, cfg: Mapping[str, Any], lr: float
) -> tuple[float, float, int]:
    """One Adam step on a batch: normalised MSE + AuxK on dead latents; decoder rows kept unit-norm."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(cfg["k"], dim=-1, sorted=False)
    f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    x_hat = f @ sae.W_dec + sae.b_dec
    err = x_hat - x
    total_var = (x - x.mean(0)).pow(2).sum()
    if not total_var > 0:
        raise AnalysisError("a training batch has zero variance (constant activations): check the store's hook")
    fvu = err.pow(2).sum() / total_var
    loss = fvu
    dead = since_fired >= cfg["dead_after_tokens"]
    n_dead = int(dead.sum())
    aux_value = 0.0
    if n_dead and cfg["aux_coef"] > 0:
        k_aux = min(cfg["aux_k"], n_dead)
        avals, aidx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        e_hat = torch.zeros_like(pre).scatter(-1, aidx, torch.relu(avals)) @ sae.W_dec
        aux = (e_hat + err.detach()).pow(2).sum() / total_var * min(1.0, n_dead / cfg["aux_k"])
        loss = loss + cfg["aux_coef"] * aux
        aux_value = float(aux.detach())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        W, g = sae.W_dec, sae.W_dec.grad
        g -= (g * W).sum(-1, keepdim=True) * W
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        W /= W.norm(dim=-1, keepdim=True)
        fired = (f > 0).any(0)
        since_fired += x.shape[0]
        since_fired[fired] = 0
    return float(fvu.detach()), aux_value, n_dead


# ================================================================================================ top activations


def _store_tokenizer(store: ActivationStore, tokenizer: Any) -> Any:
    """``tokenizer="auto"``: the tokenizer saved next to the store's model, when it is a local directory."""
    if tokenizer != "auto":
        return getattr(tokenizer, "tokenizer", tokenizer)  # a model that carries its tokenizer
    path = (store.model_info or {}).get("path")
    if not path or not Path(path).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # no tokenizer files there: token strings are left out
        return None


def top_activations(
    store: ActivationStore | str | os.PathLike,
    sae: SAE | str | os.PathLike,
    latents: int | Sequence[int],
    *,
    hook: str | int | None = None,
    n: int = 20,
    rows: Int[Tensor, " n"] | None = None,
    tokenizer: Any = "auto",
    batch_size: int = 8192,
    progress: bool = True,
):
    """The ``n`` store rows on which each of ``latents`` fires most strongly: what a latent responds to.

    Returns a ``pandas.DataFrame`` with one row per latent and rank: ``latent``, ``rank``, ``activation``,
    ``row`` (store row), ``example_id``, ``position`` (token index, -1 for mean-pooled rows), ``token_id``,
    ``token`` (when a tokenizer is known: ``"auto"`` loads the one saved with the store's model directory; pass
    a tokenizer or a model to choose, ``None`` for none), ``text`` and ``label`` (the example's, when present).
    Rows where a latent is zero are never listed, so a rarely firing latent can have fewer than ``n``.
    One pass over the store (or ``rows``), streamed in batches.
    """
    import pandas as pd

    store, sae = _as_store(store), _as_sae(sae)
    hook = resolve_sae_hook(store, sae, hook)
    try:  # an int, a list of them, or a tensor / array of latent ids (such as comparison.ranking[:5])
        ids = [int(v) for v in torch.as_tensor(latents).flatten().tolist()]
        if torch.as_tensor(latents).is_floating_point():
            raise TypeError
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"latents must be integer latent ids, got {latents!r}") from None
    if not ids:
        raise ConfigError("give at least one latent")
    bad = [v for v in ids if not 0 <= v < sae.d_sae]
    if bad:
        raise ConfigError(f"latents {bad} are outside 0..{sae.d_sae - 1}")
    if n <= 0:
        raise ConfigError(f"n must be positive, got {n}")
    cols = torch.tensor(ids, dtype=torch.int64)
    best_v = torch.full((len(ids), 0), float("-inf"))
    best_r = torch.zeros((len(ids), 0), dtype=torch.int64)
    for rows_b, f in sae.iter_encode(store, hook, rows=rows, batch_size=batch_size, progress=progress):
        a = f[:, cols.to(f.device)].float().cpu().T  # [L, b]
        v = torch.cat([best_v, a], 1)
        r = torch.cat([best_r, rows_b.expand(len(ids), -1)], 1)
        top = v.topk(min(n, v.shape[1]), dim=1)
        best_v, best_r = top.values, r.gather(1, top.indices)
    tok = _store_tokenizer(store, tokenizer)
    examples = store.examples()
    ex_ids, positions, token_ids = store.example_ids(), store.token_positions(), store.token_ids()
    records = []
    for i, latent in enumerate(ids):
        for rank, (value, row) in enumerate(zip(best_v[i].tolist(), best_r[i].tolist())):
            if not value > 0:
                break
            ex = examples[int(ex_ids[row])]
            t_id = int(token_ids[row])
            rec = {"latent": latent, "rank": rank, "activation": value, "row": row, "example_id": int(ex_ids[row]),
                   "position": int(positions[row]), "token_id": t_id}  # fmt: skip
            if tok is not None and t_id >= 0:
                rec["token"] = tok.convert_ids_to_tokens(t_id)
            rec["text"] = ex.get("text")
            if "label" in ex:
                rec["label"] = ex["label"]
            records.append(rec)
    return pd.DataFrame.from_records(records)
