"""Three broker processes on one PostgreSQL database and one Redis behave as one broker.

Every test starts three ``python -m quicksilver serve`` processes on their own ports, sharing a
fresh PostgreSQL schema and a fresh Redis prefix. A small TCP balancer in the test process stands
in for HAProxy: each new connection goes to the first node of its list that accepts it, so a
client of a node that dies reconnects to another one.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from quicksilver.client import Client

from .helpers import (
    ROOT,
    UNIT,
    cli_env,
    free_port,
    raw_client,
    token,
    until,
    until_async,
    wait_for,
    wait_http_ready,
)
from .services import pg_schema, redis_prefix, require_postgres, require_redis, with_search_path

ADMIN = token(sub="admin", roles=("admin",), ttl=None)
LEASE = 2.0


@dataclass
class Node:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.http_url,
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=10 * UNIT,
        )


def start(args: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "quicksilver", *args],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10 * UNIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def show_logs(paths: Sequence[Path]) -> None:
    """Print the processes' output (pytest shows it for a failing test)."""
    for path in paths:
        if path.exists():
            print(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")


@asynccontextmanager
async def cluster(tmp_path: Path, count: int = 3) -> AsyncIterator[list[Node]]:
    require_postgres()
    require_redis()
    async with pg_schema() as (db_url, schema), redis_prefix() as (redis_url, prefix):
        env = cli_env(
            QUICKSILVER_DATABASE_URL=with_search_path(db_url, schema),
            QUICKSILVER_REDIS_URL=redis_url,
            QUICKSILVER_REDIS_PREFIX=prefix,
            QUICKSILVER_JOB_LEASE=str(LEASE),
            QUICKSILVER_LEASE_CHECK_INTERVAL="0.2",
            QUICKSILVER_LOG_LEVEL="warning",
        )
        nodes = []
        for i in range(count):
            port = free_port()
            name = "abcdefgh"[i]
            log = tmp_path / f"node-{name}.log"
            args = ["serve", "--port", str(port), "--data-dir", str(tmp_path / name)]
            nodes.append(Node(name, port, start(args, env, log), log))
        ok = False
        try:
            await asyncio.gather(*(wait_http_ready(n.http_url, units=30) for n in nodes))
            yield nodes
            ok = True
        finally:
            await asyncio.gather(*(asyncio.to_thread(stop, n.proc) for n in nodes))
            if not ok:
                show_logs([n.log for n in nodes])


class Balancer:
    """A TCP balancer: each connection goes to the first of ``ports`` that accepts it."""

    def __init__(self, ports: Sequence[int]) -> None:
        self.ports = list(ports)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def __aenter__(self) -> Balancer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for port in self.ports:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                continue
        else:
            writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink, (writer, up_writer)))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        both: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in both:
                w.close()


def start_worker(url: str, name: str, tmp_path: Path, concurrency: int = 2) -> Any:
    worker_token = token(sub=name, roles=("worker",), ttl=None)
    args = ["worker", "--url", url, "--token", worker_token, "--queue", "t-slow"]
    args += ["--app", "tests.worker_app", "--concurrency", str(concurrency)]
    return start(args, cli_env(), tmp_path / f"worker-{name}.log")


async def workers_on(node: Node) -> list[str]:
    async with node.http() as h:
        return [w["name"] for w in (await h.get("/api/v1/workers")).json()["workers"]]


async def enqueue(node: Node, count: int, seconds: float) -> list[str]:
    jobs = [{"queue": "t-slow", "payload": {"seconds": seconds, "n": n}} for n in range(count)]
    async with node.http() as h:
        r = await h.post("/api/v1/jobs", json={"jobs": jobs})
        assert r.status_code == 201, r.text
        return [j["job"] for j in r.json()["jobs"]]


async def done_count(node: Node) -> int:
    async with node.http() as h:
        stats = (await h.get("/api/v1/queues")).json()
    return int(stats.get("t-slow", {}).get("counts", {}).get("done", 0))


