"""Cluster benchmark: fan-out and jobs/s with 1, 2 and 3 broker nodes on PostgreSQL and Redis.

``python -m bench cluster [--subscribers S] [--messages M] [--jobs J] [--nodes 1,2,3]``

Every node is a ``quicksilver serve`` process; all share one PostgreSQL schema and one Redis
prefix made for the run (dropped afterwards). Two measurements per node count, plus the
single-node baseline without Redis and PostgreSQL (SQLite, in-process backplane):

- ``fan-out``: S subscribers spread evenly over the nodes (raw WebSocket clients in two load
  processes that only count deliveries); one publisher on the first node sends M messages with
  at most 256 unanswered. Deliveries/s = S x M / (last delivery - first publish).
- ``jobs``: J jobs enqueued over HTTP on the first node; one worker process per node
  (concurrency 32, a handler that returns at once) takes them through its own node.
  Jobs/s = J / (last job done - first enqueue).

Alongside, Redis' own time per script (``INFO commandstats``) and the CPU seconds PostgreSQL
spent per job, which the projection to more nodes is computed from (see the README section
"Running several nodes").

Everything shares this machine's CPUs: on 2 cores, 3 nodes plus Redis, PostgreSQL and the load
processes compete, so the figures show the overhead each node adds, not how a cluster of
machines scales. Writes bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import multiprocessing.connection
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import httpx
from websockets.asyncio.client import connect

from .common import (
    ROOT,
    BenchError,
    ServerProcess,
    die_with_parent,
    format_table,
    free_port,
    machine_info,
    mint_admin_token,
    new_secret,
    write_json,
)

RESULTS = ROOT / "bench" / "results" / "cluster.json"
DATABASE_URL = os.environ.get("QUICKSILVER_BENCH_DATABASE_URL", "postgresql://127.0.0.1:5432/test")
REDIS_URL = os.environ.get("QUICKSILVER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
TOPIC = "bench/fan"
QUEUE = "bench-jobs"
MARKER = f'"topic":"{TOPIC}"'.encode()
OK_MARKER = b'"type":"ok"'
QS = (sys.executable, "-m", "quicksilver")
WORKER_ARGS = ("--queue", QUEUE, "--app", "bench.jobs_app", "--concurrency", "32")


# --- the load processes: raw WebSocket subscribers that count deliveries ----------------------


def _masked_text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        header = bytes([0x81, 0x80 | size])
    else:
        header = bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


class _Subscriber(asyncio.Protocol):
    """One connection: upgrade, subscribe, then count the marker in everything received (a
    marker cut between two reads is caught by keeping the tail)."""

    def __init__(self, token: str, port: int, ready: asyncio.Event) -> None:
        self.token = token
        self.port = port
        self.ready = ready
        self.upgraded = False
        self.tail = b""
        self.count = 0
        self.target = 0
        self.done = asyncio.Event()
        self.first: float | None = None
        self.last: float | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: quicksilver.v1.json\r\n"
                f"Authorization: Bearer {self.token}\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            head, sep, rest = (self.tail + data).partition(b"\r\n\r\n")
            if not sep:
                self.tail = head
                return
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                raise BenchError(f"upgrade refused: {head[:80]!r}")
            self.upgraded = True
            self.tail = b""
            assert self.transport is not None
            frame = json.dumps({"type": "subscribe", "id": 1, "topic": TOPIC}).encode()
            self.transport.write(_masked_text_frame(frame))
            data = rest
        chunk = self.tail + data
        if not self.ready.is_set() and OK_MARKER in chunk:
            self.ready.set()
        found = chunk.count(MARKER)
        if found:
            now = time.time()
            if self.first is None:
                self.first = now
            self.last = now
            self.count += found
            if self.target and self.count >= self.target:
                self.done.set()
        self.tail = chunk[-(len(MARKER) - 1) :]


async def _load_main(conn: Connection, ports: list[int], token: str) -> None:
    loop = asyncio.get_running_loop()
    subs: list[_Subscriber] = []
    for port in ports:
        ready = asyncio.Event()
        sub = _Subscriber(token, port, ready)
        await loop.create_connection(lambda s=sub: s, "127.0.0.1", port)  # type: ignore[misc]
        subs.append(sub)
    await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in subs)), 60)
    conn.send(("ready", len(subs)))
    target = await loop.run_in_executor(None, conn.recv)
    for sub in subs:
        sub.target = target
        if sub.count >= target:
            sub.done.set()
    conn.send(("armed", None))
    try:
        await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in subs)), 120)
    except TimeoutError:
        pass
    conn.send(
        (
            "result",
            {
                "received": sum(s.count for s in subs),
                "last": max((s.last or 0.0) for s in subs),
            },
        )
    )


def _load_process(conn: Connection, ports: list[int], token: str) -> None:
    die_with_parent()
    try:
        import uvloop

        uvloop.run(_load_main(conn, ports, token))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class LoadPool:
    """The load processes of one fan-out run (``ports[i]`` is subscriber i's node)."""

    def __init__(self, ports: list[int], token: str, processes: int = 2) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_load_process, args=(child, ports[i::processes], token), daemon=True
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def gather(self, kind: str, timeout: float) -> list[Any]:
        out = []
        deadline = time.monotonic() + timeout
        for conn in self.conns:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise BenchError(f"a load process did not report {kind!r} in time")
            got, value = conn.recv()
            if got != kind:
                raise BenchError(f"a load process said {got!r}: {value}")
            out.append(value)
        return out

    def send(self, value: Any) -> None:
        for conn in self.conns:
            conn.send(value)

    def close(self) -> None:
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


# --- nodes ----------------------------------------------------------------------------------


@dataclass
class Node:
    port: int
    server: ServerProcess

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_nodes(count: int, env: dict[str, str], tmp: Path, stack: ExitStack) -> list[Node]:
    nodes = []
    for i in range(count):
        port = free_port()
        server = ServerProcess(
            [*QS, "serve", "--port", str(port), "--data-dir", str(tmp / f"node{i}")],
            log_path=tmp / f"node{i}.log",
            env=env,
        )
        stack.enter_context(server)
        nodes.append(Node(port, server))
    for node in nodes:
        node.server.wait_ready(node.port, 60)
    return nodes


async def wait_ready(nodes: Sequence[Node]) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        for node in nodes:
            deadline = time.monotonic() + 60
            while (await http.get(node.http_url + "/readyz")).status_code != 200:
                if time.monotonic() > deadline:
                    raise BenchError(f"node on port {node.port} not ready")
                await asyncio.sleep(0.05)


# --- measurements ---------------------------------------------------------------------------


async def publish(url: str, token: str, count: int, window: int = 256) -> float:
    """Publish ``count`` small messages on TOPIC; returns the time of the first send."""
    async with connect(url, subprotocols=["quicksilver.v1.json"], max_size=None) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "auth", "token": token}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        free = asyncio.Semaphore(window)
        answered = 0

        async def reader() -> None:
            nonlocal answered
            while answered < count:
                frame = json.loads(await ws.recv())
                if frame["type"] == "ok":
                    answered += 1
                    free.release()
                elif frame["type"] == "error":
                    raise BenchError(f"publish refused: {frame}")

        task = asyncio.create_task(reader())
        first = time.time()
        for n in range(count):
            await free.acquire()
            await ws.send(json.dumps({"type": "publish", "id": n, "topic": TOPIC, "data": n}))
        await task
        return first


