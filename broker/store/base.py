"""The store's vocabulary and its abstract interface.

A :class:`Store` keeps everything the broker must not lose across a restart: jobs, topic
history, revoked tokens, a small key-value table, and the CPAN Testers test reports with their
summaries, release counts, uploads and statistics counters. Implementations live one per module
(``sqlite`` now; a PostgreSQL one can follow) and all pass the same test suite.

Contract shared by every implementation:

- Every method is a coroutine and may be called concurrently from many tasks; the store
  orders them. A write has been committed when its coroutine returns.
- Job state changes follow :data:`broker.jobstate.TRANSITIONS`.
- Worker results are fenced by attempt: ``complete``, ``fail`` and ``progress`` only act on a job
  that is ``active`` with the given attempt (and the given worker, when one is named). A late
  call from a worker that lost the job returns ``None`` and changes nothing.
- Values called ``payload``, ``result``, ``progress`` and ``data`` are JSON-portable (``None``,
  bool, int, float, str, lists and str-keyed dicts of those); anything else fails the call
  with :class:`protocol.errors.UsageError`.
- Misuse (a closed store, a bad argument) raises :class:`protocol.errors.UsageError`; a request
  that meets the wrong job state raises :class:`protocol.errors.Conflict`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from broker.jobstate import JobState
from protocol.errors import QuicksilverError, UsageError
from protocol.frames import JobId

__all__ = [
    "GRADES",
    "IncomingReport",
    "JobRecord",
    "NewJob",
    "QueueStats",
    "ReleaseRecord",
    "ReportSummary",
    "SchemaTooNew",
    "Store",
    "StoredMessage",
    "UploadRecord",
]


class SchemaTooNew(QuicksilverError):
    """The database was written by a newer version of quicksilver; refusing to touch it."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message of a topic's history; ``data_json`` is the message's ``data`` as JSON text."""

    topic: str
    offset: int
    epoch: str
    ts: float
    data_json: str


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to enqueue.

    ``delay`` (seconds) puts ``run_at`` in the future; ``unique_key`` makes the enqueue a no-op
    while another unfinished job (queued, active or retrying) holds the same key, in any queue.
    Raises :class:`UsageError` for an empty queue name, ``max_attempts < 1`` or a negative or
    non-finite delay.
    """

    queue: str
    payload: Any
    priority: int = 0
    delay: float = 0.0
    unique_key: str | None = None
    max_attempts: int = 5
    #: The new job's id, made beforehand by :meth:`Store.new_job_id` of the same store (so
    #: that it can be announced before the job exists); None: the store makes one.
    id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.queue, str) or not self.queue:
            raise UsageError("a job needs a non-empty queue name")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise UsageError("priority must be an int")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise UsageError("max_attempts must be an int")
        if self.max_attempts < 1:
            raise UsageError("max_attempts must be at least 1")
        if (
            isinstance(self.delay, bool)
            or not isinstance(self.delay, int | float)
            or not math.isfinite(self.delay)
            or self.delay < 0
        ):
            raise UsageError("delay must be a finite number of seconds >= 0")
        if self.unique_key is not None and not isinstance(self.unique_key, str):
            raise UsageError("unique_key must be a str or None")
        if self.id is not None and (not isinstance(self.id, str) or not self.id):
            raise UsageError("a job id must be a non-empty str or None")


@dataclass(slots=True)
class JobRecord:
    """A job as stored. Times are unix seconds (float).

    ``attempt`` counts the claims so far (0 until a worker first takes it). ``worker`` and
    ``lease_until`` name the holder while the job is active; ``worker`` stays set afterwards as
    a record of who ran it last.
    """

    id: JobId
    queue: str
    payload: Any
    priority: int
    run_at: float
    unique_key: str | None
    max_attempts: int
    attempt: int
    state: JobState
    progress: Any
    result: Any
    error: str | None
    worker: str | None
    lease_until: float | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None

    def to_api(self) -> dict[str, Any]:
        """The job as the HTTP API and the ``jobs/<id>`` topic show it."""
        return {
            "job": self.id,
            "queue": self.queue,
            "state": self.state.value,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "priority": self.priority,
            "payload": self.payload,
            "result": self.result,
            "error": self.error,
            "progress": self.progress,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "run_at": self.run_at,
            "worker": self.worker,
        }


@dataclass(slots=True)
class QueueStats:
    """One queue's figures.

    ``counts`` has every :class:`JobState` as a key. ``oldest_ready_age`` is how long the
    longest-waiting ready job (queued or retrying, ``run_at`` passed) has waited, ``None`` when
    none is ready. ``done_last_minute`` counts jobs finished as done in the last 60 seconds.
    """

    counts: dict[JobState, int] = field(default_factory=lambda: dict.fromkeys(JobState, 0))
    oldest_ready_age: float | None = None
    done_last_minute: int = 0


GRADES = ("pass", "fail", "na", "unknown")
"""The report grades, in the order the API lists them."""

MATURITIES = ("stable", "dev")


@dataclass(frozen=True, slots=True)
class IncomingReport:
    """A test report as received: ``body`` is its JSON text, ``digest`` a hash of its canonical
    form (two reports with the same digest are the same report)."""

    id: str
    received_at: float
    digest: str
    body: str


@dataclass(frozen=True, slots=True)
class ReportSummary:
    """The few fields of a report that summaries and statistics use (one row per report).

    ``maturity`` is the tested release's (``dev`` for versions with ``_`` or ``-TRIAL``),
    ``perl_maturity`` the Perl's (``dev`` for odd Perl 5 minor versions). Raises
    :class:`UsageError` for a grade outside :data:`GRADES`, a maturity outside ``stable``/``dev``
    or a field of the wrong type.
    """

    guid: str
    dist: str
    version: str
    grade: str
    reporter: str
    platform: str
    perl: str
    perl_maturity: str
    osname: str
    osvers: str
    maturity: str
    received_at: float

    def __post_init__(self) -> None:
        for name in (
            "guid",
            "dist",
            "version",
            "grade",
            "reporter",
            "platform",
            "perl",
            "perl_maturity",
            "osname",
            "osvers",
            "maturity",
        ):
            if not isinstance(getattr(self, name), str):
                raise UsageError(f"report summary field {name!r} must be a string")
        if self.grade not in GRADES:
            raise UsageError(f"grade must be one of {', '.join(GRADES)}, not {self.grade!r}")
        if self.maturity not in MATURITIES or self.perl_maturity not in MATURITIES:
            raise UsageError("maturity and perl_maturity must be 'stable' or 'dev'")
        if (
            isinstance(self.received_at, bool)
            or not isinstance(self.received_at, int | float)
            or not math.isfinite(self.received_at)
        ):
            raise UsageError("received_at must be a finite number of unix seconds")


@dataclass(frozen=True, slots=True)
class ReleaseRecord:
    """Report counts of one release (dist and version); ``author`` once an upload names it."""

    dist: str
    version: str
    author: str | None
    pass_: int
    fail: int
    na: int
    unknown: int
    maturity: str
    updated_at: float

    def counts(self) -> dict[str, int]:
        """Grade → number of reports."""
        return {"pass": self.pass_, "fail": self.fail, "na": self.na, "unknown": self.unknown}


@dataclass(frozen=True, slots=True)
class UploadRecord:
    """A release uploaded to CPAN: ``released`` is unix seconds (UTC)."""

    dist: str
    version: str
    author: str
    filename: str
    released: float
    maturity: str


class Store(abc.ABC):
    """Durable state of one broker (or of several brokers sharing a database).

    Use ``async with store:`` or call :meth:`open` and :meth:`close`. Calling any other method
    on a store that is not open raises :class:`UsageError`.
    """

    # --- life cycle ------------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create or migrate the schema. Raises :class:`SchemaTooNew` when the database
        belongs to a newer release, :class:`UsageError` when already open."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Commit every write already submitted, then disconnect. Idempotent."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def new_job_id(self) -> str | None:
        """An id for a job not enqueued yet (see :attr:`NewJob.id`), for a store shared by
        several nodes; None when the store makes ids only as it inserts."""
        return None

    @property
    def single_node(self) -> bool:
        """True when one broker process owns the store (embedded SQLite): at its start no other
        node can hold a job, so active jobs are requeued at once. Stores shared by several
        nodes return False; their jobs come back by lease expiry."""
        return True

    # --- revoked tokens --------------------------------------------------------------------

    @abc.abstractmethod
    async def revoke_token(self, jti: str, exp: int | None) -> None:
        """Record token id ``jti`` as revoked until ``exp`` (unix seconds; None: forever).
        Revoking twice keeps the later call's ``exp``."""

    @abc.abstractmethod
    async def revoked_tokens(self) -> list[tuple[str, int | None]]:
        """Every recorded revocation as ``(jti, exp)``, in no particular order."""

    @abc.abstractmethod
    async def purge_revoked_tokens(self, now: int) -> int:
        """Forget revocations of tokens that expired before ``now`` (they are refused anyway);
        returns how many were removed."""

    # --- topic history ---------------------------------------------------------------------

    @abc.abstractmethod
    async def append_messages(self, msgs: Sequence[StoredMessage]) -> None:
        """Store messages, all or none.

        Within one epoch a topic's offsets must grow: a message whose offset is not above the
        topic's last stored offset raises :class:`UsageError` and nothing of the call is kept.
        A message with a different epoch than the topic's head starts a new history: the
        older epoch's messages are deleted.
        """

    @abc.abstractmethod
    async def read_messages(self, topic: str, after_offset: int, limit: int) -> list[StoredMessage]:
        """Up to ``limit`` stored messages of ``topic`` with offset > ``after_offset``,
        in ascending offset order."""

    @abc.abstractmethod
    async def topic_heads(self) -> dict[str, tuple[str, int]]:
        """``topic → (epoch, last offset)`` for every topic that has had history stored.

        Trimming keeps a topic's head, so offsets continue after a restart even when every
        stored message was trimmed."""

    @abc.abstractmethod
    async def trim_messages(self, topic: str, keep_last: int, older_than_ts: float | None) -> int:
        """Delete all but the newest ``keep_last`` messages of ``topic`` and, when
        ``older_than_ts`` is given, every message with ``ts`` before it. Returns the number
        deleted."""

    @abc.abstractmethod
    async def set_topic_epoch(self, topic: str, epoch: str, last_offset: int = 0) -> None:
        """Start a new history for ``topic``: delete its stored messages and set its head to
        ``(epoch, last_offset)``."""

    # --- jobs: producers -------------------------------------------------------------------

    @abc.abstractmethod
    async def enqueue(self, job: NewJob) -> tuple[JobRecord, bool]:
        """Add a queued job; returns ``(record, duplicate)``.

        When ``job.unique_key`` is held by an unfinished job, nothing is added and that job
        comes back with ``duplicate=True``."""

    @abc.abstractmethod
    async def enqueue_many(self, jobs: Sequence[NewJob]) -> list[tuple[JobRecord, bool]]:
        """:meth:`enqueue` for each job, in one transaction: all are added or none. A unique key
        repeated within the call yields the first job with ``duplicate=True``."""

    # --- jobs: workers ---------------------------------------------------------------------

    @abc.abstractmethod
    async def claim(
        self,
        worker: str,
        queues: Sequence[str],
        limit: int,
        lease: float,
        now: float | None = None,
    ) -> list[JobRecord]:
        """Atomically take up to ``limit`` ready jobs from ``queues`` for ``worker``.

        Ready means queued or retrying with ``run_at <= now``. Order: highest priority, then
        oldest ``run_at``, then id. Each taken job becomes active with ``attempt + 1``,
        ``lease_until = now + lease`` and ``started_at = now``. Returned in that order."""

    async def enqueue_and_claim(
        self, job: NewJob, worker: str, queues: Sequence[str], limit: int, lease: float
    ) -> tuple[JobRecord, bool, list[JobRecord]]:
        """:meth:`enqueue` then :meth:`claim` for ``worker``: the dispatcher's path when a worker
        with free credit is waiting, so a new job reaches it without a second store round. The
        claim follows the usual order, so it may take an older job of higher priority instead.
        A store that can does both in one transaction; this default makes two calls."""
        rec, duplicate = await self.enqueue(job)
        return rec, duplicate, await self.claim(worker, queues, limit, lease)

    @abc.abstractmethod
    async def complete(
        self, job_id: str, attempt: int, result: Any, worker: str | None = None
    ) -> JobRecord | None:
        """Mark an active job done with ``result``. Fenced: ``None`` and no change unless the job
        is active with this ``attempt`` (and held by ``worker`` when given)."""

    @abc.abstractmethod
    async def fail(
        self,
        job_id: str,
        attempt: int,
        error: str,
        retry: bool,
        retry_delay: float,
        worker: str | None = None,
    ) -> JobRecord | None:
        """Record a failed attempt. Fenced like :meth:`complete`.

        The job becomes retrying with ``run_at = now + retry_delay`` when ``retry`` and
        ``attempt < max_attempts``, else failed."""

    @abc.abstractmethod
    async def progress(
        self, job_id: str, attempt: int, data: Any, lease_until: float | None
    ) -> JobRecord | None:
        """Record progress of an active job and renew its lease (when ``lease_until`` is given).

        Two dicts are merged shallowly (new keys win); any other new value replaces the old
        one. Fenced by attempt like :meth:`complete`."""

    @abc.abstractmethod
    async def renew(self, worker: str, lease_until: float) -> int:
        """Set ``lease_until`` on every active job of ``worker``; returns how many."""

    @abc.abstractmethod
    async def release_worker(self, worker: str, retry_delay: float = 0.0) -> list[JobRecord]:
        """Give back every active job of a worker that went away.

        Each becomes retrying (``run_at = now + retry_delay``) when attempts remain, else
        failed; ``error`` is set to ``"worker lost"`` either way. Returns the changed jobs."""

    @abc.abstractmethod
    async def expire_leases(self, now: float | None = None) -> list[JobRecord]:
        """Like :meth:`release_worker` for every active job whose ``lease_until < now``, with
        error ``"lease expired"`` and ``run_at = now``."""

    @abc.abstractmethod
    async def requeue_active(self, reason: str) -> list[JobRecord]:
        """Like :meth:`release_worker` for every active job, with error ``reason``: for the
        start-up of a single broker, when no worker can still hold a job."""

    # --- jobs: operators -------------------------------------------------------------------

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> tuple[JobRecord, JobState] | None:
        """Cancel a queued, retrying or active job; returns the record and its previous state.

        ``None`` when there is no such job; :class:`protocol.errors.Conflict` when it is already
        done, failed or cancelled. Telling the holder of an active job is the caller's task."""

    @abc.abstractmethod
    async def retry(self, job_id: str) -> JobRecord | None:
        """Queue a failed or cancelled job again, due now, its error and result cleared.

        ``max_attempts`` is raised to ``attempt + 1`` when the job had used them all. ``None``
        when there is no such job; :class:`protocol.errors.Conflict` in other states or when
        another unfinished job now holds its unique key."""

    @abc.abstractmethod
    async def delete(self, job_id: str) -> bool:
        """Delete a job that is not active; ``False`` when there is no such job.
        :class:`protocol.errors.Conflict` when it is active (cancel it first)."""

    # --- jobs: reading ---------------------------------------------------------------------

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> JobRecord | None:
        """The job with this id, or ``None``."""

    @abc.abstractmethod
    async def list_jobs(
        self,
        state: JobState | None = None,
        queue: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[JobRecord]:
        """Newest first (by id), optionally filtered; ``before`` is the last id of the previous
        page."""

    @abc.abstractmethod
    async def next_run_at(self, queues: Sequence[str]) -> float | None:
        """The earliest ``run_at`` of queued or retrying jobs in ``queues`` (may be in the past),
        or ``None`` when there are none."""

    @abc.abstractmethod
    async def queue_stats(self) -> dict[str, QueueStats]:
        """Figures for every queue that has at least one job."""

    # --- key-value -------------------------------------------------------------------------

    @abc.abstractmethod
    async def get_meta(self, key: str) -> str | None:
        """The value stored under ``key``, or ``None``."""

    @abc.abstractmethod
    async def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""

    # --- CPAN Testers reports --------------------------------------------------------------

    @abc.abstractmethod
    async def add_report(
        self, report: IncomingReport, job: NewJob, payload_json: str | None = None
    ) -> tuple[str, JobRecord | None]:
        """Store a received report and enqueue the job that processes it, in one transaction.

        Returns ``(report id, job)``. When a report with the same ``digest`` is already stored,
        nothing is added and the result is ``(existing id, None)``. ``payload_json``, when
        given, is ``job.payload`` already encoded as JSON (a report is large; encoding it once
        is enough); the caller vouches that it decodes to ``job.payload`` and does not change
        ``job.payload`` afterwards."""

    @abc.abstractmethod
    async def get_report(self, report_id: str) -> tuple[str, float] | None:
        """``(JSON text, received_at)`` of a stored report, or ``None``."""

    @abc.abstractmethod
    async def apply_report(
        self, summary: ReportSummary, stats: Mapping[str, Sequence[str]], now: float | None = None
    ) -> ReleaseRecord | None:
        """Record a processed report, all in one transaction: its summary row, one more report
        of its grade in its release's counts (the author taken from a recorded upload), one
        more for each ``stats`` counter (plugin name → keys), and the report marked done.

        Idempotent: a report whose summary is already stored changes nothing and returns
        ``None``; otherwise the release's new counts come back."""

    @abc.abstractmethod
    async def unapplied_report_jobs(self, limit: int = 1000) -> list[JobRecord]:
        """Done jobs of stored reports whose summary was never recorded (a broker stopped
        between the two), oldest first, for :meth:`apply_report` to catch up."""

    @abc.abstractmethod
    async def list_report_summaries(
        self,
        *,
        dist: str | None = None,
        version: str | None = None,
        grade: str | None = None,
        perls: Sequence[str] = (),
        osnames: Sequence[str] = (),
        perl_maturity: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[ReportSummary]:
        """Summaries matching every filter given (a sequence matches any of its values), oldest
        recorded first; ``since`` keeps those recorded at or after it (unix seconds)."""

    @abc.abstractmethod
    async def release_known(self, dist: str, version: str | None = None) -> bool:
        """Whether any report or upload exists for ``dist`` (and ``version``)."""

    @abc.abstractmethod
    async def record_upload(self, upload: UploadRecord, now: float | None = None) -> ReleaseRecord:
        """Record (or replace) the upload of ``dist`` ``version``; its release gets the author.
        Returns the release's counts."""

    @abc.abstractmethod
    async def list_uploads(
        self,
        *,
        dist: str | None = None,
        author: str | None = None,
        maturity: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[UploadRecord]:
        """Uploads matching the filters, oldest release first; ``since`` on ``released``."""

    @abc.abstractmethod
    async def list_releases(
        self,
        *,
        dist: str | None = None,
        version: str | None = None,
        author: str | None = None,
        maturity: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[ReleaseRecord]:
        """Releases matching the filters, least recently updated first; ``since`` keeps those
        updated at or after it."""

    @abc.abstractmethod
    async def report_stats(self) -> dict[str, dict[str, int]]:
        """Every statistics counter: plugin name → key → count."""
