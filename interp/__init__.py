"""interp: activations are data. Capture them once into a store; probe, steer and detect from there."""

from interp.errors import InterpError
from interp.store import ActivationStore, StoreWriter

__all__ = ["ActivationStore", "InterpError", "StoreWriter"]
__version__ = "0.1.0"
