"""The worker process: connect, authenticate, join the pool, run jobs, report, drain.

- Joins with ``work`` for its queues and a concurrency; the broker never pushes more than that.
- Runs each job's handler as a task; sends ``heartbeat`` every third of the lease while it holds
  jobs, so a long job keeps its lease; ``JobContext.progress`` renews it too.
- The result write (``done``/``fail``) is shielded from cancellation: a job that finished is
  reported even while the worker is stopping.
- On a lost connection the broker has already put this worker's jobs back, so the running ones
  are cancelled; after reconnecting (backoff with jitter, by the client) it joins again.
- SIGTERM/SIGINT: drain. It tells the broker to send nothing new (``concurrency`` 0), finishes what
  it holds, and exits 0. A second signal cancels the running jobs.
- Burst mode: exit once its queues have nothing queued, retrying or active.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import traceback
from collections.abc import Sequence
from typing import Any

from protocol.errors import Conflict, ProtocolError, Unauthorized
from protocol.frames import (
    Cancel,
    Done,
    Fail,
    Heartbeat,
    Job,
    JobId,
    Progress,
    ServerFrame,
    Stats,
    Work,
)
from quicksilver.client import Client

from . import builtin  # noqa: F401 - registers the built-in handlers
from .registry import JobContext, PermanentFailure, Registry, registry

log = logging.getLogger("quicksilver.worker")


class Worker:
    """One worker connection with its running jobs."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        queues: Sequence[str] = (),
        concurrency: int = 4,
        handlers: Registry | None = None,
        burst: bool = False,
        burst_check: float = 0.2,
    ) -> None:
        self.handlers = handlers or registry
        self.queues = tuple(queues) or tuple(self.handlers.names())
        if not self.queues:
            raise ValueError("no queue to work on: give --queue or load handlers with --app")
        self.concurrency = concurrency
        self.burst = burst
        self.burst_check = burst_check
        self.client = Client(url, token, on_frame=self._on_frame, on_reconnect=self._on_reconnect)
        self.running: dict[str, tuple[asyncio.Task[None], JobContext]] = {}
        self.lease = 30.0
        self.draining = False
        self.done_count = 0
        self.failed_count = 0
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self) -> int:
        """Work until drained (signal), burst completion, or a refused token. Returns exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread
                pass
        try:
            await self.client.connect()
        except Unauthorized as exc:
            log.error("token refused: %s", exc.message)
            return 1
        except ProtocolError as exc:
            log.error("cannot connect to %s: %s", self.client.url, exc.message)
            return 1
        try:
            await self._join()
            tasks = [asyncio.create_task(self._heartbeats())]
            if self.burst:
                tasks.append(asyncio.create_task(self._burst_watch()))
            stopped = asyncio.create_task(self.client.wait_stopped())
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait([stopped, stop], return_when=asyncio.FIRST_COMPLETED)
            if stopped.done():
                reason = stopped.result()
                log.error("connection ended: %s", reason.message if reason else "closed")
                for t in tasks:
                    t.cancel()
                stop.cancel()
                return 1
            await self._drain()
            for t in tasks:
                t.cancel()
            stopped.cancel()
            return 0
        finally:
            await self.client.close()

    def request_stop(self) -> None:
        if self._stop.is_set():
            log.warning("second stop request: cancelling %d running job(s)", len(self.running))
            for task, _ctx in self.running.values():
                task.cancel()
            return
        log.info("draining: finishing %d job(s), taking no new one", len(self.running))
        self._stop.set()

    async def _join(self) -> None:
        ok = await self.client.request(
            Work(id=None, queues=self.queues, concurrency=0 if self.draining else self.concurrency)
        )
        lease = ok.fields.get("lease")
        if isinstance(lease, int | float) and lease > 0:
            self.lease = float(lease)
        log.info(
            "joined the pool for %s with concurrency %d", ", ".join(self.queues), self.concurrency
        )

    async def _drain(self) -> None:
        self.draining = True
        with contextlib.suppress(ProtocolError):
            await self.client.request(Work(id=None, queues=self.queues, concurrency=0))
        await self._idle.wait()

    async def _on_reconnect(self) -> None:
        # The broker put back every job this connection held when it dropped.
        for task, _ctx in list(self.running.values()):
            task.cancel()
        await self._join()

    def _on_frame(self, frame: ServerFrame) -> None:
        if isinstance(frame, Job):
            self._start_job(frame)
        elif isinstance(frame, Cancel):
            entry = self.running.get(frame.job)
            if entry is not None:
                entry[1].cancelled.set()
                entry[0].cancel()

    def _start_job(self, frame: Job) -> None:
        if frame.lease > 0:
            self.lease = frame.lease

        async def report(data: Any) -> None:
            await self.client.send(Progress(job=frame.job, attempt=frame.attempt, data=data))

        ctx = JobContext(
            job=frame.job,
            queue=frame.queue,
            attempt=frame.attempt,
            payload=frame.payload,
            lease=frame.lease,
            report=report,
        )
        task = asyncio.create_task(self._run_job(ctx), name=f"job-{frame.job}")
        self.running[frame.job] = (task, ctx)
        self._idle.clear()

    async def _run_job(self, ctx: JobContext) -> None:
        outcome: Done | Fail
        fn = self.handlers.get(ctx.queue)
        try:
            if fn is None:
                raise PermanentFailure(f"this worker has no handler for queue {ctx.queue!r}")
            result = await fn(ctx)
            outcome = Done(id=None, job=JobId(ctx.job), attempt=ctx.attempt, result=result)
        except asyncio.CancelledError:
            outcome = Fail(
                id=None,
                job=JobId(ctx.job),
                attempt=ctx.attempt,
                error="cancelled",
                retry=not ctx.cancelled.is_set(),
            )
        except PermanentFailure as exc:
            outcome = Fail(
                id=None,
                job=JobId(ctx.job),
                attempt=ctx.attempt,
                error=str(exc) or "failed",
                retry=False,
            )
        except Exception as exc:
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            outcome = Fail(id=None, job=JobId(ctx.job), attempt=ctx.attempt, error=last)
        try:
            await asyncio.shield(self._report(outcome))
        finally:
            self.running.pop(ctx.job, None)
            if not self.running:
                self._idle.set()

    async def _report(self, outcome: Done | Fail) -> None:
        try:
            await self.client.request(outcome)
            if isinstance(outcome, Done):
                self.done_count += 1
            else:
                self.failed_count += 1
        except Conflict as exc:
            log.info("result of job %s not stored: %s", outcome.job, exc.message)
        except ProtocolError as exc:
            log.warning("could not report job %s: %s", outcome.job, exc.message)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.lease / 3))
            if self.running and self.client.connected.is_set():
                with contextlib.suppress(ProtocolError):
                    await self.client.send(Heartbeat())

    async def _burst_watch(self) -> None:
        """Stop once none of this worker's queues has a job left to do."""
        while True:
            await asyncio.sleep(self.burst_check)
            if self.running or not self.client.connected.is_set():
                continue
            try:
                ok = await self.client.request(Stats(id=None))
            except ProtocolError:
                continue
            stats = ok.fields.get("queues") or {}
            left = 0
            for name in self.queues:
                counts = (stats.get(name) or {}).get("counts") or {}
                left += sum(int(counts.get(s, 0)) for s in ("queued", "retrying", "active"))
            if left == 0 and not self.running:
                self._stop.set()
                return


def run_worker(
    *,
    url: str,
    token: str,
    queues: Sequence[str] = (),
    concurrency: int = 4,
    apps: Sequence[str] = (),
    burst: bool = False,
) -> int:
    """Entry point of ``quicksilver worker``; returns the process exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for module in apps:
        registry.load(module)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run

    async def main() -> int:
        worker = Worker(url, token, queues=queues, concurrency=concurrency, burst=burst)
        return await worker.run()

    try:
        return int(runner(main()))
    except ValueError as exc:
        log.error("%s", exc)
        return 2
