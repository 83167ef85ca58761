"""Mercury's routes, scenario by scenario as Mercury's own tests run them (t/bus.t, t/pubsub.t,
t/pushpull.t, t/allow_origin.t), plus auth, payload fidelity and traffic with native clients.

Mercury clients here are plain WebSocket clients; the server is a real broker on a real socket.
Where a test must show that a message did NOT arrive, it sends a later marker that must arrive
first: on one connection messages keep their order.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from broker.mercury_origin import MercuryOrigins
from broker.mercury_payload import from_body, from_data, to_data

from .helpers import UNIT, RunningServer, raw_client, running_server, token, until, wait_for

Payload = str | bytes


@pytest.fixture
async def open_srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """A broker with Mercury's own (open) behaviour: no token needed on Mercury routes."""
    async with running_server(
        tmp_path / "data", mercury_require_auth=False, mercury_poll_interval=0.1 * UNIT
    ) as srv:
        yield srv


@pytest.fixture
async def auth_srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    """The default: Mercury routes need a token except for public reads."""
    async with running_server(tmp_path / "data") as srv:
        yield srv


@asynccontextmanager
async def mercury(
    srv: RunningServer, path: str, headers: dict[str, str] | None = None
) -> AsyncIterator[ClientConnection]:
    """A Mercury client: a bare WebSocket on ``path`` (e.g. ``/sub/foo``)."""
    async with connect(
        f"ws://127.0.0.1:{srv.port}{path}",
        additional_headers=headers,
        open_timeout=5 * UNIT,
        max_size=None,
    ) as ws:
        yield ws


async def recv(ws: ClientConnection, units: float = 5.0) -> Payload:
    message: Payload = await wait_for(ws.recv(), units)
    return message


async def post(
    srv: RunningServer,
    path: str,
    body: bytes | str,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=10 * UNIT) as h:
        return await h.post(path, content=body, headers=headers)


async def status_of_handshake(srv: RunningServer, path: str, headers: dict[str, str]) -> int:
    """The HTTP status of a WebSocket handshake (101 when it was accepted)."""
    try:
        async with mercury(srv, path, headers):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


# --- t/bus.t ----------------------------------------------------------------------------------


async def test_bus_peers_get_each_others_messages(open_srv: RunningServer) -> None:
    async with (
        mercury(open_srv, "/bus/foo") as p0,
        mercury(open_srv, "/bus/foo") as p1,
        mercury(open_srv, "/bus/foo") as p2,
        mercury(open_srv, "/bus/foo?echo=1") as p3,
        mercury(open_srv, "/bus/bar") as stranger,
    ):
        peers = [p0, p1, p2, p3]
        await p0.send("Hello 0")
        for i in (1, 2, 3):
            assert await recv(peers[i]) == "Hello 0"
        await p2.send("Hello 2")
        for i in (0, 1, 3):
            assert await recv(peers[i]) == "Hello 2"
        # Peer 3 asked for echo: it gets its own message too. Had peers 0 or 2 got their own,
        # they would read it here instead of "Hello 3".
        await p3.send("Hello 3")
        for peer in peers:
            assert await recv(peer) == "Hello 3"
        reply = await post(open_srv, "/bus/foo", "Hello 4")
        assert reply.status_code == 200 and reply.content == b""
        for peer in peers:
            assert await recv(peer) == "Hello 4"
        # The stranger on another bus got none of it: its first message is this one.
        assert (await post(open_srv, "/bus/bar", "marker")).status_code == 200
        assert await recv(stranger) == "marker"


# --- t/pubsub.t -------------------------------------------------------------------------------


async def test_pubsub_exact_topic(open_srv: RunningServer) -> None:
    async with (
        mercury(open_srv, "/pub/foo") as pub,
        mercury(open_srv, "/sub/foo") as sub1,
        mercury(open_srv, "/sub/foo") as sub2,
    ):
        await pub.send("Hello")
        for sub in (sub1, sub2):
            assert await recv(sub) == "Hello"


