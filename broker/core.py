"""The broker of one node: authentication, sessions, request handling and lifecycle.

Connections call :meth:`Broker.on_message` with each complete frame; the broker decodes it once
into a typed frame and runs its handler (:mod:`broker.handlers`). Handlers that need the store run
as tasks; everything on the publish path runs synchronously in the caller's turn.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from auth.origin import OriginPolicy
from auth.permissions import Permissions
from auth.tokens import Claims, RevocationList, Secret, TokenVerifier, load_or_create_secret
from protocol.codec import decode_client, request_id_of
from protocol.errors import (
    BadRequest,
    InternalError,
    ProtocolError,
    Unauthorized,
)
from protocol.frames import Auth

from . import __version__
from .backplane.base import Backplane, SequencingBackplane
from .backplane.memory import MemoryBackplane
from .cluster import Cluster, WatchedIndex
from .config import Settings
from .connection import Connection
from .history_writer import start_history
from .hub import Hub
from .metrics import Metrics
from .ratelimit import admit
from .store.base import Store

log = logging.getLogger("quicksilver.broker")

SERVER_NAME = f"quicksilver/{__version__}"


def algorithm_for_key(pem: str) -> str:
    """The JWT algorithm that goes with a PEM public key: RS256 for RSA, ES256/384/512 for EC."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(pem.encode())
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp384r1": "ES384", "secp521r1": "ES512"}.get(key.curve.name, "ES256")
    raise ValueError("the public key must be RSA or EC; set QUICKSILVER_JWT_ALGORITHMS")


