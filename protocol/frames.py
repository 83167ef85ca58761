"""Every frame of protocol v1 as a typed, immutable value.

The broker and workers never pass raw dicts around: frames are decoded once, at the edge, into
these classes (see :mod:`protocol.codec`). Field names are the wire names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, NewType, TypeAlias

JobId = NewType("JobId", str)
RequestId: TypeAlias = str | int | None
JSONValue: TypeAlias = Any


@dataclass(frozen=True, slots=True)
class Since:
    """A recovery position: the last offset seen on a topic and the topic's epoch."""

    offset: int
    epoch: str


# --- client to server -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Auth:
    type: ClassVar[str] = "auth"
    token: str | None = None
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Refresh:
    type: ClassVar[str] = "refresh"
    id: RequestId
    token: str


@dataclass(frozen=True, slots=True)
class Ping:
    type: ClassVar[str] = "ping"
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Subscribe:
    type: ClassVar[str] = "subscribe"
    id: RequestId
    topic: str
    since: Since | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    type: ClassVar[str] = "unsubscribe"
    id: RequestId
    topic: str


@dataclass(frozen=True, slots=True)
class Publish:
    type: ClassVar[str] = "publish"
    id: RequestId
    topic: str
    data: JSONValue = None


@dataclass(frozen=True, slots=True)
class Enqueue:
    type: ClassVar[str] = "enqueue"
    id: RequestId
    queue: str
    payload: JSONValue = None
    priority: int = 0
    delay: float = 0.0
    unique_key: str | None = None
    max_attempts: int = 5


@dataclass(frozen=True, slots=True)
class Work:
    """Join the worker pool. ``concurrency`` 0 keeps the membership but takes no new job (drain)."""

    type: ClassVar[str] = "work"
    id: RequestId
    queues: tuple[str, ...]
    concurrency: int = 1


@dataclass(frozen=True, slots=True)
class Progress:
    type: ClassVar[str] = "progress"
    job: JobId
    attempt: int
    data: JSONValue = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Renews the lease of every job the sending worker connection holds (no reply)."""

    type: ClassVar[str] = "heartbeat"


@dataclass(frozen=True, slots=True)
class Done:
    type: ClassVar[str] = "done"
    id: RequestId
    job: JobId
    attempt: int
    result: JSONValue = None


@dataclass(frozen=True, slots=True)
class Fail:
    type: ClassVar[str] = "fail"
    id: RequestId
    job: JobId
    attempt: int
    error: str = ""
    retry: bool = True


@dataclass(frozen=True, slots=True)
class Stats:
    """Asks for queue statistics (the queues the token may work on or enqueue to)."""

    type: ClassVar[str] = "stats"
    id: RequestId


@dataclass(frozen=True, slots=True)
class CancelJob:
    """A client's request to cancel a job (needs the right to produce to its queue)."""

    type: ClassVar[str] = "cancel"
    id: RequestId
    job: JobId


ClientFrame: TypeAlias = (
    Auth
    | Refresh
    | Ping
    | Subscribe
    | Unsubscribe
    | Publish
    | Enqueue
    | Work
    | Progress
    | Heartbeat
    | Done
    | Fail
    | CancelJob
    | Stats
)


# --- server to client -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome:
    type: ClassVar[str] = "welcome"
    session: str
    sub: str | None
    roles: tuple[str, ...]
    expires_at: int | None
    server: str


@dataclass(frozen=True, slots=True)
class Ok:
    """Success. ``fields`` holds the extra keys (``offset``, ``job``, ``recovered``, ...)."""

    type: ClassVar[str] = "ok"
    id: RequestId
    fields: dict[str, JSONValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Error:
    type: ClassVar[str] = "error"
    id: RequestId
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Pong:
    type: ClassVar[str] = "pong"
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Message:
    type: ClassVar[str] = "message"
    topic: str
    offset: int
    epoch: str
    ts: float
    data: JSONValue = None


@dataclass(frozen=True, slots=True)
class Job:
    type: ClassVar[str] = "job"
    job: JobId
    queue: str
    attempt: int
    payload: JSONValue
    lease: float


@dataclass(frozen=True, slots=True)
class Cancel:
    """Tells a worker to stop the job it holds."""

    type: ClassVar[str] = "cancel"
    job: JobId


ServerFrame: TypeAlias = Welcome | Ok | Error | Pong | Message | Job | Cancel
Frame: TypeAlias = ClientFrame | ServerFrame
