"""Latency benchmark: publish → deliver percentiles at a fixed delivery rate.

For each selected server, one at a time: start it on a free port, connect S subscribers of one
topic (spread over load-generator processes, see :mod:`bench.loadgen`), then publish R messages
per second for D seconds from one publisher that does not wait for acknowledgements (an open
loop: a server that falls behind shows it as latency, not as a slower publisher). Each message
body starts with the publisher's ``time.time()`` taken just before the write; each subscriber
takes ``time.time()`` when the frame reaches it and records the difference. Both clocks are the
same machine clock. Samples of messages sent in the first ``warmup`` seconds are dropped.

Two shapes of the same 50,000 deliveries/s are measured by default:

- ``100x500``: 100 subscribers, 500 messages/s, the shape the p99 target is checked in. Each
  message is 100 deliveries, so the figure is mostly the server's path (read, decode, route,
  write) plus loopback.
- ``1000x50``: 1,000 subscribers, 50 messages/s. Each message is a burst of 1,000 writes: on
  loopback each write also runs the receiving side's TCP work, so the last subscriber hears a
  message milliseconds after the first on any server, and the load generator (one CPU) needs
  milliseconds more to read them all. Compare servers with each other in this shape.

Percentiles are nearest-rank over every delivery sample. The server is pinned to a CPU of its
own and the clients to the others where the machine has two or more.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import uvloop

from bench.baselines.servers import SERVERS, Launch, ServerSkipped, ServerSpec, start_server
from bench.baselines.wire import PAYLOAD_SIZE, TOPIC
from bench.chart import grouped_bars
from bench.common import (
    RESULTS_DIR,
    BenchError,
    CpuPlan,
    ServerStartError,
    format_table,
    machine_busy,
    machine_info,
    pinned,
    plan_cpus,
    raise_nofile_limit,
    write_json,
)
from bench.loadgen import (
    ClientGroup,
    ClientPool,
    Phase,
    RatePublisher,
    connect_publisher,
    describe,
    merge_results,
    plan_jobs,
)

TARGET_P99_MS = 5.0
TARGET_RATE = 50_000
_BUSY_MACHINE = 0.15


@dataclass(frozen=True)
class Shape:
    """``subscribers`` of one topic, ``rate`` messages per second."""

    name: str
    subscribers: int
    rate: float

    @property
    def deliveries_per_s(self) -> float:
        return self.subscribers * self.rate


TARGET_SHAPE = Shape("100x500", subscribers=100, rate=500.0)
"""The shape the p99 target is checked in: 50,000 deliveries/s, 100 per message."""

SHAPES: dict[str, Shape] = {
    shape.name: shape for shape in (TARGET_SHAPE, Shape("1000x50", subscribers=1000, rate=50.0))
}


@dataclass(frozen=True)
class LatencyConfig:
    """One invocation. ``seconds`` of publishing per server and shape, of which the first
    ``warmup`` are not counted; ``timeout`` bounds how long after the last publish the last
    delivery may arrive."""

    shapes: tuple[Shape, ...] = tuple(SHAPES.values())
    seconds: float = 5.0
    warmup: float = 1.0
    processes: int = 2
    servers: tuple[str, ...] = tuple(SERVERS)
    timeout: float = 20.0
    setup_timeout: float = 60.0
    connect_concurrency: int = 50
    pin: bool = True
    idle_check: float = 0.5
    json_path: Path = RESULTS_DIR / "latency.json"
    chart: bool = True

    def validate(self) -> None:
        """Raise ValueError on a configuration that cannot run."""
        if not self.shapes or not self.servers:
            raise ValueError("need at least one shape and one server")
        for shape in self.shapes:
            if shape.subscribers < 1 or shape.rate <= 0:
                raise ValueError("a shape needs at least one subscriber and a positive rate")
            if self.processes > shape.subscribers:
                raise ValueError("cannot have more subscriber processes than subscribers")
            if shape.subscribers / self.processes > 19_000:
                raise ValueError("more than 19,000 subscribers per process exceeds the fd limit")
        if self.processes < 1:
            raise ValueError("processes must be at least 1")
        if self.seconds <= 0 or not 0 <= self.warmup < self.seconds:
            raise ValueError("seconds must be positive and warmup shorter than seconds")
        unknown = [name for name in self.servers if name not in SERVERS]
        if unknown:
            raise ValueError(f"unknown server(s) {', '.join(unknown)}; known: {', '.join(SERVERS)}")


@dataclass
class LatencyResult:
    """One server in one shape; latencies in milliseconds."""

    server: str
    shape: str
    description: str
    subscribers: int
    rate: float
    status: Literal["ok", "error", "skipped"] = "ok"
    error: str | None = None
    messages: int = 0
    expected: int = 0
    delivered: int = 0
    samples: int = 0
    deliveries_per_s: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None
    mean_ms: float | None = None
    load_generator_cpu: float | None = None
    other_load_before_run: float | None = None
    server_version: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0..1) of an ascending, non-empty sequence."""
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


