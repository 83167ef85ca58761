"""One function per client frame type: what the broker does with it.

A handler either answers synchronously (``conn.send``) and returns None, or returns an awaitable
that the broker runs as a task; raising a :class:`protocol.errors.ProtocolError` answers an
``error`` frame with that code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from protocol.errors import BadRequest, Forbidden
from protocol.frames import (
    Auth,
    CancelJob,
    Done,
    Enqueue,
    Fail,
    Heartbeat,
    Ping,
    Progress,
    Publish,
    Refresh,
    Stats,
    Subscribe,
    Unsubscribe,
    Work,
)
from protocol.topics import is_exact, parse_pattern, parse_topic

from . import recovery
from .dispatcher import stats_to_api

if TYPE_CHECKING:
    from .connection import Connection
    from .core import Broker

Handler = Callable[["Broker", "Connection", Any], Awaitable[None] | None]


def on_auth(broker: Broker, conn: Connection, frame: Auth) -> None:
    broker.authenticate(conn, frame.token, frame.id)


def on_refresh(broker: Broker, conn: Connection, frame: Refresh) -> None:
    claims, perms = broker.verify(frame.token)
    old = conn.perms
    assert old is not None
    if not old.is_anonymous and claims.sub != old.sub:
        raise Forbidden("a refreshed token must have the same subject as the current one")
    conn.perms = perms
    conn.jti = claims.jti
    conn.set_expiry(claims.exp)
    dropped = [p for p in conn.subscriptions if not perms.can_subscribe(p)]
    for pattern in dropped:  # as an unsubscribe: index, presence (a leave event), recovery
        recovery.unsubscribe(broker, conn, pattern)
    conn.send({"type": "ok", "id": frame.id, "expires_at": claims.exp, "dropped": sorted(dropped)})


def on_ping(broker: Broker, conn: Connection, frame: Ping) -> None:
    conn.send({"type": "pong", "id": frame.id})


def on_subscribe(broker: Broker, conn: Connection, frame: Subscribe) -> Awaitable[None] | None:
    pattern = parse_pattern(frame.topic)
    perms = conn.perms
    assert perms is not None
    if not perms.can_subscribe(pattern):
        raise Forbidden(f"this token may not subscribe to {pattern!r}")
    if frame.since is not None and not is_exact(pattern):
        raise BadRequest("'since' needs an exact topic, not a pattern")
    if broker.cluster is not None:  # several nodes: see broker.cluster
        return broker.cluster.subscribe(conn, pattern, frame.since, frame.id)
    # Replay and live stream meet without a gap or a duplicate: see broker.recovery.
    return recovery.subscribe(broker, conn, pattern, frame.since, frame.id)


def on_unsubscribe(broker: Broker, conn: Connection, frame: Unsubscribe) -> None:
    recovery.unsubscribe(broker, conn, parse_pattern(frame.topic))
    conn.send({"type": "ok", "id": frame.id})


def on_publish(broker: Broker, conn: Connection, frame: Publish) -> Awaitable[None] | None:
    topic = parse_topic(frame.topic)
    perms = conn.perms
    assert perms is not None
    if not perms.can_publish(topic):
        raise Forbidden(f"this token may not publish on {topic!r}")
    if broker.cluster is not None:  # the offset comes from the backplane
        return broker.cluster.publish_reply(conn, frame.id, topic, frame.data)
    offset = broker.publish(topic, frame.data)
    conn.send({"type": "ok", "id": frame.id, "offset": offset})
    return None


def on_enqueue(broker: Broker, conn: Connection, frame: Enqueue) -> Awaitable[None]:
    return broker.jobs.on_enqueue(conn, frame)


def on_work(broker: Broker, conn: Connection, frame: Work) -> None:
    broker.jobs.on_work(conn, frame)


def on_progress(broker: Broker, conn: Connection, frame: Progress) -> None:
    broker.jobs.on_progress(conn, frame)


def on_heartbeat(broker: Broker, conn: Connection, frame: Heartbeat) -> None:
    broker.jobs.on_heartbeat(conn)


def on_done(broker: Broker, conn: Connection, frame: Done) -> Awaitable[None]:
    return broker.jobs.on_done(conn, frame)


def on_fail(broker: Broker, conn: Connection, frame: Fail) -> Awaitable[None]:
    return broker.jobs.on_fail(conn, frame)


def on_cancel(broker: Broker, conn: Connection, frame: CancelJob) -> Awaitable[None]:
    return broker.jobs.on_cancel(conn, frame)


async def on_stats(broker: Broker, conn: Connection, frame: Stats) -> None:
    perms = conn.perms
    assert perms is not None
    stats = await broker.store.queue_stats()
    conn.send(
        {
            "type": "ok",
            "id": frame.id,
            "queues": {
                name: stats_to_api(qs)
                for name, qs in sorted(stats.items())
                if perms.is_admin or perms.can_work(name) or perms.can_enqueue(name)
            },
        }
    )


HANDLERS: dict[type, Handler] = {
    Auth: on_auth,
    Refresh: on_refresh,
    Ping: on_ping,
    Subscribe: on_subscribe,
    Unsubscribe: on_unsubscribe,
    Publish: on_publish,
    Enqueue: on_enqueue,
    Work: on_work,
    Progress: on_progress,
    Heartbeat: on_heartbeat,
    Done: on_done,
    Fail: on_fail,
    CancelJob: on_cancel,
    Stats: on_stats,
}
