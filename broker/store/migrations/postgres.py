"""The PostgreSQL schema, as an ordered list of migrations.

The tables and columns mirror the SQLite schema (``migrations/sqlite.py``) so that both stores
keep the same records: JSON values are stored as JSON text (``text``, not ``jsonb``: ``jsonb``
refuses ``\\u0000`` in strings and reorders keys), times as unix seconds in ``double precision``.
What differs, and why:

- ``jobs_ready`` (queue, priority DESC, run_at, id), partial on ready states, serves ``claim``
  as one index-ordered scan per queue that stops at ``LIMIT``; rows another node is claiming are
  skipped (``FOR UPDATE SKIP LOCKED``), never waited for.
- ``jobs_lease`` (lease_until), partial on ``active``: every node looks for expired leases once
  per ``lease_check_interval`` and reads only the active jobs.
- ``job_counts`` is kept by a trigger in the same transaction as the change it counts, like
  SQLite's, but spread over ``COUNT_SHARDS`` rows per (queue, state), picked by the backend's
  process id. One row per (queue, state) would be a hot row that every claim and every finish on
  every node locks in turn, serialising the whole job flow; with shards, concurrent
  transactions on different connections touch different rows. ``queue_stats`` sums the shards.
- The same trigger sends ``NOTIFY`` on the channel returned by :func:`jobs_channel` whenever a
  job becomes ready to claim (inserted, retried, given back or failed with a retry), with
  ``"<run_at> <queue>"`` as payload: every node's dispatcher wakes for jobs enqueued elsewhere,
  whichever code path (or other program) wrote them. Notifications are sent at commit, so a
  woken dispatcher always finds the row.
"""

from __future__ import annotations

from broker.store.migrations import Migration

__all__ = ["COUNT_SHARDS", "MIGRATIONS", "jobs_channel"]

COUNT_SHARDS = 8
"""Rows per (queue, state) in ``job_counts``."""


