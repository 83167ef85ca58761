"""The job dispatcher: pushes ready jobs to the workers connected to this node.

A worker connection joins with ``work`` (queues and a concurrency, its credit). One dispatch task
waits for a reason to look (a job enqueued, credit freed, a worker joined, a delayed job's time
came); it then claims, for every worker with free credit, up to that credit of ready jobs in one
store round (the store groups the claims into one transaction), highest priority first. Workers
are served in rotation so none starves. Delayed and retrying jobs wake the dispatcher through one
timer set to the earliest ``run_at``; nothing polls the database in a loop.

Leases: each pushed job carries a lease (``job_lease`` seconds) renewed by the worker's
``heartbeat`` and ``progress`` frames. When the worker's connection drops, its jobs go back at once;
when a lease runs out, a periodic check (``lease_check_interval``) puts the job back and tells the
holder to stop. A ``done``/``fail`` whose attempt no longer holds the job gets ``conflict`` and
changes nothing (the store fences every write by attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocol.errors import Conflict, Forbidden, NotFound
from protocol.frames import CancelJob, Done, Enqueue, Fail, Progress, Work

from .jobstate import JobState, backoff_delay
from .store.base import JobRecord, NewJob, QueueStats

if TYPE_CHECKING:
    from .connection import Connection
    from .core import Broker

log = logging.getLogger("quicksilver.jobs")


def stats_to_api(qs: QueueStats) -> dict[str, Any]:
    """A queue's figures as JSON: counts by state, oldest ready age, done in the last minute."""
    return {
        "counts": {str(state): n for state, n in qs.counts.items()},
        "oldest_ready_age": qs.oldest_ready_age,
        "done_last_minute": qs.done_last_minute,
    }


@dataclass(eq=False)
class WorkerSlot:
    """A worker connection in the pool."""

    conn: Connection
    name: str
    queues: tuple[str, ...]
    concurrency: int
    since: float
    held: dict[str, int] = field(default_factory=dict)  # job id -> attempt
    last_seen: float = 0.0
    claiming: bool = False
    gone: bool = False
    renewing: bool = False

    @property
    def free(self) -> int:
        return self.concurrency - len(self.held)

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "session": self.conn.session,
            "name": self.name,
            "queues": list(self.queues),
            "concurrency": self.concurrency,
            "since": self.since,
            "jobs": sorted(self.held),
            "heartbeat_age": round(now - self.last_seen, 3),
        }


