"""Fan-out: from a published message to bytes queued on every subscribed connection.

The hot path never awaits. Each message is encoded once per encoding in use, framed once, and the
same bytes are appended to each subscriber's outbound list; connections that received something
are flushed once at the end of the loop iteration, so a burst of messages to one client goes out
in one ``transport.write``. A connection that is closing is skipped; one that cannot keep up is
closed by its own buffer bound (see :mod:`broker.connection`), never waited for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from protocol.codec import dumps
from protocol.errors import QuicksilverError

from .backplane.base import Backplane, Envelope, SequencingBackplane
from .history import TopicLog
from .history_writer import HistoryWriter
from .metrics import Metrics
from .presence import Presence
from .subscriptions import SubscriptionIndex
from .wire import binary_frame, text_frame

log = logging.getLogger("quicksilver.hub")


class Subscriber(Protocol):
    """What the hub needs of a connection (hashable by identity)."""

    def __hash__(self) -> int: ...

    msgpack: bool
    pending: list[bytes] | None

    def flush(self) -> None: ...


class Hub:
    """Topic log, subscription index and the fan-out path of one broker node."""

    def __init__(
        self,
        backplane: Backplane,
        metrics: Metrics,
        *,
        history_window: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backplane = backplane
        self.metrics = metrics
        self.log = TopicLog(window=history_window)
        self.presence = Presence(self.publish)
        #: Persists the history of topics with a rule; set by the broker when it starts.
        self.history: HistoryWriter | None = None
        self.index: SubscriptionIndex[Subscriber] = SubscriptionIndex()
        self.clock = clock
        self._dirty: list[Subscriber] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.backplane.start(self.deliver)

    def publish(self, topic: str, data: object) -> int:
        """Accept a message on ``topic``; returns its offset. ``data`` must be portable.

        With a sequencing backplane (several nodes) the offset is assigned after a round trip:
        this returns 0 and the message goes out in call order; use :meth:`publish_async` for
        the offset."""
        if isinstance(self.backplane, SequencingBackplane):
            self.submit(topic, data)
            return 0
        ts = self.clock()
        st, offset = self.log.append(topic, ts, data)
        self.metrics.published += 1
        self.backplane.publish(Envelope(topic, offset, st.epoch, ts, data))
        return offset

    def deliver(self, env: Envelope) -> None:
        """Fan an envelope out to local subscribers (called by the backplane)."""
        subs = self.index.match_exact_only(env.topic)
        if subs is None:
            subs = self.index.match(env.topic)
        if not subs:
            return
        message = {
            "type": "message",
            "topic": env.topic,
            "offset": env.offset,
            "epoch": env.epoch,
            "ts": env.ts,
            "data": env.data,
        }
        json_frame: bytes | None = None
        msgpack_frame: bytes | None = None
        dirty = self._dirty
        for conn in subs:
            pending = conn.pending
            if pending is None:  # closing
                continue
            if conn.msgpack:
                if msgpack_frame is None:
                    msgpack_frame = binary_frame(dumps(message, "msgpack"))
                data = msgpack_frame
            else:
                if json_frame is None:
                    json_frame = text_frame(dumps(message, "json"))
                data = json_frame
            if not pending:
                dirty.append(conn)
            pending.append(data)
        self.metrics.messages_out += len(subs)
        self.schedule_flush()

    def queued(self, conn: Subscriber) -> None:
        """``conn`` had bytes appended to an empty outbound list: flush it this iteration."""
        self._dirty.append(conn)
        self.schedule_flush()

    def schedule_flush(self) -> None:
        if not self._flush_scheduled and self._dirty:
            self._flush_scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write out everything queued since the last flush."""
        self._flush_scheduled = False
        dirty = self._dirty
        self._dirty = []
        for conn in dirty:
            conn.flush()

    def listen(self, pattern: str, callback: Callable[[str, object], None]) -> Callable[[], None]:
        """Call ``callback(topic, data)`` in this process for every message matching
        ``pattern`` that reaches this node, as a subscriber would get it; returns the function
        that stops it.

        Calls come in order, batched at the end of the loop iteration like connection flushes.
        A callback that raises is logged and stays registered; it must not block. The listener
        counts as one subscription.
        """
        listener = _LocalListener(callback)
        self.index.add(pattern, listener)

        def stop() -> None:
            self.index.remove(pattern, listener)

        return stop

    # --- several nodes: offsets from the backplane ----------------------------------------

    def submit(self, topic: str, data: object) -> asyncio.Future[Envelope] | None:
        """Several nodes: hand a message to the sequencing backplane; the future gives its
        envelope (offset and epoch) once assigned. None when the backplane refused it at once;
        the backplane counts and logs what it could not publish (see its metrics)."""
        assert isinstance(self.backplane, SequencingBackplane)
        try:
            future = self.backplane.submit(topic, self.clock(), data)
        except QuicksilverError as exc:
            log.debug("message on %s not published: %s", topic, exc)
            return None
        self.metrics.published += 1
        future.add_done_callback(_retrieve)
        return future

    def publish_async(self, topic: str, data: object) -> Awaitable[int]:
        """:meth:`publish` now, and the offset when it is known (at once on one node).

        The awaitable raises :class:`protocol.errors.Unavailable` when the backplane could not
        take the message (it may or may not have been published); a full backlog raises it
        here, before anything is sent."""
        if not isinstance(self.backplane, SequencingBackplane):
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            done.set_result(self.publish(topic, data))
            return done
        future = self.backplane.submit(topic, self.clock(), data)
        self.metrics.published += 1
        return _offset(future)


async def _offset(future: asyncio.Future[Envelope]) -> int:
    return (await future).offset


def _retrieve(future: asyncio.Future[Envelope]) -> None:
    if not future.cancelled():
        future.exception()


class _LocalListener:
    """A subscriber inside the process: takes the JSON frames fan-out queues for it and hands
    their topic and data to a callback (uses the fan-out path unchanged)."""

    __slots__ = ("callback", "msgpack", "pending")

    def __init__(self, callback: Callable[[str, object], None]) -> None:
        self.callback = callback
        self.msgpack = False
        self.pending: list[bytes] | None = []

    def flush(self) -> None:
        frames, self.pending = self.pending or [], []
        for raw in frames:
            # A server text frame: 2, 4 or 10 header bytes by payload length (RFC 6455 5.2).
            size = raw[1] & 0x7F
            start = 2 if size < 126 else 4 if size == 126 else 10
            message = json.loads(raw[start:])
            try:
                self.callback(message["topic"], message["data"])
            except Exception:
                log.exception("local listener failed on %s", message["topic"])
