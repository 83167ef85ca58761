"""Publishing and subscribing when several broker nodes share a sequencing backplane (Redis).

On one node, the hub assigns offsets and serves recovery from its own topic log, in the
caller's turn of the event loop. With several nodes, a topic's offsets, epoch and recent history
live in the backplane (:class:`broker.backplane.base.SequencingBackplane`), so:

- Publishing hands the message to the backplane and learns its offset one round trip later:
  ``publish`` requests are answered from a task (:meth:`Cluster.publish_reply`); internal
  publishers (job states, presence, statistics) do not wait (:meth:`broker.hub.Hub.publish`
  returns 0 for them).
- Subscribing makes sure the node receives the pattern's messages before answering ``ok``
  (:meth:`SequencingBackplane.hold`), so ``ok`` means "from here on, nothing is missed". For an
  exact topic it then reads the head and history; the backplane guarantees that every message
  up to that head has reached this node by then, and the messages that arrive meanwhile are
  collected. The ``ok``, the replay (with ``since``), the collected messages and the
  subscription itself then happen in one turn: no gap, no duplicate, in offset order.
- :class:`WatchedIndex` keeps the backplane's subscriptions in step with the local ones: the
  first local subscriber of a pattern holds it, the last one leaving releases it.

Failure behaviour: when the backplane does not confirm a subscription or answer a history read
within ``timeout`` seconds, the request fails with ``unavailable`` and the connection is left as
it was. A ``publish`` that the backplane could not take fails with ``unavailable`` (it may or may
not have been published).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

from protocol.errors import Conflict, Forbidden, Unavailable
from protocol.frames import RequestId, Since
from protocol.topics import is_exact

from .backplane.base import Envelope, SequencingBackplane, TopicHistory
from .subscriptions import SubscriptionIndex

if TYPE_CHECKING:
    from .connection import Connection
    from .core import Broker

log = logging.getLogger("quicksilver.cluster")

S = TypeVar("S", bound=Hashable)

__all__ = ["Cluster", "WatchedIndex"]


class WatchedIndex(SubscriptionIndex[S]):
    """A subscription index that holds each pattern on the backplane while anyone here has it."""

    def __init__(self, backplane: SequencingBackplane) -> None:
        super().__init__()
        self.backplane = backplane
        self._counts: dict[str, int] = {}

    def add(self, pattern: str, subscriber: S) -> bool:
        added = super().add(pattern, subscriber)
        if added:
            count = self._counts.get(pattern, 0)
            self._counts[pattern] = count + 1
            if count == 0:
                self.backplane.hold(pattern)
        return added

    def remove(self, pattern: str, subscriber: S) -> bool:
        removed = super().remove(pattern, subscriber)
        if removed:
            count = self._counts[pattern] - 1
            if count:
                self._counts[pattern] = count
            else:
                del self._counts[pattern]
                self.backplane.release(pattern)
        return removed


def _message(env: Envelope) -> dict[str, Any]:
    return {
        "type": "message",
        "topic": env.topic,
        "offset": env.offset,
        "epoch": env.epoch,
        "ts": env.ts,
        "data": env.data,
    }


class Cluster:
    """The parts of one node's request handling that change when nodes share a backplane."""

    def __init__(
        self, broker: Broker, backplane: SequencingBackplane, *, timeout: float = 10.0
    ) -> None:
        self.broker = broker
        self.backplane = backplane
        self.timeout = timeout

    # --- publish -----------------------------------------------------------------------------

    def publish_reply(
        self, conn: Connection, request_id: RequestId, topic: str, data: object
    ) -> Awaitable[None]:
        """Publish, then answer ``ok`` with the offset. Answers to one connection's publishes
        come in the order the publishes were sent."""
        offset = self.broker.hub.publish_async(topic, data)

        async def reply() -> None:
            conn.send({"type": "ok", "id": request_id, "offset": await offset})

        return reply()

    # --- subscribe ---------------------------------------------------------------------------

    def subscribe(
        self, conn: Connection, pattern: str, since: Since | None, request_id: RequestId
    ) -> Awaitable[None] | None:
        """Subscribe ``conn`` to ``pattern`` (permission already checked) and answer, like
        :func:`broker.recovery.subscribe` on one node (same ``ok`` fields, same ``conflict``
        and ``forbidden`` cases)."""
        replaying = conn.replaying
        if replaying and pattern in replaying:
            raise Conflict(f"the recovery of {pattern!r} is still running on this connection")
        new = pattern not in conn.subscriptions
        settings = self.broker.settings
        if new and len(conn.subscriptions) >= settings.max_subscriptions:
            raise Forbidden(
                f"subscription limit reached ({settings.max_subscriptions} per connection)"
            )
        exact = is_exact(pattern)
        if not new and not exact:
            conn.send({"type": "ok", "id": request_id})
            return None
        # Held and observed before the connection leaves the index (a subscription made
        # again): the backplane keeps delivering the topic throughout.
        held = self.backplane.hold(pattern)
        seen: list[Envelope] = []
        stop = self.backplane.observe(pattern, seen.append) if exact else None
        if new:
            conn.subscriptions.add(pattern)
        else:
            # Subscribed already: the live stream pauses until the replay is out.
            self.broker.hub.index.remove(pattern, conn)
        if conn.replaying is None:
            conn.replaying = set()
        conn.replaying.add(pattern)
        return self._subscribe(conn, pattern, since, request_id, new, held, seen, stop)

    async def _subscribe(
        self,
        conn: Connection,
        pattern: str,
        since: Since | None,
        request_id: RequestId,
        new: bool,
        held: asyncio.Future[None],
        seen: list[Envelope],
        stop: Callable[[], None] | None,
    ) -> None:
        hub = self.broker.hub
        backplane = self.backplane
        exact = stop is not None
        try:
            history: TopicHistory | None = None
            try:
                try:
                    await asyncio.wait_for(held, self.timeout)
                except TimeoutError:
                    raise Unavailable(
                        "the backplane did not confirm the subscription in time"
                    ) from None
                if exact:
                    history = await backplane.recent(
                        pattern, None if since is None else since.offset
                    )
            except BaseException:
                if conn.replaying is not None and pattern in conn.replaying:
                    conn.replaying.discard(pattern)
                    if new:
                        conn.subscriptions.discard(pattern)
                    elif not conn.closing:
                        hub.index.add(pattern, conn)
                raise
            # From here to the end nothing awaits: nothing can slip between replay and live.
            wanted = conn.replaying is not None and pattern in conn.replaying
            if wanted:
                assert conn.replaying is not None
                conn.replaying.discard(pattern)
            if conn.closing:
                return
            if history is None:
                conn.send({"type": "ok", "id": request_id})
                if wanted:
                    hub.index.add(pattern, conn)
                return
            reply, frames = _answer(request_id, history, since, seen)
            conn.send(reply)
            if not wanted:
                return  # unsubscribed meanwhile: answer, replay nothing
            for env in frames:
                conn.send(_message(env))
            hub.index.add(pattern, conn)
            if new:
                hub.presence.join(conn, pattern)
        finally:
            if stop is not None:
                stop()
            # The index holds its own reference once the connection is in it.
            backplane.release(pattern)


