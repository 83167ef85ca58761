"""Recovery after a reconnect, over real sockets: exactly the missed messages, in order, before
the live stream, while publishing goes on; also across a broker restart for persisted topics."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from auth.tokens import Secret
from broker.config import Settings
from broker.core import Broker
from broker.history_writer import CLEAN_KEY
from broker.server import serve_on_socket
from broker.store.base import Store, StoredMessage
from broker.store.sqlite import SQLiteStore
from protocol.errors import Unavailable
from quicksilver.client import Client

from .helpers import (
    SECRET,
    UNIT,
    Raw,
    RunningServer,
    http,
    raw_client,
    running_server,
    token,
    until,
    until_async,
)

PUBLISHER = token(sub="pub", roles=("publisher",))
READER = token(sub="reader", roles=("subscriber",))


class Publisher:
    """Publishes ``{"n": k}`` on one topic, one request at a time, until stopped; remembers
    which data went out under which offset."""

    def __init__(self, url: str, topic: str, first_n: int = 0) -> None:
        self.url = url
        self.topic = topic
        self.n = first_n
        self.sent: dict[int, int] = {}
        self.last = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Publisher:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async with raw_client(self.url, PUBLISHER) as pub:
            while not self._stop.is_set():
                reply = await pub.request(
                    {"type": "publish", "topic": self.topic, "data": {"n": self.n}}
                )
                assert reply["type"] == "ok", reply
                self.sent[reply["offset"]] = self.n
                self.last = reply["offset"]
                self.n += 1

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 10 * UNIT)

    async def reach(self, offset: int, units: float = 30.0) -> None:
        def reached() -> bool:
            assert self._task is not None
            if self._task.done():
                self._task.result()
            return self.last >= offset

        await until(reached, units=units)


async def messages_until(client: Raw, done: Callable[[list[dict[str, Any]]], bool]) -> list[Any]:
    got: list[dict[str, Any]] = []
    while not done(got):
        got.append(await client.expect("message", units=10))
    return got


def _has(count: int, got: list[dict[str, Any]]) -> bool:
    return len(got) >= count


async def nothing_more(client: Raw) -> None:
    """Everything sent to ``client`` before now has been read: a ping's pong comes next."""
    await client.send({"type": "ping", "id": "end"})
    frame = await client.recv()
    assert frame == {"type": "pong", "id": "end"}, frame


async def see_some_then_leave(url: str, topic: str, count: int = 20) -> tuple[str, int]:
    """Subscribe, read ``count`` messages, disconnect; returns (epoch, last offset seen)."""
    async with raw_client(url, READER) as sub:
        ok = await sub.request({"type": "subscribe", "topic": topic})
        assert ok["type"] == "ok" and isinstance(ok["epoch"], str), ok
        seen = await messages_until(sub, lambda got: len(got) >= count)
    offsets = [m["offset"] for m in seen]
    assert offsets == list(range(offsets[0], offsets[0] + count))
    return ok["epoch"], offsets[-1]


async def resume_and_check(
    url: str,
    topic: str,
    epoch: str,
    last: int,
    publishers: list[Publisher],
    sent: dict[int, int],
) -> dict[str, Any]:
    """Reconnect with ``since``; expect every message after ``last`` in order, then at least 200
    live ones while ``publishers[-1]`` keeps publishing, then stop it; check the whole stream."""
    pub = publishers[-1]
    async with raw_client(url, READER) as sub:
        ok = await sub.request(
            {"type": "subscribe", "topic": topic, "since": {"offset": last, "epoch": epoch}}
        )
        assert ok["type"] == "ok" and ok["recovered"] is True, ok
        assert ok["epoch"] == epoch
        live_from = ok["offset"] + 200
        got = await messages_until(sub, lambda got: bool(got) and got[-1]["offset"] >= live_from)
        await pub.stop()
        got += await messages_until(sub, lambda got2: (got + got2)[-1]["offset"] >= pub.last)
        await nothing_more(sub)
    for p in publishers:
        sent.update(p.sent)
    offsets = [m["offset"] for m in got]
    assert offsets == list(range(last + 1, pub.last + 1))
    assert all(m["epoch"] == epoch and m["topic"] == topic for m in got)
    assert [m["data"]["n"] for m in got] == [sent[o] for o in offsets]
    assert pub.last > ok["offset"] + 200  # publishing went on after the replay was requested
    return ok