def summarize(result: LatencyResult, latencies: Sequence[float]) -> None:
    """Fill the percentile fields of ``result`` from latencies in seconds."""
    ordered = sorted(latencies)
    result.samples = len(ordered)
    if not ordered:
        return
    result.p50_ms = 1000 * percentile(ordered, 0.50)
    result.p90_ms = 1000 * percentile(ordered, 0.90)
    result.p99_ms = 1000 * percentile(ordered, 0.99)
    result.p999_ms = 1000 * percentile(ordered, 0.999)
    result.max_ms = 1000 * ordered[-1]
    result.mean_ms = 1000 * sum(ordered) / len(ordered)


async def _publish(
    launch: Launch, shape: Shape, count: int, cfg: LatencyConfig, on_ready: Callable[[], None]
) -> tuple[float, float]:
    dialect = launch.dialect
    transport, listener = await connect_publisher(
        lambda: RatePublisher(
            dialect, rate=shape.rate, count=count, topics=[TOPIC], body_size=PAYLOAD_SIZE
        ),
        launch.url(),
        dialect.headers(),
        cfg.setup_timeout,
    )
    try:
        on_ready()
        cpu0 = time.process_time()
        listener.start()
        try:
            async with asyncio.timeout(cfg.seconds + cfg.timeout):
                await listener.done
        except TimeoutError:
            raise BenchError(
                f"{listener.sent} sent, only {listener.acked} acknowledged within "
                f"{cfg.seconds + cfg.timeout:.0f} s"
            ) from None
        return listener.t0, time.process_time() - cpu0
    finally:
        transport.disconnect(graceful=False)


def _measure_launched(
    launch: Launch, result: LatencyResult, shape: Shape, cfg: LatencyConfig, plan: CpuPlan
) -> None:
    dialect = launch.dialect
    jobs = plan_jobs(
        url=launch.url(),
        headers=dialect.headers(),
        binary=dialect.binary,
        failure=dialect.failure,
        groups=[ClientGroup(dialect.subscribe_steps(TOPIC), dialect.delivery_marker_for(TOPIC))],
        members=[0] * shape.subscribers,
        processes=cfg.processes,
        cpus=plan.clients,
        setup_timeout=cfg.setup_timeout,
        connect_concurrency=cfg.connect_concurrency,
    )
    count = max(1, round(shape.rate * cfg.seconds))
    result.messages = count
    result.expected = count * shape.subscribers
    with ClientPool(jobs) as pool:
        pool.connect(time.time() + cfg.setup_timeout + 30)
        phase = Phase("latency", time.time() + cfg.seconds + cfg.timeout + 30, (count,))
        t0, publisher_cpu = uvloop.run(_publish(launch, shape, count, cfg, lambda: pool.arm(phase)))
        merged = merge_results(pool.results(phase))
    result.delivered = merged["received"]
    if merged["complete"] < merged["clients"]:
        lost = merged["lost"]
        reason = f"; {lost} subscriber connection(s) closed by the server" if lost else ""
        raise BenchError(
            f"{result.delivered} of {result.expected} deliveries; "
            f"{merged['clients'] - merged['complete']} subscriber(s) incomplete{reason}"
        )
    cutoff = t0 + cfg.warmup
    counted = [
        lat for sent, lat in zip(merged["sent"], merged["latencies"], strict=True) if sent >= cutoff
    ]
    summarize(result, counted)
    span = cfg.seconds - cfg.warmup
    result.deliveries_per_s = len(counted) / span if span > 0 else None
    result.load_generator_cpu = (merged["cpu_seconds"] + publisher_cpu) / cfg.seconds
    if result.delivered > result.expected:
        result.notes.append(f"{result.delivered - result.expected} unexpected extra deliveries")


