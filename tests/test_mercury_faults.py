"""Where Mercury fails and quicksilver's Mercury routes must not: pushes without pullers, dead
sockets that stay in the index, round robin after pullers leave, slow consumers."""

from __future__ import annotations

import asyncio
import base64
import gc
import itertools
import os
import tracemalloc
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect

from broker.jobstate import JobState

from .helpers import UNIT, RunningServer, running_server, until, until_async, wait_for
from .test_mercury import mercury, post, recv


def open_settings(**extra: object) -> dict[str, object]:
    return {"mercury_require_auth": False, "mercury_poll_interval": 0.1 * UNIT, **extra}


async def silent_socket(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client that completes the handshake and then never reads."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await wait_for(reader.readuntil(b"\r\n\r\n"))
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


# --- push with no puller ----------------------------------------------------------------------


async def test_push_before_any_puller_waits_durably(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with running_server(data, **open_settings()) as srv:
        # Mercury crashes here (no puller to send to); these must wait instead.
        assert (await post(srv, "/push/work", "first")).status_code == 200
        async with mercury(srv, "/push/work") as pusher:
            await pusher.send(b"\x00second")
        assert (await post(srv, "/push/work", "third")).status_code == 200
        async with mercury(srv, "/pull/work") as puller:
            assert [await recv(puller) for _ in range(3)] == ["first", b"\x00second", "third"]
        assert (await post(srv, "/push/work", "after a restart")).status_code == 200
    async with running_server(data, **open_settings()) as srv:
        async with mercury(srv, "/pull/work") as puller:
            assert await recv(puller) == "after a restart"

            async def all_done() -> bool:
                recs = await srv.broker.store.list_jobs(queue="mercury.push:work")
                return len(recs) == 4 and all(r.state is JobState.DONE for r in recs)

            await until_async(all_done)


# --- round robin when pullers leave -----------------------------------------------------------


def successor(ring: list[str], gone: set[str], name: str) -> str | None:
    """The next puller after ``name`` in connect order that is still there."""
    i = ring.index(name)
    for step in range(1, len(ring) + 1):
        candidate = ring[(i + step) % len(ring)]
        if candidate not in gone:
            return candidate
    return None


class RoundRobin:
    """Pullers A, B, C on one topic; leaving in ``order`` after ``before`` messages."""

    ring = ("A", "B", "C")

    def __init__(self, srv: RunningServer, topic: str) -> None:
        self.srv = srv
        self.topic = topic
        self.pullers: dict[str, ClientConnection] = {}
        self.gone: set[str] = set()
        self.expected: str | None = "A"
        self.sent = 0

    async def push_and_check(self) -> None:
        expected = self.expected
        assert expected is not None
        message = f"{self.topic}-{self.sent}"
        self.sent += 1
        assert (await post(self.srv, f"/push/{self.topic}", message)).status_code == 200
        assert await recv(self.pullers[expected]) == message, (self.topic, expected)
        self.expected = successor(list(self.ring), self.gone, expected)

    def attached(self) -> bool:
        pool = self.srv.broker.mercury.pools.get(self.topic)
        return (len(pool.pullers) if pool else 0) == 3 - len(self.gone)

    async def run(self, order: tuple[str, ...], before: int, abort: bool) -> None:
        async with (
            mercury(self.srv, f"/pull/{self.topic}") as a,
            mercury(self.srv, f"/pull/{self.topic}") as b,
            mercury(self.srv, f"/pull/{self.topic}") as c,
        ):
            self.pullers = {"A": a, "B": b, "C": c}
            for _ in range(before):
                await self.push_and_check()
            for leaving in order:
                ws = self.pullers[leaving]
                if abort:
                    ws.transport.abort()  # a dead socket, not a clean close
                else:
                    await ws.close()
                self.gone.add(leaving)
                if self.expected == leaving:
                    self.expected = successor(list(self.ring), self.gone, leaving)
                await until(self.attached)
                for _ in range(2 * (3 - len(self.gone))):
                    await self.push_and_check()
        await until(lambda: self.topic not in self.srv.broker.mercury.pools)


@pytest.mark.parametrize("before", [0, 1, 2])
async def test_round_robin_survives_pullers_leaving_in_every_order(
    tmp_path: Path, before: int
) -> None:
    async with running_server(tmp_path / "data", **open_settings()) as srv:
        for n, order in enumerate(itertools.permutations(RoundRobin.ring)):
            await RoundRobin(srv, f"rr{n}").run(order, before, abort=bool(n % 2))


async def read_frames(reader: asyncio.StreamReader, out: list[str]) -> None:
    """Collect the text frames a server sends (unmasked, RFC 6455 section 5.2)."""
    while True:
        head = await reader.readexactly(2)
        size = head[1] & 0x7F
        if size == 126:
            size = int.from_bytes(await reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await reader.readexactly(8), "big")
        payload = await reader.readexactly(size)
        if head[0] & 0x0F == 0x1:
            out.append(payload.decode())


async def test_a_puller_that_stops_reading_holds_back_only_its_buffer(tmp_path: Path) -> None:
    limit = 64 * 1024
    total = 300
    async with running_server(tmp_path / "data", **open_settings(max_buffer_bytes=limit)) as srv:
        pools = srv.broker.mercury.pools
        slow_reader, slow_writer = await silent_socket(srv.port, "/pull/big")
        await until(lambda: "big" in pools and len(pools["big"].pullers) == 1)
        slow = pools["big"].pullers[0]
        fast_got: list[str] = []
        slow_got: list[str] = []
        async with mercury(srv, "/pull/big") as fast, mercury(srv, "/push/big") as pusher:

            async def read_fast() -> None:
                while True:
                    message = await fast.recv()
                    assert isinstance(message, str)
                    fast_got.append(message[:4])

            fast_task = asyncio.create_task(read_fast())
            await until(lambda: len(pools["big"].pullers) == 2)
            for n in range(total):
                await pusher.send(f"{n:04d}".ljust(32 * 1024, "."))

            async def all_but_the_stuck_ones_done() -> bool:
                recs = await srv.broker.store.list_jobs(queue="mercury.push:big", limit=1000)
                done = sum(r.state is JobState.DONE for r in recs)
                stuck = len(slow.outbox)  # type: ignore[attr-defined]
                return len(recs) == total and done + stuck == total

            # The puller that stopped reading holds at most its buffer; the other one got all
            # the rest and was never closed.
            await until_async(all_but_the_stuck_ones_done, 20)
            assert slow.queued <= limit  # type: ignore[attr-defined]
            assert len(pools["big"].pullers) == 2
            assert srv.broker.metrics.slow_consumer_closes == 0
            # It reads again: its messages come out, each message went to exactly one puller.
            slow_task = asyncio.create_task(read_frames(slow_reader, slow_got))
            await until(lambda: len(fast_got) + len(slow_got) == total, 20)
            fast_task.cancel()
            slow_task.cancel()
            await asyncio.gather(fast_task, slow_task, return_exceptions=True)
        slow_writer.close()
        assert sorted(fast_got + [m[:4] for m in slow_got]) == [f"{n:04d}" for n in range(total)]
        assert fast_got == sorted(fast_got)  # in order


# --- connection churn -------------------------------------------------------------------------


async def test_subscribers_that_connect_and_drop_leave_nothing_behind(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", **open_settings()) as srv:
        broker = srv.broker
        merc = broker.mercury
        conns = srv.server.server_state.connections
        topics = [f"churn/{i}" for i in range(10)]
        for topic in topics:  # history windows full: kept history does not grow any more
            for _ in range(broker.settings.history_size):
                broker.publish(topic, "x" * 64)
        running = asyncio.Event()
        running.set()
        stop = False

        async def publisher() -> None:
            while not stop:
                await running.wait()
                for topic in topics:
                    broker.publish(topic, "x" * 64)
                await asyncio.sleep(0.05 * UNIT)  # pace: about 200 messages a second

        def sizes() -> tuple[int, ...]:
            return (
                len(broker.hub.index),
                len(merc.clients),
                len(merc.subs),
                len(conns),
                len(broker.connections),
            )

        async def churn(count: int) -> None:
            clients: list[ClientConnection] = []
            for start in range(0, count, 50):
                clients += await asyncio.gather(
                    *(
                        connect(
                            f"ws://127.0.0.1:{srv.port}/sub/churn/{i % 10}",
                            open_timeout=10 * UNIT,
                            max_queue=None,
                        )
                        for i in range(start, start + 50)
                    )
                )
            await until(lambda: len(merc.clients) == count)
            for ws in clients:  # every subscriber receives while publishing goes on
                assert await recv(ws, 10) == "x" * 64
            for i, ws in enumerate(clients):
                if i % 2:
                    ws.transport.abort()  # dead sockets, as in Mercury's leak
                else:
                    await ws.close()
            await until(lambda: sizes() == baseline_sizes, 20)

        baseline_sizes = sizes()
        task = asyncio.create_task(publisher())
        try:
            await churn(300)  # warm-up: first-use allocations of every code path
            running.clear()
            gc.collect()
            # Only what is allocated from here on is traced: what survives is growth.
            tracemalloc.start()
            baseline_memory = tracemalloc.get_traced_memory()[0]
            running.set()
            await churn(300)
            running.clear()
            await until(lambda: sizes() == baseline_sizes)
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - baseline_memory
        finally:
            tracemalloc.stop()
            stop = True
            running.set()
            await task
        print(f"\nmemory growth after 300 subscribers came and went: {growth / 1024:.1f} KiB")
        assert sizes() == baseline_sizes
        assert growth < 512 * 1024, f"{growth} bytes left behind by 300 closed subscribers"


async def test_a_slow_subscriber_is_closed_and_the_others_keep_up(tmp_path: Path) -> None:
    async with running_server(
        tmp_path / "data", **open_settings(max_buffer_bytes=256 * 1024)
    ) as srv:
        merc = srv.broker.mercury
        _, slow_writer = await silent_socket(srv.port, "/sub/feed")
        async with mercury(srv, "/sub/feed") as fast:
            await until(lambda: len(merc.clients) == 2)
            index_with_both = len(srv.broker.hub.index)
            blob = "y" * (64 * 1024)
            n = 0
            while len(merc.clients) == 2:
                assert n < 2000, "the slow subscriber was never closed"
                srv.broker.publish("feed", f"{n:05d}{blob}")
                message = await recv(fast)
                assert isinstance(message, str) and message[:5] == f"{n:05d}"
                n += 1
            assert srv.broker.metrics.slow_consumer_closes == 1
            assert len(srv.broker.hub.index) == index_with_both  # one tap for the topic
            srv.broker.publish("feed", "still here")
            assert await recv(fast) == "still here"
        slow_writer.close()
        await until(lambda: len(merc.subs) == 0 and len(srv.broker.hub.index) == 0)
