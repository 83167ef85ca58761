"""A minimal HTTP/1.1 client for webhook deliveries (standard library only).

One ``POST`` per connection (``Connection: close``), plain HTTP or HTTPS with the system's
certificate store and hostname check. Only the response's status line and headers are read; the
body is not needed. Redirects are not followed (a 3xx counts as a failed delivery).

Limits and failure behaviour: the whole exchange (connect, TLS, request, response head) must fit
in ``seconds``; a status line or header over 64 KiB, more than 100 headers, or anything
that is not an HTTP/1.x response raises :class:`DeliveryError`, as do every network and TLS error.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from urllib.parse import urlsplit

__all__ = ["DeliveryError", "post"]

_MAX_HEADERS = 100
_DEFAULT_PORTS = {"http": 80, "https": 443}


class DeliveryError(Exception):
    """The request did not get an HTTP response (network, TLS, timeout, garbage)."""


def _target(url: str) -> tuple[str, str, int, str, str]:
    """``(scheme, host, port, Host header, request target)``; ValueError when unusable."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("the URL must start with http:// or https://")
    host = parts.hostname
    if not host:
        raise ValueError("the URL has no host")
    port = parts.port or _DEFAULT_PORTS[scheme]
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == _DEFAULT_PORTS[scheme] else f"{shown}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, port, host_header, target


def check_url(url: str) -> None:
    """Raise ValueError unless ``url`` is an absolute http(s) URL this client can call."""
    if not url.isascii() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("the URL must be ASCII without spaces or control characters")
    if len(url) > 2048:
        raise ValueError("the URL is longer than 2048 characters")
    _target(url)


async def post(url: str, body: bytes, headers: Mapping[str, str], *, seconds: float) -> int:
    """POST ``body`` to ``url`` within ``seconds``; returns the response status. Raises
    :class:`DeliveryError`."""
    try:
        scheme, host, port, host_header, target = _target(url)
    except ValueError as exc:
        raise DeliveryError(str(exc)) from None
    context = ssl.create_default_context() if scheme == "https" else None
    lines = [f"POST {target} HTTP/1.1", f"Host: {host_header}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    request = "\r\n".join(lines).encode("latin-1") + body
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(seconds):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=host if context else None, limit=65536
            )
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
            parts = status_line.decode("latin-1").split(None, 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise DeliveryError(f"not an HTTP response: {status_line[:80]!r}")
            status = int(parts[1])
            for _ in range(_MAX_HEADERS + 1):
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    return status
            raise DeliveryError("the response has too many headers")
    except DeliveryError:
        raise
    except TimeoutError:
        raise DeliveryError(f"no response within {seconds:g} s") from None
    except (OSError, ssl.SSLError, ValueError, asyncio.LimitOverrunError) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
