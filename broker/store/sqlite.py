"""The embedded store: one SQLite file in WAL mode.

Threads and connections
-----------------------
Writes go through one plain :class:`sqlite3.Connection`; reads go through a second, read-only
connection driven by aiosqlite.

Where a write group runs: a small group of light operations (the job path: enqueue, claim,
complete, fail, progress, renew, cancel; a report's intake and summary) runs on the event loop
itself; any other group runs in a dedicated single-thread executor. In WAL mode with
``synchronous=NORMAL`` such a commit takes tens of microseconds and no fsync, while the hop to a
thread and back costs far more on a busy 2-core machine: waking the thread, handing over the
GIL, waking the loop again. Measured with ``python -m bench jobs``, both in one run: job pickup
p50 10.3 ms through the thread, 3.4 ms inline (p99 71 ms and 22 ms). Inline groups never wait
for a lock: the group begins with ``busy_timeout`` 0, and when another process holds
the write lock it goes to the thread, which waits up to ``busy_timeout`` as usual. Checkpoints
(the one step that writes the database file and fsyncs it) are taken off the loop too: automatic
checkpoints are off on the writer, and every 100 transactions (or 1,000 rows changed) the
writer task runs one in the thread between two groups, as SQLite's own automatic checkpoint
would after a commit; nothing is written meanwhile, so the checkpoint reaches the end of the WAL
and the next transaction starts it over (a checkpoint beside a busy writer never catches up, and
the WAL grows without bound).
``inline=False`` keeps SQLite's automatic checkpoints and runs every group in the thread.

Why not write through aiosqlite: it hops to its thread once per call, so a group of N
statements would cost N hops, and its public API has no way to run a function of ours over its
connection in its thread. Reads gain nothing from grouping, and WAL lets them run beside the
writer, so they stay on aiosqlite.

Group commit
------------
Every write is an operation (a function over :class:`_WriteSide`) put on a bounded queue with a
future. One writer task takes every queued operation (up to ``batch_max``), runs them in one
``BEGIN IMMEDIATE`` transaction (on the loop or in the writer thread, see above), commits once,
then resolves each future with its own result. Each operation runs inside its own
``SAVEPOINT``: one that raises is rolled back alone and fails only its own caller. While a group
runs, new operations queue up and form the next group, so batching needs no timer and adds no
latency when the store is idle.

``BEGIN IMMEDIATE`` takes the write lock at the start: a deferred ``BEGIN`` that later upgrades
to a write fails with ``SQLITE_BUSY_SNAPSHOT``, which ``busy_timeout`` does not retry.
``synchronous=NORMAL`` in WAL mode can lose the last transactions on power loss (not on a process
crash) and never corrupts the file.

Limits and failure behaviour
----------------------------
- The write queue holds ``queue_max`` operations; beyond that, callers wait for room
  (back-pressure, nothing is dropped).
- A caller cancelled before its operation was taken drops it; once taken, the operation commits
  and its result is discarded.
- If the commit itself fails (disk full, I/O error, another process's lock held beyond
  ``busy_timeout``), every operation of the group fails and nothing of the group is kept.
  Such environmental errors (:class:`sqlite3.OperationalError`) reach callers as
  :class:`protocol.errors.Unavailable`; the writer carries on with the next group.
- ``close()`` refuses new writes, commits every queued one, then closes both connections.
- The writer keeps the decoded payloads of up to 512 unfinished jobs, so records returned by
  ``enqueue``, ``claim``, ``progress`` and ``complete`` for one job may share one payload
  object: treat payloads as read-only.
- Costs with a million jobs (measured): ``claim`` a few index seeks per priority level (under
  0.3 ms), ``next_run_at`` one seek per queue, ``queue_stats`` reads maintained counters plus
  the jobs finished in the last minute (about 150 ms when 800,000 finished in that minute).
- Another process may open the same file; ``busy_timeout`` (default 5 s) bounds how long a group
  waits for that process's write lock before failing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite

from broker.jobstate import TERMINAL, JobState, check_transition
from broker.store.base import (
    GRADES,
    IncomingReport,
    JobRecord,
    NewJob,
    QueueStats,
    ReleaseRecord,
    ReportSummary,
    SchemaTooNew,
    Store,
    StoredMessage,
    UploadRecord,
)
from broker.store.migrations import Migration
from broker.store.migrations.sqlite import MIGRATIONS
from protocol.errors import Conflict, Unavailable, UsageError
from protocol.frames import JobId

__all__ = ["SQLiteStore"]

log = logging.getLogger("quicksilver.store")

T = TypeVar("T")

_JOB_COLUMNS = (
    "id, queue, payload, priority, run_at, unique_key, max_attempts, attempt, state, progress,"
    " result, error, worker, lease_until, created_at, updated_at, started_at, finished_at"
)
# Spelled exactly as in the partial indexes' WHERE clauses (see migrations/sqlite.py).
_READY_SQL = "state IN ('queued', 'retrying')"
_UNFINISHED_SQL = "state IN ('queued', 'active', 'retrying')"

# claim: walk the priority levels of one queue through jobs_ready, highest first.
_TOP_PRIORITY_SQL = (
    f"SELECT MAX(priority) FROM jobs INDEXED BY jobs_ready WHERE {_READY_SQL} AND queue = ?"
)
_NEXT_PRIORITY_SQL = (
    f"SELECT MAX(priority) FROM jobs INDEXED BY jobs_ready"
    f" WHERE {_READY_SQL} AND queue = ? AND priority < ?"
)
_READY_AT_PRIORITY_SQL = (
    f"SELECT {_JOB_COLUMNS} FROM jobs INDEXED BY jobs_ready"
    f" WHERE {_READY_SQL} AND queue = ? AND priority = ? AND run_at <= ?"
    " ORDER BY run_at, id LIMIT ?"
)
# After this many priority levels without filling the claim, scan the rest of the index in
# order instead: bounds the cost when priorities are nearly all distinct.
_MAX_PRIORITY_LEVELS = 16
_READY_BELOW_PRIORITY_SQL = (
    f"SELECT {_JOB_COLUMNS} FROM jobs INDEXED BY jobs_ready"
    f" WHERE {_READY_SQL} AND queue = ? AND priority < ? AND run_at <= ?"
    " ORDER BY priority DESC, run_at, id LIMIT ?"
)
_DUE_IN_QUEUE_SQL = (
    f"SELECT MIN(run_at) FROM jobs INDEXED BY jobs_due WHERE {_READY_SQL} AND queue = q.name"
)

_BUSY_TIMEOUT = 5.0
#: Groups of more operations than this run in the writer thread even when all are light.
_INLINE_MAX = 64
#: Inline mode: a checkpoint between groups after this many transactions or rows changed
#: (about what SQLite's automatic checkpoint at 1,000 WAL pages does for one-job transactions).
_CHECKPOINT_TRANSACTIONS = 100
_CHECKPOINT_CHANGES = 1000
#: Decoded payloads kept by the writer for jobs not finished yet (see ``_WriteSide._record``).
_PAYLOAD_CACHE = 512

_SUMMARY_COLUMNS = (
    "guid, dist, version, grade, reporter, platform, perl, perl_maturity, osname, osvers,"
    " maturity, received_at"
)
_RELEASE_COLUMNS = "dist, version, author, pass, fail, na, unknown, maturity, updated_at"
_UPLOAD_COLUMNS = "dist, version, author, filename, released, maturity"
_JOIN_JOB_COLUMNS = ", ".join("j." + c.strip() for c in _JOB_COLUMNS.split(","))


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what} is not JSON-portable: {exc}") from None


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


_UNKNOWN: Any = object()


def _job_from_row(row: Sequence[Any], payload: Any = _UNKNOWN) -> JobRecord:
    return JobRecord(
        id=JobId(row[0]),
        queue=row[1],
        payload=json.loads(row[2]) if payload is _UNKNOWN else payload,
        priority=row[3],
        run_at=row[4],
        unique_key=row[5],
        max_attempts=row[6],
        attempt=row[7],
        state=JobState(row[8]),
        progress=_loads(row[9]),
        result=_loads(row[10]),
        error=row[11],
        worker=row[12],
        lease_until=row[13],
        created_at=row[14],
        updated_at=row[15],
        started_at=row[16],
        finished_at=row[17],
    )


def _summary_from_row(row: Sequence[Any]) -> ReportSummary:
    return ReportSummary(*row)


def _release_from_row(row: Sequence[Any]) -> ReleaseRecord:
    return ReleaseRecord(*row)


def _upload_from_row(row: Sequence[Any]) -> UploadRecord:
    return UploadRecord(*row)


def _in_list(column: str, values: Sequence[str], where: list[str], params: list[Any]) -> None:
    """``column IN (?, ...)`` (``=`` for one value) when ``values`` is not empty."""
    if len(values) == 1:
        where.append(f"{column} = ?")
    elif values:
        where.append(f"{column} IN ({', '.join('?' for _ in values)})")
    params.extend(values)


def _where(
    equal: Sequence[tuple[str, str | None]],
    since: tuple[str, float | None],
    any_of: Sequence[tuple[str, Sequence[str]]] = (),
) -> tuple[str, list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for column, value in equal:
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    for column, values in any_of:
        _in_list(column, list(values), where, params)
    if since[1] is not None:
        where.append(f"{since[0]} >= ?")
        params.append(since[1])
    return (f" WHERE {' AND '.join(where)}" if where else ""), params


def summaries_query(
    *,
    dist: str | None = None,
    version: str | None = None,
    grade: str | None = None,
    perls: Sequence[str] = (),
    osnames: Sequence[str] = (),
    perl_maturity: str | None = None,
    since: float | None = None,
    limit: int = 1000,
) -> tuple[str, list[Any]]:
    """The SQL and parameters of :meth:`SQLiteStore.list_report_summaries` (for the plans)."""
    clause, params = _where(
        (("dist", dist), ("version", version), ("grade", grade), ("perl_maturity", perl_maturity)),
        ("updated_at", since),
        (("perl", perls), ("osname", osnames)),
    )
    sql = (
        f"SELECT {_SUMMARY_COLUMNS} FROM report_summaries{clause} ORDER BY updated_at, seq LIMIT ?"
    )
    return sql, [*params, limit]


def releases_query(
    *,
    dist: str | None = None,
    version: str | None = None,
    author: str | None = None,
    maturity: str | None = None,
    since: float | None = None,
    limit: int = 1000,
) -> tuple[str, list[Any]]:
    """The SQL and parameters of :meth:`SQLiteStore.list_releases`."""
    clause, params = _where(
        (("dist", dist), ("version", version), ("author", author), ("maturity", maturity)),
        ("updated_at", since),
    )
    sql = (
        f"SELECT {_RELEASE_COLUMNS} FROM releases{clause}"
        " ORDER BY updated_at, dist, version LIMIT ?"
    )
    return sql, [*params, limit]


def uploads_query(
    *,
    dist: str | None = None,
    author: str | None = None,
    maturity: str | None = None,
    since: float | None = None,
    limit: int = 1000,
) -> tuple[str, list[Any]]:
    """The SQL and parameters of :meth:`SQLiteStore.list_uploads`."""
    clause, params = _where(
        (("dist", dist), ("author", author), ("maturity", maturity)), ("released", since)
    )
    sql = f"SELECT {_UPLOAD_COLUMNS} FROM uploads{clause} ORDER BY released, dist, version LIMIT ?"
    return sql, [*params, limit]


def _check_seconds(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{name} must be a finite number of seconds >= 0, not {value!r}")


def _claim_queues(queues: Sequence[str], limit: int, lease: float) -> list[str]:
    """A claim's arguments checked; its queue names as a list."""
    _check_limit(limit)
    _check_seconds("lease", lease)
    if isinstance(queues, str):
        raise UsageError("queues must be a sequence of queue names, not one str")
    return list(queues)


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise UsageError(f"limit must be an int >= 0, not {limit!r}")


