"""The SAE module: SAELens parameters and formulas (standard, TopK, JumpReLU), save in SAELens 6 layout."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from interp.artifacts import jsonable as _jsonable
from interp.artifacts import save_tensors
from interp.devices import resolve_device
from interp.errors import ConfigError, SAEError
from interp.sae.streaming import _as_store, _prefetch, resolve_sae_hook
from interp.store import ActivationStore, atomic_write_json
from jaxtyping import Float, Int
from torch import Tensor, nn

if TYPE_CHECKING:
    from interp.sae.evaluation import SAEMetrics



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
        from interp.sae.evaluation import evaluate

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
        from interp.sae.formats import _from_eleuther, _from_saelens, _read_cfg  # the readers build SAEs

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
        from interp.sae.formats import _build

        return _build(dict(cfg), dict(tensors), "<tensors>", kwargs.get("device", "cpu"), kwargs.get("dtype"))


# ================================================================================================ loading
