"""Mercury's push/pull on the durable job queue.

Every pushed message becomes a job on the queue ``mercury.push:<topic>`` (so it survives a
restart and waits while no puller is connected), and each job goes to exactly one puller, round
robin in the order the pullers connected. Native programs take part through the same queue: a
worker with ``work`` on ``mercury.push:<topic>`` competes with the Mercury pullers, and an
``enqueue`` there reaches them.

One :class:`PullPool` per topic on this node:

- pushes are stored in the order they arrive (one writer task per pool, stored in groups);
- while the pool has pullers it claims ready jobs from the store (woken by its own pushes, and
  every ``poll_interval`` for jobs enqueued elsewhere; at most ``batch`` at a time) and deals them
  out round robin;
- a puller whose buffer is full is passed over (flow control, not a slow-consumer close: the
  messages wait in the store instead of in memory); when every puller is full, dealing waits for
  one to write something;
- a job is marked done once its message was written to the puller's socket; a puller that goes
  away with messages still in its buffer gives them back, and they go to the next pullers first;
- jobs claimed while the last puller left are kept (their lease renewed) until one comes back.

Round robin: pullers form a list in connect order and a cursor names the next one. A puller that
leaves is removed from the list and the cursor moves with the list, so the rotation goes on with
the same successor whatever order pullers leave in (Mercury's index arithmetic could point past
the end and crash).

Failure behaviour: a store that fails a push answers the POST with 503 (the WebSocket pusher's
message is logged as lost); a failed claim is retried after ``poll_interval``. Delivery is at
least once: a broker stopped while messages are in flight delivers them again after its restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .mercury_payload import Payload, from_data, to_data
from .store.base import JobRecord, NewJob

if TYPE_CHECKING:
    from .core import Broker

log = logging.getLogger("quicksilver.pushpull")

QUEUE_PREFIX = "mercury.push:"

#: Push jobs are given this many attempts; a message only counts an attempt when a broker that
#: held it stopped, so the bound is never reached in practice.
PUSH_MAX_ATTEMPTS = 1000


def queue_for(topic: str) -> str:
    return QUEUE_PREFIX + topic


class Puller(Protocol):
    """A connection that can take pushed messages (a Mercury ``/pull`` WebSocket)."""

    def __hash__(self) -> int: ...

    def has_room(self, size: int) -> bool:
        """Can ``size`` more bytes wait in its buffer without overflowing it?"""
        ...

    def offer(self, payload: Payload, ticket: Ticket | None = None) -> bool:
        """Queue ``payload``; False when the connection is closed. A ticket comes back through
        :meth:`Ticket.delivered` once written, or through :meth:`PullPool.give_back` when the
        connection goes away first."""
        ...


class Ticket:
    """One pushed message in a puller's buffer."""

    __slots__ = ("job", "pool")

    def __init__(self, pool: PullPool, job: JobRecord) -> None:
        self.pool = pool
        self.job = job

    def delivered(self) -> None:
        self.pool.delivered(self.job)


