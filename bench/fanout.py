"""Fan-out benchmark: deliveries per second from one publisher to many subscribers.

Three cases, each measured for every selected server, one server at a time, side by side:

- ``1k``: 1,000 subscribers of one topic;
- ``10k``: 10,000 subscribers of one topic;
- ``topics``: 1,000 topics with 10 subscribers each (10,000 connections), messages published to
  the topics in turn.

For each server and case: start it as a subprocess on a free port of 127.0.0.1, connect the
subscribers spread over P load-generator processes (picows clients counting frames without
decoding them; see :mod:`bench.loadgen`), then for each variant connect a publisher and publish
M messages with 200-byte payloads as fast as the server acknowledges them, never more than
``window`` unacknowledged. The ``burst`` variant hands ``burst_size`` messages to the kernel in
one write, so a server may coalesce them. The subscribers stay connected across the variants.

    deliveries/s = subscribers * (messages / topics) / (last delivery - first publish)

Both instants are wall-clock ``time.time()`` readings, taken in different processes on one host.
On a machine with two or more CPUs the server is pinned to a CPU of its own and the publisher and
subscriber processes to the others, and the report says so; the load generator's CPU use is
reported so that a saturated client is visible. A process holds at most 20,000 open files on the
reference machines: subscribers are spread so that no process holds more than 5,000.

Every wait is bounded (start-up, set-up, delivery timeouts); a server that fails to start, refuses
a step or does not deliver in time is reported as an error and the run continues with the next.
All processes started here are killed on exit, on exceptions and on Ctrl-C.
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

from bench.baselines.servers import (
    BASELINE_NAME,
    SERVERS,
    Launch,
    ServerSkipped,
    ServerSpec,
    start_server,
)
from bench.baselines.wire import PAYLOAD_SIZE, Dialect, client_frame, payload, topic_name
from bench.chart import grouped_bars
from bench.common import (
    RESULTS_DIR,
    BenchError,
    CpuPlan,
    CpuTimes,
    ServerProcess,
    ServerStartError,
    busy_fraction,
    cpu_times,
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
    WindowPublisher,
    connect_publisher,
    describe,
    merge_results,
    plan_jobs,
)

Variant = Literal["steady", "burst"]
VARIANTS: tuple[Variant, ...] = ("steady", "burst")
PER_PROCESS = 5000
"""Most client connections one load-generator process holds (the open-files limit is 20,000)."""
_MIN_CPU_WINDOW = 0.25
_BUSY_MACHINE = 0.15
_SATURATED = 0.95


@dataclass(frozen=True)
class Case:
    """One shape of fan-out: ``subscribers`` spread evenly over ``topics``; ``messages`` in
    total, published to the topics in turn."""

    name: str
    subscribers: int
    topics: int
    messages: int

    @property
    def per_topic(self) -> int:
        """Subscribers of each topic."""
        return self.subscribers // self.topics

    @property
    def deliveries(self) -> int:
        """Deliveries expected from one variant: every message to each of its topic's
        subscribers."""
        return self.per_topic * self.messages

    def describe(self) -> str:
        if self.topics == 1:
            return f"{self.subscribers:,} subscribers, one topic, {self.messages:,} messages"
        return (
            f"{self.topics:,} topics x {self.per_topic} subscribers, "
            f"{self.messages:,} messages in turn"
        )

    def validate(self) -> None:
        """Raise ValueError for a case that cannot run."""
        if self.subscribers < 1 or self.messages < 1 or self.topics < 1:
            raise ValueError("subscribers, messages and topics must be at least 1")
        if self.subscribers % self.topics or self.messages % self.topics:
            raise ValueError("subscribers and messages must be multiples of the number of topics")


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("1k", subscribers=1000, topics=1, messages=1000),
        Case("10k", subscribers=10_000, topics=1, messages=60),
        Case("topics", subscribers=10_000, topics=1000, messages=20_000),
    )
}
"""The default cases; messages are chosen so the slowest Python baseline takes a few seconds."""


@dataclass(frozen=True)
class FanoutConfig:
    """One invocation of the benchmark. Timeouts are in seconds.

    ``timeout`` bounds the time from the first publish to the last delivery of one variant;
    ``setup_timeout`` bounds connecting and subscribing all subscribers (and the publisher).
    ``processes`` 0 picks one load-generator process per 5,000 subscribers, at least two.
    """

    cases: tuple[Case, ...] = tuple(CASES.values())
    processes: int = 0
    servers: tuple[str, ...] = tuple(SERVERS)
    variants: tuple[Variant, ...] = VARIANTS
    window: int = 100
    burst_size: int = 10
    timeout: float = 60.0
    setup_timeout: float = 90.0
    connect_concurrency: int = 50
    pin: bool = True
    idle_check: float = 0.5
    json_path: Path = RESULTS_DIR / "fanout.json"
    chart: bool = True

    def processes_for(self, case: Case) -> int:
        """Load-generator processes for ``case``."""
        if self.processes:
            return self.processes
        return max(2, -(-case.subscribers // PER_PROCESS))

    def validate(self) -> None:
        """Raise ValueError on a configuration that cannot run."""
        if not self.cases or not self.variants or not self.servers:
            raise ValueError("need at least one case, one variant and one server")
        for case in self.cases:
            case.validate()
            if self.processes_for(case) > case.subscribers:
                raise ValueError("cannot have more subscriber processes than subscribers")
            if -(-case.subscribers // self.processes_for(case)) > 19_000:
                raise ValueError("more than 19,000 subscribers per process exceeds the fd limit")
        if self.processes < 0:
            raise ValueError("processes must be 0 (automatic) or more")
        if self.burst_size < 1 or self.window < self.burst_size:
            raise ValueError("window must be at least burst size, and burst size at least 1")
        unknown = [name for name in self.servers if name not in SERVERS]
        if unknown:
            raise ValueError(f"unknown server(s) {', '.join(unknown)}; known: {', '.join(SERVERS)}")


@dataclass
class RunResult:
    """The outcome of one server in one case and variant; ``status`` is ok, error or skipped."""

    server: str
    variant: Variant
    description: str
    subscribers: int
    messages: int
    processes: int
    case: str = "custom"
    topics: int = 1
    payload_bytes: int = PAYLOAD_SIZE
    status: Literal["ok", "error", "skipped"] = "ok"
    error: str | None = None
    expected: int = 0
    delivered: int = 0
    seconds: float | None = None
    deliveries_per_s: float | None = None
    ratio_to_baseline: float | None = None
    publish_seconds: float | None = None
    first_delivery_latency_s: float | None = None
    connect_seconds: float | None = None
    server_cpu: float | None = None
    server_cpus_busy: float | None = None
    load_generator_cpu: float | None = None
    load_generator_cpus_busy: float | None = None
    load_generator_saturated: bool | None = None
    other_load_before_run: float | None = None
    server_version: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The result as JSON-ready values; the ratio key names the baseline server."""
        data = asdict(self)
        data[f"ratio_to_{BASELINE_NAME.replace('-', '_')}"] = data.pop("ratio_to_baseline")
        return data