async def test_pubsub_topic_hierarchy(open_srv: RunningServer) -> None:
    async with (
        mercury(open_srv, "/sub/foo") as parent,
        mercury(open_srv, "/sub/foo/bar") as child,
        mercury(open_srv, "/sub/foo/bar/baz") as grandchild,
        mercury(open_srv, "/sub/foobar") as lookalike,
    ):
        async with mercury(open_srv, "/pub/foo/bar") as pub:
            await pub.send("Hello")
            for sub in (parent, child):
                assert await recv(sub) == "Hello"
        reply = await post(open_srv, "/pub/foo/bar", "Hello Post Child")
        assert reply.status_code == 200 and reply.content == b""
        for sub in (parent, child):
            assert await recv(sub) == "Hello Post Child"
        async with mercury(open_srv, "/pub/foo") as pub:
            await pub.send("Hello Parent")
            assert await recv(parent) == "Hello Parent"
        assert (await post(open_srv, "/pub/foo", "Hello Post Parent")).status_code == 200
        assert await recv(parent) == "Hello Post Parent"
        # Deeper topics cascade up to every ancestor, whole segments only.
        assert (await post(open_srv, "/pub/foo/bar/baz", "deep")).status_code == 200
        for sub in (parent, child, grandchild):
            assert await recv(sub) == "deep"
        assert (await post(open_srv, "/pub/foobar", "other")).status_code == 200
        assert await recv(lookalike) == "other"
        # None of the parent-level messages reached the child, none of foo/bar the grandchild,
        # and nothing of foo... the look-alike: their next message is each one's marker.
        for topic, sub in (("foo/bar", child), ("foo/bar/baz", grandchild), ("foobar", lookalike)):
            assert (await post(open_srv, f"/pub/{topic}", f"marker {topic}")).status_code == 200
            assert await recv(sub) == f"marker {topic}"
        # The parent got every marker but foobar's, in order.
        assert [await recv(parent) for _ in range(2)] == ["marker foo/bar", "marker foo/bar/baz"]


# --- t/pushpull.t -----------------------------------------------------------------------------


async def test_pushpull_round_robin(open_srv: RunningServer) -> None:
    async with (
        mercury(open_srv, "/pull/foo") as pull0,
        mercury(open_srv, "/pull/foo") as pull1,
        mercury(open_srv, "/pull/bar") as stranger,
        mercury(open_srv, "/push/foo") as push,
    ):
        await push.send("Hello 1")
        assert await recv(pull0) == "Hello 1"
        await push.send("Hello 2")
        assert await recv(pull1) == "Hello 2"
        await push.send("Hello 3")
        assert await recv(pull0) == "Hello 3"
        await pull1.close()
        await until(lambda: len(open_srv.broker.mercury.pools["foo"].pullers) == 1)
        await push.send("Hello 4")
        assert await recv(pull0) == "Hello 4"
        async with mercury(open_srv, "/pull/foo") as pull2:
            await push.send("Hello 5")
            assert await recv(pull0) == "Hello 5"
            await push.send("Hello 6")
            assert await recv(pull2) == "Hello 6"
            await pull0.close()
        await until(lambda: "foo" not in open_srv.broker.mercury.pools)
        async with mercury(open_srv, "/pull/foo") as pull3:
            await push.send("Hello 7")
            assert await recv(pull3) == "Hello 7"
            reply = await post(open_srv, "/push/foo", "Hello Push")
            assert reply.status_code == 200 and reply.content == b""
            assert await recv(pull3) == "Hello Push"
        assert (await post(open_srv, "/push/bar", "marker")).status_code == 200
        assert await recv(stranger) == "marker"


async def test_pushpull_each_message_goes_to_exactly_one_puller(open_srv: RunningServer) -> None:
    async with (
        mercury(open_srv, "/pull/jobs") as a,
        mercury(open_srv, "/pull/jobs") as b,
        mercury(open_srv, "/pull/jobs") as c,
        mercury(open_srv, "/push/jobs") as push,
    ):
        for n in range(30):
            await push.send(f"m{n}")
        got = {
            name: [await recv(ws) for _ in range(10)] for name, ws in (("a", a), ("b", b), ("c", c))
        }
        assert got["a"] == [f"m{n}" for n in range(0, 30, 3)]
        assert got["b"] == [f"m{n}" for n in range(1, 30, 3)]
        assert got["c"] == [f"m{n}" for n in range(2, 30, 3)]


