"""The Redis backplane: several broker nodes behind a load balancer act as one broker.

Sequencing
----------
Every publish runs one Lua script in Redis that increments the topic's offset, appends the
message to the topic's history list (trimmed to ``history_window``), refreshes the keys' time
to live and ``PUBLISH``\\ es the message, all in one atomic step. Redis runs scripts one at a
time, so for every topic the order of offsets is the order in which every node receives the
messages, and offsets have no gaps whichever node published. A topic's epoch lives in the same
hash as its offset: when the keys are lost (Redis restarted without persistence, memory
eviction, or ``history_ttl`` seconds without a message), the next publish creates a new epoch,
which tells clients that the history before it is gone.

Keys (``{topic}`` is a hash tag: a topic's keys stay in one slot of a Redis Cluster)::

    <prefix>:h:{<topic>}   hash: e = epoch, o = last offset
    <prefix>:l:{<topic>}   list: the last history_window messages
    <prefix>:m:<topic>     pub/sub channel of the topic
    <prefix>:n:<node>      pub/sub channel of one node (ordering barriers)

Each message travels as ``<offset>|<epoch>|<msgpack [ts, data]>``.

Subscriptions
-------------
A node subscribes in Redis only to what its local subscribers ask for: an exact topic becomes a
``SUBSCRIBE`` of its channel (a hash lookup in Redis), a pattern a ``PSUBSCRIBE`` of a glob that
matches at least the pattern's topics (the hub filters exactly). Subscriptions are counted per
pattern; the first local subscriber subscribes, the last one leaving unsubscribes. A message
that matches several of a node's Redis subscriptions arrives once per subscription, back to
back; the node delivers it once (it drops an offset it has already delivered for the topic).

Recovery without gaps
---------------------
:meth:`RedisBackplane.recent` reads a topic's head and history and, in the same script,
publishes a marker on the node's own channel. Redis writes to one connection in execution
order, so once the marker comes back on the subscription connection, every message up to that
head has been read and delivered; a subscriber added then misses nothing and gets nothing twice.

Limits and failure behaviour
----------------------------
- Two connections per node: one for commands (scripts pipelined: every submission queued
  while a batch is in flight goes out in the next batch, ``batch_max`` at most), one for
  subscriptions. At most ``backlog_max`` submissions wait; beyond that :meth:`submit` raises
  :class:`protocol.errors.Unavailable` at once.
- When Redis cannot be reached, waiting and new submissions fail with
  :class:`~protocol.errors.Unavailable` (a submission in flight when the connection broke may or
  may not have been published) and the node reconnects with backoff. Messages published while
  the subscription connection was down are not delivered to this node: its subscribers see the
  offsets jump and can recover the gap from history with ``since``.
- Memory in Redis: about 100 bytes per topic plus the retained messages, for topics published
  in the last ``history_ttl`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from protocol.errors import Unavailable, UsageError
from protocol.topics import STAR, STARSTAR, is_exact

from .base import Deliver, Envelope, SequencingBackplane, TopicHistory

__all__ = ["RedisBackplane"]

log = logging.getLogger("quicksilver.backplane.redis")

# KEYS: head hash, history list. ARGV: channel, body, epoch if new, window, ttl.
_PUBLISH_LUA = """
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
    epoch = ARGV[3]
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
end
local off = redis.call('HINCRBY', KEYS[1], 'o', 1)
local msg = off .. '|' .. epoch .. '|' .. ARGV[2]
local window = tonumber(ARGV[4])
if window > 0 then
    redis.call('RPUSH', KEYS[2], msg)
    redis.call('LTRIM', KEYS[2], -window, -1)
    redis.call('EXPIRE', KEYS[2], ARGV[5])
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[1], msg)
return {off, epoch}
"""

# KEYS: head hash, history list. ARGV: after offset (-1: no entries), barrier channel, barrier
# token, epoch if new, ttl.
_RECENT_LUA = """
local epoch = redis.call('HGET', KEYS[1], 'e')
local fresh = 0
local off = 0
if not epoch then
    epoch = ARGV[4]
    fresh = 1
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
    redis.call('EXPIRE', KEYS[1], ARGV[5])
