"""Mercury-compatible routes (``/bus``, ``/pub``, ``/sub``, ``/push``, ``/pull``).

Mercury (the Perl WebSocket broker) clients move over by changing the URL. Its routes and their
meaning, as in Mercury's documentation and tests:

- ``WS /bus/<topic>``: every peer gets every other peer's message; its own too with ``?echo=1``.
  ``POST /bus/<topic>`` sends the body to every peer.
- ``WS /pub/<topic>``, ``POST /pub/<topic>``: publish; ``WS /sub/<topic>``: receive what is
  published on ``<topic>`` and below it, by whole segments (``/sub/foo`` gets ``foo`` and
  ``foo/bar``, never ``foobar``; ``/sub/foo/bar`` does not get ``foo``).
- ``WS /push/<topic>``, ``POST /push/<topic>``: each message goes to exactly one
  ``WS /pull/<topic>`` connection, round robin in connect order; while no puller is connected
  it waits in the durable job queue (:mod:`broker.pushpull`).
- Messages pass through unchanged: text stays text, binary stays binary. A POST answers 200 with an
  empty body, like Mercury.

One system with native traffic: ``/pub/<topic>`` publishes on the native topic ``<topic>`` and
``/sub/<topic>`` subscribes to ``<topic>/**``; a bus ``<topic>`` lives on the native topic
``bus/<topic>``; pushes are jobs on the queue ``mercury.push:<topic>``. Payloads map as
:mod:`broker.mercury_payload` describes.

Where Mercury failed, these routes do not: a connection that goes away leaves every index at once;
each connection's outbound buffer is bounded (``max_buffer_bytes``; beyond it the connection is
closed with 1013 and its subscriptions dropped); round robin survives pullers leaving in any order;
a push without a puller waits instead of crashing the broker.

Access: a token in ``Authorization: Bearer`` or ``?token=`` grants what it grants natively
(``/pub`` = publish on the topic, ``/sub`` = subscribe to ``<topic>/**``, ``/bus`` = both on
``bus/<topic>``, ``/push`` = enqueue on ``mercury.push:<topic>``, ``/pull`` = work on it). Without a
token a client has anonymous rights when ``mercury_require_auth`` is on (the default), or every
right when it is off (Mercury's own behaviour, for private networks). Origins: Mercury's
``allow_origin`` list (``mercury_allow_origin``) when set, answering 401 like Mercury; otherwise
the native Origin policy of ``/ws``. Refusals are JSON errors with the status of the error code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from auth.permissions import Permissions
from protocol.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNAUTHORIZED,
    BadRequest,
    Forbidden,
    NotFound,
    ProtocolError,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from protocol.topics import parse_pattern, parse_topic

from .backplane.base import Envelope, SequencingBackplane
from .mercury_origin import MercuryOrigins
from .mercury_payload import Payload, from_body, from_data, to_data
from .pushpull import PullPool, Ticket, queue_for
from .taps import Tap, TapMessage

if TYPE_CHECKING:
    from .core import Broker

log = logging.getLogger("quicksilver.mercury")

Kind = Literal["bus", "pub", "sub", "push", "pull"]

BUS_PREFIX = "bus/"

#: A WebSocket pusher waits for its pushes to be stored once this many are waiting.
PUSH_BACKLOG = 1000
#: Bus messages whose sender is remembered until the bus sees them come back.
MAX_BUS_ORIGINS = 10_000


def bus_topic(topic: str) -> str:
    """The native topic a Mercury bus lives on."""
    return BUS_PREFIX + topic


# --- connections ----------------------------------------------------------------------------------


class MercuryClient:
    """One Mercury WebSocket: a bounded outbound buffer written by its own task.

    ``offer`` never waits: beyond ``limit`` bytes waiting (text counted in characters) the
    connection is closed with 1013 and leaves every index at once. Pull pools ask
    ``has_room`` first and pass a full puller over instead.
    """

    __slots__ = (
        "_expiry",
        "close_code",
        "close_reason",
        "echo",
        "finished",
        "group",
        "jti",
        "kind",
        "limit",
        "mercury",
        "outbox",
        "peer_closed",
        "pool",
        "queued",
        "ready",
        "topic",
        "ws",
    )

    def __init__(
        self, mercury: Mercury, ws: WebSocket, kind: Kind, topic: str, *, limit: int
    ) -> None:
        self.mercury = mercury
        self.ws = ws
        self.kind = kind
        self.topic = topic
        self.limit = limit
        self.outbox: deque[tuple[Payload, Ticket | None]] = deque()
        self.queued = 0
        self.ready = asyncio.Event()
        #: Set once the connection is done (closed by either side): the endpoint then ends.
        self.finished = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.peer_closed = False
        self.echo = False
        self.jti: str | None = None
        self.group: _Group | None = None
        self.pool: PullPool | None = None
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def closed(self) -> bool:
        return self.finished.is_set()

    def has_room(self, size: int) -> bool:
        return not self.finished.is_set() and (not self.outbox or self.queued + size <= self.limit)

    def offer(self, payload: Payload, ticket: Ticket | None = None) -> bool:
        if self.finished.is_set():
            return False
        size = len(payload)
        if self.outbox and self.queued + size > self.limit:
            self.mercury.broker.metrics.slow_consumer_closes += 1
            self.close(CLOSE_TRY_AGAIN_LATER, "slow consumer: buffer overflow")
            return False
        self.outbox.append((payload, ticket))
        self.queued += size
        self.ready.set()
        return True

    async def write_loop(self) -> None:
        send = self.ws.send
        metrics = self.mercury.broker.metrics
        outbox = self.outbox
        while not self.finished.is_set():
            await self.ready.wait()
            self.ready.clear()
            while outbox and not self.finished.is_set():
                payload, ticket = outbox[0]
                try:
                    if isinstance(payload, str):
                        await send({"type": "websocket.send", "text": payload})
                    else:
                        await send({"type": "websocket.send", "bytes": payload})
                except Exception:
                    # The peer went away under us; the reader sees the disconnect.
                    self.detach()
                    return
                if self.finished.is_set():
                    return  # given back already (at-least-once: it may arrive twice)
                outbox.popleft()
                self.queued -= len(payload)
                metrics.messages_out += 1
                if ticket is not None:
                    ticket.delivered()

    def close(self, code: int, reason: str = "") -> None:
        """Leave every index now and end the connection with ``code``."""
        if self.finished.is_set():
            return
        self.close_code = code
        self.close_reason = reason
        self.detach()

    def detach(self) -> None:
        """Leave every index and give back undelivered pushes (idempotent)."""
        if self.finished.is_set():
            return
        self.finished.set()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        tickets = [t for _, t in self.outbox if t is not None]
        self.outbox.clear()
        self.queued = 0
        self.mercury.detach(self, tickets)

    def expire_at(self, expires_at: int | None) -> None:
        if expires_at is None:
            return
        delay = max(0.0, expires_at - time.time())
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(delay, self.close, CLOSE_UNAUTHORIZED, "token expired")


class _Group:
    """The Mercury connections sharing one tap: subscribers of a topic, or peers of a bus."""

    __slots__ = ("bus", "held", "key", "members", "mercury", "pending", "senders", "tap")

    def __init__(self, mercury: Mercury, key: str, pattern: str, *, bus: bool) -> None:
        self.mercury = mercury
        self.key = key
        self.bus = bus
        self.members: dict[MercuryClient, None] = {}
        #: (epoch, offset) of a bus message → the peer that sent it (it does not get it back).
        self.senders: dict[tuple[str, int], MercuryClient] = {}
        #: Several nodes: bus messages of this node's peers whose offset the backplane has not
        #: given yet, and what arrived meanwhile (held until the sender is known).
        self.pending = 0
        self.held: list[TapMessage] = []
        self.tap = Tap.open(mercury.broker.hub, pattern, self._on_messages)

    def _on_messages(self, messages: list[TapMessage]) -> None:
        if self.pending:
            self.held += messages
            return
        senders = self.senders
        for message in messages:
            sender = senders.pop((message.epoch, message.offset), None) if senders else None
            payload = from_data(message.data)
            for client in list(self.members):
                if client is not sender:
                    client.offer(payload)

    def sent_by(self, epoch: str, offset: int, client: MercuryClient) -> None:
        senders = self.senders
        senders[(epoch, offset)] = client
        if len(senders) > MAX_BUS_ORIGINS:
            # A message that never came back (a backplane lost it) must not pin its entry.
            del senders[next(iter(senders))]

    def expect(self, future: asyncio.Future[Envelope], client: MercuryClient) -> None:
        """Several nodes: ``client`` sent a bus message whose offset comes back from the
        backplane, maybe after the message itself; hold deliveries until it is known."""
        self.pending += 1

        def known(done: asyncio.Future[Envelope]) -> None:
            self.pending -= 1
            if not done.cancelled() and done.exception() is None:
                env = done.result()
                self.sent_by(env.epoch, env.offset, client)
            if not self.pending and self.held:
                held, self.held = self.held, []
                self._on_messages(held)

        future.add_done_callback(known)

    def forget(self, client: MercuryClient) -> None:
        if self.senders:
            for key in [k for k, c in self.senders.items() if c is client]:
                del self.senders[key]


# --- the service ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admission:
    """A request allowed on a Mercury route. ``perms`` is None in open mode."""

    topic: str
    perms: Permissions | None
    jti: str | None


class Mercury:
    """All Mercury connections, groups and pull pools of one broker node."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.settings = broker.settings
        self.origins = MercuryOrigins(self.settings.mercury_allow_origin)
        self.clients: set[MercuryClient] = set()
        self.subs: dict[str, _Group] = {}
        self.buses: dict[str, _Group] = {}
        self.pools: dict[str, PullPool] = {}
        self._sweeper: asyncio.Task[None] | None = None
        m = broker.metrics
        m.gauge(
            "mercury_connections", "open Mercury WebSocket connections", lambda: len(self.clients)
        )
        m.gauge(
            "mercury_groups",
            "Mercury topics and buses with connections (one subscription each)",
            lambda: len(self.subs) + len(self.buses),
        )
        m.gauge("mercury_pull_pools", "Mercury push/pull topics active", lambda: len(self.pools))

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="mercury-revocations")

    async def stop(self) -> None:
        """Close every Mercury connection with 1001 and stop the pull pools (pushes already
        accepted are stored first)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for client in list(self.clients):
            client.close(CLOSE_GOING_AWAY, "server shutting down")
        pools = list(self.pools.values())
        self.pools.clear()
        await asyncio.gather(*(pool.close() for pool in pools), return_exceptions=True)

    async def _sweep(self) -> None:
        """Close connections whose token was revoked (checked every ping interval)."""
        while True:
            await asyncio.sleep(self.settings.ping_interval)
            revoked = self.broker.revoked
            for client in list(self.clients):
                if client.jti is not None and client.jti in revoked:
                    client.close(CLOSE_UNAUTHORIZED, "token revoked")

    # --- admission ------------------------------------------------------------------------------

    def admit(
        self,
        kind: Kind,
        raw_topic: str,
        headers: Mapping[str, str],
        query: Mapping[str, str],
        *,
        websocket: bool,
    ) -> Admission:
        """Check Origin, topic, token and permission; raises a :class:`ProtocolError` whose code
        gives the HTTP status (401, 403, 400, 404)."""
        settings = self.settings
        if not settings.mercury:
            raise NotFound("the Mercury routes are turned off on this server")
        origin = headers.get("origin")
        token = _token(headers, query)
        if self.origins:
            if origin is None:
                if token is None:
                    raise Unauthorized("Origin check failed: no Origin header and no token")
            elif not self.origins.allows(origin):
                raise Unauthorized(f"Origin check failed: {origin!r} is not allowed")
        elif websocket and not self.broker.origins.allows(origin, headers.get("host")):
            raise Forbidden(f"Origin {origin!r} may not connect")
        topic = parse_topic(raw_topic)
        if kind == "sub":
            parse_pattern(topic + "/**")
        elif kind == "bus":
            parse_topic(bus_topic(topic))
        perms: Permissions | None
        jti: str | None = None
        if token is not None:
            claims, perms = self.broker.verify(token)
            jti = claims.jti
        elif settings.mercury_require_auth:
            if not settings.allow_anonymous:
                raise Unauthorized(_NEEDS_TOKEN)
            perms = Permissions.anonymous(settings.public_patterns)
        else:
            perms = None
        if perms is not None and not _allowed(perms, kind, topic):
            if perms.is_anonymous:
                raise Unauthorized(f"{kind} on {topic!r} is not public: {_NEEDS_TOKEN}")
            raise Forbidden(f"this token may not {_ACTIONS[kind]} {topic!r}")
        return Admission(topic, perms, jti)

    # --- connections ----------------------------------------------------------------------------

    def attach(self, client: MercuryClient) -> None:
        self.clients.add(client)
        topic = client.topic
        if client.kind == "sub":
            group = self.subs.get(topic)
            if group is None:
                group = self.subs[topic] = _Group(self, topic, topic + "/**", bus=False)
            group.members[client] = None
            client.group = group
        elif client.kind == "bus":
            group = self.buses.get(topic)
            if group is None:
                group = self.buses[topic] = _Group(self, topic, bus_topic(topic), bus=True)
            group.members[client] = None
            client.group = group
        elif client.kind == "pull":
            pool = self.pool(topic)
            pool.add_puller(client)
            client.pool = pool

    def detach(self, client: MercuryClient, tickets: list[Ticket]) -> None:
        self.clients.discard(client)
        group = client.group
        if group is not None:
            client.group = None
            group.members.pop(client, None)
            group.forget(client)
            if not group.members:
                group.tap.close()
                groups = self.buses if group.bus else self.subs
                if groups.get(group.key) is group:
                    del groups[group.key]
        pool = client.pool
        if pool is not None:
            client.pool = None
            if tickets:
                pool.give_back(tickets)
            pool.remove_puller(client)

    def pool(self, topic: str) -> PullPool:
        pool = self.pools.get(topic)
        if pool is None:
            pool = self.pools[topic] = PullPool(
                self.broker,
                topic,
                on_idle=self._pool_idle,
                poll_interval=self.settings.mercury_poll_interval,
            )
        return pool

    def _pool_idle(self, pool: PullPool) -> None:
        if self.pools.get(pool.topic) is pool:
            del self.pools[pool.topic]
        self.broker.spawn(pool.close(), name="pull-pool-close")

    # --- messages -------------------------------------------------------------------------------

    def publish(self, topic: str, payload: Payload) -> int:
        return self.broker.publish(topic, to_data(payload))

    def bus_send(self, topic: str, payload: Payload, sender: MercuryClient | None) -> None:
        """Send on a bus; every peer but ``sender`` gets it (None: every peer)."""
        native = bus_topic(topic)
        group = self.buses.get(topic)
        hub = self.broker.hub
        if isinstance(hub.backplane, SequencingBackplane):
            # Several nodes: the offset is known only once the backplane assigns it.
            future = hub.submit(native, to_data(payload))
            if future is not None and sender is not None and group is not None:
                group.expect(future, sender)
            return
        offset = self.broker.publish(native, to_data(payload))
        if sender is not None and group is not None:
            st = self.broker.hub.log.peek(native)
            if st is not None:
                group.sent_by(st.epoch, offset, sender)

    def push(self, topic: str, payload: Payload) -> asyncio.Future[bool]:
        return self.pool(topic).push(payload)

    async def on_message(self, client: MercuryClient, payload: Payload) -> None:
        kind = client.kind
        if kind == "pub":
            self.publish(client.topic, payload)
        elif kind == "bus":
            self.bus_send(client.topic, payload, None if client.echo else client)
        elif kind == "push":
            pool = self.pool(client.topic)
            stored = pool.push(payload)
            if pool.backlog > PUSH_BACKLOG:
                await stored  # back-pressure: the store sets the pace
        # Mercury ignores what subscribers and pullers send.

    async def serve(self, ws: WebSocket, client: MercuryClient) -> None:
        """Run an accepted connection until either side ends it."""
        reader = asyncio.create_task(self._read(ws, client))
        writer = asyncio.create_task(client.write_loop())
        try:
            await client.finished.wait()
        finally:
            client.detach()
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            if client.close_code is not None and not client.peer_closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        ws.close(client.close_code, client.close_reason),
                        self.settings.close_timeout,
                    )

    async def _read(self, ws: WebSocket, client: MercuryClient) -> None:
        metrics = self.broker.metrics
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    client.peer_closed = True
                    break
                text = message.get("text")
                payload: Payload = text if text is not None else message.get("bytes") or b""
                metrics.messages_in += 1
                await self.on_message(client, payload)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Mercury %s connection on %r failed", client.kind, client.topic)
            client.close(CLOSE_INTERNAL, "internal error")
            return
        client.detach()


_ACTIONS: dict[Kind, str] = {
    "pub": "publish on",
    "sub": "subscribe to everything under",
    "bus": "publish and subscribe on the bus",
    "push": "push to",
    "pull": "pull from",
}

_NEEDS_TOKEN = "send a token in 'Authorization: Bearer <token>' or '?token=<token>'"


def _allowed(perms: Permissions, kind: Kind, topic: str) -> bool:
    if kind == "pub":
        return perms.can_publish(topic)
    if kind == "sub":
        return perms.can_subscribe(topic + "/**")
    if kind == "bus":
        native = bus_topic(topic)
        return perms.can_publish(native) and perms.can_subscribe(native)
    if kind == "push":
        return perms.can_enqueue(queue_for(topic))
    return perms.can_work(queue_for(topic))


def _token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The token of ``Authorization: Bearer`` (which wins) or ``?token=``; a malformed
    Authorization header is refused."""
    header = headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("Authorization header must be 'Bearer <token>'")
        return value.strip()
    return query.get("token") or None


