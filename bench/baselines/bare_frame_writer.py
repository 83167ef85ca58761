"""Baseline: the Python ceiling for fan-out, an asyncio (uvloop) protocol that writes frames itself.

The opening handshake and the publisher's frames go through websockets' sans-I/O
``ServerProtocol``; deliveries do not. For each published message the unmasked server frame is
built once and handed to every subscriber's ``transport.write`` without awaiting, skipping
transports that are closing. With ``--coalesce``, all messages that arrived in one read are
joined into one buffer and written once per subscriber, the technique the broker is meant to use
when messages queue up.

Same conversation as the ``websockets-broadcast`` baseline: every connection is greeted with
``ready`` and subscribed to the default topic; ``subscribe <topic>`` as first frame moves it to
another (answered with ``subscribed``); ``I am the publisher`` as first frame makes a connection
the publisher, answered with ``publisher``; each published text frame ``@<topic> <message>`` is
sent as ``<message>`` to that topic's subscribers and answered with ``ok``. With ``--coalesce``
the messages of one read are joined per topic, so each subscriber still gets one write. No
limits: a slow subscriber's write buffer grows without bound, acceptable only in a benchmark.

Run: ``python -m bench.baselines.bare_frame_writer --port P [--coalesce]`` (stops on SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

import uvloop
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import SEND_EOF
from websockets.server import ServerProtocol

from bench.baselines.websockets_broadcast import DEFAULT_TOPIC, split_publish
from bench.baselines.wire import PUBLISHER_HELLO, SUBSCRIBE_PREFIX
from bench.common import HOST, raise_nofile_limit


def server_frame(data: bytes, *, binary: bool = False) -> bytes:
    """One final, unmasked server-to-client frame (RFC 6455 section 5.2) carrying ``data``."""
    n = len(data)
    first = 0x82 if binary else 0x81
    if n < 126:
        head = bytes((first, n))
    elif n < 1 << 16:
        head = bytes((first, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 127)) + n.to_bytes(8, "big")
    return head + data


class Hub:
    """Subscriber transports by topic and the fan-out loop. ``coalesce`` joins a batch into one
    write per subscriber."""

    def __init__(self, *, coalesce: bool) -> None:
        self.coalesce = coalesce
        self.topics: dict[bytes, set[asyncio.Transport]] = {}

    def join(self, topic: bytes, transport: asyncio.Transport) -> None:
        self.topics.setdefault(topic, set()).add(transport)

    def leave(self, topic: bytes, transport: asyncio.Transport) -> None:
        members = self.topics.get(topic)
        if members is not None:
            members.discard(transport)
            if not members:
                del self.topics[topic]

    def publish(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Write ``messages`` ((topic, payload), in order) to every open subscriber of each topic,
        without waiting."""
        topics = self.topics
        if not self.coalesce:
            for topic, message in messages:
                members = topics.get(topic)
                if members:
                    _write_all(members, server_frame(message))
            return
        batches: dict[bytes, list[bytes]] = {}
        for topic, message in messages:
            batches.setdefault(topic, []).append(server_frame(message))
        for topic, frames in batches.items():
            members = topics.get(topic)
            if members:
                _write_all(members, frames[0] if len(frames) == 1 else b"".join(frames))


def _write_all(transports: set[asyncio.Transport], data: bytes) -> None:
    for transport in transports:
        if transport.is_closing():
            continue
        try:
            transport.write(data)
        except RuntimeError:
            # uvloop raises instead of ignoring a write to a transport closed under us.
            continue


class Connection(asyncio.Protocol):
    """One TCP connection: the handshake, then a subscriber or the publisher."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.ws = ServerProtocol(max_size=1 << 20)
        self.transport: asyncio.Transport | None = None
        self.is_publisher = False
        self.greeted = False
        self.topic = DEFAULT_TOPIC

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport, though it implements it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        published: list[tuple[bytes, bytes]] = []
        for event in self.ws.events_received():
            if isinstance(event, Request):
                response = self.ws.accept(event)
                self.ws.send_response(response)
                if response.status_code == 101:
                    self._register()
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                if self.is_publisher:
                    published.append(split_publish(bytes(event.data)))
                elif not self.greeted:
                    self.greeted = True
                    data = bytes(event.data)
                    if data == PUBLISHER_HELLO:
                        self.is_publisher = True
                        self.hub.leave(self.topic, self._transport())
                        self.ws.send_text(b"publisher")
                    elif data.startswith(SUBSCRIBE_PREFIX):
                        self.hub.leave(self.topic, self._transport())
                        self.topic = data[len(SUBSCRIBE_PREFIX) :]
                        self.hub.join(self.topic, self._transport())
                        self.ws.send_text(b"subscribed")
        if published:
            self.hub.publish(published)
            for _ in published:
                self.ws.send_text(b"ok")
        self._flush()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.hub.leave(self.topic, self.transport)

    def _transport(self) -> asyncio.Transport:
        assert self.transport is not None
        return self.transport

    def _register(self) -> None:
        self.hub.join(self.topic, self._transport())
        self.ws.send_text(b"ready")

    def _flush(self) -> None:
        transport = self._transport()
        for chunk in self.ws.data_to_send():
            if chunk is SEND_EOF or not chunk:
                self.hub.leave(self.topic, transport)
                transport.close()
                return
            if not transport.is_closing():
                transport.write(chunk)


async def run(host: str, port: int, *, coalesce: bool) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    hub = Hub(coalesce=coalesce)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: Connection(hub), host, port, backlog=1024)
    name = "bare-frame-coalesce" if coalesce else "bare-frame-writer"
    print(f"{name} listening on ws://{host}:{port}/", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        for members in list(hub.topics.values()):
            for transport in list(members):
                transport.abort()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--coalesce",
        action="store_true",
        help="join the messages of one read into one write per subscriber",
    )
    args = parser.parse_args(argv)
    raise_nofile_limit()
    uvloop.run(run(args.host, args.port, coalesce=args.coalesce))


if __name__ == "__main__":
    main()
