"""PostgreSQL and Redis for the tests that need them, started when absent, isolated per test.

``require_postgres()`` / ``require_redis()`` return the URL of a server that answers. When the
port does not answer, ``scripts/services`` is run once (it starts the machine's PostgreSQL and
Redis, installing them when missing and allowed) with a bounded wait; only when that fails is
the test skipped, with the reason. ``QUICKSILVER_TEST_DATABASE_URL`` and
``QUICKSILVER_TEST_REDIS_URL`` point the tests at other servers (no start attempt is made for
hosts other than 127.0.0.1/localhost).

Isolation: every test gets a schema of its own (:func:`pg_schema`, dropped afterwards) and a
Redis key and channel prefix of its own (:func:`redis_prefix`, its keys deleted afterwards).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import cache
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit, urlunsplit

import pytest

from .helpers import ROOT, UNIT

if TYPE_CHECKING:
    from broker.store.postgres import PostgresStore

DATABASE_URL = os.environ.get("QUICKSILVER_TEST_DATABASE_URL", "postgresql://127.0.0.1:5432/test")
REDIS_URL = os.environ.get("QUICKSILVER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _address(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@cache
def _start_services() -> str | None:
    """Run ``scripts/services`` once per test process; None when it succeeded, else why not."""
    wait = str(int(30 * UNIT))
    try:
        done = subprocess.run(
            [str(ROOT / "scripts" / "services")],
            env={**os.environ, "QUICKSILVER_SERVICES_WAIT": wait},
            capture_output=True,
            text=True,
            timeout=300 * UNIT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scripts/services could not run: {exc}"
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return "scripts/services failed: " + " / ".join(lines[-3:])
    return None


@cache
def _unavailable(url: str, default_port: int, what: str) -> str | None:
    """None when the server at ``url`` answers (after starting local services if needed)."""
    host, port = _address(url, default_port)
    if _answers(host, port):
        return None
    if host not in LOCAL_HOSTS:
        return f"{what} at {host}:{port} does not answer"
    problem = _start_services() or "scripts/services started the local services on their ports"
    if _answers(host, port):
        return None
    return f"{what} at {host}:{port} does not answer and could not be started: {problem}"


def require_postgres() -> str:
    """The test database's URL; skips the test when PostgreSQL cannot be reached or started."""
    pytest.importorskip("asyncpg", reason="the postgres extra (asyncpg) is not installed")
    reason = _unavailable(DATABASE_URL, 5432, "PostgreSQL")
    if reason:
        pytest.skip(reason)
    return DATABASE_URL


def require_redis() -> str:
    """The test Redis URL; skips the test when Redis cannot be reached or started."""
    pytest.importorskip("redis", reason="the redis extra (redis-py) is not installed")
    reason = _unavailable(REDIS_URL, 6379, "Redis")
    if reason:
        pytest.skip(reason)
    return REDIS_URL


def unique_name(kind: str) -> str:
    return f"qs_test_{kind}_{secrets.token_hex(5)}"


def with_search_path(url: str, schema: str) -> str:
    """``url`` with ``search_path`` set to ``schema`` (a server setting asyncpg passes on)."""
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode({"search_path": schema})) if q)
    return urlunsplit(parts._replace(query=query))


async def drop_schema(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10 * UNIT)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@asynccontextmanager
async def pg_schema() -> AsyncIterator[tuple[str, str]]:
    """``(database URL, schema name)`` of a fresh schema, dropped afterwards. The schema itself
    is created by the store that first opens it."""
    url = require_postgres()
    schema = unique_name("s")
    try:
        yield url, schema
    finally:
        await drop_schema(url, schema)


async def delete_prefix(url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@asynccontextmanager
async def redis_prefix() -> AsyncIterator[tuple[str, str]]:
    """``(Redis URL, key prefix)`` unique to this test; its keys are deleted afterwards."""
    url = require_redis()
    prefix = unique_name("r")
    try:
        yield url, prefix
    finally:
        await delete_prefix(url, prefix)


def scratch_postgres_store(clock: Callable[[], float] = time.time) -> PostgresStore:
    """A :class:`PostgresStore` in a fresh schema that drops the schema when closed (skips the
    test when PostgreSQL is unavailable)."""
    from broker.store.postgres import PostgresStore

    url = require_postgres()

    class ScratchPostgresStore(PostgresStore):
        async def close(self) -> None:
            try:
                await super().close()
            finally:
                assert self.schema is not None
                await drop_schema(url, self.schema)

    return ScratchPostgresStore(url, schema=unique_name("s"), pool_max=4, clock=clock)