class Broker:
    """Everything one broker node holds. Built from :class:`Settings`; started by the app."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        backplane: Backplane | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        backplane = backplane or self._default_backplane(settings)
        self.hub = Hub(backplane, self.metrics, history_window=settings.history_size)
        #: Set when several nodes share a sequencing backplane (see broker.cluster).
        self.cluster: Cluster | None = None
        if isinstance(backplane, SequencingBackplane):
            self.hub.index = WatchedIndex(backplane)
            self.cluster = Cluster(self, backplane)
        self.store = store or self._default_store(settings)
        self.revoked = RevocationList()
        self.verifier = self._verifier(settings)
        self.origins = OriginPolicy(settings.allowed_origins)
        self.connections: set[Connection] = set()
        self.ready = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        from .dispatcher import Dispatcher
        from .handlers import HANDLERS

        self._handlers = HANDLERS
        self.jobs = Dispatcher(self)
        if not self.store.single_node:
            from .store.postgres import PostgresStore

            if isinstance(self.store, PostgresStore):
                # Jobs enqueued or given back on other nodes wake this node's dispatcher.
                self.store.on_jobs_ready = self.jobs.jobs_ready
        from .mercury import Mercury
        from .webhooks import Webhooks

        self.mercury = Mercury(self)
        self.webhooks = Webhooks(self)
        from .cpantesters.pipeline import ReportPipeline

        self.reports = ReportPipeline(self)
        self.connection_class: type[Connection] = type(
            "BrokerConnection", (Connection,), {"__slots__": (), "broker": self}
        )
        m = self.metrics
        m.gauge("connections", "open WebSocket connections", lambda: len(self.connections))
        m.gauge("subscriptions", "subscriptions held", lambda: len(self.hub.index))
        m.gauge("topics", "topics with state in memory", lambda: len(self.hub.log))
        m.gauge("workers", "connected workers", lambda: len(self.jobs.workers))

    @staticmethod
    def _default_store(settings: Settings) -> Store:
        if settings.database_url:
            # Imported only when configured: asyncpg is an optional extra.
            from .store.postgres import PostgresStore

            return PostgresStore(settings.database_url, pool_max=settings.database_pool_size)
        from .store.sqlite import SQLiteStore

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return SQLiteStore(
            settings.data_dir / "quicksilver.db", inline=settings.sqlite_inline_writes
        )

    def _default_backplane(self, settings: Settings) -> Backplane:
        if not settings.redis_url:
            return MemoryBackplane()
        # Imported only when configured: redis-py is an optional extra.
        from .backplane.redis import RedisBackplane

        backplane = RedisBackplane(
            settings.redis_url,
            prefix=settings.redis_prefix,
            history_window=settings.history_size,
            history_ttl=settings.redis_history_ttl,
        )
        m = self.metrics
        m.gauge(
            "backplane_duplicates",
            "messages received twice from Redis (several matching subscriptions), dropped",
            lambda: backplane.duplicates,
        )
        m.gauge(
            "backplane_gaps",
            "times a topic's offsets jumped on arrival from Redis (a lost link)",
            lambda: backplane.gaps,
        )
        m.gauge(
            "backplane_failures",
            "messages Redis could not take (the publisher got unavailable, or nobody waited)",
            lambda: backplane.failures,
        )
        return backplane

    def _verifier(self, settings: Settings) -> TokenVerifier:
        if settings.public_key_file is not None:
            key = Path(settings.public_key_file).read_text()
            algorithms = [a for a in settings.jwt_algorithms if not a.startswith("HS")]
            return TokenVerifier(
                public_key=key,
                algorithms=algorithms or [algorithm_for_key(key)],
                revoked=self.revoked,
            )
        secret = settings.secret
        if secret is None:
            secret, created = load_or_create_secret(settings.data_dir)
            if created:
                log.warning(
                    "QUICKSILVER_SECRET is not set: generated a signing secret in %s "
                    "(mode 0600); `quicksilver token --data-dir %s` uses it",
                    settings.data_dir / "secret",
                    settings.data_dir,
                )
        self.secret: Secret = secret
        return TokenVerifier(
            secret=secret, algorithms=settings.jwt_algorithms, revoked=self.revoked
        )

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.open()
        for jti, exp in await self.store.revoked_tokens():
            self.revoked.add(jti, exp)
        # Topic history, presence and rate limits; refuses invalid settings before serving.
        self.hub.history = await start_history(self.hub, self.store, self.settings)
        await self.hub.start()
        await self.jobs.start()
        await self.mercury.start()
        await self.webhooks.start()
        await self.reports.start()
        self._sweeper = asyncio.create_task(self._keepalive(), name="keepalive")
        self.ready = True

    async def stop(self) -> None:
        """Close connections with 1001, stop the dispatcher, flush and close the store."""
        self.ready = False
        for conn in list(self.connections):
            conn.shutdown()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.reports.stop()
        await self.webhooks.stop()
        await self.mercury.stop()
        await self.jobs.stop()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.settings.shutdown_timeout)
        await self.hub.backplane.close()
        if self.hub.history is not None:
            await self.hub.history.stop(self.settings.shutdown_timeout)
        await self.store.close()

    def spawn(self, coro: Awaitable[Any], name: str = "") -> asyncio.Task[Any]:
        """Run ``coro`` as a tracked task (awaited on shutdown, errors logged)."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def _keepalive(self) -> None:
        interval = self.settings.ping_interval
        while True:
            await asyncio.sleep(interval)
            for conn in list(self.connections):
                if conn.closing:
                    continue
                if conn.alive:
                    conn.alive = False
                elif conn.ping_sent:
                    self.metrics.keepalive_timeouts += 1
                    conn.close(1011, "keepalive ping timeout")
                else:
                    conn.ping()

    # --- connections ----------------------------------------------------------------------------

    def attach(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.metrics.connections_total += 1

    def detach(self, conn: Connection) -> None:
        """Remove a connection from every index at once (idempotent)."""
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.hub.presence.leave_all(conn)
        index = self.hub.index
        for pattern in conn.subscriptions:
            index.remove(pattern, conn)
        conn.subscriptions.clear()
        if conn.worker is not None:
            self.jobs.worker_gone(conn)

    def on_message(self, conn: Connection, data: bytes) -> None:
        """Handle one complete frame from ``conn``."""
        self.metrics.messages_in += 1
        if conn.closing:
            return
        if not admit(self, conn, data):
            return
        try:
            frame = decode_client(data, conn.encoding)
        except BadRequest as exc:
            conn.send_error(request_id_of(data, conn.encoding), exc)
            return
        request_id = getattr(frame, "id", None)
        if conn.perms is None and not isinstance(frame, Auth):
            self.metrics.errors_sent += 1
            conn.send(
                {
                    "type": "error",
                    "id": request_id,
                    "code": "unauthorized",
                    "message": "authenticate first: send an auth frame",
                }
            )
            return
        try:
            result = self._handlers[type(frame)](self, conn, frame)
        except ProtocolError as exc:
            conn.send_error(request_id, exc)
            return
        except Exception:
            log.exception("handler for %s failed", frame.type)
            conn.send_error(request_id, InternalError("internal error"))
            return
        if result is not None:
            self.spawn(self._finish(conn, request_id, result))

    async def _finish(self, conn: Connection, request_id: object, work: Awaitable[None]) -> None:
        try:
            await work
        except ProtocolError as exc:
            conn.send_error(request_id, exc)
        except Exception:
            log.exception("request %r failed", request_id)
            conn.send_error(request_id, InternalError("internal error"))

    # --- authentication -------------------------------------------------------------------------

    def verify(self, token: str) -> tuple[Claims, Permissions]:
        """Verify a token; raises :class:`Unauthorized`."""
        try:
            claims = self.verifier.verify(token)
        except Unauthorized:
            self.metrics.auth_failures += 1
            raise
        return claims, Permissions.from_claims(claims, self.settings.public_patterns)

    def authenticate(self, conn: Connection, token: str | None, request_id: object) -> None:
        """Authenticate ``conn`` and send ``welcome``, or ``unauthorized`` and close 4401."""
        if conn.perms is not None:
            raise BadRequest("already authenticated; use a refresh frame to replace the token")
        claims: Claims | None = None
        if token is None:
            if not self.settings.allow_anonymous:
                self.metrics.auth_failures += 1
                raise Unauthorized("anonymous access is not allowed on this server")
            perms = Permissions.anonymous(self.settings.public_patterns)
        else:
            claims, perms = self.verify(token)
        session = secrets.token_hex(8)
        conn.jti = claims.jti if claims else None
        conn.authenticated(perms, session, claims.exp if claims else None)
        conn.send(
            {
                "type": "welcome",
                "session": session,
                "sub": claims.sub if claims else None,
                "roles": sorted(claims.roles) if claims else [],
                "expires_at": claims.exp if claims else None,
                "server": SERVER_NAME,
            }
        )

    def authenticate_header(self, conn: Connection, authorization: str) -> None:
        scheme, _, token = authorization.partition(" ")
        try:
            if scheme.lower() != "bearer" or not token.strip():
                self.metrics.auth_failures += 1
                raise Unauthorized("Authorization header must be 'Bearer <token>'")
            self.authenticate(conn, token.strip(), None)
        except ProtocolError as exc:
            conn.send_error(None, exc)

    def auth_timeout(self, conn: Connection) -> None:
        if conn.perms is None and not conn.closing:
            self.metrics.auth_failures += 1
            conn.send_error(
                None, Unauthorized(f"no valid auth within {self.settings.auth_timeout:g} s")
            )

    def token_expired(self, conn: Connection) -> None:
        if not conn.closing:
            conn.send_error(None, Unauthorized("token expired; send refresh before expiry"))

    async def revoke(self, jti: str, exp: int | None) -> int:
        """Revoke a token id: refused from now on, live connections using it closed (4401)."""
        await self.store.revoke_token(jti, exp)
        self.revoked.add(jti, exp)
        closed = 0
        for conn in list(self.connections):
            if conn.jti == jti:
                conn.send_error(None, Unauthorized("token revoked"))
                closed += 1
        return closed

    # --- publishing -----------------------------------------------------------------------------

    def publish(self, topic: str, data: object) -> int:
        return self.hub.publish(topic, data)

    def publish_async(self, topic: str, data: object) -> Awaitable[int]:
        """Publish now; the awaitable gives the offset (see :meth:`Hub.publish_async`)."""
        return self.hub.publish_async(topic, data)
