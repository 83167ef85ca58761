"""Subscribing, and replaying what a client missed (``since``), exactly.

The guarantee: after ``subscribe`` with ``since {offset, epoch}`` on an exact topic, the client
gets the ``ok``, then every message after ``offset`` still kept, in order, then the live stream,
with no duplicate and no gap, also while messages keep being published.

How: a :class:`Recovery` collects the missed messages from the topic's memory window
(:mod:`broker.history`). When the window reaches back far enough (the usual case after a short
disconnect), the ``ok``, the replay and the subscription all happen in the caller's turn of the
event loop, so no message can be published in between. When older messages are needed, they are
read from the store; the connection is not in the subscription index meanwhile (live messages
cannot overtake the replay), and whatever was published during the read is taken from the
memory window afterwards. Every message of a persisted topic stays in memory until it is in the
store, and while the read runs the topic's window is pinned from the first message the recovery
will take from memory, so "in the store up to there, in memory from there on" covers
everything after one read, however fast the topic is published. The final collection, the
``ok``, the replay and the subscription happen again in one turn. The topic's history rule
applies as of the request: messages published meanwhile do not push older ones out of it.

Limits: a replay holds the messages the rule kept at the request plus what is published while
the store is read. A pin keeps at most ``TopicLog.pin_max`` messages beyond the window; past
that it is dropped and the recovery reads again, at most :data:`MAX_STORE_READS` times in all
(then ``recovered: false``). A failing store read also gives
``recovered: false`` with what memory holds, never an error. While a connection's recovery of a
topic is running, another ``subscribe`` to that topic is refused with ``conflict``. When a
wildcard subscription of the same connection also matches the topic, its live messages keep
arriving through that subscription during the replay.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from protocol.errors import Conflict, Forbidden, QuicksilverError
from protocol.frames import RequestId, Since
from protocol.topics import is_exact

from .history import Entry, TopicLog, TopicState
from .store.base import Store, StoredMessage

if TYPE_CHECKING:
    from .connection import Connection
    from .core import Broker

log = logging.getLogger("quicksilver.recovery")

MAX_STORE_READS = 16


class Recovery:
    """Collects the messages of ``topic`` after ``after`` (in ``epoch``; None: the current one).

    Drive it with :meth:`step` (synchronous; returns a store read to make, or None when done)
    and :meth:`add_stored`, or let :meth:`run` do both. ``limit`` caps the messages collected.
    """

    def __init__(
        self,
        topics: TopicLog,
        topic: str,
        after: int,
        epoch: str | None,
        now: float,
        limit: int | None = None,
    ) -> None:
        self.topics = topics
        self.topic = topic
        self.now = now
        self.limit = limit
        self.entries: list[Entry] = []
        #: False once a message after ``after`` is known to be missing.
        self.recovered = True
        #: True when ``limit`` stopped the collection before the topic's last message.
        self.truncated = False
        self.done = False
        self.reads = 0
        st = self.state = topics.state(topic)
        self.cursor = after
        self._first = 0
        # The rule applies as of the request: messages published while the replay is read do
        # not push older ones out of it.
        self.floor = st.floor()
        if epoch is not None and epoch != st.epoch:
            self._finish(False)
        elif after >= st.offset:
            self._finish(after == st.offset)
        elif after + 1 < self.floor:
            self.recovered = False
            self.cursor = self.floor - 1

    def _finish(self, recovered: bool) -> None:
        self.recovered = self.recovered and recovered
        self.done = True

    def _full(self) -> bool:
        return self.limit is not None and len(self.entries) >= self.limit

    def step(self, *, store: bool = True) -> tuple[int, int] | None:
        """Collect from memory. Returns ``(after, count)`` when the store must be read first
        (only when ``store``), None when the collection is complete."""
        if self.done:
            return None
        st = self.topics.state(self.topic)
        if st is not self.state:
            # Forgotten and reloaded while the store was read: same history if same epoch.
            if st.epoch != self.state.epoch:
                self.state = st
                self.entries = []
                self._finish(False)
                return None
            self.state = st
        cursor = self.cursor
        if self._full():
            self.truncated = cursor < st.offset
            self.done = True
            return None
        mem = self.topics.kept(st, cursor, self.now, self.floor)
        first = mem[0].offset if mem else st.offset + 1
        if first > cursor + 1:
            if store and st.persisted and self.reads < MAX_STORE_READS:
                self._first = first
                count = first - cursor - 1
                if self.limit is not None:
                    count = min(count, self.limit - len(self.entries))
                return cursor, count
            self.recovered = False
        if self.limit is not None:
            room = self.limit - len(self.entries)
            if len(mem) > room:
                mem = mem[:room]
                self.truncated = True
        self.entries.extend(mem)
        if mem:
            self.cursor = mem[-1].offset
        self.done = True
        return None

    def add_stored(self, rows: list[StoredMessage]) -> None:
        """Take the rows of a store read asked for by :meth:`step`."""
        self.reads += 1
        st = self.state
        max_age = st.max_age
        cutoff = None if max_age is None else self.now - max_age
        cursor = self.cursor
        for row in rows:
            if row.epoch != st.epoch or row.offset <= cursor or row.offset >= self._first:
                continue
            if cutoff is not None and row.ts < cutoff:
                continue
            if row.offset != cursor + 1:
                self.recovered = False
            self.entries.append(Entry(row.offset, row.ts, json.loads(row.data_json)))
            cursor = row.offset
        if self._full():
            self.cursor = cursor
            self.truncated = cursor < st.offset
            self.done = True
            return
        if cursor < self._first - 1:
            self.recovered = False
            cursor = self._first - 1
        self.cursor = cursor

    async def run(self, store: Store) -> Recovery:
        """Collect everything, reading the store as needed. A failing store read ends the
        collection with what memory holds and ``recovered`` False. Returns self; nothing
        awaits between the last memory collection and the return."""
        while (read := self.step()) is not None:
            # Keep what memory holds from here on until the read is back, so one read closes
            # the gap however fast the topic is published and stored meanwhile.
            st, pin = self.state, self._first
            st.pins.append(pin)
            try:
                rows = await store.read_messages(self.topic, *read)
            except QuicksilverError as exc:
                log.warning("history of %s could not be read: %s", self.topic, exc)
                self.recovered = False
                self.step(store=False)
                break
            finally:
                if pin in st.pins:
                    st.pins.remove(pin)
            self.add_stored(rows)
        return self


def message_frame(topic: str, epoch: str, entry: Entry) -> dict[str, Any]:
    return {
        "type": "message",
        "topic": topic,
        "offset": entry.offset,
        "epoch": epoch,
        "ts": entry.ts,
        "data": entry.data,
    }


def _ok(request_id: RequestId, st: TopicState, recovered: bool | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"type": "ok", "id": request_id}
    if recovered is not None:
        reply["recovered"] = recovered
    reply["epoch"] = st.epoch
    reply["offset"] = st.offset
    return reply


def subscribe(
    broker: Broker,
    conn: Connection,
    pattern: str,
    since: Since | None,
    request_id: RequestId,
) -> Awaitable[None] | None:
    """Subscribe ``conn`` to ``pattern`` (permission already checked) and answer.

    Exact topics answer with their epoch and offset (the topic's state is created when needed);
    with ``since``, the missed messages follow. Returns an awaitable when the store must be read.
    """
    hub = broker.hub
    replaying = conn.replaying
    if replaying and pattern in replaying:
        raise Conflict(f"the recovery of {pattern!r} is still running on this connection")
    new = pattern not in conn.subscriptions
    if new and len(conn.subscriptions) >= broker.settings.max_subscriptions:
        raise Forbidden(
            f"subscription limit reached ({broker.settings.max_subscriptions} per connection)"
        )
    if not is_exact(pattern):
        if new:
            conn.subscriptions.add(pattern)
            hub.index.add(pattern, conn)
        conn.send({"type": "ok", "id": request_id})
        return None
    if since is None:
        st = hub.log.state(pattern)
        if new:
            conn.subscriptions.add(pattern)
            hub.index.add(pattern, conn)
        conn.send(_ok(request_id, st))
        if new:
            hub.presence.join(conn, pattern)
        return None
    epoch = since.epoch or None
    recovery = Recovery(hub.log, pattern, since.offset, epoch, hub.clock())
    if recovery.step() is None:
        if new:
            conn.subscriptions.add(pattern)
            hub.index.add(pattern, conn)
        _send_replay(conn, request_id, recovery)
        if new:
            hub.presence.join(conn, pattern)
        return None
    if new:
        conn.subscriptions.add(pattern)
    else:
        hub.index.remove(pattern, conn)
    if conn.replaying is None:
        conn.replaying = set()
    conn.replaying.add(pattern)
    return _replay(broker, conn, pattern, recovery, request_id, new)


def _send_replay(conn: Connection, request_id: RequestId, recovery: Recovery) -> None:
    st = recovery.state
    conn.send(_ok(request_id, st, recovery.recovered))
    topic, epoch = st.topic, st.epoch
    for entry in recovery.entries:
        conn.send(message_frame(topic, epoch, entry))


async def _replay(
    broker: Broker,
    conn: Connection,
    topic: str,
    recovery: Recovery,
    request_id: RequestId,
    new: bool,
) -> None:
    hub = broker.hub
    try:
        await recovery.run(broker.store)
    except BaseException:
        # Leave the connection as it was before this request.
        if conn.replaying is not None and topic in conn.replaying:
            conn.replaying.discard(topic)
            if new:
                conn.subscriptions.discard(topic)
            elif not conn.closing:
                hub.index.add(topic, conn)
        raise
    # From here to the end nothing awaits: no message can slip between replay and live stream.
    wanted = conn.replaying is not None and topic in conn.replaying
    if wanted:
        assert conn.replaying is not None
        conn.replaying.discard(topic)
    if conn.closing:
        return
    if not wanted:
        # Unsubscribed meanwhile: answer the request, replay nothing.
        conn.send(_ok(request_id, recovery.state, recovery.recovered))
        return
    _send_replay(conn, request_id, recovery)
    hub.index.add(topic, conn)
    if new:
        hub.presence.join(conn, topic)


def unsubscribe(broker: Broker, conn: Connection, pattern: str) -> None:
    """Drop ``pattern`` from ``conn`` (also a recovery still running for it)."""
    hub = broker.hub
    if pattern in conn.subscriptions:
        conn.subscriptions.discard(pattern)
        hub.index.remove(pattern, conn)
        hub.presence.leave(conn, pattern)
    if conn.replaying:
        conn.replaying.discard(pattern)


__all__ = ["MAX_STORE_READS", "Recovery", "message_frame", "subscribe", "unsubscribe"]
