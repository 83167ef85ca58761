"""Webhooks against a real local HTTP receiver: signatures, retries, order, secrets, the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.webhooks import signature, verify_signature

from .helpers import (
    ROOT,
    UNIT,
    RunningServer,
    cli_env,
    http,
    running_server,
    token,
    until,
    until_async,
)

ADMIN = token()
SECRET = "s3cret-for-webhook-tests-0123456789"


def fast_settings() -> dict[str, Any]:
    return {
        "webhook_backoff_base": 0.05 * UNIT,
        "webhook_backoff_cap": 0.2 * UNIT,
        "webhook_poll_interval": 0.1 * UNIT,
    }


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with running_server(tmp_path / "data", **fast_settings()) as running:
        yield running


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1; ``answer`` picks each response's status."""

    answer: Callable[[Delivery], int] = lambda d: 200
    deliveries: list[Delivery] = field(default_factory=list)
    port: int = 0

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ok(self) -> list[Delivery]:
        return [d for d in self.deliveries if 200 <= d.status < 300]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await reader.readline()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            delivery = Delivery(request_line.decode().split()[1], headers, body, 0)
            delivery.status = self.answer(delivery)
            self.deliveries.append(delivery)
            writer.write(
                f"HTTP/1.1 {delivery.status} X\r\nContent-Length: 2\r\n"
                "Connection: close\r\n\r\nok".encode()
            )
            await writer.drain()
        finally:
            writer.close()


@asynccontextmanager
async def receiver(answer: Callable[[Delivery], int] | None = None) -> AsyncIterator[Receiver]:
    recv = Receiver() if answer is None else Receiver(answer)
    server = await asyncio.start_server(recv.handle, "127.0.0.1", 0)
    recv.port = server.sockets[0].getsockname()[1]
    async with server:
        yield recv


async def register(srv: RunningServer, **body: Any) -> dict[str, Any]:
    async with http(srv, ADMIN) as h:
        reply = await h.post("/api/v1/webhooks", json=body)
    assert reply.status_code == 201, reply.text
    hook: dict[str, Any] = reply.json()
    return hook


async def job_state(srv: RunningServer, job_id: str) -> dict[str, Any]:
    async with http(srv, ADMIN) as h:
        reply = await h.get(f"/api/v1/jobs/{job_id}")
    assert reply.status_code == 200
    job: dict[str, Any] = reply.json()
    return job


async def wait_job(srv: RunningServer, job_id: str, state: str) -> dict[str, Any]:
    async def reached() -> bool:
        current: str = (await job_state(srv, job_id))["state"]
        return current == state

    await until_async(reached)
    return await job_state(srv, job_id)


async def test_deliveries_are_signed(srv: RunningServer) -> None:
    async with receiver() as rx:
        hook = await register(srv, url=rx.url(), pattern="reports/**", secret=SECRET)
        srv.broker.publish("reports/dist/Foo", {"grade": "pass", "name": "Grüße"})
        await until(lambda: len(rx.deliveries) == 1)
        d = rx.deliveries[0]
    assert d.path == "/hook" and d.headers["content-type"] == "application/json"
    timestamp = d.headers["x-quicksilver-timestamp"]
    assert abs(int(timestamp) - time.time()) < 60
    expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + d.body, hashlib.sha256)
    assert d.headers["x-quicksilver-signature"] == "sha256=" + expected.hexdigest()
    assert verify_signature(SECRET, timestamp, d.body, d.headers["x-quicksilver-signature"])
    assert not verify_signature(
        SECRET + "x", timestamp, d.body, d.headers["x-quicksilver-signature"]
    )
    assert not verify_signature(
        SECRET, timestamp, d.body + b" ", d.headers["x-quicksilver-signature"]
    )
    old = str(int(timestamp) - 3600)
    assert not verify_signature(SECRET, old, d.body, signature(SECRET, old, d.body))
    body = d.json
    assert body["topic"] == "reports/dist/Foo" and body["offset"] == 1 and body["epoch"]
    assert body["data"] == {"grade": "pass", "name": "Grüße"} and body["webhook"] == hook["id"]
    assert d.headers["x-quicksilver-webhook"] == hook["id"]
    assert d.headers["x-quicksilver-attempt"] == "1"
    job = await wait_job(srv, d.headers["x-quicksilver-delivery"], "done")
    assert job["queue"] == f"webhooks:{hook['id']}" and job["attempt"] == 1


