"""An asyncio client for quicksilver protocol v1, on the ``websockets`` library.

::

    async with Client("ws://127.0.0.1:8000/ws", token=jwt) as client:
        offset = await client.publish("reports/dist/Foo", {"grade": "pass"})
        sub = await client.subscribe("reports/dist/*")
        async for message in sub:
            print(message.topic, message.data)

Failures are :class:`protocol.errors.ProtocolError` subclasses throughout: an ``error`` answer
raises the class for its code, a refused token :class:`~protocol.errors.Unauthorized`, a lost or
unreachable server :class:`~protocol.errors.Unavailable` (:class:`RequestTimeout` when no answer
came in time). Calling the API wrongly raises :class:`~protocol.errors.UsageError`.

Reconnection: when the connection drops, the client reconnects with exponential backoff and full
jitter, authenticates again and re-subscribes every open :class:`Subscription`. Exact-topic
subscriptions ask the server for what they missed (``since`` = the last offset and epoch seen);
wildcard subscriptions resume with new messages only. A request that was waiting for its answer
when the connection dropped fails with :class:`~protocol.errors.Unavailable`: it may or may not
have been carried out. A refused token (error ``unauthorized`` or close code 4401) and close code
1008 end the client for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import logging
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol, Self, cast

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from protocol.codec import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK, SUBPROTOCOLS, Encoding
from protocol.codec import decode_server as _decode_server
from protocol.codec import encode as _encode
from protocol.errors import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TOO_LARGE,
    CLOSE_UNAUTHORIZED,
    BadRequest,
    Forbidden,
    InternalError,
    ProtocolError,
    TooLarge,
    Unauthorized,
    Unavailable,
    UsageError,
    error_for_code,
)
from protocol.frames import (
    Auth,
    ClientFrame,
    Enqueue,
    Error,
    Message,
    Ok,
    Ping,
    Pong,
    Publish,
    Refresh,
    ServerFrame,
    Since,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from protocol.topics import is_exact, matches, parse_pattern, parse_topic

__all__ = [
    "AuthError",
    "Backoff",
    "Client",
    "ConnectedFlag",
    "FrameHandler",
    "ReconnectHandler",
    "RequestFrame",
    "RequestTimeout",
    "Subscription",
    "advance",
    "with_request_id",
]

logger = logging.getLogger("quicksilver.client")

#: A refused token. The same class the server raises, so one ``except`` catches both.
AuthError = Unauthorized

#: Any client frame with an ``id`` is a request, except ``auth`` (the client sends it by itself)
#: and ``ping`` (see :meth:`Client.ping`, whose answer is a ``pong``).
RequestFrame = ClientFrame

DEFAULT_SUBSCRIPTION_MAXSIZE = 10_000


class RequestTimeout(Unavailable):
    """No answer arrived within the request timeout; the request may or may not have been served."""


class FrameHandler(Protocol):
    """Receives unsolicited frames (``job``, ``cancel``, an ``error`` without id, ...).

    It runs on the client's reading task: while it runs, no other frame is read. Work that takes
    long belongs in a task of its own.
    """

    def __call__(self, frame: ServerFrame, /) -> Awaitable[None] | None: ...


class ReconnectHandler(Protocol):
    """Called after a reconnection, once every subscription has been restored."""

    def __call__(self) -> Awaitable[None] | None: ...


# --- pure parts ---------------------------------------------------------------------------------


class Backoff:
    """Exponential backoff with full jitter.

    The n-th delay (counting from 0 since the last :meth:`reset`) is drawn uniformly from
    ``[0, min(maximum, initial * 2**n)]``, so many clients cut off at once do not come back in
    step.
    """

    def __init__(
        self, initial: float = 0.1, maximum: float = 10.0, *, rng: random.Random | None = None
    ) -> None:
        if not initial > 0:
            raise UsageError("backoff_initial must be positive")
        if maximum < initial:
            raise UsageError("backoff_max must not be smaller than backoff_initial")
        self.initial = initial
        self.maximum = maximum
        self.attempts = 0
        self._rng = rng if rng is not None else random.Random()

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # The exponent is capped so the product cannot overflow a float.
        return min(self.maximum, self.initial * 2.0 ** min(self.attempts, 64))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0


def advance(position: Since | None, message: Message) -> Since:
    """The recovery position after ``message``: the highest offset seen in the current epoch.

    A message from another epoch replaces the position: the topic's history was lost and its
    offsets started again.
    """
    if position is None or position.epoch != message.epoch or message.offset > position.offset:
        return Since(offset=message.offset, epoch=message.epoch)
    return position


def with_request_id(frame: ClientFrame, request_id: int) -> ClientFrame:
    """``frame`` with its ``id`` replaced; :class:`UsageError` for a frame that has no ``id``."""
    if "id" not in frame.__dataclass_fields__:
        raise UsageError(f"a {frame.type} frame is not a request; use send()")
    # mypy cannot check replace() across a union whose members differ in fields.
    replaced: ClientFrame = dataclasses.replace(cast(Any, frame), id=request_id)
    return replaced


def _fresh(exc: ProtocolError) -> ProtocolError:
    """A new instance of the same error, so raising it again does not grow one traceback."""
    return type(exc)(exc.message)


def _close_error(exc: ConnectionClosed) -> ProtocolError:
    """The error that stands for a connection closed by either side."""
    frame = exc.rcvd if exc.rcvd is not None else exc.sent
    code = frame.code if frame is not None else None
    reason = frame.reason if frame is not None else ""
    detail = f": {reason}" if reason else ""
    if code == CLOSE_UNAUTHORIZED:
        return Unauthorized(f"the server refused the token{detail}")
    if code == CLOSE_POLICY:
        return Forbidden(f"the server closed the connection for a policy violation{detail}")
    if code == CLOSE_TOO_LARGE:
        return TooLarge(f"the connection was closed because a frame was too large{detail}")
    if code is None:
        return Unavailable("the connection was lost")
    return Unavailable(f"the connection was closed with code {code}{detail}")


def _connect_error(url: str, exc: BaseException, timeout: float) -> ProtocolError:
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        if status == 401:
            return Unauthorized(f"the server at {url} refused the token (HTTP 401)")
        if status == 403:
            return Forbidden(f"the server at {url} refused the connection (HTTP 403)")
        return Unavailable(f"the server at {url} refused the WebSocket upgrade (HTTP {status})")
    # TimeoutError is an OSError: test it first.
    if isinstance(exc, TimeoutError):
        return Unavailable(f"no connection to {url} within {timeout:g} s")
    if isinstance(exc, OSError):
        # asyncio's strerror repeats the address; the errno's own text is the useful part.
        detail = os.strerror(exc.errno) if exc.errno else str(exc)
        return Unavailable(f"cannot connect to {url}: {detail}")
    return Unavailable(f"the WebSocket handshake with {url} failed: {exc}")


def _is_fatal(exc: ProtocolError) -> bool:
    """Errors that reconnecting cannot cure: a refused token, a refused policy."""
    return isinstance(exc, Unauthorized | Forbidden)


def _int_field(ok: Ok, name: str, request: str) -> int:
    value = ok.fields.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"the server's answer to {request} has no integer {name!r}")
    return value


async def _call_handler(handler: Callable[[], Awaitable[None] | None], what: str) -> None:
    """Run a user callback; its failure is logged, never allowed to stop the client."""
    try:
        result = handler()
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("the %s callback failed", what)


async def _close_quietly(ws: ClientConnection, limit: float, code: int = CLOSE_NORMAL) -> None:
    """Close ``ws`` with a handshake when the peer answers in time, else drop the transport."""
    try:
        async with asyncio.timeout(limit):
            await ws.close(code)
    except (Exception, asyncio.CancelledError):
        ws.transport.abort()
        raise


# --- subscriptions ------------------------------------------------------------------------------


class Subscription:
    """The messages of one subscription, as an async iterator of :class:`protocol.frames.Message`.

    Messages wait in a local buffer of at most ``maxsize`` messages. When a message arrives and
    the buffer is full, the OLDEST buffered message is dropped and :attr:`dropped` grows by one:
    a consumer that falls behind loses old messages rather than memory or newer ones.

    On an exact topic, a message whose offset is not above the last one this subscription
    delivered in the same epoch is skipped: replays after a reconnection, or for another
    subscription to the same topic with ``since``, overlap what was already delivered. Wildcard
    subscriptions do not skip anything, and may see such a replayed message again.

    Iteration ends (``StopAsyncIteration``) after :meth:`close` or :meth:`Client.close`; messages
    still buffered then are discarded. When the client stops for another reason (a refused token,
    a lost connection without reconnection), the buffered messages are yielded first, then the
    reason is raised.
    """

    def __init__(
        self,
        pattern: str,
        release: Callable[[Subscription], Awaitable[None]],
        maxsize: int = DEFAULT_SUBSCRIPTION_MAXSIZE,
    ) -> None:
        if maxsize < 1:
            raise UsageError("a subscription's maxsize must be at least 1")
        self.pattern = pattern
        self.maxsize = maxsize
        #: Messages dropped because the buffer was full.
        self.dropped = 0
        #: The ``recovered`` flag of the server's last answer to this subscription (None when the
        #: answer had none, i.e. no ``since`` was sent).
        self.recovered: bool | None = None
        self._release = release
        self._buffer: deque[Message] = deque()
        self._wakeup = asyncio.Event()
        self._finished = False
        self._error: ProtocolError | None = None
        self._exact = is_exact(pattern)
        self._last_offset = -1
        self._last_epoch: str | None = None

    @property
    def buffered(self) -> int:
        """How many messages wait in the local buffer."""
        return len(self._buffer)

    @property
    def closed(self) -> bool:
        return self._finished

    def _push(self, message: Message) -> None:
        if self._finished:
            return
        if self._exact:
            if message.epoch == self._last_epoch and message.offset <= self._last_offset:
                return
            self._last_offset, self._last_epoch = message.offset, message.epoch
        if len(self._buffer) >= self.maxsize:
            self._buffer.popleft()
            self.dropped += 1
        self._buffer.append(message)
        self._wakeup.set()

    def _finish(self, error: ProtocolError | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._error = error
        if error is None:
            self._buffer.clear()
        self._wakeup.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._finished:
                if self._error is not None:
                    raise _fresh(self._error)
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    async def close(self) -> None:
        """Stop receiving: unsubscribes on the server unless another local subscription still
        uses the same pattern. Never raises for a lost connection (the server forgets a closed
        connection's subscriptions anyway)."""
        if not self._finished:
            self._finish(None)
            await self._release(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Subscription {self.pattern!r} buffered={self.buffered} dropped={self.dropped}>"


class _Registry:
    """The local subscriptions by pattern, and the recovery position of each exact topic."""

    def __init__(self) -> None:
        self.exact: dict[str, list[Subscription]] = {}
        self.wildcard: dict[str, list[Subscription]] = {}
        self.positions: dict[str, Since] = {}

    def _table(self, pattern: str) -> dict[str, list[Subscription]]:
        return self.exact if is_exact(pattern) else self.wildcard

    def add(self, sub: Subscription, since: Since | None = None) -> None:
        self._table(sub.pattern).setdefault(sub.pattern, []).append(sub)
        if since is not None:
            self.positions[sub.pattern] = since

    def remove(self, sub: Subscription) -> bool:
        """Forget ``sub``; True when no other subscription uses its pattern any more."""
        table = self._table(sub.pattern)
        subs = table.get(sub.pattern)
        if subs is None or sub not in subs:
            return False
        subs.remove(sub)
        if subs:
            return False
        del table[sub.pattern]
        self.positions.pop(sub.pattern, None)
        return True

    def pop_pattern(self, pattern: str) -> list[Subscription]:
        self.positions.pop(pattern, None)
        return self._table(pattern).pop(pattern, [])

    def subscriptions(self, pattern: str) -> list[Subscription]:
        return list(self._table(pattern).get(pattern, ()))

    def patterns(self) -> list[str]:
        """Exact topics first: re-subscribed in this order, their replays are all sent before a
        wildcard subscription can deliver a newer message on the same topic, which would make
        the replayed ones look like duplicates."""
        return [*self.exact, *self.wildcard]

    def since(self, pattern: str) -> Since | None:
        return self.positions.get(pattern)

    def seed(self, pattern: str, ok: Ok) -> None:
        """Take the topic's position from a subscribe answer that carries ``offset`` and
        ``epoch``, unless a position in the same epoch is known already."""
        offset, epoch = ok.fields.get("offset"), ok.fields.get("epoch")
        if pattern not in self.exact or not isinstance(epoch, str):
            return
        if isinstance(offset, bool) or not isinstance(offset, int):
            return
        known = self.positions.get(pattern)
        if known is None or known.epoch != epoch:
            self.positions[pattern] = Since(offset=offset, epoch=epoch)

    def route(self, message: Message) -> int:
        """Hand ``message`` to every subscription whose pattern matches its topic."""
        reached = 0
        topic = message.topic
        subs = self.exact.get(topic)
        if subs:
            self.positions[topic] = advance(self.positions.get(topic), message)
            for sub in subs:
                sub._push(message)
            reached += len(subs)
        for pattern, subs in self.wildcard.items():
            if matches(pattern, topic):
                for sub in subs:
                    sub._push(message)
                reached += len(subs)
        return reached

    def finish_all(self, error: ProtocolError | None) -> None:
        for table in (self.exact, self.wildcard):
            for subs in table.values():
                for sub in subs:
                    sub._finish(error)
            table.clear()
        self.positions.clear()


class ConnectedFlag:
    """A read-only view of the client's "connected and authenticated" event."""

    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    def __repr__(self) -> str:
        return f"<ConnectedFlag {'set' if self.is_set() else 'clear'}>"


# --- the client ---------------------------------------------------------------------------------


class Client:
    """One authenticated connection to a quicksilver broker, re-established when it drops.

    Use it as ``async with Client(url, token=jwt) as client:`` (or ``await client.connect()``
    and ``await client.close()``). The first connection is tried once: an unreachable server
    raises :class:`~protocol.errors.Unavailable`, a refused token
    :class:`~protocol.errors.Unauthorized`, both within ``open_timeout`` seconds.

    Arguments:
        url: the broker's WebSocket endpoint, e.g. ``ws://127.0.0.1:8000/ws``.
        token: a JWT; None asks for anonymous (read-only, public topics) access.
        encoding: ``"json"`` or ``"msgpack"``, offered as subprotocol ``quicksilver.v1.<enc>``.
        reconnect: re-establish a lost connection (not after a refused token or close 1008).
        open_timeout: seconds for TCP, WebSocket handshake and ``welcome`` together.
        request_timeout: seconds a request waits (for a connection, then for its answer).
        backoff_initial, backoff_max: reconnection delays, see :class:`Backoff`.
        max_size: largest frame accepted from the server; a larger one drops the connection.
        headers_auth: send the token in an ``Authorization: Bearer`` header instead of an
            ``auth`` frame, so the upgrade request itself is authenticated (browsers cannot).
        ping_interval: seconds between WebSocket keepalive pings (None: no keepalive), which
            detect a dead connection that TCP would not report.
        close_timeout: seconds to wait for the closing handshake.
        subscription_maxsize: default buffer bound of each :class:`Subscription`.
        on_frame: receives unsolicited frames other than messages (see :class:`FrameHandler`).
        on_reconnect: called after each successful reconnection, once the subscriptions are
            restored (a worker sends ``work`` again there).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        encoding: Encoding = "json",
        reconnect: bool = True,
        open_timeout: float = 10.0,
        request_timeout: float = 10.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        max_size: int = 1 << 20,
        headers_auth: bool = False,
        ping_interval: float | None = 20.0,
        close_timeout: float = 5.0,
        subscription_maxsize: int = DEFAULT_SUBSCRIPTION_MAXSIZE,
        on_frame: FrameHandler | None = None,
        on_reconnect: ReconnectHandler | None = None,
    ) -> None:
        try:
            parse_uri(url)
        except InvalidURI as exc:
            raise UsageError(f"not a WebSocket URL: {url!r} ({exc})") from None
        if encoding not in ("json", "msgpack"):
            raise UsageError(f"encoding must be 'json' or 'msgpack', not {encoding!r}")
        if not open_timeout > 0 or not request_timeout > 0 or not close_timeout > 0:
            raise UsageError("timeouts must be positive")
        if subscription_maxsize < 1:
            raise UsageError("subscription_maxsize must be at least 1")
        self.url = url
        self.encoding: Encoding = encoding
        self.reconnect = reconnect
        self.open_timeout = open_timeout
        self.request_timeout = request_timeout
        self.max_size = max_size
        self.headers_auth = headers_auth
        self.ping_interval = ping_interval
        self.close_timeout = close_timeout
        self.subscription_maxsize = subscription_maxsize
        self.on_frame = on_frame
        self.on_reconnect = on_reconnect
        #: The ``welcome`` of the current (or last) connection; None before the first one.
        self.welcome: Welcome | None = None
        #: How many times the connection was re-established.
        self.reconnects = 0
        self._token = token
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Ok | Pong]] = {}
        self._registry = _Registry()
        self._ws: ClientConnection | None = None
        self._wire: Encoding = encoding
        self._connected = asyncio.Event()
        self._stopped = asyncio.Event()
        self._closing = False
        self._stop_reason: ProtocolError | None = None
        self._runner: asyncio.Task[None] | None = None

    # --- state ---------------------------------------------------------------------------------

    @property
    def token(self) -> str | None:
        return self._token

    @property
    def connected(self) -> ConnectedFlag:
        """Set while the client is connected, authenticated and its subscriptions restored."""
        return ConnectedFlag(self._connected)

    @property
    def stopped(self) -> bool:
        """True once the client has stopped for good (closed, refused, or lost without
        reconnection); :attr:`stop_reason` says why."""
        return self._stopped.is_set()

    @property
    def stop_reason(self) -> ProtocolError | None:
        """Why the client stopped; None while it runs or when it was closed on purpose."""
        return self._stop_reason

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the client is connected (at most ``timeout`` seconds, None: no bound).

        Raises :class:`RequestTimeout` when the time runs out, and the reason the client
        stopped when it stops meanwhile.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._current(wait=True)
        except TimeoutError:
            raise RequestTimeout(f"not connected to {self.url} within {timeout:g} s") from None

    async def wait_stopped(self) -> ProtocolError | None:
        """Wait until the client stops for good; returns :attr:`stop_reason`."""
        await self._stopped.wait()
        return self._stop_reason

    # --- lifecycle -----------------------------------------------------------------------------

    async def connect(self) -> Self:
        """Open the first connection and start reading; see the class docstring for failures."""
        if self._closing or self._stopped.is_set():
            raise UsageError("this client was closed; create a new one")
        if self._runner is not None:
            raise UsageError("connect() was called already")
        ws, wire, welcome = await self._open()
        self._install(ws, wire, welcome)
        self._connected.set()
        self._runner = asyncio.create_task(self._run(ws, wire), name=f"quicksilver {self.url}")
        return self

    async def close(self) -> None:
        """Close the connection (code 1000), stop reconnecting, end every subscription's
        iteration and fail the requests still waiting with :class:`~protocol.errors.Unavailable`.
        Idempotent."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await _close_quietly(ws, self.close_timeout)
        runner = self._runner
        if runner is not None and runner is not asyncio.current_task():
            # A runner waiting in backoff or in a handshake does not notice the flag by itself.
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        self._stop(None)

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- requests ------------------------------------------------------------------------------

    async def request(
        self,
        frame: RequestFrame,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Ok:
        """Send a request and wait for its ``ok``.

        The frame's ``id`` is replaced by the next integer id. Waits for a connection first
        when the client is reconnecting; the whole wait is bounded by ``timeout`` (default
        ``request_timeout``). Raises the :class:`~protocol.errors.ProtocolError` subclass of an
        ``error`` answer, :class:`RequestTimeout`, or :class:`~protocol.errors.Unavailable` when
        the connection dropped first. Use :meth:`subscribe` rather than a raw ``Subscribe``, so
        messages reach a :class:`Subscription`.
        """
        if isinstance(frame, Auth | Ping):
            raise UsageError(f"a {frame.type} frame is not sent with request(); see ping()")
        answer = await self._call(frame, timeout)
        if not isinstance(answer, Ok):
            raise BadRequest(f"the server answered {frame.type} with {answer.type}")
        if isinstance(frame, Refresh):
            self._token = frame.token
        return answer

    async def send(self, frame: ClientFrame) -> None:
        """Send a frame that gets no answer (``progress``, ``heartbeat``).

        Does not wait for a connection: raises :class:`~protocol.errors.Unavailable` at once
        when there is none.
        """
        if isinstance(frame, Auth):
            raise UsageError("the client authenticates by itself")
        ws, wire = await self._current(wait=False)
        try:
            await self._send_on(ws, wire, frame)
        except ConnectionClosed as exc:
            raise _close_error(exc) from None

    async def publish(self, topic: str, data: Any = None) -> int:
        """Publish ``data`` (any JSON value) on the exact ``topic``; returns its offset."""
        parse_topic(topic)
        ok = await self.request(Publish(id=None, topic=topic, data=data))
        return _int_field(ok, "offset", "publish")

    async def subscribe(
        self, pattern: str, since: Since | None = None, *, maxsize: int | None = None
    ) -> Subscription:
        """Subscribe to ``pattern``; the returned :class:`Subscription` yields its messages.

        ``since`` (exact topics only) asks for the messages after that offset from the topic's
        history; :attr:`Subscription.recovered` then says whether none were missing. A message
        that matches several local subscriptions reaches each of them.
        """
        parse_pattern(pattern)
        if since is not None and not is_exact(pattern):
            raise UsageError("'since' needs an exact topic, not a pattern with wildcards")
        sub = Subscription(pattern, self._release, maxsize or self.subscription_maxsize)
        # Registered before the request is sent: replayed messages follow the answer closely.
        self._registry.add(sub, since)
        try:
            ok = await self._call(Subscribe(id=None, topic=pattern, since=since), None)
        except BaseException:
            self._registry.remove(sub)
            raise
        assert isinstance(ok, Ok)
        self._accept_subscribe(pattern, ok, [sub])
        return sub

    async def unsubscribe(self, pattern: str) -> None:
        """End every local subscription to ``pattern`` and unsubscribe on the server."""
        for sub in self._registry.pop_pattern(pattern):
            sub._finish(None)
        await self._unsubscribe_remote(pattern)

    async def ping(self) -> float:
        """Round trip of a ``ping`` frame, in seconds."""
        started = time.perf_counter()
        await self._call(Ping(), None)
        return time.perf_counter() - started

    async def enqueue(
        self,
        queue: str,
        payload: Any = None,
        *,
        priority: int = 0,
        delay: float = 0,
        unique_key: str | None = None,
        max_attempts: int = 5,
    ) -> tuple[str, bool]:
        """Add a job to ``queue``; returns ``(job id, duplicate)``. ``duplicate`` is True when
        ``unique_key`` matched an unfinished job, whose id is returned."""
        ok = await self.request(
            Enqueue(
                id=None,
                queue=queue,
                payload=payload,
                priority=priority,
                delay=delay,
                unique_key=unique_key,
                max_attempts=max_attempts,
            )
        )
        job = ok.fields.get("job")
        if not isinstance(job, str):
            raise BadRequest("the server's answer to enqueue has no job id")
        return job, bool(ok.fields.get("duplicate", False))

    async def refresh(self, token: str) -> Ok:
        """Replace the connection's token; later reconnections use the new one."""
        return await self.request(Refresh(id=None, token=token))

    # --- internals: requests -------------------------------------------------------------------

    async def _current(self, *, wait: bool) -> tuple[ClientConnection, Encoding]:
        """The live connection. With ``wait``, waits for one while reconnecting."""
        while True:
            if self._stopped.is_set():
                if self._stop_reason is not None:
                    raise _fresh(self._stop_reason)
                raise UsageError("the client is closed")
            if self._runner is None:
                raise UsageError("the client is not connected; use 'async with' or connect()")
            ws = self._ws
            if ws is not None and (self._connected.is_set() or not wait):
                return ws, self._wire
            if not wait:
                raise Unavailable(f"not connected to {self.url}")
            waiters = [
                asyncio.ensure_future(self._connected.wait()),
                asyncio.ensure_future(self._stopped.wait()),
            ]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def _call(
        self, frame: ClientFrame, limit: float | None, *, wait: bool = True
    ) -> Ok | Pong:
        request_id = next(self._ids)
        frame = with_request_id(frame, request_id)
        future: asyncio.Future[Ok | Pong] = asyncio.get_running_loop().create_future()
        if limit is None:
            limit = self.request_timeout
        try:
            async with asyncio.timeout(limit):
                ws, wire = await self._current(wait=wait)
                data = _encode(frame, wire)
                self._pending[request_id] = future
                await ws.send(data, text=wire == "json")
                return await future
        except TimeoutError:
            raise RequestTimeout(f"no answer to {frame.type} within {limit:g} s") from None
        except ConnectionClosed as exc:
            raise _close_error(exc) from None
        finally:
            self._pending.pop(request_id, None)
            if future.done() and not future.cancelled():
                # Mark an error set by a lost connection as retrieved when send() failed first.
                future.exception()

    async def _send_on(self, ws: ClientConnection, wire: Encoding, frame: ClientFrame) -> None:
        await ws.send(_encode(frame, wire), text=wire == "json")

    async def _release(self, sub: Subscription) -> None:
        if self._registry.remove(sub):
            await self._unsubscribe_remote(sub.pattern)

    async def _unsubscribe_remote(self, pattern: str) -> None:
        if self._stopped.is_set() or self._closing or self._ws is None:
            return
        # The server forgets the subscriptions of a lost connection by itself.
        with contextlib.suppress(Unavailable):
            await self._call(Unsubscribe(id=None, topic=pattern), None, wait=False)

    def _accept_subscribe(self, pattern: str, ok: Ok, subs: list[Subscription]) -> None:
        recovered = ok.fields.get("recovered")
        for sub in subs:
            sub.recovered = recovered if isinstance(recovered, bool) else None
        self._registry.seed(pattern, ok)

    # --- internals: connection -----------------------------------------------------------------

    async def _open(self) -> tuple[ClientConnection, Encoding, Welcome]:
        """Connect, authenticate and wait for ``welcome``, all within ``open_timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.open_timeout
        headers = None
        if self.headers_auth and self._token is not None:
            headers = {"Authorization": f"Bearer {self._token}"}
        subprotocol = SUBPROTOCOL_JSON if self.encoding == "json" else SUBPROTOCOL_MSGPACK
        try:
            async with asyncio.timeout_at(deadline):
                ws = await connect(
                    self.url,
                    subprotocols=[Subprotocol(subprotocol)],
                    additional_headers=headers,
                    open_timeout=None,
                    # The broker writes one pre-encoded frame to many connections; per-message
                    # compression would defeat that, so it is not offered.
                    compression=None,
                    max_size=self.max_size,
                    ping_interval=self.ping_interval,
                    ping_timeout=self.ping_interval,
                    close_timeout=self.close_timeout,
                )
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise _connect_error(self.url, exc, self.open_timeout) from None
        # A server that picks no subprotocol speaks JSON (PROTOCOL.md, Connection).
        wire = SUBPROTOCOLS.get(ws.subprotocol or "", "json")
        error: ProtocolError
        try:
            async with asyncio.timeout_at(deadline):
                if not (self.headers_auth and self._token is not None):
                    await self._send_on(ws, wire, Auth(token=self._token))
                welcome = await self._await_welcome(ws, wire)
        except TimeoutError:
            error = Unavailable(f"no welcome from {self.url} within {self.open_timeout:g} s")
        except ConnectionClosed as exc:
            error = _close_error(exc)
        except ProtocolError as exc:
            error = exc
        except BaseException:
            ws.transport.abort()
            raise
        else:
            return ws, wire, welcome
        with contextlib.suppress(Exception):
            await _close_quietly(ws, min(self.close_timeout, 1.0))
        raise error

    async def _await_welcome(self, ws: ClientConnection, wire: Encoding) -> Welcome:
        while True:
            raw = await ws.recv(decode=False)
            try:
                frame = _decode_server(raw, wire)
            except BadRequest as exc:
                raise BadRequest(
                    f"{self.url} sent an undecodable frame before welcome: {exc.message}"
                ) from None
            if isinstance(frame, Welcome):
                return frame
            if isinstance(frame, Error):
                raise error_for_code(frame.code, frame.message)
            logger.debug("ignoring a %s frame before welcome", frame.type)

    def _install(self, ws: ClientConnection, wire: Encoding, welcome: Welcome) -> None:
        self._ws = ws
        self._wire = wire
        self.welcome = welcome

    def _lost(self, reason: ProtocolError | None) -> None:
        """Forget the connection; requests waiting for an answer fail."""
        self._connected.clear()
        self._ws = None
        error = reason if reason is not None else Unavailable("the client was closed")
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(Unavailable(f"no answer: {error.message}"))

    def _stop(self, reason: ProtocolError | None) -> None:
        if self._stopped.is_set():
            return
        self._stop_reason = reason
        self._lost(reason)
        self._registry.finish_all(reason)
        self._stopped.set()

    async def _run(self, ws: ClientConnection, wire: Encoding) -> None:
        """Read the connection; when it drops, reconnect and restore, until stopped."""
        loop = asyncio.get_running_loop()
        restore: asyncio.Task[None] | None = None
        reason: ProtocolError | None = None
        try:
            while True:
                started = loop.time()
                reason = await self._read(ws, wire)
                if restore is not None:
                    restore.cancel()
                    restore = None
                self._lost(reason)
                if reason is None or self._closing:
                    reason = None
                    return
                if not self.reconnect or _is_fatal(reason):
                    return
                logger.warning("connection to %s lost (%s); reconnecting", self.url, reason)
                if loop.time() - started >= self._backoff.maximum:
                    self._backoff.reset()
                ws, wire, welcome = await self._reconnect()
                self._install(ws, wire, welcome)
                self.reconnects += 1
                restore = asyncio.create_task(self._restore())
        except ProtocolError as exc:
            reason = exc
        except Exception as exc:
            logger.exception("the client's reading task failed")
            reason = InternalError(f"the client failed: {exc!r}")
        finally:
            if restore is not None:
                restore.cancel()
            if self._ws is not None and reason is not None:
                self._ws.transport.abort()
            self._stop(None if self._closing else reason)

    async def _reconnect(self) -> tuple[ClientConnection, Encoding, Welcome]:
        """Try until a connection is authenticated; raises only errors that retrying cannot
        cure (see :func:`_is_fatal`)."""
        while True:
            await asyncio.sleep(self._backoff.next_delay())
            try:
                return await self._open()
            except ProtocolError as exc:
                if _is_fatal(exc):
                    raise
                logger.info("reconnecting to %s failed (%s)", self.url, exc)

    async def _restore(self) -> None:
        """Re-subscribe every subscription on a new connection, then mark it connected."""
        patterns = self._registry.patterns()
        answers = await asyncio.gather(
            *(self._resubscribe(pattern) for pattern in patterns), return_exceptions=True
        )
        for pattern, answer in zip(patterns, answers, strict=True):
            if isinstance(answer, Unavailable):
                return  # this connection is gone too; the next one restores again
            if isinstance(answer, ProtocolError):
                # The server no longer allows it (e.g. a refreshed token with fewer rights).
                logger.warning("re-subscribing to %s failed: %s", pattern, answer)
                for sub in self._registry.pop_pattern(pattern):
                    sub._finish(answer)
            elif isinstance(answer, BaseException):
                raise answer
        self._connected.set()
        logger.info("reconnected to %s", self.url)
        if self.on_reconnect is not None:
            await _call_handler(self.on_reconnect, "on_reconnect")

    async def _resubscribe(self, pattern: str) -> None:
        since = self._registry.since(pattern)
        answer = await self._call(Subscribe(id=None, topic=pattern, since=since), None, wait=False)
        assert isinstance(answer, Ok)
        self._accept_subscribe(pattern, answer, self._registry.subscriptions(pattern))
        if since is not None and answer.fields.get("recovered") is False:
            logger.warning(
                "%s: the messages after offset %d could not all be replayed (the topic's "
                "history was lost or does not reach back that far); some were missed",
                pattern,
                since.offset,
            )

    async def _read(self, ws: ClientConnection, wire: Encoding) -> ProtocolError | None:
        """Dispatch frames until the connection ends; returns why (None: closed on purpose)."""
        refused: Unauthorized | None = None
        try:
            while True:
                raw = await ws.recv(decode=False)
                try:
                    frame = _decode_server(raw, wire)
                except BadRequest as exc:
                    logger.warning("ignoring an undecodable frame from the server: %s", exc)
                    continue
                if isinstance(frame, Error) and frame.id is None and frame.code == "unauthorized":
                    refused = Unauthorized(frame.message)
                await self._dispatch(frame)
        except ConnectionClosed as exc:
            if self._closing:
                return None
            reason = _close_error(exc)
            if refused is not None and isinstance(reason, Unauthorized):
                return refused
            return reason

    async def _dispatch(self, frame: ServerFrame) -> None:
        if isinstance(frame, Message):
            self._registry.route(frame)
            return
        if isinstance(frame, Ok | Pong | Error) and isinstance(frame.id, int):
            future = self._pending.get(frame.id)
            if future is not None:
                if not future.done():
                    if isinstance(frame, Error):
                        future.set_exception(error_for_code(frame.code, frame.message))
                    else:
                        future.set_result(frame)
                return
        if isinstance(frame, Ok | Pong) or (isinstance(frame, Error) and frame.id is not None):
            logger.debug("dropping a late answer %r", frame)
            return
        if isinstance(frame, Error):
            logger.warning("the server reports: %s (%s)", frame.message, frame.code)
        handler = self.on_frame
        if handler is not None:
            await _call_handler(lambda: handler(frame), "on_frame")
        elif not isinstance(frame, Error):
            logger.debug("no on_frame handler for a %s frame", frame.type)

    def __repr__(self) -> str:
        state = "connected" if self._connected.is_set() else "stopped" if self.stopped else "idle"
        return f"<Client {self.url} {state}>"
