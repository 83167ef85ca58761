"""The job store: every method against a real database file.

Tests taking the ``store`` fixture belong to the contract every backend must meet; add a backend
to ``STORE_FACTORIES`` and they run against it too. Tests taking ``sqlite_path`` check what is
particular to SQLite (group commit, savepoints, migrations, query plans).

Time never passes by sleeping: the store's clock is a :class:`FakeClock` the test moves, and
methods that take ``now`` get it explicitly.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from broker.jobstate import JobState
from broker.store import (
    JobRecord,
    NewJob,
    SchemaTooNew,
    SQLiteStore,
    Store,
    StoredMessage,
)
from broker.store import sqlite as sqlite_module
from broker.store.migrations.sqlite import MIGRATIONS
from protocol.errors import Conflict, Unavailable, UsageError

from .services import scratch_postgres_store

T0 = 1_700_000_000.0
API_KEYS = {
    "job",
    "queue",
    "state",
    "attempt",
    "max_attempts",
    "priority",
    "payload",
    "result",
    "error",
    "progress",
    "created_at",
    "updated_at",
    "run_at",
    "worker",
}


class FakeClock:
    """The store's notion of now; tests move it by hand."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _sqlite_store(tmp_path: Path, clock: FakeClock) -> Store:
    return SQLiteStore(tmp_path / "data" / "store.sqlite", clock=clock)


def _sqlite_thread_store(tmp_path: Path, clock: FakeClock) -> Store:
    # Every write group in the writer thread, none on the event loop.
    return SQLiteStore(tmp_path / "data" / "store.sqlite", clock=clock, inline=False)


def _postgres_store(tmp_path: Path, clock: FakeClock) -> Store:
    # A schema of its own per test, dropped at close; skips when PostgreSQL is unavailable.
    return scratch_postgres_store(clock)


STORE_FACTORIES: dict[str, Callable[[Path, FakeClock], Store]] = {
    "sqlite": _sqlite_store,
    "sqlite-thread": _sqlite_thread_store,
    "postgres": _postgres_store,
}


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


async def enqueue(store: Store, queue: str = "q", payload: Any = None, **kw: Any) -> JobRecord:
    record, duplicate = await store.enqueue(NewJob(queue, payload, **kw))
    assert not duplicate
    return record


async def claim_one(store: Store, queue: str = "q", worker: str = "w1", **kw: Any) -> JobRecord:
    jobs = await store.claim(worker, [queue], 1, kw.pop("lease", 30.0), **kw)
    assert len(jobs) == 1
    return jobs[0]


async def stored(store: Store, job_id: str) -> JobRecord:
    record = await store.get_job(job_id)
    assert record is not None
    return record


# --- life cycle ---------------------------------------------------------------------------


async def test_async_with_opens_and_closes(tmp_path: Path, clock: FakeClock) -> None:
    store = _sqlite_store(tmp_path, clock)
    with pytest.raises(UsageError):
        await store.get_meta("k")
    async with store as opened:
        assert opened is store
        await store.set_meta("k", "v")
        assert await store.get_meta("k") == "v"
    with pytest.raises(UsageError):
        await store.set_meta("k", "w")
    with pytest.raises(UsageError):
        await store.get_meta("k")
    await store.close()  # idempotent


async def test_open_twice_is_refused(store: Store) -> None:
    with pytest.raises(UsageError):
        await store.open()


# --- tokens and meta ----------------------------------------------------------------------


async def test_revoked_tokens(store: Store) -> None:
    assert await store.revoked_tokens() == []
    await store.revoke_token("a", 100)
    await store.revoke_token("b", None)
    await store.revoke_token("a", 200)
    assert sorted(await store.revoked_tokens(), key=lambda t: t[0]) == [("a", 200), ("b", None)]
    await store.revoke_token("c", 50)
    assert await store.purge_revoked_tokens(150) == 1
    assert sorted(await store.revoked_tokens(), key=lambda t: t[0]) == [("a", 200), ("b", None)]


async def test_meta(store: Store) -> None:
    assert await store.get_meta("missing") is None
    await store.set_meta("k", "one")
    await store.set_meta("k", "two")
    await store.set_meta("other", "")
    assert await store.get_meta("k") == "two"
    assert await store.get_meta("other") == ""


# --- topic history ------------------------------------------------------------------------


def msg(topic: str, offset: int, epoch: str = "e1", ts: float = T0) -> StoredMessage:
    return StoredMessage(topic, offset, epoch, ts, f'{{"n":{offset}}}')


async def test_append_and_read_messages(store: Store) -> None:
    await store.append_messages([msg("a", 1), msg("b", 1), msg("a", 2), msg("a", 3)])
    await store.append_messages([msg("a", 7)])
    got = await store.read_messages("a", 0, 100)
    assert [m.offset for m in got] == [1, 2, 3, 7]
    assert got[0] == msg("a", 1)
    assert [m.offset for m in await store.read_messages("a", 2, 100)] == [3, 7]
    assert [m.offset for m in await store.read_messages("a", 1, 2)] == [2, 3]
    assert await store.read_messages("a", 7, 10) == []
    assert await store.read_messages("nope", 0, 10) == []
    assert await store.topic_heads() == {"a": ("e1", 7), "b": ("e1", 1)}


