"""Taps: subscribers inside the broker process (Mercury routes, webhooks).

A :class:`Tap` sits in the hub's subscription index like a connection: the fan-out path appends
the pre-encoded frame of each matching message to its ``pending`` list and calls its ``flush`` at
the end of the loop iteration, exactly as for a WebSocket client. ``flush`` decodes the frames
back into :class:`TapMessage` values and hands them, in order, to the tap's callback. A tap asks
for msgpack frames (cheaper to decode than JSON) but reads JSON frames too.

Limits and failure behaviour: a tap holds what one loop iteration delivered, never more; a frame
that cannot be decoded is logged and skipped; a callback that raises is logged and the tap stays
subscribed. Callbacks run in the event loop and must not block.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger("quicksilver.taps")

_OP_TEXT = 0x1
_OP_BINARY = 0x2


@dataclass(frozen=True, slots=True)
class TapMessage:
    """One message as a subscriber sees it."""

    topic: str
    offset: int
    epoch: str
    ts: float
    data: Any


def decode_frame(raw: bytes) -> TapMessage:
    """The message inside one server ``message`` frame (RFC 6455 section 5.2, unmasked).

    Raises ValueError for anything that is not a complete text or binary frame holding a
    ``message`` object.
    """
    if len(raw) < 2:
        raise ValueError("frame too short")
    opcode = raw[0] & 0x0F
    size = raw[1] & 0x7F
    start = 2 if size < 126 else 4 if size == 126 else 10
    payload = raw[start:]
    if opcode == _OP_BINARY:
        message = msgpack.unpackb(payload, raw=False)
    elif opcode == _OP_TEXT:
        message = json.loads(payload)
    else:
        raise ValueError(f"not a data frame (opcode {opcode})")
    if not isinstance(message, dict) or message.get("type") != "message":
        raise ValueError("frame does not hold a message")
    return TapMessage(
        topic=message["topic"],
        offset=message["offset"],
        epoch=message["epoch"],
        ts=message["ts"],
        data=message.get("data"),
    )


class Tap:
    """One in-process subscription to ``pattern``; ``callback`` gets each flushed batch.

    Create with :meth:`open`, end with :meth:`close` (idempotent). While open, the tap counts as
    one entry of the hub's subscription index.
    """

    __slots__ = ("callback", "hub", "msgpack", "pattern", "pending")

    def __init__(
        self, hub: Hub, pattern: str, callback: Callable[[list[TapMessage]], None]
    ) -> None:
        self.hub = hub
        self.pattern = pattern
        self.callback = callback
        self.msgpack = True
        #: Frames waiting for the next flush; None once closed (the hub then skips the tap).
        self.pending: list[bytes] | None = []

    @classmethod
    def open(cls, hub: Hub, pattern: str, callback: Callable[[list[TapMessage]], None]) -> Tap:
        tap = cls(hub, pattern, callback)
        hub.index.add(pattern, tap)
        return tap

    def close(self) -> None:
        if self.pending is None:
            return
        self.pending = None
        self.hub.index.remove(self.pattern, self)

    @property
    def closed(self) -> bool:
        return self.pending is None

    def flush(self) -> None:
        frames = self.pending
        if not frames:
            return
        self.pending = []
        messages: list[TapMessage] = []
        for raw in frames:
            try:
                messages.append(decode_frame(raw))
            except Exception:
                log.exception("tap on %r could not decode a frame", self.pattern)
        if not messages:
            return
        try:
            self.callback(messages)
        except Exception:
            log.exception("tap on %r failed", self.pattern)
