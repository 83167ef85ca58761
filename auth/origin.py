"""Browser ``Origin`` checks for the WebSocket handshake (cross-site WebSocket hijacking defence).

A browser sends ``Origin: scheme://host[:port]`` with every WebSocket handshake; a page on
another site must not be able to open a connection that rides on the user's credentials.
Programs that are not browsers send no ``Origin`` and are always allowed: they authenticate
with a token anyway.

Allowed-list entries::

    *                          every origin, "null" included
    null                       the opaque origin of sandboxed iframes and file:// pages
    https://app.example.com    exactly this origin (default port implied)
    http://localhost:3000      exactly this origin and port
    https://*.example.com      any subdomain of example.com over https (not example.com itself)

Scheme and host compare case-insensitively; ``:80`` for http/ws and ``:443`` for https/wss equal
no port. Same-origin (the Origin's host and port equal the request's ``Host`` header) is always
allowed. The scheme is not part of that comparison, so same-origin still works behind a proxy that
terminates TLS and forwards plain HTTP.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.errors import UsageError

__all__ = ["OriginPolicy"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*\Z")
# RFC 3986 reg-name characters; IPv6 literals are handled separately.
_HOST = re.compile(r"[a-z0-9\-._~!$&'()+,;=%]+\Z")
_IPV6 = re.compile(r"\[[0-9a-f:.]+\]\Z")


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    #: None when the port is the scheme's default.
    port: int | None


def _split_host_port(text: str) -> tuple[str, int | None] | None:
    """``host[:port]`` -> (lowercase host, port or None); None when malformed."""
    text = text.lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[: end + 1], text[end + 1 :]
        if not _IPV6.match(host):
            return None
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
        if ":" in port_text or not _HOST.match(host):
            return None
    if not port_text:
        return host, None
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        return None
    port = int(port_text)
    if port > 65535:
        return None
    return host, port


def _effective(port: int | None, scheme: str) -> int | None:
    return None if port is None or port == _DEFAULT_PORTS.get(scheme) else port


def _parse_origin(text: str) -> _Origin | None:
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or not _SCHEME.match(scheme) or not rest:
        return None
    # A serialized origin has no path, query, fragment or userinfo (RFC 6454 section 6.2).
    if any(c in rest for c in "/?#@"):
        return None
    parsed = _split_host_port(rest)
    if parsed is None:
        return None
    host, port = parsed
    return _Origin(scheme, host, _effective(port, scheme))


class OriginPolicy:
    """Decides whether a handshake's ``Origin`` may connect. Immutable after construction.

    Raises :class:`UsageError` for an entry that is not ``*``, ``null``, an origin or a
    ``scheme://*.domain[:port]`` wildcard. One trailing ``/`` on an entry is tolerated.
    """

    __slots__ = ("_allow_all", "_allow_null", "_exact", "_wildcards", "allowed")

    def __init__(self, allowed: Sequence[str] = ()) -> None:
        if isinstance(allowed, str):
            raise UsageError("allowed is a sequence of origins, not one string")
        self.allowed: tuple[str, ...] = tuple(allowed)
        self._allow_all = False
        self._allow_null = False
        exact: set[_Origin] = set()
        wildcards: list[tuple[str, str, int | None]] = []
        for raw in self.allowed:
            entry = raw.strip()
            if entry == "*":
                self._allow_all = True
                continue
            if entry.lower() == "null":
                self._allow_null = True
                continue
            if entry.endswith("/"):
                entry = entry[:-1]
            wildcard = "://*." in entry
            parsed = _parse_origin(entry.replace("://*.", "://", 1) if wildcard else entry)
            if parsed is None:
                raise UsageError(
                    f"invalid allowed origin {raw!r}: expected '*', 'null', "
                    "'scheme://host[:port]' or 'scheme://*.domain[:port]'"
                )
            if wildcard:
                wildcards.append((parsed.scheme, "." + parsed.host, parsed.port))
            else:
                exact.add(parsed)
        self._exact = frozenset(exact)
        self._wildcards = tuple(wildcards)

    def allows(self, origin: str | None, host: str | None, scheme: str = "http") -> bool:
        """May a handshake with this ``Origin`` header proceed?

        ``host`` is the request's ``Host`` header and ``scheme`` the scheme the server was
        reached with (``http``/``https``, or ``ws``/``wss``). A missing Origin (None) is
        allowed; a malformed one is refused unless ``*`` is listed.
        """
        if origin is None or self._allow_all:
            return True
        if origin.strip().lower() == "null":
            return self._allow_null
        parsed = _parse_origin(origin.strip())
        if parsed is None:
            return False
        if parsed in self._exact:
            return True
        for w_scheme, suffix, w_port in self._wildcards:
            if (
                parsed.scheme == w_scheme
                and parsed.port == w_port
                and parsed.host.endswith(suffix)
                and len(parsed.host) > len(suffix)
            ):
                return True
        return self._same_origin(parsed, host, scheme.lower())

    @staticmethod
    def _same_origin(origin: _Origin, host: str | None, scheme: str) -> bool:
        if host is None:
            return False
        request = _split_host_port(host.strip())
        if request is None:
            return False
        request_host, request_port = request
        return origin.host == request_host and origin.port == _effective(request_port, scheme)

    def __repr__(self) -> str:
        return f"OriginPolicy({list(self.allowed)!r})"
