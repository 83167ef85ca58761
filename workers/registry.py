"""Job handlers, registered by the name of the queue they serve.

A handler is an async function taking a :class:`JobContext` and returning the job's result (any
JSON-portable value). Raising :class:`PermanentFailure` fails the job without retry; any other
exception fails this attempt and the broker retries it with backoff while attempts remain.

User code adds handlers from a module given with ``quicksilver worker --app MODULE``::

    from workers import handler

    @handler("thumbnails")
    async def make_thumbnail(job):
        await job.progress({"step": "resize"})
        return {"ok": True}
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

Handler = Callable[["JobContext"], Awaitable[Any]]


class PermanentFailure(Exception):
    """Raised by a handler: the job fails for good (``retry: false``)."""


@dataclass
class JobContext:
    """What a handler gets: the job, a progress reporter, and a cancellation flag."""

    job: str
    queue: str
    attempt: int
    payload: Any
    lease: float
    report: Callable[[Any], Awaitable[None]]
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def progress(self, data: Any) -> None:
        """Publish progress on ``jobs/<id>`` (merged with earlier progress; renews the lease)."""
        await self.report(data)


class Registry:
    """Queue name → handler."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def add(self, name: str, fn: Handler) -> None:
        self.handlers[name] = fn

    def get(self, name: str) -> Handler | None:
        return self.handlers.get(name)

    def names(self) -> list[str]:
        return sorted(self.handlers)

    def load(self, module: str) -> None:
        """Import ``module``; its ``@handler`` decorators register into this process's registry,
        and a module-level ``HANDLERS`` dict (name → function), if present, is added too."""
        mod = importlib.import_module(module)
        extra = getattr(mod, "HANDLERS", None)
        if isinstance(extra, dict):
            for name, fn in extra.items():
                self.add(str(name), fn)


registry = Registry()


def handler(name: str) -> Callable[[Handler], Handler]:
    """Register the decorated async function as the handler of queue ``name``."""

    def register(fn: Handler) -> Handler:
        registry.add(name, fn)
        return fn

    return register
