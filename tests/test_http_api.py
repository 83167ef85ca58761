"""The HTTP side: publish, health, metrics and JSON errors, against a real server."""

from __future__ import annotations

import time

from auth.tokens import Secret, mint_token

from .helpers import SECRET, RunningServer, http, raw_client, token


async def test_publish_401_403_200(server: RunningServer) -> None:
    body = {"topic": "news/today", "data": {"headline": "hi"}}
    async with http(server) as anon:
        r = await anon.post("/api/v1/publish", json=body)
        assert r.status_code == 401
        assert r.json()["errors"][0]["message"]
        assert r.headers["www-authenticate"].startswith("Bearer")
    expired = mint_token(Secret(SECRET), sub="x", roles=["admin"], ttl=10, now=time.time() - 60)
    async with http(server, expired) as h:
        assert (await h.post("/api/v1/publish", json=body)).status_code == 401
    async with http(server, token(roles=("subscriber",))) as h:
        r = await h.post("/api/v1/publish", json=body)
        assert r.status_code == 403 and "news/today" in r.json()["errors"][0]["message"]
    async with raw_client(server.ws_url) as sub:
        await sub.request({"type": "subscribe", "topic": "news/*"})
        async with http(server, token(roles=("publisher",))) as h:
            r = await h.post("/api/v1/publish", json=body)
            assert r.status_code == 200 and r.json() == {"offset": 1}
        message = await sub.expect("message")
        assert message["topic"] == "news/today" and message["data"] == {"headline": "hi"}


async def test_publish_bad_input(server: RunningServer) -> None:
    async with http(server, token()) as h:
        cases = [
            (b"{not json", 400),
            (b"[1]", 400),
            (b'{"topic": "a//b", "data": 1}', 400),
            (b'{"topic": "a/*", "data": 1}', 400),
            (b'{"topic": 5}', 400),
            (b'{"topic": "ok", "data": NaN}', 400),
            (b"x" * (2 << 20), 413),
        ]
        for raw, status in cases:
            r = await h.post("/api/v1/publish", content=raw)
            assert r.status_code == status, (raw[:40], r.text)
            assert r.headers["content-type"].startswith("application/json")
            assert r.json()["errors"][0]["message"]


async def test_health_ready_metrics(server: RunningServer) -> None:
    async with http(server) as h:
        assert (await h.get("/healthz")).json() == {"status": "ok"}
        assert (await h.get("/readyz")).status_code == 200
        async with raw_client(server.ws_url) as c:
            await c.request({"type": "subscribe", "topic": "m/x"})
            await c.request({"type": "publish", "topic": "m/x", "data": 1})
            text = (await h.get("/metrics")).text
        lines = dict(
            line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
        )
        assert float(lines["quicksilver_connections"]) == 1
        assert float(lines["quicksilver_subscriptions"]) == 1
        assert float(lines["quicksilver_published_total"]) >= 1
        assert float(lines["quicksilver_messages_in_total"]) >= 3
        assert "quicksilver_slow_consumer_closes_total" in lines
        assert "# TYPE quicksilver_job_pickup_seconds histogram" in text


async def test_unknown_routes_are_json(server: RunningServer) -> None:
    async with http(server) as h:
        r = await h.get("/no/such/thing")
        assert r.status_code == 404 and r.json()["errors"][0]["path"] is None
        r = await h.get("/api/v1/publish")
        assert r.status_code == 405 and "GET" in r.json()["errors"][0]["message"]