# --- t/allow_origin.t -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/bus", "/sub", "/pub", "/push", "/pull"])
async def test_allow_origin(tmp_path: Path, path: str) -> None:
    async with running_server(
        tmp_path / "data", mercury_require_auth=False, mercury_allow_origin=("example.com",)
    ) as srv:
        assert (
            await status_of_handshake(srv, f"{path}/fry", {"Origin": "http://example.com"}) == 101
        )
        assert (
            await status_of_handshake(srv, f"{path}/leela", {"Origin": "http://example.net"}) == 401
        )
        assert await status_of_handshake(srv, f"{path}/bender", {}) == 401
        # A program without Origin is let in when it brings a token.
        bearer = {"Authorization": f"Bearer {token()}"}
        assert await status_of_handshake(srv, f"{path}/zoidberg", bearer) == 101


def test_allow_origin_entries_as_documented() -> None:
    origin = "http://www.example.com:3000"
    for entry in (
        "example.com",
        "*.example.com",
        "*://www.example.com",
        "http://www.example.com:*",
    ):
        assert MercuryOrigins([entry]).allows(origin), entry
    single = MercuryOrigins(["example.com"])
    assert single.allows("https://example.com")
    assert not single.allows("http://example.com.attacker.net")
    assert not single.allows("http://badexample.com")
    assert not single.allows(None)
    assert not single.allows("not an origin")
    assert MercuryOrigins(["http://localhost:3000"]).allows("http://localhost:3000")
    assert not MercuryOrigins(["http://localhost:3000"]).allows("http://localhost:4000")
    assert not MercuryOrigins(["https://*.example.com"]).allows("http://www.example.com")
    assert MercuryOrigins(["*"]).allows("null")


async def test_refusals_are_json_with_the_right_status(open_srv: RunningServer) -> None:
    reply = await post(open_srv, "/pub/bad//topic", "x")
    assert reply.status_code == 400 and reply.json()["errors"][0]["message"]
    assert await status_of_handshake(open_srv, "/sub/bad%20topic", {}) == 400
    big = "x" * (open_srv.broker.settings.max_frame_bytes + 1)
    assert (await post(open_srv, "/pub/foo", big)).status_code == 413
    async with httpx.AsyncClient(base_url=open_srv.http_url, timeout=10 * UNIT) as h:
        assert (await h.post("/sub/foo", content="x")).status_code in (404, 405)


