"""quicksilver: an authenticated real-time WebSocket broker with a durable job queue.

This package holds the Python client (:class:`Client`) and the ``quicksilver`` command line.
"""

__version__ = "0.1.0"

from .client import Client, Subscription

__all__ = ["Client", "Subscription", "__version__"]