async def test_append_refuses_an_offset_that_does_not_grow(store: Store) -> None:
    await store.append_messages([msg("a", 5)])
    with pytest.raises(UsageError):
        await store.append_messages([msg("b", 1), msg("a", 5)])
    with pytest.raises(UsageError):
        await store.append_messages([msg("c", 2), msg("c", 2)])
    # all or none: b and c were not kept
    assert await store.read_messages("b", 0, 10) == []
    assert await store.read_messages("c", 0, 10) == []
    assert await store.topic_heads() == {"a": ("e1", 5)}


async def test_new_epoch_in_append_drops_the_old_history(store: Store) -> None:
    await store.append_messages([msg("a", 1), msg("a", 2), msg("a", 3)])
    await store.append_messages([msg("a", 1, epoch="e2")])
    assert await store.read_messages("a", 0, 10) == [msg("a", 1, epoch="e2")]
    assert await store.topic_heads() == {"a": ("e2", 1)}


async def test_set_topic_epoch(store: Store) -> None:
    await store.append_messages([msg("a", 1), msg("a", 2), msg("b", 9)])
    await store.set_topic_epoch("a", "e2")
    await store.set_topic_epoch("fresh", "x", last_offset=41)
    assert await store.read_messages("a", 0, 10) == []
    assert await store.topic_heads() == {"a": ("e2", 0), "b": ("e1", 9), "fresh": ("x", 41)}
    await store.append_messages([msg("a", 1, epoch="e2"), msg("fresh", 42, epoch="x")])
    assert await store.topic_heads() == {"a": ("e2", 1), "b": ("e1", 9), "fresh": ("x", 42)}
    assert [m.offset for m in await store.read_messages("b", 0, 10)] == [9]


async def test_trim_messages(store: Store) -> None:
    await store.append_messages([msg("a", n, ts=T0 + n) for n in range(1, 11)])
    await store.append_messages([msg("b", 1)])
    assert await store.trim_messages("a", 4, None) == 6
    assert [m.offset for m in await store.read_messages("a", 0, 100)] == [7, 8, 9, 10]
    assert await store.trim_messages("a", 100, T0 + 9) == 2
    assert [m.offset for m in await store.read_messages("a", 0, 100)] == [9, 10]
    assert await store.trim_messages("a", 0, None) == 2
    assert await store.read_messages("a", 0, 100) == []
    # the head survives, so offsets keep growing; other topics are untouched
    assert await store.topic_heads() == {"a": ("e1", 10), "b": ("e1", 1)}
    assert len(await store.read_messages("b", 0, 10)) == 1


# --- enqueue ------------------------------------------------------------------------------


async def test_enqueue_returns_the_stored_record(store: Store, clock: FakeClock) -> None:
    payload = {"dist": "Data-Printer", "n": [1, 2.5, None, True], "ü": "✓"}
    record, duplicate = await store.enqueue(
        NewJob("reports", payload, priority=3, delay=0, max_attempts=2)
    )
    assert duplicate is False
    assert record.queue == "reports"
    assert record.payload == payload
    assert record.state is JobState.QUEUED
    assert (record.priority, record.max_attempts, record.attempt) == (3, 2, 0)
    assert record.run_at == record.created_at == record.updated_at == clock.now
    assert record.worker is None and record.lease_until is None
    assert record.progress is None and record.result is None and record.error is None
    assert await store.get_job(record.id) == record
    api = record.to_api()
    assert set(api) == API_KEYS
    assert api["job"] == record.id and api["state"] == "queued" and api["payload"] == payload


async def test_get_missing_job(store: Store) -> None:
    assert await store.get_job("0000") is None


async def test_job_ids_grow_even_when_the_clock_stands_still(store: Store) -> None:
    ids = [(await enqueue(store)).id for _ in range(20)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 20


async def test_payload_must_be_json(store: Store) -> None:
    with pytest.raises(UsageError):
        await store.enqueue(NewJob("q", {"bad": object()}))
    with pytest.raises(UsageError):
        await store.enqueue(NewJob("q", float("nan")))
    assert await store.list_jobs() == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"queue": ""},
        {"max_attempts": 0},
        {"delay": -1.0},
        {"delay": float("inf")},
        {"priority": 1.5},
        {"unique_key": 5},
    ],
)
def test_new_job_validation(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"queue": "q", "payload": None, **kwargs}
    with pytest.raises(UsageError):
        NewJob(**args)


async def test_unique_key(store: Store) -> None:
    first = await enqueue(store, unique_key="k")
    again, duplicate = await store.enqueue(NewJob("q", {"other": 1}, unique_key="k"))
    assert duplicate is True
    assert again.id == first.id and again.payload is None
    # keys are global across queues
    elsewhere, duplicate = await store.enqueue(NewJob("other", None, unique_key="k"))
    assert duplicate is True and elsewhere.id == first.id
    other = await enqueue(store, unique_key="k2")
    assert other.id != first.id
    # still a duplicate while active; free again once finished
    job = await claim_one(store)
    assert job.id == first.id
    assert (await store.enqueue(NewJob("q", None, unique_key="k")))[1] is True
    await store.complete(job.id, job.attempt, None)
    fresh, duplicate = await store.enqueue(NewJob("q", None, unique_key="k"))
    assert duplicate is False and fresh.id != first.id


async def test_unique_key_is_free_after_cancel_and_failure(store: Store) -> None:
    first = await enqueue(store, unique_key="k")
    await store.cancel(first.id)
    second = await enqueue(store, unique_key="k")
    job = await claim_one(store)
    assert job.id == second.id
    await store.fail(job.id, job.attempt, "boom", retry=False, retry_delay=0)
    third = await enqueue(store, unique_key="k")
    assert len({first.id, second.id, third.id}) == 3


