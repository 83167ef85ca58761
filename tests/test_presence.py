"""Presence over real sockets: joins and leaves of two clients, counts by subject, the HTTP view,
and the admin topic listing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import Raw, RunningServer, http, raw_client, running_server, token, until

ALICE = token(sub="alice", roles=("subscriber",))
BOB = token(sub="bob", roles=("subscriber",))
ADMIN = token(sub="ops", roles=("admin",))


@pytest.fixture
async def presence_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with running_server(tmp_path / "d", presence_patterns=("chat/**",)) as running:
        yield running


async def event(watcher: Raw) -> dict[str, Any]:
    message = await watcher.expect("message")
    assert message["topic"] == "presence/chat/lobby"
    data: dict[str, Any] = message["data"]
    return data


async def presence_of(server: RunningServer, topic: str) -> dict[str, Any]:
    async with http(server, ADMIN) as client:
        response = await client.get(f"/api/v1/topics/{topic}/presence")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


async def test_joins_and_leaves_of_two_clients(presence_server: RunningServer) -> None:
    server = presence_server
    url = server.ws_url
    async with raw_client(url, ADMIN) as watcher:
        await watcher.request({"type": "subscribe", "topic": "presence/chat/lobby"})
        async with raw_client(url, ALICE) as alice:
            await alice.request({"type": "subscribe", "topic": "chat/lobby"})
            joined = await event(watcher)
            assert {k: joined[k] for k in ("event", "sub", "connections", "total")} == {
                "event": "join",
                "sub": "alice",
                "connections": 1,
                "total": 1,
            }
            assert joined["topic"] == "chat/lobby" and joined["session"]
            async with raw_client(url, BOB) as bob, raw_client(url, ALICE) as alice2:
                await bob.request({"type": "subscribe", "topic": "chat/lobby"})
                assert (await event(watcher))["sub"] == "bob"
                await alice2.request({"type": "subscribe", "topic": "chat/lobby"})
                again = await event(watcher)
                assert (again["sub"], again["connections"], again["total"]) == ("alice", 2, 3)
                # Subscribing twice is not a second join; a wildcard is no presence.
                await bob.request({"type": "subscribe", "topic": "chat/lobby"})
                await bob.request({"type": "subscribe", "topic": "chat/*"})
                assert await presence_of(server, "chat/lobby") == {
                    "topic": "chat/lobby",
                    "connections": 3,
                    "subjects": {"alice": 2, "bob": 1},
                    "anonymous": 0,
                }
                await alice2.request({"type": "unsubscribe", "topic": "chat/lobby"})
                left = await event(watcher)
                assert (left["event"], left["sub"], left["connections"]) == ("leave", "alice", 1)
            # bob and alice2 disconnected: only bob was still present.
            gone = await event(watcher)
            assert (gone["event"], gone["sub"], gone["connections"], gone["total"]) == (
                "leave",
                "bob",
                0,
                1,
            )
        gone = await event(watcher)
        assert (gone["sub"], gone["total"]) == ("alice", 0)
        await watcher.send({"type": "ping", "id": "end"})
        assert (await watcher.recv())["type"] == "pong"
    assert (await presence_of(server, "chat/lobby"))["connections"] == 0


async def test_anonymous_and_untracked_topics(tmp_path: Path) -> None:
    async with running_server(
        tmp_path / "d", presence_patterns=("reports/**",), public_patterns=("reports/**",)
    ) as server:
        async with raw_client(server.ws_url, None) as anonymous:
            await anonymous.request({"type": "subscribe", "topic": "reports/x"})
            view = await presence_of(server, "reports/x")
            assert (view["connections"], view["anonymous"], view["subjects"]) == (1, 1, {})
        await until(lambda: not server.broker.connections)
        assert (await presence_of(server, "reports/x"))["connections"] == 0
        async with http(server, ADMIN) as client:
            response = await client.get("/api/v1/topics/chat/lobby/presence")
            assert response.status_code == 404
        async with http(server, ALICE) as client:
            response = await client.get("/api/v1/topics/reports/x/presence")
            assert response.status_code == 200
        nosy = token(sub="n", roles=(), subscribe=["reports/**"])
        async with http(server, nosy) as client:
            response = await client.get("/api/v1/topics/reports/x/presence")
            assert response.status_code == 403


async def test_admin_topic_listing(presence_server: RunningServer) -> None:
    server = presence_server
    async with raw_client(server.ws_url, ALICE) as a, raw_client(server.ws_url, BOB) as b:
        await a.request({"type": "subscribe", "topic": "chat/lobby"})
        await b.request({"type": "subscribe", "topic": "chat/*"})
        async with raw_client(server.ws_url, ADMIN) as pub:
            for n in range(5):
                await pub.request({"type": "publish", "topic": "chat/lobby", "data": n})
            await pub.request({"type": "publish", "topic": "news", "data": 1})
        async with http(server, ADMIN) as client:
            body = (await client.get("/api/v1/topics", params={"pattern": "chat/**"})).json()
            (lobby,) = [t for t in body["topics"] if t["topic"] == "chat/lobby"]
            assert (lobby["subscribers"], lobby["offset"], lobby["presence"]) == (2, 5, 1)
            assert lobby["persisted"] is False and isinstance(lobby["rate"], float)
            assert all(t["topic"].startswith("chat/") for t in body["topics"])
            assert body["patterns"] == [{"pattern": "chat/*", "subscribers": 1}]
            everything = (await client.get("/api/v1/topics")).json()
            assert {"chat/lobby", "news", "presence/chat/lobby"} <= {
                t["topic"] for t in everything["topics"]
            }
            assert (await client.get("/api/v1/topics?pattern=a/**/b")).status_code == 400
        async with http(server, ALICE) as client:
            assert (await client.get("/api/v1/topics")).status_code == 403


async def test_a_refresh_that_drops_a_subscription_announces_the_leave(
    presence_server: RunningServer,
) -> None:
    url = presence_server.ws_url
    wide = token(sub="carol", roles=("subscriber",), subscribe=["chat/**"])
    narrow = token(sub="carol", roles=("subscriber",), subscribe=["chat/other"])
    async with raw_client(url, ADMIN) as watcher, raw_client(url, wide) as carol:
        await watcher.request({"type": "subscribe", "topic": "presence/chat/lobby"})
        await carol.request({"type": "subscribe", "topic": "chat/lobby"})
        assert (await event(watcher))["event"] == "join"
        answer = await carol.request({"type": "refresh", "token": narrow})
        assert answer["dropped"] == ["chat/lobby"]
        left = await event(watcher)
        assert (left["event"], left["sub"], left["total"]) == ("leave", "carol", 0)
        assert (await presence_of(presence_server, "chat/lobby"))["connections"] == 0
