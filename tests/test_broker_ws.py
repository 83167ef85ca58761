"""End-to-end tests of the WebSocket endpoint against a real broker on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from auth.tokens import Secret, mint_token

from .helpers import (
    SECRET,
    UNIT,
    RunningServer,
    raw_client,
    running_server,
    token,
    until,
    wait_for,
)


def b64(obj: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


BAD_TOKENS = {
    "bad signature": mint_token(
        Secret("another-secret-another-secret-xx"), sub="x", roles=["admin"]
    ),
    "expired": mint_token(Secret(SECRET), sub="x", roles=["admin"], ttl=60, now=time.time() - 3600),
    "alg none": b64({"alg": "none", "typ": "JWT"})
    + "."
    + b64({"sub": "x", "roles": ["admin"], "exp": int(time.time()) + 3600})
    + ".",
    "not yet valid": mint_token(Secret(SECRET), sub="x", roles=["admin"], now=time.time() + 3600),
    "garbage": "not-a-token",
}


async def test_welcome_fields(server: RunningServer) -> None:
    async with raw_client(server.ws_url, auth=False) as c:
        await c.send({"type": "auth", "token": token(sub="alice", roles=("subscriber",))})
        welcome = await c.recv()
        assert welcome["type"] == "welcome"
        assert welcome["sub"] == "alice"
        assert welcome["roles"] == ["subscriber"]
        assert isinstance(welcome["expires_at"], int)
        assert welcome["server"].startswith("quicksilver/")
        assert welcome["session"]


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_bad_tokens_refused_with_4401(server: RunningServer, kind: str) -> None:
    async with raw_client(server.ws_url, auth=False) as c:
        await c.send({"type": "auth", "token": BAD_TOKENS[kind]})
        err = await c.recv()
        assert err["type"] == "error" and err["code"] == "unauthorized", err
        assert await c.closed() == 4401


@pytest.mark.parametrize("kind", ["bad signature", "expired", "alg none"])
async def test_bad_header_tokens_refused_with_4401(server: RunningServer, kind: str) -> None:
    headers = {"Authorization": f"Bearer {BAD_TOKENS[kind]}"}
    async with raw_client(server.ws_url, auth=False, headers=headers) as c:
        err = await c.recv()
        assert err["code"] == "unauthorized"
        assert await c.closed() == 4401


async def test_header_auth(server: RunningServer) -> None:
    headers = {"Authorization": f"Bearer {token(sub='bob')}"}
    async with raw_client(server.ws_url, auth=False, headers=headers) as c:
        welcome = await c.recv()
        assert welcome["type"] == "welcome" and welcome["sub"] == "bob"
        assert (await c.request({"type": "ping"}))["type"] == "pong"


async def test_revoked_token_refused_and_live_connection_closed(server: RunningServer) -> None:
    tok = token(sub="carol", jti="jti-to-revoke")
    async with raw_client(server.ws_url, tok) as live:
        closed = await server.broker.revoke("jti-to-revoke", None)
        assert closed == 1
        assert (await live.expect("error"))["code"] == "unauthorized"
        assert await live.closed() == 4401
    async with raw_client(server.ws_url, auth=False) as c:
        await c.send({"type": "auth", "token": tok})
        assert (await c.recv())["code"] == "unauthorized"
        assert await c.closed() == 4401


async def test_frames_before_auth_are_refused(server: RunningServer) -> None:
    async with raw_client(server.ws_url, auth=False) as c:
        reply = await c.request({"type": "subscribe", "topic": "a"})
        assert reply["code"] == "unauthorized"
        await c.send({"type": "auth", "token": token()})
        assert (await c.recv())["type"] == "welcome"
        assert (await c.request({"type": "subscribe", "topic": "a"}))["type"] == "ok"


async def test_auth_timeout_closes_4401(tmp_path: Path) -> None:
    async with running_server(tmp_path, auth_timeout=0.2 * UNIT) as srv:
        async with raw_client(srv.ws_url, auth=False) as c:
            err = await c.recv()
            assert err["code"] == "unauthorized"
            assert await c.closed() == 4401


async def test_anonymous_refused_unless_enabled(tmp_path: Path) -> None:
    async with running_server(tmp_path, allow_anonymous=False) as srv:
        async with raw_client(srv.ws_url, auth=False) as c:
            await c.send({"type": "auth"})
            assert (await c.recv())["code"] == "unauthorized"
            assert await c.closed() == 4401


async def test_anonymous_reads_public_topics_only(tmp_path: Path) -> None:
    async with running_server(
        tmp_path, allow_anonymous=True, public_patterns=("reports/**",)
    ) as srv:
        async with raw_client(srv.ws_url, None) as anon:
            assert (await anon.request({"type": "subscribe", "topic": "reports/dist/*"}))[
                "type"
            ] == "ok"
            denied = await anon.request({"type": "subscribe", "topic": "private/x"})
            assert denied["code"] == "forbidden"
            denied = await anon.request({"type": "publish", "topic": "reports/x", "data": 1})
            assert denied["code"] == "forbidden"


async def test_forbidden_publish_keeps_connection(server: RunningServer) -> None:
    tok = token(roles=("subscriber",))
    async with raw_client(server.ws_url, tok) as c:
        reply = await c.request({"type": "publish", "topic": "news", "data": "hi"})
        assert reply["type"] == "error" and reply["code"] == "forbidden"
        assert "news" in reply["message"]
        assert (await c.request({"type": "ping"}))["type"] == "pong"
        assert (await c.request({"type": "subscribe", "topic": "news"}))["type"] == "ok"


async def test_permission_patterns(server: RunningServer) -> None:
    tok = token(roles=(), publish=["chat/*"], subscribe=["chat/**"])
    async with raw_client(server.ws_url, tok) as c:
        assert (await c.request({"type": "publish", "topic": "chat/x", "data": 1}))["type"] == "ok"
        assert (await c.request({"type": "publish", "topic": "chat/x/y", "data": 1}))[
            "code"
        ] == "forbidden"
        assert (await c.request({"type": "subscribe", "topic": "chat/*"}))["type"] == "ok"
        assert (await c.request({"type": "subscribe", "topic": "**"}))["code"] == "forbidden"


async def test_wildcards_end_to_end(server: RunningServer) -> None:
    async with (
        raw_client(server.ws_url) as star,
        raw_client(server.ws_url) as rest,
        raw_client(server.ws_url) as pub,
    ):
        await star.request({"type": "subscribe", "topic": "reports/dist/*"})
        await rest.request({"type": "subscribe", "topic": "reports/**"})
        topics = [
            "reports",
            "reports/dist",
            "reports/dist/Foo",
            "reports/dist/Foo/1.0",
            "reportsX/dist/Foo",
            "other/dist/Foo",
        ]
        for i, topic in enumerate(topics):
            await pub.request({"type": "publish", "topic": topic, "data": i})
        await pub.request({"type": "publish", "topic": "end", "data": None})
        # A sentinel on each subscription marks the end of what it can receive.
        await pub.request({"type": "publish", "topic": "reports/dist/zzz", "data": "last"})
        got_star = []
        while True:
            m = await star.expect("message")
            if m["data"] == "last":
                break
            got_star.append(m["topic"])
        got_rest = []
        while True:
            m = await rest.expect("message")
            if m["data"] == "last":
                break
            got_rest.append(m["topic"])
        assert got_star == ["reports/dist/Foo"]
        assert got_rest == ["reports", "reports/dist", "reports/dist/Foo", "reports/dist/Foo/1.0"]


async def test_message_fields_and_offsets(server: RunningServer) -> None:
    async with raw_client(server.ws_url) as sub, raw_client(server.ws_url) as pub:
        ok = await sub.request({"type": "subscribe", "topic": "t/1"})
        assert ok["type"] == "ok"
        offsets = [
            (await pub.request({"type": "publish", "topic": "t/1", "data": {"n": n}}))["offset"]
            for n in range(3)
        ]
        assert offsets == [1, 2, 3]
        msgs = [await sub.expect("message") for _ in range(3)]
        assert [m["offset"] for m in msgs] == [1, 2, 3]
        assert [m["data"] for m in msgs] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert len({m["epoch"] for m in msgs}) == 1
        assert all(isinstance(m["ts"], float) and m["topic"] == "t/1" for m in msgs)


async def test_json_and_msgpack_clients_see_the_same(server: RunningServer) -> None:
    data = {"s": "héllo ✓", "n": 2**40, "f": 1.5, "l": [1, None, True], "m": {"k": "v"}}
    async with (
        raw_client(server.ws_url, encoding="json") as j,
        raw_client(server.ws_url, encoding="msgpack") as m,
        raw_client(server.ws_url, encoding="msgpack") as pub,
    ):
        await j.request({"type": "subscribe", "topic": "mix"})
        await m.request({"type": "subscribe", "topic": "mix"})
        assert (await pub.request({"type": "publish", "topic": "mix", "data": data}))[
            "type"
        ] == "ok"
        mj = await j.expect("message")
        mm = await m.expect("message")
        assert isinstance(j.ws.subprotocol, str) and j.ws.subprotocol.endswith("json")
        assert isinstance(m.ws.subprotocol, str) and m.ws.subprotocol.endswith("msgpack")
        assert mj == mm
        assert mj["data"] == data


async def test_no_subprotocol_means_json(server: RunningServer) -> None:
    async with raw_client(server.ws_url, subprotocols=[]) as c:
        assert c.ws.subprotocol is None
        assert (await c.request({"type": "ping"}))["type"] == "pong"


async def test_unknown_subprotocols_refused(server: RunningServer) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(server.ws_url, subprotocols=["mqtt"]):  # type: ignore[list-item]
            pass
    assert info.value.response.status_code == 400


async def test_malformed_frames_get_bad_request(server: RunningServer) -> None:
    async with raw_client(server.ws_url) as c:
        for raw in [
            "{not json",
            "[1,2]",
            '{"type": 5}',
            '{"type":"nope","id":7}',
            '{"type":"publish","id":8}',
            '{"type":"subscribe","id":9,"topic":"a//b"}',
            '{"type":"publish","id":10,"topic":"a/*","data":1}',
            "\u00ff\u0000",
        ]:
            await c.ws.send(raw)
            err = await c.recv()
            assert err["type"] == "error" and err["code"] == "bad_request", (raw, err)
        await c.ws.send(b"\xff\xfe binary garbage")
        assert (await c.recv())["code"] == "bad_request"
        await c.ws.send('{"type":"nope","id":"abc"}')
        assert (await c.recv())["id"] is None  # no valid type: the id is not trusted
        await c.ws.send('{"type":"publish","id":"abc"}')
        assert (await c.recv())["id"] == "abc"  # a known type with a bad field: it is
        assert (await c.request({"type": "ping"}))["type"] == "pong"


async def test_oversized_frame_closes_1009(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_frame_bytes=4096) as srv:
        async with raw_client(srv.ws_url, max_size=None) as c:
            await c.ws.send(
                json.dumps({"type": "publish", "id": 1, "topic": "a", "data": "x" * 5000})
            )
            assert await c.closed() == 1009
        async with raw_client(srv.ws_url) as c2:
            assert (await c2.request({"type": "ping"}))["type"] == "pong"


async def test_slow_consumer_closed_1013_fast_gets_everything(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_buffer_bytes=64 * 1024) as srv:
        async with (
            raw_client(srv.ws_url, max_queue=1) as slow,
            raw_client(srv.ws_url) as fast,
            raw_client(srv.ws_url) as pub,
        ):
            await slow.request({"type": "subscribe", "topic": "firehose"})
            await fast.request({"type": "subscribe", "topic": "firehose"})
            # The slow client stops reading; once the kernel's buffers are full, the broker's fill.
            slow.ws.transport.pause_reading()
            payload = "y" * 2000
            published = 0
            received = 0

            async def drain_fast() -> None:
                nonlocal received
                while True:
                    m = await fast.expect("message", units=10)
                    assert m["data"]["n"] == received
                    received += 1

            async def drain_oks() -> None:
                while True:
                    await pub.recv(units=10)

            readers = [asyncio.create_task(drain_fast()), asyncio.create_task(drain_oks())]
            metrics = srv.broker.metrics
            # Publish until the broker gives up on the slow client (bounded: at most 40 MB).
            while metrics.slow_consumer_closes == 0 and published < 20_000:
                for _ in range(100):
                    await pub.send(
                        {
                            "type": "publish",
                            "id": published,
                            "topic": "firehose",
                            "data": {"n": published, "p": payload},
                        }
                    )
                    published += 1
                sent = published

                def caught_up(sent: int = sent) -> bool:
                    return received >= sent - 500

                await until(caught_up, units=10)
            assert metrics.slow_consumer_closes == 1
            for n in range(100):  # the others go on
                await pub.send(
                    {
                        "type": "publish",
                        "id": published,
                        "topic": "firehose",
                        "data": {"n": published, "p": n},
                    }
                )
                published += 1
            await until(lambda: received == published, units=10)
            for task in readers:
                task.cancel()
            slow.ws.transport.resume_reading()
            assert await slow.closed(units=10) == 1013
            assert len(srv.broker.hub.index) == 1


async def test_token_expiry_closes_4401(server: RunningServer) -> None:
    tok = mint_token(Secret(SECRET), sub="short", roles=["admin"], ttl=1)
    async with raw_client(server.ws_url, tok) as c:
        err = await c.expect("error", units=5)
        assert err["code"] == "unauthorized" and "expired" in err["message"]
        assert await c.closed() == 4401


async def test_refresh_extends_the_session(server: RunningServer) -> None:
    tok = mint_token(Secret(SECRET), sub="r", roles=["admin"], ttl=1)
    async with raw_client(server.ws_url, tok) as c:
        new = mint_token(Secret(SECRET), sub="r", roles=["admin"], ttl=600)
        ok = await c.request({"type": "refresh", "token": new})
        assert ok["type"] == "ok" and ok["expires_at"] > time.time() + 500
        # Past the first token's expiry the connection still answers.
        first_exp = time.time() + 1
        await until(lambda: time.time() > first_exp + 0.3)
        assert (await c.request({"type": "ping"}))["type"] == "pong"
        other = mint_token(Secret(SECRET), sub="someone-else", roles=["admin"])
        assert (await c.request({"type": "refresh", "token": other}))["code"] == "forbidden"


async def test_unsubscribe_stops_delivery(server: RunningServer) -> None:
    async with raw_client(server.ws_url) as sub, raw_client(server.ws_url) as pub:
        await sub.request({"type": "subscribe", "topic": "u/*"})
        await sub.request({"type": "subscribe", "topic": "stop"})
        await sub.request({"type": "unsubscribe", "topic": "u/*"})
        await pub.request({"type": "publish", "topic": "u/1", "data": 1})
        await pub.request({"type": "publish", "topic": "stop", "data": 2})
        assert (await sub.expect("message"))["topic"] == "stop"


async def test_origin_policy(tmp_path: Path) -> None:
    async with running_server(tmp_path, allowed_origins=("https://good.example",)) as srv:
        async with raw_client(srv.ws_url, origin="https://good.example"):
            pass
        async with raw_client(srv.ws_url, origin=f"http://127.0.0.1:{srv.port}"):
            pass
        with pytest.raises(InvalidStatus) as info:
            async with connect(srv.ws_url, origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        assert info.value.response.status_code == 403


async def test_disconnect_leaves_every_index(server: RunningServer) -> None:
    for _ in range(20):
        async with raw_client(server.ws_url) as c:
            await c.request({"type": "subscribe", "topic": "churn/*"})
            await c.request({"type": "subscribe", "topic": "churn/x"})
    await until(lambda: len(server.broker.connections) == 0)
    assert len(server.broker.hub.index) == 0
    assert not server.broker.hub.index.has_wildcards()


async def test_shutdown_closes_with_1001(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, raw_client(srv.ws_url) as c:
        stopping = asyncio.create_task(srv.stop())
        assert await c.closed() == 1001
        await wait_for(stopping, 20)


async def test_keepalive_closes_a_silent_peer(tmp_path: Path) -> None:
    async with running_server(tmp_path, ping_interval=0.1 * UNIT, close_timeout=0.2 * UNIT) as srv:
        async with (
            raw_client(srv.ws_url, ping_interval=None, close_timeout=UNIT) as quiet,
            raw_client(srv.ws_url, ping_interval=None) as lively,
        ):
            # A peer that reads nothing never answers the broker's ping.
            quiet.ws.transport.pause_reading()
            await until(lambda: srv.broker.metrics.keepalive_timeouts == 1, units=5)
            await until(lambda: len(srv.broker.connections) == 1, units=5)
            # A peer that answers pings stays.
            assert (await lively.request({"type": "ping"}))["type"] == "pong"
            assert srv.broker.metrics.keepalive_timeouts == 1


async def test_rs256_tokens_with_a_public_key_file(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_file = tmp_path / "public.pem"
    public_file.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    async with running_server(tmp_path / "data", public_key_file=public_file) as srv:
        good = mint_token(private_pem, sub="rsa-user", roles=["admin"], algorithm="RS256")
        async with raw_client(srv.ws_url, good) as c:
            assert (await c.request({"type": "ping"}))["type"] == "pong"
        # An HS256 token signed with the shared secret is refused on an RS256 server.
        async with raw_client(srv.ws_url, auth=False) as c:
            await c.send({"type": "auth", "token": token()})
            assert (await c.recv())["code"] == "unauthorized"
            assert await c.closed() == 4401