else
    off = tonumber(redis.call('HGET', KEYS[1], 'o'))
end
local entries = {}
local after = tonumber(ARGV[1])
if after >= 0 and after < off then
    local first = redis.call('LINDEX', KEYS[2], 0)
    if first then
        local start = after + 1 - tonumber(string.match(first, '^(%d+)|'))
        if start < 0 then start = 0 end
        entries = redis.call('LRANGE', KEYS[2], start, -1)
    end
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return {epoch, off, fresh, entries}
"""

_LOAD_SCRIPTS = (("SCRIPT", "LOAD", _PUBLISH_LUA), ("SCRIPT", "LOAD", _RECENT_LUA))
_RETRYABLE = (RedisError, OSError, TimeoutError)
_VERBS = {
    (b"s", True): b"SUBSCRIBE",
    (b"s", False): b"UNSUBSCRIBE",
    (b"p", True): b"PSUBSCRIBE",
    (b"p", False): b"PUNSUBSCRIBE",
}


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _new_epoch() -> str:
    return secrets.token_hex(4)


@dataclass(slots=True)
class _Sub:
    """One Redis-level subscription (a channel or a glob) and where it stands."""

    kind: bytes  # b"s" channel, b"p" glob
    refs: int = 0
    sent: bool = False  # last command sent on the current connection was a subscribe
    inflight: deque[bool] = field(default_factory=deque)  # unconfirmed commands (True: sub)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.sent and not self.inflight


@dataclass(slots=True)
class _Call:
    """Commands sent together, answered by one future with the list of replies."""

    commands: list[tuple[Any, ...]]
    future: asyncio.Future[list[Any]]
    retried: bool = False


class RedisBackplane(SequencingBackplane):
    """:class:`SequencingBackplane` over Redis pub/sub and Lua scripts (redis-py asyncio).

    ``url`` is a ``redis://`` or ``rediss://`` URL. ``prefix`` namespaces every key and channel
    (nodes of one cluster share it; two clusters on one Redis use different ones).
    ``history_window`` messages per topic are kept for recovery, for ``history_ttl`` seconds
    after the topic's last message. ``timeout`` (seconds) bounds connecting, each round trip and
    the wait for a subscription or barrier. ``batch_max`` caps the scripts sent in one round
    trip and ``backlog_max`` the submissions waiting (see the module docstring).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "qs",
        history_window: int = 100,
        history_ttl: float = 3600.0,
        timeout: float = 5.0,
        batch_max: int = 1000,
        backlog_max: int = 100_000,
        ping_interval: float = 10.0,
    ) -> None:
        if not prefix or any(c.isspace() for c in prefix):
            raise UsageError("the Redis prefix must be a non-empty word without spaces")
        if history_window < 0 or history_ttl <= 0 or batch_max < 1 or backlog_max < 1:
            raise UsageError("history_window >= 0, history_ttl > 0 and batch_max >= 1 needed")
        self.url = url
        self.prefix = prefix
        self.history_window = history_window
        self.history_ttl = max(1, math.ceil(history_ttl))
        self.timeout = timeout
        self.batch_max = batch_max
        self.backlog_max = backlog_max
        self.ping_interval = ping_interval
        self.node = secrets.token_hex(6)
        options: dict[str, Any] = {
            # RESP2: subscription messages are plain replies on the link (RESP3 turns them
            # into push messages that redis-py routes around ``read_response``).
            "protocol": 2,
            "socket_connect_timeout": timeout,
            "socket_keepalive": True,
            "retry": Retry(NoBackoff(), 0),
        }
        # Named so that an operator can tell them apart in CLIENT LIST.
        name = f"quicksilver:{prefix}:{self.node}"
        try:
            self._pool = ConnectionPool.from_url(
                url, socket_timeout=timeout, client_name=name + ":cmd", **options
            )
            # Reads on the subscription link wait for messages as long as it takes.
            self._pubsub_pool = ConnectionPool.from_url(
                url, socket_timeout=None, client_name=name + ":sub", **options
            )
        except ValueError as exc:
            raise UsageError(f"not a usable Redis URL: {exc}") from None
        self._channel_prefix = f"{prefix}:m:"
        self._channel_prefix_b = self._channel_prefix.encode()
        self._node_channel = f"{prefix}:n:{self.node}".encode()
        self._deliver: Deliver | None = None
        self._observers: dict[str, list[Deliver]] = {}
        self._last: dict[str, tuple[str, int]] = {}
        self._subs: dict[bytes, _Sub] = {}
        self._barriers: dict[bytes, asyncio.Future[None]] = {}
        self._calls: deque[_Call] = deque()
        self._backlog = 0
        self._wake_link = asyncio.Event()
        self._pubsub: AbstractConnection | None = None
        self._pubsub_ready = asyncio.Event()
        self._flush_scheduled = False
        self._last_read = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._publish_sha = ""
        self._recent_sha = ""
        #: Messages dropped because this node had already delivered them (several matching
        #: subscriptions), and messages received after a gap in a topic's offsets.
        self.duplicates = 0
        self.gaps = 0
        #: Submissions that failed (Redis unreachable or refusing, or the backlog full).
        self.failures = 0

    # --- life cycle ------------------------------------------------------------------------

    async def start(self, deliver: Deliver) -> None:
        """Connect both links and load the scripts. Raises :class:`Unavailable` when Redis
        cannot be reached within ``timeout``."""
        self._deliver = deliver
        self._tasks = [
            asyncio.create_task(self._link_loop(), name="qs-redis-link"),
            asyncio.create_task(self._pubsub_loop(), name="qs-redis-pubsub"),
        ]
        try:
            await asyncio.wait_for(self._pubsub_ready.wait(), self.timeout)
            await self._load_scripts()
        except (TimeoutError, Unavailable) as exc:
            await self.close()
            raise Unavailable(f"cannot reach Redis at {self._where()}: {exc}") from None

    async def _load_scripts(self) -> None:
        replies = await self._call(
            [("SCRIPT", "LOAD", _PUBLISH_LUA), ("SCRIPT", "LOAD", _RECENT_LUA)]
        )
        self._publish_sha, self._recent_sha = (r.decode() for r in replies)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        error = Unavailable("the Redis backplane is closed")
        while self._calls:
            call = self._calls.popleft()
            if not call.future.done():
                call.future.set_exception(error)
        for future in self._barriers.values():
            future.cancel()
        for sub in self._subs.values():
            for waiter in sub.waiters:
                waiter.cancel()
        self._subs.clear()
        for pool in (self._pool, self._pubsub_pool):
            with contextlib.suppress(Exception):
                await pool.disconnect()
        self._deliver = None

    def _where(self) -> str:
        kw = self._pool.connection_kwargs
        return f"{kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}"

    # --- the command link: pipelined round trips -------------------------------------------

    def _call(self, commands: list[tuple[Any, ...]]) -> asyncio.Future[list[Any]]:
        """Queue commands for the next round trip; the future gets their replies (a reply that
        is an error comes back as the exception object, not raised)."""
        if self._closed:
            raise Unavailable("the Redis backplane is closed")
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._calls.append(_Call(commands, future))
        self._wake_link.set()
        return future

    async def _link_loop(self) -> None:
        conn: AbstractConnection | None = None
        delay = 0.05
        while True:
            await self._wake_link.wait()
            self._wake_link.clear()
            while self._calls:
                batch: list[_Call] = []
                count = 0
                while self._calls and count < self.batch_max:
                    call = self._calls.popleft()
                    if not call.future.done():
                        batch.append(call)
                        count += len(call.commands)
                if not batch:
                    continue
                try:
                    if conn is None:
                        conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
                        await conn.connect()
                    replies = await self._round_trip(conn, batch)
                except asyncio.CancelledError:
                    self._fail(batch, Unavailable("the Redis backplane is closed"))
                    raise
                except _RETRYABLE as exc:
                    self._fail(batch, Unavailable(f"Redis at {self._where()}: {exc}"))
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.disconnect()
                    conn = None
                    log.warning("Redis command link: %s; retrying in %.2f s", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                delay = 0.05
                self._answer(batch, replies)

    async def _round_trip(self, conn: AbstractConnection, batch: list[_Call]) -> list[Any]:
        packed: list[bytes] = []
        for call in batch:
            for command in call.commands:
                packed.extend(conn.pack_command(*command))
        await conn.send_packed_command(packed, check_health=False)
        replies: list[Any] = []
        for _ in range(sum(len(call.commands) for call in batch)):
            try:
                replies.append(await conn.read_response(timeout=self.timeout))
            except ResponseError as exc:
                replies.append(exc)
        return replies

    def _answer(self, batch: list[_Call], replies: list[Any]) -> None:
        again: list[_Call] = []
        i = 0
        for call in batch:
            mine = replies[i : i + len(call.commands)]
            i += len(call.commands)
            if any(isinstance(r, NoScriptError) for r in mine) and not call.retried:
                # Redis lost its script cache (a restart): the script did not run, so sending
                # it again is safe; order is kept by putting these first.
                call.retried = True
                again.append(call)
            elif not call.future.done():
                call.future.set_result(mine)
        if again:
            reloaded: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            reloaded.add_done_callback(_retrieve)
            reload = _Call(
                [("SCRIPT", "LOAD", _PUBLISH_LUA), ("SCRIPT", "LOAD", _RECENT_LUA)], reloaded
            )
            self._calls.extendleft(reversed([reload, *again]))
            self._wake_link.set()

    @staticmethod
    def _fail(batch: list[_Call], error: Exception) -> None:
        for call in batch:
            if not call.future.done():
                call.future.set_exception(error)

    # --- publishing ------------------------------------------------------------------------

    def _head_key(self, topic: str) -> str:
        return f"{self.prefix}:h:{{{topic}}}"

    def _list_key(self, topic: str) -> str:
        return f"{self.prefix}:l:{{{topic}}}"

    def submit(self, topic: str, ts: float, data: object) -> asyncio.Future[Envelope]:
        if self._backlog >= self.backlog_max:
            self.failures += 1
            raise Unavailable("the Redis backplane is saturated: too many messages waiting")
        try:
            body = msgpack.packb([ts, data], use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise UsageError(f"message data cannot be encoded: {exc}") from None
        call = self._call(
            [
                (
                    "EVALSHA",
                    self._publish_sha,
                    2,
                    self._head_key(topic),
                    self._list_key(topic),
                    self._channel_prefix + topic,
                    body,
                    _new_epoch(),
                    self.history_window,
                    self.history_ttl,
                )
            ]
        )
        self._backlog += 1
        result: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()

        def done(f: asyncio.Future[list[Any]]) -> None:
            self._backlog -= 1
            if result.done():
                return
            if f.cancelled():
                self.failures += 1
                result.set_exception(Unavailable("publish cancelled"))
                return
            exc = f.exception()
            if exc is not None:
                self.failures += 1
                result.set_exception(exc)
                return
            (reply,) = f.result()
            if isinstance(reply, Exception):
                self.failures += 1
                log.warning("Redis refused a publish on %s: %s", topic, reply)
                result.set_exception(Unavailable(f"Redis refused the publish: {reply}"))
                return
            offset, epoch = reply
            result.set_result(Envelope(topic, int(offset), epoch.decode(), ts, data))

        call.add_done_callback(done)
        return result

    # --- history ---------------------------------------------------------------------------

    async def recent(self, topic: str, after: int | None) -> TopicHistory:
        if not self._pubsub_ready.is_set():
            raise Unavailable("the Redis subscription link is down")
        token = secrets.token_hex(8).encode()
        barrier: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[token] = barrier
        try:
            (reply,) = await asyncio.wait_for(
                self._call(
                    [
                        (
                            "EVALSHA",
                            self._recent_sha,
                            2,
                            self._head_key(topic),
                            self._list_key(topic),
                            -1 if after is None else after,
                            self._node_channel,
                            token,
                            _new_epoch(),
                            self.history_ttl,
                        )
                    ]
                ),
                self.timeout,
            )
            if isinstance(reply, Exception):
                raise Unavailable(f"Redis refused the history read: {reply}")
            await asyncio.wait_for(barrier, self.timeout)
        except TimeoutError:
            raise Unavailable(f"no answer from Redis within {self.timeout:g} s") from None
        finally:
            self._barriers.pop(token, None)
            if not barrier.done():
                barrier.cancel()
            elif not barrier.cancelled():
                barrier.exception()  # retrieved: the caller got its own error already
        epoch_b, head, fresh, raw_entries = reply
        epoch = epoch_b.decode()
        entries = []
        for raw in raw_entries:
            env = self._decode(topic, raw)
            if env is not None and after is not None and env.offset > after:
                entries.append(env)
        return TopicHistory(epoch, int(head), tuple(entries), bool(fresh))

    # --- subscriptions ---------------------------------------------------------------------

    def _keys(self, pattern: str) -> list[tuple[bytes, bytes]]:
        """The Redis subscriptions that cover ``pattern``: (kind, channel or glob)."""
        if is_exact(pattern):
            return [(b"s", (self._channel_prefix + pattern).encode())]
        base = _glob_escape(self._channel_prefix)
        segments = pattern.split("/")
        if segments[-1] == STARSTAR:
            # ``a/**`` matches ``a`` and everything below: the glob ``a*`` covers both.
            head = "/".join(STAR if s == STAR else _glob_escape(s) for s in segments[:-1])
            return [(b"p", (base + head + "*").encode())]
        glob = "/".join(STAR if s == STAR else _glob_escape(s) for s in segments)
        return [(b"p", (base + glob).encode())]

    def hold(self, pattern: str) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[None]] = []
        for kind, name in self._keys(pattern):
            sub = self._subs.get(name)
            if sub is None:
                sub = self._subs[name] = _Sub(kind)
            sub.refs += 1
            if not sub.active:
                waiter: asyncio.Future[None] = loop.create_future()
                sub.waiters.append(waiter)
                waits.append(waiter)
        self._schedule_flush()
        if not waits:
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        if len(waits) == 1:
            return waits[0]
        return asyncio.ensure_future(_all(waits))

    def release(self, pattern: str) -> None:
        for _kind, name in self._keys(pattern):
            sub = self._subs.get(name)
            if sub is not None and sub.refs > 0:
                sub.refs -= 1
        self._schedule_flush()

    def observe(self, topic: str, callback: Deliver) -> Callable[[], None]:
        self._observers.setdefault(topic, []).append(callback)

        def stop() -> None:
            callbacks = self._observers.get(topic)
            if callbacks is not None and callback in callbacks:
                callbacks.remove(callback)
                if not callbacks:
                    del self._observers[topic]

        return stop

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_subs)

    def _flush_subs(self) -> None:
        """Send the (un)subscribe commands that bring Redis in line with the reference counts."""
        self._flush_scheduled = False
        conn = self._pubsub
        commands: dict[bytes, list[bytes]] = {}
        for name, sub in list(self._subs.items()):
            want = sub.refs > 0
            if want != sub.sent and conn is not None:
                sub.sent = want
                sub.inflight.append(want)
                commands.setdefault(_VERBS[sub.kind, want], []).append(name)
            if not want and not sub.sent and not sub.inflight:
                self._forget(name)
        if commands and conn is not None:
            task = asyncio.ensure_future(self._send_subs(conn, commands))
            task.add_done_callback(_log_failure)

    async def _send_subs(
        self, conn: AbstractConnection, commands: dict[bytes, list[bytes]]
    ) -> None:
        packed: list[bytes] = []
        for verb, names in commands.items():
            packed.extend(conn.pack_command(verb, *names))
        try:
            await conn.send_packed_command(packed, check_health=False)
        except _RETRYABLE as exc:
            # The reader notices the broken connection and subscribes everything again.
            log.warning("Redis subscription link: %s", exc)

    def _confirmed(self, name: bytes) -> None:
        sub = self._subs.get(name)
        if sub is None or not sub.inflight:
            return
        sub.inflight.popleft()
        if sub.active:
            waiters, sub.waiters = sub.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if sub.refs == 0 and not sub.sent and not sub.inflight:
            self._forget(name)

    def _forget(self, name: bytes) -> None:
        sub = self._subs.pop(name)
        for waiter in sub.waiters:  # holders that released before the subscription was made
            waiter.cancel()

    # --- the subscription link -------------------------------------------------------------

    async def _pubsub_loop(self) -> None:
        delay = 0.05
        pinger: asyncio.Task[None] | None = None
        while True:
            conn = self._pubsub_pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                await conn.connect()
                await conn.send_command("SUBSCRIBE", self._node_channel, check_health=False)
                reply = await conn.read_response(timeout=self.timeout)
                if not reply or reply[0] != b"subscribe":
                    raise ConnectionError(f"unexpected reply to SUBSCRIBE: {reply!r}")
                self._pubsub = conn
                self._last_read = time.monotonic()
                for sub in self._subs.values():
                    sub.sent = False
                    sub.inflight.clear()
                self._pubsub_ready.set()
                self._flush_subs()
                if delay > 0.05:
                    log.warning("Redis subscription link re-established")
                delay = 0.05
                pinger = asyncio.create_task(self._ping_loop(conn))
                while True:
                    message = await conn.read_response()
                    self._last_read = time.monotonic()
                    self._on_pubsub(message)
            except asyncio.CancelledError:
                raise
            except _RETRYABLE as exc:
                if not self._closed:
                    log.warning("Redis subscription link: %s; reconnecting in %.2f s", exc, delay)
            finally:
                self._pubsub_ready.clear()
                self._pubsub = None
                if pinger is not None:
                    pinger.cancel()
                    pinger = None
                for future in self._barriers.values():
                    if not future.done():
                        future.set_exception(Unavailable("the Redis subscription link broke"))
                with contextlib.suppress(Exception):
                    await conn.disconnect()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _ping_loop(self, conn: AbstractConnection) -> None:
        """A silent peer (a dead host, a dropped route) is noticed and the link re-opened."""
        while True:
            await asyncio.sleep(self.ping_interval)
            if time.monotonic() - self._last_read > 2.5 * self.ping_interval:
                log.warning("Redis subscription link silent; reconnecting")
                with contextlib.suppress(Exception):
                    await conn.disconnect()
                return
            with contextlib.suppress(*_RETRYABLE):
                await conn.send_command("PING", check_health=False)

    def _on_pubsub(self, message: Any) -> None:
        kind = message[0]
        if kind == b"message":
            channel, data = message[1], message[2]
        elif kind == b"pmessage":
            channel, data = message[2], message[3]
        elif kind in (b"subscribe", b"psubscribe", b"unsubscribe", b"punsubscribe"):
            self._confirmed(message[1])
            return
        else:  # pong
            return
        if channel == self._node_channel:
            barrier = self._barriers.get(data)
            if barrier is not None and not barrier.done():
                barrier.set_result(None)
            return
        if not channel.startswith(self._channel_prefix_b):
            return
        topic = channel[len(self._channel_prefix_b) :].decode()
        env = self._decode(topic, data)
        if env is None:
            return
        last = self._last.get(topic)
        if last is not None and last[0] == env.epoch:
            if env.offset <= last[1]:
                self.duplicates += 1
                return
            if env.offset > last[1] + 1:
                self.gaps += 1
        if len(self._last) >= 65_536:
            # Copies of one message arrive back to back, so forgetting older topics is safe.
            self._last.clear()
        self._last[topic] = (env.epoch, env.offset)
        observers = self._observers.get(topic)
        if observers:
            for callback in list(observers):
                callback(env)
        if self._deliver is not None:
            try:
                self._deliver(env)
            except Exception:
                log.exception("delivering %s offset %d failed", topic, env.offset)

    @staticmethod
    def _decode(topic: str, raw: bytes) -> Envelope | None:
        try:
            offset_b, epoch_b, body = raw.split(b"|", 2)
            ts, data = msgpack.unpackb(body, raw=False)
            return Envelope(topic, int(offset_b), epoch_b.decode(), float(ts), data)
        except Exception:
            log.warning("ignored a malformed message on %r", topic)
            return None


async def _all(waits: list[asyncio.Future[None]]) -> None:
    for waiter in waits:
        await waiter


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: whoever awaits it still gets it, and a future nobody
    awaits any more (its caller timed out) does not log a warning when collected."""
    if not future.cancelled():
        future.exception()


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("Redis subscription change failed: %s", task.exception())
