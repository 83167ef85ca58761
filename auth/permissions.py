"""What a verified token (or an anonymous client) may do.

The rules, checked in this order; the first that allows wins, otherwise the request is refused:

* ``admin`` may do everything.
* publish(topic): allowed when the topic matches a pattern of the ``publish`` claim; a
  ``publisher`` with no (or an empty) ``publish`` claim may publish anywhere.
* subscribe(pattern): allowed when some pattern of the ``subscribe`` claim covers it
  (:func:`protocol.topics.covers`: every topic the requested pattern can match is matched by the
  claim's pattern); a ``subscriber`` or ``publisher`` with no (or an empty) ``subscribe`` claim
  may subscribe to anything; everyone, anonymous clients included, may subscribe to patterns
  covered by the server's ``public`` patterns.
* work(queue): needs the ``worker`` role; allowed for the queues of the ``queues`` claim, or for
  every queue when the claim is absent (an empty ``queues`` claim allows none).
* enqueue(queue) (and cancelling a job of that queue): needs the ``publisher`` or ``worker``
  role; limited to the ``queues`` claim when present.
* anonymous clients may only subscribe to public patterns; never publish, work or enqueue.

Topics such as ``jobs/<id>`` are ordinary topics: no rule mentions them. Callers pass names and
patterns already validated by :mod:`protocol.topics`; a publish topic containing a wildcard is
refused here as a second line of defence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protocol.errors import BadRequest, Forbidden, UsageError
from protocol.topics import covers, is_exact, matches, parse_pattern

from .tokens import Claims

__all__ = ["Permissions"]


def _public_patterns(public: Sequence[str]) -> tuple[str, ...]:
    if isinstance(public, str):
        raise UsageError("public is a sequence of patterns, not one string")
    for pattern in public:
        try:
            parse_pattern(pattern)
        except BadRequest as exc:
            raise UsageError(f"invalid public pattern: {exc}") from None
    return tuple(dict.fromkeys(public))


def _split(patterns: Sequence[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """Exact names go to a set (one hash lookup), wildcard patterns to a short tuple."""
    exact = frozenset(p for p in patterns if is_exact(p))
    wild = tuple(p for p in patterns if p not in exact)
    return exact, wild


@dataclass(frozen=True, slots=True)
class Permissions:
    """The rights of one connection or HTTP request, computed once from its claims.

    Build with :meth:`from_claims` or :meth:`anonymous`; every ``can_*`` check then costs a set
    lookup plus a loop over the token's few wildcard patterns. ``require_*`` raise
    :class:`protocol.errors.Forbidden` with a human message instead of returning False.
    """

    sub: str | None
    roles: frozenset[str]
    is_admin: bool
    is_anonymous: bool
    expires_at: int | None
    #: Queues named by the token's ``queues`` claim; None when the claim is absent.
    queues: frozenset[str] | None
    public: tuple[str, ...]
    publish_anywhere: bool
    subscribe_anywhere: bool
    may_work: bool
    may_enqueue: bool
    _publish_exact: frozenset[str]
    _publish_wild: tuple[str, ...]
    _subscribe_exact: frozenset[str]
    _subscribe_wild: tuple[str, ...]

    @classmethod
    def from_claims(cls, claims: Claims, public: Sequence[str] = ()) -> Permissions:
        """Rights of a verified token. Raises :class:`UsageError` for an invalid public pattern."""
        roles = claims.roles
        is_admin = "admin" in roles
        publish_exact, publish_wild = _split(claims.publish)
        subscribe_exact, subscribe_wild = _split(claims.subscribe)
        return cls(
            sub=claims.sub,
            roles=roles,
            is_admin=is_admin,
            is_anonymous=False,
            expires_at=claims.exp,
            queues=None if claims.queues is None else frozenset(claims.queues),
            public=_public_patterns(public),
            publish_anywhere=is_admin or ("publisher" in roles and not claims.publish),
            subscribe_anywhere=is_admin
            or (not claims.subscribe and not roles.isdisjoint(("subscriber", "publisher"))),
            may_work=is_admin or "worker" in roles,
            may_enqueue=is_admin or not roles.isdisjoint(("publisher", "worker")),
            _publish_exact=publish_exact,
            _publish_wild=publish_wild,
            _subscribe_exact=subscribe_exact,
            _subscribe_wild=subscribe_wild,
        )

    @classmethod
    def anonymous(cls, public: Sequence[str]) -> Permissions:
        """Rights of a client without a token: subscribe to ``public`` patterns, nothing else."""
        return cls(
            sub=None,
            roles=frozenset(),
            is_admin=False,
            is_anonymous=True,
            expires_at=None,
            queues=frozenset(),
            public=_public_patterns(public),
            publish_anywhere=False,
            subscribe_anywhere=False,
            may_work=False,
            may_enqueue=False,
            _publish_exact=frozenset(),
            _publish_wild=(),
            _subscribe_exact=frozenset(),
            _subscribe_wild=(),
        )

    def can_publish(self, topic: str) -> bool:
        """May this client publish to the exact ``topic``?"""
        if not topic or "*" in topic:
            return False
        if self.publish_anywhere or topic in self._publish_exact:
            return True
        return any(matches(pattern, topic) for pattern in self._publish_wild)

    def can_subscribe(self, pattern: str) -> bool:
        """May this client subscribe to ``pattern`` (an exact topic or a wildcard pattern)?"""
        if not pattern:
            return False
        if self.subscribe_anywhere or pattern in self._subscribe_exact:
            return True
        for allowed in self._subscribe_wild:
            if covers(allowed, pattern):
                return True
        return any(covers(allowed, pattern) for allowed in self.public)

    def can_work(self, queue: str) -> bool:
        """May this client take jobs from ``queue``?"""
        if self.is_admin:
            return True
        if not self.may_work:
            return False
        return self.queues is None or queue in self.queues

    def can_enqueue(self, queue: str) -> bool:
        """May this client add jobs to (or cancel jobs of) ``queue``?"""
        if self.is_admin:
            return True
        if not self.may_enqueue:
            return False
        return self.queues is None or queue in self.queues

    def require_publish(self, topic: str) -> None:
        """Raise :class:`Forbidden` unless :meth:`can_publish`."""
        if not self.can_publish(topic):
            raise Forbidden(f"{self._who()} may not publish to {topic!r}")

    def require_subscribe(self, pattern: str) -> None:
        """Raise :class:`Forbidden` unless :meth:`can_subscribe`."""
        if not self.can_subscribe(pattern):
            raise Forbidden(f"{self._who()} may not subscribe to {pattern!r}")

    def require_work(self, queue: str) -> None:
        """Raise :class:`Forbidden` unless :meth:`can_work`."""
        if not self.can_work(queue):
            if not self.is_anonymous and not self.may_work:
                raise Forbidden(f"{self._who()} lacks the 'worker' role")
            raise Forbidden(f"{self._who()} may not work on queue {queue!r}")

    def require_enqueue(self, queue: str) -> None:
        """Raise :class:`Forbidden` unless :meth:`can_enqueue`."""
        if not self.can_enqueue(queue):
            raise Forbidden(f"{self._who()} may not enqueue jobs on queue {queue!r}")

    def _who(self) -> str:
        if self.is_anonymous:
            return "an anonymous client"
        if self.sub is None:
            return "this token"
        return f"token {self.sub!r}"