async def fanout(
    nodes: Sequence[Node], token: str, subscribers: int, messages: int
) -> dict[str, Any]:
    ports = [nodes[i % len(nodes)].port for i in range(subscribers)]
    pool = LoadPool(ports, token)
    try:
        ready = await asyncio.to_thread(pool.gather, "ready", 90)
        pool.send(messages)
        await asyncio.to_thread(pool.gather, "armed", 30)
        redis_before = await redis_script_usec()
        first = await publish(nodes[0].ws_url, token, messages)
        results = await asyncio.to_thread(pool.gather, "result", 180)
        redis_after = await redis_script_usec()
    finally:
        pool.close()
    received = sum(r["received"] for r in results)
    last = max(r["last"] for r in results)
    expected = subscribers * messages
    seconds = last - first
    return {
        "subscribers": sum(ready),
        "messages": messages,
        "expected": expected,
        "received": received,
        "seconds": seconds,
        "deliveries_per_s": received / seconds if seconds > 0 else 0.0,
        "redis_usec_per_message": _per(redis_before, redis_after, messages),
    }


async def jobs_run(
    nodes: Sequence[Node], env: dict[str, str], tmp: Path, count: int
) -> dict[str, Any]:
    secret = env["QUICKSILVER_SECRET"]
    from auth.tokens import Secret, mint_token

    worker_token = mint_token(Secret(secret), sub="bench-worker", roles=["worker"])
    admin = mint_admin_token(secret)
    with ExitStack() as stack:
        for i, node in enumerate(nodes):
            worker = ServerProcess(
                [*QS, "worker", "--url", node.ws_url, "--token", worker_token, *WORKER_ARGS],
                log_path=tmp / f"worker{i}.log",
                env=env,
            )
            stack.enter_context(worker)
        headers = {"Authorization": f"Bearer {admin}"}
        async with httpx.AsyncClient(base_url=nodes[0].http_url, headers=headers, timeout=60) as h:
            deadline = time.monotonic() + 60
            while True:
                joined = 0
                for node in nodes:
                    r = await h.get(node.http_url + "/api/v1/workers")
                    joined += len(r.json()["workers"])
                if joined == len(nodes):
                    break
                if time.monotonic() > deadline:
                    raise BenchError("the workers did not join in time")
                await asyncio.sleep(0.05)
            pg_before = postgres_cpu()
            start = time.perf_counter()
            for offset in range(0, count, 1000):
                batch = [
                    {"queue": QUEUE, "payload": {"t": time.time()}}
                    for _ in range(min(1000, count - offset))
                ]
                r = await h.post("/api/v1/jobs", json={"jobs": batch})
                if r.status_code != 201:
                    raise BenchError(f"enqueue refused: {r.status_code} {r.text[:200]}")
            deadline = time.monotonic() + max(120.0, count / 100)
            while True:
                stats = (await h.get("/api/v1/queues")).json()
                if stats.get(QUEUE, {}).get("counts", {}).get("done", 0) >= count:
                    end = time.perf_counter()
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"fewer than {count} jobs done in time")
                await asyncio.sleep(0.02)
            pg_after = postgres_cpu()
    seconds = end - start
    result: dict[str, Any] = {"jobs": count, "seconds": seconds, "jobs_per_s": count / seconds}
    if pg_before is not None and pg_after is not None:
        result["postgres_cpu_ms_per_job"] = 1000 * (pg_after - pg_before) / count
    return result