# --- the publisher ------------------------------------------------------------------------------


def build_chunks(
    dialect: Dialect, messages: int, batch: int, topics: int = 1
) -> list[tuple[bytes, int]]:
    """The publisher's wire bytes: ``messages`` masked frames, ``batch`` to a write; message n
    (1-based) goes to topic ``(n - 1) % topics``."""
    body = payload()
    names = [topic_name(i, topics) for i in range(topics)]
    frames = [
        client_frame(dialect.publish_frame(n, names[(n - 1) % topics], body), binary=dialect.binary)
        for n in range(1, messages + 1)
    ]
    return [
        (b"".join(frames[i : i + batch]), len(frames[i : i + batch]))
        for i in range(0, messages, batch)
    ]


@dataclass
class _PublishTiming:
    t0: float = 0.0
    acked_at: float = 0.0
    cpu_seconds: float = 0.0


async def _publish(
    launch: Launch,
    chunks: list[tuple[bytes, int]],
    cfg: FanoutConfig,
    on_ready: Callable[[], None],
) -> _PublishTiming:
    dialect = launch.dialect
    transport, listener = await connect_publisher(
        lambda: WindowPublisher(dialect, chunks, cfg.window),
        launch.url(),
        dialect.headers(),
        cfg.setup_timeout,
    )
    assert isinstance(listener, WindowPublisher)
    try:
        on_ready()
        cpu0 = time.process_time()
        listener.start()
        try:
            async with asyncio.timeout(cfg.timeout):
                acked_at = await listener.done
        except TimeoutError:
            raise BenchError(
                f"only {listener.acked} of {listener.total} publishes acknowledged within "
                f"{cfg.timeout:.0f} s"
            ) from None
        return _PublishTiming(listener.t0, acked_at, time.process_time() - cpu0)
    finally:
        transport.disconnect(graceful=False)


