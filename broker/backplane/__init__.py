"""How a message published on one broker node reaches subscribers on the others."""

from .base import Backplane, Envelope
from .memory import MemoryBackplane

__all__ = ["Backplane", "Envelope", "MemoryBackplane"]