def _environmental(exc: Exception) -> Exception:
    """A locked, full or failing database becomes :class:`Unavailable` (the caller may retry
    later), a new one per call so that callers never share a traceback; anything else is a bug
    or a refusal and passes unchanged."""
    if isinstance(exc, sqlite3.OperationalError):
        unavailable = Unavailable(f"job store unavailable: {exc}")
        unavailable.__cause__ = exc
        return unavailable
    return exc


_Outcome = tuple[bool, Any]
_Op = Callable[["_WriteSide"], Any]


class _WriteSide:
    """The writer connection and every write, as plain functions. Used by one group at a time:
    in the writer thread, or on the event loop for an inline group."""

    def __init__(self, conn: sqlite3.Connection, clock: Callable[[], float], busy_ms: int) -> None:
        self.conn = conn
        self.clock = clock
        self.busy_ms = busy_ms
        self.transactions = 0
        self._last_micros = 0
        self._rng = random.Random()
        # Decoded payloads of recent unfinished jobs. A payload never changes after enqueue,
        # and claim, progress and complete each return the whole record: decoding a large
        # payload (a 10 kB test report) three times per job was a fifth of the writer's work.
        self._payloads: OrderedDict[str, Any] = OrderedDict()

    def _remember(self, job_id: str, payload: Any) -> None:
        cache = self._payloads
        cache[job_id] = payload
        if len(cache) > _PAYLOAD_CACHE:
            cache.popitem(last=False)

    def _forget(self, job_id: str) -> None:
        self._payloads.pop(job_id, None)

    def _record(self, row: Sequence[Any]) -> JobRecord:
        """A job row as a record, its payload from the cache when there."""
        return _job_from_row(row, self._payloads.get(row[0], _UNKNOWN))

    # --- transactions ----------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Copy the WAL into the database file (outside any transaction)."""
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def begin_now(self) -> bool:
        """``BEGIN IMMEDIATE`` without waiting: False when another connection holds the write
        lock (or the attempt failed otherwise; :meth:`run_group` then tells the error)."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            return False
        return True

    def _begin_waiting(self) -> None:
        """``BEGIN IMMEDIATE``, waiting up to the busy timeout for another connection's lock
        (the connection's own timeout stays 0, for :meth:`begin_now`)."""
        conn = self.conn
        conn.execute(f"PRAGMA busy_timeout = {self.busy_ms}")
        try:
            conn.execute("BEGIN IMMEDIATE")
        finally:
            conn.execute("PRAGMA busy_timeout = 0")

    def run_group(self, ops: Sequence[_Op], begun: bool = False) -> list[_Outcome]:
        """Run ``ops`` in one transaction, each in a savepoint; one outcome per op. ``begun``:
        :meth:`begin_now` already opened the transaction; otherwise this waits for the write
        lock up to the busy timeout."""
        conn = self.conn
        outcomes: list[_Outcome] = []
        txn_start = 0
        try:
            if not begun:
                self._begin_waiting()
            for op in ops:
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back after an I/O-class error; the
                    # rest of the group gets a fresh one.
                    self._begin_waiting()
                    txn_start = len(outcomes)
                conn.execute("SAVEPOINT op")
                try:
                    value = op(self)
                except Exception as exc:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                    else:
                        self._void(outcomes, txn_start, exc)
                    outcomes.append((False, _environmental(exc)))
                else:
                    conn.execute("RELEASE op")
                    outcomes.append((True, value))
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the connection reports the first error; this one adds nothing
            self._void(outcomes, txn_start, exc)
            outcomes.extend((False, _environmental(exc)) for _ in range(len(ops) - len(outcomes)))
            return outcomes
        self.transactions += 1
        return outcomes

    @staticmethod
    def _void(outcomes: list[_Outcome], start: int, exc: Exception) -> None:
        """Fail the successful outcomes from ``start`` on: their transaction was rolled back."""
        for i in range(start, len(outcomes)):
            if outcomes[i][0]:
                outcomes[i] = (False, _environmental(exc))

    def migrate(self, migrations: Sequence[Migration]) -> int:
        """Apply the missing migrations in one transaction; returns the schema version."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            current = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
            known = max((m.version for m in migrations), default=0)
            if current > known:
                raise SchemaTooNew(
                    f"database schema version {current} is newer than this release's {known}"
                )
            for migration in sorted(migrations, key=lambda m: m.version):
                if migration.version <= current:
                    continue
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        last = conn.execute("SELECT MAX(id) FROM jobs").fetchone()[0]
        if last:
            self._last_micros = int(last[:14], 16)
        return max(current, known)

    def close(self) -> None:
        self.conn.close()

    # --- helpers ---------------------------------------------------------------------------

    def new_id(self, now: float) -> JobId:
        """Time-ordered, strictly increasing within this store: 14 hex digits of microseconds
        then 6 random ones, so ids from several stores do not collide."""
        micros = max(int(now * 1_000_000), self._last_micros + 1)
        self._last_micros = micros
        return JobId(f"{micros:014x}{self._rng.getrandbits(24):06x}")

    def load(self, job_id: str) -> JobRecord | None:
        row = self.conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return None if row is None else _job_from_row(row)

    def _fenced(self, job_id: str, attempt: int, worker: str | None) -> JobRecord | None:
        """The job when it is active with this attempt (and worker), else ``None``."""
        row = self.conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ? AND state = 'active' AND attempt = ?",
            (job_id, attempt),
        ).fetchone()
        if row is None or (worker is not None and row[12] != worker):
            return None
        return self._record(row)

    def _state_of(self, job_id: str) -> JobState | None:
        row = self.conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobState(row[0])

    # --- tokens, meta ----------------------------------------------------------------------

    def revoke_token(self, jti: str, exp: int | None) -> None:
        self.conn.execute(
            "INSERT INTO revoked_tokens (jti, exp) VALUES (?, ?)"
            " ON CONFLICT (jti) DO UPDATE SET exp = excluded.exp",
            (jti, exp),
        )

    def purge_revoked_tokens(self, now: int) -> int:
        cur = self.conn.execute("DELETE FROM revoked_tokens WHERE exp < ?", (now,))
        return cur.rowcount

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # --- topic history ---------------------------------------------------------------------

    def append_messages(self, msgs: Sequence[StoredMessage]) -> None:
        conn = self.conn
        heads: dict[str, tuple[str, int]] = {}
        for msg in msgs:
            head = heads.get(msg.topic)
            if head is None:
                row = conn.execute(
                    "SELECT epoch, last_offset FROM topics WHERE topic = ?", (msg.topic,)
                ).fetchone()
                head = None if row is None else (row[0], row[1])
            if head is not None and head[0] == msg.epoch and msg.offset <= head[1]:
                raise UsageError(
                    f"offset {msg.offset} on {msg.topic!r} is not above the last stored"
                    f" offset {head[1]} of epoch {msg.epoch!r}"
                )
            if head is not None and head[0] != msg.epoch:
                conn.execute("DELETE FROM messages WHERE topic = ?", (msg.topic,))
            conn.execute(
                "INSERT INTO messages (topic, seq, epoch, ts, data) VALUES (?, ?, ?, ?, ?)",
                (msg.topic, msg.offset, msg.epoch, msg.ts, msg.data_json),
            )
            heads[msg.topic] = (msg.epoch, msg.offset)
        conn.executemany(
            "INSERT INTO topics (topic, epoch, last_offset) VALUES (?, ?, ?)"
            " ON CONFLICT (topic) DO UPDATE"
            " SET epoch = excluded.epoch, last_offset = excluded.last_offset",
            [(topic, epoch, offset) for topic, (epoch, offset) in heads.items()],
        )

    def trim_messages(self, topic: str, keep_last: int, older_than_ts: float | None) -> int:
        conn = self.conn
        deleted = conn.execute(
            "DELETE FROM messages WHERE topic = ? AND seq <= ("
            " SELECT seq FROM messages WHERE topic = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (topic, topic, keep_last),
        ).rowcount
        if older_than_ts is not None:
            deleted += conn.execute(
                "DELETE FROM messages WHERE topic = ? AND ts < ?", (topic, older_than_ts)
            ).rowcount
        return deleted

    def set_topic_epoch(self, topic: str, epoch: str, last_offset: int) -> None:
        self.conn.execute("DELETE FROM messages WHERE topic = ?", (topic,))
        self.conn.execute(
            "INSERT INTO topics (topic, epoch, last_offset) VALUES (?, ?, ?)"
            " ON CONFLICT (topic) DO UPDATE"
            " SET epoch = excluded.epoch, last_offset = excluded.last_offset",
            (topic, epoch, last_offset),
        )

    # --- jobs ------------------------------------------------------------------------------

    def enqueue(self, jobs: Sequence[NewJob]) -> list[tuple[JobRecord, bool]]:
        now = self.clock()
        return [self._enqueue_one(job, now) for job in jobs]

    def _enqueue_one(
        self, job: NewJob, now: float, payload_json: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Insert one job (or find the unfinished one holding its unique key). ``payload_json``
        is ``job.payload`` already encoded, when the caller has it."""
        conn = self.conn
        if job.unique_key is not None:
            row = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE unique_key = ? AND {_UNFINISHED_SQL}",
                (job.unique_key,),
            ).fetchone()
            if row is not None:
                return _job_from_row(row), True
        if payload_json is None:
            payload = _dumps(job.payload, "payload")
            value = json.loads(payload)
        else:
            payload, value = payload_json, job.payload
        record = JobRecord(
            id=JobId(job.id) if job.id else self.new_id(now),
            queue=job.queue,
            payload=value,
            priority=job.priority,
            run_at=now + job.delay,
            unique_key=job.unique_key,
            max_attempts=job.max_attempts,
            attempt=0,
            state=JobState.QUEUED,
            progress=None,
            result=None,
            error=None,
            worker=None,
            lease_until=None,
            created_at=now,
            updated_at=now,
            started_at=None,
            finished_at=None,
        )
        self._remember(record.id, value)
        conn.execute(
            "INSERT INTO jobs (id, queue, payload, priority, run_at, unique_key,"
            " max_attempts, attempt, state, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 0, 'queued', ?, ?)",
            (
                record.id,
                record.queue,
                payload,
                record.priority,
                record.run_at,
                record.unique_key,
                record.max_attempts,
                now,
                now,
            ),
        )
        return record, False

    def _ready_in_queue(self, queue: str, limit: int, now: float) -> list[Any]:
        """Up to ``limit`` ready rows of one queue in claim order."""
        conn = self.conn
        rows: list[Any] = []
        level = conn.execute(_TOP_PRIORITY_SQL, (queue,)).fetchone()[0]
        levels = 0
        while level is not None and len(rows) < limit:
            if levels == _MAX_PRIORITY_LEVELS:
                rows += conn.execute(
                    _READY_BELOW_PRIORITY_SQL, (queue, level + 1, now, limit - len(rows))
                ).fetchall()
                break
            rows += conn.execute(
                _READY_AT_PRIORITY_SQL, (queue, level, now, limit - len(rows))
            ).fetchall()
            levels += 1
            if len(rows) < limit:
                level = conn.execute(_NEXT_PRIORITY_SQL, (queue, level)).fetchone()[0]
        return rows

    def claim(
        self, worker: str, queues: Sequence[str], limit: int, lease: float, now: float | None
    ) -> list[JobRecord]:
        at = self.clock() if now is None else now
        rows: list[Any] = []
        for queue in dict.fromkeys(queues):
            rows += self._ready_in_queue(queue, limit, at)
        rows.sort(key=lambda r: (-r[3], r[4], r[0]))
        del rows[limit:]
        records = []
        for row in rows:
            record = self._record(row)
            check_transition(record.state, JobState.ACTIVE)
            record.state = JobState.ACTIVE
            record.attempt += 1
            record.worker = worker
            record.lease_until = at + lease
            record.started_at = at
            record.updated_at = at
            records.append(record)
        self.conn.executemany(
            "UPDATE jobs SET state = 'active', attempt = attempt + 1, worker = ?,"
            f" lease_until = ?, started_at = ?, updated_at = ? WHERE id = ? AND {_READY_SQL}",
            [(worker, at + lease, at, at, r.id) for r in records],
        )
        return records

    def complete(
        self, job_id: str, attempt: int, result: Any, worker: str | None
    ) -> JobRecord | None:
        record = self._fenced(job_id, attempt, worker)
        if record is None:
            return None
        check_transition(record.state, JobState.DONE)
        now = self.clock()
        text = _dumps(result, "result")
        self.conn.execute(
            "UPDATE jobs SET state = 'done', result = ?, lease_until = NULL, finished_at = ?,"
            " updated_at = ? WHERE id = ? AND state = 'active' AND attempt = ?",
            (text, now, now, job_id, attempt),
        )
        record.state = JobState.DONE
        record.result = json.loads(text)
        record.lease_until = None
        record.finished_at = record.updated_at = now
        self._forget(job_id)
        return record

    def fail(
        self,
        job_id: str,
        attempt: int,
        error: str,
        retry: bool,
        retry_delay: float,
        worker: str | None,
    ) -> JobRecord | None:
        record = self._fenced(job_id, attempt, worker)
        if record is None:
            return None
        self._give_back_one(record, error, retry, retry_delay, self.clock())
        return record

    def _give_back_one(
        self, record: JobRecord, error: str, retry: bool, retry_delay: float, now: float
    ) -> None:
        """An active job's attempt ended without a result: retrying or failed. Updates
        ``record`` to match the row."""
        if retry and record.attempt < record.max_attempts:
            check_transition(record.state, JobState.RETRYING)
            record.state = JobState.RETRYING
            record.run_at = now + retry_delay
            self.conn.execute(
                "UPDATE jobs SET state = 'retrying', error = ?, run_at = ?, lease_until = NULL,"
                " updated_at = ? WHERE id = ? AND state = 'active'",
                (error, record.run_at, now, record.id),
            )
        else:
            check_transition(record.state, JobState.FAILED)
            self._forget(record.id)
            record.state = JobState.FAILED
            record.finished_at = now
            self.conn.execute(
                "UPDATE jobs SET state = 'failed', error = ?, lease_until = NULL,"
                " finished_at = ?, updated_at = ? WHERE id = ? AND state = 'active'",
                (error, now, now, record.id),
            )
        record.error = error
        record.lease_until = None
        record.updated_at = now

    def progress(
        self, job_id: str, attempt: int, data: Any, lease_until: float | None
    ) -> JobRecord | None:
        record = self._fenced(job_id, attempt, None)
        if record is None:
            return None
        old = record.progress
        merged = {**old, **data} if isinstance(old, dict) and isinstance(data, dict) else data
        text = _dumps(merged, "progress")
        now = self.clock()
        self.conn.execute(
            "UPDATE jobs SET progress = ?, lease_until = COALESCE(?, lease_until),"
            " updated_at = ? WHERE id = ? AND state = 'active' AND attempt = ?",
            (text, lease_until, now, job_id, attempt),
        )
        record.progress = json.loads(text)
        if lease_until is not None:
            record.lease_until = lease_until
        record.updated_at = now
        return record

    def renew(self, worker: str, lease_until: float) -> int:
        cur = self.conn.execute(
            "UPDATE jobs SET lease_until = ? WHERE state = 'active' AND worker = ?",
            (lease_until, worker),
        )
        return cur.rowcount

    def give_back(
        self, where: str, params: tuple[Any, ...], error: str, retry_delay: float, now: float
    ) -> list[JobRecord]:
        rows = self.conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = 'active' AND {where} ORDER BY id",
            params,
        ).fetchall()
        records = [_job_from_row(row) for row in rows]
        for record in records:
            self._give_back_one(record, error, True, retry_delay, now)
        return records

    def cancel(self, job_id: str) -> tuple[JobRecord, JobState] | None:
        self._forget(job_id)
        old = self._state_of(job_id)
        if old is None:
            return None
        if old in TERMINAL:
            raise Conflict(f"job {job_id} is already {old.value}")
        check_transition(old, JobState.CANCELLED)
        now = self.clock()
        self.conn.execute(
            "UPDATE jobs SET state = 'cancelled', lease_until = NULL, finished_at = ?,"
            " updated_at = ? WHERE id = ? AND state = ?",
            (now, now, job_id, old.value),
        )
        record = self.load(job_id)
        assert record is not None
        return record, old

    def retry(self, job_id: str) -> JobRecord | None:
        old = self._state_of(job_id)
        if old is None:
            return None
        if old not in (JobState.FAILED, JobState.CANCELLED):
            raise Conflict(f"job {job_id} is {old.value}; only failed or cancelled jobs retry")
        check_transition(old, JobState.QUEUED)
        now = self.clock()
        try:
            self.conn.execute(
                "UPDATE jobs SET state = 'queued', run_at = ?,"
                " max_attempts = MAX(max_attempts, attempt + 1), error = NULL, result = NULL,"
                " worker = NULL, lease_until = NULL, finished_at = NULL, updated_at = ?"
                " WHERE id = ? AND state = ?",
                (now, now, job_id, old.value),
            )
        except sqlite3.IntegrityError:
            raise Conflict(
                f"job {job_id} cannot be retried: another unfinished job has its unique key"
            ) from None
        return self.load(job_id)

    def delete(self, job_id: str) -> bool:
        self._forget(job_id)
        old = self._state_of(job_id)
        if old is None:
            return False
        if old is JobState.ACTIVE:
            raise Conflict(f"job {job_id} is active; cancel it before deleting it")
        self.conn.execute("DELETE FROM jobs WHERE id = ? AND state <> 'active'", (job_id,))
        return True

    # --- CPAN Testers reports ------------------------------------------------------------

    def add_report(
        self, report: IncomingReport, job: NewJob, payload_json: str | None
    ) -> tuple[str, JobRecord | None]:
        conn = self.conn
        row = conn.execute("SELECT id FROM reports WHERE digest = ?", (report.digest,)).fetchone()
        if row is not None:
            return str(row[0]), None
        record, _duplicate = self._enqueue_one(job, self.clock(), payload_json)
        conn.execute(
            "INSERT INTO reports (id, digest, received_at, job_id, body) VALUES (?, ?, ?, ?, ?)",
            (report.id, report.digest, report.received_at, record.id, report.body),
        )
        return report.id, record

    def apply_report(
        self, summary: ReportSummary, stats: Mapping[str, Sequence[str]], now: float | None
    ) -> ReleaseRecord | None:
        conn = self.conn
        at = self.clock() if now is None else now
        inserted = conn.execute(
            f"INSERT INTO report_summaries ({_SUMMARY_COLUMNS}, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (guid) DO NOTHING",
            (
                summary.guid,
                summary.dist,
                summary.version,
                summary.grade,
                summary.reporter,
                summary.platform,
                summary.perl,
                summary.perl_maturity,
                summary.osname,
                summary.osvers,
                summary.maturity,
                summary.received_at,
                at,
            ),
        ).rowcount
        if not inserted:
            return None
        upload = conn.execute(
            "SELECT author FROM uploads WHERE dist = ? AND version = ?",
            (summary.dist, summary.version),
        ).fetchone()
        grade = GRADES[GRADES.index(summary.grade)]  # a column name, never caller text
        row = conn.execute(
            f"INSERT INTO releases (dist, version, author, {grade}, maturity, updated_at)"
            " VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (dist, version) DO UPDATE SET"
            f" {grade} = {grade} + 1, author = COALESCE(excluded.author, author),"
            f" updated_at = excluded.updated_at RETURNING {_RELEASE_COLUMNS}",
            (summary.dist, summary.version, upload[0] if upload else None, summary.maturity, at),
        ).fetchone()
        conn.execute("UPDATE reports SET summarized = 1 WHERE id = ?", (summary.guid,))
        bumps = [(plugin, key) for plugin, keys in stats.items() for key in keys]
        if bumps:
            conn.executemany(
                "INSERT INTO report_stats (plugin, key, n) VALUES (?, ?, 1)"
                " ON CONFLICT (plugin, key) DO UPDATE SET n = n + 1",
                bumps,
            )
        return _release_from_row(row)

    def record_upload(self, upload: UploadRecord, now: float | None) -> ReleaseRecord:
        conn = self.conn
        at = self.clock() if now is None else now
        conn.execute(
            f"INSERT INTO uploads ({_UPLOAD_COLUMNS}, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (dist, version) DO UPDATE SET author = excluded.author,"
            " filename = excluded.filename, released = excluded.released,"
            " maturity = excluded.maturity, recorded_at = excluded.recorded_at",
            (
                upload.dist,
                upload.version,
                upload.author,
                upload.filename,
                upload.released,
                upload.maturity,
                at,
            ),
        )
        row = conn.execute(
            "INSERT INTO releases (dist, version, author, maturity, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (dist, version) DO UPDATE SET"
            " author = excluded.author, updated_at = excluded.updated_at"
            f" RETURNING {_RELEASE_COLUMNS}",
            (upload.dist, upload.version, upload.author, upload.maturity, at),
        ).fetchone()
        return _release_from_row(row)