# --- one server ---------------------------------------------------------------------------------


def _pool(launch: Launch, case: Case, cfg: FanoutConfig, plan: CpuPlan) -> ClientPool:
    dialect = launch.dialect
    groups = [
        ClientGroup(
            dialect.subscribe_steps(topic_name(t, case.topics)),
            dialect.delivery_marker_for(topic_name(t, case.topics)),
        )
        for t in range(case.topics)
    ]
    members = [i % case.topics for i in range(case.subscribers)]
    jobs = plan_jobs(
        url=launch.url(),
        headers=dialect.headers(),
        binary=dialect.binary,
        failure=dialect.failure,
        groups=groups,
        members=members,
        processes=cfg.processes_for(case),
        cpus=plan.clients,
        setup_timeout=cfg.setup_timeout,
        connect_concurrency=cfg.connect_concurrency,
    )
    return ClientPool(jobs)


def _measure_variant(
    launch: Launch,
    server: ServerProcess,
    pool: ClientPool,
    result: RunResult,
    case: Case,
    cfg: FanoutConfig,
    plan: CpuPlan,
) -> None:
    batch = cfg.burst_size if result.variant == "burst" else 1
    chunks = build_chunks(launch.dialect, case.messages, batch, case.topics)
    targets = tuple(case.messages // case.topics for _ in range(case.topics))
    server_cpu0: list[float | None] = []
    machine0: list[CpuTimes | None] = []
    phase: list[Phase] = []

    def on_ready() -> None:
        server_cpu0.append(server.cpu_seconds())
        machine0.append(cpu_times())
        phase.append(Phase("count", time.time() + cfg.timeout, targets))
        pool.arm(phase[0])

    timing = uvloop.run(_publish(launch, chunks, cfg, on_ready))
    result.publish_seconds = timing.acked_at - timing.t0
    merged = merge_results(pool.results(phase[0]))
    server_cpu1 = server.cpu_seconds()
    machine1 = cpu_times()

    result.delivered = merged["received"]
    if merged["first_at"] is not None:
        result.first_delivery_latency_s = merged["first_at"] - timing.t0
    if merged["complete"] < merged["clients"]:
        share = result.delivered / result.expected if result.expected else 0.0
        lost = merged["lost"]
        reason = f"; {lost} subscriber connection(s) closed by the server" if lost else ""
        raise BenchError(
            f"{result.delivered} of {result.expected} deliveries ({share:.1%}) within "
            f"{cfg.timeout:.0f} s; {merged['clients'] - merged['complete']} subscriber(s) "
            f"incomplete{reason}"
        )
    seconds = merged["last_at"] - timing.t0
    result.seconds = seconds
    result.deliveries_per_s = result.expected / seconds if seconds > 0 else None
    # CPU times tick in 10 ms steps: over shorter windows the fractions would be noise.
    long_enough = seconds >= _MIN_CPU_WINDOW
    if long_enough and server_cpu0 and server_cpu0[0] is not None and server_cpu1 is not None:
        result.server_cpu = (server_cpu1 - server_cpu0[0]) / seconds
    if long_enough:
        result.load_generator_cpu = (merged["cpu_seconds"] + timing.cpu_seconds) / seconds
        if plan.server is not None:
            result.server_cpus_busy = busy_fraction(machine0[0], machine1, plan.server)
        result.load_generator_cpus_busy = busy_fraction(machine0[0], machine1, plan.clients)
        if plan.clients and result.load_generator_cpus_busy is not None:
            result.load_generator_saturated = result.load_generator_cpus_busy >= _SATURATED
            result.notes.extend(_saturation_notes(result))
    if result.delivered > result.expected:
        result.notes.append(f"{result.delivered - result.expected} unexpected extra frames")


def _saturation_notes(result: RunResult) -> list[str]:
    if not result.load_generator_saturated:
        return []
    server = result.server_cpus_busy
    if server is not None and server >= _SATURATED:
        return ["server and load generator CPUs both saturated: server-bound, but without headroom"]
    return [
        "load generator CPUs saturated while the server's were not: the load generator is the "
        "bottleneck and the figure is a lower bound for the server"
    ]


def measure_case(
    spec: ServerSpec,
    case: Case,
    variants: Sequence[Variant],
    cfg: FanoutConfig,
    plan: CpuPlan,
) -> list[RunResult]:
    """Measure one server in one case, every variant over the same subscribers.

    Never raises except for KeyboardInterrupt/SystemExit: failures are returned as results with
    status ``error`` (or ``skipped``) and a reason.
    """
    results = [
        RunResult(
            server=spec.name,
            variant=variant,
            description=spec.description,
            subscribers=case.subscribers,
            messages=case.messages,
            processes=cfg.processes_for(case),
            case=case.name,
            topics=case.topics,
            expected=case.deliveries,
        )
        for variant in variants
    ]

    def fail_all(status: Literal["error", "skipped"], reason: str) -> list[RunResult]:
        for r in results:
            if r.status == "ok" and r.deliveries_per_s is None:
                r.status, r.error = status, reason
        return results

    with tempfile.TemporaryDirectory(prefix=f"bench-fanout-{spec.name}-") as tmp:
        if cfg.idle_check > 0:
            other = machine_busy(cfg.idle_check)
            for r in results:
                r.other_load_before_run = other
                if other is not None and other > _BUSY_MACHINE:
                    r.notes.append(
                        f"machine not idle before the run: other processes used {other:.0%} of "
                        "a CPU; the figure is unreliable"
                    )
        try:
            launch, server = start_server(spec, Path(tmp), plan.server)
        except ServerSkipped as exc:
            return fail_all("skipped", str(exc))
        except ServerStartError as exc:
            return fail_all("error", f"server failed to start: {exc}")
        except Exception as exc:
            return fail_all("error", f"cannot start the server: {describe(exc)}")
        for r in results:
            r.server_version = launch.version
        try:
            with pinned(plan.clients), _pool(launch, case, cfg, plan) as pool:
                # Spawning imports the harness in each process: allow for it on a loaded machine.
                started, ready = pool.connect(time.time() + cfg.setup_timeout + 30)
                connect_seconds = max(r["at"] for r in ready) - started
                for r in results:
                    r.connect_seconds = connect_seconds
                for r in results:
                    try:
                        _measure_variant(launch, server, pool, r, case, cfg, plan)
                    except BenchError as exc:
                        # The client processes may still be in the failed phase: stop here.
                        r.status, r.error = "error", str(exc)
                        fail_all("error", f"not measured: the {r.variant} variant failed first")
                        break
        except Exception as exc:
            reason = str(exc) if isinstance(exc, BenchError) else describe(exc)
            fail_all("error", reason)
        finally:
            code = server.exited()
            if code is not None:
                for r in results:
                    if r.status == "error" and r.error and "server exited" not in r.error:
                        r.error += f" (server exited with code {code}: {server.log_tail()})"
            server.stop()
    return results


def measure(spec: ServerSpec, variant: Variant, cfg: FanoutConfig, plan: CpuPlan) -> RunResult:
    """Measure one server in one variant of the first case of ``cfg`` (see
    :func:`measure_case`, which never raises for a failing server)."""
    return measure_case(spec, cfg.cases[0], (variant,), cfg, plan)[0]


def _add_ratios(results: list[RunResult]) -> None:
    for r in results:
        base = next(
            (
                b.deliveries_per_s
                for b in results
                if b.case == r.case
                and b.variant == r.variant
                and b.server == BASELINE_NAME
                and b.deliveries_per_s
            ),
            None,
        )
        if base and r.deliveries_per_s:
            r.ratio_to_baseline = r.deliveries_per_s / base


def run(cfg: FanoutConfig, *, log: Callable[[str], None] | None = None) -> list[RunResult]:
    """Measure every selected server in every case and variant, one server at a time.

    ``log`` receives one progress line per measurement. Raises ValueError for a bad
    configuration; per-server failures are results, not exceptions.
    """
    cfg.validate()
    raise_nofile_limit()
    results: list[RunResult] = []
    for case in cfg.cases:
        plan = plan_cpus(pin=cfg.pin, processes=cfg.processes_for(case))
        for name in cfg.servers:
            if log:
                log(f"fanout [{case.name}]: measuring {name} ...")
            case_results = measure_case(SERVERS[name], case, cfg.variants, cfg, plan)
            if log:
                for r in case_results:
                    log(f"fanout [{case.name}]:   {_status_text(r)}")
            results.extend(case_results)
    _add_ratios(results)
    return results


def _status_text(r: RunResult) -> str:
    if r.status == "ok" and r.deliveries_per_s is not None:
        return f"{r.server} ({r.variant}): {r.deliveries_per_s:,.0f} deliveries/s"
    return f"{r.server} ({r.variant}): {r.status}: {r.error}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


@dataclass(frozen=True)
class Target:
    """A figure the project promises, checked against one run."""

    text: str
    met: bool | None

    def line(self) -> str:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[self.met]
        return f"  {verdict:>12}: {self.text}"


def targets(results: Sequence[RunResult]) -> list[Target]:
    """The fan-out targets for quicksilver at 1,000 subscribers (case ``1k``)."""

    def find(variant: str) -> RunResult | None:
        return next(
            (
                r
                for r in results
                if r.case == "1k" and r.server == "quicksilver" and r.variant == variant
            ),
            None,
        )

    steady, burst = find("steady"), find("burst")
    rate = steady.deliveries_per_s if steady else None
    ratio = steady.ratio_to_baseline if steady else None
    burst_rate = burst.deliveries_per_s if burst else None
    return [
        Target(
            ">= 300,000 deliveries/s at 1,000 subscribers (steady)",
            None if rate is None else rate >= 300_000,
        ),
        Target(
            f">= 1.5x {BASELINE_NAME} at 1,000 subscribers (steady)",
            None if ratio is None else ratio >= 1.5,
        ),
        Target(
            ">= 1,000,000 deliveries/s at 1,000 subscribers under bursts",
            None if burst_rate is None else burst_rate >= 1_000_000,
        ),
    ]


def report(results: list[RunResult], cfg: FanoutConfig, plan: CpuPlan | None = None) -> str:
    """The text report: set-up lines, the table, targets, then one line per error or note."""
    plan = plan or plan_cpus(pin=cfg.pin, processes=2)
    head = [
        f"fan-out: {PAYLOAD_SIZE}-byte messages, at most {cfg.window} unacknowledged, "
        f"bursts of {cfg.burst_size} frames per write",
        *(
            f"  case {c.name}: {c.describe()}; {cfg.processes_for(c)} subscriber process(es)"
            for c in cfg.cases
        ),
        f"CPU: {plan.note}",
        "CPU columns: process CPU time in CPUs / busy share of the CPUs it was pinned to "
        "(including kernel and softirq time)",
    ]
    rows = []
    for r in results:
        rate = f"{r.deliveries_per_s:,.0f}" if r.deliveries_per_s else r.status
        ratio = f"{r.ratio_to_baseline:.2f}x" if r.ratio_to_baseline else "-"
        rows.append(
            [
                r.case,
                r.server,
                r.variant,
                rate,
                ratio,
                f"{_percent(r.server_cpu)} / {_percent(r.server_cpus_busy)}",
                f"{_percent(r.load_generator_cpu)} / {_percent(r.load_generator_cpus_busy)}",
            ]
        )
    table = format_table(
        [
            "case",
            "server",
            "variant",
            "deliveries/s",
            f"vs {BASELINE_NAME}",
            "server CPU proc / core",
            "load gen CPU procs / cores",
        ],
        rows,
    )
    checks = targets(results)
    tail = []
    for r in results:
        if r.error:
            tail.append(f"{r.case} {r.server} ({r.variant}) {r.status}: {r.error}")
    # One line per note and server, naming the variants it applies to.
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for r in results:
        for note in r.notes:
            grouped.setdefault((r.case, r.server, note), []).append(r.variant)
    tail.extend(
        f"{case} {server} ({', '.join(variants)}): {note}"
        for (case, server, note), variants in grouped.items()
    )
    lines = [*head, "", table]
    if any(t.met is not None for t in checks):
        lines += ["", "targets (quicksilver):", *(t.line() for t in checks)]
    if tail:
        lines += ["", *tail]
    return "\n".join(lines)


def write_results(results: list[RunResult], cfg: FanoutConfig, plan: CpuPlan) -> list[str]:
    """Write the JSON document (and the chart when wanted); return notes for the report."""
    versions = {r.server: r.server_version for r in results if r.server_version is not None}
    document = {
        "scenario": "fanout",
        "machine": machine_info({"server_versions": versions} if versions else None),
        "cpu_plan": plan.as_json(),
        "config": {
            "cases": [
                {**asdict(c), "processes": cfg.processes_for(c), "per_topic": c.per_topic}
                for c in cfg.cases
            ],
            "payload_bytes": PAYLOAD_SIZE,
            "window": cfg.window,
            "burst_size": cfg.burst_size,
            "timeout_s": cfg.timeout,
            "setup_timeout_s": cfg.setup_timeout,
            "pinned": cfg.pin,
            "variants": list(cfg.variants),
            "servers": list(cfg.servers),
            "load_generator": "picows clients in spawned processes, frames counted undecoded",
        },
        "formula": (
            "deliveries_per_s = subscribers * (messages / topics) / (last delivery - first publish)"
        ),
        "targets": [{"target": t.text, "met": t.met} for t in targets(results)],
        "results": [r.as_json() for r in results],
    }
    write_json(cfg.json_path, document)
    notes = [f"results written to {cfg.json_path}"]
    if cfg.chart:
        notes.append(chart(results, cfg.json_path.with_suffix(".png")))
    return notes


def chart(results: Sequence[RunResult], path: Path) -> str:
    """One panel per case: deliveries/s of each server, a bar per variant."""
    panels: dict[str, dict[str, dict[str, float]]] = {}
    for r in results:
        if r.deliveries_per_s:
            panel = panels.setdefault(f"{r.case}: {_case_title(r)}", {})
            panel.setdefault(r.server, {})[r.variant] = r.deliveries_per_s
    if not panels:
        return "chart skipped: nothing was measured"
    return grouped_bars(path, "fan-out, 200-byte messages", panels, "deliveries / s")


def _case_title(r: RunResult) -> str:
    if r.topics == 1:
        return f"{r.subscribers:,} subscribers, one topic"
    return f"{r.topics:,} topics x {r.subscribers // r.topics} subscribers"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench fanout",
        description="Deliveries per second from one publisher to many subscribers.",
    )
    defaults = FanoutConfig()
    parser.add_argument(
        "--case",
        default=",".join(CASES),
        help=f"comma-separated, from: {', '.join(CASES)} (default: all)",
    )
    parser.add_argument(
        "--subscribers",
        type=int,
        metavar="N",
        help="a custom case instead of --case: N subscribers (with --messages, --topics)",
    )
    parser.add_argument("--messages", type=int, metavar="M", help="messages of the custom case")
    parser.add_argument(
        "--topics", type=int, default=1, metavar="T", help="topics of the custom case"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=defaults.processes,
        metavar="P",
        help="subscriber (load generator) processes; 0: one per 5,000 subscribers, at least 2",
    )
    parser.add_argument(
        "--servers",
        default=",".join(defaults.servers),
        help=f"comma-separated, from: {', '.join(SERVERS)}",
    )
    parser.add_argument(
        "--variant", choices=[*VARIANTS, "both"], default="both", help="default: both"
    )
    parser.add_argument("--burst", action="store_true", help="same as --variant burst")
    parser.add_argument(
        "--window", type=int, default=defaults.window, help="most unacknowledged publishes"
    )
    parser.add_argument("--burst-size", type=int, default=defaults.burst_size)
    parser.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout,
        help="seconds from first publish to last delivery",
    )
    parser.add_argument("--setup-timeout", type=float, default=defaults.setup_timeout)
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--idle-check",
        type=float,
        default=defaults.idle_check,
        metavar="SECONDS",
        help="sample other processes' CPU use before each run (0: off)",
    )
    parser.add_argument("--json", type=Path, default=defaults.json_path, metavar="PATH")
    parser.add_argument("--no-chart", action="store_true")
    return parser