async def test_secrets_are_never_echoed(srv: RunningServer) -> None:
    hook = await register(srv, url="http://127.0.0.1:9/a", pattern="a/**", secret=SECRET)
    assert "secret" not in hook
    generated = await register(srv, url="http://127.0.0.1:9/b", pattern="b/**")
    secret = generated["secret"]
    assert isinstance(secret, str) and len(secret) >= 32
    async with http(srv, ADMIN) as h:
        listing = await h.get("/api/v1/webhooks")
        one = await h.get(f"/api/v1/webhooks/{generated['id']}")
    for reply in (listing, one):
        assert reply.status_code == 200
        assert SECRET not in reply.text and secret not in reply.text and "secret" not in reply.text
    assert [w["id"] for w in listing.json()["webhooks"]] == [hook["id"], generated["id"]]
    assert one.json()["pattern"] == "b/**" and one.json()["url"] == "http://127.0.0.1:9/b"
    assert SECRET not in repr(srv.broker.webhooks.registered())


async def test_generated_secret_signs_deliveries(srv: RunningServer) -> None:
    async with receiver() as rx:
        hook = await register(srv, url=rx.url(), pattern="gen")
        srv.broker.publish("gen", 1)
        await until(lambda: len(rx.ok()) == 1)
        d = rx.ok()[0]
    ts = d.headers["x-quicksilver-timestamp"]
    assert verify_signature(hook["secret"], ts, d.body, d.headers["x-quicksilver-signature"])


async def test_a_receiver_failing_twice_gets_the_message_once_after_retries(
    srv: RunningServer,
) -> None:
    def answer(d: Delivery) -> int:
        return 200 if d.json["data"] != "first" or attempts["first"] >= 2 else count("first")

    attempts = {"first": 0}

    def count(key: str) -> int:
        attempts[key] += 1
        return 500

    async with receiver(answer) as rx:
        await register(srv, url=rx.url(), pattern="retry/*", secret=SECRET)
        srv.broker.publish("retry/x", "first")
        await until(lambda: len(rx.ok()) == 1)
        srv.broker.publish("retry/x", "second")  # what comes next shows nothing else is sent
        await until(lambda: len(rx.ok()) == 2)
    first = [d for d in rx.deliveries if d.json["data"] == "first"]
    assert [d.status for d in first] == [500, 500, 200]
    assert [d.headers["x-quicksilver-attempt"] for d in first] == ["1", "2", "3"]
    assert len({d.headers["x-quicksilver-delivery"] for d in first}) == 1
    assert [d.json["data"] for d in rx.ok()] == ["first", "second"]
    assert len(rx.deliveries) == 4
    job = await wait_job(srv, first[0].headers["x-quicksilver-delivery"], "done")
    assert job["attempt"] == 3 and job["result"] == {"status": 200}
    # Every attempt was signed afresh with its own timestamp.
    for d in first:
        ts = d.headers["x-quicksilver-timestamp"]
        assert verify_signature(SECRET, ts, d.body, d.headers["x-quicksilver-signature"])


async def test_order_is_kept_per_webhook(srv: RunningServer) -> None:
    failures = {"n1": 3}

    def answer(d: Delivery) -> int:
        key = d.json["data"]
        if failures.get(key, 0) > 0:
            failures[key] -= 1
            return 503
        return 204

    async with receiver(answer) as rx:
        await register(srv, url=rx.url(), pattern="ordered", secret=SECRET)
        for n in range(6):
            srv.broker.publish("ordered", f"n{n}")
        await until(lambda: len(rx.ok()) == 6)
    assert [d.json["data"] for d in rx.ok()] == [f"n{n}" for n in range(6)]
    # Nothing after n1 was even tried before n1 got through.
    assert [d.json["data"] for d in rx.deliveries] == [
        "n0",
        "n1",
        "n1",
        "n1",
        "n1",
        "n2",
        "n3",
        "n4",
        "n5",
    ]
    assert [d.json["offset"] for d in rx.ok()] == list(range(1, 7))


