"""Mercury's ``allow_origin`` list: which browser ``Origin`` may use the Mercury routes.

Mercury matches each entry, with ``*`` as a wildcard, anywhere inside the ``Origin`` header; its
documentation promises that each of these entries admits ``http://www.example.com:3000``::

    example.com
    *.example.com
    *://www.example.com
    http://www.example.com:*

Here the same entries are read as ``[scheme://]host[:port]`` and compared part by part, anchored,
so ``example.com`` no longer admits ``http://example.com.attacker.net`` as a substring match did:

- scheme: the entry's scheme (``*`` wildcards allowed), any scheme when the entry has none;
- host: matched whole (``*`` matches any run of characters); an entry host without a wildcard also
  admits its subdomains (``example.com`` admits ``www.example.com``, not ``badexample.com``);
- port: any port when the entry names none or ``*``; otherwise equal to the Origin's port (the
  scheme's default port when the Origin has none).

``*`` alone admits every origin. Scheme and host compare case-insensitively. An entry that cannot
be read raises :class:`protocol.errors.UsageError` at construction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.errors import UsageError

__all__ = ["MercuryOrigins"]

_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
_ENTRY = re.compile(
    r"(?:(?P<scheme>[A-Za-z*][A-Za-z0-9+.\-*]*)://)?"
    r"(?P<host>\[[0-9A-Fa-f:.*]+\]|[^:/\[\]]+)"
    r"(?::(?P<port>[0-9]{1,5}|\*))?/?\Z"
)
_ORIGIN = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\[\]@?#]+)"
    r"(?::(?P<port>[0-9]{1,5}))?/?\Z"
)


def _glob(text: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in text.split("*")) + r"\Z", re.I)


@dataclass(frozen=True, slots=True)
class _Entry:
    scheme: re.Pattern[str] | None
    host: re.Pattern[str]
    #: A literal host (no wildcard): subdomains are admitted too.
    domain: str | None
    port: str | None

    def admits(self, scheme: str, host: str, port: str) -> bool:
        if self.scheme is not None and not self.scheme.match(scheme):
            return False
        if self.port is not None and self.port != port:
            return False
        if self.domain is not None:
            return host == self.domain or host.endswith("." + self.domain)
        return self.host.match(host) is not None


class MercuryOrigins:
    """An ``allow_origin`` list. Immutable; ``allows`` never raises."""

    __slots__ = ("_allow_all", "_entries", "entries")

    def __init__(self, entries: Sequence[str]) -> None:
        if isinstance(entries, str):
            raise UsageError("allow_origin is a sequence of entries, not one string")
        self.entries = tuple(e.strip() for e in entries if e.strip())
        self._allow_all = "*" in self.entries
        parsed: list[_Entry] = []
        for entry in self.entries:
            if entry == "*":
                continue
            m = _ENTRY.match(entry)
            if m is None:
                raise UsageError(
                    f"invalid allow_origin entry {entry!r}: expected [scheme://]host[:port], "
                    "with '*' as a wildcard"
                )
            scheme, host, port = m["scheme"], m["host"].lower(), m["port"]
            parsed.append(
                _Entry(
                    scheme=None if scheme is None or scheme == "*" else _glob(scheme),
                    host=_glob(host),
                    domain=None if "*" in host else host,
                    port=None if port is None or port == "*" else str(int(port)),
                )
            )
        self._entries = tuple(parsed)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def allows(self, origin: str | None) -> bool:
        """Does the list admit this ``Origin`` header? A missing header is never admitted."""
        if origin is None or not origin.strip():
            return False
        if self._allow_all:
            return True
        m = _ORIGIN.match(origin.strip())
        if m is None:
            return False
        scheme = m["scheme"].lower()
        host = m["host"].lower()
        port = str(int(m["port"])) if m["port"] else _DEFAULT_PORTS.get(scheme, "")
        return any(entry.admits(scheme, host, port) for entry in self._entries)

    def __repr__(self) -> str:
        return f"MercuryOrigins({list(self.entries)!r})"