def measure(spec: ServerSpec, shape: Shape, cfg: LatencyConfig, plan: CpuPlan) -> LatencyResult:
    """Measure one server in one shape. Never raises except for KeyboardInterrupt/SystemExit:
    failures are results with status ``error`` (or ``skipped``) and a reason."""
    result = LatencyResult(
        server=spec.name,
        shape=shape.name,
        description=spec.description,
        subscribers=shape.subscribers,
        rate=shape.rate,
    )
    with tempfile.TemporaryDirectory(prefix=f"bench-latency-{spec.name}-") as tmp:
        if cfg.idle_check > 0:
            other = machine_busy(cfg.idle_check)
            result.other_load_before_run = other
            if other is not None and other > _BUSY_MACHINE:
                result.notes.append(
                    f"machine not idle before the run: other processes used {other:.0%} of a "
                    "CPU; the tail figures are unreliable"
                )
        try:
            launch, server = start_server(spec, Path(tmp), plan.server)
        except ServerSkipped as exc:
            result.status, result.error = "skipped", str(exc)
            return result
        except ServerStartError as exc:
            result.status, result.error = "error", f"server failed to start: {exc}"
            return result
        except Exception as exc:
            result.status, result.error = "error", f"cannot start the server: {describe(exc)}"
            return result
        result.server_version = launch.version
        try:
            with pinned(plan.clients):
                _measure_launched(launch, result, shape, cfg, plan)
        except Exception as exc:
            result.status = "error"
            result.error = str(exc) if isinstance(exc, BenchError) else describe(exc)
            code = server.exited()
            if code is not None:
                result.error += f" (server exited with code {code}: {server.log_tail()})"
        finally:
            server.stop()
    return result


def run(cfg: LatencyConfig, *, log: Callable[[str], None] | None = None) -> list[LatencyResult]:
    """Measure every selected server in every shape, one at a time (ValueError for a bad
    configuration; per-server failures are results)."""
    cfg.validate()
    raise_nofile_limit()
    plan = plan_cpus(pin=cfg.pin, processes=cfg.processes)
    results = []
    for shape in cfg.shapes:
        for name in cfg.servers:
            if log:
                log(f"latency [{shape.name}]: measuring {name} ...")
            r = measure(SERVERS[name], shape, cfg, plan)
            if log:
                text = (
                    f"p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms"
                    if r.p99_ms is not None
                    else f"{r.status}: {r.error}"
                )
                log(f"latency [{shape.name}]:   {name}: {text}")
            results.append(r)
    return results


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(results: Sequence[LatencyResult], cfg: LatencyConfig) -> str:
    """The text report: set-up lines, the table, the target, then errors and notes."""
    plan = plan_cpus(pin=cfg.pin, processes=cfg.processes)
    head = [
        f"latency: publish -> deliver, {PAYLOAD_SIZE}-byte messages, one topic, "
        f"{cfg.seconds:g} s per run of which the first {cfg.warmup:g} s are not counted",
        *(
            f"  shape {s.name}: {s.subscribers:,} subscribers x {s.rate:g} messages/s = "
            f"{s.deliveries_per_s:,.0f} deliveries/s"
            for s in cfg.shapes
        ),
        f"CPU: {plan.note}",
    ]
    rows = [
        [
            r.shape,
            r.server,
            f"{r.deliveries_per_s:,.0f}" if r.deliveries_per_s else r.status,
            _ms(r.p50_ms),
            _ms(r.p90_ms),
            _ms(r.p99_ms),
            _ms(r.p999_ms),
            _ms(r.max_ms),
            f"{r.samples:,}",
        ]
        for r in results
    ]
    table = format_table(
        [
            "shape",
            "server",
            "deliveries/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "samples",
        ],
        rows,
    )
    lines = [*head, "", table]
    check = target(results)
    if check is not None:
        lines += [
            "",
            f"target: quicksilver p99 <= {TARGET_P99_MS:g} ms at 50,000 deliveries/s, "
            f"{TARGET_SHAPE.subscribers} subscribers x {TARGET_SHAPE.rate:g} messages/s",
        ]
        lines += [f"  {name}: {'met' if met else 'NOT met'}" for name, met in check]
    tail = []
    for r in results:
        if r.error:
            tail.append(f"{r.shape} {r.server} {r.status}: {r.error}")
        tail.extend(f"{r.shape} {r.server}: {note}" for note in r.notes)
    if tail:
        lines += ["", *tail]
    return "\n".join(lines)


def target(results: Sequence[LatencyResult]) -> list[tuple[str, bool]] | None:
    """Is quicksilver's p99 within the target in the target shape (``100x500``, or any custom
    shape of 100 subscribers at 500 messages/s)? None when it was not measured."""
    checks = [
        (f"shape {r.shape}", r.p99_ms <= TARGET_P99_MS)
        for r in results
        if r.server == "quicksilver"
        and r.p99_ms is not None
        and (r.subscribers, r.rate) == (TARGET_SHAPE.subscribers, TARGET_SHAPE.rate)
    ]
    return checks or None


