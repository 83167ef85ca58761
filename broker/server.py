"""The process entry point: one uvicorn server (uvloop) on one port for everything."""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from .app import create_app
from .config import Settings
from .core import Broker


def uvicorn_config(broker: Broker, **kwargs: object) -> uvicorn.Config:
    settings = broker.settings
    try:
        import uvloop  # noqa: F401 - optional speed-up

        loop = "uvloop"
    except ImportError:  # pragma: no cover - uvloop is a dependency outside Windows
        loop = "asyncio"
    return uvicorn.Config(
        create_app(broker),
        host=settings.host,
        port=settings.port,
        ws=broker.connection_class,
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.ping_interval,
        ws_ping_timeout=settings.ping_timeout,
        loop=loop,
        lifespan="on",
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.shutdown_timeout),
        server_header=False,
        **kwargs,  # type: ignore[arg-type]
    )


def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM: stop accepting, close connections with 1001, flush the store."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # The websockets library says "connection open" at INFO for every client: with
        # thousands of clients that is the whole log. Debug level keeps it.
        logging.getLogger("websockets").setLevel(logging.WARNING)
    broker = Broker(settings)
    server = uvicorn.Server(uvicorn_config(broker))
    server.run()


async def serve_on_socket(broker: Broker, sock: socket.socket) -> uvicorn.Server:
    """Start serving on an already bound socket in the running loop (used by tests)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # asyncio turns Nagle's algorithm off only for sockets it created as IPPROTO_TCP; a
        # plain socket.socket() has proto 0, and uvicorn's response head and body, written
        # separately, then waited for the peer's delayed ACK: 40 ms per HTTP request. Accepted
        # connections inherit the option from the listening socket.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server = uvicorn.Server(uvicorn_config(broker))
    server.config.setup_event_loop = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server stopped during start-up")
        await asyncio.sleep(0.01)
    server._task = task  # type: ignore[attr-defined]
    return server