class JobWatcher:
    """Every ``jobs/**`` message one subscriber receives, by job."""

    def __init__(self) -> None:
        self.by_topic: dict[str, list[dict[str, Any]]] = {}

    def add(self, frame: dict[str, Any]) -> None:
        self.by_topic.setdefault(frame["topic"], []).append(frame)

    def states(self, job: str) -> list[str]:
        return [m["data"]["state"] for m in self.by_topic.get(f"jobs/{job}", [])]

    def check_offsets(self) -> None:
        for topic, frames in self.by_topic.items():
            offsets = [m["offset"] for m in frames]
            assert offsets == list(range(1, len(offsets) + 1)), (topic, offsets)


# --- publish and subscribe ----------------------------------------------------------------------


async def test_a_subscriber_on_a_gets_what_b_and_c_publish_once_in_order(tmp_path: Path) -> None:
    per_node = 150
    async with cluster(tmp_path) as (a, b, c):
        async with (
            raw_client(a.ws_url) as sub,
            raw_client(b.ws_url) as pub_b,
            raw_client(c.ws_url) as pub_c,
        ):
            ok = await sub.request({"type": "subscribe", "topic": "room/1"})
            assert ok["type"] == "ok" and ok["offset"] == 0, ok
            epoch = ok["epoch"]
            # An overlapping wildcard on the same connection must not double anything.
            assert (await sub.request({"type": "subscribe", "topic": "room/*"}))["type"] == "ok"

            async def flood(client: Any, tag: str) -> list[int]:
                for n in range(per_node):
                    await client.send(
                        {"type": "publish", "id": n, "topic": "room/1", "data": [tag, n]}
                    )
                answers = [await client.expect("ok") for _ in range(per_node)]
                assert [x["id"] for x in answers] == list(range(per_node))
                return [x["offset"] for x in answers]

            from_b, from_c = await asyncio.gather(flood(pub_b, "b"), flood(pub_c, "c"))
            assert sorted(from_b + from_c) == list(range(1, 2 * per_node + 1))
            assert from_b == sorted(from_b) and from_c == sorted(from_c)

            got = [await sub.expect("message") for _ in range(2 * per_node)]
            assert [m["offset"] for m in got] == list(range(1, 2 * per_node + 1))
            assert {m["epoch"] for m in got} == {epoch}
            by_offset = {o: ("b", n) for n, o in enumerate(from_b)}
            by_offset.update({o: ("c", n) for n, o in enumerate(from_c)})
            assert [tuple(m["data"]) for m in got] == [by_offset[m["offset"]] for m in got]

            # Over HTTP on C too; the next frame A gets is that message: nothing was doubled.
            async with c.http() as h:
                r = await h.post("/api/v1/publish", json={"topic": "room/1", "data": "last"})
            assert r.json() == {"offset": 2 * per_node + 1}
            following = await sub.recv()
            assert following["type"] == "message" and following["data"] == "last", following

            # A client of another node recovers from the shared history.
            async with raw_client(b.ws_url) as late:
                since = {"offset": 2 * per_node - 10, "epoch": epoch}
                ok = await late.request({"type": "subscribe", "topic": "room/1", "since": since})
                assert (ok["recovered"], ok["epoch"], ok["offset"]) == (
                    True,
                    epoch,
                    2 * per_node + 1,
                )
                replay = [await late.expect("message") for _ in range(11)]
                assert [m["offset"] for m in replay] == list(
                    range(2 * per_node - 9, 2 * per_node + 2)
                )
                # Beyond the history window (100 messages): what is kept, recovered false.
                since = {"offset": 10, "epoch": epoch}
                again = await late.request({"type": "subscribe", "topic": "room/1", "since": since})
                assert again["recovered"] is False
                kept = [await late.expect("message") for _ in range(100)]
                last = 2 * per_node + 1
                assert [m["offset"] for m in kept] == list(range(last - 99, last + 1))


# --- jobs -----------------------------------------------------------------------------------------


