"""The servers a benchmark can measure, by name, and how to launch each one on a free port.

``SERVERS`` maps a name to a :class:`ServerSpec`; ``spec.prepare(workdir, port)`` returns the
command line, environment and client dialect for one run, or raises :class:`ServerSkipped`
when the server cannot be measured on this machine (program not installed). Launching and
stopping the process is the harness's job (:class:`bench.common.ServerProcess`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.baselines.wire import (
    Dialect,
    baseline_dialect,
    mqtt_dialect,
    nats_dialect,
    quicksilver_dialect,
)
from bench.common import (
    HOST,
    ServerProcess,
    ServerStartError,
    free_port,
    mint_admin_token,
    new_secret,
)


class ServerSkipped(Exception):
    """This server cannot be measured here; the message is the reason, printed in the report."""


@dataclass(frozen=True)
class Launch:
    """Everything needed to start one server and talk to it."""

    argv: list[str]
    port: int
    dialect: Dialect
    env: dict[str, str] = field(default_factory=dict)
    version: str | None = None

    def url(self) -> str:
        """The WebSocket URL clients connect to."""
        return f"ws://{HOST}:{self.port}{self.dialect.path}"


@dataclass(frozen=True)
class ServerSpec:
    """A named server: a one-line description, a launcher and how long it may take to start.

    ``skip_when_output`` lists phrases that, found in the output of a server that failed to start,
    mean "not available in this build" (a skip) rather than an error.
    """

    name: str
    description: str
    prepare: Callable[[Path, int], Launch]
    startup_timeout: float = 20.0
    skip_when_output: tuple[str, ...] = ()


def _python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _websockets_broadcast(workdir: Path, port: int) -> Launch:
    return Launch(
        _python_module("bench.baselines.websockets_broadcast", "--port", str(port)),
        port,
        baseline_dialect(),
    )


def _bare_frame_writer(workdir: Path, port: int) -> Launch:
    return Launch(
        _python_module("bench.baselines.bare_frame_writer", "--port", str(port)),
        port,
        baseline_dialect(),
    )


def _bare_frame_coalesce(workdir: Path, port: int) -> Launch:
    return Launch(
        _python_module("bench.baselines.bare_frame_writer", "--port", str(port), "--coalesce"),
        port,
        baseline_dialect(),
    )


def _quicksilver(workdir: Path, port: int) -> Launch:
    secret = new_secret()
    token = mint_admin_token(secret, sub="bench")
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    return Launch(
        _python_module("quicksilver", "serve", "--port", str(port), "--data-dir", str(data_dir)),
        port,
        quicksilver_dialect(token),
        env={"QUICKSILVER_SECRET": secret, "PORT": str(port)},
    )


def _program_version(argv: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(argv, capture_output=True, timeout=5, check=False)
        text = (out.stdout or out.stderr).decode("utf-8", "replace").strip()
        return text.splitlines()[0] if text else None
    return None


def _require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise ServerSkipped(f"{program} is not installed (not on PATH)")
    return path


def _nats(workdir: Path, port: int) -> Launch:
    program = _require("nats-server")
    config = workdir / "nats.conf"
    config.write_text(
        f'listen: "{HOST}:{free_port()}"\n'
        f'websocket {{\n  listen: "{HOST}:{port}"\n  no_tls: true\n  compression: false\n}}\n'
        # Generous slow-consumer limits: a benchmark client is slow on purpose at times.
        'write_deadline: "30s"\n'
        "max_pending: 268435456\n"
    )
    return Launch(
        [program, "-c", str(config)],
        port,
        nats_dialect(),
        version=_program_version([program, "--version"]),
    )


def _mosquitto(workdir: Path, port: int) -> Launch:
    program = _require("mosquitto")
    config = workdir / "mosquitto.conf"
    config.write_text(
        # Mosquitto 2.0.x refuses to start with a websockets listener alone
        # (eclipse-mosquitto/mosquitto#2284), hence the plain MQTT listener; its websockets
        # listener binds to an interface name, not an address (#3045), hence "lo".
        f"listener {free_port()} {HOST}\n"
        f"listener {port} lo\n"
        "protocol websockets\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_queued_messages 0\n"
        "max_inflight_messages 0\n"
        "set_tcp_nodelay true\n"
        "log_type error\nlog_type warning\n"
    )
    return Launch(
        [program, "-c", str(config)],
        port,
        mqtt_dialect(),
        version=_program_version([program, "-h"]),
    )


SERVERS: dict[str, ServerSpec] = {
    spec.name: spec
    for spec in (
        ServerSpec(
            "websockets-broadcast",
            "websockets library server, broadcast() (uvloop)",
            _websockets_broadcast,
        ),
        ServerSpec(
            "bare-frame-writer",
            "sans-I/O handshake, frame built once, transport.write per subscriber (uvloop)",
            _bare_frame_writer,
        ),
        ServerSpec(
            "bare-frame-coalesce",
            "as bare-frame-writer, messages of one read joined into one write per subscriber",
            _bare_frame_coalesce,
        ),
        ServerSpec(
            "quicksilver",
            "the broker: python -m quicksilver serve",
            _quicksilver,
            startup_timeout=30.0,
        ),
        ServerSpec("nats", "nats-server over WebSocket (Go)", _nats),
        ServerSpec(
            "mosquitto",
            "Mosquitto over WebSocket, MQTT 3.1.1 (C)",
            _mosquitto,
            skip_when_output=("Websockets support not available", "not compiled"),
        ),
    )
}

BASELINE_NAME = "websockets-broadcast"
"""The server every figure is compared with."""


def environment_without(names: tuple[str, ...]) -> dict[str, str]:
    """A copy of the environment without ``names`` (keeps a caller's PORT from leaking in)."""
    return {k: v for k, v in os.environ.items() if k not in names}


def start_server(
    spec: ServerSpec, workdir: Path, cpus: frozenset[int] | None = None
) -> tuple[Launch, ServerProcess]:
    """Prepare ``spec`` on a free port, start it (pinned to ``cpus``) and wait until it accepts
    TCP connections. The caller stops the returned process.

    Raises :class:`ServerSkipped` when the server is not installed or not built with WebSocket
    support, and :class:`bench.common.ServerStartError` when it fails to start; the process is
    stopped before either is raised. The server's output goes to ``workdir/server.log``.
    """
    launch = spec.prepare(workdir, free_port())
    env = environment_without(("PORT", "QUICKSILVER_SECRET"))
    env.update(launch.env)
    server = ServerProcess(launch.argv, log_path=workdir / "server.log", env=env, cpus=cpus)
    try:
        server.start()
        server.wait_ready(launch.port, spec.startup_timeout)
    except ServerStartError:
        server.stop()
        tail = server.log_tail(4000)
        if any(phrase in tail for phrase in spec.skip_when_output):
            raise ServerSkipped(f"not available in this build: {tail}") from None
        raise
    except BaseException:
        server.stop()
        raise
    return launch, server