class Dispatcher:
    """Job intake, dispatch, fencing and lease keeping for one broker node."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.store = broker.store
        self.settings = broker.settings
        self.metrics = broker.metrics
        self.workers: dict[Connection, WorkerSlot] = {}
        self._rotation: deque[WorkerSlot] = deque()
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed_queues: set[str] = set()
        self.running = False
        #: Queue name → callback run with each job of that queue the store has just marked
        #: done (after its state is published). A callback must not block; one that raises is
        #: logged and the worker still gets its ``ok``.
        self.done_hooks: dict[str, Callable[[JobRecord], None]] = {}

    # --- lifecycle ----------------------------------------------------

    async def start(self) -> None:
        # One node owns the embedded store: whatever was active when it stopped has no worker now.
        # A shared store's active jobs may be held through other nodes: they expire instead.
        if self.store.single_node:
            for rec in await self.store.requeue_active("broker restarted"):
                self._publish_state(rec)
        self.running = True
        self._wake.set()
        # Delayed jobs from before this start: one timer for the earliest of them.
        next_at = await self.store.next_run_at(await self._all_queues())
        if next_at is not None:
            self._wake_at(next_at)
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="dispatch"),
            asyncio.create_task(self._lease_loop(), name="leases"),
            asyncio.create_task(self._stats_loop(), name="queue-stats"),
        ]

    async def stop(self) -> None:
        self.running = False
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    def jobs_ready(self, queue: str | None, run_at: float) -> None:
        """A job of ``queue`` became ready at ``run_at``, possibly on another node (a shared
        store's notification); ``queue`` None: any may have."""
        if not self.running:
            return
        if run_at <= time.time():
            self.wake()
        else:
            self._wake_at(run_at)

    async def _all_queues(self) -> list[str]:
        return sorted(await self.store.queue_stats())

    # --- frames from clients ----------------------------------------------------

    async def on_enqueue(self, conn: Connection, frame: Enqueue) -> None:
        perms = conn.perms
        assert perms is not None
        if not perms.can_enqueue(frame.queue):
            raise Forbidden(f"this token may not enqueue jobs on queue {frame.queue!r}")
        rec, duplicate = await self.enqueue(
            NewJob(
                queue=frame.queue,
                payload=frame.payload,
                priority=frame.priority,
                delay=frame.delay,
                unique_key=frame.unique_key,
                max_attempts=frame.max_attempts,
            )
        )
        conn.send({"type": "ok", "id": frame.id, "job": rec.id, "duplicate": duplicate})

    async def _announced(self, job: NewJob) -> NewJob | None:
        """For a store shared by several nodes (the callers check): a worker on another node
        may take a job the moment it is committed, and its ``active`` could reach ``jobs/<id>``
        before this node's ``queued``. So the job gets its id first and ``queued`` is sequenced
        on the backplane before the insert. Returns the job with that id, or None when nothing
        was announced (a unique key, whose enqueue may return another job). Should the insert
        then fail, the caller gets the error and ``jobs/<id>`` keeps a ``queued`` message for
        an id no job has."""
        if job.unique_key is not None or job.id is not None:
            return None
        job_id = self.store.new_job_id()
        if job_id is None:
            return None
        data = {"job": job_id, "queue": job.queue, "state": str(JobState.QUEUED), "attempt": 0}
        await self.broker.publish_async(f"jobs/{job_id}", data)
        return dataclasses.replace(job, id=job_id)

    async def enqueue(self, job: NewJob) -> tuple[JobRecord, bool]:
        announced = None if self.store.single_node else await self._announced(job)
        if announced is not None:
            job = announced
        slot = self._waiting_slot(job.queue) if job.delay <= 0 else None
        if slot is None:
            rec, duplicate = await self.store.enqueue(job)
            if not duplicate:
                self.accepted(rec, announced=announced is not None)
            return rec, duplicate
        # A worker with free credit waits for this queue: enqueue and claim for it in one store
        # round, instead of a commit, a dispatcher wake-up and a second commit.
        want = slot.free
        slot.claiming = True
        try:
            rec, duplicate, jobs = await self.store.enqueue_and_claim(
                job, slot.conn.session, slot.queues, want, self.settings.job_lease
            )
        finally:
            slot.claiming = False
        if not duplicate:
            self._count_new(rec, announced is not None)
        delivered = self._deliver(slot, jobs)
        if (delivered and len(jobs) == want) or (not duplicate and rec.id not in slot.held):
            # More may be ready than the slot could take, or the new job went elsewhere.
            self.wake()
        return rec, duplicate

    def _waiting_slot(self, queue: str) -> WorkerSlot | None:
        """The next worker in rotation with free credit for ``queue`` and no claim under way."""
        rotation = self._rotation
        for i, slot in enumerate(rotation):
            if (
                slot.free > 0
                and not slot.claiming
                and not slot.gone
                and not slot.conn.closing
                and queue in slot.queues
            ):
                rotation.rotate(-(i + 1))  # the next job starts looking after this worker
                return slot
        return None

    async def enqueue_many(self, jobs: list[NewJob]) -> list[tuple[JobRecord, bool]]:
        announced: list[NewJob | None] = [None] * len(jobs)
        if not self.store.single_node:
            announced = await asyncio.gather(*(self._announced(job) for job in jobs))
            jobs = [a or job for a, job in zip(announced, jobs, strict=True)]
        results = await self.store.enqueue_many(jobs)
        for (rec, duplicate), was in zip(results, announced, strict=True):
            if not duplicate:
                self.accepted(rec, announced=was is not None)
        return results

    def accepted(self, rec: JobRecord, announced: bool = False) -> None:
        """A new job is in the store: announce it (unless ``announced`` already) and look for a
        worker."""
        self._count_new(rec, announced)
        if rec.run_at <= time.time():
            self.wake()
        else:
            self._wake_at(rec.run_at)

    def _count_new(self, rec: JobRecord, announced: bool) -> None:
        """Count a new job and publish its ``queued`` state unless it was announced before."""
        self.metrics.jobs_enqueued += 1
        if announced:
            self._changed_queues.add(rec.queue)
        else:
            self._publish_state(rec)

    def on_work(self, conn: Connection, frame: Work) -> None:
        perms = conn.perms
        assert perms is not None
        refused = [q for q in frame.queues if not perms.can_work(q)]
        if refused:
            raise Forbidden("this token may not work on queue(s) " + ", ".join(map(repr, refused)))
        now = time.time()
        slot = self.workers.get(conn)
        if slot is None:
            slot = WorkerSlot(
                conn=conn,
                name=perms.sub or conn.session,
                queues=frame.queues,
                concurrency=frame.concurrency,
                since=now,
                last_seen=now,
            )
            self.workers[conn] = slot
            self._rotation.append(slot)
            conn.worker = slot
        else:
            slot.queues = frame.queues
            slot.concurrency = frame.concurrency
        conn.send(
            {
                "type": "ok",
                "id": frame.id,
                "queues": list(frame.queues),
                "concurrency": frame.concurrency,
                "lease": self.settings.job_lease,
            }
        )
        self.broker.publish("workers/events", {"event": "join", **slot.describe(now)})
        self.wake()

    def _slot(self, conn: Connection) -> WorkerSlot:
        slot = self.workers.get(conn)
        if slot is None:
            raise Forbidden("send a work frame first: this connection is not a worker")
        return slot

    def on_progress(self, conn: Connection, frame: Progress) -> None:
        slot = self._slot(conn)
        if slot.held.get(frame.job) != frame.attempt:
            conn.send_error(
                None,
                Conflict(f"job {frame.job} attempt {frame.attempt} is not held by this connection"),
            )
            return
        slot.last_seen = time.time()
        self.broker.spawn(self._progress(slot, frame))

    async def _progress(self, slot: WorkerSlot, frame: Progress) -> None:
        rec = await self.store.progress(
            frame.job, frame.attempt, frame.data, time.time() + self.settings.job_lease
        )
        if rec is not None:
            self.broker.publish(
                f"jobs/{rec.id}",
                {
                    "job": rec.id,
                    "queue": rec.queue,
                    "state": str(rec.state),
                    "attempt": rec.attempt,
                    "progress": rec.progress,
                },
            )

    def on_heartbeat(self, conn: Connection) -> None:
        slot = self._slot(conn)
        slot.last_seen = time.time()
        if slot.held and not slot.renewing:
            slot.renewing = True
            self.broker.spawn(self._renew(slot))

    async def _renew(self, slot: WorkerSlot) -> None:
        try:
            await self.store.renew(slot.conn.session, time.time() + self.settings.job_lease)
        finally:
            slot.renewing = False

    async def on_done(self, conn: Connection, frame: Done) -> None:
        slot = self._slot(conn)
        slot.last_seen = time.time()
        try:
            rec = await self.store.complete(
                frame.job, frame.attempt, frame.result, worker=conn.session
            )
        finally:
            self._release(slot, frame.job, frame.attempt)
        if rec is None:
            self.metrics.job_conflicts += 1
            raise Conflict(
                f"job {frame.job} attempt {frame.attempt} no longer holds the job; "
                "the result was not stored"
            )
        self.metrics.jobs_done += 1
        self._publish_state(rec)
        hook = self.done_hooks.get(rec.queue)
        if hook is not None:
            try:
                hook(rec)
            except Exception:
                log.exception("done callback of queue %r failed", rec.queue)
        conn.send({"type": "ok", "id": frame.id})

    async def on_fail(self, conn: Connection, frame: Fail) -> None:
        slot = self._slot(conn)
        slot.last_seen = time.time()
        delay = backoff_delay(
            frame.attempt,
            base=self.settings.retry_backoff_base,
            cap=self.settings.retry_backoff_cap,
        )
        try:
            rec = await self.store.fail(
                frame.job, frame.attempt, frame.error, frame.retry, delay, worker=conn.session
            )
        finally:
            self._release(slot, frame.job, frame.attempt)
        if rec is None:
            self.metrics.job_conflicts += 1
            raise Conflict(f"job {frame.job} attempt {frame.attempt} no longer holds the job")
        self._after_failure(rec)
        conn.send({"type": "ok", "id": frame.id, "state": str(rec.state)})

    async def on_cancel(self, conn: Connection, frame: CancelJob) -> None:
        perms = conn.perms
        assert perms is not None
        rec = await self.store.get_job(frame.job)
        if rec is None:
            raise NotFound(f"no job {frame.job}")
        if not (perms.is_admin or perms.can_enqueue(rec.queue)):
            raise Forbidden(f"this token may not cancel jobs on queue {rec.queue!r}")
        rec = await self.cancel(frame.job)
        conn.send({"type": "ok", "id": frame.id, "state": str(rec.state)})

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job; its holder, if any, is told to stop. Raises NotFound or Conflict."""
        result = await self.store.cancel(job_id)
        if result is None:
            raise NotFound(f"no job {job_id}")
        rec, previous = result
        if previous is JobState.ACTIVE:
            for slot in self.workers.values():
                # The credit comes back now: a worker that drops the job without answering
                # must not lose a slot for good.
                if slot.held.pop(job_id, None) is not None:
                    slot.conn.send({"type": "cancel", "job": job_id})
                    self.wake()
        self._publish_state(rec)
        return rec

    async def retry(self, job_id: str) -> JobRecord:
        rec = await self.store.retry(job_id)
        if rec is None:
            raise NotFound(f"no job {job_id}")
        self._publish_state(rec)
        self.wake()
        return rec

    # --- workers going away ----------------------------------------------------

    def worker_gone(self, conn: Connection) -> None:
        slot = self.workers.pop(conn, None)
        if slot is None:
            return
        slot.gone = True
        conn.worker = None
        with contextlib.suppress(ValueError):
            self._rotation.remove(slot)
        self.broker.publish("workers/events", {"event": "leave", **slot.describe(time.time())})
        if slot.held:
            slot.held.clear()
            self.broker.spawn(self._release_worker(conn.session))

    async def _release_worker(self, session: str) -> None:
        for rec in await self.store.release_worker(session, retry_delay=0.0):
            self._after_failure(rec)
        self.wake()

    def _release(self, slot: WorkerSlot, job_id: str, attempt: int) -> None:
        if slot.held.get(job_id) == attempt:
            del slot.held[job_id]
            if not slot.gone:
                self.wake()

    def _after_failure(self, rec: JobRecord) -> None:
        if rec.state is JobState.RETRYING:
            self.metrics.jobs_retried += 1
            self._wake_at(rec.run_at)
        elif rec.state is JobState.FAILED:
            self.metrics.jobs_failed += 1
        self._publish_state(rec)

    # --- dispatch ----------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._dispatch_round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dispatch round failed; retrying shortly")
                self._wake_at(time.time() + 0.5)

    async def _dispatch_round(self) -> None:
        rotation = self._rotation
        slots = [s for s in rotation if s.free > 0 and not s.claiming and not s.gone]
        if not slots:
            return
        rotation.rotate(-1)  # the next round starts with another worker
        results = await asyncio.gather(*(self._claim_for(s) for s in slots))
        if any(results):
            # Someone got all it asked for: there may be more ready work.
            self._wake.set()
        # Jobs that become ready later (delays, retry backoff) set the timer when they are
        # accepted or fail; the store is asked only once, at start (see ``start``).

    async def _claim_for(self, slot: WorkerSlot) -> bool:
        """Claim up to the slot's free credit; True when it got everything it asked for."""
        want = slot.free
        slot.claiming = True
        try:
            jobs = await self.store.claim(
                slot.conn.session, slot.queues, want, self.settings.job_lease
            )
        finally:
            slot.claiming = False
        return self._deliver(slot, jobs) and len(jobs) == want and want > 0

    def _deliver(self, slot: WorkerSlot, jobs: list[JobRecord]) -> bool:
        """Push jobs just claimed for ``slot``; False when the slot left meanwhile: it gets
        nothing and its jobs go back."""
        if slot.gone or slot.conn.closing:
            if jobs:
                self.broker.spawn(self._release_worker(slot.conn.session))
            return False
        now = time.time()
        lease = self.settings.job_lease
        for rec in jobs:
            slot.held[rec.id] = rec.attempt
            slot.conn.send(
                {
                    "type": "job",
                    "job": rec.id,
                    "queue": rec.queue,
                    "attempt": rec.attempt,
                    "payload": rec.payload,
                    "lease": lease,
                }
            )
            self.metrics.jobs_dispatched += 1
            self.metrics.pickup_latency.observe(max(0.0, now - rec.run_at))
            self._publish_state(rec, worker=slot.name)
        return True

    def _wake_at(self, when: float) -> None:
        """Wake the dispatcher at unix time ``when`` (keeps only the earliest pending timer)."""
        if self._timer_at is not None and self._timer_at <= when and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - time.time())
        self._timer_at = when
        self._timer = loop.call_later(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_at = None
        self.wake()

    # --- leases and stats ----------------------------------------------------

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_check_interval)
            try:
                expired = await self.store.expire_leases()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lease check failed")
                continue
            for rec in expired:
                for slot in self.workers.values():
                    if rec.id in slot.held:
                        del slot.held[rec.id]
                        slot.conn.send({"type": "cancel", "job": rec.id})
                self._after_failure(rec)
            if expired:
                self.wake()

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if not self._changed_queues:
                continue
            changed, self._changed_queues = self._changed_queues, set()
            try:
                stats = await self.store.queue_stats()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("queue stats failed")
                continue
            for name in changed:
                qs = stats.get(name)
                if qs is not None:
                    self.broker.publish(f"queues/{name}", stats_to_api(qs))

    def _publish_state(self, rec: JobRecord, worker: str | None = None) -> None:
        data: dict[str, Any] = {
            "job": rec.id,
            "queue": rec.queue,
            "state": str(rec.state),
            "attempt": rec.attempt,
        }
        if worker is not None:
            data["worker"] = worker
        if rec.state is JobState.DONE:
            data["result"] = rec.result
        elif rec.error is not None and rec.state in (JobState.FAILED, JobState.RETRYING):
            data["error"] = rec.error
            data["run_at"] = rec.run_at
        self.broker.publish(f"jobs/{rec.id}", data)
        self._changed_queues.add(rec.queue)