async def test_two_webhooks_deliver_independently(srv: RunningServer) -> None:
    def answer(d: Delivery) -> int:
        return 500 if d.path == "/down" else 200

    async with receiver(answer) as rx:
        await register(srv, url=rx.url("/down"), pattern="both", secret=SECRET, max_attempts=50)
        await register(srv, url=rx.url("/up"), pattern="both", secret=SECRET)
        for n in range(3):
            srv.broker.publish("both", n)
        await until(lambda: len(rx.ok()) == 3)
    assert [d.json["data"] for d in rx.ok()] == [0, 1, 2]
    assert all(d.path == "/up" for d in rx.ok())


async def test_failed_deliveries_are_visible_and_retryable(srv: RunningServer) -> None:
    up = {"value": False}

    def answer(d: Delivery) -> int:
        return 200 if up["value"] else 503

    async with receiver(answer) as rx:
        hook = await register(srv, url=rx.url(), pattern="fragile", secret=SECRET, max_attempts=2)
        srv.broker.publish("fragile", "lost?")
        await until(lambda: len(rx.deliveries) == 2)
        queue = f"webhooks:{hook['id']}"

        async def failed_jobs() -> list[dict[str, Any]]:
            async with http(srv, ADMIN) as h:
                reply = await h.get("/api/v1/jobs", params={"queue": queue, "state": "failed"})
            jobs: list[dict[str, Any]] = reply.json()["jobs"]
            return jobs

        async def one_failed() -> bool:
            return len(await failed_jobs()) == 1

        await until_async(one_failed)
        failed = (await failed_jobs())[0]
        assert failed["error"] == "HTTP 503" and failed["attempt"] == 2
        # A failure for good does not hold back what comes after it.
        up["value"] = True
        srv.broker.publish("fragile", "later")
        await until(lambda: len(rx.ok()) == 1)
        assert rx.ok()[0].json["data"] == "later"
        async with http(srv, ADMIN) as h:
            reply = await h.post(f"/api/v1/jobs/{failed['job']}/retry")
        assert reply.status_code == 200
        await until(lambda: len(rx.ok()) == 2)
        assert rx.ok()[1].json["data"] == "lost?"
        await wait_job(srv, failed["job"], "done")


async def test_the_worker_does_not_deliver_its_own_traffic(srv: RunningServer) -> None:
    async with receiver() as rx:
        await register(srv, url=rx.url(), pattern="**", secret=SECRET)
        srv.broker.publish("t/a", "a")
        await until(lambda: len(rx.ok()) == 1)
        srv.broker.publish("t/b", "b")
        await until(lambda: len(rx.ok()) == 2)
    # The delivery jobs' own state messages (jobs/<id>) would have come in between.
    assert [d.json["topic"] for d in rx.deliveries] == ["t/a", "t/b"]


async def test_removal_stops_deliveries_and_cancels_waiting_ones(srv: RunningServer) -> None:
    async with receiver(lambda d: 500) as rx:
        index_before = len(srv.broker.hub.index)
        hook = await register(srv, url=rx.url(), pattern="gone", secret=SECRET, max_attempts=100)
        assert len(srv.broker.hub.index) == index_before + 1
        for n in range(3):
            srv.broker.publish("gone", n)
        await until(lambda: len(rx.deliveries) >= 2)
        async with http(srv, ADMIN) as h:
            assert (await h.delete(f"/api/v1/webhooks/{hook['id']}")).status_code == 204
            assert (await h.delete(f"/api/v1/webhooks/{hook['id']}")).status_code == 404
            assert (await h.get(f"/api/v1/webhooks/{hook['id']}")).status_code == 404
            jobs = (await h.get("/api/v1/jobs", params={"queue": f"webhooks:{hook['id']}"})).json()
        assert len(srv.broker.hub.index) == index_before
        assert sorted(j["state"] for j in jobs["jobs"]) == ["cancelled"] * 3
        tried = len(rx.deliveries)
        srv.broker.publish("gone", "after")
        assert len(rx.deliveries) == tried
        assert srv.broker.webhooks.registered() == []


