"""The shared store: PostgreSQL through asyncpg, for several broker nodes on one database.

Every node opens its own :class:`PostgresStore` on the same database (and schema); they
coordinate through the database alone:

- ``claim`` picks ready jobs with ``FOR UPDATE SKIP LOCKED`` and marks them active in the same
  statement: two nodes never take the same job, and neither waits for the other's rows.
- Results are fenced by attempt in the ``WHERE`` clause of one ``UPDATE``: a late ``complete``
  from a worker whose lease ran out (on any node) changes nothing.
- Lease expiry runs on every node; ``SKIP LOCKED`` lets each expired job be given back by
  exactly one of them, so jobs held through a node that died come back by lease expiry.
- A trigger sends ``NOTIFY`` when a job becomes ready (see ``migrations/postgres.py``); the
  store ``LISTEN``\\ s on one extra connection and hands each notification to
  :attr:`PostgresStore.on_jobs_ready`, which the broker points at its dispatcher.
- The schema is migrated at open under a transaction-level advisory lock, so nodes that start
  together migrate once.

Connection: ``dsn`` is a libpq-style URL (``postgresql://user@host:5432/db``). Extra query
parameters become server settings, so ``?search_path=quicksilver`` puts the tables in schema
``quicksilver``; the first schema named in ``search_path`` (or given as ``schema=``) is created
when missing.

Limits and failure behaviour:

- At most ``pool_max`` connections per store (plus one for ``LISTEN``); callers beyond that
  wait for a free connection. Across nodes, keep ``nodes * (pool_max + 1)`` under the server's
  ``max_connections``.
- A lost or refused connection, a server shutting down, or a statement timeout reaches the
  caller as :class:`protocol.errors.Unavailable` (the write may or may not have been committed
  when the connection dropped during ``COMMIT``). Transactions that PostgreSQL aborts for a
  deadlock or a serialisation failure are retried (``retries`` times) before that.
- PostgreSQL text cannot hold the NUL character: a value with ``\\x00`` in a name or key fails
  with :class:`protocol.errors.UsageError` (NUL inside JSON values is stored escaped and is
  fine; in a worker's ``error`` text it is replaced by U+FFFD).
- When the ``LISTEN`` connection drops, it is re-opened with backoff and ``on_jobs_ready`` is
  called once after each reconnect (notifications sent meanwhile were lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, TypeAlias, TypeVar

import asyncpg

from broker.jobstate import JobState
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
from broker.store.migrations.postgres import MIGRATIONS, jobs_channel
from protocol.errors import Conflict, Unavailable, UsageError
from protocol.frames import JobId

__all__ = ["PostgresStore"]

log = logging.getLogger("quicksilver.store.postgres")

T = TypeVar("T")
Conn: TypeAlias = Any  # an asyncpg.Connection (asyncpg ships no type hints)
JobsReady = Callable[[str | None, float], None]

_JOB_COLUMNS = (
    "id, queue, payload, priority, run_at, unique_key, max_attempts, attempt, state, progress,"
    " result, error, worker, lease_until, created_at, updated_at, started_at, finished_at"
)
_J_COLUMNS = ", ".join("j." + c.strip() for c in _JOB_COLUMNS.split(","))
_READY_SQL = "state IN ('queued', 'retrying')"
_UNFINISHED_SQL = "state IN ('queued', 'active', 'retrying')"
_SUMMARY_COLUMNS = (
    "guid, dist, version, grade, reporter, platform, perl, perl_maturity, osname, osvers,"
    " maturity, received_at"
)
_RELEASE_COLUMNS = "dist, version, author, pass, fail, na, unknown, maturity, updated_at"
_UPLOAD_COLUMNS = "dist, version, author, filename, released, maturity"

# One index-ordered scan per queue (jobs_ready), each stopping at the limit; rows that another
# transaction holds are skipped, never waited for.
_CLAIM_SQL = f"""
WITH picked AS (
    SELECT r.id FROM unnest($1::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT id, priority, run_at FROM jobs
        WHERE {_READY_SQL} AND queue = q.name AND run_at <= $2
        ORDER BY priority DESC, run_at, id
        LIMIT $3
        FOR UPDATE SKIP LOCKED
    ) AS r
    ORDER BY r.priority DESC, r.run_at, r.id
    LIMIT $3
)
UPDATE jobs AS j SET state = 'active', attempt = j.attempt + 1, worker = $4, lease_until = $5,
    started_at = $2, updated_at = $2
FROM picked WHERE j.id = picked.id
RETURNING {_J_COLUMNS}
"""

# Give back active jobs: retrying while attempts remain, else failed. ``{where}`` selects them.
_GIVE_BACK_SQL = f"""
WITH picked AS (
    SELECT id FROM jobs WHERE state = 'active' AND {{where}} ORDER BY id FOR UPDATE SKIP LOCKED
)
UPDATE jobs AS j SET
    state = CASE WHEN j.attempt < j.max_attempts THEN 'retrying' ELSE 'failed' END,
    run_at = CASE WHEN j.attempt < j.max_attempts THEN $1 ELSE j.run_at END,
    finished_at = CASE WHEN j.attempt < j.max_attempts THEN j.finished_at ELSE $2 END,
    error = $3, lease_until = NULL, updated_at = $2
