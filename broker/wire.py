"""Server-side WebSocket framing for the fan-out path (RFC 6455 section 5.2).

Frames from a server are never masked, so one frame's bytes are the same for every recipient:
they are built once per message and written to every transport as they are.
"""

from __future__ import annotations

import struct

OP_TEXT = 0x1
OP_BINARY = 0x2

_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack


def frame(payload: bytes, opcode: int) -> bytes:
    """One final, unmasked data frame carrying ``payload``."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return _pack_short(first, 126, n) + payload
    return _pack_long(first, 127, n) + payload


def text_frame(payload: bytes) -> bytes:
    return frame(payload, OP_TEXT)


def binary_frame(payload: bytes) -> bytes:
    return frame(payload, OP_BINARY)