def _answer(
    request_id: RequestId,
    history: TopicHistory,
    since: Since | None,
    seen: list[Envelope],
) -> tuple[dict[str, Any], list[Envelope]]:
    """The ``ok`` for an exact topic and the messages that follow it: the replay after
    ``since`` (up to the head read), then those that arrived after the head while reading."""
    epoch, head, entries = history.epoch, history.offset, list(history.entries)
    fresh = history.fresh
    restarted = [env for env in seen if env.epoch != epoch]
    if restarted:
        # The topic's history was lost after the read and a new epoch began.
        epoch, head, entries, fresh = restarted[-1].epoch, 0, [], False
        later = [env for env in restarted if env.epoch == epoch]
    else:
        later = [env for env in seen if env.offset > head]
    reply: dict[str, Any] = {"type": "ok", "id": request_id}
    if since is None:
        entries = []
    else:
        if restarted:
            recovered = False
            entries = []
        elif fresh:
            recovered = since.offset == 0
            entries = []
        elif since.epoch and since.epoch != epoch:
            recovered = False
            entries = []
        elif since.offset >= head:
            recovered = since.offset == head
            entries = []
        else:
            recovered = bool(entries) and entries[0].offset == since.offset + 1
            if entries and entries[-1].offset != head:
                recovered = False
        reply["recovered"] = recovered
    reply["epoch"] = epoch
    reply["offset"] = head
    return reply, entries + later
