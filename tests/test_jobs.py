"""The job queue over the broker's WebSocket, with raw clients acting as workers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import UNIT, Raw, RunningServer, http, raw_client, running_server, token

WORKER = token(sub="w1", roles=("worker",), queues=["q", "other"])
PRODUCER = token(sub="p1", roles=("publisher",))


@pytest.fixture
async def jobsrv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with running_server(
        tmp_path / "data",
        job_lease=0.5 * UNIT,
        lease_check_interval=0.05 * UNIT,
        retry_backoff_base=0.05 * UNIT,
        retry_backoff_cap=0.2 * UNIT,
    ) as srv:
        yield srv


async def enqueue(c: Raw, queue: str = "q", payload: Any = None, **fields: Any) -> str:
    reply = await c.request({"type": "enqueue", "queue": queue, "payload": payload, **fields})
    assert reply["type"] == "ok", reply
    job: str = reply["job"]
    return job


async def test_only_workers_may_work(jobsrv: RunningServer) -> None:
    async with raw_client(jobsrv.ws_url, PRODUCER) as c:
        reply = await c.request({"type": "work", "queues": ["q"], "concurrency": 1})
        assert reply["code"] == "forbidden"
    async with raw_client(jobsrv.ws_url, WORKER) as w:
        reply = await w.request({"type": "work", "queues": ["secret"], "concurrency": 1})
        assert reply["code"] == "forbidden"
        assert (await w.request({"type": "work", "queues": ["q"], "concurrency": 1}))[
            "type"
        ] == "ok"


async def test_job_round_trip_and_state_topic(jobsrv: RunningServer) -> None:
    async with (
        raw_client(jobsrv.ws_url, PRODUCER) as p,
        raw_client(jobsrv.ws_url, WORKER) as w,
        raw_client(jobsrv.ws_url) as watcher,
    ):
        job = await enqueue(p, payload={"x": 1})
        await watcher.request({"type": "subscribe", "topic": f"jobs/{job}"})
        await w.request({"type": "work", "queues": ["q"], "concurrency": 1})
        pushed = await w.expect("job")
        assert pushed["job"] == job and pushed["attempt"] == 1
        assert pushed["payload"] == {"x": 1} and pushed["lease"] > 0
        await w.send({"type": "progress", "job": job, "attempt": 1, "data": {"pct": 50}})
        done = await w.request({"type": "done", "job": job, "attempt": 1, "result": [1, 2]})
        assert done["type"] == "ok"
        states: list[str] = []
        while not states or states[-1] != "done":
            m = await watcher.expect("message")
            states.append(m["data"]["state"])
            assert m["data"]["job"] == job and m["data"]["queue"] == "q"
        assert states == ["active", "active", "done"]
        async with http(jobsrv, PRODUCER) as h:
            body = (await h.get(f"/api/v1/jobs/{job}")).json()
        assert body["state"] == "done" and body["result"] == [1, 2]
        assert body["progress"] == {"pct": 50} and body["attempt"] == 1
        for key in ("job", "queue", "payload", "error", "created_at", "updated_at"):
            assert key in body


async def test_concurrency_is_a_bound(jobsrv: RunningServer) -> None:
    async with raw_client(jobsrv.ws_url, PRODUCER) as p, raw_client(jobsrv.ws_url, WORKER) as w:
        for n in range(5):
            await enqueue(p, payload=n)
        await w.request({"type": "work", "queues": ["q"], "concurrency": 2})
        first = [await w.expect("job"), await w.expect("job")]
        # No third job until one is finished: finishing one must bring exactly one more.
        await w.request({"type": "done", "job": first[0]["job"], "attempt": 1, "result": None})
        third = await w.expect("job")
        assert third["job"] not in {j["job"] for j in first}
        slot = next(iter(jobsrv.broker.jobs.workers.values()))
        assert len(slot.held) == 2


async def test_priorities_order(jobsrv: RunningServer) -> None:
    async with raw_client(jobsrv.ws_url, PRODUCER) as p, raw_client(jobsrv.ws_url, WORKER) as w:
        ids: dict[int, list[str]] = {}
        for prio in (0, 5, -3, 10, 5):
            ids.setdefault(prio, []).append(await enqueue(p, payload=prio, priority=prio))
        await w.request({"type": "work", "queues": ["q"], "concurrency": 1})
        got = []
        for _ in range(5):
            job = await w.expect("job")
            got.append(job["payload"])
            await w.request({"type": "done", "job": job["job"], "attempt": 1, "result": None})
        assert got == [10, 5, 5, 0, -3]


async def test_unique_key_dedupes(jobsrv: RunningServer) -> None:
    async with raw_client(jobsrv.ws_url, PRODUCER) as p:
        a = await p.request({"type": "enqueue", "queue": "q", "payload": 1, "unique_key": "k"})
        b = await p.request({"type": "enqueue", "queue": "q", "payload": 2, "unique_key": "k"})
        assert a["job"] == b["job"] and b["duplicate"] is True and a["duplicate"] is False


async def test_delayed_job_does_not_run_early(jobsrv: RunningServer) -> None:
    async with raw_client(jobsrv.ws_url, PRODUCER) as p, raw_client(jobsrv.ws_url, WORKER) as w:
        await w.request({"type": "work", "queues": ["q"], "concurrency": 1})
        delay = 0.6 * UNIT
        start = time.time()
        await enqueue(p, payload="later", delay=delay)
        await enqueue(p, payload="now")
        first = await w.expect("job")
        assert first["payload"] == "now"
        await w.request({"type": "done", "job": first["job"], "attempt": 1, "result": None})
        later = await w.expect("job", units=5)
        assert later["payload"] == "later"
        assert time.time() - start >= delay


async def test_retries_back_off_then_fail(jobsrv: RunningServer) -> None:
    async with raw_client(jobsrv.ws_url, PRODUCER) as p, raw_client(jobsrv.ws_url, WORKER) as w:
        job = await enqueue(p, payload=None, max_attempts=3)
        await w.request({"type": "work", "queues": ["q"], "concurrency": 1})
        seen = []
        for attempt in (1, 2, 3):
            pushed = await w.expect("job")
            assert pushed["attempt"] == attempt
            seen.append(time.time())
            reply = await w.request(
                {"type": "fail", "job": job, "attempt": attempt, "error": f"boom {attempt}"}
            )
            assert reply["type"] == "ok"
            assert reply["state"] == ("failed" if attempt == 3 else "retrying")
        async with http(jobsrv, PRODUCER) as h:
            body = (await h.get(f"/api/v1/jobs/{job}")).json()
        assert body["state"] == "failed" and body["error"] == "boom 3"
        # An admin retry brings it back.
        async with http(jobsrv, token()) as h:
            assert (await h.post(f"/api/v1/jobs/{job}/retry")).status_code == 200
        pushed = await w.expect("job")
        assert pushed["job"] == job and pushed["attempt"] == 4


async def test_fail_without_retry_is_final(jobsrv: RunningServer) -> None:
    async with raw_client(jobsrv.ws_url, PRODUCER) as p, raw_client(jobsrv.ws_url, WORKER) as w:
        job = await enqueue(p)
        await w.request({"type": "work", "queues": ["q"], "concurrency": 1})
        await w.expect("job")
        reply = await w.request(
            {"type": "fail", "job": job, "attempt": 1, "error": "bad input", "retry": False}
        )
        assert reply["state"] == "failed"


async def test_late_done_after_lease_expiry_gets_conflict(jobsrv: RunningServer) -> None:
    async with raw_client(jobsrv.ws_url, PRODUCER) as p, raw_client(jobsrv.ws_url, WORKER) as w:
        job = await enqueue(p)
        await w.request({"type": "work", "queues": ["q"], "concurrency": 1})
        assert (await w.expect("job"))["job"] == job
        # No heartbeat: the lease runs out, the holder is told to stop.
        cancel = await w.expect("cancel", units=5)
        assert cancel["job"] == job
        late = await w.request({"type": "done", "job": job, "attempt": 1, "result": "late"})
        assert late["code"] == "conflict"
        # The job went back to the queue and is pushed again with a higher attempt.
        again = await w.expect("job")
        assert again["job"] == job and again["attempt"] >= 2
        fresh = {"type": "done", "job": job, "attempt": again["attempt"], "result": "fresh"}
        assert (await w.request(fresh))["type"] == "ok"
        async with http(jobsrv, PRODUCER) as h:
            body = (await h.get(f"/api/v1/jobs/{job}")).json()
        assert body["result"] == "fresh" and body["state"] == "done"


async def test_heartbeat_keeps_the_lease(jobsrv: RunningServer) -> None:
    async with raw_client(jobsrv.ws_url, PRODUCER) as p, raw_client(jobsrv.ws_url, WORKER) as w:
        job = await enqueue(p)
        await w.request({"type": "work", "queues": ["q"], "concurrency": 1})
        await w.expect("job")
        lease = jobsrv.broker.settings.job_lease
        end = time.time() + 3 * lease
        while time.time() < end:
            await w.send({"type": "heartbeat"})
            # A ping round trip orders the heartbeat before the next check.
            assert (await w.request({"type": "ping"}, units=lease))["type"] == "pong"
            rec = await jobsrv.broker.store.get_job(job)
            assert rec is not None and rec.state == "active" and rec.attempt == 1
        assert (await w.request({"type": "done", "job": job, "attempt": 1}))["type"] == "ok"


async def test_disconnect_requeues_at_once(jobsrv: RunningServer) -> None:
    async with raw_client(jobsrv.ws_url, PRODUCER) as p, raw_client(jobsrv.ws_url, WORKER) as w2:
        job = await enqueue(p)
        async with raw_client(jobsrv.ws_url, WORKER) as w1:
            await w1.request({"type": "work", "queues": ["q"], "concurrency": 1})
            await w1.expect("job")
        await w2.request({"type": "work", "queues": ["q"], "concurrency": 1})
        again = await w2.expect("job", units=0.4)  # well before the lease would run out
        assert again["job"] == job and again["attempt"] == 2


async def test_cancel_reaches_the_holder(jobsrv: RunningServer) -> None:
    async with raw_client(jobsrv.ws_url, PRODUCER) as p, raw_client(jobsrv.ws_url, WORKER) as w:
        job = await enqueue(p)
        queued = await enqueue(p)
        await w.request({"type": "work", "queues": ["q"], "concurrency": 1})
        assert (await w.expect("job"))["job"] == job
        assert (await p.request({"type": "cancel", "job": job}))["state"] == "cancelled"
        assert (await w.expect("cancel"))["job"] == job
        late = await w.request({"type": "done", "job": job, "attempt": 1})
        assert late["code"] == "conflict"
        # Cancelling a queued job: it never reaches a worker.
        async with http(jobsrv, PRODUCER) as h:
            assert (await h.post(f"/api/v1/jobs/{queued}/cancel")).json()["state"] == "cancelled"
            assert (await h.post(f"/api/v1/jobs/{queued}/cancel")).status_code == 409


async def test_malformed_job_frames_keep_the_worker(jobsrv: RunningServer) -> None:
    async with raw_client(jobsrv.ws_url, PRODUCER) as p, raw_client(jobsrv.ws_url, WORKER) as w:
        await w.request({"type": "work", "queues": ["q"], "concurrency": 1})
        for bad in (
            {"type": "done", "job": 5, "attempt": 1},
            {"type": "done", "job": "x"},
            {"type": "fail", "job": "x", "attempt": "one"},
            {"type": "progress", "job": None, "attempt": 1},
            {"type": "work", "queues": "q"},
            {"type": "enqueue", "queue": "", "payload": 1},
            {"type": "enqueue", "queue": "q", "max_attempts": 0},
        ):
            reply = await w.request(bad)
            assert reply["code"] == "bad_request", (bad, reply)
        job = await enqueue(p, payload="still works")
        pushed = await w.expect("job")
        assert pushed["job"] == job


async def test_http_jobs_api(jobsrv: RunningServer) -> None:
    async with http(jobsrv, PRODUCER) as h, http(jobsrv) as anon, http(jobsrv, token()) as admin:
        assert (await anon.post("/api/v1/jobs", json={"queue": "q"})).status_code == 401
        r = await h.post("/api/v1/jobs", json={"queue": "q", "payload": {"a": 1}})
        assert r.status_code == 201
        job = r.json()["job"]
        r = await h.post(
            "/api/v1/jobs", json={"jobs": [{"queue": "q", "payload": i} for i in range(3)]}
        )
        assert r.status_code == 201 and len(r.json()["jobs"]) == 3
        bad = await h.post("/api/v1/jobs", json={"jobs": [{"queue": "q"}, {"queue": 7}]})
        assert bad.status_code == 400 and bad.json()["errors"][0]["path"] == "/jobs/1"
        listed = (await h.get("/api/v1/jobs", params={"queue": "q", "limit": 2})).json()
        assert len(listed["jobs"]) == 2 and "next" in listed
        rest = await h.get("/api/v1/jobs", params={"queue": "q", "before": listed["next"]})
        assert len(rest.json()["jobs"]) == 2
        assert (await h.get("/api/v1/jobs/nope")).status_code == 404
        stats = (await h.get("/api/v1/queues")).json()
        assert stats["q"]["counts"]["queued"] == 4
        assert (await h.delete(f"/api/v1/jobs/{job}")).status_code == 403
        assert (await admin.delete(f"/api/v1/jobs/{job}")).status_code == 204
        assert (await h.get(f"/api/v1/jobs/{job}")).status_code == 404
