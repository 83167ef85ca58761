"""The worker runtime behind ``quicksilver worker`` and the built-in job handlers."""

from .registry import JobContext, PermanentFailure, handler, registry

__all__ = ["JobContext", "PermanentFailure", "handler", "registry"]
