"""The Python client against a real broker."""

from __future__ import annotations

import pytest

from protocol.errors import Forbidden, Unauthorized
from quicksilver.client import Client

from .helpers import RunningServer, token, until, wait_for


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_publish_subscribe_ping_enqueue(server: RunningServer, encoding: str) -> None:
    async with Client(server.ws_url, token(), encoding=encoding) as client:  # type: ignore[arg-type]
        assert client.welcome is not None and client.welcome.sub == "tester"
        sub = await client.subscribe("c/*")
        assert await client.publish("c/1", {"a": 1}) == 1
        assert await client.publish("c/2", [1, "two"]) == 1
        first = await wait_for(anext(sub))
        second = await wait_for(anext(sub))
        assert (first.topic, first.data) == ("c/1", {"a": 1})
        assert (second.topic, second.data) == ("c/2", [1, "two"])
        assert await client.ping() >= 0
        job, duplicate = await client.enqueue("q", {"x": 1}, unique_key="k")
        assert (job, True) == await client.enqueue("q", {"x": 2}, unique_key="k")
        assert duplicate is False


async def test_errors_raise_their_class(server: RunningServer) -> None:
    async with Client(server.ws_url, token(roles=("subscriber",))) as client:
        with pytest.raises(Forbidden):
            await client.publish("x", 1)
    with pytest.raises(Unauthorized):
        async with Client(server.ws_url, "not-a-token"):
            pass


async def test_reconnects_and_resumes_without_loss(server: RunningServer) -> None:
    async with (
        Client(server.ws_url, token(), backoff_initial=0.01) as client,
        Client(server.ws_url, token(sub="publisher")) as publisher,
    ):
        sub = await client.subscribe("feed")
        await publisher.publish("feed", 0)
        assert (await wait_for(anext(sub))).data == 0
        session = client.welcome.session if client.welcome else None
        # The broker drops the subscriber's connection; messages keep coming meanwhile.
        for conn in list(server.broker.connections):
            if conn.session == session:
                conn.close(1012, "restarting")
        for n in range(1, 6):
            await publisher.publish("feed", n)
        await until(lambda: client.reconnects == 1)
        got = [(await wait_for(anext(sub))).data for _ in range(5)]
        assert got == [1, 2, 3, 4, 5]
        await publisher.publish("feed", 6)
        assert (await wait_for(anext(sub))).data == 6
