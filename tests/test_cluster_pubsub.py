"""Publish and subscribe across nodes, in one process: two brokers sharing a Redis backplane.

Each broker keeps its own SQLite store (pub/sub needs only Redis); the three-process tests with
PostgreSQL are in ``test_cluster.py``. Every test uses a Redis prefix of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from auth.tokens import Secret
from broker.config import Settings
from broker.core import Broker
from protocol.errors import Unavailable

from .helpers import SECRET, RunningServer, http, raw_client, running_server, token, wait_for
from .services import pg_schema, redis_prefix, with_search_path
from .test_mercury import mercury, recv


@asynccontextmanager
async def two_nodes(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[RunningServer, ...]]:
    async with (
        redis_prefix() as (url, prefix),
        running_server(tmp_path / "a", redis_url=url, redis_prefix=prefix, **settings) as a,
        running_server(tmp_path / "b", redis_url=url, redis_prefix=prefix, **settings) as b,
    ):
        yield a, b


async def publish(server: RunningServer, topic: str, count: int) -> list[int]:
    async with raw_client(server.ws_url) as pub:
        return [
            (await pub.request({"type": "publish", "topic": topic, "data": n}))["offset"]
            for n in range(count)
        ]


async def test_ok_means_live_even_for_a_message_published_right_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with two_nodes(tmp_path) as (a, b), raw_client(a.ws_url) as sub:
        # A slow way to Redis for A's subscription changes: ``ok`` must wait for them.
        backplane = a.broker.hub.backplane
        send = backplane._send_subs  # type: ignore[attr-defined]

        async def slow_send(*args: Any) -> None:
            await asyncio.sleep(0.05)
            await send(*args)

        monkeypatch.setattr(backplane, "_send_subs", slow_send)
        async with raw_client(b.ws_url) as pub:
            for i in range(20):
                pattern = f"w{i}/*" if i % 2 else f"w{i}/x"
                assert (await sub.request({"type": "subscribe", "topic": pattern}))["type"] == "ok"
                await pub.request({"type": "publish", "topic": f"w{i}/x", "data": i})
                message = await sub.expect("message")
                assert (message["topic"], message["data"]) == (f"w{i}/x", i)


async def test_recovery_answers_like_a_single_node(tmp_path: Path) -> None:
    async with two_nodes(tmp_path, history_size=10) as (a, b):
        assert await publish(b, "t", 25) == list(range(1, 26))
        async with raw_client(a.ws_url) as sub:
            ok = await sub.request({"type": "subscribe", "topic": "t"})
            epoch = ok["epoch"]
            assert (ok["offset"], "recovered" in ok) == (25, False)

            async def since(offset: int, epoch: str) -> dict[str, Any]:
                async with raw_client(a.ws_url) as c:
                    body = {"offset": offset, "epoch": epoch}
                    reply = await c.request({"type": "subscribe", "topic": "t", "since": body})
                    frames = [await c.expect("message") for _ in range(min(25 - offset, 10))]
                    reply["replayed"] = [m["offset"] for m in frames]
                    return reply

            inside = await since(20, epoch)
            assert (inside["recovered"], inside["replayed"]) == (True, [21, 22, 23, 24, 25])
            beyond = await since(5, epoch)
            assert beyond["recovered"] is False
            assert beyond["replayed"] == list(range(16, 26)), "what the window keeps"
            async with raw_client(a.ws_url) as c:
                current = {"offset": 25, "epoch": epoch}
                reply = await c.request({"type": "subscribe", "topic": "t", "since": current})
                assert reply["recovered"] is True
                other = {"offset": 3, "epoch": "elsewhere"}
                again = await c.request({"type": "subscribe", "topic": "t", "since": other})
                assert (again["recovered"], again["epoch"]) == (False, epoch)
                fresh = {"offset": 0, "epoch": ""}
                new = await c.request({"type": "subscribe", "topic": "never", "since": fresh})
                assert (new["recovered"], new["offset"]) == (True, 0)
            # The live stream continues after all of that, once per message.
            assert await publish(b, "t", 1) == [26]
            following = await sub.recv()
            assert (following["type"], following["offset"]) == ("message", 26)


async def test_subscribing_again_with_since_replays_then_resumes(tmp_path: Path) -> None:
    async with two_nodes(tmp_path) as (a, b), raw_client(a.ws_url) as sub:
        ok = await sub.request({"type": "subscribe", "topic": "again"})
        await publish(b, "again", 5)
        assert [(await sub.expect("message"))["offset"] for _ in range(5)] == [1, 2, 3, 4, 5]
        since = {"offset": 2, "epoch": ok["epoch"]}
        reply = await sub.request({"type": "subscribe", "topic": "again", "since": since})
        assert reply["recovered"] is True
        assert [(await sub.expect("message"))["offset"] for _ in range(3)] == [3, 4, 5]
        await publish(b, "again", 1)
        following = await sub.recv()
        assert (following["type"], following["offset"]) == ("message", 6)
        assert len(a.broker.hub.index) == 1


async def test_http_publish_answers_with_the_shared_offset(tmp_path: Path) -> None:
    async with two_nodes(tmp_path) as (a, b):
        async with http(a, token()) as ha, http(b, token()) as hb:
            offsets = []
            for client in (ha, hb, ha):
                r = await client.post("/api/v1/publish", json={"topic": "h/1", "data": 1})
                offsets.append(r.json()["offset"])
        assert offsets == [1, 2, 3]


async def test_presence_events_reach_subscribers_on_other_nodes(tmp_path: Path) -> None:
    async with (
        two_nodes(tmp_path, presence_patterns=("room/*",)) as (a, b),
        raw_client(b.ws_url) as watcher,
        raw_client(a.ws_url) as member,
    ):
        await watcher.request({"type": "subscribe", "topic": "presence/room/1"})
        await member.request({"type": "subscribe", "topic": "room/1"})
        event = await watcher.expect("message")
        assert (event["data"]["event"], event["data"]["topic"]) == ("join", "room/1")
        await member.request({"type": "unsubscribe", "topic": "room/1"})
        event = await watcher.expect("message")
        assert event["data"]["event"] == "leave"


async def test_redis_unreachable_at_start_fails_the_start(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "d", redis_url="redis://127.0.0.1:1/0", secret=Secret(SECRET)
    )
    broker = Broker(settings)
    try:
        with pytest.raises(Unavailable, match="cannot reach Redis"):
            await broker.start()
    finally:
        await broker.stop()


async def test_a_mercury_bus_spans_nodes_without_echoing_the_sender(tmp_path: Path) -> None:
    # The sender is known by its message's offset, which the backplane may give only after the
    # message itself has come back: deliveries wait for it instead of echoing.
    async with (
        two_nodes(tmp_path, mercury_require_auth=False) as (a, b),
        mercury(a, "/bus/room") as a1,
        mercury(a, "/bus/room") as a2,
        mercury(b, "/bus/room") as b1,
    ):
        for n in range(20):
            await a1.send(f"from a1 #{n}")
            await b1.send(f"from b1 #{n}")
        # Each peer gets the other peers' messages in order, and never its own.
        got_a1 = [await recv(a1) for _ in range(20)]
        got_a2 = [await recv(a2) for _ in range(40)]
        got_b1 = [await recv(b1) for _ in range(20)]
        assert got_a1 == [f"from b1 #{n}" for n in range(20)]
        assert got_b1 == [f"from a1 #{n}" for n in range(20)]
        assert [m for m in got_a2 if str(m).startswith("from a1")] == got_b1
        assert [m for m in got_a2 if str(m).startswith("from b1")] == got_a1
        # Nothing else is on its way: a marker from a2 is the next thing a1 and b1 read.
        await a2.send("marker")
        assert await recv(a1) == "marker" and await recv(b1) == "marker"


async def test_a_job_taken_at_once_on_another_node_shows_queued_before_active(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Node A is slow to come back from its insert (a busy loop, say) while a worker on node B
    # takes the job the moment it is committed: jobs/<id> must still start with "queued".
    async with pg_schema() as (db_url, schema):
        shared = {"database_url": with_search_path(db_url, schema)}
        async with two_nodes(tmp_path, **shared) as (a, b):
            insert = a.broker.store.enqueue
            taken = asyncio.Event()

            async def slow_insert(job: Any) -> Any:
                result = await insert(job)
                await wait_for(taken.wait(), 10)  # B's worker has the job by now
                return result

            monkeypatch.setattr(a.broker.store, "enqueue", slow_insert)
            worker_token = token(sub="w", roles=("worker",))
            async with (
                raw_client(a.ws_url) as watch,
                raw_client(b.ws_url, worker_token) as worker,
                raw_client(a.ws_url) as producer,
            ):
                await watch.request({"type": "subscribe", "topic": "jobs/**"})
                await worker.request({"type": "work", "queues": ["race"], "concurrency": 1})
                await producer.send({"type": "enqueue", "id": 1, "queue": "race", "payload": 1})
                job = await worker.expect("job", units=10)
                taken.set()
                await worker.send(
                    {"type": "done", "id": 2, "job": job["job"], "attempt": 1, "result": "r"}
                )
                assert (await producer.expect("ok"))["job"] == job["job"]
                states = []
                while "done" not in states:
                    message = await watch.expect("message", units=10)
                    if message["topic"] == f"jobs/{job['job']}":
                        states.append(message["data"]["state"])
                assert states == ["queued", "active", "done"]
