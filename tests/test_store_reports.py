"""The store's CPAN Testers part: reports, summaries, releases, uploads, statistics counters.

Tests taking ``store`` are the contract every backend meets (they run for each entry of
``tests.test_store.STORE_FACTORIES``); tests taking ``sqlite_path`` check SQLite's query plans
and transactions.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.jobstate import JobState
from broker.store import (
    IncomingReport,
    NewJob,
    ReleaseRecord,
    ReportSummary,
    SQLiteStore,
    Store,
    UploadRecord,
)
from broker.store.sqlite import releases_query, summaries_query, uploads_query
from protocol.errors import UsageError

from .test_store import STORE_FACTORIES, T0, FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=sorted(STORE_FACTORIES))
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Store]:
    instance = STORE_FACTORIES[request.param](tmp_path, clock)
    await instance.open()
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "store.sqlite"


def incoming(report_id: str, body: Any, at: float = T0) -> tuple[IncomingReport, NewJob]:
    text = json.dumps(body, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    job = NewJob(
        "reports",
        {"task": "process_report", "id": report_id, "received_at": at, "report": body},
        unique_key=report_id,
    )
    return IncomingReport(report_id, at, digest, text), job


def summary(guid: str, **fields: Any) -> ReportSummary:
    values: dict[str, Any] = {
        "guid": guid,
        "dist": "Data-Printer",
        "version": "0.39",
        "grade": "pass",
        "reporter": "GARU <garu@cpan.org>",
        "platform": "darwin-2level",
        "perl": "5.24.1",
        "perl_maturity": "stable",
        "osname": "darwin",
        "osvers": "16.4.0",
        "maturity": "stable",
        "received_at": T0,
    }
    values.update(fields)
    return ReportSummary(**values)


# --- reports and their jobs ---------------------------------------------------------------


async def test_a_report_and_its_job_are_stored_together(store: Store) -> None:
    report, job = incoming("r1", {"grade": "pass", "n": 1})
    report_id, rec = await store.add_report(report, job)
    assert report_id == "r1" and rec is not None
    assert rec.queue == "reports" and rec.state is JobState.QUEUED
    assert rec.unique_key == "r1" and rec.payload == job.payload
    assert await store.get_report("r1") == (report.body, T0)
    assert await store.get_report("nope") is None
    stored = await store.get_job(rec.id)
    assert stored is not None and stored.payload == job.payload


async def test_a_report_posted_again_is_not_stored_again(store: Store) -> None:
    first = incoming("r1", {"a": 1})
    again = incoming("r2", {"a": 1})  # same content, another id
    other = incoming("r3", {"a": 2})
    assert (await store.add_report(*first))[0] == "r1"
    assert await store.add_report(*again) == ("r1", None)
    assert (await store.add_report(*other))[1] is not None
    assert await store.get_report("r2") is None
    jobs = await store.list_jobs(queue="reports")
    assert sorted(j.unique_key or "" for j in jobs) == ["r1", "r3"]


async def test_an_encoded_payload_is_stored_as_given(store: Store) -> None:
    report, job = incoming("r1", {"x": [1, 2]})
    text = json.dumps(job.payload, separators=(",", ":"))
    _id, rec = await store.add_report(report, job, text)
    assert rec is not None
    stored = await store.get_job(rec.id)
    assert stored is not None and stored.payload == job.payload


async def test_apply_counts_once_and_reports_the_release(store: Store) -> None:
    for rid in ("r1", "r2", "r3"):
        await store.add_report(*incoming(rid, {"id": rid}))
    stats = {"grades": ["pass"], "os": ["darwin"]}
    first = await store.apply_report(summary("r1"), stats, now=T0 + 1)
    assert first == ReleaseRecord("Data-Printer", "0.39", None, 1, 0, 0, 0, "stable", T0 + 1)
    assert await store.apply_report(summary("r1"), stats, now=T0 + 2) is None  # idempotent
    second = await store.apply_report(
        summary("r2", grade="fail"), {"grades": ["fail"], "os": ["darwin"]}, now=T0 + 3
    )
    assert second is not None and second.counts() == {"pass": 1, "fail": 1, "na": 0, "unknown": 0}
    third = await store.apply_report(summary("r3", grade="na"), {"grades": ["na"]}, now=T0 + 4)
    assert third is not None and (third.na, third.updated_at) == (1, T0 + 4)
    assert await store.report_stats() == {
        "grades": {"pass": 1, "fail": 1, "na": 1},
        "os": {"darwin": 2},
    }


async def test_unapplied_results_are_found_for_the_catch_up(store: Store, clock: FakeClock) -> None:
    _, rec1 = await store.add_report(*incoming("r1", {"n": 1}))
    _, rec2 = await store.add_report(*incoming("r2", {"n": 2}))
    assert rec1 is not None and rec2 is not None
    claimed = await store.claim("w", ["reports"], 2, 30.0)
    assert [j.id for j in claimed] == [rec1.id, rec2.id]
    assert await store.unapplied_report_jobs() == []  # active jobs have no result yet
    await store.complete(rec1.id, 1, {"grade": "pass"})
    assert [j.id for j in await store.unapplied_report_jobs()] == [rec1.id]
    await store.complete(rec2.id, 1, {"grade": "fail"})
    pending = await store.unapplied_report_jobs()
    assert [(j.id, j.result) for j in pending] == [
        (rec1.id, {"grade": "pass"}),
        (rec2.id, {"grade": "fail"}),
    ]
    assert pending[0].payload["id"] == "r1"
    await store.apply_report(summary("r1"), {})
    assert [j.id for j in await store.unapplied_report_jobs(limit=5)] == [rec2.id]


async def test_uploads_attach_authors_before_and_after_reports(store: Store) -> None:
    release = await store.record_upload(
        UploadRecord("Data-Printer", "0.39", "GARU", "Data-Printer-0.39.tar.gz", T0, "stable"),
        now=T0 + 1,
    )
    assert (release.author, release.counts()["pass"]) == ("GARU", 0)
    await store.add_report(*incoming("r1", {"n": 1}))
    applied = await store.apply_report(summary("r1"), {})
    assert applied is not None and applied.author == "GARU" and applied.pass_ == 1
    await store.add_report(*incoming("r2", {"n": 2}))
    await store.apply_report(summary("r2", dist="Other", version="1.0"), {}, now=T0 + 2)
    late = await store.record_upload(
        UploadRecord("Other", "1.0", "ANDK", "Other-1.0.tar.gz", T0, "stable"), now=T0 + 3
    )
    assert (late.author, late.pass_, late.updated_at) == ("ANDK", 1, T0 + 3)
    again = await store.record_upload(
        UploadRecord("Other", "1.0", "BINGOS", "Other-1.0.tgz", T0 + 9, "stable"), now=T0 + 4
    )
    assert again.author == "BINGOS" and again.pass_ == 1
    uploads = await store.list_uploads(dist="Other")
    assert [(u.author, u.filename, u.released) for u in uploads] == [
        ("BINGOS", "Other-1.0.tgz", T0 + 9)
    ]


async def test_summaries_filter_and_order(store: Store) -> None:
    rows = [
        ("a", {"perl": "5.24.1", "osname": "linux"}),
        ("b", {"perl": "5.25.3", "perl_maturity": "dev", "osname": "linux", "grade": "fail"}),
        ("c", {"perl": "5.24.1", "osname": "darwin", "version": "0.40"}),
        ("d", {"dist": "Other", "perl": "5.26.0", "osname": "MSWin32", "grade": "unknown"}),
    ]
    for i, (guid, fields) in enumerate(rows):
        await store.add_report(*incoming(guid, {"guid": guid}))
        await store.apply_report(summary(guid, **fields), {}, now=T0 + 10 * i)

    async def guids(**filters: Any) -> list[str]:
        return [s.guid for s in await store.list_report_summaries(**filters)]

    assert await guids(dist="Data-Printer") == ["a", "b", "c"]
    assert await guids(dist="Data-Printer", version="0.39") == ["a", "b"]
    assert await guids(dist="Data-Printer", grade="fail") == ["b"]
    assert await guids(perls=["5.24.1"]) == ["a", "c"]
    assert await guids(perls=["5.24.1", "5.26.0"]) == ["a", "c", "d"]
    assert await guids(osnames=["linux"], perl_maturity="stable") == ["a"]
    assert await guids(osnames=["linux", "MSWin32"], perls=["5.26.0"]) == ["d"]
    assert await guids(dist="Data-Printer", since=T0 + 10) == ["b", "c"]
    assert await guids(dist="Data-Printer", limit=2) == ["a", "b"]
    assert await guids(dist="Nope") == []
    [row] = await store.list_report_summaries(dist="Other")
    assert row == summary("d", dist="Other", perl="5.26.0", osname="MSWin32", grade="unknown")


async def test_releases_filter_and_order(store: Store) -> None:
    plan = [
        ("r1", "A", "1.0", "stable"),
        ("r2", "A", "1.1_01", "dev"),
        ("r3", "B", "2.0", "stable"),
    ]
    for i, (guid, dist, version, maturity) in enumerate(plan):
        await store.add_report(*incoming(guid, {"g": guid}))
        await store.apply_report(
            summary(guid, dist=dist, version=version, maturity=maturity), {}, now=T0 + i
        )
    await store.record_upload(UploadRecord("B", "2.0", "ME", "B-2.0.tar.gz", T0, "stable"), T0 + 5)

    async def names(**filters: Any) -> list[str]:
        return [f"{r.dist}-{r.version}" for r in await store.list_releases(**filters)]

    assert await names() == ["A-1.0", "A-1.1_01", "B-2.0"]
    assert await names(dist="A") == ["A-1.0", "A-1.1_01"]
    assert await names(dist="A", maturity="dev") == ["A-1.1_01"]
    assert await names(dist="A", version="1.0") == ["A-1.0"]
    assert await names(author="ME") == ["B-2.0"]
    assert await names(since=T0 + 1) == ["A-1.1_01", "B-2.0"]
    assert await names(limit=1) == ["A-1.0"]
    assert await store.release_known("A") and await store.release_known("A", "1.1_01")
    assert not await store.release_known("A", "9") and not await store.release_known("Z")


async def test_uploads_filter_and_order(store: Store) -> None:
    for dist, version, author, released, maturity in (
        ("A", "1.0", "ME", T0 + 2, "stable"),
        ("A", "1.1_01", "ME", T0 + 3, "dev"),
        ("B", "2.0", "YOU", T0 + 1, "stable"),
    ):
        await store.record_upload(
            UploadRecord(dist, version, author, f"{dist}-{version}.tar.gz", released, maturity)
        )

    async def names(**filters: Any) -> list[str]:
        return [f"{u.dist}-{u.version}" for u in await store.list_uploads(**filters)]

    assert await names() == ["B-2.0", "A-1.0", "A-1.1_01"]
    assert await names(author="ME", maturity="stable") == ["A-1.0"]
    assert await names(since=T0 + 2) == ["A-1.0", "A-1.1_01"]
    assert await names(dist="A", limit=1) == ["A-1.0"]
    assert await names(dist="C") == []


def test_summaries_refuse_values_outside_their_domain() -> None:
    with pytest.raises(UsageError):
        summary("x", grade="PASS")
    with pytest.raises(UsageError):
        summary("x", maturity="beta")
    with pytest.raises(UsageError):
        summary("x", dist=None)
    with pytest.raises(UsageError):
        summary("x", received_at=float("nan"))


# --- SQLite: transactions and query plans ----------------------------------------------------


async def test_a_refused_job_leaves_no_report_behind(sqlite_path: Path) -> None:
    async with SQLiteStore(sqlite_path) as store:
        report, _job = incoming("r1", {"n": 1})
        bad = NewJob("reports", {"not portable": {1, 2}}, unique_key="r1")
        with pytest.raises(UsageError):
            await store.add_report(report, bad)
        assert await store.get_report("r1") is None
        assert await store.list_jobs(queue="reports") == []


def _plan(conn: sqlite3.Connection, sql: str, params: list[Any]) -> str:
    return " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))


async def test_every_v3_query_reads_through_an_index_in_order(sqlite_path: Path) -> None:
    async with SQLiteStore(sqlite_path):
        pass
    conn = sqlite3.connect(sqlite_path)
    try:
        conn.execute("ANALYZE")
        ordered = [
            (summaries_query(dist="D", version="1"), "summaries_release"),
            (summaries_query(dist="D", version="1", grade="fail", since=T0), "summaries_release"),
            (summaries_query(dist="D"), "summaries_dist"),
            (summaries_query(dist="D", since=T0), "summaries_dist"),
            (summaries_query(perls=["5.24.1"]), "summaries_perl"),
            (summaries_query(osnames=["linux"], since=T0), "summaries_os"),
            (releases_query(), "releases_updated"),
            (releases_query(author="ME", since=T0), "releases_author"),
            (uploads_query(), "uploads_released"),
            (uploads_query(author="ME"), "uploads_author"),
        ]
        for (sql, params), index in ordered:
            plan = _plan(conn, sql, params)
            assert index in plan, (sql, plan)
            assert "TEMP B-TREE" not in plan, (sql, plan)
        small = [  # one dist's releases and uploads: a primary-key range, sorted in memory
            releases_query(dist="D"),
            releases_query(dist="D", version="1"),
            uploads_query(dist="D"),
            summaries_query(perls=["5.24.1", "5.26.0"], osnames=["linux"]),
        ]
        for sql, params in small:
            plan = _plan(conn, sql, params)
            assert not any(
                step.startswith("SCAN") and "USING" not in step for step in plan.split(" | ")
            ), (sql, plan)
        catch_up = (
            "SELECT r.id FROM reports AS r INDEXED BY reports_pending JOIN jobs AS j"
            " ON j.id = r.job_id WHERE r.summarized = 0 AND j.state = 'done'"
            " ORDER BY r.received_at LIMIT 10"
        )
        assert "reports_pending" in _plan(conn, catch_up, [])
    finally:
        conn.close()


async def test_apply_is_one_transaction(sqlite_path: Path) -> None:
    async with SQLiteStore(sqlite_path) as store:
        await store.add_report(*incoming("r1", {"n": 1}))
        before = store.transactions_committed
        assert await store.apply_report(summary("r1"), {"grades": ["pass"]}) is not None
        assert store.transactions_committed == before + 1
    conn = sqlite3.connect(sqlite_path)
    try:
        assert conn.execute("SELECT summarized FROM reports WHERE id = 'r1'").fetchone() == (1,)
        assert conn.execute("SELECT COUNT(*) FROM report_summaries").fetchone() == (1,)
        assert conn.execute("SELECT n FROM report_stats").fetchone() == (1,)
    finally:
        conn.close()
