"""The SQLite schema, as an ordered list of migrations.

Why the indexes look the way they do (each serves one hot query; see ``broker.store.sqlite``):

- ``jobs_ready`` (queue, priority DESC, run_at, id), partial on ready states: ``claim`` walks
  one priority level at a time through it, so a claim costs a few index seeks whatever the
  number of queued or delayed jobs.
- ``jobs_due`` (queue, run_at), partial on ready states: ``next_run_at`` is one MIN seek per
  queue.
- ``jobs_active`` (worker), partial on ``active``: renew and release touch only that worker's
  jobs (lease expiry reads the few active jobs through ``jobs_state``).
- ``jobs_unique`` enforces "one unfinished job per unique key".
- ``jobs_state`` (state, id, queue): listing pages in id order (per state, merged across
  states for a queue), filtering on queue from the index alone. A second full index on
  (queue, state, id) would make listing one rare queue faster but cost every state change
  about 15% more writer time; it was measured and left out.
- ``jobs_done``: finished-in-the-last-minute counts without reading old jobs.

``job_counts`` is kept by triggers, inside the same transaction (and savepoint) as the change
it counts, so it cannot drift; it makes per-queue counts O(queues) instead of a scan of every
job (about 0.5 s at a million jobs), for about 3 µs more writer time per state change.

``messages`` keeps its rowid: message bodies can be large, and SQLite's WITHOUT ROWID tables
store whole rows in interior b-tree pages, which suits only small rows.

The partial-index predicates are spelled exactly as the queries spell them, because SQLite only
uses a partial index when the query's WHERE clause visibly implies the index's.

Version 2, the CPAN Testers reports (each index serves one ``/v3`` query shape, ordered the way
the answer is, so that a query reads only the rows it returns even at a million reports):

- ``reports`` keeps each report's JSON once (rowid table: the rows are large). ``reports_digest``
  finds a report posted twice; ``reports_pending`` (partial, ``summarized = 0``) lists the few
  reports not yet summarised, for the catch-up after a restart.
- ``report_summaries`` is one small row per processed report: ``summaries_release``
  (dist, version, updated_at) for ``/summary/<dist>/<version>``, ``summaries_dist``
  (dist, updated_at) for ``/summary/<dist>``, ``summaries_perl`` and ``summaries_os`` for
  ``/summary?perl=`` and ``?osname=``. Every one ends in the time the answer is ordered by, so
  ``since`` is a range on the index and ``LIMIT`` stops early.
- ``releases`` holds the counts per (dist, version), updated in the same transaction as the
  summary row; ``releases_author`` and ``releases_updated`` serve ``/release/author/<author>``
  and ``/release``.
- ``uploads`` (dist, version) with ``uploads_author`` and ``uploads_released``.
- ``report_stats`` holds the statistics plugins' counters, bumped in the same transaction.
"""

from __future__ import annotations

from broker.store.migrations import Migration

