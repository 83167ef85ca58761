"""The WebSocket connection: a thin pump between a transport and the broker.

uvicorn hands every WebSocket upgrade to this protocol class (``Config(ws=...)``). Requests for
``/ws`` are served natively: websockets' sans-I/O :class:`ServerProtocol` does the handshake and
parses incoming frames, the broker's handlers decide what to answer, and outgoing data frames are
built by :mod:`broker.wire` so the fan-out path can write the same bytes to many transports. Any
other WebSocket path is delegated unchanged to uvicorn's own sans-I/O protocol, which runs the
Starlette app, so the whole product keeps one port.

Limits and failure behaviour:
- a frame or message larger than ``max_frame_bytes`` closes the connection with 1009;
- more than ``max_buffer_bytes`` waiting in the transport closes it with 1013 (slow consumer); its
  subscriptions are dropped at once, everyone else goes on;
- a close handshake not completed by the peer within ``close_timeout`` aborts the transport;
- a handler that raises unexpectedly answers ``internal`` and the connection stays open.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import NegotiationError
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from protocol.codec import SUBPROTOCOLS, Encoding, dumps
from protocol.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_TRY_AGAIN_LATER,
    ProtocolError,
)

from .wire import binary_frame, text_frame

if TYPE_CHECKING:
    from auth.permissions import Permissions

    from .core import Broker
    from .ratelimit import Limiter

log = logging.getLogger("quicksilver.connection")

WS_PATH = "/ws"


def select_subprotocol(
    _protocol: ServerProtocol, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """JSON when the client offers nothing; else the client's first known one; else refuse."""
    if not offered:
        return None
    for name in offered:
        if name in SUBPROTOCOLS:
            return name
    raise NegotiationError(
        "none of the offered subprotocols is supported; offer one of " + ", ".join(SUBPROTOCOLS)
    )