async def scenario_500(server: RunningServer, topic: str) -> None:
    pub = Publisher(server.ws_url, topic).start()
    epoch, last = await see_some_then_leave(server.ws_url, topic)
    await pub.reach(last + 500)
    await resume_and_check(server.ws_url, topic, epoch, last, [pub], {})


async def test_500_missed_messages_of_a_memory_topic_then_the_live_stream(tmp_path: Path) -> None:
    async with running_server(tmp_path / "d", history_size=2000) as server:
        await scenario_500(server, "chat/room")


async def test_500_missed_messages_of_a_persisted_topic_come_from_the_store(
    tmp_path: Path,
) -> None:
    # The default rule persists reports/**; the memory window (100) is far shorter than 500.
    async with running_server(tmp_path / "d") as server:
        await scenario_500(server, "reports/dist/Foo")
        assert server.broker.hub.log.state("reports/dist/Foo").window == 100


async def test_500_missed_messages_after_a_broker_restart(tmp_path: Path) -> None:
    topic = "reports/dist/Bar"
    async with running_server(tmp_path / "d") as first:
        pub1 = Publisher(first.ws_url, topic).start()
        epoch, last = await see_some_then_leave(first.ws_url, topic)
        await pub1.reach(last + 500)
        await pub1.stop()
        memory_epoch = (await _subscribe(first, "chat/x"))["epoch"]
    async with running_server(tmp_path / "d") as second:
        ok = await _subscribe(second, topic)
        assert (ok["epoch"], ok["offset"]) == (epoch, pub1.last)
        assert (await _subscribe(second, "chat/x"))["epoch"] != memory_epoch
        pub2 = Publisher(second.ws_url, topic, first_n=pub1.n).start()
        await pub2.reach(pub1.last + 50)
        assert min(pub2.sent) == pub1.last + 1
        await resume_and_check(second.ws_url, topic, epoch, last, [pub1, pub2], {})


async def _subscribe(server: RunningServer, topic: str, **extra: Any) -> dict[str, Any]:
    async with raw_client(server.ws_url, READER) as c:
        return await c.request({"type": "subscribe", "topic": topic, **extra})


async def _publish(server: RunningServer, topic: str, count: int) -> None:
    async with raw_client(server.ws_url, PUBLISHER) as pub:
        for n in range(count):
            await pub.request({"type": "publish", "topic": topic, "data": {"n": n}})


async def test_since_older_than_the_history_is_not_recovered(tmp_path: Path) -> None:
    async with running_server(
        tmp_path / "d", history_size=20, history_rules=("reports/**=50",)
    ) as server:
        for topic, count, kept in (("reports/old", 120, 50), ("chat/old", 50, 20)):
            await _publish(server, topic, count)
            epoch = (await _subscribe(server, topic))["epoch"]
            async with raw_client(server.ws_url, READER) as sub:
                ok = await sub.request(
                    {"type": "subscribe", "topic": topic, "since": {"offset": 5, "epoch": epoch}}
                )
                assert (ok["recovered"], ok["epoch"], ok["offset"]) == (False, epoch, count)
                got = await messages_until(sub, functools.partial(_has, kept))
                assert [m["offset"] for m in got] == list(range(count - kept + 1, count + 1))
                await nothing_more(sub)


async def test_an_epoch_mismatch_is_not_recovered_and_replays_nothing(
    server: RunningServer,
) -> None:
    await _publish(server, "chat/e", 5)
    async with raw_client(server.ws_url, READER) as sub, raw_client(server.ws_url) as pub:
        ok = await sub.request(
            {"type": "subscribe", "topic": "chat/e", "since": {"offset": 2, "epoch": "0123abcd"}}
        )
        assert ok["recovered"] is False and ok["offset"] == 5 and ok["epoch"] != "0123abcd"
        await pub.request({"type": "publish", "topic": "chat/e", "data": "live"})
        message = await sub.expect("message")
        assert (message["offset"], message["data"]) == (6, "live")