_StoreState = Literal["new", "opening", "open", "closing", "closed"]


class SQLiteStore(Store):
    """:class:`Store` over one SQLite file (see the module docstring for threads and grouping).

    ``path`` is a file, normally in the data directory; missing parent directories are
    created. ``batch_max`` caps the operations committed in one transaction, ``queue_max`` the
    operations waiting for the writer (callers wait beyond it). ``busy_timeout`` (seconds) is how
    long to wait for another process's lock. ``clock`` gives the time for timestamps and for
    "now" wherever a method takes no ``now`` argument. ``inline`` False runs every write group
    in the writer thread (for a file on a slow or network disk, where even a small commit may
    stall the event loop).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        batch_max: int = 256,
        queue_max: int = 10_000,
        busy_timeout: float = _BUSY_TIMEOUT,
        clock: Callable[[], float] = time.time,
        inline: bool = True,
    ) -> None:
        if batch_max < 1 or queue_max < 1:
            raise UsageError("batch_max and queue_max must be at least 1")
        self.path = Path(path)
        self._batch_max = batch_max
        self._queue_max = queue_max
        self._busy_timeout = busy_timeout
        self._clock = clock
        self._inline = inline
        self._checkpointed_at = (0, 0)  # transactions and rows changed at the last checkpoint
        self._state: _StoreState = "new"
        self._executor: ThreadPoolExecutor | None = None
        self._write_side: _WriteSide | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[tuple[_Op, asyncio.Future[Any], bool] | None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._putting = 0
        self._puts_idle = asyncio.Event()
        self._schema_version = 0

    @property
    def transactions_committed(self) -> int:
        """Write transactions committed since :meth:`open` (one per group, normally)."""
        return 0 if self._write_side is None else self._write_side.transactions

    @property
    def schema_version(self) -> int:
        """The schema version after :meth:`open`'s migrations (0 before)."""
        return self._schema_version

    # --- life cycle ------------------------------------------------------------------------

    async def open(self) -> None:
        if self._state != "new":
            raise UsageError(f"store is {self._state}; open() works once per instance")
        self._state = "opening"
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qs-store-writer")
        try:
            self._write_side = await loop.run_in_executor(self._executor, self._connect_writer)
            self._reader = await aiosqlite.connect(
                f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
            )
            await self._reader.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        except BaseException:
            await self._shutdown()
            raise
        self._queue = asyncio.Queue(self._queue_max)
        self._writer_task = loop.create_task(self._writer_loop(), name="qs-store-writer")
        self._state = "open"

    def _connect_writer(self) -> _WriteSide:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Used by the writer thread and, for inline groups, by the loop's thread: never by both
        # at once (the writer task runs one group at a time).
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise UsageError(f"{self.path}: SQLite refused WAL mode (journal_mode={mode})")
            conn.execute("PRAGMA synchronous = NORMAL")
            side = _WriteSide(conn, self._clock, int(self._busy_timeout * 1000))
            self._schema_version = side.migrate(MIGRATIONS)
            conn.execute("PRAGMA busy_timeout = 0")
            if self._inline:
                conn.execute("PRAGMA wal_autocheckpoint = 0")
        except BaseException:
            conn.close()
            raise
        return side

    async def close(self) -> None:
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        if self._state == "opening":
            raise UsageError("store is still opening")
        if self._state == "closing":
            await self._closed.wait()
            return
        self._state = "closing"
        assert self._queue is not None and self._writer_task is not None
        # Writes that were admitted but wait for room in a full queue go before the stop mark.
        while self._putting:
            self._puts_idle.clear()
            await self._puts_idle.wait()
        await self._queue.put(None)
        await self._writer_task
        await self._shutdown()

    async def _shutdown(self) -> None:
        try:
            if self._reader is not None:
                await self._reader.close()
            if self._write_side is not None and self._executor is not None:
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._write_side.close
                )
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            self._state = "closed"
            self._closed.set()

    # --- the writer ------------------------------------------------------------------------

    async def _write(self, op: Callable[[_WriteSide], T], light: bool = False) -> T:
        """Queue ``op`` for the next group and wait for its outcome. ``light``: a few indexed
        statements, fit to run on the event loop (see the module docstring)."""
        if self._state != "open":
            raise UsageError(f"store is {self._state}")
        assert self._queue is not None
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._putting += 1
        try:
            await self._queue.put((op, future, light))
        finally:
            self._putting -= 1
            if not self._putting:
                self._puts_idle.set()
        return await future

    def _checkpoint_due(self, side: _WriteSide) -> bool:
        transactions, changes = self._checkpointed_at
        return (
            side.transactions - transactions >= _CHECKPOINT_TRANSACTIONS
            or side.conn.total_changes - changes >= _CHECKPOINT_CHANGES
        )

    async def _writer_loop(self) -> None:
        assert self._queue is not None and self._executor is not None
        assert self._write_side is not None
        queue, executor, side = self._queue, self._executor, self._write_side
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            if self._inline and self._checkpoint_due(side):
                self._checkpointed_at = (side.transactions, side.conn.total_changes)
                try:
                    await loop.run_in_executor(executor, side.checkpoint)
                except sqlite3.Error as exc:  # the next one tries again; nothing is lost
                    log.warning("SQLite checkpoint of %s failed: %s", self.path, exc)
            item = await queue.get()
            batch: list[tuple[_Op, asyncio.Future[Any], bool]] = []
            while True:
                if item is None:
                    stopping = True
                    break
                if not item[1].done():  # a caller cancelled before the write began
                    batch.append(item)
                if len(batch) >= self._batch_max:
                    break
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
            if not batch:
                continue
            ops = [op for op, _, _ in batch]
            outcomes: list[_Outcome]
            if (
                self._inline
                and len(ops) <= _INLINE_MAX
                and all(light for _, _, light in batch)
                and side.begin_now()
            ):
                outcomes = side.run_group(ops, begun=True)
            else:
                try:
                    outcomes = await loop.run_in_executor(executor, side.run_group, ops)
                except BaseException as exc:
                    # Only a cancelled writer task gets here; the thread finishes the group.
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(UsageError("store writer stopped"))
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
            for (_, future, _), (ok, value) in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    # --- reading ---------------------------------------------------------------------------

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if self._state not in ("open", "closing") or self._reader is None:
            raise UsageError(f"store is {self._state}")
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.OperationalError as exc:
            raise _environmental(exc) from exc

    # --- tokens ----------------------------------------------------------------------------

    async def revoke_token(self, jti: str, exp: int | None) -> None:
        await self._write(lambda w: w.revoke_token(jti, exp))

    async def revoked_tokens(self) -> list[tuple[str, int | None]]:
        rows = await self._read("SELECT jti, exp FROM revoked_tokens")
        return [(row[0], row[1]) for row in rows]

    async def purge_revoked_tokens(self, now: int) -> int:
        return await self._write(lambda w: w.purge_revoked_tokens(now))

    # --- topic history ---------------------------------------------------------------------

    async def append_messages(self, msgs: Sequence[StoredMessage]) -> None:
        if not msgs:
            return
        batch = list(msgs)
        await self._write(lambda w: w.append_messages(batch))

    async def read_messages(self, topic: str, after_offset: int, limit: int) -> list[StoredMessage]:
        _check_limit(limit)
        rows = await self._read(
            "SELECT topic, seq, epoch, ts, data FROM messages"
            " WHERE topic = ? AND seq > ? ORDER BY seq LIMIT ?",
            (topic, after_offset, limit),
        )
        return [StoredMessage(row[0], row[1], row[2], row[3], row[4]) for row in rows]

    async def topic_heads(self) -> dict[str, tuple[str, int]]:
        rows = await self._read("SELECT topic, epoch, last_offset FROM topics")
        return {row[0]: (row[1], row[2]) for row in rows}

    async def trim_messages(self, topic: str, keep_last: int, older_than_ts: float | None) -> int:
        _check_limit(keep_last)
        return await self._write(lambda w: w.trim_messages(topic, keep_last, older_than_ts))

    async def set_topic_epoch(self, topic: str, epoch: str, last_offset: int = 0) -> None:
        await self._write(lambda w: w.set_topic_epoch(topic, epoch, last_offset))

    # --- jobs ------------------------------------------------------------------------------

    async def enqueue(self, job: NewJob) -> tuple[JobRecord, bool]:
        (out,) = await self._write(lambda w: w.enqueue((job,)), light=True)
        return out

    async def enqueue_many(self, jobs: Sequence[NewJob]) -> list[tuple[JobRecord, bool]]:
        if not jobs:
            return []
        batch = list(jobs)
        return await self._write(lambda w: w.enqueue(batch))

    async def claim(
        self,
        worker: str,
        queues: Sequence[str],
        limit: int,
        lease: float,
        now: float | None = None,
    ) -> list[JobRecord]:
        names = _claim_queues(queues, limit, lease)
        if limit == 0 or not names:
            return []
        return await self._write(lambda w: w.claim(worker, names, limit, lease, now), light=True)

    async def enqueue_and_claim(
        self, job: NewJob, worker: str, queues: Sequence[str], limit: int, lease: float
    ) -> tuple[JobRecord, bool, list[JobRecord]]:
        names = _claim_queues(queues, limit, lease)

        def op(w: _WriteSide) -> tuple[JobRecord, bool, list[JobRecord]]:
            ((rec, duplicate),) = w.enqueue((job,))
            claimed = w.claim(worker, names, limit, lease, None) if limit and names else []
            return rec, duplicate, claimed

        return await self._write(op, light=True)

    async def complete(
        self, job_id: str, attempt: int, result: Any, worker: str | None = None
    ) -> JobRecord | None:
        return await self._write(lambda w: w.complete(job_id, attempt, result, worker), light=True)

    async def fail(
        self,
        job_id: str,
        attempt: int,
        error: str,
        retry: bool,
        retry_delay: float,
        worker: str | None = None,
    ) -> JobRecord | None:
        _check_seconds("retry_delay", retry_delay)
        return await self._write(
            lambda w: w.fail(job_id, attempt, error, retry, retry_delay, worker), light=True
        )

    async def progress(
        self, job_id: str, attempt: int, data: Any, lease_until: float | None
    ) -> JobRecord | None:
        return await self._write(
            lambda w: w.progress(job_id, attempt, data, lease_until), light=True
        )

    async def renew(self, worker: str, lease_until: float) -> int:
        return await self._write(lambda w: w.renew(worker, lease_until), light=True)

    async def release_worker(self, worker: str, retry_delay: float = 0.0) -> list[JobRecord]:
        _check_seconds("retry_delay", retry_delay)
        return await self._write(
            lambda w: w.give_back("worker = ?", (worker,), "worker lost", retry_delay, w.clock())
        )

    async def expire_leases(self, now: float | None = None) -> list[JobRecord]:
        def op(w: _WriteSide) -> list[JobRecord]:
            at = w.clock() if now is None else now
            return w.give_back("lease_until < ?", (at,), "lease expired", 0.0, at)

        return await self._write(op)

    async def requeue_active(self, reason: str) -> list[JobRecord]:
        return await self._write(lambda w: w.give_back("1", (), reason, 0.0, w.clock()))

    async def cancel(self, job_id: str) -> tuple[JobRecord, JobState] | None:
        return await self._write(lambda w: w.cancel(job_id), light=True)

    async def retry(self, job_id: str) -> JobRecord | None:
        return await self._write(lambda w: w.retry(job_id), light=True)

    async def delete(self, job_id: str) -> bool:
        return await self._write(lambda w: w.delete(job_id), light=True)

    async def get_job(self, job_id: str) -> JobRecord | None:
        rows = await self._read(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job_from_row(rows[0]) if rows else None

    async def list_jobs(
        self,
        state: JobState | None = None,
        queue: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[JobRecord]:
        _check_limit(limit)
        if state is None and queue is not None:
            # One index-ordered arm per state, merged: no sort of the whole queue.
            arms = " UNION ALL ".join(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE queue = ? AND state = '{s.value}'"
                + (" AND id < ?" if before is not None else "")
                for s in JobState
            )
            arm_params = (queue,) if before is None else (queue, before)
            rows = await self._read(
                f"{arms} ORDER BY id DESC LIMIT ?", (*arm_params * len(JobState), limit)
            )
            return [_job_from_row(row) for row in rows]
        where: list[str] = []
        params: list[Any] = []
        if state is not None:
            where.append("state = ?")
            params.append(JobState(state).value)
        if queue is not None:
            where.append("queue = ?")
            params.append(queue)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs{clause} ORDER BY id DESC LIMIT ?", (*params, limit)
        )
        return [_job_from_row(row) for row in rows]

    async def next_run_at(self, queues: Sequence[str]) -> float | None:
        if isinstance(queues, str):
            raise UsageError("queues must be a sequence of queue names, not one str")
        names = list(dict.fromkeys(queues))
        if not names:
            return None
        values = ", ".join("(?)" for _ in names)
        rows = await self._read(
            f"WITH q(name) AS (VALUES {values}) SELECT MIN(({_DUE_IN_QUEUE_SQL})) FROM q", names
        )
        value = rows[0][0]
        return None if value is None else float(value)

    async def queue_stats(self) -> dict[str, QueueStats]:
        now = self._clock()
        rows = await self._read(
            "SELECT 0, queue, state, n FROM job_counts WHERE n > 0"
            " UNION ALL"
            " SELECT 1, c.queue, NULL, ("
            f"  SELECT MIN(run_at) FROM jobs INDEXED BY jobs_due WHERE {_READY_SQL}"
            "   AND queue = c.queue)"
            " FROM (SELECT DISTINCT queue FROM job_counts"
            f"  WHERE n > 0 AND {_READY_SQL}) AS c"
            " UNION ALL"
            " SELECT 2, queue, NULL, COUNT(*) FROM jobs INDEXED BY jobs_done"
            " WHERE state = 'done' AND finished_at >= ? GROUP BY queue",
            (now - 60.0,),
        )
        stats: dict[str, QueueStats] = {}
        for kind, queue, state, value in rows:
            entry = stats.setdefault(queue, QueueStats())
            if kind == 0:
                entry.counts[JobState(state)] = value
            elif kind == 1:
                if value is not None and value <= now:
                    entry.oldest_ready_age = now - value
            else:
                entry.done_last_minute = value
        return stats

    # --- key-value -------------------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        rows = await self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        await self._write(lambda w: w.set_meta(key, value))

    # --- CPAN Testers reports --------------------------------------------------------------

    async def add_report(
        self, report: IncomingReport, job: NewJob, payload_json: str | None = None
    ) -> tuple[str, JobRecord | None]:
        return await self._write(lambda w: w.add_report(report, job, payload_json), light=True)

    async def get_report(self, report_id: str) -> tuple[str, float] | None:
        rows = await self._read("SELECT body, received_at FROM reports WHERE id = ?", (report_id,))
        return (rows[0][0], rows[0][1]) if rows else None

    async def apply_report(
        self, summary: ReportSummary, stats: Mapping[str, Sequence[str]], now: float | None = None
    ) -> ReleaseRecord | None:
        frozen = {plugin: tuple(keys) for plugin, keys in stats.items()}
        return await self._write(lambda w: w.apply_report(summary, frozen, now), light=True)

    async def unapplied_report_jobs(self, limit: int = 1000) -> list[JobRecord]:
        _check_limit(limit)
        rows = await self._read(
            f"SELECT {_JOIN_JOB_COLUMNS} FROM reports AS r INDEXED BY reports_pending"
            " JOIN jobs AS j ON j.id = r.job_id"
            " WHERE r.summarized = 0 AND j.state = 'done' ORDER BY r.received_at LIMIT ?",
            (limit,),
        )
        return [_job_from_row(row) for row in rows]

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
        _check_limit(limit)
        sql, params = summaries_query(
            dist=dist,
            version=version,
            grade=grade,
            perls=perls,
            osnames=osnames,
            perl_maturity=perl_maturity,
            since=since,
            limit=limit,
        )
        return [_summary_from_row(row) for row in await self._read(sql, params)]

    async def release_known(self, dist: str, version: str | None = None) -> bool:
        if version is None:
            rows = await self._read("SELECT 1 FROM releases WHERE dist = ? LIMIT 1", (dist,))
        else:
            rows = await self._read(
                "SELECT 1 FROM releases WHERE dist = ? AND version = ?", (dist, version)
            )
        return bool(rows)

    async def record_upload(self, upload: UploadRecord, now: float | None = None) -> ReleaseRecord:
        return await self._write(lambda w: w.record_upload(upload, now))

    async def list_uploads(
        self,
        *,
        dist: str | None = None,
        author: str | None = None,
        maturity: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[UploadRecord]:
        _check_limit(limit)
        sql, params = uploads_query(
            dist=dist, author=author, maturity=maturity, since=since, limit=limit
        )
        return [_upload_from_row(row) for row in await self._read(sql, params)]

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
        _check_limit(limit)
        sql, params = releases_query(
            dist=dist, version=version, author=author, maturity=maturity, since=since, limit=limit
        )
        return [_release_from_row(row) for row in await self._read(sql, params)]

    async def report_stats(self) -> dict[str, dict[str, int]]:
        rows = await self._read("SELECT plugin, key, n FROM report_stats")
        out: dict[str, dict[str, int]] = {}
        for plugin, key, n in rows:
            out.setdefault(plugin, {})[key] = n
        return out