# --- what Redis and PostgreSQL spend -------------------------------------------------------------


async def redis_script_usec() -> dict[str, float] | None:
    """Redis' cumulative time in scripts (EVALSHA) and calls; None without Redis."""
    try:
        from redis.asyncio import Redis
    except ImportError:
        return None
    client = Redis.from_url(REDIS_URL)
    try:
        stats = await client.info("commandstats")
    except Exception:
        return None
    finally:
        await client.aclose()
    entry = stats.get("cmdstat_evalsha")
    if not isinstance(entry, dict):
        return {"usec": 0.0, "calls": 0.0}
    return {"usec": float(entry["usec"]), "calls": float(entry["calls"])}


def _per(before: dict[str, float] | None, after: dict[str, float] | None, n: int) -> float | None:
    if before is None or after is None or n == 0:
        return None
    return (after["usec"] - before["usec"]) / n


def postgres_cpu() -> float | None:
    """CPU seconds of every ``postgres`` process on this machine (Linux /proc), or None."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    found = False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name.startswith("postgres"):
            fields = stat.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            found = True
    return total / ticks if found else None


# --- one configuration ---------------------------------------------------------------------------


async def drop_run_state(schema: str, prefix: str) -> None:
    import asyncpg
    from redis.asyncio import Redis

    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def run_config(
    label: str, count: int, shared: bool, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    secret = new_secret()
    token = mint_admin_token(secret)
    env = {**os.environ, "QUICKSILVER_SECRET": secret, "QUICKSILVER_LOG_LEVEL": "warning"}
    schema = prefix = ""
    if shared:
        schema = f"qs_bench_{secrets.token_hex(4)}"
        prefix = f"qs-bench-{secrets.token_hex(4)}"
        env["QUICKSILVER_DATABASE_URL"] = f"{DATABASE_URL}?search_path={schema}"
        env["QUICKSILVER_REDIS_URL"] = REDIS_URL
        env["QUICKSILVER_REDIS_PREFIX"] = prefix
    where = tmp / label.replace(" ", "-")
    where.mkdir(parents=True, exist_ok=True)
    try:
        with ExitStack() as stack:
            nodes = start_nodes(count, env, where, stack)
            await wait_ready(nodes)
            fan = await fanout(nodes, token, args.subscribers, args.messages)
            jobs = await jobs_run(nodes, env, where, args.jobs)
    finally:
        if shared:
            await drop_run_state(schema, prefix)
    return {"label": label, "nodes": count, "shared": shared, "fanout": fan, "jobs": jobs}


def services_answer() -> str | None:
    """None when PostgreSQL and Redis answer; else why not."""
    import socket
    from urllib.parse import urlsplit

    for url, port in ((DATABASE_URL, 5432), (REDIS_URL, 6379)):
        parts = urlsplit(url)
        try:
            with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or port), 2):
                pass
        except OSError as exc:
            return f"{url.split('://')[0]} at {parts.hostname}:{parts.port or port}: {exc}"
    return None


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="qs-bench-cluster-"))
    rows = [await run_config("1 node, SQLite, in-process", 1, False, args, tmp)]
    for count in args.nodes:
        label = f"{count} node{'s' if count > 1 else ''}, PostgreSQL + Redis"
        rows.append(await run_config(label, count, True, args, tmp))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench cluster", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--subscribers", type=int, default=300, help="subscribers in all")
    parser.add_argument("--messages", type=int, default=3000, help="messages published")
    parser.add_argument("--jobs", type=int, default=5000, help="jobs in the jobs run")
    parser.add_argument(
        "--nodes",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 2, 3],
        help="node counts to measure on PostgreSQL + Redis (default 1,2,3)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    problem = services_answer()
    if problem:
        print(f"cluster benchmark needs PostgreSQL and Redis (scripts/services): {problem}")
        return 1
    rows = asyncio.run(run(args))
    table = []
    for row in rows:
        fan, jobs = row["fanout"], row["jobs"]
        redis_cost = fan.get("redis_usec_per_message")
        pg_cost = jobs.get("postgres_cpu_ms_per_job")
        table.append(
            [
                row["label"],
                f"{fan['deliveries_per_s']:,.0f}",
                f"{fan['received']}/{fan['expected']}",
                f"{jobs['jobs_per_s']:,.0f}",
                "-" if not row["shared"] or redis_cost is None else f"{redis_cost:.1f} us",
                "-" if not row["shared"] or pg_cost is None else f"{pg_cost:.2f} ms",
            ]
        )
    print(
        format_table(
            [
                "configuration",
                "deliveries/s",
                "delivered",
                "jobs/s",
                "Redis per msg",
                "PG CPU per job",
            ],
            table,
        )
    )
    print(
        f"{args.subscribers} subscribers spread over the nodes, {args.messages} messages from the"
        f" first node; {args.jobs} jobs enqueued on the first node, one worker per node."
    )
    print(
        "All nodes, Redis, PostgreSQL and the load share this machine's CPUs: the figures show"
        " the overhead per node, not scaling across machines."
    )
    write_json(args.json, {"scenario": "cluster", "machine": machine_info(), "results": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