async def test_the_ok_of_an_exact_subscribe_always_carries_epoch_and_offset(
    server: RunningServer,
) -> None:
    ok = await _subscribe(server, "never/seen")
    assert ok["offset"] == 0 and isinstance(ok["epoch"], str) and "recovered" not in ok
    await _publish(server, "never/seen", 3)
    async with raw_client(server.ws_url, READER) as sub:
        again = await sub.request(
            {
                "type": "subscribe",
                "topic": "never/seen",
                "since": {"offset": 0, "epoch": ok["epoch"]},
            }
        )
        assert again["recovered"] is True and again["epoch"] == ok["epoch"]
        got = await messages_until(sub, lambda got: len(got) == 3)
        assert [m["offset"] for m in got] == [1, 2, 3]
        # An empty epoch means "whatever the current one is".
        ok3 = await sub.request(
            {"type": "subscribe", "topic": "never/seen", "since": {"offset": 1, "epoch": ""}}
        )
        assert ok3["recovered"] is True
        assert [m["offset"] for m in await messages_until(sub, lambda g: len(g) == 2)] == [2, 3]
    wildcard = await _subscribe(server, "never/*")
    assert set(wildcard) == {"type", "id"}


async def test_a_persisted_topic_without_messages_keeps_its_epoch_over_a_clean_restart(
    tmp_path: Path,
) -> None:
    async with running_server(tmp_path / "d") as first:
        ok = await _subscribe(first, "reports/quiet")
    async with running_server(tmp_path / "d") as second:
        again = await _subscribe(second, "reports/quiet", since={"offset": 0, "epoch": ok["epoch"]})
        assert (again["recovered"], again["epoch"], again["offset"]) == (True, ok["epoch"], 0)


async def test_after_an_unclean_stop_persisted_topics_start_a_new_epoch(tmp_path: Path) -> None:
    async with running_server(tmp_path / "d") as first:
        await _publish(first, "reports/crash", 10)
        epoch = (await _subscribe(first, "reports/crash"))["epoch"]
    # As if the process had been killed: the clean-stop mark is missing.
    async with SQLiteStore(tmp_path / "d" / "quicksilver.db") as store:
        await store.set_meta(CLEAN_KEY, "0")
    async with running_server(tmp_path / "d") as second:
        ok = await _subscribe(second, "reports/crash", since={"offset": 4, "epoch": epoch})
        assert ok["recovered"] is False and ok["epoch"] != epoch and ok["offset"] == 0
        await _publish(second, "reports/crash", 2)
    async with running_server(tmp_path / "d") as third:
        ok2 = await _subscribe(third, "reports/crash", since={"offset": 1, "epoch": ok["epoch"]})
        assert (ok2["recovered"], ok2["epoch"], ok2["offset"]) == (True, ok["epoch"], 2)


# --- a store whose reads wait: publishing runs far ahead while the replay is read ----------------


class HeldReads(SQLiteStore):
    """A real SQLite store whose history reads first wait for ``before_read``."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.before_read: Callable[[], Awaitable[None]] | None = None
        self.reads = 0

    async def read_messages(self, topic: str, after_offset: int, limit: int) -> list[StoredMessage]:
        self.reads += 1
        if self.before_read is not None:
            await self.before_read()
        return await super().read_messages(topic, after_offset, limit)


@asynccontextmanager
async def serve(
    data_dir: Path, *, port: int = 0, store: Store | None = None, **overrides: Any
) -> AsyncIterator[RunningServer]:
    """A real broker on 127.0.0.1:``port`` (0: any free port), optionally with ``store``."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    settings = Settings(
        host="127.0.0.1",
        port=port,
        data_dir=data_dir,
        secret=Secret(SECRET),
        log_level="warning",
        **overrides,
    )
    broker = Broker(settings, store=store)
    server = await serve_on_socket(broker, sock)
    running = RunningServer(broker=broker, port=port, data_dir=data_dir, server=server)
    try:
        yield running
    finally:
        if not server.should_exit:
            await running.stop()
        sock.close()


