"""The job handler the jobs benchmark runs in its worker processes."""

from __future__ import annotations

import time
from typing import Any

from workers import JobContext, handler


@handler("bench-jobs")
async def bench_job(job: JobContext) -> Any:
    """Return how long the job waited from its producer's send to this worker's start."""
    sent = job.payload.get("t") if isinstance(job.payload, dict) else None
    return {"pickup": time.time() - sent} if isinstance(sent, float) else None