def write_results(results: Sequence[LatencyResult], cfg: LatencyConfig) -> list[str]:
    """Write the JSON document (and the chart when wanted); return notes for the report."""
    plan = plan_cpus(pin=cfg.pin, processes=cfg.processes)
    versions = {r.server: r.server_version for r in results if r.server_version is not None}
    document = {
        "scenario": "latency",
        "machine": machine_info({"server_versions": versions} if versions else None),
        "cpu_plan": plan.as_json(),
        "config": {
            "shapes": [asdict(s) for s in cfg.shapes],
            "seconds": cfg.seconds,
            "warmup_s": cfg.warmup,
            "payload_bytes": PAYLOAD_SIZE,
            "processes": cfg.processes,
            "servers": list(cfg.servers),
            "pinned": cfg.pin,
            "method": (
                "publisher stamps time.time() in the body before each write (open loop, fixed "
                "rate); each subscriber records time.time() at receipt minus the stamp; "
                "nearest-rank percentiles over every delivery after the warm-up"
            ),
        },
        "target": {
            "p99_ms": TARGET_P99_MS,
            "deliveries_per_s": TARGET_RATE,
            "shape": asdict(TARGET_SHAPE),
            "met": [{"check": name, "met": met} for name, met in target(results) or []],
        },
        "results": [r.as_json() for r in results],
    }
    write_json(cfg.json_path, document)
    notes = [f"results written to {cfg.json_path}"]
    if cfg.chart:
        panels: dict[str, dict[str, dict[str, float]]] = {}
        for r in results:
            if r.p50_ms is None or r.p99_ms is None or r.p999_ms is None:
                continue
            panel = panels.setdefault(
                f"{r.shape}: {r.subscribers:,} subscribers x {r.rate:g} msg/s", {}
            )
            panel[r.server] = {"p50": r.p50_ms, "p99": r.p99_ms, "p99.9": r.p999_ms}
        notes.append(
            grouped_bars(
                cfg.json_path.with_suffix(".png"),
                "publish -> deliver latency (log scale)",
                panels,
                "milliseconds",
                log_scale=True,
            )
            if panels
            else "chart skipped: nothing was measured"
        )
    return notes


def _parser() -> argparse.ArgumentParser:
    defaults = LatencyConfig()
    parser = argparse.ArgumentParser(
        prog="python -m bench latency",
        description="Publish -> deliver latency percentiles at a fixed rate.",
    )
    parser.add_argument(
        "--shape",
        default=",".join(SHAPES),
        help=f"comma-separated, from: {', '.join(SHAPES)} (default: all)",
    )
    parser.add_argument(
        "--subscribers", type=int, metavar="S", help="a custom shape instead: S subscribers"
    )
    parser.add_argument("--rate", type=float, metavar="R", help="messages/s of the custom shape")
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--warmup", type=float, default=defaults.warmup)
    parser.add_argument("--processes", type=int, default=defaults.processes)
    parser.add_argument(
        "--servers",
        default=",".join(defaults.servers),
        help=f"comma-separated, from: {', '.join(SERVERS)}",
    )
    parser.add_argument("--timeout", type=float, default=defaults.timeout)
    parser.add_argument("--setup-timeout", type=float, default=defaults.setup_timeout)
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--idle-check", type=float, default=defaults.idle_check, metavar="SECONDS")
    parser.add_argument("--json", type=Path, default=defaults.json_path, metavar="PATH")
    parser.add_argument("--no-chart", action="store_true")
    return parser


def config_from_args(argv: Sequence[str]) -> LatencyConfig:
    """Parse the command line into a validated :class:`LatencyConfig` (exits 2 on bad input)."""
    parser = _parser()
    args = parser.parse_args(list(argv))
    shapes: tuple[Shape, ...]
    if args.subscribers is not None or args.rate is not None:
        if args.subscribers is None or args.rate is None:
            parser.error("a custom shape needs both --subscribers and --rate")
        shapes = (Shape(f"{args.subscribers}x{args.rate:g}", args.subscribers, args.rate),)
    else:
        names = [n.strip() for n in args.shape.split(",") if n.strip()]
        unknown = [n for n in names if n not in SHAPES]
        if unknown:
            parser.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
        shapes = tuple(SHAPES[n] for n in names)
    cfg = replace(
        LatencyConfig(),
        shapes=shapes,
        seconds=args.seconds,
        warmup=args.warmup,
        processes=args.processes,
        servers=tuple(s.strip() for s in args.servers.split(",") if s.strip()),
        timeout=args.timeout,
        setup_timeout=args.setup_timeout,
        pin=not args.no_pin,
        idle_check=args.idle_check,
        json_path=args.json,
        chart=not args.no_chart,
    )
    try:
        cfg.validate()
    except ValueError as exc:
        parser.error(str(exc))
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: run, print the table, write JSON. Exit status 1 if a server failed."""
    cfg = config_from_args(sys.argv[1:] if argv is None else argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = run(cfg, log=log)
    print(report(results, cfg))
    for note in write_results(results, cfg):
        print(note)
    return 1 if any(r.status == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