def jobs_channel(schema: str) -> str:
    """The ``LISTEN`` channel for ready jobs in ``schema`` (PostgreSQL caps names at 63 bytes)."""
    return ("qs_jobs:" + schema).encode()[:63].decode("utf-8", "ignore")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        name="initial",
        statements=(
            """
            CREATE TABLE jobs (
                id           text PRIMARY KEY,
                queue        text NOT NULL,
                payload      text NOT NULL,
                priority     bigint NOT NULL,
                run_at       double precision NOT NULL,
                unique_key   text,
                max_attempts bigint NOT NULL CHECK (max_attempts >= 1),
                attempt      bigint NOT NULL DEFAULT 0,
                state        text NOT NULL CHECK (
                    state IN ('queued', 'active', 'done', 'failed', 'retrying', 'cancelled')
                ),
                progress     text,
                result       text,
                error        text,
                worker       text,
                lease_until  double precision,
                created_at   double precision NOT NULL,
                updated_at   double precision NOT NULL,
                started_at   double precision,
                finished_at  double precision
            )
            """,
            """
            CREATE INDEX jobs_ready ON jobs (queue, priority DESC, run_at, id)
                WHERE state IN ('queued', 'retrying')
            """,
            """
            CREATE INDEX jobs_due ON jobs (queue, run_at)
                WHERE state IN ('queued', 'retrying')
            """,
            "CREATE INDEX jobs_active ON jobs (worker) WHERE state = 'active'",
            "CREATE INDEX jobs_lease ON jobs (lease_until) WHERE state = 'active'",
            """
            CREATE UNIQUE INDEX jobs_unique ON jobs (unique_key)
                WHERE unique_key IS NOT NULL AND state IN ('queued', 'active', 'retrying')
            """,
            "CREATE INDEX jobs_state ON jobs (state, id)",
            "CREATE INDEX jobs_queue ON jobs (queue, id)",
            "CREATE INDEX jobs_done ON jobs (finished_at, queue) WHERE state = 'done'",
            """
            CREATE TABLE job_counts (
                queue text NOT NULL,
                state text NOT NULL,
                shard integer NOT NULL,
                n     bigint NOT NULL,
                PRIMARY KEY (queue, state, shard)
            )
            """,
            f"""
            CREATE FUNCTION jobs_changed() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE
                my_shard integer := pg_backend_pid() % {COUNT_SHARDS};
            BEGIN
                IF TG_OP = 'INSERT' THEN
                    INSERT INTO job_counts AS c (queue, state, shard, n)
                        VALUES (NEW.queue, NEW.state, my_shard, 1)
                        ON CONFLICT (queue, state, shard) DO UPDATE SET n = c.n + 1;
                ELSIF TG_OP = 'DELETE' THEN
                    INSERT INTO job_counts AS c (queue, state, shard, n)
                        VALUES (OLD.queue, OLD.state, my_shard, -1)
                        ON CONFLICT (queue, state, shard) DO UPDATE SET n = c.n - 1;
                    RETURN NULL;
                ELSIF OLD.state <> NEW.state OR OLD.queue <> NEW.queue THEN
                    INSERT INTO job_counts AS c (queue, state, shard, n)
                        VALUES (OLD.queue, OLD.state, my_shard, -1)
                        ON CONFLICT (queue, state, shard) DO UPDATE SET n = c.n - 1;
                    INSERT INTO job_counts AS c (queue, state, shard, n)
                        VALUES (NEW.queue, NEW.state, my_shard, 1)
                        ON CONFLICT (queue, state, shard) DO UPDATE SET n = c.n + 1;
                END IF;
                IF NEW.state IN ('queued', 'retrying') AND (
                    TG_OP = 'INSERT' OR OLD.state <> NEW.state OR OLD.run_at <> NEW.run_at
                ) THEN
                    PERFORM pg_notify(
                        left('qs_jobs:' || TG_TABLE_SCHEMA, 63),
                        NEW.run_at::text || ' ' || NEW.queue
                    );
                END IF;
                RETURN NULL;
            END
            $$
            """,
            """
            CREATE TRIGGER jobs_changed AFTER INSERT OR DELETE OR UPDATE OF state, queue, run_at
                ON jobs FOR EACH ROW EXECUTE FUNCTION jobs_changed()
            """,
            """
            CREATE TABLE topics (
                topic       text PRIMARY KEY,
                epoch       text NOT NULL,
                last_offset bigint NOT NULL
            )
            """,
            """
            CREATE TABLE messages (
                topic text NOT NULL,
                seq   bigint NOT NULL,
                epoch text NOT NULL,
                ts    double precision NOT NULL,
                data  text NOT NULL,
                PRIMARY KEY (topic, seq)
            )
            """,
            """
            CREATE TABLE revoked_tokens (
                jti text PRIMARY KEY,
                exp bigint
            )
            """,
            """
            CREATE TABLE meta (
                key   text PRIMARY KEY,
                value text NOT NULL
            )
            """,
        ),
    ),
    Migration(
        version=2,
        name="cpantesters reports",
        statements=(
            """
            CREATE TABLE reports (
                id          text PRIMARY KEY,
                digest      text NOT NULL,
                received_at double precision NOT NULL,
                job_id      text,
                summarized  boolean NOT NULL DEFAULT false,
                body        text NOT NULL
            )
            """,
            "CREATE UNIQUE INDEX reports_digest ON reports (digest)",
            "CREATE INDEX reports_pending ON reports (received_at) WHERE NOT summarized",
            """
            CREATE TABLE report_summaries (
                seq           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                guid          text NOT NULL UNIQUE,
                dist          text NOT NULL,
                version       text NOT NULL,
                grade         text NOT NULL CHECK (grade IN ('pass', 'fail', 'na', 'unknown')),
                reporter      text NOT NULL,
                platform      text NOT NULL,
                perl          text NOT NULL,
                perl_maturity text NOT NULL,
                osname        text NOT NULL,
                osvers        text NOT NULL,
                maturity      text NOT NULL,
                received_at   double precision NOT NULL,
                updated_at    double precision NOT NULL
            )
            """,
            "CREATE INDEX summaries_release ON report_summaries (dist, version, updated_at)",
            "CREATE INDEX summaries_dist ON report_summaries (dist, updated_at)",
            "CREATE INDEX summaries_perl ON report_summaries (perl, updated_at)",
            "CREATE INDEX summaries_os ON report_summaries (osname, updated_at)",
            "CREATE INDEX summaries_updated ON report_summaries (updated_at, seq)",
            """
            CREATE TABLE releases (
                dist       text NOT NULL,
                version    text NOT NULL,
                author     text,
                pass       bigint NOT NULL DEFAULT 0,
                fail       bigint NOT NULL DEFAULT 0,
                na         bigint NOT NULL DEFAULT 0,
                unknown    bigint NOT NULL DEFAULT 0,
                maturity   text NOT NULL,
                updated_at double precision NOT NULL,
                PRIMARY KEY (dist, version)
            )
            """,
            "CREATE INDEX releases_author ON releases (author, updated_at)",
            "CREATE INDEX releases_updated ON releases (updated_at)",
            """
            CREATE TABLE uploads (
                dist        text NOT NULL,
                version     text NOT NULL,
                author      text NOT NULL,
                filename    text NOT NULL,
                released    double precision NOT NULL,
                maturity    text NOT NULL,
                recorded_at double precision NOT NULL,
                PRIMARY KEY (dist, version)
            )
            """,
            "CREATE INDEX uploads_author ON uploads (author, released)",
            "CREATE INDEX uploads_released ON uploads (released)",
            """
            CREATE TABLE report_stats (
                plugin text NOT NULL,
                key    text NOT NULL,
                n      bigint NOT NULL,
                PRIMARY KEY (plugin, key)
            )
            """,
        ),
    ),
)
