"""The ASGI application: Starlette routes around one :class:`Broker`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException

from webui.routes import ROUTES as WEBUI_ROUTES

from .core import Broker
from .cpantesters.routes import ROUTES as V3_ROUTES
from .http_api import ROUTES, http_exception, server_error
from .mercury import ROUTES as MERCURY_ROUTES


def create_app(broker: Broker) -> Starlette:
    """The HTTP side of the broker; the broker starts and stops with the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await broker.start()
        try:
            yield
        finally:
            await broker.stop()

    app = Starlette(
        routes=[*ROUTES, *V3_ROUTES, *MERCURY_ROUTES, *WEBUI_ROUTES],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_exception, Exception: server_error},
    )
    app.state.broker = broker
    return app