__all__ = ["MIGRATIONS"]

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        name="initial",
        statements=(
            """
            CREATE TABLE jobs (
                id           TEXT PRIMARY KEY,
                queue        TEXT NOT NULL,
                payload      TEXT NOT NULL,
                priority     INTEGER NOT NULL,
                run_at       REAL NOT NULL,
                unique_key   TEXT,
                max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
                attempt      INTEGER NOT NULL DEFAULT 0,
                state        TEXT NOT NULL CHECK (
                    state IN ('queued', 'active', 'done', 'failed', 'retrying', 'cancelled')
                ),
                progress     TEXT,
                result       TEXT,
                error        TEXT,
                worker       TEXT,
                lease_until  REAL,
                created_at   REAL NOT NULL,
                updated_at   REAL NOT NULL,
                started_at   REAL,
                finished_at  REAL
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
            """
            CREATE INDEX jobs_active ON jobs (worker)
                WHERE state = 'active'
            """,
            """
            CREATE UNIQUE INDEX jobs_unique ON jobs (unique_key)
                WHERE unique_key IS NOT NULL AND state IN ('queued', 'active', 'retrying')
            """,
            "CREATE INDEX jobs_state ON jobs (state, id, queue)",
            """
            CREATE INDEX jobs_done ON jobs (finished_at, queue)
                WHERE state = 'done'
            """,
            """
            CREATE TABLE job_counts (
                queue TEXT NOT NULL,
                state TEXT NOT NULL,
                n     INTEGER NOT NULL,
                PRIMARY KEY (queue, state)
            ) WITHOUT ROWID
            """,
            """
            CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs BEGIN
                INSERT INTO job_counts (queue, state, n) VALUES (NEW.queue, NEW.state, 1)
                    ON CONFLICT (queue, state) DO UPDATE SET n = n + 1;
            END
            """,
            """
            CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs BEGIN
                UPDATE job_counts SET n = n - 1 WHERE queue = OLD.queue AND state = OLD.state;
            END
            """,
            """
            CREATE TRIGGER jobs_count_update AFTER UPDATE OF queue, state ON jobs
                WHEN OLD.state <> NEW.state OR OLD.queue <> NEW.queue
            BEGIN
                UPDATE job_counts SET n = n - 1 WHERE queue = OLD.queue AND state = OLD.state;
                INSERT INTO job_counts (queue, state, n) VALUES (NEW.queue, NEW.state, 1)
                    ON CONFLICT (queue, state) DO UPDATE SET n = n + 1;
            END
            """,
            """
            CREATE TABLE topics (
                topic       TEXT PRIMARY KEY,
                epoch       TEXT NOT NULL,
                last_offset INTEGER NOT NULL
            ) WITHOUT ROWID
            """,
            """
            CREATE TABLE messages (
                topic TEXT NOT NULL,
                seq   INTEGER NOT NULL,
                epoch TEXT NOT NULL,
                ts    REAL NOT NULL,
                data  TEXT NOT NULL,
                PRIMARY KEY (topic, seq)
            )
            """,
            """
            CREATE TABLE revoked_tokens (
                jti TEXT PRIMARY KEY,
                exp INTEGER
            ) WITHOUT ROWID
            """,
            """
            CREATE TABLE meta (
                key   TEXT PRIMARY KEY,
                value TEXT NOT NULL
            ) WITHOUT ROWID
            """,
        ),
    ),
    Migration(
        version=2,
        name="cpantesters reports",
        statements=(
            """
            CREATE TABLE reports (
                id          TEXT PRIMARY KEY,
                digest      TEXT NOT NULL,
                received_at REAL NOT NULL,
                job_id      TEXT,
                summarized  INTEGER NOT NULL DEFAULT 0,
                body        TEXT NOT NULL
            )
            """,
            "CREATE UNIQUE INDEX reports_digest ON reports (digest)",
            "CREATE INDEX reports_pending ON reports (received_at) WHERE summarized = 0",
            """
            CREATE TABLE report_summaries (
                seq           INTEGER PRIMARY KEY,
                guid          TEXT NOT NULL UNIQUE,
                dist          TEXT NOT NULL,
                version       TEXT NOT NULL,
                grade         TEXT NOT NULL CHECK (grade IN ('pass', 'fail', 'na', 'unknown')),
                reporter      TEXT NOT NULL,
                platform      TEXT NOT NULL,
                perl          TEXT NOT NULL,
                perl_maturity TEXT NOT NULL,
                osname        TEXT NOT NULL,
                osvers        TEXT NOT NULL,
                maturity      TEXT NOT NULL,
                received_at   REAL NOT NULL,
                updated_at    REAL NOT NULL
            )
            """,
            "CREATE INDEX summaries_release ON report_summaries (dist, version, updated_at)",
            "CREATE INDEX summaries_dist ON report_summaries (dist, updated_at)",
            "CREATE INDEX summaries_perl ON report_summaries (perl, updated_at)",
            "CREATE INDEX summaries_os ON report_summaries (osname, updated_at)",
            """
            CREATE TABLE releases (
                dist       TEXT NOT NULL,
                version    TEXT NOT NULL,
                author     TEXT,
                pass       INTEGER NOT NULL DEFAULT 0,
                fail       INTEGER NOT NULL DEFAULT 0,
                na         INTEGER NOT NULL DEFAULT 0,
                unknown    INTEGER NOT NULL DEFAULT 0,
                maturity   TEXT NOT NULL,
                updated_at REAL NOT NULL,
                PRIMARY KEY (dist, version)
            ) WITHOUT ROWID
            """,
            "CREATE INDEX releases_author ON releases (author, updated_at)",
            "CREATE INDEX releases_updated ON releases (updated_at)",
            """
            CREATE TABLE uploads (
                dist        TEXT NOT NULL,
                version     TEXT NOT NULL,
                author      TEXT NOT NULL,
                filename    TEXT NOT NULL,
                released    REAL NOT NULL,
                maturity    TEXT NOT NULL,
                recorded_at REAL NOT NULL,
                PRIMARY KEY (dist, version)
            ) WITHOUT ROWID
            """,
            "CREATE INDEX uploads_author ON uploads (author, released)",
            "CREATE INDEX uploads_released ON uploads (released)",
            """
            CREATE TABLE report_stats (
                plugin TEXT NOT NULL,
                key    TEXT NOT NULL,
                n      INTEGER NOT NULL,
                PRIMARY KEY (plugin, key)
            ) WITHOUT ROWID
            """,
        ),
    ),
)