async def test_replay_stays_exact_when_many_messages_arrive_during_store_reads(
    tmp_path: Path,
) -> None:
    topic = "reports/busy"
    (tmp_path / "d").mkdir()
    store = HeldReads(tmp_path / "d" / "quicksilver.db")
    # Publishing runs far ahead here: keep enough that nothing leaves the rule meanwhile.
    rules = ("reports/**=1000000",)
    async with serve(tmp_path / "d", store=store, history_size=50, history_rules=rules) as server:
        pub = Publisher(server.ws_url, topic).start()
        epoch, last = await see_some_then_leave(server.ws_url, topic)
        await pub.reach(last + 300)
        state = server.broker.hub.log.state(topic)
        await until(lambda: state.committed >= last + 300)  # out of memory, in the store

        async def publishing_runs_ahead() -> None:
            # Three memory windows further, and stored, while each read is held: unless the
            # window stays pinned, every read would leave a new gap to read.
            target = pub.last + 150
            await pub.reach(target)
            await until(lambda: state.committed >= target)

        store.before_read = publishing_runs_ahead
        await resume_and_check(server.ws_url, topic, epoch, last, [pub], {})
        assert store.reads == 1
        assert not state.pins


async def test_unsubscribe_during_a_store_read_ends_the_recovery(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    store = HeldReads(tmp_path / "d" / "quicksilver.db")
    release = asyncio.Event()

    async def held() -> None:
        await release.wait()

    async with serve(tmp_path / "d", store=store, history_size=5) as server:
        await _publish(server, "reports/u", 30)
        epoch = (await _subscribe(server, "reports/u"))["epoch"]
        store.before_read = held
        async with raw_client(server.ws_url, READER) as sub:
            since = {"offset": 1, "epoch": epoch}
            await sub.send({"type": "subscribe", "id": "s", "topic": "reports/u", "since": since})
            await until(lambda: store.reads == 1)
            busy = await sub.request({"type": "subscribe", "topic": "reports/u", "since": since})
            assert busy["code"] == "conflict"
            assert (await sub.request({"type": "unsubscribe", "topic": "reports/u"}))[
                "type"
            ] == "ok"
            release.set()
            ok = await sub.recv()
            assert ok["id"] == "s" and ok["type"] == "ok" and ok["recovered"] is True
            await _publish(server, "reports/u", 1)
            await nothing_more(sub)
        assert len(server.broker.hub.index) == 0


async def test_http_history(tmp_path: Path) -> None:
    async with running_server(tmp_path / "d", history_size=10) as server:
        await _publish(server, "reports/h", 30)
        epoch = (await _subscribe(server, "reports/h"))["epoch"]
        async with http(server, READER) as client:
            url = "/api/v1/topics/reports/h/history"
            body = (await client.get(url, params={"since": 25})).json()
            assert [m["offset"] for m in body["messages"]] == [26, 27, 28, 29, 30]
            assert (body["epoch"], body["offset"], body["recovered"]) == (epoch, 30, True)
            assert body["messages"][0]["data"] == {"n": 25} and "next" not in body
            page = (await client.get(url, params={"since": 0, "limit": 12})).json()
            assert [m["offset"] for m in page["messages"]] == list(range(1, 13))
            assert page["next"] == 12
            latest = (await client.get(url, params={"limit": 4})).json()
            assert [m["offset"] for m in latest["messages"]] == [27, 28, 29, 30]
            other = (await client.get(url, params={"since": 3, "epoch": "x"})).json()
            assert (other["recovered"], other["messages"]) == (False, [])
            assert (await client.get(url, params={"since": -1})).status_code == 400
            assert (await client.get(url, params={"limit": 0})).status_code == 400
            bad = await client.get("/api/v1/topics/a//b/history")
            assert bad.status_code == 400 and bad.json()["errors"][0]["message"]
        outsider = token(sub="o", roles=(), subscribe=["chat/*"])
        async with http(server, outsider) as client:
            assert (await client.get("/api/v1/topics/jobs/x/history")).status_code == 403
            assert (await client.get("/api/v1/topics/chat/a/history")).status_code == 200
        async with http(server) as anonymous:
            response = await anonymous.get("/api/v1/topics/reports/h/history?since=29")
            assert [m["offset"] for m in response.json()["messages"]] == [30]


async def test_python_client_resumes_without_loss_after_server_restarts(tmp_path: Path) -> None:
    topic = "reports/client"
    data = tmp_path / "d"
    async with serve(data) as first:
        port = first.port
        client = Client(
            first.ws_url, token=READER, backoff_initial=0.05, backoff_max=0.2, open_timeout=2
        )
        await client.connect()
        try:
            sub = await client.subscribe(topic)
            await _publish(first, topic, 10)
            got = [await asyncio.wait_for(sub.__anext__(), 5 * UNIT) for _ in range(10)]
        except BaseException:
            await client.close()
            raise
    try:
        # Published while the client cannot reach the broker (another port, same data).
        async with serve(data) as elsewhere:
            await _publish(elsewhere, topic, 290)
        async with serve(data, port=port) as again:
            await client.wait_connected(timeout=20 * UNIT)
            await _publish(again, topic, 20)
            while len(got) < 320:
                got.append(await asyncio.wait_for(sub.__anext__(), 5 * UNIT))
            assert [m.offset for m in got] == list(range(1, 321))
            assert [m.data["n"] for m in got] == [*range(10), *range(290), *range(20)]
            assert len({m.epoch for m in got}) == 1
            assert sub.recovered is True and client.reconnects >= 1
            assert sub.buffered == 0
    finally:
        await client.close()


class HeldAppends(SQLiteStore):
    """A real SQLite store whose history appends wait for ``release`` and first fail
    ``failures`` times with ``unavailable``."""

    def __init__(self, path: Path, failures: int = 0) -> None:
        super().__init__(path)
        self.release = asyncio.Event()
        self.release.set()
        self.failures = failures
        self.attempts = 0

    async def append_messages(self, msgs: Sequence[StoredMessage]) -> None:
        self.attempts += 1
        await self.release.wait()
        if self.failures:
            self.failures -= 1
            raise Unavailable("disk on holiday")
        await super().append_messages(msgs)


async def stored_offsets(store: Store, topic: str) -> list[int]:
    return [m.offset for m in await store.read_messages(topic, 0, 10_000)]


async def test_messages_on_their_way_to_the_store_are_recovered_from_memory(
    tmp_path: Path,
) -> None:
    (tmp_path / "d").mkdir()
    store = HeldAppends(tmp_path / "d" / "quicksilver.db", failures=2)
    store.release.clear()
    async with serve(tmp_path / "d", store=store, history_size=10) as server:
        epoch = (await _subscribe(server, "reports/slow"))["epoch"]
        await _publish(server, "reports/slow", 300)
        assert await stored_offsets(store, "reports/slow") == []
        async with raw_client(server.ws_url, READER) as sub:
            ok = await sub.request(
                {
                    "type": "subscribe",
                    "topic": "reports/slow",
                    "since": {"offset": 0, "epoch": epoch},
                }
            )
            assert ok["recovered"] is True and ok["offset"] == 300
            got = await messages_until(sub, functools.partial(_has, 300))
            assert [m["offset"] for m in got] == list(range(1, 301))
        store.release.set()  # two failed writes, retried, then stored
        await until_async(
            lambda: _equals(stored_offsets(store, "reports/slow"), list(range(1, 301)))
        )
        assert store.attempts >= 3
        assert server.broker.hub.log.state("reports/slow").committed == 300


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def test_stored_history_is_trimmed_to_the_rule(tmp_path: Path) -> None:
    async with running_server(
        tmp_path / "d",
        history_rules=("reports/count/**=5", "reports/age/**=100:0.5"),
        history_trim_interval=0.05,
    ) as server:
        store = server.broker.store
        await _publish(server, "reports/count/x", 20)
        await until_async(
            lambda: _equals(stored_offsets(store, "reports/count/x"), [16, 17, 18, 19, 20])
        )
        await _publish(server, "reports/age/y", 3)
        epoch = (await _subscribe(server, "reports/age/y"))["epoch"]
        await until_async(lambda: _equals(stored_offsets(store, "reports/age/y"), [1, 2, 3]))
        await until_async(lambda: _equals(stored_offsets(store, "reports/age/y"), []))
        ok = await _subscribe(server, "reports/age/y", since={"offset": 0, "epoch": epoch})
        assert (ok["recovered"], ok["offset"]) == (False, 3)