async def test_enqueue_many(store: Store) -> None:
    existing = await enqueue(store, unique_key="old")
    out = await store.enqueue_many(
        [
            NewJob("q", 1, unique_key="new"),
            NewJob("q", 2),
            NewJob("q", 3, unique_key="new"),
            NewJob("q", 4, unique_key="old"),
        ]
    )
    assert [d for _, d in out] == [False, False, True, True]
    assert out[2][0].id == out[0][0].id
    assert out[3][0].id == existing.id
    assert len(await store.list_jobs()) == 3
    assert await store.enqueue_many([]) == []


async def test_enqueue_many_is_all_or_nothing(store: Store) -> None:
    with pytest.raises(UsageError):
        await store.enqueue_many([NewJob("q", 1), NewJob("q", {1j}), NewJob("q", 3)])
    assert await store.list_jobs() == []


# --- claim --------------------------------------------------------------------------------


async def test_claim_sets_the_lease(store: Store, clock: FakeClock) -> None:
    queued = await enqueue(store, payload={"x": 1})
    clock.advance(5)
    (job,) = await store.claim("w1", ["q"], 10, 30.0)
    assert job.id == queued.id
    assert job.state is JobState.ACTIVE
    assert job.attempt == 1
    assert job.worker == "w1"
    assert job.lease_until == clock.now + 30.0
    assert job.started_at == job.updated_at == clock.now
    assert job.payload == {"x": 1}
    assert await store.get_job(job.id) == job
    assert await store.claim("w2", ["q"], 10, 30.0) == []


async def test_claim_order_priority_then_run_at_then_id(store: Store, clock: FakeClock) -> None:
    low = await enqueue(store, priority=0)
    high_late = await enqueue(store, priority=5, delay=2)
    mid = await enqueue(store, priority=1)
    high_a = await enqueue(store, priority=5)
    high_b = await enqueue(store, priority=5)
    negative = await enqueue(store, priority=-3)
    jobs = await store.claim("w", ["q"], 10, 30.0, now=clock.now + 2)
    assert [j.id for j in jobs] == [high_a.id, high_b.id, high_late.id, mid.id, low.id, negative.id]


async def test_claim_respects_the_limit(store: Store) -> None:
    ids = [(await enqueue(store)).id for _ in range(5)]
    first = await store.claim("w", ["q"], 2, 30.0)
    second = await store.claim("w", ["q"], 2, 30.0)
    third = await store.claim("w", ["q"], 2, 30.0)
    assert [j.id for j in first + second + third] == ids
    assert [len(first), len(second), len(third)] == [2, 2, 1]
    assert await store.claim("w", ["q"], 0, 30.0) == []


async def test_delayed_job_waits_for_its_time(store: Store, clock: FakeClock) -> None:
    later = await enqueue(store, delay=10.0)
    assert later.run_at == clock.now + 10.0
    assert await store.claim("w", ["q"], 1, 30.0) == []
    assert await store.claim("w", ["q"], 1, 30.0, now=clock.now + 9.999) == []
    (job,) = await store.claim("w", ["q"], 1, 30.0, now=clock.now + 10.0)
    assert job.id == later.id
    assert job.lease_until == clock.now + 40.0


async def test_claim_only_from_the_named_queues(store: Store) -> None:
    a = await enqueue(store, "a", priority=1)
    b = await enqueue(store, "b", priority=7)
    await enqueue(store, "c", priority=9)
    jobs = await store.claim("w", ["a", "b", "a"], 10, 30.0)
    assert [j.id for j in jobs] == [b.id, a.id]
    assert await store.claim("w", [], 10, 30.0) == []
    with pytest.raises(UsageError):
        await store.claim("w", "a", 1, 30.0)


async def test_claim_walks_many_priority_levels(store: Store, clock: FakeClock) -> None:
    # Forty distinct levels of delayed jobs above the ready ones: the claim must look past
    # every one of them (more levels than the walk visits one by one).
    for p in range(100, 60, -1):
        await enqueue(store, priority=p, delay=60.0)
    ready = [await enqueue(store, priority=p) for p in (3, 1, 2, 0, 3)]
    jobs = await store.claim("w", ["q"], 4, 30.0)
    assert [j.priority for j in jobs] == [3, 3, 2, 1]
    assert [j.id for j in jobs[:2]] == [ready[0].id, ready[4].id]
    late = await store.claim("w", ["q"], 100, 30.0, now=clock.now + 60.0)
    assert [j.priority for j in late] == [*range(100, 60, -1), 0]


async def test_claim_orders_many_distinct_priorities(store: Store) -> None:
    for p in [5, 40, 17, 33, 1, 25, 9, 38, 12, 29, 3, 21, 36, 14, 7, 30, 19, 2, 27, 11]:
        await enqueue(store, priority=p)
    jobs = await store.claim("w", ["q"], 15, 30.0)
    assert [j.priority for j in jobs] == sorted(
        [5, 40, 17, 33, 1, 25, 9, 38, 12, 29, 3, 21, 36, 14, 7, 30, 19, 2, 27, 11], reverse=True
    )[:15]


# --- complete, fail, progress and fencing -------------------------------------------------


async def test_complete(store: Store, clock: FakeClock) -> None:
    await enqueue(store)
    job = await claim_one(store)
    clock.advance(3)
    done = await store.complete(job.id, job.attempt, {"grade": "pass"}, worker="w1")
    assert done is not None
    assert done.state is JobState.DONE
    assert done.result == {"grade": "pass"}
    assert done.finished_at == done.updated_at == clock.now
    assert done.lease_until is None
    assert done.worker == "w1"
    assert await store.get_job(job.id) == done
    assert await store.complete(job.id, job.attempt, "again") is None
    assert await stored(store, job.id) == done


