"""Per-connection rate limits: frames per second and bytes per second, by role.

Each connection has two token buckets, checked for every frame it sends before the frame is
decoded: one for frames, one for bytes. A frame over the limit is not processed; it is answered
with ``{"type":"error","id":..,"code":"rate_limited","message":..,"retry_after":<seconds>}``
and the connection stays open. Other connections are not affected.

Configuration (``QUICKSILVER_RATE_LIMITS``): comma-separated ``KEY=FRAMES[:BYTES]``, per second,
``0`` meaning no limit, where KEY is a role (``admin``, ``publisher``, ``subscriber``,
``worker``), ``anonymous`` (also used before authentication) or ``default`` (tokens with no
role). A token with several roles gets the most generous limit of its roles; a role without an
entry is not limited. Each bucket holds ``burst`` seconds' worth (``QUICKSILVER_RATE_LIMIT_BURST``):
a client may send that much at once after being quiet. A single frame larger than the byte
bucket passes when the bucket is full, and the bucket then goes into debt.

Cost: one identity check for an unlimited connection; two bucket refills (a few float operations
and one ``time.monotonic()``) for a limited one. Constant time and memory per connection.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol.codec import request_id_of

if TYPE_CHECKING:
    from auth.permissions import Permissions

    from .connection import Connection
    from .core import Broker

KEYS = ("admin", "publisher", "subscriber", "worker", "anonymous", "default")


@dataclass(frozen=True, slots=True)
class Limit:
    """Frames and bytes per second; 0 means unlimited."""

    frames: float = 0.0
    bytes: float = 0.0

    def describe(self) -> str:
        parts = []
        if self.frames:
            parts.append(f"{self.frames:g} frames/s")
        if self.bytes:
            parts.append(f"{self.bytes:g} bytes/s")
        return " and ".join(parts) or "unlimited"


def _rate(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"rate limit {spec!r}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"rate limit {spec!r}: rates must be finite numbers >= 0")
    return value


def parse_limits(specs: Iterable[str]) -> dict[str, Limit]:
    """Parse ``KEY=FRAMES[:BYTES]`` entries; ValueError names the first bad one."""
    limits: dict[str, Limit] = {}
    for spec in specs:
        if not spec.strip():
            continue
        key, sep, values = spec.strip().partition("=")
        key = key.strip()
        if not sep or key not in KEYS:
            raise ValueError(
                f"rate limit {spec!r} must be 'KEY=FRAMES[:BYTES]' with KEY one of "
                + ", ".join(KEYS)
            )
        frames, _, nbytes = values.partition(":")
        limits[key] = Limit(_rate(frames, spec), _rate(nbytes, spec) if nbytes.strip() else 0.0)
    return limits


class TokenBucket:
    """``rate`` tokens per second, holding at most ``capacity``; starts full."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def refill(self, now: float) -> float:
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.capacity:
            tokens = self.capacity
        self.tokens = tokens
        self.stamp = now
        return tokens


class Limiter:
    """The buckets of one connection, made for its current permissions ``perms``."""

    __slots__ = ("bytes", "frames", "limit", "perms", "unlimited")

    def __init__(self, perms: Permissions | None, limit: Limit, burst: float, now: float) -> None:
        self.perms = perms
        self.limit = limit
        self.frames = (
            TokenBucket(limit.frames, max(1.0, limit.frames * burst), now) if limit.frames else None
        )
        self.bytes = (
            TokenBucket(limit.bytes, max(1.0, limit.bytes * burst), now) if limit.bytes else None
        )
        self.unlimited = self.frames is None and self.bytes is None

    def inherit(self, old: Limiter) -> None:
        """Keep the old buckets' level, so new permissions do not refill them."""
        for mine, theirs in ((self.frames, old.frames), (self.bytes, old.bytes)):
            if mine is not None and theirs is not None:
                mine.tokens = min(mine.capacity, theirs.tokens)

    def check(self, nbytes: int, now: float) -> float:
        """Take one frame of ``nbytes``: 0.0 when allowed, else seconds until it would be."""
        wait = 0.0
        frames, bucket = self.frames, self.bytes
        if frames is not None:
            tokens = frames.refill(now)
            if tokens < 1.0:
                wait = (1.0 - tokens) / frames.rate
        if bucket is not None:
            tokens = bucket.refill(now)
            need = min(float(nbytes), bucket.capacity)
            if tokens < need:
                wait = max(wait, (need - tokens) / bucket.rate)
        if wait:
            return wait
        if frames is not None:
            frames.tokens -= 1.0
        if bucket is not None:
            bucket.tokens -= nbytes
        return 0.0


class RatePolicy:
    """Limits by role; see the module docstring."""

    def __init__(self, limits: Mapping[str, Limit], burst: float = 10.0) -> None:
        if not math.isfinite(burst) or burst <= 0:
            raise ValueError("the rate limit burst must be a positive number of seconds")
        self.limits = dict(limits)
        self.burst = burst

    def limit_for(self, perms: Permissions | None) -> Limit:
        limits = self.limits
        if perms is None or perms.is_anonymous:
            return limits.get("anonymous", Limit())
        if not perms.roles:
            return limits.get("default", Limit())
        frames = nbytes = -1.0
        for role in perms.roles:
            limit = limits.get(role, Limit())
            frames = math.inf if not limit.frames else max(frames, limit.frames)
            nbytes = math.inf if not limit.bytes else max(nbytes, limit.bytes)
            if frames == math.inf and nbytes == math.inf:
                break
        return Limit(0.0 if frames == math.inf else frames, 0.0 if nbytes == math.inf else nbytes)

    def limiter(self, perms: Permissions | None, now: float, old: Limiter | None = None) -> Limiter:
        limiter = Limiter(perms, self.limit_for(perms), self.burst, now)
        if old is not None:
            limiter.inherit(old)
        return limiter


@functools.lru_cache(maxsize=16)
def policy(specs: tuple[str, ...], burst: float) -> RatePolicy:
    """The policy for these settings (parsed once); ValueError when they are invalid."""
    return RatePolicy(parse_limits(specs), burst)


def admit(broker: Broker, conn: Connection, data: bytes) -> bool:
    """Charge one incoming frame to ``conn``'s buckets. False when over the limit: the frame
    has then been answered with ``rate_limited`` and must not be processed."""
    limiter = conn.limiter
    if limiter is None or limiter.perms is not conn.perms:
        settings = broker.settings
        limiter = conn.limiter = policy(settings.rate_limits, settings.rate_limit_burst).limiter(
            conn.perms, time.monotonic(), limiter
        )
    if limiter.unlimited:
        return True
    wait = limiter.check(len(data), time.monotonic())
    if not wait:
        return True
    broker.metrics.errors_sent += 1
    conn.send(
        {
            "type": "error",
            "id": request_id_of(data, conn.encoding),
            "code": "rate_limited",
            "message": f"rate limit exceeded ({limiter.limit.describe()}); retry in {wait:.2f} s",
            # Rounded up: a client that waits this long is served.
            "retry_after": math.ceil(wait * 1000) / 1000,
        }
    )
    return False
