"""Shared parts of the benchmarks: process limits, CPU placement, server processes, results.

Everything here is synchronous and Linux-first: CPU pinning, ``/proc`` CPU accounting and the
parent-death signal are used when the platform offers them and silently skipped otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
"""The project root: the working directory of every Python server the benchmarks start."""

RESULTS_DIR = ROOT / "bench" / "results"
HOST = "127.0.0.1"


class BenchError(Exception):
    """A measurement could not be made; the message says why in one sentence for the report."""


class ServerStartError(BenchError):
    """A server process exited or did not accept connections within its start timeout."""


# --- process set-up -----------------------------------------------------------------------------


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit and return the new soft limit.

    Never fails: where the limit cannot be changed the current soft limit is returned.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        # An infinite hard limit is refused as a soft value by some kernels; 1M is plenty.
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux only; else a no-op).

    This is what keeps servers and load generators from outliving a harness that was killed.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def pin_to(cpus: frozenset[int] | None) -> None:
    """Restrict this process (and threads it starts later) to ``cpus``; None leaves it as is."""
    if cpus and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (the usual bind-to-0 race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class CpuPlan:
    """Which CPUs the server and the load generator (publisher and subscribers) may use.

    ``server`` and ``clients`` are None when nothing is pinned; ``note`` says so in words.
    """

    server: frozenset[int] | None
    clients: frozenset[int] | None
    note: str

    def as_json(self) -> dict[str, Any]:
        """The plan as JSON-ready values (CPU lists sorted)."""
        return {
            "server": sorted(self.server) if self.server else None,
            "clients": sorted(self.clients) if self.clients else None,
            "note": self.note,
        }


def plan_cpus(*, pin: bool, processes: int) -> CpuPlan:
    """Give the server a CPU of its own and the load generator the rest, given two or more CPUs.

    With one CPU, with pinning turned off, or without ``sched_setaffinity``, nothing is pinned
    and the note warns that the load generator competes with the server.
    """
    if not hasattr(os, "sched_getaffinity"):
        return CpuPlan(None, None, "no CPU pinning on this platform: load generator shares CPUs")
    available = sorted(os.sched_getaffinity(0))
    load = f"the load generator ({processes} client process(es), and the publisher if any)"
    if not pin:
        return CpuPlan(None, None, f"CPU pinning off: server and {load} share all CPUs")
    if len(available) < 2:
        return CpuPlan(None, None, f"only one CPU: server and {load} share it")
    server = frozenset(available[:1])
    clients = frozenset(available[1:])
    return CpuPlan(
        server,
        clients,
        f"server pinned to CPU {available[0]} (a core of its own); "
        f"{load} on CPU {','.join(map(str, available[1:]))}",
    )


# --- server processes ---------------------------------------------------------------------------


def _child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    def setup() -> None:
        die_with_parent()
        raise_nofile_limit()
        pin_to(cpus)

    return setup


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


class ServerProcess:
    """One server started as its own subprocess in its own session, stopped on exit of the block.

    Output (stdout and stderr) goes to ``log_path`` so a chatty server can never block on a pipe.
    Stopping sends SIGTERM to the whole process group, waits up to ``stop_timeout`` seconds and
    then sends SIGKILL; it never raises. The child also gets SIGKILL if the harness dies.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cpus: frozenset[int] | None = None,
        cwd: Path = ROOT,
        stop_timeout: float = 5.0,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.cpus = cpus
        self.cwd = cwd
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the process; raises :class:`ServerStartError` when the program cannot be run."""
        with self.log_path.open("wb") as log:
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.cwd,
                    env=self.env,
                    start_new_session=True,
                    preexec_fn=_child_setup(self.cpus),
                )
            except OSError as exc:
                raise ServerStartError(f"cannot run {self.argv[0]}: {exc}") from exc

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return self.proc.poll() if self.proc else None

    def wait_ready(self, port: int, timeout: float, host: str = HOST) -> None:
        """Wait until the server accepts TCP connections on ``port``.

        Raises :class:`ServerStartError` (with the end of the server's log) when the process exits
        first or ``timeout`` seconds pass.
        """
        deadline = time.monotonic() + timeout
        while True:
            code = self.exited()
            if code is not None:
                raise ServerStartError(
                    f"exited with code {code} during start-up: {self.log_tail()}"
                )
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"did not accept connections on port {port} within {timeout:.0f} s: "
                    f"{self.log_tail()}"
                )
            # Polling a port has no event to wait for; 50 ms keeps start-up latency small.
            time.sleep(0.05)

    def cpu_seconds(self) -> float | None:
        """User plus system CPU time of the process so far (Linux ``/proc``), or None."""
        if self.proc is None:
            return None
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return None
        # Field 2 (comm) may contain spaces; the fields after its closing parenthesis are fixed.
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _clock_ticks()

    def log_tail(self, limit: int = 600) -> str:
        """The last ``limit`` characters of the server's output, on one line."""
        try:
            text = self.log_path.read_bytes()[-limit:].decode("utf-8", "replace")
        except OSError:
            return "(no output)"
        text = " | ".join(line.strip() for line in text.splitlines() if line.strip())
        return text or "(no output)"

    def stop(self) -> None:
        """Terminate the process group; SIGKILL after ``stop_timeout`` s. Never raises."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


# --- whole-machine CPU accounting ---------------------------------------------------------------


CpuTimes = dict[int, tuple[int, int]]
"""Per CPU: (busy ticks, total ticks) since boot, from ``/proc/stat``."""


def cpu_times() -> CpuTimes | None:
    """A snapshot of per-CPU busy and total time (Linux ``/proc/stat``), or None elsewhere.

    Busy includes user, system, interrupt and softirq time, which is where much of a network
    server's work is accounted and which its own process CPU time does not show.
    """
    try:
        text = Path("/proc/stat").read_text()
    except OSError:
        return None
    times: CpuTimes = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        # user nice system idle iowait irq softirq steal (guest time is already in user).
        ticks = [int(v) for v in rest.split()[:8]]
        idle = ticks[3] + ticks[4]
        times[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return times


def busy_fraction(
    before: CpuTimes | None, after: CpuTimes | None, cpus: frozenset[int] | None = None
) -> float | None:
    """Average busy fraction of ``cpus`` (all when None) between two snapshots, or None."""
    if not before or not after:
        return None
    busy = total = 0
    for cpu, (b1, t1) in after.items():
        if (cpus is None or cpu in cpus) and cpu in before:
            b0, t0 = before[cpu]
            busy += b1 - b0
            total += t1 - t0
    return busy / total if total > 0 else None


def machine_busy(interval: float = 0.5) -> float | None:
    """How many CPUs' worth of work other processes do right now, sampled over ``interval`` s.

    Call it while nothing of the benchmark runs; None where ``/proc/stat`` is missing.
    """
    before = cpu_times()
    time.sleep(interval)
    after = cpu_times()
    fraction = busy_fraction(before, after)
    return None if fraction is None or not after else fraction * len(after)


# --- tokens -------------------------------------------------------------------------------------


def new_secret() -> str:
    """A fresh random signing secret for one benchmark run."""
    return secrets.token_hex(32)


def mint_admin_token(secret: str, sub: str = "bench", ttl: int = 3600) -> str:
    """An HS256 JWT with the ``admin`` role, signed with ``secret``.

    Uses the project's ``auth.tokens.mint_token`` when that module is importable and otherwise
    builds the same claims (sub, roles, iat, exp, jti) with pyjwt.
    """
    try:
        tokens = importlib.import_module("auth.tokens")
        mint: Callable[..., str] = tokens.mint_token
        secret_type: Callable[[str], Any] = getattr(tokens, "Secret", None) or _starlette_secret()
    except (ImportError, AttributeError):
        return _mint_with_pyjwt(secret, sub, ttl)
    return mint(secret_type(secret), sub=sub, roles=["admin"])


def _starlette_secret() -> Callable[[str], Any]:
    from starlette.datastructures import Secret

    return Secret


def _mint_with_pyjwt(secret: str, sub: str, ttl: int) -> str:
    import jwt

    now = int(time.time())
    claims = {
        "sub": sub,
        "roles": ["admin"],
        "iat": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


# --- reporting ----------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def machine_info(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a reader needs to compare figures: CPUs, OS, Python and library versions, date (UTC)."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_available": (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        ),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "uvloop": _version("uvloop"),
        "websockets": _version("websockets"),
        "picows": _version("picows"),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }
    if extra:
        info.update(extra)
    return info


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write ``document`` as indented JSON, creating parent directories; atomic by rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def bar_chart(
    path: Path, title: str, labels: Sequence[str], values: Sequence[float], unit: str
) -> str:
    """Draw a horizontal bar chart PNG when matplotlib is installed.

    Returns a one-line note for the report: where the chart went, or why it was skipped. Never
    raises for a missing or failing matplotlib.
    """
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "chart skipped: matplotlib is not installed"
    try:
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.5))
        ax.barh(list(labels), list(values))
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except Exception as exc:  # a chart must never fail a benchmark run
        return f"chart skipped: matplotlib failed: {exc}"
    return f"chart written to {path}"


@contextlib.contextmanager
def pinned(cpus: frozenset[int] | None) -> Iterator[None]:
    """Pin the calling process to ``cpus`` for the duration of the block, then restore."""
    if not cpus or not hasattr(os, "sched_getaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    pin_to(cpus)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)