async def test_complete_is_fenced_by_attempt_and_worker(store: Store) -> None:
    await enqueue(store)
    job = await claim_one(store, worker="w1")
    assert await store.complete(job.id, job.attempt + 1, "x") is None
    assert await store.complete(job.id, job.attempt - 1, "x") is None
    assert await store.complete(job.id, job.attempt, "x", worker="w2") is None
    assert await store.fail(job.id, job.attempt, "e", True, 0, worker="w2") is None
    assert await store.progress(job.id, job.attempt + 1, {"p": 1}, None) is None
    assert await store.complete("missing", 1, "x") is None
    assert await stored(store, job.id) == job


async def test_complete_result_must_be_json(store: Store) -> None:
    await enqueue(store)
    job = await claim_one(store)
    with pytest.raises(UsageError):
        await store.complete(job.id, job.attempt, {"x": {1, 2}})
    assert await stored(store, job.id) == job


async def test_fail_with_retry(store: Store, clock: FakeClock) -> None:
    await enqueue(store, max_attempts=2)
    job = await claim_one(store)
    failed = await store.fail(job.id, job.attempt, "timeout", retry=True, retry_delay=7.0)
    assert failed is not None
    assert failed.state is JobState.RETRYING
    assert failed.error == "timeout"
    assert failed.run_at == clock.now + 7.0
    assert failed.lease_until is None and failed.finished_at is None
    assert await store.get_job(job.id) == failed
    assert await store.claim("w1", ["q"], 1, 30.0, now=clock.now + 6.9) == []
    second = await claim_one(store, now=clock.now + 7.0)
    assert second.attempt == 2
    # the last attempt: no retry left
    final = await store.fail(second.id, 2, "timeout again", retry=True, retry_delay=7.0)
    assert final is not None
    assert final.state is JobState.FAILED
    assert final.error == "timeout again"
    assert final.finished_at == clock.now
    assert await store.claim("w1", ["q"], 1, 30.0, now=clock.now + 1e6) == []


async def test_fail_without_retry(store: Store) -> None:
    await enqueue(store, max_attempts=5)
    job = await claim_one(store)
    failed = await store.fail(job.id, job.attempt, "bad input", retry=False, retry_delay=1.0)
    assert failed is not None and failed.state is JobState.FAILED
    assert await store.fail(job.id, job.attempt, "late", retry=True, retry_delay=0) is None
    assert (await stored(store, job.id)).error == "bad input"


async def test_fail_rejects_a_negative_delay(store: Store) -> None:
    await enqueue(store)
    job = await claim_one(store)
    with pytest.raises(UsageError):
        await store.fail(job.id, job.attempt, "e", retry=True, retry_delay=-1.0)
    assert await stored(store, job.id) == job


async def test_progress(store: Store, clock: FakeClock) -> None:
    await enqueue(store)
    job = await claim_one(store)
    first = await store.progress(job.id, job.attempt, {"step": 1, "total": 3}, clock.now + 60)
    assert first is not None
    assert first.progress == {"step": 1, "total": 3}
    assert first.lease_until == clock.now + 60
    merged = await store.progress(job.id, job.attempt, {"step": 2}, None)
    assert merged is not None
    assert merged.progress == {"step": 2, "total": 3}
    assert merged.lease_until == clock.now + 60
    assert await store.get_job(job.id) == merged
    replaced = await store.progress(job.id, job.attempt, 0.5, None)
    assert replaced is not None and replaced.progress == 0.5
    back = await store.progress(job.id, job.attempt, {"step": 3}, None)
    assert back is not None and back.progress == {"step": 3}
    assert back.state is JobState.ACTIVE


async def test_renew(store: Store) -> None:
    for _ in range(3):
        await enqueue(store)
    a1 = await claim_one(store, worker="a")
    a2 = await claim_one(store, worker="a")
    b = await claim_one(store, worker="b")
    assert await store.renew("a", T0 + 999) == 2
    assert await store.renew("nobody", T0 + 999) == 0
    assert (await stored(store, a1.id)).lease_until == T0 + 999
    assert (await stored(store, a2.id)).lease_until == T0 + 999
    assert (await stored(store, b.id)).lease_until == b.lease_until


async def test_release_worker(store: Store, clock: FakeClock) -> None:
    await enqueue(store, max_attempts=3)
    await enqueue(store, max_attempts=1)
    await enqueue(store)
    keeps = await claim_one(store, worker="w1")
    spent = await claim_one(store, worker="w1")
    other = await claim_one(store, worker="w2")
    released = await store.release_worker("w1", retry_delay=4.0)
    by_id = {r.id: r for r in released}
    assert set(by_id) == {keeps.id, spent.id}
    assert by_id[keeps.id].state is JobState.RETRYING
    assert by_id[keeps.id].run_at == clock.now + 4.0
    assert by_id[spent.id].state is JobState.FAILED
    assert {r.error for r in released} == {"worker lost"}
    for r in released:
        assert await store.get_job(r.id) == r
    assert await stored(store, other.id) == other
    assert await store.release_worker("w1") == []
    # the late result of the released attempt is refused and changes nothing
    before = await stored(store, keeps.id)
    assert await store.complete(keeps.id, keeps.attempt, "late", worker="w1") is None
    assert await store.fail(spent.id, spent.attempt, "late", True, 0) is None
    assert await stored(store, keeps.id) == before


