"""Checked device names, shared by every entry point that takes ``device=``.

A device this machine does not have (``cuda`` on a CPU-only torch, ``cuda:3`` with two GPUs) is a one-line
:class:`~interp.errors.ConfigError` that says what exists, instead of an assertion deep inside torch.
"""

from __future__ import annotations

from typing import Any

import torch

from interp.errors import ConfigError


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_devices() -> list[str]:
    """The devices this process can use, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve_device(device: Any, default: torch.device | str | None = None) -> torch.device:
    """``device`` as a ``torch.device`` that exists here; ``None`` gives ``default`` (else :func:`default_device`)."""
    if device is None:
        return torch.device(default) if default is not None else default_device()
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip())
        except (RuntimeError, ValueError):
            raise ConfigError(
                f"unknown device {device!r}; use one of {', '.join(available_devices())} (or cuda:N)"
            ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(
                f"device {str(device)!r} asked for, but {build} (torch {torch.__version__}); use device='cpu'"
                " or run where a GPU is available"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device {str(device)!r} does not exist: {n} GPU(s) visible (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {str(device)!r} asked for, but MPS is not available here; use device='cpu'")
    elif dev.type not in ("cpu", "meta"):
        raise ConfigError(f"device type {dev.type!r} is not supported; use one of {', '.join(available_devices())}")
    return dev
