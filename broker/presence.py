"""Presence: who is subscribed to a topic, for the topics an operator opted in.

A topic is tracked when it matches one of the presence patterns
(``QUICKSILVER_PRESENCE_PATTERNS``); topics under ``presence/`` never are. A connection is
present on a topic while it holds an exact subscription to it (a wildcard subscription does not
make it present anywhere). Every join and leave is published on ``presence/<topic>``::

    {"event": "join", "topic": "chat/lobby", "sub": "alice", "session": "3f2a9c0d5e6b7a18",
     "connections": 2, "total": 5}

``connections`` is how many connections of that subject are present after the change, ``total``
how many connections in all. ``sub`` is null for anonymous connections and tokens without a
subject. No event is published when ``presence/<topic>`` would be longer than a topic may be.

Limits: presence is per broker node; its memory is one entry per present (connection, topic)
pair, bounded by the connections' subscription limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from protocol.errors import BadRequest, QuicksilverError
from protocol.topics import MAX_TOPIC_BYTES, matches, parse_pattern

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("quicksilver.presence")

PREFIX = "presence/"


class Presence:
    """Presence of every tracked topic on this node. ``publish(topic, data)`` sends events."""

    def __init__(self, publish: Callable[[str, object], int], patterns: Iterable[str] = ()) -> None:
        self._publish = publish
        self.patterns: tuple[str, ...] = ()
        self._members: dict[str, dict[Connection, str | None]] = {}
        self._subjects: dict[str, dict[str | None, int]] = {}
        self.configure(patterns)

    def configure(self, patterns: Iterable[str]) -> None:
        """Set the patterns of tracked topics; ValueError for an invalid one."""
        parsed = []
        for pattern in patterns:
            if pattern.strip():
                try:
                    parsed.append(parse_pattern(pattern.strip()))
                except BadRequest as exc:
                    raise ValueError(f"presence pattern {pattern!r}: {exc.message}") from None
        self.patterns = tuple(parsed)

    def tracks(self, topic: str) -> bool:
        if not self.patterns or topic.startswith(PREFIX):
            return False
        return any(matches(p, topic) for p in self.patterns)

    def join(self, conn: Connection, topic: str) -> None:
        """``conn`` now holds an exact subscription to ``topic``."""
        if not self.tracks(topic):
            return
        members = self._members.setdefault(topic, {})
        if conn in members:
            return
        sub = conn.perms.sub if conn.perms is not None else None
        members[conn] = sub
        subjects = self._subjects.setdefault(topic, {})
        subjects[sub] = subjects.get(sub, 0) + 1
        if conn.presence is None:
            conn.presence = set()
        conn.presence.add(topic)
        self._event("join", topic, conn, sub)

    def leave(self, conn: Connection, topic: str) -> None:
        """``conn`` no longer holds ``topic`` (no-op when it was not present)."""
        members = self._members.get(topic)
        if members is None or conn not in members:
            return
        sub = members.pop(conn)
        subjects = self._subjects[topic]
        subjects[sub] -= 1
        if not subjects[sub]:
            del subjects[sub]
        if not members:
            del self._members[topic]
            del self._subjects[topic]
        if conn.presence is not None:
            conn.presence.discard(topic)
        self._event("leave", topic, conn, sub)

    def leave_all(self, conn: Connection) -> None:
        """``conn`` went away."""
        topics = conn.presence
        if topics:
            for topic in list(topics):
                self.leave(conn, topic)

    def _repair(self, topic: str) -> None:
        # A subscription can end without passing through leave() (a refreshed token that no
        # longer allows it); such members are removed when the topic is next looked at.
        members = self._members.get(topic)
        if members:
            for conn in [c for c in members if c.closing or topic not in c.subscriptions]:
                self.leave(conn, topic)

    def snapshot(self, topic: str) -> dict[str, Any] | None:
        """``{"topic", "connections", "subjects": {sub: count}, "anonymous"}``, or None when the
        topic is not tracked."""
        if not self.tracks(topic):
            return None
        self._repair(topic)
        subjects = self._subjects.get(topic, {})
        return {
            "topic": topic,
            "connections": len(self._members.get(topic, ())),
            "subjects": {s: n for s, n in sorted(subjects.items(), key=_key) if s is not None},
            "anonymous": subjects.get(None, 0),
        }

    def count(self, topic: str) -> int:
        return len(self._members.get(topic, ()))

    def _event(self, event: str, topic: str, conn: Connection, sub: str | None) -> None:
        target = PREFIX + topic
        if len(target.encode()) > MAX_TOPIC_BYTES:
            return
        data = {
            "event": event,
            "topic": topic,
            "sub": sub,
            "session": conn.session,
            "connections": self._subjects.get(topic, {}).get(sub, 0),
            "total": len(self._members.get(topic, ())),
        }
        try:
            self._publish(target, data)
        except QuicksilverError as exc:
            log.debug("presence event on %s not published: %s", target, exc)


def _key(item: tuple[str | None, int]) -> str:
    return item[0] or ""