async def test_expire_leases(store: Store, clock: FakeClock) -> None:
    await enqueue(store)
    await enqueue(store)
    short = await claim_one(store, lease=5.0)
    long = await claim_one(store, lease=50.0)
    assert await store.expire_leases(now=clock.now + 5.0) == []  # lease_until < now only
    expired = await store.expire_leases(now=clock.now + 6.0)
    assert [r.id for r in expired] == [short.id]
    assert expired[0].state is JobState.RETRYING
    assert expired[0].error == "lease expired"
    assert expired[0].run_at == clock.now + 6.0
    assert (await stored(store, long.id)).state is JobState.ACTIVE
    clock.advance(100)
    assert [r.id for r in await store.expire_leases()] == [long.id]
    assert await store.complete(short.id, short.attempt, "late") is None
    assert (await stored(store, short.id)).result is None


async def test_a_new_holder_is_not_disturbed_by_the_old_one(store: Store, clock: FakeClock) -> None:
    await enqueue(store)
    old = await claim_one(store, worker="w1", lease=1.0)
    await store.expire_leases(now=clock.now + 2.0)
    new = await claim_one(store, worker="w2", now=clock.now + 2.0)
    assert (new.id, new.attempt) == (old.id, 2)
    assert await store.complete(old.id, old.attempt, "stale") is None
    assert await store.progress(old.id, old.attempt, {"stale": True}, T0 + 1e6) is None
    assert await store.fail(old.id, old.attempt, "stale", retry=False, retry_delay=0) is None
    assert await stored(store, new.id) == new
    done = await store.complete(new.id, new.attempt, "fresh", worker="w2")
    assert done is not None and done.result == "fresh"


async def test_requeue_active(store: Store) -> None:
    for _ in range(3):
        await enqueue(store, max_attempts=2)
    a = await claim_one(store, worker="x")
    b = await claim_one(store, worker="y")
    back = await store.requeue_active("broker restarted")
    assert {r.id for r in back} == {a.id, b.id}
    assert {r.state for r in back} == {JobState.RETRYING}
    assert {r.error for r in back} == {"broker restarted"}
    assert await store.requeue_active("again") == []
    assert len(await store.claim("z", ["q"], 10, 30.0)) == 3


# --- cancel, retry, delete ----------------------------------------------------------------


async def test_cancel(store: Store, clock: FakeClock) -> None:
    queued = await enqueue(store)
    await enqueue(store)
    active = await claim_one(store, worker="w1")
    assert active.id == queued.id
    waiting = (await store.list_jobs(state=JobState.QUEUED))[0]

    result = await store.cancel(waiting.id)
    assert result is not None
    record, previous = result
    assert previous is JobState.QUEUED
    assert record.state is JobState.CANCELLED
    assert record.finished_at == clock.now

    result = await store.cancel(active.id)
    assert result is not None
    record, previous = result
    assert previous is JobState.ACTIVE
    assert record.worker == "w1"  # the caller tells this worker
    assert record.lease_until is None
    assert await store.get_job(active.id) == record
    assert await store.complete(active.id, active.attempt, "late", worker="w1") is None
    assert await store.fail(active.id, active.attempt, "late", True, 0, worker="w1") is None
    assert await store.progress(active.id, active.attempt, {"late": 1}, T0 + 1e6) is None
    assert await store.get_job(active.id) == record

    with pytest.raises(Conflict):
        await store.cancel(active.id)
    assert await store.cancel("missing") is None
    assert await store.claim("w", ["q"], 10, 30.0) == []


async def test_cancel_retrying_and_not_done(store: Store) -> None:
    await enqueue(store)
    job = await claim_one(store)
    await store.fail(job.id, job.attempt, "e", retry=True, retry_delay=100)
    result = await store.cancel(job.id)
    assert result is not None and result[1] is JobState.RETRYING
    await enqueue(store)
    other = await claim_one(store)
    await store.complete(other.id, other.attempt, None)
    with pytest.raises(Conflict):
        await store.cancel(other.id)
    assert (await stored(store, other.id)).state is JobState.DONE


async def test_retry(store: Store, clock: FakeClock) -> None:
    await enqueue(store, max_attempts=1)
    job = await claim_one(store)
    await store.fail(job.id, job.attempt, "boom", retry=True, retry_delay=0)
    assert (await stored(store, job.id)).state is JobState.FAILED
    clock.advance(10)
    again = await store.retry(job.id)
    assert again is not None
    assert again.state is JobState.QUEUED
    assert again.run_at == clock.now
    assert again.max_attempts == 2
    assert again.error is None and again.finished_at is None
    assert await store.get_job(job.id) == again
    second = await claim_one(store)
    assert second.attempt == 2
    with pytest.raises(Conflict):
        await store.retry(job.id)
    assert await store.retry("missing") is None


async def test_retry_keeps_unused_attempts_and_revives_cancelled(store: Store) -> None:
    job = await enqueue(store, max_attempts=5)
    await store.cancel(job.id)
    again = await store.retry(job.id)
    assert again is not None
    assert again.state is JobState.QUEUED and again.max_attempts == 5
    await claim_one(store)
    with pytest.raises(Conflict):
        await store.retry(job.id)  # active


async def test_retry_refuses_when_the_unique_key_is_taken(store: Store) -> None:
    first = await enqueue(store, unique_key="k")
    await store.cancel(first.id)
    second = await enqueue(store, unique_key="k")
    with pytest.raises(Conflict):
        await store.retry(first.id)
    assert (await stored(store, first.id)).state is JobState.CANCELLED
    assert (await stored(store, second.id)).state is JobState.QUEUED


