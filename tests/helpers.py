"""Shared test helpers: a real broker on 127.0.0.1 port 0, raw WebSocket clients, scaled time.

Time in tests is one unit (``UNIT`` seconds, 1 by default; raise ``QUICKSILVER_TEST_UNIT`` on a slow
machine). Every wait is for an event, bounded by a multiple of the unit.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgpack
from websockets.asyncio.client import ClientConnection, connect

from auth.tokens import Secret, mint_token
from broker.config import Settings
from broker.core import Broker
from broker.server import serve_on_socket

UNIT = float(os.environ.get("QUICKSILVER_TEST_UNIT", "1.0"))
SECRET = "test-secret-0123456789abcdef0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], units: float = 5.0) -> T:
    return await asyncio.wait_for(aw, timeout=units * UNIT)


async def until(predicate: Callable[[], bool], units: float = 5.0, step: float = 0.01) -> None:
    """Wait until ``predicate()`` holds (checked each ``step``), at most ``units`` units."""
    deadline = time.monotonic() + units * UNIT
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        await asyncio.sleep(step)


def token(
    *,
    sub: str = "tester",
    roles: tuple[str, ...] = ("admin",),
    ttl: float | None = 3600,
    **claims: Any,
) -> str:
    return mint_token(Secret(SECRET), sub=sub, roles=roles, ttl=ttl, **claims)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    broker: Broker
    port: int
    data_dir: Path
    server: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.server.should_exit = True
        await wait_for(self.server._task, 20)


@asynccontextmanager
async def running_server(data_dir: Path, **overrides: Any) -> AsyncIterator[RunningServer]:
    """A real broker serving on a real socket in this event loop."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = Settings(
        host="127.0.0.1",
        port=port,
        data_dir=data_dir,
        secret=Secret(SECRET),
        log_level="warning",
        **overrides,
    )
    broker = Broker(settings)
    server = await serve_on_socket(broker, sock)
    running = RunningServer(broker=broker, port=port, data_dir=data_dir, server=server)
    try:
        yield running
    finally:
        if not server.should_exit:
            await running.stop()
        sock.close()


class Raw:
    """A raw protocol client over the websockets library: send dicts, receive dicts."""

    def __init__(self, ws: ClientConnection, encoding: str = "json") -> None:
        self.ws = ws
        self.encoding = encoding
        self._id = 0

    def next_id(self) -> int:
        self._id += 1
        return self._id

    async def send(self, obj: dict[str, Any]) -> None:
        if self.encoding == "msgpack":
            await self.ws.send(msgpack.packb(obj, use_bin_type=True))
        else:
            await self.ws.send(json.dumps(obj))

    async def recv(self, units: float = 5.0) -> dict[str, Any]:
        raw = await wait_for(self.ws.recv(), units)
        if isinstance(raw, bytes):
            out: dict[str, Any] = msgpack.unpackb(raw, raw=False)
        else:
            out = json.loads(raw)
        return out

    async def request(self, obj: dict[str, Any], units: float = 5.0) -> dict[str, Any]:
        """Send a request with a fresh id; return the ok/error with that id (skipping others)."""
        rid = self.next_id()
        await self.send({**obj, "id": rid})
        while True:
            reply = await self.recv(units)
            if reply.get("id") == rid and reply["type"] in ("ok", "error", "pong"):
                return reply

    async def expect(self, type_: str, units: float = 5.0) -> dict[str, Any]:
        """The next frame of ``type_``, skipping others."""
        while True:
            frame = await self.recv(units)
            if frame["type"] == type_:
                return frame

    async def closed(self, units: float = 5.0) -> int | None:
        """Read until the server closes; return the close code."""
        try:
            while True:
                await wait_for(self.ws.recv(), units)
        except Exception:
            pass
        await wait_for(self.ws.wait_closed(), units)
        return self.ws.close_code


@asynccontextmanager
async def raw_client(
    url: str,
    tok: str | None = "admin",
    *,
    encoding: str = "json",
    subprotocols: list[str] | None = None,
    headers: dict[str, str] | None = None,
    auth: bool = True,
    **kwargs: Any,
) -> AsyncIterator[Raw]:
    """Connect, and unless ``auth`` is False send the auth frame and wait for ``welcome``.

    ``tok="admin"`` mints an admin token; None asks for anonymous access.
    """
    if subprotocols is None:
        subprotocols = [f"quicksilver.v1.{encoding}"]
    if tok == "admin":
        tok = token()
    async with connect(
        url,
        subprotocols=subprotocols or None,  # type: ignore[arg-type]
        additional_headers=headers,
        open_timeout=5 * UNIT,
        **kwargs,
    ) as ws:
        client = Raw(ws, encoding)
        if auth:
            await client.send({"type": "auth", "token": tok} if tok else {"type": "auth"})
            welcome = await client.recv()
            assert welcome["type"] == "welcome", welcome
        yield client


def http(server: RunningServer, tok: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    return httpx.AsyncClient(base_url=server.http_url, headers=headers, timeout=10 * UNIT)


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["QUICKSILVER_SECRET"] = SECRET
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def start_process(
    args: list[str], env: dict[str, str] | None = None, **extra_env: str
) -> subprocess.Popen[str]:
    """Start ``python -m quicksilver ARGS`` (with the test secret unless ``env`` is given)."""
    return subprocess.Popen(
        [sys.executable, "-m", "quicksilver", *args],
        env=env if env is not None else cli_env(**extra_env),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def wait_http_ready(url: str, units: float = 20.0) -> None:
    """Wait until ``GET url/readyz`` answers 200."""
    deadline = time.monotonic() + units * UNIT
    async with httpx.AsyncClient(timeout=UNIT) as client:
        while True:
            try:
                if (await client.get(url + "/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not become ready")
            await asyncio.sleep(0.05)


async def until_async(
    check: Callable[[], Awaitable[bool]], units: float = 10.0, step: float = 0.05
) -> None:
    """Wait until the coroutine ``check()`` returns True, at most ``units`` units."""
    deadline = time.monotonic() + units * UNIT
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        await asyncio.sleep(step)


async def stop_process_async(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """:func:`stop_process` off the event loop: for a process talking to a broker that runs in
    this loop (a worker's clean close needs the broker to answer)."""
    return await asyncio.to_thread(stop_process, proc)


def stop_process(proc: subprocess.Popen[str], timeout: float = 10.0) -> tuple[str, str]:
    """Terminate (then kill) a process; return its output."""
    if proc.poll() is None:
        proc.terminate()
    try:
        out, err = proc.communicate(timeout=timeout * UNIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out, err
