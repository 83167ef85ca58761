"""Connections benchmark: memory per idle authenticated connection, and time to connect them.

For each selected server, one at a time: start it on a free port, warm it up (a few connections
made and dropped, so lazy imports and first-use caches are not counted), wait until its resident
memory settles and read ``VmRSS`` from ``/proc/<pid>/status``; then connect N clients spread over
P load-generator processes (at most 5,000 each: a process may hold 20,000 open files here), each
completing the server's session set-up (for quicksilver: the ``auth`` frame with a valid token
and its ``welcome``; nats: ``CONNECT``/``PING``/``PONG``; Mosquitto: ``CONNECT``/``CONNACK``; the
Python baselines: their ``ready`` greeting). Time to connect runs from the instant all processes
are told to connect until the last client is set up. Then wait for memory to settle again:

    KiB per connection = (VmRSS after - VmRSS before) / N

The server also must hold the N sockets (counted in ``/proc/<pid>/fd``). Linux only.
"""

from __future__ import annotations

import argparse
import os
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
from bench.chart import grouped_bars
from bench.common import (
    RESULTS_DIR,
    BenchError,
    CpuPlan,
    ServerProcess,
    ServerStartError,
    format_table,
    machine_info,
    pinned,
    plan_cpus,
    raise_nofile_limit,
    write_json,
)
from bench.loadgen import (
    ClientGroup,
    ClientJob,
    ClientPool,
    connect_and_drop,
    describe,
    plan_jobs,
)

TARGET_KIB = 16.0
PER_PROCESS = 5000
DEFAULT_SERVERS = ("websockets-broadcast", "bare-frame-writer", "quicksilver", "nats", "mosquitto")


