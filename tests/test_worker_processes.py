"""Real worker processes (``quicksilver worker``) against a real broker, including crashes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import httpx

from .helpers import (
    UNIT,
    free_port,
    http,
    running_server,
    start_process,
    stop_process,
    stop_process_async,
    token,
    until,
    until_async,
    wait_http_ready,
)

WORKER = token(sub="worker", roles=("worker",), ttl=None)
ADMIN = token(sub="admin", roles=("admin",), ttl=None)


def start_worker(url: str, queue: str, *extra: str) -> subprocess.Popen[str]:
    return start_process(
        [
            "worker",
            "--url",
            url,
            "--token",
            WORKER,
            "--queue",
            queue,
            "--app",
            "tests.worker_app",
            *extra,
        ]
    )


async def wait_exit(proc: subprocess.Popen[str], units: float = 60.0) -> int:
    return await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout=units * UNIT)


async def test_thousand_jobs_three_workers_each_done_once(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data") as srv:
        async with http(srv, ADMIN) as h:
            r = await h.post(
                "/api/v1/jobs",
                json={"jobs": [{"queue": "t-square", "payload": {"n": n}} for n in range(1000)]},
            )
            assert r.status_code == 201
            ids = [j["job"] for j in r.json()["jobs"]]
            workers = [
                start_worker(srv.ws_url, "t-square", "--concurrency", "8", "--burst")
                for _ in range(3)
            ]
            try:
                codes = [await wait_exit(w) for w in workers]
            finally:
                outputs = [await stop_process_async(w) for w in workers]
            assert codes == [0, 0, 0], outputs
            pids = set()
            for n, job in enumerate(ids):
                body = (await h.get(f"/api/v1/jobs/{job}")).json()
                assert body["state"] == "done", body
                assert body["attempt"] == 1
                assert body["result"]["square"] == n * n
                pids.add(body["result"]["pid"])
            assert len(pids) >= 2, "the work should be spread over the workers"
            assert srv.broker.metrics.jobs_done == 1000


async def test_worker_killed_mid_job_finishes_elsewhere(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", job_lease=30.0) as srv:
        first = start_worker(srv.ws_url, "t-stall")
        second = None
        try:
            async with http(srv, ADMIN) as h:
                job = (await h.post("/api/v1/jobs", json={"queue": "t-stall"})).json()["job"]

                async def running() -> bool:
                    body = (await h.get(f"/api/v1/jobs/{job}")).json()
                    return bool(body["state"] == "active" and body["progress"])

                await until_async(running, units=20)
                os.kill(first.pid, signal.SIGKILL)
                second = start_worker(srv.ws_url, "t-stall")

                async def finished() -> bool:
                    return bool((await h.get(f"/api/v1/jobs/{job}")).json()["state"] == "done")

                # Requeued at the disconnect, well before the 30 s lease would run out.
                await until_async(finished, units=20)
                body = (await h.get(f"/api/v1/jobs/{job}")).json()
                assert body["attempt"] == 2
                assert body["result"]["pid"] == second.pid
        finally:
            await stop_process_async(first)
            if second is not None:
                await stop_process_async(second)


async def test_broker_killed_and_restarted_loses_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ws_url = f"ws://127.0.0.1:{port}/ws"
    serve_args = ["serve", "--port", str(port), "--data-dir", str(data_dir)]
    broker = start_process(serve_args)
    worker = None
    try:
        await wait_http_ready(url)
        async with http_client(url) as h:
            r = await h.post(
                "/api/v1/jobs",
                json={
                    "jobs": [{"queue": "t-slow", "payload": {"seconds": 0.01}} for _ in range(300)]
                },
            )
            assert r.status_code == 201
            ids = [j["job"] for j in r.json()["jobs"]]
            worker = start_worker(ws_url, "t-slow", "--concurrency", "4")

            async def some_done() -> bool:
                stats = (await h.get("/api/v1/queues")).json()
                return bool(stats["t-slow"]["counts"]["done"] >= 40)

            await until_async(some_done, units=30)
        broker.send_signal(signal.SIGKILL)
        broker.wait(timeout=10)
        broker = start_process(serve_args)
        await wait_http_ready(url)
        async with http_client(url) as h:

            async def all_done() -> bool:
                counts = (await h.get("/api/v1/queues")).json()["t-slow"]["counts"]
                return bool(counts["done"] == 300)

            await until_async(all_done, units=60)
            for job in ids:
                body = (await h.get(f"/api/v1/jobs/{job}")).json()
                assert body["state"] == "done" and body["result"]["attempt"] == body["attempt"]
        assert worker.poll() is None, "the worker reconnects instead of exiting"
    finally:
        if worker is not None:
            stop_process(worker)
        stop_process(broker)


def http_client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10 * UNIT
    )


async def test_sigterm_drains_the_worker(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data") as srv:
        worker = start_worker(srv.ws_url, "t-slow", "--concurrency", "2")
        try:
            async with http(srv, ADMIN) as h:
                r = await h.post(
                    "/api/v1/jobs",
                    json={
                        "jobs": [
                            {"queue": "t-slow", "payload": {"seconds": 0.5 * UNIT}}
                            for _ in range(4)
                        ]
                    },
                )
                ids = [j["job"] for j in r.json()["jobs"]]
                await until(
                    lambda: sum(len(s.held) for s in srv.broker.jobs.workers.values()) == 2,
                    units=20,
                )
                worker.send_signal(signal.SIGTERM)
                assert await wait_exit(worker, 20) == 0
                states = [(await h.get(f"/api/v1/jobs/{j}")).json()["state"] for j in ids]
                # The two it held were finished; the two it had not started were left queued.
                assert sorted(states) == ["done", "done", "queued", "queued"]
        finally:
            await stop_process_async(worker)