async def test_delete(store: Store) -> None:
    queued = await enqueue(store)
    await enqueue(store)
    active = await claim_one(store)
    assert active.id == queued.id
    with pytest.raises(Conflict):
        await store.delete(active.id)
    assert await store.get_job(active.id) is not None
    await store.complete(active.id, active.attempt, None)
    assert await store.delete(active.id) is True
    assert await store.get_job(active.id) is None
    assert await store.delete(active.id) is False
    remaining = await store.list_jobs()
    assert len(remaining) == 1
    assert await store.delete(remaining[0].id) is True  # queued
    assert await store.list_jobs() == []


# --- reading ------------------------------------------------------------------------------


async def test_list_jobs_newest_first_with_paging(store: Store) -> None:
    ids = [(await enqueue(store, "a" if i % 2 else "b")).id for i in range(7)]
    assert [j.id for j in await store.list_jobs()] == ids[::-1]
    page1 = await store.list_jobs(limit=3)
    page2 = await store.list_jobs(limit=3, before=page1[-1].id)
    page3 = await store.list_jobs(limit=3, before=page2[-1].id)
    assert [j.id for j in page1 + page2 + page3] == ids[::-1]
    assert len(page3) == 1
    assert [j.id for j in await store.list_jobs(queue="a")] == ids[1::2][::-1]
    assert [j.id for j in await store.list_jobs(queue="a", limit=2, before=ids[5])] == [
        ids[3],
        ids[1],
    ]
    assert await store.list_jobs(limit=0) == []
    with pytest.raises(UsageError):
        await store.list_jobs(limit=-1)


async def test_list_jobs_by_state(store: Store) -> None:
    ids = [(await enqueue(store, "a" if i < 3 else "b")).id for i in range(5)]
    (taken,) = await store.claim("w", ["b"], 1, 30.0)
    assert taken.id == ids[3]
    assert [j.id for j in await store.list_jobs(state=JobState.ACTIVE)] == [ids[3]]
    assert [j.id for j in await store.list_jobs(state=JobState.QUEUED)] == [
        ids[4],
        ids[2],
        ids[1],
        ids[0],
    ]
    assert [j.id for j in await store.list_jobs(state=JobState.QUEUED, queue="b")] == [ids[4]]
    assert [
        j.id for j in await store.list_jobs(state=JobState.QUEUED, queue="a", before=ids[2])
    ] == [ids[1], ids[0]]
    assert await store.list_jobs(state=JobState.DONE) == []
    assert await store.list_jobs(queue="nope") == []


async def test_next_run_at(store: Store, clock: FakeClock) -> None:
    assert await store.next_run_at(["a"]) is None
    await enqueue(store, "a", delay=30)
    await enqueue(store, "b", delay=10)
    await enqueue(store, "c", delay=5)
    assert await store.next_run_at(["a"]) == clock.now + 30
    assert await store.next_run_at(["a", "b"]) == clock.now + 10
    assert await store.next_run_at(["a", "b", "c", "zzz"]) == clock.now + 5
    assert await store.next_run_at([]) is None
    # taken and finished jobs do not count; a retrying one does
    (job,) = await store.claim("w", ["c"], 1, 30.0, now=clock.now + 5)
    assert await store.next_run_at(["c"]) is None
    await store.fail(job.id, job.attempt, "e", retry=True, retry_delay=2)
    assert await store.next_run_at(["c"]) == clock.now + 2
    # a due time in the past is reported as it is
    clock.advance(100)
    assert await store.next_run_at(["b"]) == clock.now - 90


async def test_queue_stats(store: Store, clock: FakeClock) -> None:
    assert await store.queue_stats() == {}
    for _ in range(3):
        await enqueue(store, "a")
    clock.advance(10)
    await enqueue(store, "a", delay=100)
    await enqueue(store, "b", delay=100)
    job = await claim_one(store, "a")
    await store.complete(job.id, job.attempt, None)
    clock.advance(5)
    stats = await store.queue_stats()
    assert set(stats) == {"a", "b"}
    a = stats["a"]
    assert a.counts == {
        JobState.QUEUED: 3,
        JobState.ACTIVE: 0,
        JobState.DONE: 1,
        JobState.FAILED: 0,
        JobState.RETRYING: 0,
        JobState.CANCELLED: 0,
    }
    assert a.oldest_ready_age == pytest.approx(15.0)
    assert a.done_last_minute == 1
    b = stats["b"]
    assert b.counts[JobState.QUEUED] == 1
    assert b.oldest_ready_age is None  # delayed, not ready
    assert b.done_last_minute == 0
    clock.advance(60)
    assert (await store.queue_stats())["a"].done_last_minute == 0


async def test_queue_stats_counts_follow_every_kind_of_change(
    store: Store, clock: FakeClock
) -> None:
    jobs = [await enqueue(store, f"q{n % 2}", n, max_attempts=2) for n in range(12)]
    taken = await store.claim("w", ["q0", "q1"], 8, 5.0)
    await store.complete(taken[0].id, taken[0].attempt, None)
    await store.fail(taken[1].id, taken[1].attempt, "e", retry=True, retry_delay=0)
    await store.fail(taken[2].id, taken[2].attempt, "e", retry=False, retry_delay=0)
    await store.cancel(taken[3].id)
    await store.cancel(jobs[11].id)
    await store.retry(taken[2].id)
    await store.delete(taken[0].id)
    await store.delete(jobs[10].id)
    await store.release_worker("w")  # the remaining active ones
    with pytest.raises(Conflict):
        await store.cancel(taken[3].id)  # a refused change must not count either

    expected: dict[str, dict[JobState, int]] = {}
    for job in await store.list_jobs(limit=100):
        per_queue = expected.setdefault(job.queue, dict.fromkeys(JobState, 0))
        per_queue[job.state] += 1
    stats = await store.queue_stats()
    assert {queue: s.counts for queue, s in stats.items()} == expected
    assert sum(sum(c.values()) for c in expected.values()) == 10


