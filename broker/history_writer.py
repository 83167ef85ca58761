"""Persisted topic history: from the topic log's outbox to the store, in the background.

Publishing never waits for the store. :meth:`TopicLog.append` puts each message of a persisted
topic in the log's outbox; one task here takes everything queued (up to ``batch_max``) and hands
it to :meth:`Store.append_messages` as one write, which the store's group-commit writer commits
together with other writes. While a batch is being written, new messages queue up and form the
next batch, so a burst of N messages costs a few transactions, not N.

Until the store has a message, the topic log keeps it in memory (see :mod:`broker.history`), so
recovery can always serve it: from the memory window first, from the store for older offsets.

Restarts: the store's ``meta`` table holds the history *generation* (see
:func:`broker.history.derived_epoch`) and a clean-stop mark. :meth:`HistoryWriter.start` loads
the topics' heads (epoch and last offset) so offsets and epochs continue; when the previous run
did not stop cleanly (messages may have been lost on their way to the store), it starts a new
generation, which gives every persisted topic a new epoch.

Retention: every ``trim_interval`` seconds, topics that received messages are trimmed to their
rule (count and age), and a slice of the other persisted topics is trimmed by age, so idle topics
expire too. Reads also apply the rules, so trimming late never serves expired messages.

Failure behaviour: a store that is unavailable is retried with backoff while messages wait in
the outbox (bounded: the oldest are dropped beyond ``outbox_max``); a batch the store refuses
for good (a bug, or another writer on the same database) is logged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from protocol.errors import QuicksilverError, Unavailable

from .history import Pending, TopicLog, new_epoch, parse_rules
from .ratelimit import policy
from .store.base import Store, StoredMessage

if TYPE_CHECKING:
    from .config import Settings
    from .hub import Hub

log = logging.getLogger("quicksilver.history")

GENERATION_KEY = "history.generation"
CLEAN_KEY = "history.clean"


def _json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class HistoryWriter:
    """Writes persisted topics' messages to the store and trims them; see the module docstring.

    ``batch_max`` caps the messages of one store write; ``trim_interval`` and ``trim_batch``
    pace retention (idle topics are swept at most ``trim_batch`` per interval);
    ``rate_interval`` is how often topic message rates are sampled.
    """

    def __init__(
        self,
        store: Store,
        topics: TopicLog,
        *,
        batch_max: int = 1000,
        trim_interval: float = 60.0,
        trim_batch: int = 256,
        rate_interval: float = 5.0,
        retry_initial: float = 0.05,
        retry_max: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.topics = topics
        self.batch_max = max(1, batch_max)
        self.trim_interval = trim_interval
        self.trim_batch = max(1, trim_batch)
        self.rate_interval = rate_interval
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.clock = clock
        #: Whether the previous run stopped cleanly (set by :meth:`start`).
        self.clean_start = True
        #: Batches the store refused for good.
        self.failed_batches = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._inflight: list[Pending] = []
        self._dirty: set[str] = set()
        self._sweep: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def pending(self) -> int:
        """Messages not yet in the store."""
        return len(self.topics.outbox) + len(self._inflight)

    async def start(self) -> None:
        """Load the generation and heads from the store and start the background tasks."""
        store = self.store
        generation = await store.get_meta(GENERATION_KEY)
        clean = await store.get_meta(CLEAN_KEY)
        if generation is None or clean != "1":
            if generation is not None:
                self.clean_start = False
                log.warning(
                    "the previous run did not stop cleanly: persisted topics start new epochs "
                    "(clients recovering them get recovered=false)"
                )
            generation = new_epoch()
            await store.set_meta(GENERATION_KEY, generation)
        await store.set_meta(CLEAN_KEY, "0")
        heads = await store.topic_heads()
        kept = self.topics.load(generation, heads)
        self._sweep = self.topics.persisted_topics()
        log.debug("history: %d persisted topics loaded", kept)
        self.topics.on_outbox = self._wake_up
        if self.topics.outbox:
            self._wake_up()
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="history-flush"),
            asyncio.create_task(self._maintain(), name="history-maintain"),
        ]

    async def stop(self, timeout: float = 10.0) -> bool:  # noqa: ASYNC109
        """Write what is waiting (at most ``timeout`` seconds), then stop. Persisted topics
        refuse new messages from here on. Returns True, and marks the stop as clean in the
        store, when everything was written."""
        self.topics.sealed = True
        self._wake_up()
        drained = False
        try:
            async with asyncio.timeout(timeout):
                while self.pending:
                    self._drained.clear()
                    self._wake_up()
                    await self._drained.wait()
                drained = True
        except TimeoutError:
            log.error("history: %d messages could not be stored before shutdown", self.pending)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.topics.on_outbox = None
        if drained:
            try:
                await self.store.set_meta(CLEAN_KEY, "1")
            except QuicksilverError as exc:
                log.error("history: could not mark the clean stop: %s", exc)
                drained = False
        return drained

    def _wake_up(self) -> None:
        self._drained.clear()
        self._wake.set()

    # --- writing --------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        delay = self.retry_initial
        topics = self.topics
        while True:
            if not topics.outbox:
                self._drained.set()
                await self._wake.wait()
            self._wake.clear()
            if not topics.outbox:
                continue
            batch = self._inflight = topics.take(self.batch_max)
            msgs = [
                StoredMessage(st.topic, e.offset, st.epoch, e.ts, _json(e.data)) for st, e in batch
            ]
            try:
                await self.store.append_messages(msgs)
            except Unavailable as exc:
                self._inflight = []
                topics.give_back(batch)
                log.warning("history: store unavailable (%s); retrying in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(self.retry_max, delay * 2)
                continue
            except Exception:
                self.failed_batches += 1
                log.exception("history: the store refused %d messages; they are lost", len(batch))
            else:
                delay = self.retry_initial
                self._dirty.update(st.topic for st, _ in batch)
            self._inflight = []
            topics.stored(batch)

    # --- retention and rates --------------------------------------------------------------

    async def _maintain(self) -> None:
        tick = max(0.01, min(self.rate_interval, self.trim_interval))
        last_trim = self.clock()
        while True:
            await asyncio.sleep(tick)
            now = self.clock()
            self.topics.sample_rates(now)
            if now - last_trim >= self.trim_interval:
                last_trim = now
                await self.trim(now)

    async def trim(self, now: float | None = None) -> int:
        """Apply the rules to the stored history now; returns the messages deleted."""
        now = self.clock() if now is None else now
        topics = set(self._dirty)
        self._dirty.clear()
        if not self._sweep:
            self._sweep = self.topics.persisted_topics()
        for _ in range(min(self.trim_batch, len(self._sweep))):
            topics.add(self._sweep.pop())
        jobs: list[tuple[str, int, float | None]] = []
        for topic in topics:
            rule = self.topics.rule_for(topic)
            if rule is not None and rule.persisted:
                older = None if rule.max_age is None else now - rule.max_age
                jobs.append((topic, rule.keep, older))
        deleted = 0
        store = self.store
        for start in range(0, len(jobs), 256):
            results = await asyncio.gather(
                *(store.trim_messages(*job) for job in jobs[start : start + 256]),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    log.warning("history: trimming failed: %r", result)
                else:
                    deleted += result
        return deleted


async def start_history(hub: Hub, store: Store, settings: Settings) -> HistoryWriter:
    """Configure topic history, presence and rate limits from ``settings`` and start the
    writer. ValueError names an invalid setting before anything is served."""
    try:
        rules = parse_rules(settings.history_rules)
    except ValueError as exc:
        raise ValueError(f"QUICKSILVER_HISTORY_RULES: {exc}") from None
    try:
        hub.presence.configure(settings.presence_patterns)
    except ValueError as exc:
        raise ValueError(f"QUICKSILVER_PRESENCE_PATTERNS: {exc}") from None
    try:
        policy(settings.rate_limits, settings.rate_limit_burst)
    except ValueError as exc:
        raise ValueError(f"QUICKSILVER_RATE_LIMITS: {exc}") from None
    hub.log.configure(
        rules=rules,
        max_topics=settings.history_max_topics,
        outbox_max=settings.history_pending_max,
    )
    writer = HistoryWriter(store, hub.log, trim_interval=settings.history_trim_interval)
    await writer.start()
    metrics = hub.metrics
    metrics.gauge(
        "history_pending", "messages of persisted topics not yet stored", lambda: writer.pending
    )
    metrics.gauge(
        "history_dropped",
        "messages of persisted topics dropped before being stored",
        lambda: hub.log.dropped,
    )
    return writer