FROM picked WHERE j.id = picked.id
RETURNING {_J_COLUMNS}
"""

_RETRY_CODES = ("40001", "40P01")  # serialization_failure, deadlock_detected
_NUL_CODES = ("22021", "22P05")  # character_not_in_repertoire, untranslatable_character


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what} is not JSON-portable: {exc}") from None


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _job(row: Sequence[Any]) -> JobRecord:
    return JobRecord(
        id=JobId(row[0]),
        queue=row[1],
        payload=json.loads(row[2]),
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


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise UsageError(f"limit must be an int >= 0, not {limit!r}")


def _check_seconds(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{name} must be a finite number of seconds >= 0, not {value!r}")


def _queues(queues: Sequence[str]) -> list[str]:
    if isinstance(queues, str):
        raise UsageError("queues must be a sequence of queue names, not one str")
    return list(dict.fromkeys(queues))


def _filters(
    pairs: Sequence[tuple[str, Any]], params: list[Any], where: list[str] | None = None
) -> list[str]:
    """``column = $n`` for each pair whose value is not None."""
    clauses = [] if where is None else where
    for column, value in pairs:
        if value is not None:
            params.append(value)
            clauses.append(f"{column} = ${len(params)}")
    return clauses


def _in_list(column: str, values: Sequence[str], params: list[Any], where: list[str]) -> None:
    if values:
        params.append(list(values))
        where.append(f"{column} = ANY(${len(params)}::text[])")


def _clause(where: list[str]) -> str:
    return f" WHERE {' AND '.join(where)}" if where else ""


def _unquote(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


#: What a lost or broken connection raises: the server went away, the socket failed, or asyncpg
#: found the connection in a state it cannot use (a backend terminated mid-operation).
_CONNECTION_ERRORS = (TimeoutError, OSError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def _unavailable(exc: BaseException) -> Unavailable:
    unavailable = Unavailable(f"job store unavailable: {exc}")
    unavailable.__cause__ = exc
    return unavailable


def _is_environmental(exc: BaseException) -> bool:
    """Failures of the server or the connection, as opposed to a refused statement."""
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        # 08 connection exception, 53 insufficient resources, 57 operator intervention
        # (shutdown, statement timeout), 58 system error.
        return state[:2] in ("08", "53", "57", "58")
    return False


_StoreState = Literal["new", "opening", "open", "closing", "closed"]


class PostgresStore(Store):
    """:class:`Store` over a PostgreSQL database that several broker nodes may share.

    ``dsn`` is a ``postgresql://`` URL; ``schema`` (optional) puts the tables in that schema,
    created when missing. ``application_name`` names the connections in ``pg_stat_activity``.
    ``pool_min``/``pool_max`` bound the connection pool; ``retries`` is
    how often a transaction aborted by a deadlock or serialisation failure is run again;
    ``command_timeout`` (seconds) bounds each statement. ``clock`` gives "now" wherever a method
    takes no ``now`` argument, and every timestamp.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        pool_min: int = 1,
        pool_max: int = 10,
        retries: int = 5,
        command_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        application_name: str = "quicksilver",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if pool_min < 0 or pool_max < 1 or pool_min > pool_max:
            raise UsageError("need 0 <= pool_min <= pool_max and pool_max >= 1")
        if schema is not None and (not schema or "\x00" in schema):
            raise UsageError("schema must be a non-empty name without NUL")
        self.dsn = dsn
        self.schema = schema
        self.application_name = application_name
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._retries = retries
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._state: _StoreState = "new"
        self._pool: asyncpg.Pool | None = None
        self._schema_version = 0
        self._schema_name = ""
        self._last_micros = 0
        self._rng = random.Random()
        self._listener: asyncio.Task[None] | None = None
        #: Called with ``(queue, run_at)`` for each job that became ready to claim on any node
        #: (``queue`` None after the notification connection was re-established: look at every
        #: queue). Runs on the event loop; must not block; exceptions are logged.
        self.on_jobs_ready: JobsReady | None = None
        self.listening = asyncio.Event()

    @property
    def single_node(self) -> bool:
        return False

    @property
    def schema_version(self) -> int:
        """The schema version after :meth:`open`'s migrations (0 before)."""
        return self._schema_version

    @property
    def schema_name(self) -> str:
        """The schema the tables live in (known after :meth:`open`)."""
        return self._schema_name

    # --- life cycle ------------------------------------------------------------------------

    def _server_settings(self) -> dict[str, str]:
        settings = {"application_name": self.application_name}
        if self.schema is not None:
            settings["search_path"] = '"' + self.schema.replace('"', '""') + '"'
        return settings

    async def _connect(self) -> Conn:
        return await asyncpg.connect(
            self.dsn,
            server_settings=self._server_settings(),
            timeout=self._connect_timeout,
            command_timeout=self._command_timeout,
        )

    async def open(self) -> None:
        if self._state != "new":
            raise UsageError(f"store is {self._state}; open() works once per instance")
        self._state = "opening"
        try:
            conn = await self._connect()
            try:
                await self._migrate(conn)
            finally:
                await conn.close()
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._pool_min,
                max_size=self._pool_max,
                server_settings=self._server_settings(),
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
            )
        except BaseException as exc:
            self._state = "closed"
            if self._pool is not None:
                self._pool.terminate()
            if isinstance(exc, SchemaTooNew | UsageError) or not _is_environmental(exc):
                raise
            raise _unavailable(exc) from exc
        self._listener = asyncio.create_task(self._listen_loop(), name="qs-store-listen")
        self._state = "open"

    async def _migrate(self, conn: Conn) -> None:
        async with conn.transaction():
            wanted, current = await self._schemas(conn)
            # One node creates and migrates; the others wait here, then find nothing to do.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"quicksilver:{wanted or current}"
            )
            if wanted is not None and current != _unquote(wanted):
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {wanted}")
                current = await conn.fetchval("SELECT current_schema()")
            if current is None:
                raise UsageError("no schema to create the tables in: set search_path or schema=")
            self._schema_name = str(current)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at double precision NOT NULL)"
            )
            applied = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
            known = max((m.version for m in MIGRATIONS), default=0)
            if applied > known:
                raise SchemaTooNew(
                    f"database schema version {applied} is newer than this release's {known}"
                )
            for migration in sorted(MIGRATIONS, key=lambda m: m.version):
                if migration.version > applied:
                    await self._apply(conn, migration)
        self._schema_version = max(applied, known)
        last = await conn.fetchval("SELECT max(id) FROM jobs")
        if last:
            with contextlib.suppress(ValueError):
                self._last_micros = int(last[:14], 16)

    @staticmethod
    async def _schemas(conn: Conn) -> tuple[str | None, str | None]:
        """The first schema named in ``search_path`` (as written, quoted or not; None when
        only ``$user``), and the schema tables would go to now."""
        path = await conn.fetchval("SELECT current_setting('search_path')")
        names = [n.strip() for n in str(path).split(",") if n.strip()]
        wanted = next((n for n in names if n not in ('"$user"', "$user")), None)
        current = await conn.fetchval("SELECT current_schema()")
        return wanted, current

    async def _apply(self, conn: Conn, migration: Migration) -> None:
        for statement in migration.statements:
            await conn.execute(statement)
        await conn.execute(
            "INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, $3)",
            migration.version,
            migration.name,
            time.time(),
        )

    async def close(self) -> None:
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        if self._state == "opening":
            raise UsageError("store is still opening")
        if self._state == "closing":
            return
        self._state = "closing"
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        try:
            if self._pool is not None:
                await asyncio.wait_for(self._pool.close(), timeout=self._command_timeout)
        except (asyncpg.PostgresError, *_CONNECTION_ERRORS):
            if self._pool is not None:
                self._pool.terminate()
        finally:
            self._state = "closed"

    # --- notifications ---------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        channel = jobs_channel(self._schema_name)
        delay = 0.1
        first = True
        while True:
            lost = asyncio.Event()
            conn: Conn | None = None
            try:
                conn = await self._connect()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(channel, self._notified)
                self.listening.set()
                delay = 0.1
                if not first:
                    self._tell(None, self._clock())
                first = False
                await lost.wait()
            except asyncio.CancelledError:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=1.0)
                raise
            except Exception as exc:
                log.warning("job notifications: %s; reconnecting in %.1f s", exc, delay)
            finally:
                self.listening.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        at, _, queue = str(payload).partition(" ")
        try:
            run_at = float(at)
        except ValueError:
            return
        self._tell(queue, run_at)

    def _tell(self, queue: str | None, run_at: float) -> None:
        callback = self.on_jobs_ready
        if callback is None:
            return
        try:
            callback(queue, run_at)
        except Exception:
            log.exception("jobs-ready callback failed")

    # --- running statements ----------------------------------------------------------------

    def _ready_pool(self) -> asyncpg.Pool:
        if self._state not in ("open", "closing") or self._pool is None:
            raise UsageError(f"store is {self._state}")
        return self._pool

    async def _tx(self, work: Callable[[Conn], Awaitable[T]], *, single: bool = False) -> T:
        """Run ``work`` in one transaction; retried on deadlock or serialisation failure.

        ``single``: ``work`` is one statement, atomic on its own; it runs without ``BEGIN`` and
        ``COMMIT``, one round trip instead of three (the hot paths: claim, complete, fail)."""
        pool = self._ready_pool()
        attempt = 0
        while True:
            try:
                async with pool.acquire() as conn:
                    if single:
                        return await work(conn)
                    async with conn.transaction():
                        return await work(conn)
            except asyncpg.PostgresError as exc:
                state = getattr(exc, "sqlstate", "")
                if state in _RETRY_CODES and attempt < self._retries:
                    attempt += 1
                    await asyncio.sleep(self._rng.uniform(0, 0.002 * attempt))
                    continue
                raise self._translate(exc) from exc
            except _CONNECTION_ERRORS as exc:
                raise _unavailable(exc) from exc

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        pool = self._ready_pool()
        try:
            return list(await pool.fetch(sql, *args))
        except asyncpg.PostgresError as exc:
            raise self._translate(exc) from exc
        except _CONNECTION_ERRORS as exc:
            raise _unavailable(exc) from exc

    @staticmethod
    def _translate(exc: Exception) -> Exception:
        state = getattr(exc, "sqlstate", "")
        if state in _NUL_CODES:
            return UsageError(f"PostgreSQL cannot store this text: {exc}")
        if _is_environmental(exc):
            return _unavailable(exc)
        return exc

    def new_job_id(self) -> str:
        return self._new_id(self._clock())

    def _new_id(self, now: float) -> JobId:
        """Time-ordered and strictly increasing within this store: 14 hex digits of
        microseconds then 6 random ones, so that ids from several nodes do not collide."""
        micros = max(int(now * 1_000_000), self._last_micros + 1)
        self._last_micros = micros
        return JobId(f"{micros:014x}{self._rng.getrandbits(24):06x}")

    # --- tokens, meta ----------------------------------------------------------------------

    async def revoke_token(self, jti: str, exp: int | None) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO revoked_tokens (jti, exp) VALUES ($1, $2)"
                " ON CONFLICT (jti) DO UPDATE SET exp = excluded.exp",
                jti,
                exp,
            )
        )

    async def revoked_tokens(self) -> list[tuple[str, int | None]]:
        rows = await self._fetch("SELECT jti, exp FROM revoked_tokens")
        return [(row[0], row[1]) for row in rows]

    async def purge_revoked_tokens(self, now: int) -> int:
        rows = await self._tx(
            lambda c: c.fetch("DELETE FROM revoked_tokens WHERE exp < $1 RETURNING 1", now)
        )
        return len(rows)

    async def get_meta(self, key: str) -> str | None:
        rows = await self._fetch("SELECT value FROM meta WHERE key = $1", key)
        return rows[0][0] if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                key,
                value,
            )
        )

    # --- topic history ---------------------------------------------------------------------

    async def append_messages(self, msgs: Sequence[StoredMessage]) -> None:
        if not msgs:
            return
        batch = list(msgs)

        async def work(c: Conn) -> None:
            heads: dict[str, tuple[str, int] | None] = {}
            for topic in sorted({m.topic for m in batch}):  # a fixed lock order
                row = await c.fetchrow(
                    "SELECT epoch, last_offset FROM topics WHERE topic = $1 FOR UPDATE", topic
                )
                heads[topic] = None if row is None else (row[0], row[1])
            rows = []
            for msg in batch:
                head = heads[msg.topic]
                if head is not None and head[0] == msg.epoch and msg.offset <= head[1]:
                    raise UsageError(
                        f"offset {msg.offset} on {msg.topic!r} is not above the last stored"
                        f" offset {head[1]} of epoch {msg.epoch!r}"
                    )
                if head is not None and head[0] != msg.epoch:
                    await c.execute("DELETE FROM messages WHERE topic = $1", msg.topic)
                rows.append((msg.topic, msg.offset, msg.epoch, msg.ts, msg.data_json))
                heads[msg.topic] = (msg.epoch, msg.offset)
            await c.executemany(
                "INSERT INTO messages (topic, seq, epoch, ts, data) VALUES ($1, $2, $3, $4, $5)",
                rows,
            )
            await c.executemany(
                "INSERT INTO topics (topic, epoch, last_offset) VALUES ($1, $2, $3)"
                " ON CONFLICT (topic) DO UPDATE"
                " SET epoch = excluded.epoch, last_offset = excluded.last_offset",
                [(t, h[0], h[1]) for t, h in heads.items() if h is not None],
            )

        await self._tx(work)

    async def read_messages(self, topic: str, after_offset: int, limit: int) -> list[StoredMessage]:
        _check_limit(limit)
        rows = await self._fetch(
            "SELECT topic, seq, epoch, ts, data FROM messages"
            " WHERE topic = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            topic,
            after_offset,
            limit,
        )
        return [StoredMessage(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def topic_heads(self) -> dict[str, tuple[str, int]]:
        rows = await self._fetch("SELECT topic, epoch, last_offset FROM topics")
        return {r[0]: (r[1], r[2]) for r in rows}

    async def trim_messages(self, topic: str, keep_last: int, older_than_ts: float | None) -> int:
        _check_limit(keep_last)

        async def work(c: Conn) -> int:
            deleted = await c.fetch(
                "DELETE FROM messages WHERE topic = $1 AND seq <= ("
                " SELECT seq FROM messages WHERE topic = $1 ORDER BY seq DESC"
                " LIMIT 1 OFFSET $2) RETURNING 1",
                topic,
                keep_last,
            )
            count = len(deleted)
            if older_than_ts is not None:
                old = await c.fetch(
                    "DELETE FROM messages WHERE topic = $1 AND ts < $2 RETURNING 1",
                    topic,
                    older_than_ts,
                )
                count += len(old)
            return count

        return await self._tx(work)

    async def set_topic_epoch(self, topic: str, epoch: str, last_offset: int = 0) -> None:
        async def work(c: Conn) -> None:
            await c.execute("DELETE FROM messages WHERE topic = $1", topic)
            await c.execute(
                "INSERT INTO topics (topic, epoch, last_offset) VALUES ($1, $2, $3)"
                " ON CONFLICT (topic) DO UPDATE"
                " SET epoch = excluded.epoch, last_offset = excluded.last_offset",
                topic,
                epoch,
                last_offset,
            )

        await self._tx(work)

    # --- jobs: producers -------------------------------------------------------------------

    async def _insert_job(
        self, c: Conn, job: NewJob, now: float, payload_json: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Insert one job, or find the unfinished one holding its unique key. ``payload_json``
        is ``job.payload`` already encoded, when the caller has it."""
        if payload_json is None:
            payload = _dumps(job.payload, "payload")
            value = json.loads(payload)
        else:
            payload, value = payload_json, job.payload
        given = job.id
        while True:
            if job.unique_key is not None:
                row = await c.fetchrow(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE unique_key = $1 AND {_UNFINISHED_SQL}",
                    job.unique_key,
                )
                if row is not None:
                    return _job(row), True
            record = JobRecord(
                id=JobId(given) if given else self._new_id(now),
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
            # No conflict target: a unique key taken by a concurrent enqueue on another node
            # and (rarely) an id collision both end here, and the loop tells them apart.
            inserted = await c.fetchval(
                "INSERT INTO jobs (id, queue, payload, priority, run_at, unique_key,"
                " max_attempts, attempt, state, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, 0, 'queued', $8, $8)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                record.id,
                record.queue,
                payload,
                record.priority,
                record.run_at,
                record.unique_key,
                record.max_attempts,
                now,
            )
            if inserted is not None:
                return record, False
            given = None  # an id collision (or a key race): the next try makes its own

    async def enqueue(self, job: NewJob) -> tuple[JobRecord, bool]:
        now = self._clock()
        # One INSERT, or a lookup of the key's holder then the INSERT: each statement is
        # atomic and the loop in _insert_job resolves races, so no transaction is needed.
        return await self._tx(lambda c: self._insert_job(c, job, now), single=True)

    async def enqueue_many(self, jobs: Sequence[NewJob]) -> list[tuple[JobRecord, bool]]:
        if not jobs:
            return []
        batch = list(jobs)
        now = self._clock()

        async def work(c: Conn) -> list[tuple[JobRecord, bool]]:
            return [await self._insert_job(c, job, now) for job in batch]

        return await self._tx(work)

    # --- jobs: workers ---------------------------------------------------------------------

    async def claim(
        self,
        worker: str,
        queues: Sequence[str],
        limit: int,
        lease: float,
        now: float | None = None,
    ) -> list[JobRecord]:
        _check_limit(limit)
        _check_seconds("lease", lease)
        names = _queues(queues)
        if limit == 0 or not names:
            return []
        at = self._clock() if now is None else now
        rows = await self._tx(
            lambda c: c.fetch(_CLAIM_SQL, names, at, limit, worker, at + lease), single=True
        )
        records = [_job(row) for row in rows]
        records.sort(key=lambda r: (-r.priority, r.run_at, r.id))
        return records

    async def complete(
        self, job_id: str, attempt: int, result: Any, worker: str | None = None
    ) -> JobRecord | None:
        text = _dumps(result, "result")
        now = self._clock()
        rows = await self._tx(
            lambda c: c.fetch(
                "UPDATE jobs SET state = 'done', result = $3, lease_until = NULL,"
                " finished_at = $4, updated_at = $4"
                " WHERE id = $1 AND state = 'active' AND attempt = $2"
                " AND ($5::text IS NULL OR worker = $5)"
                f" RETURNING {_JOB_COLUMNS}",
                job_id,
                attempt,
                text,
                now,
                worker,
            ),
            single=True,
        )
        return _job(rows[0]) if rows else None

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
        now = self._clock()
        rows = await self._tx(
            lambda c: c.fetch(
                "UPDATE jobs SET"
                " state = CASE WHEN $3 AND attempt < max_attempts"
                "  THEN 'retrying' ELSE 'failed' END,"
                " run_at = CASE WHEN $3 AND attempt < max_attempts THEN $4 ELSE run_at END,"
                " finished_at = CASE WHEN $3 AND attempt < max_attempts"
                "  THEN finished_at ELSE $5 END,"
                " error = $6, lease_until = NULL, updated_at = $5"
                " WHERE id = $1 AND state = 'active' AND attempt = $2"
                " AND ($7::text IS NULL OR worker = $7)"
                f" RETURNING {_JOB_COLUMNS}",
                job_id,
                attempt,
                bool(retry),
                now + retry_delay,
                now,
                error.replace("\x00", "\ufffd"),
                worker,
            ),
            single=True,
        )
        return _job(rows[0]) if rows else None

    async def progress(
        self, job_id: str, attempt: int, data: Any, lease_until: float | None
    ) -> JobRecord | None:
        _dumps(data, "progress")
        now = self._clock()

        async def work(c: Conn) -> JobRecord | None:
            row = await c.fetchrow(
                "SELECT progress FROM jobs WHERE id = $1 AND state = 'active' AND attempt = $2"
                " FOR UPDATE",
                job_id,
                attempt,
            )
            if row is None:
                return None
            old = _loads(row[0])
            merged = {**old, **data} if isinstance(old, dict) and isinstance(data, dict) else data
            updated = await c.fetchrow(
                "UPDATE jobs SET progress = $3, lease_until = COALESCE($4, lease_until),"
                " updated_at = $5 WHERE id = $1 AND attempt = $2"
                f" RETURNING {_JOB_COLUMNS}",
                job_id,
                attempt,
                _dumps(merged, "progress"),
                lease_until,
                now,
            )
            return _job(updated)

        return await self._tx(work)

    async def renew(self, worker: str, lease_until: float) -> int:
        rows = await self._tx(
            lambda c: c.fetch(
                "UPDATE jobs SET lease_until = $2 WHERE state = 'active' AND worker = $1"
                " RETURNING 1",
                worker,
                lease_until,
            ),
            single=True,
        )
        return len(rows)

    async def _give_back(
        self, where: str, args: tuple[Any, ...], error: str, retry_delay: float, now: float
    ) -> list[JobRecord]:
        sql = _GIVE_BACK_SQL.format(where=where)
        rows = await self._tx(
            lambda c: c.fetch(sql, now + retry_delay, now, error, *args), single=True
        )
        return sorted((_job(row) for row in rows), key=lambda r: r.id)

    async def release_worker(self, worker: str, retry_delay: float = 0.0) -> list[JobRecord]:
        _check_seconds("retry_delay", retry_delay)
        return await self._give_back(
            "worker = $4", (worker,), "worker lost", retry_delay, self._clock()
        )

    async def expire_leases(self, now: float | None = None) -> list[JobRecord]:
        at = self._clock() if now is None else now
        return await self._give_back("lease_until < $4", (at,), "lease expired", 0.0, at)

    async def requeue_active(self, reason: str) -> list[JobRecord]:
        return await self._give_back("true", (), reason, 0.0, self._clock())

    # --- jobs: operators -------------------------------------------------------------------

    async def cancel(self, job_id: str) -> tuple[JobRecord, JobState] | None:
        now = self._clock()

        async def work(c: Conn) -> tuple[JobRecord, JobState] | None:
            state = await c.fetchval("SELECT state FROM jobs WHERE id = $1 FOR UPDATE", job_id)
            if state is None:
                return None
            old = JobState(state)
            if old not in (JobState.QUEUED, JobState.ACTIVE, JobState.RETRYING):
                raise Conflict(f"job {job_id} is already {old.value}")
            row = await c.fetchrow(
                "UPDATE jobs SET state = 'cancelled', lease_until = NULL, finished_at = $2,"
                f" updated_at = $2 WHERE id = $1 RETURNING {_JOB_COLUMNS}",
                job_id,
                now,
            )
            return _job(row), old

        return await self._tx(work)

    async def retry(self, job_id: str) -> JobRecord | None:
        now = self._clock()

        async def work(c: Conn) -> JobRecord | None:
            state = await c.fetchval("SELECT state FROM jobs WHERE id = $1 FOR UPDATE", job_id)
            if state is None:
                return None
            old = JobState(state)
            if old not in (JobState.FAILED, JobState.CANCELLED):
                raise Conflict(f"job {job_id} is {old.value}; only failed or cancelled jobs retry")
            try:
                async with c.transaction():
                    row = await c.fetchrow(
                        "UPDATE jobs SET state = 'queued', run_at = $2,"
                        " max_attempts = GREATEST(max_attempts, attempt + 1), error = NULL,"
                        " result = NULL, worker = NULL, lease_until = NULL, finished_at = NULL,"
                        f" updated_at = $2 WHERE id = $1 RETURNING {_JOB_COLUMNS}",
                        job_id,
                        now,
                    )
            except asyncpg.UniqueViolationError:
                raise Conflict(
                    f"job {job_id} cannot be retried: another unfinished job has its unique key"
                ) from None
            return _job(row)

        return await self._tx(work)

    async def delete(self, job_id: str) -> bool:
        async def work(c: Conn) -> bool:
            state = await c.fetchval("SELECT state FROM jobs WHERE id = $1 FOR UPDATE", job_id)
            if state is None:
                return False
            if state == JobState.ACTIVE.value:
                raise Conflict(f"job {job_id} is active; cancel it before deleting it")
            await c.execute("DELETE FROM jobs WHERE id = $1", job_id)
            return True

        return await self._tx(work)

    # --- jobs: reading ---------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobRecord | None:
        rows = await self._fetch(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1", job_id)
        return _job(rows[0]) if rows else None

    async def list_jobs(
        self,
        state: JobState | None = None,
        queue: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[JobRecord]:
        _check_limit(limit)
        params: list[Any] = []
        where = _filters(
            [("state", None if state is None else JobState(state).value), ("queue", queue)],
            params,
        )
        if before is not None:
            params.append(before)
            where.append(f"id < ${len(params)}")
        params.append(limit)
        rows = await self._fetch(
            f"SELECT {_JOB_COLUMNS} FROM jobs{_clause(where)} ORDER BY id DESC"
            f" LIMIT ${len(params)}",
            *params,
        )
        return [_job(row) for row in rows]

    async def next_run_at(self, queues: Sequence[str]) -> float | None:
        names = _queues(queues)
        if not names:
            return None
        rows = await self._fetch(
            "SELECT min(m.at) FROM unnest($1::text[]) AS q(name) CROSS JOIN LATERAL ("
            f" SELECT min(run_at) AS at FROM jobs WHERE {_READY_SQL} AND queue = q.name) AS m",
            names,
        )
        value = rows[0][0]
        return None if value is None else float(value)

    async def queue_stats(self) -> dict[str, QueueStats]:
        now = self._clock()
        rows = await self._fetch(
            "SELECT 0, queue, state, sum(n)::float8 FROM job_counts GROUP BY queue, state"
            " HAVING sum(n) > 0"
            " UNION ALL"
            " SELECT 1, c.queue, NULL, ("
            f"  SELECT min(run_at) FROM jobs WHERE {_READY_SQL} AND queue = c.queue)"
            " FROM (SELECT queue FROM job_counts"
            f"  WHERE {_READY_SQL} GROUP BY queue HAVING sum(n) > 0) AS c"
            " UNION ALL"
            " SELECT 2, queue, NULL, count(*)::float8 FROM jobs"
            " WHERE state = 'done' AND finished_at >= $1 GROUP BY queue",
            now - 60.0,
        )
        stats: dict[str, QueueStats] = {}
        for kind, queue, state, value in rows:
            entry = stats.setdefault(queue, QueueStats())
            if kind == 0:
                entry.counts[JobState(state)] = int(value)
            elif kind == 1:
                if value is not None and value <= now:
                    entry.oldest_ready_age = now - value
            else:
                entry.done_last_minute = int(value)
        return stats

    # --- CPAN Testers reports --------------------------------------------------------------

    async def add_report(
        self, report: IncomingReport, job: NewJob, payload_json: str | None = None
    ) -> tuple[str, JobRecord | None]:
        now = self._clock()

        async def work(c: Conn) -> tuple[str, JobRecord | None]:
            # The digest is unique: of two nodes storing the same report at once, one waits
            # for the other and then finds its row.
            existing = await c.fetchval("SELECT id FROM reports WHERE digest = $1", report.digest)
            if existing is not None:
                return str(existing), None
            inserted = await c.fetchval(
                "INSERT INTO reports (id, digest, received_at, body) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (digest) DO NOTHING RETURNING id",
                report.id,
                report.digest,
                report.received_at,
                report.body,
            )
            if inserted is None:
                existing = await c.fetchval(
                    "SELECT id FROM reports WHERE digest = $1", report.digest
                )
                return str(existing), None
            record, _duplicate = await self._insert_job(c, job, now, payload_json)
            await c.execute("UPDATE reports SET job_id = $2 WHERE id = $1", report.id, record.id)
            return report.id, record

        return await self._tx(work)

    async def get_report(self, report_id: str) -> tuple[str, float] | None:
        rows = await self._fetch("SELECT body, received_at FROM reports WHERE id = $1", report_id)
        return (rows[0][0], rows[0][1]) if rows else None

    async def apply_report(
        self, summary: ReportSummary, stats: Mapping[str, Sequence[str]], now: float | None = None
    ) -> ReleaseRecord | None:
        at = self._clock() if now is None else now
        bumps = [(plugin, key) for plugin, keys in stats.items() for key in keys]
        grade = GRADES[GRADES.index(summary.grade)]  # a column name, never caller text

        async def work(c: Conn) -> ReleaseRecord | None:
            inserted = await c.fetchval(
                f"INSERT INTO report_summaries ({_SUMMARY_COLUMNS}, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
                " ON CONFLICT (guid) DO NOTHING RETURNING 1",
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
            )
            if inserted is None:
                return None
            author = await c.fetchval(
                "SELECT author FROM uploads WHERE dist = $1 AND version = $2",
                summary.dist,
                summary.version,
            )
            row = await c.fetchrow(
                f"INSERT INTO releases AS r (dist, version, author, {grade}, maturity, updated_at)"
                " VALUES ($1, $2, $3, 1, $4, $5) ON CONFLICT (dist, version) DO UPDATE SET"
                f" {grade} = r.{grade} + 1, author = COALESCE(excluded.author, r.author),"
                f" updated_at = excluded.updated_at RETURNING {_RELEASE_COLUMNS}",
                summary.dist,
                summary.version,
                author,
                summary.maturity,
                at,
            )
            await c.execute("UPDATE reports SET summarized = true WHERE id = $1", summary.guid)
            if bumps:
                await c.executemany(
                    "INSERT INTO report_stats AS s (plugin, key, n) VALUES ($1, $2, 1)"
                    " ON CONFLICT (plugin, key) DO UPDATE SET n = s.n + 1",
                    sorted(bumps),
                )
            return ReleaseRecord(*row)

        return await self._tx(work)

    async def unapplied_report_jobs(self, limit: int = 1000) -> list[JobRecord]:
        _check_limit(limit)
        rows = await self._fetch(
            f"SELECT {_J_COLUMNS} FROM reports AS r JOIN jobs AS j ON j.id = r.job_id"
            " WHERE NOT r.summarized AND j.state = 'done' ORDER BY r.received_at LIMIT $1",
            limit,
        )
        return [_job(row) for row in rows]

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
        params: list[Any] = []
        where = _filters(
            [
                ("dist", dist),
                ("version", version),
                ("grade", grade),
                ("perl_maturity", perl_maturity),
            ],
            params,
        )
        _in_list("perl", list(perls), params, where)
        _in_list("osname", list(osnames), params, where)
        if since is not None:
            params.append(since)
            where.append(f"updated_at >= ${len(params)}")
        params.append(limit)
        rows = await self._fetch(
            f"SELECT {_SUMMARY_COLUMNS} FROM report_summaries{_clause(where)}"
            f" ORDER BY updated_at, seq LIMIT ${len(params)}",
            *params,
        )
        return [ReportSummary(*row) for row in rows]

    async def release_known(self, dist: str, version: str | None = None) -> bool:
        if version is None:
            rows = await self._fetch("SELECT 1 FROM releases WHERE dist = $1 LIMIT 1", dist)
        else:
            rows = await self._fetch(
                "SELECT 1 FROM releases WHERE dist = $1 AND version = $2", dist, version
            )
        return bool(rows)

    async def record_upload(self, upload: UploadRecord, now: float | None = None) -> ReleaseRecord:
        at = self._clock() if now is None else now

        async def work(c: Conn) -> ReleaseRecord:
            await c.execute(
                f"INSERT INTO uploads ({_UPLOAD_COLUMNS}, recorded_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (dist, version) DO UPDATE SET author = excluded.author,"
                " filename = excluded.filename, released = excluded.released,"
                " maturity = excluded.maturity, recorded_at = excluded.recorded_at",
                upload.dist,
                upload.version,
                upload.author,
                upload.filename,
                upload.released,
                upload.maturity,
                at,
            )
            row = await c.fetchrow(
                "INSERT INTO releases (dist, version, author, maturity, updated_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (dist, version) DO UPDATE SET"
                " author = excluded.author, updated_at = excluded.updated_at"
                f" RETURNING {_RELEASE_COLUMNS}",
                upload.dist,
                upload.version,
                upload.author,
                upload.maturity,
                at,
            )
            return ReleaseRecord(*row)

        return await self._tx(work)

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
        params: list[Any] = []
        where = _filters([("dist", dist), ("author", author), ("maturity", maturity)], params)
        if since is not None:
            params.append(since)
            where.append(f"released >= ${len(params)}")
        params.append(limit)
        rows = await self._fetch(
            f"SELECT {_UPLOAD_COLUMNS} FROM uploads{_clause(where)}"
            f" ORDER BY released, dist, version LIMIT ${len(params)}",
            *params,
        )
        return [UploadRecord(*row) for row in rows]

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
        params: list[Any] = []
        where = _filters(
            [("dist", dist), ("version", version), ("author", author), ("maturity", maturity)],
            params,
        )
        if since is not None:
            params.append(since)
            where.append(f"updated_at >= ${len(params)}")
        params.append(limit)
        rows = await self._fetch(
            f"SELECT {_RELEASE_COLUMNS} FROM releases{_clause(where)}"
            f" ORDER BY updated_at, dist, version LIMIT ${len(params)}",
            *params,
        )
        return [ReleaseRecord(*row) for row in rows]

    async def report_stats(self) -> dict[str, dict[str, int]]:
        rows = await self._fetch("SELECT plugin, key, n FROM report_stats")
        out: dict[str, dict[str, int]] = {}
        for plugin, key, n in rows:
            out.setdefault(plugin, {})[key] = n
        return out
