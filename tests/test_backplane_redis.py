"""The Redis backplane on a real Redis: several backplanes in one process act as nodes.

Each test uses a key and channel prefix of its own (deleted afterwards), so tests never see each
other's topics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest

from broker.backplane.base import Envelope
from protocol.errors import Unavailable, UsageError

from .helpers import UNIT, until, wait_for
from .services import redis_prefix

pytest.importorskip("redis", reason="the redis extra (redis-py) is not installed")

from redis.asyncio import Redis

from broker.backplane.redis import RedisBackplane


class Node:
    """One backplane and what it delivered."""

    def __init__(self, backplane: RedisBackplane) -> None:
        self.bp = backplane
        self.got: list[Envelope] = []

    def offsets(self, topic: str) -> list[int]:
        return [e.offset for e in self.got if e.topic == topic]


@asynccontextmanager
async def cluster(count: int, **kwargs: Any) -> AsyncIterator[tuple[list[Node], Redis]]:
    async with redis_prefix() as (url, prefix), AsyncExitStack() as stack:
        nodes = []
        for _ in range(count):
            node = Node(RedisBackplane(url, prefix=prefix, timeout=5 * UNIT, **kwargs))
            await node.bp.start(node.got.append)
            stack.push_async_callback(node.bp.close)
            nodes.append(node)
        client = Redis.from_url(url)
        stack.push_async_callback(client.aclose)
        yield nodes, client


def n_of(env: Envelope) -> Any:
    assert isinstance(env.data, dict)
    return env.data["n"]


async def publish(node: Node, topic: str, count: int, tag: str = "") -> list[Envelope]:
    return list(
        await asyncio.gather(
            *(node.bp.submit(topic, time.time(), {"n": n, "tag": tag}) for n in range(count))
        )
    )


async def test_messages_reach_every_holding_node_once_in_offset_order() -> None:
    async with cluster(3) as ((a, b, c), _):
        # Overlapping subscriptions on A: each message must still be delivered once.
        for pattern in ("chat/room", "chat/*", "chat/**", "**"):
            await wait_for(a.bp.hold(pattern))
        await wait_for(b.bp.hold("chat/room"))
        sent_b, sent_c = await asyncio.gather(
            publish(b, "chat/room", 100, "b"), publish(c, "chat/room", 100, "c")
        )
        offsets = sorted(e.offset for e in sent_b + sent_c)
        assert offsets == list(range(1, 201)), "offsets from two nodes are gap-free"
        await until(lambda: len(a.got) >= 200 and len(b.got) >= 200)
        for node in (a, b):
            assert node.offsets("chat/room") == list(range(1, 201))
            assert len({e.epoch for e in node.got}) == 1
        assert a.bp.duplicates == 3 * 200, "three extra copies per message were dropped"
        # Each node's own submissions keep their order.
        assert [n_of(e) for e in sorted(sent_b, key=lambda e: e.offset)] == list(range(100))
        assert c.got == [], "a node holding nothing receives nothing"


async def test_only_held_patterns_are_subscribed_in_redis() -> None:
    async with cluster(2) as ((a, b), client):
        prefix = a.bp.prefix
        await wait_for(a.bp.hold("news/sport"))
        await wait_for(a.bp.hold("feed/*/items"))
        counts = dict(await client.pubsub_numsub(f"{prefix}:m:news/sport", f"{prefix}:m:x"))
        assert counts == {f"{prefix}:m:news/sport".encode(): 1, f"{prefix}:m:x".encode(): 0}
        await publish(b, "feed/1/items", 1)
        await publish(b, "other/topic", 1)
        await publish(b, "news/sport", 1)
        await until(lambda: len(a.got) == 2)
        assert [e.topic for e in a.got] == ["feed/1/items", "news/sport"]
        # Released, then held again before and after Redis confirmed the release.
        a.bp.release("feed/*/items")
        a.bp.release("news/sport")
        await until_numsub(client, f"{prefix}:m:news/sport", 0)
        await wait_for(a.bp.hold("news/sport"))
        a.bp.release("news/sport")
        await wait_for(a.bp.hold("news/sport"))
        await publish(b, "feed/1/items", 1)
        await publish(b, "news/sport", 1)
        await until(lambda: len(a.got) == 3)
        assert [e.topic for e in a.got][2:] == ["news/sport"]


async def until_numsub(client: Redis, channel: str, count: int) -> None:
    async def check() -> bool:
        return dict(await client.pubsub_numsub(channel))[channel.encode()] == count

    deadline = time.monotonic() + 5 * UNIT
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{channel} never had {count} subscribers")
        await asyncio.sleep(0.01)


async def test_history_window_recent_and_barrier() -> None:
    async with cluster(2, history_window=5) as ((a, b), _):
        fresh = await a.bp.recent("t", 0)
        assert (fresh.offset, fresh.entries, fresh.fresh) == (0, (), True)
        sent = await publish(b, "t", 8)
        assert {e.epoch for e in sent} == {fresh.epoch}, "the epoch created by the read holds"
        hist = await a.bp.recent("t", 2)
        assert (hist.epoch, hist.offset, hist.fresh) == (fresh.epoch, 8, False)
        assert [e.offset for e in hist.entries] == [4, 5, 6, 7, 8], "trimmed to the window"
        assert [n_of(e) for e in hist.entries] == [3, 4, 5, 6, 7]
        assert [e.offset for e in (await a.bp.recent("t", 6)).entries] == [7, 8]
        assert (await a.bp.recent("t", 8)).entries == ()
        assert (await a.bp.recent("t", None)).entries == ()


async def test_recent_meets_the_live_stream_without_gap_or_duplicate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with cluster(2) as ((a, b), _):
        # A slow subscription link (a busy node, a long route): messages are handled 5 ms
        # after they arrive, in order, so the history read's answer overtakes them.
        loop = asyncio.get_running_loop()
        handle = a.bp._on_pubsub
        monkeypatch.setattr(a.bp, "_on_pubsub", lambda m: loop.call_later(0.005, handle, m))
        stop = asyncio.Event()

        async def keep_publishing() -> None:
            while not stop.is_set():
                await publish(b, "busy", 50)

        publisher = asyncio.create_task(keep_publishing())
        try:
            for _ in range(20):
                await wait_for(a.bp.hold("busy"))
                seen: list[Envelope] = []
                done = a.bp.observe("busy", seen.append)
                hist = await a.bp.recent("busy", None)
                done()
                # Everything up to the head read has arrived: what came after the
                # subscription and up to the head is in ``seen`` with no hole.
                upto = [e.offset for e in seen if e.offset <= hist.offset]
                if upto:
                    assert upto == list(range(upto[0], hist.offset + 1))
                after = [e.offset for e in seen if e.offset > hist.offset]
                assert after == list(range(hist.offset + 1, hist.offset + 1 + len(after)))
                a.bp.release("busy")
        finally:
            stop.set()
            await publisher


async def test_a_lost_history_starts_a_new_epoch() -> None:
    async with cluster(1) as ((a,), client):
        first = await publish(a, "t", 3)
        await client.delete(a.bp._head_key("t"))
        again = await publish(a, "t", 1)
        assert again[0].offset == 1
        assert again[0].epoch != first[0].epoch
        assert (await a.bp.recent("t", 0)).entries == tuple(again)


async def test_the_subscription_link_reconnects_and_resubscribes() -> None:
    async with cluster(2) as ((a, b), client):
        await wait_for(a.bp.hold("t"))
        await wait_for(a.bp.hold("p/*"))
        await publish(b, "t", 1)
        await until(lambda: len(a.got) == 1)
        old = await link_id(client, a.bp, "sub")
        assert await client.client_kill_filter(_id=old) == 1

        async def resubscribed() -> bool:
            # A new link, subscribed again to what the node holds.
            counts = dict(await client.pubsub_numsub(f"{a.bp.prefix}:m:t"))
            new = await link_id(client, a.bp, "sub", missing_ok=True)
            return new not in (None, old) and counts[f"{a.bp.prefix}:m:t".encode()] == 1

        deadline = time.monotonic() + 5 * UNIT
        while not await resubscribed():
            assert time.monotonic() < deadline, "the link was not re-established"
            await asyncio.sleep(0.01)
        await publish(b, "t", 1)
        await publish(b, "p/x", 1)
        await until(lambda: len(a.got) == 3)
        assert [(e.topic, e.offset) for e in a.got] == [("t", 1), ("t", 2), ("p/x", 1)]


async def link_id(
    client: Redis, bp: RedisBackplane, kind: str, missing_ok: bool = False
) -> str | None:
    name = f"quicksilver:{bp.prefix}:{bp.node}:{kind}"
    for entry in await client.client_list():
        if entry.get("name") == name:
            return str(entry["id"])
    if missing_ok:
        return None
    raise AssertionError(f"no client named {name}")


async def test_the_command_link_reconnects_and_lost_scripts_are_reloaded() -> None:
    async with cluster(1) as ((a,), client):
        await publish(a, "t", 1)
        await client.client_kill_filter(_id=await link_id(client, a.bp, "cmd"))
        # The first round trip after the kill may fail (the publisher gets unavailable);
        # the link reconnects and the next ones succeed.
        for _ in range(3):
            try:
                (env,) = await publish(a, "t", 1)
                break
            except Unavailable:
                continue
        else:
            pytest.fail("the command link did not recover")
        await client.script_flush()
        (after,) = await publish(a, "t", 1)
        assert after.offset == env.offset + 1


async def test_bounds_and_bad_input() -> None:
    async with cluster(1, backlog_max=3) as ((a,), _):
        futures = [a.bp.submit("t", time.time(), n) for n in range(3)]
        with pytest.raises(Unavailable):
            a.bp.submit("t", time.time(), 4)
        assert a.bp.failures == 1
        await asyncio.gather(*futures)
        with pytest.raises(UsageError):
            a.bp.submit("t", time.time(), {1, 2})
        assert (await a.bp.submit("t", time.time(), "fine")).offset == 4
    with pytest.raises(UsageError):
        RedisBackplane("http://127.0.0.1:6379/0")
    with pytest.raises(UsageError):
        RedisBackplane("redis://127.0.0.1:6379/0", prefix="has space")


async def test_an_unreachable_redis_fails_the_start() -> None:
    bp = RedisBackplane("redis://127.0.0.1:1/0", timeout=1 * UNIT)
    with pytest.raises(Unavailable):
        await bp.start(lambda env: None)
    with pytest.raises(Unavailable):
        bp.submit("t", time.time(), 1)
