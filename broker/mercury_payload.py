"""How Mercury's raw WebSocket messages map to quicksilver's portable ``data`` and back.

Mercury passes frames through untouched; quicksilver's ``data`` must mean the same in JSON and
msgpack. The mapping (the same in both directions, so Mercury-to-Mercury traffic is byte-exact):

=========================================  =========================================
Mercury message                            native ``data``
=========================================  =========================================
text frame (or a POST body that is UTF-8)  the text as a string, unparsed
binary frame (or a non-UTF-8 POST body,    ``{"base64": "<standard base64>"}``
or ``Content-Type:
application/octet-stream``)
=========================================  =========================================

Native data reaches Mercury clients as: a string → a text frame with that string; an object
whose only key is ``"base64"`` with valid base64 → a binary frame with the decoded bytes;
anything else → a text frame with the value as compact JSON (UTF-8, no ``\\u`` escapes).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

Payload = str | bytes
"""A Mercury message: text (str) or binary (bytes)."""

BINARY_KEY = "base64"


def to_data(payload: Payload) -> Any:
    """Native ``data`` for a Mercury message."""
    if isinstance(payload, str):
        return payload
    return {BINARY_KEY: base64.b64encode(payload).decode("ascii")}


def from_data(data: Any) -> Payload:
    """The Mercury message for native ``data`` (never raises for a portable value)."""
    if isinstance(data, str):
        return data
    if isinstance(data, dict) and len(data) == 1:
        encoded = data.get(BINARY_KEY)
        if isinstance(encoded, str):
            try:
                return base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                pass
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def from_body(body: bytes, content_type: str | None) -> Payload:
    """The Mercury message for a POSTed body: text when it is UTF-8, else binary.

    ``Content-Type: application/octet-stream`` always means binary.
    """
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media == "application/octet-stream":
            return body
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body