@dataclass(frozen=True)
class ConnectionsConfig:
    """One invocation. ``processes`` 0 picks one client process per 5,000 connections (at least
    two); ``settle`` is the longest wait for the server's memory to stop changing."""

    connections: int = 15_000
    processes: int = 0
    servers: tuple[str, ...] = DEFAULT_SERVERS
    warmup: int = 50
    settle: float = 5.0
    setup_timeout: float = 120.0
    connect_concurrency: int = 100
    pin: bool = True
    json_path: Path = RESULTS_DIR / "connections.json"
    chart: bool = True

    @property
    def client_processes(self) -> int:
        if self.processes:
            return self.processes
        return max(2, -(-self.connections // PER_PROCESS))

    def validate(self) -> None:
        """Raise ValueError on a configuration that cannot run."""
        if self.connections < 1 or self.warmup < 0 or self.processes < 0:
            raise ValueError("connections must be at least 1; warmup and processes not negative")
        if self.client_processes > self.connections:
            raise ValueError("cannot have more client processes than connections")
        if -(-self.connections // self.client_processes) > 19_000:
            raise ValueError("more than 19,000 connections per process exceeds the fd limit")
        if not self.servers:
            raise ValueError("need at least one server")
        unknown = [name for name in self.servers if name not in SERVERS]
        if unknown:
            raise ValueError(f"unknown server(s) {', '.join(unknown)}; known: {', '.join(SERVERS)}")


@dataclass
class ConnectionsResult:
    """One server; memory in KiB."""

    server: str
    description: str
    connections: int
    processes: int
    status: Literal["ok", "error", "skipped"] = "ok"
    error: str | None = None
    connect_seconds: float | None = None
    connections_per_s: float | None = None
    rss_before_kib: int | None = None
    rss_after_kib: int | None = None
    kib_per_connection: float | None = None
    ratio_to_baseline: float | None = None
    sockets_held: int | None = None
    server_version: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data[f"ratio_to_{BASELINE_NAME.replace('-', '_')}"] = data.pop("ratio_to_baseline")
        return data


# --- /proc --------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS``); raises BenchError when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError) as exc:
        raise BenchError(f"cannot read the memory of process {pid}: {exc}") from None
    raise BenchError(f"process {pid} has no VmRSS line (exited?)")


def open_files(pid: int) -> int | None:
    """How many file descriptors ``pid`` holds, or None where ``/proc`` does not say."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def settled_rss(pid: int, limit: float, step: float = 0.25, tolerance: int = 64) -> int:
    """VmRSS of ``pid`` once two readings ``step`` s apart differ by at most ``tolerance`` KiB,
    or the last reading after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    last = rss_kib(pid)
    while time.monotonic() < deadline:
        # Memory has no event to wait for; a short poll is the only way to see it settle.
        time.sleep(step)
        now = rss_kib(pid)
        if abs(now - last) <= tolerance:
            return now
        last = now
    return last


# --- one server ---------------------------------------------------------------------------------


def _jobs(launch: Launch, cfg: ConnectionsConfig, plan: CpuPlan, count: int) -> list[ClientJob]:
    dialect = launch.dialect
    return plan_jobs(
        url=launch.url(),
        headers=dialect.headers(),
        binary=dialect.binary,
        failure=dialect.failure,
        groups=[ClientGroup(dialect.session_steps)],
        members=[0] * count,
        processes=min(cfg.client_processes, count),
        cpus=plan.clients,
        setup_timeout=cfg.setup_timeout,
        connect_concurrency=cfg.connect_concurrency,
    )


def _measure_launched(
    launch: Launch,
    server: ServerProcess,
    result: ConnectionsResult,
    cfg: ConnectionsConfig,
    plan: CpuPlan,
) -> None:
    pid = server.pid
    assert pid is not None
    if cfg.warmup:
        uvloop.run(connect_and_drop(_jobs(launch, cfg, plan, cfg.warmup)[0]))
    with ClientPool(_jobs(launch, cfg, plan, cfg.connections)) as pool:
        pool.gather("spawned", time.time() + 60)
        # The pool is up before the first reading, so nothing but the server changes meanwhile.
        before = settled_rss(pid, cfg.settle)
        files_before = open_files(pid)
        started = time.time()
        pool.send(("connect", None))
        ready = pool.gather("ready", started + cfg.setup_timeout + 30)
        finished = max(r["at"] for r in ready)
        after = settled_rss(pid, cfg.settle)
        files_after = open_files(pid)
        held = sum(r["clients"] for r in ready)
    result.connect_seconds = finished - started
    result.connections_per_s = held / result.connect_seconds if result.connect_seconds else None
    result.rss_before_kib = before
    result.rss_after_kib = after
    result.kib_per_connection = (after - before) / held
    if files_before is not None and files_after is not None:
        result.sockets_held = files_after - files_before
        if result.sockets_held < held:
            result.notes.append(
                f"the server holds {result.sockets_held} more files than before, fewer than the "
                f"{held} connections: some were closed"
            )


def measure(spec: ServerSpec, cfg: ConnectionsConfig, plan: CpuPlan) -> ConnectionsResult:
    """Measure one server. Never raises except for KeyboardInterrupt/SystemExit: failures are
    results with status ``error`` (or ``skipped``) and a reason."""
    result = ConnectionsResult(
        server=spec.name,
        description=spec.description,
        connections=cfg.connections,
        processes=cfg.client_processes,
    )
    with tempfile.TemporaryDirectory(prefix=f"bench-connections-{spec.name}-") as tmp:
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
                _measure_launched(launch, server, result, cfg, plan)
        except Exception as exc:
            result.status = "error"
            result.error = str(exc) if isinstance(exc, BenchError) else describe(exc)
            code = server.exited()
            if code is not None:
                result.error += f" (server exited with code {code}: {server.log_tail()})"
        finally:
            server.stop()
    return result


def run(
    cfg: ConnectionsConfig, *, log: Callable[[str], None] | None = None
) -> list[ConnectionsResult]:
    """Measure every selected server, one at a time (ValueError for a bad configuration)."""
    cfg.validate()
    raise_nofile_limit()
    plan = plan_cpus(pin=cfg.pin, processes=cfg.client_processes)
    results = []
    for name in cfg.servers:
        if log:
            log(f"connections: {cfg.connections:,} to {name} ...")
        r = measure(SERVERS[name], cfg, plan)
        if log:
            text = (
                f"{r.kib_per_connection:.1f} KiB each, connected in {r.connect_seconds:.1f} s"
                if r.kib_per_connection is not None and r.connect_seconds is not None
                else f"{r.status}: {r.error}"
            )
            log(f"connections:   {name}: {text}")
        results.append(r)
    base = next(
        (
            r.kib_per_connection
            for r in results
            if r.server == BASELINE_NAME and r.kib_per_connection
        ),
        None,
    )
    for r in results:
        if base and r.kib_per_connection is not None:
            r.ratio_to_baseline = r.kib_per_connection / base
    return results


def target_met(results: Sequence[ConnectionsResult]) -> bool | None:
    """Is quicksilver within 16 KiB per idle authenticated connection? None if not measured."""
    for r in results:
        if r.server == "quicksilver" and r.kib_per_connection is not None:
            return r.kib_per_connection <= TARGET_KIB
    return None


def report(results: Sequence[ConnectionsResult], cfg: ConnectionsConfig) -> str:
    """The text report: set-up lines, the table, the target, then errors and notes."""
    plan = plan_cpus(pin=cfg.pin, processes=cfg.client_processes)
    head = [
        f"connections: {cfg.connections:,} idle authenticated connections per server, "
        f"{cfg.client_processes} client process(es), {cfg.warmup} warm-up connections first",
        "KiB per connection = (server VmRSS after - before, each once settled) / connections",
        f"CPU: {plan.note}",
    ]
    rows = [
        [
            r.server,
            f"{r.kib_per_connection:.2f}" if r.kib_per_connection is not None else r.status,
            f"{r.ratio_to_baseline:.2f}x" if r.ratio_to_baseline else "-",
            f"{r.connect_seconds:.2f}" if r.connect_seconds is not None else "-",
            f"{r.connections_per_s:,.0f}" if r.connections_per_s else "-",
            f"{r.rss_before_kib / 1024:.1f}" if r.rss_before_kib is not None else "-",
            f"{r.rss_after_kib / 1024:.1f}" if r.rss_after_kib is not None else "-",
            str(r.sockets_held) if r.sockets_held is not None else "-",
        ]
        for r in results
    ]
    table = format_table(
        [
            "server",
            "KiB/connection",
            f"vs {BASELINE_NAME}",
            "connect s",
            "connections/s",
            "RSS before MiB",
            "RSS after MiB",
            "sockets held",
        ],
        rows,
    )
    lines = [*head, "", table]
    met = target_met(results)
    if met is not None:
        verdict = "met" if met else "NOT met"
        lines += ["", f"target: quicksilver <= {TARGET_KIB:g} KiB per connection: {verdict}"]
    tail = []
    for r in results:
        if r.error:
            tail.append(f"{r.server} {r.status}: {r.error}")
        tail.extend(f"{r.server}: {note}" for note in r.notes)
    if tail:
        lines += ["", *tail]
    return "\n".join(lines)


def write_results(results: Sequence[ConnectionsResult], cfg: ConnectionsConfig) -> list[str]:
    """Write the JSON document (and the chart when wanted); return notes for the report."""
    plan = plan_cpus(pin=cfg.pin, processes=cfg.client_processes)
    versions = {r.server: r.server_version for r in results if r.server_version is not None}
    document = {
        "scenario": "connections",
        "machine": machine_info({"server_versions": versions} if versions else None),
        "cpu_plan": plan.as_json(),
        "config": {
            "connections": cfg.connections,
            "client_processes": cfg.client_processes,
            "warmup": cfg.warmup,
            "settle_s": cfg.settle,
            "connect_concurrency_per_process": cfg.connect_concurrency,
            "servers": list(cfg.servers),
        },
        "formula": "kib_per_connection = (VmRSS after - VmRSS before) / connections",
        "target": {"kib_per_connection": TARGET_KIB, "met": target_met(results)},
        "results": [r.as_json() for r in results],
    }
    write_json(cfg.json_path, document)
    notes = [f"results written to {cfg.json_path}"]
    if cfg.chart:
        memory = {
            r.server: {"KiB": r.kib_per_connection}
            for r in results
            if r.kib_per_connection is not None
        }
        speed = {
            r.server: {"seconds": r.connect_seconds}
            for r in results
            if r.connect_seconds is not None
        }
        panels = {}
        if memory:
            panels[f"server memory per idle connection, KiB ({cfg.connections:,} connections)"] = (
                memory
            )
        if speed:
            panels[f"seconds to connect and set up {cfg.connections:,} clients"] = speed
        notes.append(
            grouped_bars(cfg.json_path.with_suffix(".png"), "idle connections", panels, "")
            if panels
            else "chart skipped: nothing was measured"
        )
    return notes


def _parser() -> argparse.ArgumentParser:
    defaults = ConnectionsConfig()
    parser = argparse.ArgumentParser(
        prog="python -m bench connections",
        description="Memory per idle authenticated connection and time to connect.",
    )
    parser.add_argument("--connections", type=int, default=defaults.connections, metavar="N")
    parser.add_argument(
        "--processes",
        type=int,
        default=defaults.processes,
        metavar="P",
        help="client processes; 0: one per 5,000 connections, at least 2",
    )
    parser.add_argument(
        "--servers",
        default=",".join(defaults.servers),
        help=f"comma-separated, from: {', '.join(SERVERS)}",
    )
    parser.add_argument("--warmup", type=int, default=defaults.warmup, metavar="N")
    parser.add_argument("--settle", type=float, default=defaults.settle, metavar="SECONDS")
    parser.add_argument("--setup-timeout", type=float, default=defaults.setup_timeout)
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--json", type=Path, default=defaults.json_path, metavar="PATH")
    parser.add_argument("--no-chart", action="store_true")
    return parser


def config_from_args(argv: Sequence[str]) -> ConnectionsConfig:
    """Parse the command line (exits 2 on bad input)."""
    parser = _parser()
    args = parser.parse_args(list(argv))
    cfg = replace(
        ConnectionsConfig(),
        connections=args.connections,
        processes=args.processes,
        servers=tuple(s.strip() for s in args.servers.split(",") if s.strip()),
        warmup=args.warmup,
        settle=args.settle,
        setup_timeout=args.setup_timeout,
        pin=not args.no_pin,
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
