"""Jobs benchmark: end-to-end jobs/s and pickup latency, SQLite store, real worker processes.

``python -m bench jobs [--jobs N] [--workers W] [--concurrency C] [--rate R] [--seconds S]``

Three figures, in one run, each for the default store and for the baseline that runs every
SQLite write group in the writer thread (``QUICKSILVER_SQLITE_INLINE_WRITES=0``, the design
before small job writes moved onto the event loop):

- ``store only``: the SQLite store driven in-process (enqueue → claim → complete, 50 concurrent
  callers): the ceiling that the network path adds to.
- ``end to end``: N jobs enqueued over WebSocket (pipelined) while W worker processes
  (``quicksilver worker``) take them over WebSocket and store each result; from the first enqueue
  to the last result stored.
- ``pickup latency`` at a steady R jobs/s: each job carries its send time; the worker's handler
  returns ``start - sent`` as the result, so the figure covers producer → broker → store →
  dispatch → worker. p50/p99/max over every job.

Everything runs on this machine: broker, producer and workers share the CPUs, which the table
notes. Writes bench/results/jobs.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from auth.tokens import Secret, mint_token
from broker.store.base import NewJob
from broker.store.sqlite import SQLiteStore

from .common import (
    ROOT,
    ServerProcess,
    format_table,
    free_port,
    machine_info,
    new_secret,
    write_json,
)

QUEUE = "bench-jobs"
RESULTS = ROOT / "bench" / "results" / "jobs.json"


async def store_only(path: Path, inline: bool, jobs: int = 5000, callers: int = 50) -> float:
    """jobs/s for enqueue → claim → complete through the store alone."""
    store = SQLiteStore(path, inline=inline)
    await store.open()
    try:
        per = jobs // callers

        async def loop(n: int) -> None:
            for _ in range(per):
                await store.enqueue(NewJob(queue=QUEUE, payload={"n": n}))
                claimed = await store.claim(f"w{n}", [QUEUE], 1, 30.0)
                for rec in claimed:
                    await store.complete(rec.id, rec.attempt, None, worker=f"w{n}")

        start = time.perf_counter()
        await asyncio.gather(*(loop(n) for n in range(callers)))
        return per * callers / (time.perf_counter() - start)
    finally:
        await store.close()


class Producer:
    """One WebSocket connection enqueuing jobs with at most ``window`` unanswered."""

    def __init__(self, url: str, token: str, window: int = 256) -> None:
        self.url = url
        self.token = token
        self.window = asyncio.Semaphore(window)

    async def run(self, count: int, rate: float | None) -> None:
        async with connect(
            self.url,
            subprotocols=["quicksilver.v1.json"],  # type: ignore[list-item]
            max_size=None,
        ) as ws:
            await ws.send(json.dumps({"type": "auth", "token": self.token}))
            assert json.loads(await ws.recv())["type"] == "welcome"
            answered = 0

            async def reader() -> None:
                nonlocal answered
                while answered < count:
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "ok":
                        answered += 1
                        self.window.release()
                    elif frame["type"] == "error":
                        raise RuntimeError(f"enqueue refused: {frame}")

            task = asyncio.create_task(reader())
            start = time.perf_counter()
            for n in range(count):
                if rate:
                    due = start + n / rate
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await self.window.acquire()
                await ws.send(
                    json.dumps(
                        {"type": "enqueue", "id": n, "queue": QUEUE, "payload": {"t": time.time()}}
                    )
                )
            await task


async def wait_done(http: httpx.AsyncClient, count: int, limit: float) -> float:
    """Poll queue stats until ``count`` jobs are done; return the time it was seen."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        stats = (await http.get("/api/v1/queues")).json()
        if stats.get(QUEUE, {}).get("counts", {}).get("done", 0) >= count:
            return time.perf_counter()
        await asyncio.sleep(0.02)
    raise TimeoutError(f"fewer than {count} jobs done within {limit:.0f} s")


async def pickups(http: httpx.AsyncClient) -> list[float]:
    out: list[float] = []
    before: str | None = None
    while True:
        params: dict[str, Any] = {"queue": QUEUE, "state": "done", "limit": 1000}
        if before:
            params["before"] = before
        page = (await http.get("/api/v1/jobs", params=params)).json()
        for job in page["jobs"]:
            result = job.get("result")
            if isinstance(result, dict) and "pickup" in result:
                out.append(float(result["pickup"]))
        before = page.get("next")
        if not before:
            return out


async def poll(check: Callable[[], Awaitable[bool]], limit: float) -> None:
    """Ask ``check`` every 50 ms until it is true (HTTP state has no event to wait on)."""
    deadline = time.monotonic() + limit
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready within {limit:.0f} s")
        await asyncio.sleep(0.05)


async def ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200


