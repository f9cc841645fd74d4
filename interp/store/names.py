"""Names a store uses: dtypes (``"float16"`` <-> ``torch.float16``) and hook names (classic aliases -> TL4)."""

from __future__ import annotations

import re

import torch

from interp.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_from_name(name: str | torch.dtype) -> tuple[str, torch.dtype]:
    """``"float16"`` / ``torch.float16`` -> ``("float16", torch.float16)``; anything else is a ConfigError."""
    if isinstance(name, torch.dtype):
        for k, v in DTYPES.items():
            if v == name:
                return k, v
        name = str(name)
    key = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}.get(
        str(name).replace("torch.", ""), str(name).replace("torch.", "")
    )
    if key not in DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}: use one of {', '.join(DTYPES)}")
    return key, DTYPES[key]


_STATIC_ALIASES = [  # classic HookedTransformer names -> TransformerLens 4 canonical names
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), r"blocks.\1.hook_out"),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), r"blocks.\1.hook_in"),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), r"blocks.\1.attn.hook_out"),
]
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def layer_of(hook: str) -> int | None:
    """The block index a hook name belongs to (``blocks.4.hook_out`` -> 4), or None."""
    m = _LAYER_RE.match(hook)
    return int(m.group(1)) if m else None


def static_canonical(name: str) -> str:
    """Map the classic aliases that mean the same in every architecture to their canonical names."""
    for pattern, repl in _STATIC_ALIASES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name
