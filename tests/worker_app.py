"""Job handlers used by the tests (loaded with ``quicksilver worker --app tests.worker_app``)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from workers import JobContext, PermanentFailure, handler


@handler("t-square")
async def square(job: JobContext) -> Any:
    return {"n": job.payload["n"], "square": job.payload["n"] ** 2, "pid": os.getpid()}


@handler("t-slow")
async def slow(job: JobContext) -> Any:
    """Reports progress, then waits ``payload["seconds"]`` (a long job that keeps its lease)."""
    await job.progress({"started": True, "pid": os.getpid()})
    await asyncio.sleep(float(job.payload.get("seconds", 1.0)))
    return {"pid": os.getpid(), "attempt": job.attempt}


@handler("t-flaky")
async def flaky(job: JobContext) -> Any:
    """Fails until attempt ``payload["succeed_on"]``."""
    if job.attempt < int(job.payload["succeed_on"]):
        raise RuntimeError(f"attempt {job.attempt} fails on purpose")
    return {"attempt": job.attempt}


@handler("t-fatal")
async def fatal(job: JobContext) -> Any:
    raise PermanentFailure("this job can never succeed")


@handler("t-stall")
async def stall(job: JobContext) -> Any:
    """The first attempt hangs until cancelled (a worker to kill mid-job); later ones finish."""
    await job.progress({"pid": os.getpid(), "attempt": job.attempt})
    if job.attempt == 1:
        await asyncio.Event().wait()
    return {"pid": os.getpid(), "attempt": job.attempt}
