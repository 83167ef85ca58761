"""Per-connection rate limits: the buckets and policy without a socket, then a real server where
one client goes over its limit and gets ``rate_limited`` while the others carry on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from auth.permissions import Permissions
from auth.tokens import Claims
from broker.ratelimit import Limit, RatePolicy, parse_limits

from .helpers import raw_client, running_server, token


def perms(*roles: str) -> Permissions:
    return Permissions.from_claims(Claims.from_payload({"sub": "x", "roles": list(roles)}))


def test_limits_parse() -> None:
    assert parse_limits(["subscriber=5:1000", " anonymous = 2 ", ""]) == {
        "subscriber": Limit(5.0, 1000.0),
        "anonymous": Limit(2.0, 0.0),
    }
    for bad in ("robot=1", "subscriber", "subscriber=-1", "subscriber=x", "worker=1:inf"):
        with pytest.raises(ValueError, match="rate limit"):
            parse_limits([bad])


def test_most_generous_role_wins_and_unlisted_roles_are_unlimited() -> None:
    policy = RatePolicy(parse_limits(["subscriber=5:100", "publisher=50", "default=1"]))
    assert policy.limit_for(perms("subscriber")) == Limit(5, 100)
    assert policy.limit_for(perms("subscriber", "publisher")) == Limit(50, 0)
    assert policy.limit_for(perms("subscriber", "worker")) == Limit(0, 0)
    assert policy.limit_for(perms()) == Limit(1, 0)
    assert policy.limit_for(None) == Limit(0, 0)
    assert policy.limit_for(Permissions.anonymous(())) == Limit(0, 0)


def test_buckets_refill_with_time_and_allow_one_big_frame_into_debt() -> None:
    policy = RatePolicy(parse_limits(["subscriber=2:100"]), burst=1.0)
    limiter = policy.limiter(perms("subscriber"), now=0.0)
    assert limiter.check(10, 0.0) == 0.0
    assert limiter.check(10, 0.0) == 0.0
    assert limiter.check(10, 0.0) == pytest.approx(0.5)  # frames: 1 token after 0.5 s
    assert limiter.check(10, 0.5) == 0.0
    assert limiter.check(500, 10.0) == 0.0  # a full byte bucket lets one big frame through
    assert limiter.check(1, 10.0) == pytest.approx(4.01)  # then it pays the debt back


def test_new_permissions_do_not_refill_the_buckets() -> None:
    policy = RatePolicy(parse_limits(["subscriber=1", "anonymous=1"]), burst=1.0)
    before = policy.limiter(None, now=0.0)
    assert before.check(1, 0.0) == 0.0
    after = policy.limiter(perms("subscriber"), now=0.0, old=before)
    assert after.check(1, 0.0) > 0


async def test_a_client_over_its_limit_is_refused_and_the_others_are_not(tmp_path: Path) -> None:
    sub = token(sub="s", roles=("subscriber",))
    async with running_server(
        tmp_path / "d", rate_limits=("subscriber=2:1000000",), rate_limit_burst=2.0
    ) as server:
        url = server.ws_url
        async with (
            raw_client(url, sub) as greedy,
            raw_client(url, sub) as calm,
            raw_client(url) as admin,
        ):
            for n in range(12):
                await greedy.send({"type": "ping", "id": n})
            answers = [await greedy.recv() for _ in range(12)]
            assert sorted(a["id"] for a in answers) == list(range(12))
            limited = [a for a in answers if a["type"] == "error"]
            assert limited, answers
            for error in limited:
                assert error["code"] == "rate_limited" and error["retry_after"] > 0
                assert "2 frames/s" in error["message"]
            # The same role on another connection, and another role, are not affected.
            assert (await calm.request({"type": "ping"}))["type"] == "pong"
            for _ in range(20):
                assert (await admin.request({"type": "ping"}))["type"] == "pong"
            # The greedy client is served again once its bucket has refilled.
            await asyncio.sleep(max(e["retry_after"] for e in limited))
            assert (await greedy.request({"type": "ping"}))["type"] == "pong"


async def test_byte_limit(tmp_path: Path) -> None:
    pub = token(sub="p", roles=("publisher",))
    async with running_server(
        tmp_path / "d", rate_limits=("publisher=0:2000",), rate_limit_burst=1.0
    ) as server:
        async with raw_client(server.ws_url, pub) as client:
            big = "x" * 1500
            first = await client.request({"type": "publish", "topic": "t", "data": big})
            second = await client.request({"type": "publish", "topic": "t", "data": big})
            assert first["type"] == "ok"
            assert (second["type"], second["code"]) == ("error", "rate_limited")
            assert "2000 bytes/s" in second["message"]
