"""Every error a user can act on is an :class:`InterpError`.

Messages are one line: what is wrong, then what to do about it. The CLI prints ``error: <message>`` and
exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InterpError(Exception):
    """Base class: an error caused by input the user can fix."""


class ConfigError(InterpError):
    """A bad argument: unknown dtype, position policy, backend, ..."""


class ModelLoadError(InterpError):
    """A model could not be found or booted."""


class HookError(InterpError):
    """A hook name or layer that the model or store does not have."""


class DatasetError(InterpError):
    """A dataset file or row that cannot be used."""


class StoreError(InterpError):
    """An activation store that cannot be opened or written."""


class StoreCorruptError(StoreError):
    """A shard or manifest whose bytes are damaged."""


class StoreLockedError(StoreError):
    """Another writer holds the store's lock."""


class AnalysisError(InterpError):
    """Data that an analysis cannot work on (one class, NaN activations, missing label...)."""


class SteeringError(InterpError):
    """An intervention that cannot be applied to this model."""


class SAEError(InterpError):
    """A sparse autoencoder that cannot be loaded, saved or applied."""


class DetectorError(InterpError):
    """A detector that cannot be loaded or applied."""


class RankFailedError(InterpError):
    """Another rank of a distributed job failed; the message names the rank and its error."""


def close_matches(name: str, options: Iterable[str], n: int = 5) -> str:
    """A short ``did you mean ...`` phrase listing the options closest to ``name`` (or a few of them)."""
    options = list(dict.fromkeys(str(o) for o in options))
    near = difflib.get_close_matches(str(name), options, n=n, cutoff=0.5)
    if not near:
        near = options[:n]
        return "valid names include: " + ", ".join(near) + (", ..." if len(options) > n else "")
    return "did you mean: " + ", ".join(near) + "?"