async def test_workers_on_b_and_c_take_jobs_enqueued_on_a_each_done_once(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (a, b, c):
        workers = [
            start_worker(b.ws_url, "w-b", tmp_path),
            start_worker(c.ws_url, "w-c", tmp_path),
        ]
        try:
            await until_async(lambda: _joined(b, "w-b"), units=30)
            await until_async(lambda: _joined(c, "w-c"), units=30)
            watcher = JobWatcher()
            async with raw_client(a.ws_url) as watch:
                await watch.request({"type": "subscribe", "topic": "jobs/**"})
                ids = await enqueue(a, 30, 0.05)
                await until_async(lambda: _all_done(a, len(ids)), units=30)
                async with a.http() as h:
                    bodies = [(await h.get(f"/api/v1/jobs/{job}")).json() for job in ids]
                # Wait for the last state message of every job to reach the watcher.
                while any("done" not in watcher.states(job) for job in ids):
                    watcher.add(await watch.expect("message", units=10))
        finally:
            await asyncio.gather(*(asyncio.to_thread(stop, w) for w in workers))
        assert all(body["state"] == "done" and body["attempt"] == 1 for body in bodies), bodies
        pids = {body["result"]["pid"] for body in bodies}
        assert pids == {w.pid for w in workers}, "both nodes' workers took jobs"
        for job in ids:
            assert watcher.states(job).count("done") == 1, watcher.states(job)
            assert watcher.states(job)[0] == "queued"
        watcher.check_offsets()


async def _joined(node: Node, name: str) -> bool:
    return name in await workers_on(node)


async def _all_done(node: Node, count: int) -> bool:
    return await done_count(node) >= count


# --- a node killed mid-run ---------------------------------------------------------------------


async def test_a_node_killed_mid_run_loses_nothing_and_does_nothing_twice(tmp_path: Path) -> None:
    jobs = 40
    async with (
        cluster(tmp_path) as (a, b, c),
        Balancer([b.port, c.port]) as to_b_then_c,
        Balancer([b.port, a.port]) as to_b_then_a,
    ):
        workers = [
            start_worker(to_b_then_c.ws_url, "w-b", tmp_path),
            start_worker(c.ws_url, "w-c", tmp_path),
        ]
        watcher = JobWatcher()
        received: list[int] = []
        client = Client(to_b_then_a.ws_url, ADMIN, backoff_initial=0.05, backoff_max=0.5)
        stop_publishing = asyncio.Event()
        try:
            await until_async(lambda: _joined(b, "w-b"), units=30)
            await until_async(lambda: _joined(c, "w-c"), units=30)
            await client.connect()
            feed = await client.subscribe("feed/x")

            async def read_feed() -> None:
                async for message in feed:
                    received.append(message.offset)

            async def publish_feed() -> int:
                sent = 0
                async with raw_client(c.ws_url) as pub:
                    while not stop_publishing.is_set():
                        await pub.request({"type": "publish", "topic": "feed/x", "data": sent})
                        sent += 1
                        await asyncio.sleep(0.01)
                return sent

            reader = asyncio.create_task(read_feed())
            publisher = asyncio.create_task(publish_feed())
            async with raw_client(a.ws_url) as watch:
                await watch.request({"type": "subscribe", "topic": "jobs/**"})
                ids = await enqueue(a, jobs, 0.3)

                # Kill B while its worker holds jobs.
                def b_holds_jobs() -> bool:
                    return any(
                        f["data"].get("worker") == "w-b" and f["data"]["state"] == "active"
                        for frames in watcher.by_topic.values()
                        for f in frames
                    )

                while not b_holds_jobs():
                    watcher.add(await watch.expect("message", units=10))
                b.proc.kill()
                b.proc.wait()

                while any("done" not in watcher.states(job) for job in ids):
                    watcher.add(await watch.expect("message", units=LEASE * 10))
            assert await _all_done(a, jobs)
            # The worker of B came back through the balancer, on C.
            await until_async(lambda: _joined(c, "w-b"), units=30)
            stop_publishing.set()
            sent = await wait_for(publisher, 10)
            await until(lambda: len(received) >= sent, units=10)
        finally:
            stop_publishing.set()
            await client.close()
            await asyncio.gather(*(asyncio.to_thread(stop, w) for w in workers))
        reader.cancel()
        async with a.http() as h:
            bodies = [(await h.get(f"/api/v1/jobs/{job}")).json() for job in ids]
        assert all(body["state"] == "done" for body in bodies)
        rerun = [body for body in bodies if body["attempt"] > 1]
        assert rerun, "some jobs held through B ran again elsewhere"
        for job in ids:
            assert watcher.states(job).count("done") == 1, watcher.states(job)
        watcher.check_offsets()
        # The feed's subscriber, first on B, recovered on A: every offset once, in order.
        assert received == list(range(1, sent + 1))
        assert client.reconnects >= 1
        assert feed.recovered is True