class PullPool:
    """The pullers of one topic on this node and the queue behind them.

    ``on_idle`` is called once the pool has no pullers and nothing in flight, so its owner can
    drop it. ``batch`` bounds the jobs claimed at once; each puller's own buffer bound (see
    :mod:`broker.mercury`) limits what waits in memory for a slow puller.
    """

    def __init__(
        self,
        broker: Broker,
        topic: str,
        *,
        on_idle: Callable[[PullPool], None],
        poll_interval: float = 1.0,
        batch: int = 64,
    ) -> None:
        self.broker = broker
        self.store = broker.store
        self.topic = topic
        self.queue = queue_for(topic)
        self.worker = f"mercury-pull:{topic}"
        self.on_idle = on_idle
        self.poll_interval = poll_interval
        self.batch = batch
        self.pullers: list[Puller] = []
        self.cursor = 0
        #: Claimed from the store, not yet handed to a puller (oldest first).
        self.held: deque[JobRecord] = deque()
        #: Handed to a puller's buffer, not yet written: job id → record.
        self.outstanding: dict[str, JobRecord] = {}
        self._intake: list[tuple[NewJob, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last_renew = 0.0
        self.closed = False

    # --- pullers ------------------------------------------------------------------------------

    def add_puller(self, puller: Puller) -> None:
        """Join the rotation at its end (Mercury's connect order)."""
        self.pullers.append(puller)
        self._ensure_runner()
        self._wake.set()

    def remove_puller(self, puller: Puller) -> None:
        """Leave the rotation; the next message goes to the puller that would have been next."""
        try:
            i = self.pullers.index(puller)
        except ValueError:
            return
        del self.pullers[i]
        if i < self.cursor:
            self.cursor -= 1
        if self.cursor >= len(self.pullers):
            self.cursor = 0
        self._check_idle()

    def _next_puller(self, size: int) -> Puller | None:
        """The next puller in the rotation with room for ``size`` bytes (None: all are full)."""
        pullers = self.pullers
        for _ in range(len(pullers)):
            puller = pullers[self.cursor]
            self.cursor = (self.cursor + 1) % len(pullers)
            if puller.has_room(size):
                return puller
        return None

    # --- pushes -------------------------------------------------------------------------------

    def push(self, payload: Payload) -> asyncio.Future[bool]:
        """Store a pushed message; the future is True once it is durable, False if storing
        failed (logged). Pushes are stored in call order."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        job = NewJob(queue=self.queue, payload=to_data(payload), max_attempts=PUSH_MAX_ATTEMPTS)
        self._intake.append((job, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name=f"push:{self.topic}")
        return future

    @property
    def backlog(self) -> int:
        """Pushes accepted but not yet stored."""
        return len(self._intake)

    async def _write(self) -> None:
        while self._intake:
            batch, self._intake = self._intake, []
            try:
                await self.broker.jobs.enqueue_many([job for job, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    if not future.done():
                        future.set_result(False)
                raise
            except Exception:
                log.exception("storing %d pushed message(s) on %r failed", len(batch), self.topic)
                ok = False
            else:
                ok = True
            for _, future in batch:
                if not future.done():
                    future.set_result(ok)
            if ok and self.pullers:
                self._ensure_runner()
                self._wake.set()
        self._check_idle()

    # --- dealing ------------------------------------------------------------------------------

    def _ensure_runner(self) -> None:
        if not self.closed and (self._runner is None or self._runner.done()):
            self._runner = asyncio.create_task(self._run(), name=f"pull:{self.topic}")

    async def _run(self) -> None:
        woken = True  # the first look goes to the store at once
        while not self.closed:
            self._deal()
            if not self.pullers:
                if not self.held:
                    break
                await self._sleep(self._renew_every())
                await self._renew()
                continue
            if not self.held and (woken or await self._due()):
                try:
                    jobs = await self.store.claim(
                        self.worker, [self.queue], self.batch, self.broker.settings.job_lease
                    )
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("claiming pushed messages on %r failed", self.topic)
                    jobs = []
                if jobs:
                    self._last_renew = time.monotonic()
                    for rec in jobs:
                        announce(self.broker, rec)
                    self.held.extend(jobs)
                    continue
            await self._renew()
            woken = await self._sleep(min(self.poll_interval, self._renew_every()))
        self._check_idle()

    def _deal(self) -> None:
        """Hand held jobs to pullers, round robin, until the jobs run out or every puller's
        buffer is full."""
        held = self.held
        while held and self.pullers:
            rec = held[0]
            payload = from_data(rec.payload)
            puller = self._next_puller(len(payload))
            if puller is None:
                return
            held.popleft()
            self.outstanding[rec.id] = rec
            if not puller.offer(payload, Ticket(self, rec)):
                self.outstanding.pop(rec.id, None)
                held.appendleft(rec)

    async def _due(self) -> bool:
        """Is a job ready in the store? (a read; the claim itself is a write)"""
        try:
            at = await self.store.next_run_at([self.queue])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("looking for pushed messages on %r failed", self.topic)
            return False
        return at is not None and at <= time.time()

    async def _sleep(self, seconds: float) -> bool:
        """Wait for a wake-up, at most ``seconds``; True when woken."""
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            return False
        finally:
            self._wake.clear()
        return True

    def _renew_every(self) -> float:
        return max(0.05, self.broker.settings.job_lease / 3)

    async def _renew(self) -> None:
        if not (self.held or self.outstanding):
            return
        now = time.monotonic()
        if now - self._last_renew < self._renew_every():
            return
        self._last_renew = now
        try:
            await self.store.renew(self.worker, time.time() + self.broker.settings.job_lease)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("renewing the lease of pushed messages on %r failed", self.topic)

    def delivered(self, rec: JobRecord) -> None:
        """The message of ``rec`` was written to a puller: the job is done."""
        if self.outstanding.pop(rec.id, None) is None:
            return
        self.broker.spawn(self._complete(rec), name="push-done")
        if self.held:
            self._wake.set()  # the puller has room again
        self._check_idle()

    async def _complete(self, rec: JobRecord) -> None:
        done = await self.store.complete(rec.id, rec.attempt, None, worker=self.worker)
        if done is None:
            log.warning(
                "pushed message %s on %r was no longer held when delivered", rec.id, self.topic
            )
            return
        announce(self.broker, done)

    def give_back(self, tickets: list[Ticket]) -> None:
        """A puller went away before writing these (in order): deal them again first."""
        jobs = [t.job for t in tickets if self.outstanding.pop(t.job.id, None) is not None]
        if not jobs:
            return
        # Job ids grow with creation time: the oldest message goes out first.
        self.held = deque(sorted([*jobs, *self.held], key=lambda rec: rec.id))
        self._ensure_runner()
        self._wake.set()

    # --- life cycle -----------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not (
            self.pullers
            or self.held
            or self.outstanding
            or self._intake
            or (self._writer is not None and not self._writer.done())
        )

    def _check_idle(self) -> None:
        if self.idle and not self.closed:
            self.on_idle(self)

    async def close(self) -> None:
        """Stop dealing; jobs still held stay active in the store until their lease runs out
        (or the next start gives them back)."""
        self.closed = True
        tasks = [t for t in (self._runner, self._writer) if t is not None]
        if self._writer is not None and not self._writer.done():
            # Pushes already accepted are stored before the broker stops.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._writer), 5.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def announce(broker: Broker, rec: JobRecord) -> None:
    """Publish a job's new state on ``jobs/<id>`` (and count it in the queue figures), as the
    dispatcher does for the jobs it hands out."""
    publish: Any = getattr(broker.jobs, "_publish_state", None)
    if publish is not None:
        publish(rec)
        return
    broker.publish(
        f"jobs/{rec.id}",
        {"job": rec.id, "queue": rec.queue, "state": str(rec.state), "attempt": rec.attempt},
    )


__all__ = ["QUEUE_PREFIX", "PullPool", "Puller", "Ticket", "announce", "queue_for"]
