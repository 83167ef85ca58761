"""Report pipeline benchmark: CPAN Testers reports through the whole pipeline, end to end.

``python -m bench.pipeline [--reports N] [--rates R,...] [--seconds S] [--report-bytes B]``
(also ``python -m bench pipeline ...``)

Every phase runs against a fresh broker (``quicksilver serve``, SQLite in a temporary directory)
and ``--workers`` fresh worker processes (``quicksilver worker --queue reports``), with the
uploads of the invented CPAN recorded first. Reports come from
:class:`broker.cpantesters.replay.Traffic` (fixture-shaped, about ``--report-bytes`` each) and
are posted to ``POST /v3/report`` over keep-alive HTTP connections; a WebSocket subscriber on
``reports/new`` sees each summary published.

- ``throughput``: N reports posted as fast as ``--connections`` requests in flight allow; the
  figure is N divided by the time from the first POST to the last ``reports/new`` message.
- ``steady R/s``: reports posted at R per second for S seconds. Latency per report, two ways:
  ``server`` is the broker's own received→summary-published time (``/api/v1/stats``, exact
  p50/p99 over the phase), ``client`` is POST sent → ``reports/new`` message received by the
  subscriber (adds the HTTP answer and the WebSocket delivery).

Broker, workers and the load generator share this machine's CPUs; the table says how busy the
machine was before the run. Writes bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from auth.tokens import Secret, mint_token
from broker.cpantesters.replay import HttpPool, Traffic, post_uploads, replay

from .common import (
    HOST,
    RESULTS_DIR,
    BenchError,
    ServerProcess,
    format_table,
    free_port,
    machine_busy,
    machine_info,
    new_secret,
    write_json,
)

RESULTS = RESULTS_DIR / "pipeline.json"


@dataclass
class Phase:
    """One measured phase and its figures."""

    name: str
    target_rate: float | None
    reports: int
    accepted: int = 0
    published: int = 0
    seconds: float = 0.0
    accept_rate: float = 0.0
    end_to_end_rate: float = 0.0
    client_p50_ms: float | None = None
    client_p99_ms: float | None = None
    server_p50_ms: float | None = None
    server_p99_ms: float | None = None
    broker_cpu_s: float | None = None
    worker_cpu_s: float | None = None
    errors: list[str] = field(default_factory=list)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


class Stack:
    """A broker and its workers in a temporary directory, stopped on exit."""

    def __init__(self, args: argparse.Namespace, workdir: Path, secret: str) -> None:
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.ws_url = f"ws://{HOST}:{self.port}/ws"
        env = {
            "QUICKSILVER_SECRET": secret,
            "QUICKSILVER_LOG_LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
        }
        environ = {**os.environ, **env}
        self.broker = ServerProcess(
            [
                sys.executable,
                "-m",
                "quicksilver",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(workdir / "data"),
            ],
            log_path=workdir / "broker.log",
            env=environ,
        )
        worker_token = mint_token(Secret(secret), sub="bench-worker", roles=["worker"])
        self.workers = [
            ServerProcess(
                [
                    sys.executable,
                    "-m",
                    "quicksilver",
                    "worker",
                    "--url",
                    self.ws_url,
                    "--token",
                    worker_token,
                    "--queue",
                    "reports",
                    "--concurrency",
                    str(args.concurrency),
                ],
                log_path=workdir / f"worker{i}.log",
                env=environ,
            )
            for i in range(args.workers)
        ]

    def __enter__(self) -> Stack:
        self.broker.start()
        self.broker.wait_ready(self.port, 30)
        for worker in self.workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self.workers:
            worker.stop()
        self.broker.stop()

    def cpu(self) -> tuple[float | None, float | None]:
        worker_times = [w.cpu_seconds() for w in self.workers]
        known = [t for t in worker_times if t is not None]
        return self.broker.cpu_seconds(), (sum(known) if known else None)


async def _wait_workers(base: str, count: int, token: str, limit: float) -> None:
    pool = HttpPool(base, size=1)
    deadline = time.monotonic() + limit
    try:
        while True:
            status, _h, body = await pool.request(
                "GET", "/api/v1/workers", headers={"Authorization": f"Bearer {token}"}
            )
            if status == 200 and len(json.loads(body)["workers"]) >= count:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{count} worker(s) did not join within {limit:.0f} s")
            await asyncio.sleep(0.1)
    finally:
        await pool.close()


async def run_phase(
    stack: Stack,
    phase: Phase,
    args: argparse.Namespace,
    admin: str,
    traffic: Traffic,
) -> Phase:
    """Post the phase's reports and collect its figures."""
    await _wait_workers(stack.base, args.workers, admin, 30)
    pool = HttpPool(stack.base, size=1)
    try:
        await post_uploads(pool, admin, traffic.uploads())
    finally:
        await pool.close()
    sent_at: dict[str, float] = {}
    arrived: dict[str, float] = {}
    all_arrived = asyncio.Event()
    posting_done = False

    async with connect(stack.ws_url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "auth"}))
        await ws.recv()
        await ws.send(json.dumps({"type": "subscribe", "id": 1, "topic": "reports/new"}))
        await ws.recv()

        async def listen() -> None:
            async for raw in ws:
                now = time.perf_counter()
                frame = json.loads(raw)
                if frame.get("type") == "message":
                    arrived[frame["data"]["guid"]] = now
                    if posting_done and sent_at.keys() <= arrived.keys():
                        all_arrived.set()

        listener = asyncio.create_task(listen())

        def accepted(report_id: str, at: float) -> None:
            sent_at[report_id] = at

        # Generated and encoded before the clock starts: the load generator shares the CPUs.
        bodies = [
            json.dumps(traffic.report(), separators=(",", ":")).encode()
            for _ in range(phase.reports)
        ]
        cpu_before = stack.cpu()
        began = time.perf_counter()
        stats = await replay(
            stack.base,
            rate=phase.target_rate or 1e9,
            count=phase.reports,
            connections=args.connections,
            uploads=False,
            progress=None,
            reports=bodies,
            on_accepted=accepted,
        )
        posted = time.perf_counter()
        posting_done = True
        if sent_at.keys() <= arrived.keys():
            all_arrived.set()
        try:
            await asyncio.wait_for(all_arrived.wait(), args.timeout)
        except TimeoutError:
            phase.errors.append(
                f"{len(sent_at) - len(sent_at.keys() & arrived.keys())} report(s) not "
                f"published within {args.timeout:.0f} s; broker log: {stack.broker.log_tail()}; "
                + "; ".join(f"worker log: {w.log_tail()}" for w in stack.workers)
            )
        listener.cancel()
        cpu_after = stack.cpu()
    phase.accepted = stats.accepted
    if stats.failed or stats.refused:
        phase.errors.append(f"{stats.failed + stats.refused} POST(s) failed: {stats.last_error}")
    done = [arrived[i] for i in sent_at if i in arrived]
    phase.published = len(done)
    end = max(done) if done else posted
    phase.seconds = round(end - began, 3)
    phase.accept_rate = round(stats.accepted / (posted - began), 1) if posted > began else 0.0
    phase.end_to_end_rate = round(len(done) / (end - began), 1) if end > began else 0.0
    client = [arrived[i] - t for i, t in sent_at.items() if i in arrived]
    phase.client_p50_ms = _ms(_quantile(client, 0.50))
    phase.client_p99_ms = _ms(_quantile(client, 0.99))
    pool = HttpPool(stack.base, size=1)
    try:
        _status, _h, body = await pool.request("GET", "/api/v1/stats")
    finally:
        await pool.close()
    latency = json.loads(body)["latency"]
    phase.server_p50_ms = _ms(latency["p50"])
    phase.server_p99_ms = _ms(latency["p99"])
    if cpu_before[0] is not None and cpu_after[0] is not None:
        phase.broker_cpu_s = round(cpu_after[0] - cpu_before[0], 2)
    if cpu_before[1] is not None and cpu_after[1] is not None:
        phase.worker_cpu_s = round(cpu_after[1] - cpu_before[1], 2)
    return phase


