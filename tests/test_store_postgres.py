"""What is particular to the PostgreSQL store: several stores (nodes) on one database.

The contract every store meets runs in ``test_store.py`` against SQLite and PostgreSQL alike;
here: claims that never overlap between nodes, notifications of ready jobs, lease expiry shared
by nodes, concurrent migrations, schemas, failures of the server, and the report methods giving
the same answers as SQLite's. Each test works in a schema of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from broker.jobstate import JobState
from broker.store import (
    IncomingReport,
    NewJob,
    ReportSummary,
    SchemaTooNew,
    SQLiteStore,
    Store,
    UploadRecord,
)
from protocol.errors import Unavailable, UsageError

from .helpers import UNIT, until
from .services import pg_schema, with_search_path

pytest.importorskip("asyncpg", reason="the postgres extra (asyncpg) is not installed")

import asyncpg

from broker.store.migrations.postgres import MIGRATIONS
from broker.store.postgres import PostgresStore

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def nodes(count: int, **kwargs: Any) -> AsyncIterator[list[PostgresStore]]:
    """``count`` stores on one fresh schema, like the stores of ``count`` broker nodes."""
    async with pg_schema() as (url, schema), AsyncExitStack() as stack:
        stores = [
            PostgresStore(url, schema=schema, pool_max=4, application_name=schema, **kwargs)
            for _ in range(count)
        ]
        await asyncio.gather(*(s.open() for s in stores))
        for store in stores:
            stack.push_async_callback(store.close)
        yield stores


async def test_nodes_never_claim_the_same_job() -> None:
    async with nodes(2) as (a, b):
        await a.enqueue_many([NewJob("q", n) for n in range(150)])
        await b.enqueue_many([NewJob("q", n) for n in range(150, 300)])

        async def worker(store: Store, name: str) -> list[str]:
            taken: list[str] = []
            while jobs := await store.claim(name, ["q"], 3, 30.0):
                for job in jobs:
                    taken.append(job.id)
                    assert await store.complete(job.id, job.attempt, None, worker=name)
            return taken

        results = await asyncio.gather(
            *(worker(store, f"w{i}") for i in range(8) for store in (a, b))
        )
        claimed = [job for taken in results for job in taken]
        assert len(claimed) == 300
        assert len(set(claimed)) == 300
        assert sum(1 for taken in results if taken) > 2, "claims should be spread"
        stats = await a.queue_stats()
        assert stats["q"].counts[JobState.DONE] == 300
        assert stats["q"].counts[JobState.QUEUED] == 0


async def test_ready_jobs_are_notified_to_every_node() -> None:
    clock = Clock()
    async with nodes(2, clock=clock) as (a, b):
        seen: list[tuple[str | None, float]] = []
        b.on_jobs_ready = lambda queue, at: seen.append((queue, at))
        await until(b.listening.is_set)
        job, _ = await a.enqueue(NewJob("mail", {"to": "x"}))
        later, _ = await a.enqueue(NewJob("mail", None, delay=30.0))
        await until(lambda: len(seen) >= 2)
        assert seen == [("mail", job.run_at), ("mail", T0 + 30.0)]
        # A job given back by a failed attempt is announced for its retry time.
        (taken,) = await b.claim("w", ["mail"], 1, 30.0)
        await b.fail(taken.id, taken.attempt, "smtp down", retry=True, retry_delay=7.0)
        await until(lambda: len(seen) >= 3)
        assert seen[2] == ("mail", T0 + 7.0)
        # Claims and completions are not announced: the next notification is the marker's.
        both = await a.claim("w", ["mail"], 5, 30.0, now=T0 + 30.0)
        assert {j.id for j in both} == {job.id, later.id}
        for j in both:
            await a.complete(j.id, j.attempt, None)
        marker, _ = await a.enqueue(NewJob("mail", "marker"))
        # Notifications arrive in commit order: a stray one would come before the marker's.
        await until(lambda: len(seen) >= 4)
        assert seen[3:] == [("mail", marker.run_at)]


async def test_notifications_resume_after_the_connection_is_lost() -> None:
    async with nodes(1) as (store,):
        seen: list[tuple[str | None, float]] = []
        store.on_jobs_ready = lambda queue, at: seen.append((queue, at))
        await until(store.listening.is_set)
        conn = await asyncpg.connect(store.dsn)
        try:
            # End the store's LISTEN session the way a server restart or a proxy would.
            ended = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = $1 AND query LIKE 'LISTEN %'",
                store.application_name,
            )
            assert ended == 1
        finally:
            await conn.close()
        await until(lambda: (None, seen[0][1]) in seen if seen else False, units=10)
        await until(store.listening.is_set, units=10)
        await store.enqueue(NewJob("after", None))
        await until(lambda: any(q == "after" for q, _ in seen), units=10)


async def test_an_expired_lease_is_given_back_by_one_node_only() -> None:
    clock = Clock()
    async with nodes(3, clock=clock) as stores:
        a, b, _c = stores
        await a.enqueue(NewJob("q", None, max_attempts=3))
        (job,) = await a.claim("node-a-worker", ["q"], 1, 5.0)
        clock.now += 6
        results = await asyncio.gather(*(s.expire_leases() for s in stores))
        assert sorted(len(r) for r in results) == [0, 0, 1]
        (back,) = next(r for r in results if r)
        assert back.state is JobState.RETRYING and back.error == "lease expired"
        # Another node takes it again; the first worker's late answer is refused.
        (again,) = await b.claim("node-b-worker", ["q"], 1, 5.0)
        assert again.id == job.id and again.attempt == 2
        assert await a.complete(job.id, job.attempt, "late", worker="node-a-worker") is None
        assert await a.fail(job.id, job.attempt, "late", True, 0, worker="node-a-worker") is None
        done = await b.complete(again.id, again.attempt, "ok", worker="node-b-worker")
        assert done is not None and done.result == "ok"


async def test_nodes_starting_together_migrate_once() -> None:
    async with nodes(4) as stores:
        assert {s.schema_version for s in stores} == {len(MIGRATIONS)}
        conn = await asyncpg.connect(stores[0].dsn)
        try:
            versions = await conn.fetch(
                f'SELECT version FROM "{stores[0].schema_name}".schema_version ORDER BY version'
            )
        finally:
            await conn.close()
        assert [r[0] for r in versions] == [m.version for m in MIGRATIONS]


async def test_search_path_in_the_url_names_the_schema() -> None:
    async with pg_schema() as (url, schema):
        store = PostgresStore(with_search_path(url, schema))
        await store.open()
        try:
            assert store.schema_name == schema
            await store.set_meta("k", "v")
        finally:
            await store.close()
        again = PostgresStore(url, schema=schema)
        async with again:
            assert await again.get_meta("k") == "v"


async def test_a_newer_schema_is_refused() -> None:
    async with pg_schema() as (url, schema):
        async with PostgresStore(url, schema=schema):
            pass
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"INSERT INTO \"{schema}\".schema_version VALUES (999, 'future', 0)")
        finally:
            await conn.close()
        store = PostgresStore(url, schema=schema)
        with pytest.raises(SchemaTooNew):
            await store.open()
        with pytest.raises(UsageError):
            await store.get_meta("k")
        await store.close()


async def test_an_unreachable_server_is_unavailable() -> None:
    store = PostgresStore("postgresql://127.0.0.1:1/test", connect_timeout=2 * UNIT)
    with pytest.raises(Unavailable):
        await store.open()
    await store.close()


async def test_a_lost_pool_connection_is_unavailable_then_recovers() -> None:
    async with nodes(1) as (store,):
        await store.set_meta("k", "v")
        conn = await asyncpg.connect(store.dsn)
        try:
            ended = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = $1 AND query NOT LIKE 'LISTEN %'",
                store.application_name,
            )
            assert ended >= 1
        finally:
            await conn.close()
        # The pool notices the dead connection at its next use: one call may fail with
        # Unavailable, then the store serves again.
        for _ in range(3):
            try:
                assert await store.get_meta("k") == "v"
                break
            except Unavailable:
                continue
        else:
            pytest.fail("the store did not recover from a lost connection")


async def test_text_postgres_cannot_hold() -> None:
    async with nodes(1) as (store,):
        with pytest.raises(UsageError):
            await store.enqueue(NewJob("bad\x00queue", None))
        # NUL inside JSON values is stored escaped and comes back intact.
        job, _ = await store.enqueue(NewJob("q", {"text": "a\x00b"}))
        assert (await store.get_job(job.id)) == job
        assert job.payload == {"text": "a\x00b"}
        (taken,) = await store.claim("w", ["q"], 1, 30.0)
        failed = await store.fail(taken.id, taken.attempt, "bad\x00error", True, 0.0)
        assert failed is not None and failed.error == "bad\ufffderror"


async def test_unique_keys_hold_across_nodes() -> None:
    async with nodes(2) as (a, b):
        results = await asyncio.gather(
            *(s.enqueue(NewJob("q", n, unique_key="k")) for n in range(10) for s in (a, b))
        )
        ids = {record.id for record, _ in results}
        assert len(ids) == 1
        assert sorted(dup for _, dup in results) == [False] + [True] * 19


# --- the report methods answer as SQLite's do ---------------------------------------------------


def _summary(guid: str, dist: str, version: str, grade: str, at: float) -> ReportSummary:
    return ReportSummary(
        guid=guid,
        dist=dist,
        version=version,
        grade=grade,
        reporter="tester",
        platform="x86_64-linux",
        perl="5.38.0",
        perl_maturity="stable",
        osname="linux",
        osvers="6.1",
        maturity="stable",
        received_at=at,
    )


async def _report_scenario(store: Store) -> list[Any]:
    out: list[Any] = []
    for n in range(3):
        report = IncomingReport(f"r{n}", T0 + n, f"digest{n}", f'{{"n":{n}}}')
        rid, job = await store.add_report(report, NewJob("reports", {"report": f"r{n}"}))
        out.append((rid, job is not None and job.payload))
    again = await store.add_report(
        IncomingReport("r9", T0, "digest1", "{}"), NewJob("reports", None)
    )
    out.append(again)
    out.append(await store.get_report("r1"))
    out.append(await store.get_report("missing"))
    jobs = await store.claim("w", ["reports"], 10, 30.0)
    for job in jobs:
        await store.complete(job.id, job.attempt, None)
    out.append(len(await store.unapplied_report_jobs()))
    upload = UploadRecord("Foo-Bar", "1.0", "AUTHOR", "Foo-Bar-1.0.tar.gz", T0 - 100, "stable")
    out.append(await store.record_upload(upload, now=T0 + 10))
    grades = ["pass", "fail", "pass"]
    for n, grade in enumerate(grades):
        release = await store.apply_report(
            _summary(f"r{n}", "Foo-Bar", "1.0", grade, T0 + n),
            {"perl": ["5.38.0"], "os": ["linux", "all"]},
            now=T0 + 20 + n,
        )
        out.append(release)
    out.append(await store.apply_report(_summary("r0", "Foo-Bar", "1.0", "pass", T0), {}))
    out.append(len(await store.unapplied_report_jobs()))
    out.append(await store.list_report_summaries(dist="Foo-Bar", grade="pass"))
    out.append(await store.list_report_summaries(perls=["5.38.0", "5.36.0"], since=T0 + 21))
    out.append(await store.list_report_summaries(osnames=["linux"], limit=1))
    out.append(await store.list_releases(author="AUTHOR"))
    out.append(await store.list_releases(since=T0 + 1000))
    out.append(await store.list_uploads(dist="Foo-Bar"))
    out.append(await store.list_uploads(since=T0))
    out.append(await store.release_known("Foo-Bar"))
    out.append(await store.release_known("Foo-Bar", "2.0"))
    out.append(await store.report_stats())
    return out


async def test_report_methods_answer_as_sqlite_does(tmp_path: Path) -> None:
    sqlite = SQLiteStore(tmp_path / "store.sqlite", clock=Clock())
    async with sqlite:
        expected = await _report_scenario(sqlite)
    async with nodes(1, clock=Clock()) as (store,):
        assert await _report_scenario(store) == expected