async def test_registration_errors(srv: RunningServer) -> None:
    good = {"url": "http://127.0.0.1:9/x", "pattern": "a/**"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**good, "url": "ftp://example.com/"}, "url"),
        ({**good, "url": "http://"}, "url"),
        ({**good, "url": "http://exa mple.com/"}, "url"),
        ({**good, "url": 5}, "url"),
        ({**good, "pattern": "a/**/b"}, "pattern"),
        ({**good, "secret": "short"}, "secret"),
        ({**good, "max_attempts": 0}, "max_attempts"),
        ({**good, "max_attempts": True}, "max_attempts"),
        ({**good, "description": 7}, "description"),
    ]
    async with http(srv, ADMIN) as h:
        for body, word in cases:
            reply = await h.post("/api/v1/webhooks", json=body)
            assert reply.status_code == 400, body
            assert word in reply.json()["errors"][0]["message"] or word == "pattern", body
        assert (await h.post("/api/v1/webhooks", content=b"[1]")).status_code == 400
    async with http(srv) as anon:
        assert (await anon.post("/api/v1/webhooks", json=good)).status_code == 401
        assert (await anon.get("/api/v1/webhooks")).status_code == 401
    async with http(srv, token(roles=("publisher",))) as h:
        assert (await h.post("/api/v1/webhooks", json=good)).status_code == 403
        assert (await h.get("/api/v1/webhooks")).status_code == 403
    assert srv.broker.webhooks.registered() == []


async def test_webhooks_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with receiver() as rx:
        async with running_server(data, **fast_settings()) as first:
            hook = await register(first, url=rx.url(), pattern="durable", secret=SECRET)
        async with running_server(data, **fast_settings()) as second:
            async with http(second, ADMIN) as h:
                listing = (await h.get("/api/v1/webhooks")).json()["webhooks"]
            assert [w["id"] for w in listing] == [hook["id"]]
            second.broker.publish("durable", "again")
            await until(lambda: len(rx.ok()) == 1)
    d = rx.ok()[0]
    ts = d.headers["x-quicksilver-timestamp"]
    assert verify_signature(SECRET, ts, d.body, d.headers["x-quicksilver-signature"])


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "quicksilver",
        *args,
        cwd=ROOT,
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30 * UNIT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_adds_lists_and_removes_webhooks(srv: RunningServer) -> None:
    common = ["--url", srv.ws_url, "--token", ADMIN]
    async with receiver() as rx:
        code, out, err = await run_cli(
            "webhook", "add", rx.url(), "cli/**", "--max-attempts", "3", *common
        )
        assert code == 0, err
        created = json.loads(out)
        assert created["pattern"] == "cli/**" and created["max_attempts"] == 3
        assert len(created["secret"]) >= 32
        srv.broker.publish("cli/x", "via cli")
        await until(lambda: len(rx.ok()) == 1)
        d = rx.ok()[0]
        ts = d.headers["x-quicksilver-timestamp"]
        assert verify_signature(created["secret"], ts, d.body, d.headers["x-quicksilver-signature"])
    code, out, err = await run_cli("webhook", "list", *common)
    assert code == 0 and [json.loads(line)["id"] for line in out.splitlines()] == [created["id"]]
    assert created["secret"] not in out
    code, out, err = await run_cli("webhook", "remove", created["id"], *common)
    assert code == 0 and out == ""
    code, out, err = await run_cli("webhook", "remove", created["id"], *common)
    assert code == 1 and "404" in err and "Traceback" not in err
    code, out, err = await run_cli("webhook", "add", "ftp://x/", "a", *common)
    assert code == 1 and "url" in err
    code, out, err = await run_cli("webhook", "list", "--url", srv.ws_url)
    assert code == 2 and "token" in err
