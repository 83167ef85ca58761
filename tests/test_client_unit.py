"""Tests of the client library and the command line that need no broker.

Backoff, recovery positions, subscription buffers and routing, error mapping, argument parsing
and the ``token`` command run here; a refused connection uses a real socket that is bound but not
listening. Behaviour against a running broker is tested end to end elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response

import quicksilver
from broker.config import Settings
from protocol.errors import (
    BadRequest,
    Forbidden,
    TooLarge,
    Unauthorized,
    Unavailable,
    UsageError,
)
from protocol.frames import Heartbeat, Message, Ok, Publish, Since
from quicksilver import cli
from quicksilver.client import (
    Backoff,
    Client,
    Subscription,
    _close_error,
    _connect_error,
    _Registry,
    advance,
    with_request_id,
)

UNIT = float(os.environ.get("QUICKSILVER_TEST_UNIT", "1.0"))
SECRET = "unit-test-secret-0123456789abcdef0123456789"


class Highest(random.Random):
    """Always draws the upper bound, so tests see the backoff ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Lowest(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


def msg(topic: str, offset: int, epoch: str = "e1", data: object = None) -> Message:
    return Message(topic=topic, offset=offset, epoch=epoch, ts=1.0, data=data)


async def no_release(sub: Subscription) -> None:
    return None


def drain(sub: Subscription) -> list[Message]:
    out: list[Message] = []
    while sub.buffered:
        out.append(sub._buffer.popleft())
    return out


# --- backoff ------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(0.1, 1.0, rng=Highest())
    delays = [backoff.next_delay() for _ in range(7)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_backoff_full_jitter_reaches_zero_and_stays_in_bounds() -> None:
    assert Backoff(0.5, 4.0, rng=Lowest()).next_delay() == 0.0
    backoff = Backoff(0.5, 4.0, rng=random.Random(7))
    for attempt in range(50):
        ceiling = min(4.0, 0.5 * 2**attempt)
        assert 0.0 <= backoff.next_delay() <= ceiling
    # Full jitter spreads clients out: the draws are not all at the ceiling.
    draws = [Backoff(0.5, 4.0, rng=random.Random(seed)).next_delay() for seed in range(20)]
    assert len(set(draws)) > 1


def test_backoff_reset_starts_over() -> None:
    backoff = Backoff(0.1, 10.0, rng=Highest())
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.1)


def test_backoff_after_many_attempts_does_not_overflow() -> None:
    backoff = Backoff(0.1, 30.0, rng=Highest())
    backoff.attempts = 10_000
    assert backoff.next_delay() == 30.0


@pytest.mark.parametrize(("initial", "maximum"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_backoff_refuses_nonsense(initial: float, maximum: float) -> None:
    with pytest.raises(UsageError):
        Backoff(initial, maximum)


# --- recovery positions -------------------------------------------------------------------------


def test_advance_keeps_the_highest_offset_of_an_epoch() -> None:
    pos = advance(None, msg("t", 3))
    assert pos == Since(3, "e1")
    assert advance(pos, msg("t", 5)) == Since(5, "e1")
    assert advance(Since(5, "e1"), msg("t", 4)) == Since(5, "e1")


def test_advance_follows_a_new_epoch_even_with_a_lower_offset() -> None:
    assert advance(Since(50, "e1"), msg("t", 1, epoch="e2")) == Since(1, "e2")


# --- subscriptions ------------------------------------------------------------------------------


def test_full_buffer_drops_the_oldest_and_counts() -> None:
    sub = Subscription("t/*", no_release, maxsize=3)
    for offset in range(1, 6):
        sub._push(msg("t/a", offset))
    assert sub.dropped == 2
    assert [m.offset for m in drain(sub)] == [3, 4, 5]


def test_subscription_refuses_a_zero_bound() -> None:
    with pytest.raises(UsageError):
        Subscription("t", no_release, maxsize=0)


def test_exact_subscription_skips_what_it_delivered_already() -> None:
    sub = Subscription("t", no_release)
    for offset in (1, 2, 1, 2, 3):
        sub._push(msg("t", offset))
    sub._push(msg("t", 1, epoch="e2"))
    assert [(m.offset, m.epoch) for m in drain(sub)] == [(1, "e1"), (2, "e1"), (3, "e1"), (1, "e2")]


def test_wildcard_subscription_skips_nothing() -> None:
    sub = Subscription("t/**", no_release)
    for offset in (1, 1):
        sub._push(msg("t", offset))
    assert sub.buffered == 2


async def test_iteration_yields_then_ends_on_close() -> None:
    released: list[Subscription] = []

    async def release(sub: Subscription) -> None:
        released.append(sub)

    sub = Subscription("t", release)
    sub._push(msg("t", 1))
    assert (await anext(sub)).offset == 1
    waiting = asyncio.ensure_future(anext(sub))
    await asyncio.sleep(0)
    assert not waiting.done()
    sub._push(msg("t", 2))
    assert (await asyncio.wait_for(waiting, UNIT)).offset == 2

    sub._push(msg("t", 3))
    await sub.close()
    await sub.close()
    assert released == [sub]
    assert sub.closed
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(sub), UNIT)
    sub._push(msg("t", 4))
    assert sub.buffered == 0


async def test_a_waiting_consumer_wakes_when_the_subscription_ends() -> None:
    sub = Subscription("t", no_release)
    waiting = asyncio.ensure_future(anext(sub))
    await asyncio.sleep(0)
    sub._finish(None)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, UNIT)


async def test_an_error_comes_after_the_buffered_messages() -> None:
    sub = Subscription("t", no_release)
    sub._push(msg("t", 1))
    sub._finish(Unauthorized("token expired"))
    assert (await anext(sub)).offset == 1
    for _ in range(2):
        with pytest.raises(Unauthorized, match="token expired"):
            await anext(sub)


# --- routing ------------------------------------------------------------------------------------


def make_sub(registry: _Registry, pattern: str, since: Since | None = None) -> Subscription:
    sub = Subscription(pattern, no_release)
    registry.add(sub, since)
    return sub


def test_one_message_reaches_every_matching_subscription_once() -> None:
    registry = _Registry()
    exact = make_sub(registry, "reports/dist/Foo")
    exact_twice = make_sub(registry, "reports/dist/Foo")
    star = make_sub(registry, "reports/dist/*")
    deep = make_sub(registry, "reports/**")
    other = make_sub(registry, "reports/dist/Bar")
    too_deep = make_sub(registry, "reports/dist/Foo/*")

    assert registry.route(msg("reports/dist/Foo", 1)) == 4
    for sub in (exact, exact_twice, star, deep):
        assert [m.offset for m in drain(sub)] == [1]
    assert other.buffered == 0
    assert too_deep.buffered == 0


def test_positions_are_tracked_for_exact_subscriptions_only() -> None:
    registry = _Registry()
    make_sub(registry, "a/b")
    make_sub(registry, "a/*")
    registry.route(msg("a/b", 4))
    registry.route(msg("a/c", 9))
    registry.route(msg("a/b", 2))
    assert registry.positions == {"a/b": Since(4, "e1")}
    assert registry.since("a/b") == Since(4, "e1")
    assert registry.since("a/*") is None


def test_an_explicit_since_is_the_starting_position() -> None:
    registry = _Registry()
    make_sub(registry, "a/b", Since(7, "ep"))
    assert registry.since("a/b") == Since(7, "ep")


def test_seed_takes_the_answer_position_only_without_one_in_the_same_epoch() -> None:
    registry = _Registry()
    make_sub(registry, "a/b")
    make_sub(registry, "a/*")
    registry.seed("a/b", Ok(id=1, fields={"offset": 3, "epoch": "e1"}))
    assert registry.since("a/b") == Since(3, "e1")
    registry.route(msg("a/b", 5))
    registry.seed("a/b", Ok(id=2, fields={"offset": 4, "epoch": "e1", "recovered": True}))
    assert registry.since("a/b") == Since(5, "e1")
    registry.seed("a/b", Ok(id=3, fields={"offset": 1, "epoch": "e2", "recovered": False}))
    assert registry.since("a/b") == Since(1, "e2")
    registry.seed("a/*", Ok(id=4, fields={"offset": 1, "epoch": "e2"}))
    registry.seed("a/b", Ok(id=5, fields={"offset": True, "epoch": "e3"}))
    assert registry.positions == {"a/b": Since(1, "e2")}


def test_removing_the_last_subscription_of_a_pattern_forgets_it() -> None:
    registry = _Registry()
    first = make_sub(registry, "a/b")
    second = make_sub(registry, "a/b")
    registry.route(msg("a/b", 1))
    assert registry.remove(first) is False
    assert registry.remove(first) is False
    assert registry.since("a/b") == Since(1, "e1")
    assert registry.remove(second) is True
    assert registry.since("a/b") is None
    assert registry.route(msg("a/b", 2)) == 0


def test_exact_topics_are_restored_before_wildcards() -> None:
    registry = _Registry()
    for pattern in ("x/**", "a/b", "y/*", "c"):
        make_sub(registry, pattern)
    assert registry.patterns() == ["a/b", "c", "x/**", "y/*"]


def test_finish_all_ends_every_subscription() -> None:
    registry = _Registry()
    subs = [make_sub(registry, p) for p in ("a", "a/*")]
    registry.finish_all(Unavailable("gone"))
    assert all(sub.closed for sub in subs)
    assert registry.patterns() == []


# --- requests and errors ------------------------------------------------------------------------


def test_request_ids_are_set_on_the_frame() -> None:
    frame = with_request_id(Publish(id=None, topic="a", data=1), 42)
    assert frame == Publish(id=42, topic="a", data=1)
    with pytest.raises(UsageError):
        with_request_id(Heartbeat(), 1)


@pytest.mark.parametrize(
    ("code", "reason", "kind", "text"),
    [
        (4401, "unauthorized", Unauthorized, "refused the token: unauthorized"),
        (1008, "origin", Forbidden, "policy violation: origin"),
        (1009, "", TooLarge, "too large"),
        (1001, "going away", Unavailable, "code 1001: going away"),
    ],
)
def test_close_codes_map_to_errors(code: int, reason: str, kind: type, text: str) -> None:
    error = _close_error(ConnectionClosedError(Close(code, reason), None))
    assert type(error) is kind
    assert text in error.message


def test_a_connection_lost_without_a_close_frame_is_unavailable() -> None:
    error = _close_error(ConnectionClosedError(None, None))
    assert type(error) is Unavailable


@pytest.mark.parametrize(
    ("status", "kind"), [(401, Unauthorized), (403, Forbidden), (404, Unavailable)]
)
def test_handshake_statuses_map_to_errors(status: int, kind: type) -> None:
    exc = InvalidStatus(Response(status, "x", Headers()))
    error = _connect_error("ws://h/ws", exc, 1.0)
    assert type(error) is kind
    assert f"HTTP {status}" in error.message


def test_timeouts_and_refusals_map_to_unavailable() -> None:
    assert "within 2 s" in _connect_error("ws://h/ws", TimeoutError(), 2.0).message
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
    assert _connect_error("ws://h/ws", refused, 1.0).message.endswith(os.strerror(111))


# --- the client without a server ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"url": "http://127.0.0.1/ws"},
        {"url": "ws://127.0.0.1/ws", "encoding": "xml"},
        {"url": "ws://127.0.0.1/ws", "open_timeout": 0},
        {"url": "ws://127.0.0.1/ws", "backoff_initial": 5.0, "backoff_max": 1.0},
        {"url": "ws://127.0.0.1/ws", "subscription_maxsize": 0},
    ],
)
def test_client_refuses_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        Client(**kwargs)  # type: ignore[arg-type]


