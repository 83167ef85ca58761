"""Origin checks for the WebSocket handshake."""

from __future__ import annotations

import pytest

from auth.origin import OriginPolicy
from protocol.errors import UsageError

POLICY = OriginPolicy(
    [
        "https://app.example.com",
        "http://localhost:3000",
        "https://*.example.org",
        "http://[::1]:8080",
        "HTTPS://Upper.Example.NET:443/",
    ]
)
HOST = "broker.example.com"


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        # Not a browser: no Origin header at all.
        (None, True),
        # Exact entries, case-insensitive, default ports normalised.
        ("https://app.example.com", True),
        ("HTTPS://APP.EXAMPLE.COM", True),
        ("https://app.example.com:443", True),
        ("https://app.example.com:8443", False),
        ("http://app.example.com", False),
        ("https://evil-app.example.com", False),
        ("https://app.example.com.evil.com", False),
        ("http://localhost:3000", True),
        ("http://localhost:3001", False),
        ("http://localhost", False),
        ("https://upper.example.net", True),
        ("http://[::1]:8080", True),
        ("http://[::1]:8081", False),
        # Subdomain wildcard: any depth, same scheme and port, not the bare domain.
        ("https://a.example.org", True),
        ("https://a.b.example.org", True),
        ("https://A.EXAMPLE.ORG:443", True),
        ("https://example.org", False),
        ("https://.example.org", False),
        ("https://evilexample.org", False),
        ("http://a.example.org", False),
        ("https://a.example.org:8443", False),
        ("https://a.example.org.evil.com", False),
        # "null" (sandboxed iframes, file:// pages) is refused unless listed.
        ("null", False),
        # Malformed values are refused.
        ("", False),
        ("app.example.com", False),
        ("https://app.example.com/", False),
        ("https://app.example.com/path", False),
        ("https://user@app.example.com", False),
        ("https://app.example.com:99999", False),
        ("https://app.example.com:abc", False),
        ("https://", False),
        ("https://app.example.com https://other", False),
        ("https://[::1", False),
    ],
)
def test_allowed_list(origin: str | None, allowed: bool) -> None:
    assert POLICY.allows(origin, HOST, "https") is allowed


@pytest.mark.parametrize(
    ("origin", "host", "scheme", "allowed"),
    [
        ("http://localhost:8000", "localhost:8000", "http", True),
        ("http://LOCALHOST:8000", "localhost:8000", "http", True),
        ("http://localhost:8000", "localhost:8001", "http", False),
        ("http://127.0.0.1:8000", "localhost:8000", "http", False),
        ("https://broker.example.com", "broker.example.com", "https", True),
        ("https://broker.example.com", "broker.example.com:443", "https", True),
        ("http://broker.example.com:80", "broker.example.com", "http", True),
        # Behind a proxy that terminates TLS: the page is https, the broker sees plain http.
        ("https://broker.example.com", "broker.example.com", "http", True),
        ("https://broker.example.com:8443", "broker.example.com", "https", False),
        ("https://broker.example.com", "broker.example.com:8443", "https", False),
        ("http://[::1]:8000", "[::1]:8000", "http", True),
        ("http://[::1]:8000", "[::2]:8000", "http", False),
        ("https://evil.com", "broker.example.com", "https", False),
        ("https://broker.example.com", None, "https", False),
        ("https://broker.example.com", "", "https", False),
        ("https://broker.example.com", "bad host", "https", False),
        ("wss://broker.example.com", "broker.example.com", "wss", True),
    ],
)
def test_same_origin_is_always_allowed(
    origin: str, host: str | None, scheme: str, allowed: bool
) -> None:
    assert OriginPolicy().allows(origin, host, scheme) is allowed


def test_empty_policy_allows_only_non_browsers_and_same_origin() -> None:
    policy = OriginPolicy()
    assert policy.allows(None, None)
    assert not policy.allows("https://elsewhere.com", HOST)
    assert not policy.allows("null", HOST)


def test_star_allows_every_origin() -> None:
    policy = OriginPolicy(["*"])
    assert policy.allows("https://anything.anywhere", HOST)
    assert policy.allows("null", HOST)
    assert policy.allows("garbage", None)


def test_null_only_when_listed() -> None:
    policy = OriginPolicy(["null"])
    assert policy.allows("null", HOST)
    assert policy.allows("NULL", HOST)
    assert not policy.allows("https://elsewhere.com", HOST)


@pytest.mark.parametrize(
    "entry",
    ["", "example.com", "https://", "https://a.example.com/path", "ftp//x", "https://a.*.com"],
)
def test_invalid_entries_are_usage_errors(entry: str) -> None:
    with pytest.raises(UsageError, match="invalid allowed origin"):
        OriginPolicy([entry])


def test_single_string_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        OriginPolicy("https://app.example.com")