class Connection(asyncio.Protocol):
    """One client connection on ``/ws`` (or a pass-through to the ASGI app for other paths)."""

    broker: ClassVar[Broker]

    __slots__ = (
        "_auth_timer",
        "_close_timer",
        "_expiry_timer",
        "_fragments",
        "_handshake",
        "_raw_request",
        "alive",
        "app_state",
        "closing",
        "delegate",
        "encoding",
        "held_jobs",
        "jti",
        "limiter",
        "msgpack",
        "peer",
        "pending",
        "perms",
        "ping_sent",
        "presence",
        "replaying",
        "server_state",
        "session",
        "subscriptions",
        "transport",
        "uv_config",
        "worker",
        "ws",
    )

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.uv_config = config
        self.server_state = server_state
        self.app_state = app_state
        self.transport: asyncio.Transport | None = None
        self.delegate: asyncio.Protocol | None = None
        self.ws: ServerProtocol | None = None
        self._handshake = True
        self._raw_request = b""
        self.encoding: Encoding = "json"
        self.msgpack = False
        #: Outbound frames not yet written; None once the connection is closing.
        self.pending: list[bytes] | None = []
        self.perms: Permissions | None = None
        self.session = ""
        self.jti: str | None = None
        self.subscriptions: set[str] = set()
        self.closing = False
        self.alive = True
        self.ping_sent = False
        self.peer = ""
        self.worker: Any = None
        self.held_jobs: Any = None
        #: Rate-limit buckets (broker.ratelimit), made for the current permissions.
        self.limiter: Limiter | None = None
        #: Topics this connection is present on (broker.presence).
        self.presence: set[str] | None = None
        #: Exact topics whose recovery (subscribe with since) is still reading the store.
        self.replaying: set[str] | None = None
        self._fragments: list[bytes] | None = None
        self._auth_timer: asyncio.TimerHandle | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small frames (an ok, then a job push) must not wait for the peer's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"

    def data_received(self, data: bytes) -> None:
        if self.delegate is not None:
            self.delegate.data_received(data)
            return
        if self._handshake:
            self._raw_request += data
            self._start(self._raw_request)
            return
        ws = self.ws
        assert ws is not None
        self.alive = True
        ws.receive_data(data)
        broker = self.broker
        broker.metrics.bytes_in += len(data)
        for event in ws.events_received():
            self._on_frame(event)  # type: ignore[arg-type]  # only frames once open
        self._send_control()

    def eof_received(self) -> bool | None:
        if self.delegate is not None:
            return self.delegate.eof_received()
        if self.ws is not None and not self._handshake:
            self.ws.receive_eof()
            self._send_control()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.delegate is not None:
            self.delegate.connection_lost(exc)
            return
        self.pending = None
        self.closing = True
        for timer in (self._auth_timer, self._expiry_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self.server_state.connections.discard(self)
        if self.ws is not None and not self._handshake:
            self.broker.detach(self)

    def pause_writing(self) -> None:
        if self.delegate is not None:
            self.delegate.pause_writing()
            return
        # The transport holds more than max_buffer_bytes: this client does not keep up.
        if not self.closing:
            self.broker.metrics.slow_consumer_closes += 1
            loop = asyncio.get_running_loop()
            loop.call_soon(self.close, CLOSE_TRY_AGAIN_LATER, "slow consumer: buffer overflow")

    def resume_writing(self) -> None:
        if self.delegate is not None:
            self.delegate.resume_writing()

    # --- uvicorn server hooks ----------------------------------------------------

    def shutdown(self) -> None:
        """Called by uvicorn on SIGTERM: close with 1001 (going away)."""
        if self.delegate is not None:
            shutdown = getattr(self.delegate, "shutdown", None)
            if shutdown is not None:
                shutdown()
            return
        if self.ws is None or self._handshake:
            if self.transport is not None:
                self.transport.close()
            return
        self.close(CLOSE_GOING_AWAY, "server shutting down")

    # --- handshake ----------------------------------------------------

    def _start(self, data: bytes) -> None:
        broker = self.broker
        settings = broker.settings
        ws = ServerProtocol(
            subprotocols=[Subprotocol(name) for name in SUBPROTOCOLS],
            select_subprotocol=select_subprotocol,
            max_size=settings.max_frame_bytes,
        )
        ws.receive_data(data)
        events = ws.events_received()
        if not events:
            if ws.state is State.CONNECTING and not ws.data_to_send():
                return  # request incomplete (uvicorn passes it whole, but be safe)
            self._fail_handshake(ws)
            return
        request = events[0]
        assert isinstance(request, Request)
        path = request.path.split("?", 1)[0]
        if path != WS_PATH:
            self._delegate()
            return
        transport = self.transport
        assert transport is not None
        headers = request.headers
        if not broker.origins.allows(headers.get("Origin"), headers.get("Host")):
            response = ws.reject(403, "Origin not allowed\n")
            ws.send_response(response)
            self._fail_handshake(ws)
            return
        response = ws.accept(request)
        ws.send_response(response)
        if response.status_code != 101:
            self._fail_handshake(ws)
            return
        self.ws = ws
        self._handshake = False
        self._raw_request = b""
        self.encoding = SUBPROTOCOLS.get(ws.subprotocol or "", "json")
        self.msgpack = self.encoding == "msgpack"
        for chunk in ws.data_to_send():
            transport.write(chunk)
        transport.set_write_buffer_limits(high=settings.max_buffer_bytes)
        self.server_state.connections.add(self)
        broker.attach(self)
        authorization = headers.get("Authorization")
        if authorization is not None:
            broker.authenticate_header(self, authorization)
        else:
            loop = asyncio.get_running_loop()
            self._auth_timer = loop.call_later(settings.auth_timeout, broker.auth_timeout, self)

    def _fail_handshake(self, ws: ServerProtocol) -> None:
        if self.transport is not None:
            for chunk in ws.data_to_send():
                if chunk:
                    self.transport.write(chunk)
            self.transport.close()

    def _delegate(self) -> None:
        """Hand the connection to uvicorn's own WebSocket protocol (ASGI app)."""
        assert self.transport is not None
        delegate = WebSocketsSansIOProtocol(self.uv_config, self.server_state, self.app_state)
        self.delegate = delegate
        delegate.connection_made(self.transport)
        raw, self._raw_request = self._raw_request, b""
        delegate.data_received(raw)

    # --- frames in ----------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self.broker.on_message(self, bytes(frame.data))
            else:
                self._fragments = [bytes(frame.data)]
        elif opcode is Opcode.CONT:
            if self._fragments is None:
                return  # the sans-I/O parser already refuses a stray continuation
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data = b"".join(self._fragments)
                self._fragments = None
                self.broker.on_message(self, data)
        elif opcode is Opcode.PONG:
            self.ping_sent = False
        elif opcode is Opcode.CLOSE:
            # The sans-I/O protocol queues the echo; stop sending data now.
            if not self.closing:
                self.closing = True
                self.broker.detach(self)
            self.flush()
            self.pending = None

    def _send_control(self) -> None:
        """Write what the sans-I/O protocol queued (pongs, close frames), after pending data."""
        ws = self.ws
        transport = self.transport
        if ws is None or transport is None:
            return
        out = ws.data_to_send()
        if not out:
            return
        self.flush()
        for chunk in out:
            if chunk:
                if not transport.is_closing():
                    transport.write(chunk)
            else:
                # End of the close handshake: the server closes the TCP connection.
                transport.close()
                return
        if (ws.state is State.CLOSED or ws.close_expected()) and self._close_timer is None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(self.broker.settings.close_timeout, transport.abort)

    # --- frames out ----------------------------------------------------

    def send(self, obj: dict[str, Any]) -> None:
        """Queue one frame (a plain dict) for this client."""
        pending = self.pending
        if pending is None:
            return
        payload = dumps(obj, self.encoding)
        data = binary_frame(payload) if self.msgpack else text_frame(payload)
        if not pending:
            self.broker.hub.queued(self)
        pending.append(data)
        self.broker.metrics.messages_out += 1

    def send_error(self, request_id: object, exc: ProtocolError) -> None:
        self.broker.metrics.errors_sent += 1
        self.send({"type": "error", "id": request_id, "code": exc.code, "message": exc.message})
        if exc.close_code is not None:
            self.close(exc.close_code, exc.message[:120])

    def flush(self) -> None:
        """Write every queued frame in one ``transport.write``."""
        pending = self.pending
        if not pending:
            return
        transport = self.transport
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if transport is None or transport.is_closing():
            return
        self.broker.metrics.bytes_out += len(data)
        try:
            transport.write(data)
        except RuntimeError:
            # uvloop raises on a transport that closed under us; the loss callback cleans up.
            pass

    def close(self, code: int, reason: str = "") -> None:
        """Start the close handshake; abort the transport if the peer does not finish it."""
        if self.closing or self.ws is None:
            if self.ws is None and self.transport is not None:
                self.transport.close()
            return
        self.closing = True
        self.broker.detach(self)
        self.flush()
        self.pending = None
        ws = self.ws
        if ws.state is State.OPEN:
            ws.send_close(code, reason)
        self._send_control()
        if self._close_timer is None and self.transport is not None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(
                self.broker.settings.close_timeout, self.transport.abort
            )

    def ping(self) -> None:
        """Send a keepalive ping (the sweep in :mod:`broker.core` decides when)."""
        if self.ws is None or self.closing:
            return
        self.ping_sent = True
        self.ws.send_ping(b"")
        self._send_control()

    def fail_internal(self) -> None:
        self.close(CLOSE_INTERNAL, "internal error")

    # --- timers ----------------------------------------------------

    def authenticated(self, perms: Permissions, session: str, expires_at: int | None) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        self.perms = perms
        self.session = session
        self.set_expiry(expires_at)

    def set_expiry(self, expires_at: int | None) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if expires_at is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, expires_at - self.broker.hub.clock())
            self._expiry_timer = loop.call_later(delay, self.broker.token_expired, self)