def _phases(args: argparse.Namespace) -> list[Phase]:
    phases = [
        Phase(f"steady {rate:g}/s", rate, max(1, int(rate * args.seconds))) for rate in args.rates
    ]
    if args.reports > 0:
        phases.append(Phase("throughput", None, args.reports))
    return phases


async def run(args: argparse.Namespace) -> list[Phase]:
    results = []
    for phase in _phases(args):
        with tempfile.TemporaryDirectory(prefix="qs-bench-pipeline-") as tmp:
            secret = new_secret()
            admin = mint_token(Secret(secret), sub="bench", roles=["admin"])
            with Stack(args, Path(tmp), secret) as stack:
                traffic = Traffic(args.seed, test_output=max(0, args.report_bytes - 3000))
                try:
                    results.append(await run_phase(stack, phase, args, admin, traffic))
                except BenchError as exc:
                    phase.errors.append(str(exc))
                    results.append(phase)
                print(f"  {phase.name}: done", file=sys.stderr, flush=True)
    return results


def _cell(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:g}{unit}"


def report_table(phases: Sequence[Phase]) -> str:
    rows = [
        [
            p.name,
            str(p.published) + ("" if p.published == p.reports else f"/{p.reports}"),
            _cell(p.accept_rate),
            _cell(p.end_to_end_rate),
            f"{_cell(p.server_p50_ms)} / {_cell(p.server_p99_ms)}",
            f"{_cell(p.client_p50_ms)} / {_cell(p.client_p99_ms)}",
            f"{_cell(p.broker_cpu_s)} / {_cell(p.worker_cpu_s)}",
        ]
        for p in phases
    ]
    return format_table(
        [
            "phase",
            "reports",
            "POST/s",
            "end-to-end/s",
            "server p50/p99 ms",
            "client p50/p99 ms",
            "CPU s broker/workers",
        ],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline",
        description="CPAN Testers reports through the whole pipeline (POST → worker → summary "
        "published), on a fresh SQLite broker per phase.",
    )
    parser.add_argument("--reports", type=int, default=5000, help="reports in the throughput run")
    parser.add_argument(
        "--rates",
        type=lambda text: [float(v) for v in text.split(",") if v],
        default=[100.0],
        help="comma-separated steady rates (reports/s) for the latency runs (default 100)",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each steady run")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=64, help="jobs held per worker")
    parser.add_argument("--connections", type=int, default=16, help="HTTP connections posting")
    parser.add_argument(
        "--report-bytes", type=int, default=10_000, help="approximate size of each report"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the invented traffic")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the last")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.concurrency < 1 or args.connections < 1:
        parser.error("--workers, --concurrency and --connections must be at least 1")
    busy = machine_busy()
    print(
        f"pipeline: {len(_phases(args))} phase(s), {args.workers} worker process(es), "
        f"reports of about {args.report_bytes} bytes",
        file=sys.stderr,
    )
    try:
        import uvloop

        phases = uvloop.run(run(args))
    except ImportError:  # pragma: no cover
        phases = asyncio.run(run(args))
    note = (
        f"broker, {args.workers} worker process(es) and the load generator share this machine"
        + ("" if busy is None else f" (busy before the run: {busy:.2f} CPUs)")
    )
    print(report_table(phases))
    print(note)
    for p in phases:
        for error in p.errors:
            print(f"{p.name}: {error}", file=sys.stderr)
    document: dict[str, Any] = {
        "benchmark": "pipeline",
        "machine": machine_info({"busy_before_run": busy}),
        "config": {k: v for k, v in vars(args).items() if k != "json" and not isinstance(v, Path)},
        "note": note,
        "results": [asdict(p) for p in phases],
    }
    write_json(args.json, document)
    print(f"written to {args.json}")
    return 1 if any(p.errors for p in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