async def test_routes_can_be_turned_off(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", mercury=False) as srv:
        assert (
            await post(srv, "/pub/foo", "x", {"Authorization": f"Bearer {token()}"})
        ).status_code == 404
        assert await status_of_handshake(srv, "/sub/foo", {}) == 404


# --- payloads ---------------------------------------------------------------------------------

TEXTS: list[Payload] = [
    "Grüße, 世界 🎉",
    "",
    " spaces and\nnewlines\t",
    '{"looks": "like json"}',
    "\u0000nul",
]
BLOBS: list[Payload] = [b"\x00\x01\xfe\xff", bytes(range(256)) * 40, b"\xc3\x28 invalid utf-8", b""]


async def test_payloads_pass_through_unchanged(open_srv: RunningServer) -> None:
    async with (
        mercury(open_srv, "/sub/data") as sub,
        mercury(open_srv, "/pub/data") as pub,
        mercury(open_srv, "/bus/data") as peer_a,
        mercury(open_srv, "/bus/data") as peer_b,
        mercury(open_srv, "/pull/data") as puller,
        mercury(open_srv, "/push/data") as pusher,
    ):
        for payload in [*TEXTS, *BLOBS]:
            await pub.send(payload)
            got = await recv(sub)
            assert type(got) is type(payload) and got == payload
            await peer_a.send(payload)
            got = await recv(peer_b)
            assert type(got) is type(payload) and got == payload
            await pusher.send(payload)
            got = await recv(puller)
            assert type(got) is type(payload) and got == payload


async def test_posted_bodies_keep_text_and_binary_apart(open_srv: RunningServer) -> None:
    async with mercury(open_srv, "/sub/posted") as sub:
        assert (await post(open_srv, "/pub/posted", "Grüße 🎉".encode())).status_code == 200
        assert await recv(sub) == "Grüße 🎉"
        assert (await post(open_srv, "/pub/posted", b"\xff\xfe\x00")).status_code == 200
        assert await recv(sub) == b"\xff\xfe\x00"
        octets = {"Content-Type": "application/octet-stream"}
        assert (await post(open_srv, "/pub/posted", b"plain ascii", octets)).status_code == 200
        assert await recv(sub) == b"plain ascii"


def test_payload_mapping_round_trips() -> None:
    for payload in [*TEXTS, *BLOBS]:
        assert from_data(to_data(payload)) == payload
        assert type(from_data(to_data(payload))) is type(payload)
    assert to_data(b"\x00\xff") == {"base64": "AP8="}
    assert from_data({"a": [1, "é"]}) == '{"a":[1,"é"]}'
    assert from_data(None) == "null"
    assert from_data({"base64": "not base64!"}) == '{"base64":"not base64!"}'
    assert from_data({"base64": "AP8=", "other": 1}) == '{"base64":"AP8=","other":1}'
    assert from_body(b"\xe2\x82\xac", "text/plain; charset=utf-8") == "€"
    assert from_body(b"\xe2\x82\xac", "application/octet-stream; x=1") == b"\xe2\x82\xac"


# --- one system with native traffic ------------------------------------------------------------


async def test_native_subscriber_sees_mercury_messages(auth_srv: RunningServer) -> None:
    publisher = token(sub="backend", roles=("publisher",))
    async with raw_client(auth_srv.ws_url) as native:
        assert (await native.request({"type": "subscribe", "topic": "upload/dist/Foo"}))[
            "type"
        ] == "ok"
        bearer = {"Authorization": f"Bearer {publisher}"}
        reply = await post(auth_srv, "/pub/upload/dist/Foo", '{"version":"1.0"}', bearer)
        assert reply.status_code == 200
        message = await native.expect("message")
        assert message["topic"] == "upload/dist/Foo" and message["offset"] == 1
        assert message["data"] == '{"version":"1.0"}'
        async with mercury(auth_srv, f"/pub/upload/dist/Foo?token={publisher}") as pub:
            await pub.send(b"\x00\x01")
        message = await native.expect("message")
        assert message["data"] == {"base64": "AAE="} and message["offset"] == 2


async def test_mercury_subscriber_sees_native_messages(auth_srv: RunningServer) -> None:
    reader = token(sub="site", roles=("subscriber",))
    async with (
        mercury(auth_srv, f"/sub/upload?token={reader}") as sub,
        raw_client(auth_srv.ws_url) as native,
    ):
        values: list[Any] = ["text", {"dist": "Foo", "n": 1}, {"base64": "AAE="}, [1, 2], None]
        for value in values:
            reply = await native.request(
                {"type": "publish", "topic": "upload/dist/Foo", "data": value}
            )
            assert reply["type"] == "ok"
        assert await recv(sub) == "text"
        assert json.loads(await recv(sub)) == {"dist": "Foo", "n": 1}
        assert await recv(sub) == b"\x00\x01"
        assert await recv(sub) == "[1,2]"
        assert await recv(sub) == "null"


async def test_native_worker_takes_pushes_and_native_enqueue_reaches_pullers(
    open_srv: RunningServer,
) -> None:
    async with raw_client(open_srv.ws_url) as worker:
        reply = await worker.request(
            {"type": "work", "queues": ["mercury.push:tasks"], "concurrency": 1}
        )
        assert reply["type"] == "ok"
        assert (await post(open_srv, "/push/tasks", "from mercury")).status_code == 200
        job = await worker.expect("job")
        assert job["payload"] == "from mercury"
        done = {"type": "done", "job": job["job"], "attempt": job["attempt"], "result": None}
        assert (await worker.request(done))["type"] == "ok"
    async with mercury(open_srv, "/pull/tasks") as puller, raw_client(open_srv.ws_url) as producer:
        reply = await producer.request(
            {"type": "enqueue", "queue": "mercury.push:tasks", "payload": {"base64": "/w=="}}
        )
        assert reply["type"] == "ok"
        # Enqueued by someone else: the idle pool notices within its poll interval.
        assert await recv(puller) == b"\xff"


# --- auth -------------------------------------------------------------------------------------


async def test_tokens_in_header_or_query_map_to_permissions(auth_srv: RunningServer) -> None:
    pub_tok = token(sub="p", roles=("publisher",), publish=["upload/**"])
    bearer = {"Authorization": f"Bearer {pub_tok}"}
    assert (await post(auth_srv, "/pub/upload/x", "a")).status_code == 401
    assert (await post(auth_srv, "/pub/upload/x", "a", bearer)).status_code == 200
    assert (await post(auth_srv, f"/pub/upload/x?token={pub_tok}", "a")).status_code == 200
    assert (await post(auth_srv, "/pub/other", "a", bearer)).status_code == 403
    reply = await post(auth_srv, "/pub/upload/x", "a", {"Authorization": "Bearer not-a-jwt"})
    assert reply.status_code == 401 and reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert (
        await post(auth_srv, "/pub/upload/x", "a", {"Authorization": "Basic eDp5"})
    ).status_code == 401
    elsewhere = token(sub="e", roles=("publisher",), queues=["elsewhere"])
    assert (await post(auth_srv, f"/push/q?token={elsewhere}", "a")).status_code == 403
    pusher = token(sub="q", roles=("publisher",), queues=["mercury.push:q"])
    assert (await post(auth_srv, f"/push/q?token={pusher}", "a")).status_code == 200
    assert await status_of_handshake(auth_srv, f"/pull/q?token={pusher}", {}) == 403
    puller = token(sub="w", roles=("worker",), queues=["mercury.push:q"])
    async with mercury(auth_srv, f"/pull/q?token={puller}") as pull:
        assert await recv(pull) == "a"
    # Anonymous clients read public patterns only.
    assert await status_of_handshake(auth_srv, "/sub/uploads/dist", {}) == 101
    assert await status_of_handshake(auth_srv, "/sub/upload", {}) == 401
    assert await status_of_handshake(auth_srv, "/sub/uploads", {}) == 101
    narrow = token(sub="s", roles=(), subscribe=["upload/dist/*"])
    # /sub/upload/dist gets everything below it, which upload/dist/* does not cover.
    assert await status_of_handshake(auth_srv, f"/sub/upload/dist?token={narrow}", {}) == 403
    bus = token(sub="b", roles=(), publish=["bus/room"], subscribe=["bus/room"])
    assert await status_of_handshake(auth_srv, f"/bus/room?token={bus}", {}) == 101
    assert await status_of_handshake(auth_srv, f"/bus/hall?token={bus}", {}) == 403


async def test_expired_and_revoked_tokens_close_with_4401(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", ping_interval=0.1 * UNIT) as srv:
        short = token(sub="s", roles=("subscriber",), ttl=1)
        async with mercury(srv, f"/sub/news?token={short}") as sub:
            await wait_for(sub.wait_closed(), 5)
            assert sub.close_code == 4401
        revocable = token(sub="r", roles=("subscriber",), jti="revoke-me")
        async with mercury(srv, f"/sub/news?token={revocable}") as sub:
            async with httpx.AsyncClient(
                base_url=srv.http_url, headers={"Authorization": f"Bearer {token()}"}
            ) as h:
                reply = await h.post("/api/v1/tokens/revoke", json={"jti": "revoke-me"})
                assert reply.status_code == 200
            await wait_for(sub.wait_closed(), 5)
            assert sub.close_code == 4401
        assert await status_of_handshake(srv, f"/sub/news?token={revocable}", {}) == 401
