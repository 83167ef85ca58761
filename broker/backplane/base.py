"""The backplane interface.

A node publishes every message it accepted as an :class:`Envelope`; the backplane hands each
envelope once to the ``deliver`` callback of every node (the publishing node included), which fans
it out to that node's local subscribers.

Two kinds:

- :class:`Backplane`: the node assigns offsets itself (its own topic log) and hands finished
  envelopes to :meth:`Backplane.publish`. Right for one node (:class:`MemoryBackplane`).
- :class:`SequencingBackplane`: the backplane assigns each topic's offsets and epoch and keeps
  the recent history, in one place shared by every node, so that offsets stay gap-free and in
  delivery order whichever node publishes. Nodes submit ``(topic, ts, data)`` with
  :meth:`SequencingBackplane.submit` and learn the offset when it is assigned.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message with its place in the topic's history."""

    topic: str
    offset: int
    epoch: str
    ts: float
    data: object


Deliver = Callable[[Envelope], None]


class Backplane(abc.ABC):
    """Carries envelopes between broker nodes."""

    @abc.abstractmethod
    async def start(self, deliver: Deliver) -> None:
        """Begin handing envelopes to ``deliver`` (called on the event loop, never awaited)."""

    @abc.abstractmethod
    def publish(self, envelope: Envelope) -> None:
        """Send ``envelope`` to every node. Must not block the caller."""

    async def watch(self, pattern: str) -> None:  # noqa: B027 - optional hook
        """A local subscriber appeared for ``pattern`` (backplanes that filter use this)."""

    async def unwatch(self, pattern: str) -> None:  # noqa: B027 - optional hook
        """The last local subscriber for ``pattern`` left."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop delivering and release resources."""


@dataclass(frozen=True, slots=True)
class TopicHistory:
    """A topic as a sequencing backplane holds it.

    ``epoch`` and ``offset`` are the topic's head (offset 0: nothing published in this epoch);
    ``entries`` the retained envelopes after the offset that was asked for, oldest first, with
    no gap between them; ``fresh`` is True when the topic had no head before this call (one was
    created, so the epoch is fixed from now on).
    """

    epoch: str
    offset: int
    entries: tuple[Envelope, ...]
    fresh: bool


class SequencingBackplane(Backplane):
    """A backplane that assigns offsets and keeps each topic's history for every node.

    Subscriptions on the backplane are reference-counted per pattern with :meth:`hold` and
    :meth:`release`; a node receives only envelopes matching a pattern it holds (possibly more,
    never fewer: the hub filters again).
    """

    def publish(self, envelope: Envelope) -> None:
        raise TypeError(f"{type(self).__name__} assigns offsets itself: use submit()")

    @abc.abstractmethod
    def submit(self, topic: str, ts: float, data: object) -> asyncio.Future[Envelope]:
        """Give ``data`` the next offset of ``topic`` and send it to every node; never blocks.

        Submissions from one node are sequenced in call order. The future resolves with the
        envelope once the offset is assigned, or fails with :class:`protocol.errors.Unavailable`
        (the message may or may not have been published). Raises
        :class:`protocol.errors.Unavailable` at once when the bounded backlog is full and
        :class:`protocol.errors.UsageError` for data that cannot be encoded.
        """

    @abc.abstractmethod
    def hold(self, pattern: str) -> asyncio.Future[None]:
        """Start (or keep) receiving envelopes matching ``pattern``. The future resolves once
        the backplane delivers them, and is never failed: wait for it with a timeout."""

    @abc.abstractmethod
    def release(self, pattern: str) -> None:
        """Undo one :meth:`hold`; the last release stops the envelopes of ``pattern``."""

    @abc.abstractmethod
    def observe(self, topic: str, callback: Deliver) -> Callable[[], None]:
        """Also hand every envelope of exact ``topic`` this node receives to ``callback``
        (before ``deliver``); returns the function that stops it."""

    @abc.abstractmethod
    async def recent(self, topic: str, after: int | None) -> TopicHistory:
        """The head of ``topic`` and its retained envelopes with offset above ``after`` (none when
        ``after`` is None), creating the head when missing.

        When it returns, every envelope of ``topic`` up to the returned offset that was
        published while a matching pattern was held (:meth:`hold` resolved) has already been
        handed to observers and ``deliver``: a subscriber that adds itself after the call misses
        nothing and sees nothing twice. Raises :class:`protocol.errors.Unavailable` when the
        backplane cannot be reached in time.
        """

    async def watch(self, pattern: str) -> None:
        await self.hold(pattern)

    async def unwatch(self, pattern: str) -> None:
        self.release(pattern)