async def test_requests_before_connect_are_a_usage_error() -> None:
    client = Client("ws://127.0.0.1:1/ws")
    assert not client.connected.is_set()
    with pytest.raises(UsageError, match="not connected"):
        await client.publish("a/b", 1)
    with pytest.raises(UsageError, match="not connected"):
        await client.wait_connected(UNIT)


async def test_invalid_topics_fail_before_anything_is_sent() -> None:
    client = Client("ws://127.0.0.1:1/ws")
    with pytest.raises(BadRequest):
        await client.publish("a/*", 1)
    with pytest.raises(BadRequest):
        await client.subscribe("a//b")
    with pytest.raises(UsageError, match="exact topic"):
        await client.subscribe("a/*", since=Since(1, "e"))


async def test_a_closed_client_cannot_connect_again() -> None:
    client = Client("ws://127.0.0.1:1/ws")
    await client.close()
    assert client.stopped
    assert client.stop_reason is None
    with pytest.raises(UsageError, match="closed"):
        await client.connect()


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port with a bound socket that does not listen: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


async def test_an_unreachable_server_fails_the_first_connect(refusing_port: int) -> None:
    client = Client(f"ws://127.0.0.1:{refusing_port}/ws", open_timeout=5 * UNIT)
    with pytest.raises(Unavailable, match=r"cannot connect to .*: Connection refused"):
        async with client:
            pass
    assert not client.connected.is_set()