# --- routes ---------------------------------------------------------------------------------------


def _broker(conn: Request | WebSocket) -> Broker:
    broker: Broker = conn.app.state.broker
    return broker


def _error(exc: ProtocolError) -> Response:
    from .http_api import protocol_error_response

    return protocol_error_response(exc)


async def _body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"request body is larger than {limit} bytes")
    return bytes(body)


def _post(kind: Kind) -> object:
    async def endpoint(request: Request) -> Response:
        broker = _broker(request)
        broker.metrics.http_requests += 1
        mercury = broker.mercury
        try:
            adm = mercury.admit(
                kind,
                request.path_params["topic"],
                request.headers,
                request.query_params,
                websocket=False,
            )
            body = await _body(request, broker.settings.max_frame_bytes)
            payload = from_body(body, request.headers.get("content-type"))
            if kind == "pub":
                mercury.publish(adm.topic, payload)
            elif kind == "bus":
                mercury.bus_send(adm.topic, payload, None)
            elif not await mercury.push(adm.topic, payload):
                raise Unavailable("the message could not be stored; try again")
        except ProtocolError as exc:
            return _error(exc)
        return Response(b"", status_code=200, media_type="text/plain")

    endpoint.__name__ = f"mercury_post_{kind}"
    return endpoint


def _websocket(kind: Kind) -> object:
    async def endpoint(ws: WebSocket) -> None:
        broker = _broker(ws)
        mercury = broker.mercury
        try:
            adm = mercury.admit(
                kind, ws.path_params["topic"], ws.headers, ws.query_params, websocket=True
            )
        except ProtocolError as exc:
            if exc.code == "unauthorized":
                broker.metrics.auth_failures += 1
            await ws.send_denial_response(_error(exc))
            return
        except Exception:
            log.exception("Mercury %s handshake failed", kind)
            await ws.send_denial_response(_error(BadRequest("the handshake could not be read")))
            return
        client = MercuryClient(mercury, ws, kind, adm.topic, limit=broker.settings.max_buffer_bytes)
        client.echo = ws.query_params.get("echo", "") not in ("", "0")
        client.jti = adm.jti
        # Joined before the handshake completes: once the client sees 101, it is in the index
        # (what arrives meanwhile waits in its buffer).
        mercury.attach(client)
        try:
            await ws.accept()
        except Exception:
            client.detach()
            return
        broker.metrics.connections_total += 1
        if adm.perms is not None:
            client.expire_at(adm.perms.expires_at)
        await mercury.serve(ws, client)

    endpoint.__name__ = f"mercury_ws_{kind}"
    return endpoint


ROUTES: list[BaseRoute] = [
    *(
        WebSocketRoute(f"/{kind}/{{topic:path}}", _websocket(kind))  # type: ignore[arg-type]
        for kind in ("bus", "pub", "sub", "push", "pull")
    ),
    *(
        Route(f"/{kind}/{{topic:path}}", _post(kind), methods=["POST"])  # type: ignore[arg-type]
        for kind in ("bus", "pub", "push")
    ),
]
