"""The quicksilver broker: connections, fan-out, jobs, stores, backplanes and the HTTP API."""

__version__ = "0.1.0"