# --- command line: parsing ----------------------------------------------------------------------


def all_actions(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for path, inner in all_actions(sub):
                    yield f"{name} {path}", inner
        else:
            yield parser.prog, action


def test_every_option_has_help_text() -> None:
    actions = list(all_actions(cli.build_parser()))
    assert len(actions) > 30
    missing = [f"{where}: {action.dest}" for where, action in actions if not action.help]
    assert missing == []


def test_help_and_version_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert cli.main(["--version"]) == 0
    assert quicksilver.__version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["serve", "--port", "70000"],
        ["serve", "--log-level", "loud"],
        ["token", "--role", "admin"],
        ["token", "--sub", "x", "--role", "admin", "--ttl", "-1"],
        ["subscribe", "a", "--count", "0"],
        ["worker", "--concurrency", "0", "--token", "t"],
    ],
)
def test_bad_arguments_exit_two(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "error" in capsys.readouterr().err


def parse(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


def test_serve_flags_override_the_environment(tmp_path: Path) -> None:
    args = parse(
        [
            "serve",
            "--host",
            "127.0.0.2",
            "--data-dir",
            str(tmp_path),
            "--allow-origin",
            "https://a.example",
            "--allow-origin",
            "https://b.example",
            "--no-anonymous",
            "--log-level",
            "DEBUG",
        ]
    )
    env = {"QUICKSILVER_HOST": "0.0.0.0", "QUICKSILVER_PORT": "9001", "QUICKSILVER_SECRET": SECRET}
    settings = Settings.from_env(env, **cli.serve_overrides(args))
    assert settings.host == "127.0.0.2"
    assert settings.port == 9001
    assert settings.data_dir == tmp_path
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.allow_anonymous is False
    assert settings.log_level == "debug"


def test_serve_passes_only_the_flags_given() -> None:
    assert cli.serve_overrides(parse(["serve"])) == {}
    assert cli.serve_overrides(parse(["serve", "--port", "0"])) == {"port": 0}


def test_serve_runs_the_broker_with_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import broker.server

    ran: list[Settings] = []
    monkeypatch.setattr(broker.server, "run", ran.append)
    monkeypatch.setenv("QUICKSILVER_REDIS_URL", "redis://env")
    assert cli.main(["serve", "--port", "8123", "--data-dir", str(tmp_path)]) == 0
    assert [(s.port, s.data_dir, s.redis_url) for s in ran] == [(8123, tmp_path, "redis://env")]


def test_serve_reports_a_bad_environment_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QUICKSILVER_PORT", "eighty")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "QUICKSILVER_PORT" in err
    assert "Traceback" not in err


def test_subscribe_since_needs_both_parts_and_an_exact_topic() -> None:
    assert cli.subscribe_since(parse(["subscribe", "a/b"])) is None
    since = cli.subscribe_since(parse(["subscribe", "a/b", "--since-offset", "4", "--epoch", "e"]))
    assert since == Since(4, "e")
    for argv in (["subscribe", "a/b", "--epoch", "e"], ["subscribe", "a/*", "--since-offset", "1"]):
        with pytest.raises(cli.CommandError) as info:
            cli.subscribe_since(parse(argv))
        assert info.value.status == 2
    with pytest.raises(cli.CommandError, match="exact topic"):
        cli.subscribe_since(parse(["subscribe", "a/*", "--since-offset", "1", "--epoch", "e"]))


def test_message_lines_are_one_json_object() -> None:
    line = cli.message_line(msg("a/b", 3, data={"grade": "pass", "name": "Ünïcode"}))
    assert "\n" not in line
    assert line == (
        '{"topic":"a/b","offset":3,"epoch":"e1","ts":1.0,"data":{"grade":"pass","name":"Ünïcode"}}'
    )


def test_worker_options_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUICKSILVER_TOKEN", "env-token")
    monkeypatch.setenv("QUICKSILVER_QUEUES", "reports, uploads")
    monkeypatch.setenv("QUICKSILVER_CONCURRENCY", "3")
    monkeypatch.setenv("QUICKSILVER_URL", "ws://env:1/ws")
    options = cli.worker_options(parse(["worker", "--burst", "--app", "my.jobs"]))
    assert options == {
        "url": "ws://env:1/ws",
        "token": "env-token",
        "queues": ("reports", "uploads"),
        "concurrency": 3,
        "apps": ("my.jobs",),
        "burst": True,
    }
    flags = ["worker", "--token", "t", "--queue", "q", "--concurrency", "8", "--url", "ws://f/ws"]
    options = cli.worker_options(parse(flags))
    assert (options["token"], options["queues"], options["concurrency"], options["url"]) == (
        "t",
        ("q",),
        8,
        "ws://f/ws",
    )


def test_worker_leaves_the_default_concurrency_to_the_runtime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("QUICKSILVER_CONCURRENCY", raising=False)
    assert "concurrency" not in cli.worker_options(parse(["worker", "--token", "t"]))


def test_worker_needs_a_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("QUICKSILVER_TOKEN", raising=False)
    assert cli.main(["worker"]) == 2
    assert "token" in capsys.readouterr().err


# --- command line: publish and subscribe without a server ---------------------------------------


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["publish", "a/b", "{x"], "JSON is not valid"),
        (["publish", "a/b", "NaN"], "cannot be published"),
        (["publish", "a/*", "1"], "wildcard"),
        (["publish", "a/b", "1", "--url", "http://x/ws"], "not a WebSocket URL"),
        (["subscribe", "a//b"], "invalid segment"),
    ],
)
def test_publish_and_subscribe_check_arguments_first(
    argv: list[str], text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert text in err
    assert err.count("\n") == 1


def test_publish_reads_json_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"a": [1, '))
    assert cli.main(["publish", "a/b", "-"]) == 2
    assert "JSON is not valid" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["publish", "subscribe"])
def test_an_unreachable_server_is_one_line_and_exit_one(
    command: str, refusing_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"ws://127.0.0.1:{refusing_port}/ws"
    argv = ["publish", "a/b", '{"x": 1}'] if command == "publish" else ["subscribe", "a/b"]
    assert cli.main([*argv, "--url", url, "--timeout", str(5 * UNIT)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"quicksilver: error: cannot connect to {url}: Connection refused\n"


# --- command line: token ------------------------------------------------------------------------


def claims_of(token: str, key: str | bytes, algorithm: str = "HS256") -> dict[str, object]:
    decoded: dict[str, object] = jwt.decode(
        token, key, algorithms=[algorithm], options={"verify_aud": False}
    )
    return decoded


def test_token_creates_the_secret_once_and_signs_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("QUICKSILVER_SECRET", raising=False)
    data = tmp_path / "data"
    argv = ["token", "--sub", "alice", "--role", "publisher", "--role", "subscriber"]
    argv += ["--publish", "reports/**", "--subscribe", "reports/dist/*", "--queue", "reports"]
    argv += ["--ttl", "120", "--data-dir", str(data)]
    assert cli.main(argv) == 0
    first = capsys.readouterr()
    assert "created a new signing secret" in first.err
    assert first.err.count("\n") == 1
    token = first.out.strip()
    assert first.out == token + "\n"

    secret = (data / "secret").read_text().strip()
    claims = claims_of(token, secret)
    assert claims["sub"] == "alice"
    assert claims["roles"] == ["publisher", "subscriber"]
    assert claims["publish"] == ["reports/**"]
    assert claims["subscribe"] == ["reports/dist/*"]
    assert claims["queues"] == ["reports"]
    assert claims["exp"] == claims["iat"] + 120  # type: ignore[operator]

    assert cli.main(argv) == 0
    second = capsys.readouterr()
    assert second.err == ""
    assert claims_of(second.out.strip(), secret)["sub"] == "alice"


def test_token_prefers_the_environment_secret_and_ttl_zero_never_expires(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QUICKSILVER_SECRET", SECRET)
    monkeypatch.setenv("QUICKSILVER_DATA_DIR", str(tmp_path / "data"))
    assert cli.main(["token", "--sub", "w", "--role", "worker", "--ttl", "0"]) == 0
    out = capsys.readouterr()
    claims = claims_of(out.out.strip(), SECRET)
    assert "exp" not in claims
    assert "queues" not in claims
    assert out.err == ""
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        (["--role", "boss"], "unknown role 'boss'"),
        (["--role", "admin", "--publish", "a/**/b"], "--publish"),
        (["--role", "admin", "--subscribe", "a//b"], "--subscribe"),
        (["--role", "admin", "--queue", ""], "queue"),
        (["--role", "admin", "--algorithm", "ES256"], "--private-key-file"),
    ],
)
def test_token_refuses_bad_claims_without_creating_a_secret(
    extra: list[str],
    text: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("QUICKSILVER_SECRET", raising=False)
    data = tmp_path / "data"
    assert cli.main(["token", "--sub", "x", *extra, "--data-dir", str(data)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert text in captured.err
    assert "Traceback" not in captured.err
    assert not (data / "secret").exists()


def test_token_refuses_a_weak_environment_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QUICKSILVER_SECRET", "short")
    assert cli.main(["token", "--sub", "x", "--role", "admin"]) == 2
    assert "RFC 7518" in capsys.readouterr().err


def test_token_signs_with_a_private_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    argv = ["token", "--sub", "k", "--role", "admin", "--private-key-file", str(key_file)]
    assert cli.main(argv) == 2
    assert "--algorithm" in capsys.readouterr().err
    assert cli.main([*argv, "--algorithm", "ES256"]) == 0
    token = capsys.readouterr().out.strip()
    assert claims_of(token, public, "ES256")["sub"] == "k"
    assert not (tmp_path / "data").exists()


def test_token_reports_a_missing_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.pem"
    argv = ["token", "--sub", "k", "--role", "admin", "--private-key-file", str(missing)]
    assert cli.main([*argv, "--algorithm", "RS256"]) == 1
    err = capsys.readouterr().err
    assert f"cannot read the private key {missing}" in err
    assert err.count("\n") == 1