async def joined(http: httpx.AsyncClient, workers: int) -> bool:
    return len((await http.get("/api/v1/workers")).json()["workers"]) == workers


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="qs-bench-jobs-"))
    secret = new_secret()
    admin = mint_token(Secret(secret), sub="bench", roles=["admin"])
    worker_token = mint_token(Secret(secret), sub="bench-worker", roles=["worker"])
    env_extra = {"QUICKSILVER_SECRET": secret, "QUICKSILVER_LOG_LEVEL": "warning"}
    rows: dict[str, Any] = {}

    modes = {"inline": "1", "thread": "0"}

    async def with_broker(phase: str, count: int, rate: float | None, mode: str) -> dict[str, Any]:
        phase = f"{phase}-{mode}"
        port = free_port()
        env = {**os.environ, **env_extra, "QUICKSILVER_SQLITE_INLINE_WRITES": modes[mode]}
        server = ServerProcess(
            [
                sys.executable,
                "-m",
                "quicksilver",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(tmp / phase),
            ],
            log_path=tmp / f"{phase}-server.log",
            env=env,
        )
        url = f"ws://127.0.0.1:{port}/ws"
        workers = [
            ServerProcess(
                [
                    sys.executable,
                    "-m",
                    "quicksilver",
                    "worker",
                    "--url",
                    url,
                    "--token",
                    worker_token,
                    "--queue",
                    QUEUE,
                    "--app",
                    "bench.jobs_app",
                    "--concurrency",
                    str(args.concurrency),
                ],
                log_path=tmp / f"{phase}-worker{i}.log",
                env=env,
            )
            for i in range(args.workers)
        ]
        with server:
            server.wait_ready(port, 30)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {admin}"},
                timeout=30,
            ) as http:
                await poll(lambda: ready(http), 30)
                for w in workers:
                    w.start()
                try:
                    await poll(lambda: joined(http, args.workers), 30)
                    start = time.perf_counter()
                    await Producer(url, admin).run(count, rate)
                    end = await wait_done(http, count, limit=max(60.0, count / 200))
                    result: dict[str, Any] = {
                        "jobs": count,
                        "seconds": end - start,
                        "jobs_per_s": count / (end - start),
                    }
                    if rate:
                        values = await pickups(http)
                        result.update(
                            rate=rate,
                            pickup_p50_ms=1000 * statistics.median(values),
                            pickup_p99_ms=1000 * percentile(values, 0.99),
                            pickup_max_ms=1000 * max(values),
                            samples=len(values),
                        )
                    return result
                finally:
                    for w in workers:
                        w.stop()

    # Baseline and default alternate phase by phase, so a slow spell of this shared machine
    # does not land on one of them only.
    for mode in ("thread", "inline"):
        rows.setdefault(mode, {})["store_only_jobs_per_s"] = await store_only(
            tmp / f"store-only-{mode}.db", inline=mode == "inline"
        )
    for mode in ("thread", "inline"):
        rows[mode]["end_to_end"] = await with_broker("throughput", args.jobs, None, mode)
    for mode in ("thread", "inline"):
        rows[mode]["latency"] = await with_broker(
            "latency", int(args.rate * args.seconds), args.rate, mode
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench jobs", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs in the throughput run")
    parser.add_argument("--workers", type=int, default=4, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=32, help="jobs held per worker")
    parser.add_argument("--rate", type=float, default=1500.0, help="jobs/s in the latency run")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the latency run")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args))
    new, old = rows["inline"], rows["thread"]

    def line(label: str, get: Callable[[dict[str, Any]], float], fmt: str, note: str) -> list[str]:
        return [label, fmt.format(get(new)), fmt.format(get(old)), note]

    print(
        format_table(
            ["measure", "quicksilver", "baseline: writer thread", "notes"],
            [
                line(
                    "store only (in-process, 50 callers)",
                    lambda r: r["store_only_jobs_per_s"],
                    "{:,.0f} jobs/s",
                    "enqueue+claim+complete, group commit",
                ),
                line(
                    "end to end",
                    lambda r: r["end_to_end"]["jobs_per_s"],
                    "{:,.0f} jobs/s",
                    f"{args.jobs} jobs, {args.workers} worker processes x {args.concurrency}",
                ),
                line(
                    "pickup p50",
                    lambda r: r["latency"]["pickup_p50_ms"],
                    "{:.2f} ms",
                    f"at {args.rate:.0f} jobs/s",
                ),
                line(
                    "pickup p99",
                    lambda r: r["latency"]["pickup_p99_ms"],
                    "{:.2f} ms",
                    f"{new['latency']['samples']} jobs",
                ),
                line("pickup max", lambda r: r["latency"]["pickup_max_ms"], "{:.2f} ms", ""),
            ],
        )
    )
    print("broker, producer and workers share this machine's CPUs.")
    write_json(args.json, {"scenario": "jobs", "machine": machine_info(), "results": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
