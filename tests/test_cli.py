"""The ``quicksilver`` command line as a user runs it: real processes against a real broker."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import jwt

from .helpers import (
    ROOT,
    SECRET,
    UNIT,
    RunningServer,
    cli_env,
    free_port,
    start_process,
    stop_process,
    token,
    until,
    wait_http_ready,
)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quicksilver", *args],
        env=env or cli_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30 * UNIT,
    )


def test_token_prints_a_signed_jwt() -> None:
    out = run_cli(
        "token", "--sub", "alice", "--role", "publisher", "--publish", "chat/*", "--ttl", "60"
    )
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["roles"] == ["publisher"]
    assert claims["publish"] == ["chat/*"] and claims["exp"] - claims["iat"] == 60


def test_token_refuses_bad_arguments() -> None:
    for args in (["--role", "emperor"], ["--role", "admin", "--publish", "a//b"]):
        out = run_cli("token", "--sub", "x", *args)
        assert out.returncode == 2
        assert "Traceback" not in out.stderr and out.stderr.strip()


async def test_publish_and_subscribe_commands(server: RunningServer) -> None:
    tok = token()
    sub = start_process(
        ["subscribe", "cli/*", "--url", server.ws_url, "--token", tok, "--count", "2"]
    )
    try:
        await until(lambda: len(server.broker.hub.index) == 1, units=20)
        for n in (1, 2):
            out = await asyncio.to_thread(
                run_cli,
                "publish",
                "cli/x",
                json.dumps({"n": n}),
                "--url",
                server.ws_url,
                "--token",
                tok,
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == str(n)
        stdout, stderr = await asyncio.to_thread(sub.communicate, timeout=20 * UNIT)
        assert sub.returncode == 0, stderr
        lines = [json.loads(line) for line in stdout.splitlines()]
        assert [m["data"] for m in lines] == [{"n": 1}, {"n": 2}]
        assert [m["offset"] for m in lines] == [1, 2] and lines[0]["topic"] == "cli/x"
    finally:
        stop_process(sub)


async def test_publish_refused_token_is_one_clear_line(server: RunningServer) -> None:
    out = await asyncio.to_thread(
        run_cli, "publish", "x", "1", "--url", server.ws_url, "--token", "garbage"
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = await asyncio.to_thread(
        run_cli, "publish", "x", "{bad json", "--url", server.ws_url, "--token", token()
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr


async def test_serve_generates_a_secret_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    env = {k: v for k, v in cli_env().items() if k != "QUICKSILVER_SECRET"}
    proc = start_process(["serve", "--port", str(port), "--data-dir", str(data_dir)], env=env)
    try:
        await wait_http_ready(f"http://127.0.0.1:{port}")
        secret_file = data_dir / "secret"
        assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
        # `token` with the same data dir signs with that secret: the broker accepts it.
        out = run_cli(
            "token", "--sub", "a", "--role", "admin", "--data-dir", str(data_dir), env=env
        )
        assert out.returncode == 0, out.stderr
        claims = jwt.decode(
            out.stdout.strip(), secret_file.read_text().strip(), algorithms=["HS256"]
        )
        assert claims["sub"] == "a"
    finally:
        _, stderr = stop_process(proc)
    assert "generated a signing secret" in stderr and "Traceback" not in stderr
    # A second start reuses the secret and does not announce it again.
    proc = start_process(["serve", "--port", str(port), "--data-dir", str(data_dir)], env=env)
    try:
        await wait_http_ready(f"http://127.0.0.1:{port}")
    finally:
        _, stderr2 = stop_process(proc)
    assert "generated" not in stderr2
