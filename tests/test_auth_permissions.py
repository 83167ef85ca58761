"""Permissions from claims: one table per right, plus anonymous clients and Forbidden messages."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from auth.permissions import Permissions
from auth.tokens import Claims, Secret, TokenVerifier, mint_token
from protocol.errors import Forbidden, UsageError

PUBLIC = ("reports/**", "stats/*")


def perms(
    roles: Sequence[str] = (),
    publish: Sequence[str] = (),
    subscribe: Sequence[str] = (),
    queues: Sequence[str] | None = None,
    public: Sequence[str] = PUBLIC,
) -> Permissions:
    claims = Claims(
        sub="someone",
        roles=frozenset(roles),
        publish=tuple(publish),
        subscribe=tuple(subscribe),
        queues=None if queues is None else tuple(queues),
        exp=None,
        iat=None,
        jti=None,
    )
    return Permissions.from_claims(claims, public)


ADMIN = perms(roles=["admin"], queues=[])
PUBLISHER = perms(roles=["publisher"])
SUBSCRIBER = perms(roles=["subscriber"])
WORKER = perms(roles=["worker"])
NO_ROLE = perms()
PUB_LIMITED = perms(roles=["publisher"], publish=["news/*", "chat/room-1", "logs/**"])
CLAIM_ONLY = perms(publish=["news/*"], subscribe=["news/**"])
SUB_LIMITED = perms(roles=["subscriber"], subscribe=["reports/dist/*", "jobs/abc", "a/**"])
PUB_SUB_LIMITED = perms(roles=["publisher"], subscribe=["only/this"])
WORKER_Q = perms(roles=["worker"], queues=["reports", "emails"])
WORKER_NO_Q = perms(roles=["worker"], queues=[])
PUBLISHER_Q = perms(roles=["publisher"], queues=["reports"])
ANON = Permissions.anonymous(PUBLIC)


@pytest.mark.parametrize(
    ("who", "topic", "allowed"),
    [
        (ADMIN, "anything/at/all", True),
        (PUBLISHER, "anything/at/all", True),
        (PUBLISHER, "jobs/123", True),
        (SUBSCRIBER, "news/today", False),
        (WORKER, "news/today", False),
        (NO_ROLE, "news/today", False),
        (PUB_LIMITED, "news/today", True),
        (PUB_LIMITED, "news/today/late", False),
        (PUB_LIMITED, "news", False),
        (PUB_LIMITED, "chat/room-1", True),
        (PUB_LIMITED, "chat/room-2", False),
        (PUB_LIMITED, "logs", True),
        (PUB_LIMITED, "logs/a/b/c", True),
        (PUB_LIMITED, "other", False),
        (CLAIM_ONLY, "news/today", True),
        (CLAIM_ONLY, "sports/today", False),
        # Public patterns are for reading only.
        (SUBSCRIBER, "reports/x", False),
        (ANON, "reports/x", False),
        (ANON, "anything", False),
        # Wildcards are never a publish topic, whatever the rights.
        (PUB_LIMITED, "news/*", False),
        (PUBLISHER, "news/**", False),
        (ADMIN, "news/*", False),
        (PUBLISHER, "", False),
    ],
)
def test_can_publish(who: Permissions, topic: str, allowed: bool) -> None:
    assert who.can_publish(topic) is allowed


@pytest.mark.parametrize(
    ("who", "pattern", "allowed"),
    [
        (ADMIN, "**", True),
        (ADMIN, "secret/stuff", True),
        (SUBSCRIBER, "**", True),
        (SUBSCRIBER, "secret/*", True),
        (PUBLISHER, "secret/*", True),
        (PUB_LIMITED, "secret/*", True),  # publish claim does not limit subscribing
        (WORKER, "secret/stuff", False),
        (WORKER, "jobs/123", False),
        (NO_ROLE, "secret/stuff", False),
        (SUB_LIMITED, "reports/dist/Foo", True),
        (SUB_LIMITED, "reports/dist/*", True),
        (SUB_LIMITED, "reports/dist/**", True),  # covered by the public reports/**
        (SUB_LIMITED, "jobs/abc", True),
        (SUB_LIMITED, "jobs/abd", False),
        (SUB_LIMITED, "jobs/*", False),
        (SUB_LIMITED, "a", True),
        (SUB_LIMITED, "a/b/*", True),
        (SUB_LIMITED, "a/**", True),
        (SUB_LIMITED, "**", False),
        (SUB_LIMITED, "b", False),
        (CLAIM_ONLY, "news/x/y", True),
        (CLAIM_ONLY, "news/**", True),
        (CLAIM_ONLY, "sports", False),
        (PUB_SUB_LIMITED, "only/this", True),
        (PUB_SUB_LIMITED, "only/that", False),
        (PUB_SUB_LIMITED, "stats/today", True),
        # Public patterns: everyone, covering only.
        (WORKER, "reports/dist/Foo/1.0", True),
        (WORKER, "reports/**", True),
        (WORKER, "reports", True),
        (WORKER, "stats/today", True),
        (WORKER, "stats/*", True),
        (WORKER, "stats/**", False),
        (WORKER, "stats/a/b", False),
        (WORKER, "*", False),
        (NO_ROLE, "reports/x", True),
        (NO_ROLE, "", False),
    ],
)
def test_can_subscribe(who: Permissions, pattern: str, allowed: bool) -> None:
    assert who.can_subscribe(pattern) is allowed


@pytest.mark.parametrize(
    ("who", "queue", "allowed"),
    [
        (ADMIN, "reports", True),
        (WORKER, "reports", True),
        (WORKER, "anything", True),
        (WORKER_Q, "reports", True),
        (WORKER_Q, "emails", True),
        (WORKER_Q, "other", False),
        (WORKER_NO_Q, "reports", False),
        (PUBLISHER, "reports", False),
        (PUBLISHER_Q, "reports", False),
        (SUBSCRIBER, "reports", False),
        (NO_ROLE, "reports", False),
        (ANON, "reports", False),
    ],
)
def test_can_work(who: Permissions, queue: str, allowed: bool) -> None:
    assert who.can_work(queue) is allowed


@pytest.mark.parametrize(
    ("who", "queue", "allowed"),
    [
        (ADMIN, "reports", True),
        (PUBLISHER, "reports", True),
        (PUBLISHER, "anything", True),
        (PUBLISHER_Q, "reports", True),
        (PUBLISHER_Q, "emails", False),
        (WORKER, "reports", True),
        (WORKER_Q, "emails", True),
        (WORKER_Q, "other", False),
        (WORKER_NO_Q, "reports", False),
        (SUBSCRIBER, "reports", False),
        (NO_ROLE, "reports", False),
        (CLAIM_ONLY, "reports", False),
        (ANON, "reports", False),
    ],
)
def test_can_enqueue(who: Permissions, queue: str, allowed: bool) -> None:
    assert who.can_enqueue(queue) is allowed


def test_attributes() -> None:
    assert ADMIN.is_admin and not ADMIN.is_anonymous
    assert not PUBLISHER.is_admin
    assert PUBLISHER.sub == "someone" and PUBLISHER.roles == {"publisher"}
    assert ANON.is_anonymous and ANON.sub is None and ANON.roles == frozenset()
    assert not ANON.is_admin and ANON.expires_at is None
    assert WORKER_Q.queues == frozenset({"reports", "emails"}) and WORKER.queues is None


def test_anonymous_without_public_patterns_can_do_nothing() -> None:
    nobody = Permissions.anonymous(())
    assert not nobody.can_subscribe("reports/x")
    assert not nobody.can_publish("reports/x")


def test_invalid_public_pattern_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="public pattern"):
        Permissions.anonymous(["a/**/b"])
    with pytest.raises(UsageError):
        perms(public="reports/**")


def test_require_methods_raise_forbidden_with_a_reason() -> None:
    with pytest.raises(Forbidden, match="token 'someone' may not publish to 'x'"):
        SUBSCRIBER.require_publish("x")
    with pytest.raises(Forbidden, match="an anonymous client may not subscribe to 'secret'"):
        ANON.require_subscribe("secret")
    with pytest.raises(Forbidden, match="lacks the 'worker' role"):
        PUBLISHER.require_work("reports")
    with pytest.raises(Forbidden, match="may not work on queue 'other'"):
        WORKER_Q.require_work("other")
    with pytest.raises(Forbidden, match="may not enqueue jobs on queue 'emails'"):
        PUBLISHER_Q.require_enqueue("emails")
    # Allowed: no exception.
    PUBLISHER.require_publish("x")
    ANON.require_subscribe("reports/x")
    WORKER_Q.require_work("reports")
    PUBLISHER_Q.require_enqueue("reports")


def test_from_a_verified_token() -> None:
    secret = Secret("s" * 32)
    token = mint_token(
        secret,
        sub="bot",
        roles=["worker"],
        subscribe=["jobs/**"],
        queues=["reports"],
        now=1_700_000_000,
        ttl=60,
    )
    claims = TokenVerifier(secret=secret).verify(token, now=1_700_000_000)
    rights = Permissions.from_claims(claims, public=PUBLIC)
    assert rights.expires_at == 1_700_000_060
    assert rights.can_work("reports") and not rights.can_work("emails")
    assert rights.can_subscribe("jobs/42") and rights.can_subscribe("reports/x")
    assert not rights.can_subscribe("chat/x")
    assert not rights.can_publish("jobs/42")
