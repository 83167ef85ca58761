"""Baseline: the websockets library's own asyncio server fanning out with ``broadcast()``.

Every connection is a subscriber of the default topic and is greeted with a ``ready`` text frame
once registered. A first frame ``subscribe <topic>`` moves it to that topic (answered with
``subscribed``). A connection whose first frame is ``I am the publisher`` stops being a
subscriber, is answered with ``publisher``, and each text frame it sends afterwards, ``@<topic>
<message>``, is broadcast as ``<message>`` to the subscribers of that topic and answered with one
``ok`` frame (a frame without the ``@<topic> `` prefix goes to the default topic). No
authentication, no limits: this is the floor a Python broker should clear.

Run: ``python -m bench.baselines.websockets_broadcast --port P`` (stops on SIGTERM or SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from bench.baselines.wire import PUBLISHER_HELLO, SUBSCRIBE_PREFIX, TOPIC
from bench.common import HOST, raise_nofile_limit

DEFAULT_TOPIC = TOPIC.encode()


def split_publish(data: bytes) -> tuple[bytes, bytes]:
    """``@<topic> <message>`` to (topic, message); other frames go to the default topic."""
    if data[:1] == b"@":
        space = data.find(b" ")
        if space > 0:
            return data[1:space], data[space + 1 :]
    return DEFAULT_TOPIC, data


class Hub:
    """Subscriber connections by topic; the publisher's handler broadcasts to one topic."""

    def __init__(self) -> None:
        self.topics: dict[bytes, set[ServerConnection]] = {}

    def _join(self, topic: bytes, ws: ServerConnection) -> None:
        self.topics.setdefault(topic, set()).add(ws)

    def _leave(self, topic: bytes, ws: ServerConnection) -> None:
        members = self.topics.get(topic)
        if members is not None:
            members.discard(ws)
            if not members:
                del self.topics[topic]

    async def handler(self, ws: ServerConnection) -> None:
        """Serve one connection until it closes; never raises ConnectionClosed."""
        topic = DEFAULT_TOPIC
        self._join(topic, ws)
        try:
            await ws.send("ready")
            first = await ws.recv(decode=False)
            if first.startswith(SUBSCRIBE_PREFIX):
                self._leave(topic, ws)
                topic = bytes(first[len(SUBSCRIBE_PREFIX) :])
                self._join(topic, ws)
                await ws.send("subscribed")
            if first != PUBLISHER_HELLO:
                # A subscriber has nothing more to say; wait for it to go away.
                async for _ in ws:
                    pass
                return
            self._leave(topic, ws)
            await ws.send("publisher")
            topics = self.topics
            while True:
                name, message = split_publish(await ws.recv(decode=False))
                members = topics.get(name)
                if members:
                    broadcast(members, message, text=True)
                await ws.send("ok")
        except ConnectionClosed:
            pass
        finally:
            self._leave(topic, ws)


async def run(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    hub = Hub()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with serve(hub.handler, host, port, compression=None, backlog=1024):
        print(f"websockets-broadcast listening on ws://{host}:{port}/", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    raise_nofile_limit()
    uvloop.run(run(args.host, args.port))


if __name__ == "__main__":
    main()
