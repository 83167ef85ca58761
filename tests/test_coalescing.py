"""The fan-out fast path over real sockets: frames queued for a connection in one turn of the
loop go out in one write, in order, whole, in either encoding; a connection that died under a
burst costs the others nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.connection import Connection

from .helpers import RunningServer, raw_client, running_server, until

BURST = 1000


def server_side(srv: RunningServer) -> list[Connection]:
    return [c for c in srv.broker.connections if isinstance(c, Connection)]


def count_writes(conn: Connection) -> list[int]:
    """Wrap ``conn``'s transport so each write's size is recorded; returns the record."""
    sizes: list[int] = []
    transport: Any = conn.transport
    write: Callable[[bytes], None] = transport.write

    def counted(data: bytes) -> None:
        sizes.append(len(data))
        write(data)

    transport.write = counted
    return sizes


async def test_a_burst_in_one_turn_goes_out_in_one_write_in_order(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path / "d") as srv,
        raw_client(srv.ws_url) as as_json,
        raw_client(srv.ws_url, encoding="msgpack") as as_msgpack,
    ):
        for client in (as_json, as_msgpack):
            await client.request({"type": "subscribe", "topic": "burst/t"})
        conns = server_side(srv)
        assert len(conns) == 2
        writes = {id(c): count_writes(c) for c in conns}
        # One turn of the loop: nothing is written until the hub flushes.
        offsets = [srv.broker.publish("burst/t", {"n": n, "pad": "x" * 50}) for n in range(BURST)]
        assert all(not w for w in writes.values())
        assert offsets == list(range(offsets[0], offsets[0] + BURST))
        for client in (as_json, as_msgpack):
            got = [await client.expect("message") for _ in range(BURST)]
            assert [m["data"]["n"] for m in got] == list(range(BURST))
            assert [m["offset"] for m in got] == offsets
            assert {m["topic"] for m in got} == {"burst/t"}
        # 1,000 frames, one write each connection (each write holds all of them).
        for sizes in writes.values():
            assert len(sizes) == 1, sizes
            assert sizes[0] > BURST * 50


async def test_replies_and_messages_keep_their_order_on_one_connection(tmp_path: Path) -> None:
    async with running_server(tmp_path / "d") as srv, raw_client(srv.ws_url) as client:
        await client.request({"type": "subscribe", "topic": "echo/t"})
        # Pipelined: every publish is sent before any answer is read.
        for n in range(200):
            await client.send({"type": "publish", "id": n, "topic": "echo/t", "data": n})
        frames = [await client.recv() for _ in range(400)]
        messages = [f["data"] for f in frames if f["type"] == "message"]
        oks = [f["id"] for f in frames if f["type"] == "ok"]
        assert messages == list(range(200)) and oks == list(range(200))
        # Each message is queued before the ok of the publish that made it.
        position = {
            ("message", f.get("data")) if f["type"] == "message" else ("ok", f["id"]): i
            for i, f in enumerate(frames)
        }
        assert all(position[("message", n)] < position[("ok", n)] for n in range(200))


async def test_a_connection_that_died_under_a_burst_costs_the_others_nothing(
    tmp_path: Path,
) -> None:
    async with (
        running_server(tmp_path / "d") as srv,
        raw_client(srv.ws_url) as alive,
        raw_client(srv.ws_url) as doomed,
    ):
        for client in (alive, doomed):
            await client.request({"type": "subscribe", "topic": "burst/t"})
        doomed.ws.transport.abort()  # a reset the broker has not noticed yet
        for round_ in range(5):
            # One burst each round; the next starts once this one reached the live client, so
            # the broker has written it to both connections.
            for n in range(200):
                srv.broker.publish("burst/t", {"round": round_, "n": n})
            got = [await alive.expect("message") for _ in range(200)]
            assert [(m["data"]["round"], m["data"]["n"]) for m in got] == [
                (round_, n) for n in range(200)
            ]
        await until(lambda: len(srv.broker.connections) == 1, units=10)
        assert srv.broker.hub.index.match("burst/t") == {server_side(srv)[0]}
