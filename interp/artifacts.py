"""Saved results (probes, sweeps, directions, INLP results, detectors, SAE states): safetensors + JSON only.

Each artifact is a directory with a JSON file that names its ``format`` and ``version`` and a safetensors file
of its tensors. These helpers write them atomically and read them back with one-line errors that name the
file and say what to do; nothing else (no pickle) is ever loaded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interp.errors import InterpError
from interp.store import atomic_write_bytes


def jsonable(obj: Any) -> Any:
    """A value JSON can hold, recursively: tensor / numpy scalars become numbers, non-finite floats ``None``,
    paths and dtypes strings, tuples lists, mapping keys strings."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, (Path, torch.dtype)):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, int):
        return obj
    return str(obj)


def save_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Write ``tensors`` as one safetensors file, atomically; returns the bytes written (to hash if wanted)."""
    from safetensors.torch import save

    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=dict(metadata or {}))
    atomic_write_bytes(Path(path), data)
    return data


def load_tensors(path: Path, what: str, error: type[InterpError] = InterpError) -> dict[str, Tensor]:
    """Read a safetensors file of a saved ``what``; a missing or damaged file is ``error`` naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise error(f"{path} is missing: {path.parent} is not a saved {what} (or it is incomplete); save it again")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise error(f"{path} is damaged ({e}); save the {what} again") from None


def load_json(
    path: Path, fmt: str, version: int, what: str, error: type[InterpError] = InterpError
) -> dict[str, Any]:
    """Read an artifact's JSON file and check its ``format`` and ``version``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} is missing: {path.parent} is not a saved {what} (or it is incomplete); save it again")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path} is damaged ({e}); save the {what} again") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else "?"
        raise error(f"{path} is not a saved {what} (format {found!r}, expected {fmt!r})")
    if meta.get("version") != version:
        raise error(f"{path} is {what} format version {meta.get('version')}; this interp reads version {version}")
    return meta