# --- SQLite: grouping, savepoints, durability, migrations ---------------------------------


async def test_concurrent_writes_share_transactions(sqlite_path: Path) -> None:
    async with SQLiteStore(sqlite_path) as store:
        before = store.transactions_committed
        results = await asyncio.gather(*(store.enqueue(NewJob("q", {"n": n})) for n in range(200)))
        used = store.transactions_committed - before
        assert 1 <= used < 50, used
        assert len({r.id for r, _ in results}) == 200
        assert [r.payload["n"] for r, _ in results] == list(range(200))
        assert len(await store.list_jobs(limit=1000)) == 200


async def test_a_write_lock_held_elsewhere_never_blocks_the_loop(sqlite_path: Path) -> None:
    async with SQLiteStore(sqlite_path, busy_timeout=30.0) as store:
        await store.enqueue(NewJob("q", "before"))
        other = sqlite3.connect(sqlite_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's writer, say
        try:
            pending = asyncio.create_task(store.enqueue(NewJob("q", "while locked")))
            # While the write waits for the lock in the writer thread, the loop serves others:
            # a read goes through, and the write is still waiting.
            jobs = await asyncio.wait_for(store.list_jobs(), 10)
            assert [j.payload for j in jobs] == ["before"]
            assert not pending.done()
        finally:
            other.execute("COMMIT")
            other.close()
        rec, _ = await asyncio.wait_for(pending, 30)
        assert (await store.get_job(rec.id)) is not None
        assert [j.payload for j in await store.list_jobs()] == ["while locked", "before"]


async def test_the_wal_stays_bounded_under_steady_small_writes(sqlite_path: Path) -> None:
    async with SQLiteStore(sqlite_path) as store:
        for n in range(3000):  # one transaction each: inline groups, checkpoints between them
            await store.enqueue(NewJob("q", {"n": n, "pad": "x" * 200}))
        wal = sqlite_path.with_name(sqlite_path.name + "-wal")
        # SQLite's own automatic checkpoint keeps about 1,000 pages (4 MB); a checkpoint that
        # never caught up with the writer left hundreds of MB here.
        assert wal.stat().st_size < 8 << 20, wal.stat().st_size


async def test_enqueue_and_claim_is_one_transaction_in_claim_order(sqlite_path: Path) -> None:
    async with SQLiteStore(sqlite_path) as store:
        urgent, _ = await store.enqueue(NewJob("q", "urgent", priority=5))
        before = store.transactions_committed
        rec, duplicate, claimed = await store.enqueue_and_claim(
            NewJob("q", "new"), "w1", ["q"], 1, 30.0
        )
        assert store.transactions_committed - before == 1
        assert not duplicate
        # The claim takes the best ready job, which here is the older one of higher priority.
        assert [j.id for j in claimed] == [urgent.id]
        assert claimed[0].state is JobState.ACTIVE and claimed[0].worker == "w1"
        assert (await store.get_job(rec.id)).state is JobState.QUEUED  # type: ignore[union-attr]
        _, _, more = await store.enqueue_and_claim(NewJob("q", "last"), "w1", ["q"], 5, 30.0)
        assert sorted(j.payload for j in more) == ["last", "new"]


async def test_batch_max_caps_a_group(sqlite_path: Path) -> None:
    async with SQLiteStore(sqlite_path, batch_max=10) as store:
        before = store.transactions_committed
        await asyncio.gather(*(store.enqueue(NewJob("q", n)) for n in range(100)))
        assert store.transactions_committed - before >= 10


async def test_one_bad_operation_fails_alone(sqlite_path: Path) -> None:
    async with SQLiteStore(sqlite_path) as store:
        await store.append_messages([msg("busy", 5)])
        done = await store.enqueue(NewJob("q", None))
        (taken,) = await store.claim("w", ["q"], 1, 30.0)
        await store.complete(taken.id, taken.attempt, None)
        assert taken.id == done[0].id
        before = store.transactions_committed

        good = [store.enqueue(NewJob("q", n)) for n in range(10)]
        # writes a message to "fresh" and then fails on "busy": the savepoint must undo both
        bad_append = store.append_messages([msg("fresh", 1), msg("busy", 5)])
        bad_cancel = store.cancel(taken.id)
        results = await asyncio.gather(
            *good[:5], bad_append, *good[5:], bad_cancel, return_exceptions=True
        )

        assert store.transactions_committed - before == 1
        assert isinstance(results[5], UsageError)
        assert isinstance(results[11], Conflict)
        enqueued = [r for i, r in enumerate(results) if i not in (5, 11)]
        assert all(isinstance(r, tuple) for r in enqueued)
        assert await store.read_messages("fresh", 0, 10) == []
        assert await store.topic_heads() == {"busy": ("e1", 5)}
        assert len(await store.list_jobs(state=JobState.QUEUED)) == 10


async def test_close_commits_queued_writes(sqlite_path: Path) -> None:
    store = SQLiteStore(sqlite_path)
    await store.open()
    tasks = [asyncio.create_task(store.enqueue(NewJob("q", n))) for n in range(100)]
    await asyncio.sleep(0)  # one loop turn: every task has queued its write
    assert not any(t.done() for t in tasks)
    await store.close()
    assert all(t.done() and t.exception() is None for t in tasks)
    with pytest.raises(UsageError):
        await store.enqueue(NewJob("q", "after close"))

    async with SQLiteStore(sqlite_path) as reopened:
        jobs = await reopened.list_jobs(limit=1000)
        assert sorted(j.payload for j in jobs) == list(range(100))


async def test_close_waits_for_writes_blocked_on_a_full_queue(sqlite_path: Path) -> None:
    store = SQLiteStore(sqlite_path, queue_max=2, batch_max=4)
    await store.open()
    tasks = [asyncio.create_task(store.enqueue(NewJob("q", n))) for n in range(50)]
    await asyncio.sleep(0)  # one loop turn: two writes queued, the rest wait for room
    assert not any(t.done() for t in tasks)
    await asyncio.wait_for(store.close(), timeout=10)
    assert all(t.done() and t.exception() is None for t in tasks)
    async with SQLiteStore(sqlite_path) as reopened:
        assert len(await reopened.list_jobs(limit=100)) == 50


async def test_data_and_ids_survive_reopen(sqlite_path: Path) -> None:
    late_clock = FakeClock(T0 + 1000)
    async with SQLiteStore(sqlite_path, clock=late_clock) as store:
        first = await enqueue(store)
        await store.append_messages([msg("t", 3)])
        await store.revoke_token("j", None)
    # a clock that went backwards still yields larger ids
    async with SQLiteStore(sqlite_path, clock=FakeClock(T0)) as store:
        assert await store.get_job(first.id) == first
        assert (await enqueue(store)).id > first.id
        assert await store.topic_heads() == {"t": ("e1", 3)}
        assert await store.revoked_tokens() == [("j", None)]


async def test_migrations_are_applied_once(sqlite_path: Path) -> None:
    for _ in range(3):
        async with SQLiteStore(sqlite_path) as store:
            assert store.schema_version == len(MIGRATIONS)
            await store.set_meta("opened", "yes")
    conn = sqlite3.connect(sqlite_path)
    try:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version")]
        assert versions == [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert {"jobs", "messages", "topics", "revoked_tokens", "meta"} <= tables
    finally:
        conn.close()


async def test_a_newer_schema_is_refused(sqlite_path: Path) -> None:
    async with SQLiteStore(sqlite_path):
        pass
    conn = sqlite3.connect(sqlite_path)
    with conn:
        conn.execute("INSERT INTO schema_version VALUES (999, 'future', 0)")
    conn.close()
    store = SQLiteStore(sqlite_path)
    with pytest.raises(SchemaTooNew):
        await store.open()
    with pytest.raises(UsageError):
        await store.get_meta("k")
    await store.close()


async def test_a_locked_database_is_unavailable_then_recovers(sqlite_path: Path) -> None:
    async with SQLiteStore(sqlite_path, busy_timeout=0.05) as store:
        blocker = sqlite3.connect(sqlite_path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(Unavailable):
                await store.enqueue(NewJob("q", 1))
            assert await store.list_jobs() == []  # reads still work beside the lock
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        record, _ = await store.enqueue(NewJob("q", 2))
        assert await store.get_job(record.id) == record


def _plan(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> str:
    return " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))


async def test_hot_queries_use_their_indexes(sqlite_path: Path) -> None:
    async with SQLiteStore(sqlite_path) as store:
        await store.enqueue_many([NewJob(f"q{n % 3}", n, priority=n % 4) for n in range(300)])
    conn = sqlite3.connect(sqlite_path)
    conn.execute("ANALYZE")  # plans must hold with statistics present as well as without
    try:
        m = sqlite_module
        cases = {
            m._TOP_PRIORITY_SQL: (("q1",), "jobs_ready (queue=?)"),
            m._NEXT_PRIORITY_SQL: (("q1", 3), "jobs_ready (queue=? AND priority<?)"),
            m._READY_AT_PRIORITY_SQL: (
                ("q1", 3, T0, 5),
                "jobs_ready (queue=? AND priority=? AND run_at<?)",
            ),
            m._READY_BELOW_PRIORITY_SQL: (("q1", 3, T0, 5), "jobs_ready (queue=? AND priority<?)"),
            f"WITH q(name) AS (VALUES (?), (?)) SELECT MIN(({m._DUE_IN_QUEUE_SQL})) FROM q": (
                ("q1", "q2"),
                "jobs_due (queue=?)",
            ),
            f"SELECT id FROM jobs WHERE unique_key = ? AND {m._UNFINISHED_SQL}": (
                ("k",),
                "jobs_unique (unique_key=?)",
            ),
            "SELECT id FROM jobs WHERE state = 'active' AND worker = ?": (
                ("w",),
                "jobs_active (worker=?)",
            ),
        }
        for sql, (params, expected) in cases.items():
            plan = _plan(conn, sql, params)
            assert expected in plan, (sql, plan)
            assert "TEMP B-TREE" not in plan and "SCAN jobs" not in plan, (sql, plan)
        listing = _plan(
            conn, "SELECT id FROM jobs WHERE state = ? ORDER BY id DESC LIMIT 5", ("x",)
        )
        assert "jobs_state" in listing and "TEMP B-TREE" not in listing, listing
    finally:
        conn.close()
