"""Topic names and patterns: parsing, validation and matching. Pure functions, no I/O.

A topic name is ``/``-separated segments of letters, digits and ``-_.:@+~``, 1 to 255 bytes, no
empty segment. A pattern adds ``*`` (exactly one segment) and ``**`` (zero or more trailing
segments, allowed as the last segment only).
"""

from __future__ import annotations

import re
from typing import NewType

from .errors import BadRequest

Topic = NewType("Topic", str)
Pattern = NewType("Pattern", str)

MAX_TOPIC_BYTES = 255
_SEGMENT = re.compile(r"[A-Za-z0-9\-_.:@+~]+\Z")

STAR = "*"
STARSTAR = "**"


def _check_length(text: str, what: str) -> None:
    if not text:
        raise BadRequest(f"{what} must not be empty")
    if len(text.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise BadRequest(f"{what} is longer than {MAX_TOPIC_BYTES} bytes")


def parse_topic(value: object) -> Topic:
    """Validate an exact topic name; raise :class:`BadRequest` with the reason when invalid."""
    if not isinstance(value, str):
        raise BadRequest("topic must be a string")
    _check_length(value, "topic")
    for segment in value.split("/"):
        if not _SEGMENT.match(segment):
            if segment in (STAR, STARSTAR):
                raise BadRequest(f"topic {value!r} has a wildcard; publish needs an exact topic")
            raise BadRequest(f"topic {value!r} has an empty or invalid segment {segment!r}")
    return Topic(value)


def parse_pattern(value: object) -> Pattern:
    """Validate a subscription or permission pattern."""
    if not isinstance(value, str):
        raise BadRequest("topic pattern must be a string")
    _check_length(value, "topic pattern")
    segments = value.split("/")
    for i, segment in enumerate(segments):
        if segment == STARSTAR:
            if i != len(segments) - 1:
                raise BadRequest(f"pattern {value!r}: '**' is allowed as the last segment only")
        elif segment != STAR and not _SEGMENT.match(segment):
            raise BadRequest(f"pattern {value!r} has an empty or invalid segment {segment!r}")
    return Pattern(value)


def is_valid_topic(value: object) -> bool:
    try:
        parse_topic(value)
    except BadRequest:
        return False
    return True


def is_valid_pattern(value: object) -> bool:
    try:
        parse_pattern(value)
    except BadRequest:
        return False
    return True


def is_exact(pattern: str) -> bool:
    """True when the pattern has no wildcard, i.e. it names one topic."""
    return all(s not in (STAR, STARSTAR) for s in pattern.split("/"))


def matches(pattern: str, topic: str) -> bool:
    """Does ``topic`` (an exact name) match ``pattern``?"""
    p = pattern.split("/")
    t = topic.split("/")
    for i, seg in enumerate(p):
        if seg == STARSTAR:
            return True
        if i >= len(t):
            return False
        if seg != STAR and seg != t[i]:
            return False
    return len(p) == len(t)


def covers(outer: str, inner: str) -> bool:
    """Does every topic matched by pattern ``inner`` also match pattern ``outer``?

    Used for permissions: a token allowed ``reports/**`` may subscribe to ``reports/dist/*``,
    but one allowed ``reports/*`` may not subscribe to ``reports/**``.
    """
    if inner == STARSTAR:
        # A topic has at least one segment, so ``*/**`` matches every topic, as ``**`` does.
        return outer in (STARSTAR, STAR + "/" + STARSTAR)
    o = outer.split("/")
    n = inner.split("/")
    for i, seg in enumerate(o):
        if seg == STARSTAR:
            # ``a/**`` covers ``a`` itself and everything below it.
            return len(n) >= i
        if i >= len(n):
            return False
        inner_seg = n[i]
        if inner_seg == STARSTAR:
            return False
        if seg == STAR:
            continue
        if inner_seg == STAR or seg != inner_seg:
            return False
    return len(o) == len(n)
