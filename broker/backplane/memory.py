"""The in-process backplane: one node, envelopes delivered synchronously."""

from __future__ import annotations

from .base import Backplane, Deliver, Envelope


class MemoryBackplane(Backplane):
    """Delivers each envelope to this process's own subscribers, in the caller's turn."""

    def __init__(self) -> None:
        self._deliver: Deliver | None = None

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def publish(self, envelope: Envelope) -> None:
        if self._deliver is not None:
            self._deliver(envelope)

    async def close(self) -> None:
        self._deliver = None
