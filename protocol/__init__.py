"""quicksilver wire protocol v1: frames, codecs, topics and errors. Pure; no I/O, no asyncio."""

from .codec import (
    SUBPROTOCOL_JSON,
    SUBPROTOCOL_MSGPACK,
    SUBPROTOCOLS,
    Encoding,
    decode_client,
    decode_server,
    encode,
)
from .errors import ProtocolError
from .topics import Pattern, Topic, covers, matches, parse_pattern, parse_topic

__all__ = [
    "SUBPROTOCOLS",
    "SUBPROTOCOL_JSON",
    "SUBPROTOCOL_MSGPACK",
    "Encoding",
    "Pattern",
    "ProtocolError",
    "Topic",
    "covers",
    "decode_client",
    "decode_server",
    "encode",
    "matches",
    "parse_pattern",
    "parse_topic",
]