def config_from_args(argv: Sequence[str]) -> FanoutConfig:
    """Parse the command line into a validated :class:`FanoutConfig` (exits 2 on bad input)."""
    parser = _parser()
    args = parser.parse_args(list(argv))
    variants: tuple[Variant, ...]
    if args.burst:
        variants = ("burst",)
    elif args.variant == "both":
        variants = VARIANTS
    else:
        variants = (args.variant,)
    cases: tuple[Case, ...]
    if args.subscribers is not None or args.messages is not None:
        if args.subscribers is None or args.messages is None:
            parser.error("a custom case needs both --subscribers and --messages")
        cases = (Case("custom", args.subscribers, args.topics, args.messages),)
    else:
        names = [n.strip() for n in args.case.split(",") if n.strip()]
        unknown = [n for n in names if n not in CASES]
        if unknown:
            parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
        cases = tuple(CASES[n] for n in names)
    cfg = replace(
        FanoutConfig(),
        cases=cases,
        processes=args.processes,
        servers=tuple(s.strip() for s in args.servers.split(",") if s.strip()),
        variants=variants,
        window=args.window,
        burst_size=args.burst_size,
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
    plan = plan_cpus(pin=cfg.pin, processes=max(cfg.processes_for(c) for c in cfg.cases))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    log(f"fanout: CPU: {plan.note}")
    results = run(cfg, log=log)
    print(report(results, cfg, plan))
    for note in write_results(results, cfg, plan):
        print(note)
    return 1 if any(r.status == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
