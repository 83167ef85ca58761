"""Built-in job handlers shipped with the worker.

``echo`` returns its payload (a smoke test for a deployment). The CPAN Testers ``reports``
handler is added by the report pipeline.
"""

from __future__ import annotations

from typing import Any

from . import reports  # noqa: F401 - registers the CPAN Testers ``reports`` handler
from .registry import JobContext, handler


@handler("echo")
async def echo(job: JobContext) -> Any:
    """Return the payload unchanged."""
    return job.payload
