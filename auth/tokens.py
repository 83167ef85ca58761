"""JSON Web Tokens: minting, verifying, claims and revocation.

A token is a compact JWS (RFC 7515) signed with HS256 by default (a shared secret), or with
RS256/ES256 (and their larger siblings) when a PEM public key is configured. Verification refuses
every token it cannot fully trust with :class:`protocol.errors.Unauthorized`, whose message says
why in one human sentence; nothing else escapes :meth:`TokenVerifier.verify` for any input.

Claims understood (RFC 7519 names plus the quicksilver ones)::

    sub        str             who the token is for (optional)
    exp        int             unix seconds after which the token is refused (optional)
    nbf        int             unix seconds before which the token is refused (optional)
    iat        int             issue time; refused when in the future (optional)
    jti        str             token id, used for revocation (optional)
    roles      [str]           any of ROLES; an unknown role refuses the whole token
    publish    [pattern]       topic patterns the token may publish to
    subscribe  [pattern]       topic patterns the token may subscribe to
    queues     [str]           queue names the token may work on or enqueue to

An empty ``publish`` or ``subscribe`` list means the same as an absent one; ``queues`` keeps the
difference (absent: no limit; empty: no queue). See :mod:`auth.permissions` for what they allow.
"""

from __future__ import annotations

import base64
import hmac
import json
import math
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_pem_public_key,
)
from jwt.algorithms import Algorithm

from protocol.codec import MAX_QUEUE_NAME
from protocol.errors import BadRequest, Unauthorized, UsageError
from protocol.topics import parse_pattern

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "ROLES",
    "SECRET_ENV",
    "SECRET_FILE",
    "Claims",
    "RevocationList",
    "Secret",
    "TokenVerifier",
    "load_or_create_secret",
    "mint_token",
    "secret_from_env",
]

ROLES = ("admin", "publisher", "subscriber", "worker")
_ROLE_SET = frozenset(ROLES)

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
_SUPPORTED = HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS
# RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

SECRET_ENV = "QUICKSILVER_SECRET"
SECRET_FILE = "secret"
#: Tokens longer than this are refused before any decoding (bounds the work a peer can cause).
DEFAULT_MAX_TOKEN_BYTES = 16 * 1024


class Secret:
    """A secret string that never shows itself in ``repr``, ``str``, f-strings or logs.

    Use :meth:`reveal` at the one place that needs the value. Equality compares in constant
    time; the value is not validated here (see :class:`TokenVerifier` for length rules).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise UsageError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        """The secret itself."""
        return self._value

    def __repr__(self) -> str:
        return f"{type(self).__name__}('**********')"

    def __str__(self) -> str:
        return "**********"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return _constant_time_equal(self._value, other._value)

    def __hash__(self) -> int:
        return hash((Secret, self._value))


def _constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class Claims:
    """The validated claims of a verified token.

    ``publish``/``subscribe`` hold valid topic patterns (empty when absent); ``queues`` is None
    when the token has no ``queues`` claim. Build with :meth:`from_payload`, which raises
    :class:`Unauthorized` for any claim of the wrong type or with an invalid value.
    """

    sub: str | None
    roles: frozenset[str]
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    queues: tuple[str, ...] | None
    exp: int | None
    iat: int | None
    jti: str | None

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Claims:
        """Validate a decoded JWT payload. Unknown claims are ignored.

        Only shapes are checked here; times are checked by :meth:`TokenVerifier.verify`.
        """
        queues_raw = payload.get("queues")
        return cls(
            sub=_optional_str(payload, "sub"),
            roles=frozenset(_roles(payload.get("roles"))),
            publish=_patterns(payload.get("publish"), "publish"),
            subscribe=_patterns(payload.get("subscribe"), "subscribe"),
            queues=None if queues_raw is None else _queues(queues_raw),
            exp=_optional_time(payload, "exp"),
            iat=_optional_time(payload, "iat"),
            jti=_optional_str(payload, "jti"),
        )


def _optional_str(payload: Mapping[str, Any], name: str) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Unauthorized(f"token claim {name!r} must be a string")
    return value


def _optional_time(payload: Mapping[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    # bool is an int subclass; `"exp": true` is a malformed token, not the year 1970.
    if not isinstance(value, int) or isinstance(value, bool):
        raise Unauthorized(f"token claim {name!r} must be an integer (unix seconds)")
    return value


def _string_list(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise Unauthorized(f"token claim {name!r} must be a list of strings")
    return value


def _roles(value: object) -> list[str]:
    if value is None:
        return []
    roles = _string_list(value, "roles")
    for role in roles:
        if role not in _ROLE_SET:
            raise Unauthorized(
                f"token claim 'roles' has unknown role {role!r} (known: {', '.join(ROLES)})"
            )
    return roles


def _patterns(value: object, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    patterns = _string_list(value, name)
    for pattern in patterns:
        try:
            parse_pattern(pattern)
        except BadRequest as exc:
            raise Unauthorized(f"token claim {name!r} has an invalid pattern: {exc}") from None
    return tuple(dict.fromkeys(patterns))


def _queues(value: object) -> tuple[str, ...]:
    queues = _string_list(value, "queues")
    for queue in queues:
        if not queue or len(queue) > MAX_QUEUE_NAME:
            raise Unauthorized(
                f"token claim 'queues' has an invalid queue name {queue!r} "
                f"(1 to {MAX_QUEUE_NAME} characters)"
            )
    return tuple(dict.fromkeys(queues))


class RevocationList:
    """Revoked token ids (``jti``), each kept until the token's own ``exp`` has passed.

    In memory only: the owner loads it from and saves it to the store. An entry whose token has
    no ``exp`` (None) is kept until :meth:`discard` removes it. Size is bounded by the number of
    revoked tokens still unexpired; call :meth:`purge` now and then to drop the rest. Not
    thread-safe (one event loop owns it).
    """

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, float | None] | None = None) -> None:
        self._entries: dict[str, float | None] = dict(entries or {})

    def add(self, jti: str, exp: float | None) -> None:
        """Revoke ``jti`` until ``exp`` (unix seconds; None: until discarded)."""
        if not isinstance(jti, str) or not jti:
            raise UsageError("a revoked jti must be a non-empty string")
        self._entries[jti] = exp

    def discard(self, jti: str) -> None:
        """Forget ``jti`` (no error when absent)."""
        self._entries.pop(jti, None)

    def purge(self, now: float, leeway: float = 0.0) -> int:
        """Drop entries whose ``exp + leeway`` has passed; return how many were dropped.

        Pass the verifier's leeway (or use :meth:`TokenVerifier.purge_revoked`): a token stays
        acceptable until ``exp + leeway``, so its entry must live at least that long.
        """
        limit = now - leeway
        gone = [jti for jti, exp in self._entries.items() if exp is not None and exp <= limit]
        for jti in gone:
            del self._entries[jti]
        return len(gone)

    def items(self) -> Iterator[tuple[str, float | None]]:
        """``(jti, exp)`` pairs, e.g. to persist them."""
        return iter(list(self._entries.items()))

    def __contains__(self, jti: object) -> bool:
        return jti in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"RevocationList({len(self._entries)} entries)"


def _algorithm(name: str) -> Algorithm:
    if name.lower() == "none":
        raise UsageError("algorithm 'none' (unsigned tokens) is never allowed")
    if name not in _SUPPORTED:
        raise UsageError(
            f"unsupported JWT algorithm {name!r} (supported: {', '.join(sorted(_SUPPORTED))})"
        )
    return jwt.get_algorithm_by_name(name)


def _hmac_key(algorithm: str, key: Secret | str) -> bytes:
    raw = key.reveal() if isinstance(key, Secret) else key
    if not isinstance(raw, str):
        raise UsageError(f"the {algorithm} secret must be a str or Secret")
    key_bytes = raw.encode("utf-8")
    alg = _algorithm(algorithm)
    minimum = _HMAC_MIN_BYTES[algorithm]
    if len(key_bytes) < minimum:
        raise UsageError(
            f"the {algorithm} secret is {len(key_bytes)} bytes long; RFC 7518 section 3.2 "
            f"requires at least {minimum} (for example 32 random bytes, base64-encoded)"
        )
    try:
        prepared: bytes = alg.prepare_key(key_bytes)
    except jwt.InvalidKeyError as exc:
        raise UsageError(f"the {algorithm} secret is not usable: {exc}") from None
    return prepared


def _asymmetric_key(algorithm: str, key_obj: object, what: str) -> Any:
    alg = _algorithm(algorithm)
    try:
        prepared = alg.prepare_key(key_obj)
        short = alg.check_key_length(prepared)
    except (jwt.InvalidKeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"the {what} is not usable for {algorithm}: {exc}") from None
    if short is not None:
        raise UsageError(f"the {what} is too weak for {algorithm}: {short}")
    return prepared


class TokenVerifier:
    """Verifies tokens and returns their :class:`Claims`.

    ``secret`` verifies HS256/384/512, ``public_key`` (PEM text of an RSA or EC public key)
    verifies the RS/PS/ES algorithms; every algorithm in ``algorithms`` needs its key, else
    :class:`UsageError`. ``"none"`` in ``algorithms`` is ignored: unsigned tokens are refused
    whatever the configuration. HMAC secrets shorter than the hash output are refused
    (RFC 7518 section 3.2), as are RSA keys under 2048 bits.

    ``leeway`` (seconds) tolerates clock skew for ``exp``, ``nbf`` and ``iat``. ``revoked``
    is consulted after the signature and the times were checked.
    """

    def __init__(
        self,
        *,
        secret: Secret | None = None,
        public_key: str | None = None,
        algorithms: Sequence[str] = ("HS256",),
        leeway: float = 0.0,
        revoked: RevocationList | None = None,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
    ) -> None:
        if isinstance(algorithms, str):
            raise UsageError("algorithms must be a sequence of names, not one string")
        wanted = [name for name in dict.fromkeys(algorithms) if name.lower() != "none"]
        if not wanted:
            raise UsageError("no JWT algorithm allowed (and 'none' is never allowed)")
        if not math.isfinite(leeway) or leeway < 0:
            raise UsageError("leeway must be a finite number of seconds >= 0")
        if max_token_bytes < 1:
            raise UsageError("max_token_bytes must be positive")
        public_obj: object = None
        if public_key is not None:
            try:
                public_obj = load_pem_public_key(public_key.encode("utf-8"))
            except (ValueError, TypeError) as exc:
                raise UsageError(f"public_key is not a PEM public key: {exc}") from None
        keys: dict[str, tuple[Algorithm, Any]] = {}
        for name in wanted:
            alg = _algorithm(name)
            if name in HMAC_ALGORITHMS:
                if secret is None:
                    raise UsageError(f"algorithm {name} needs a secret")
                keys[name] = (alg, _hmac_key(name, secret))
            else:
                if public_obj is None:
                    raise UsageError(f"algorithm {name} needs a PEM public key")
                keys[name] = (alg, _asymmetric_key(name, public_obj, "public key"))
        if public_obj is not None and not any(n in ASYMMETRIC_ALGORITHMS for n in keys):
            raise UsageError(
                "a public key was given but no RS/PS/ES algorithm is allowed; "
                "set algorithms to e.g. ('RS256',) or ('ES256',)"
            )
        self._keys = keys
        self._jws = jwt.PyJWS(algorithms=list(keys))
        self.algorithms: tuple[str, ...] = tuple(keys)
        self.leeway = float(leeway)
        self.revoked = revoked if revoked is not None else RevocationList()
        self.max_token_bytes = max_token_bytes

    def verify(self, token: str, *, now: float | None = None) -> Claims:
        """Check ``token`` completely and return its claims.

        Raises :class:`Unauthorized` (and nothing else) when the token is not a string, too
        long, malformed, unsigned (``alg: none``), signed with an algorithm not allowed or
        with the wrong key, has a claim of the wrong type or an unknown role, is expired
        (``exp`` <= now - leeway), not yet valid (``nbf`` or ``iat`` > now + leeway), or its
        ``jti`` is revoked. A token without ``exp`` never expires. ``now`` defaults to the
        current time.
        """
        if not isinstance(token, str):
            raise Unauthorized("malformed token: a token must be a string")
        if len(token) > self.max_token_bytes:
            raise Unauthorized(f"malformed token: longer than {self.max_token_bytes} bytes")
        if not token.isascii():
            raise Unauthorized("malformed token: a JWT is ASCII only")
        if token.count(".") != 2:
            raise Unauthorized("malformed token: a JWT has three dot-separated parts")
        try:
            decoded = self._jws.decode_complete(token, options={"verify_signature": False})
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError) as exc:
            raise Unauthorized(f"malformed token: {exc}") from None
        header: dict[str, Any] = decoded["header"]
        alg_name = header.get("alg")
        if not isinstance(alg_name, str):
            raise Unauthorized("malformed token: the header has no 'alg' string")
        if alg_name.lower() == "none":
            raise Unauthorized("unsigned tokens (alg 'none') are refused")
        entry = self._keys.get(alg_name)
        if entry is None:
            raise Unauthorized(
                f"token algorithm {alg_name!r} is not allowed "
                f"(allowed: {', '.join(self.algorithms)})"
            )
        if "b64" in header:
            raise Unauthorized("malformed token: unencoded payloads (RFC 7797) are refused")
        alg, key = entry
        signing_input, _, _ = token.rpartition(".")
        try:
            valid = alg.verify(signing_input.encode("ascii"), key, decoded["signature"])
        except (ValueError, TypeError):
            valid = False
        if not valid:
            raise Unauthorized("token signature is invalid")
        try:
            payload = json.loads(decoded["payload"])
        except (ValueError, RecursionError):
            raise Unauthorized("malformed token: the payload is not JSON") from None
        if not isinstance(payload, dict):
            raise Unauthorized("malformed token: the payload is not a JSON object")
        claims = Claims.from_payload(payload)
        nbf = _optional_time(payload, "nbf")
        self._check_times(claims, nbf, time.time() if now is None else now)
        if claims.jti is not None and claims.jti in self.revoked:
            raise Unauthorized("token has been revoked")
        return claims

    def _check_times(self, claims: Claims, nbf: int | None, now: float) -> None:
        # RFC 7519 4.1.4: the token must be refused "on or after" exp.
        if claims.exp is not None and claims.exp <= now - self.leeway:
            raise Unauthorized("token expired")
        if nbf is not None and nbf > now + self.leeway:
            raise Unauthorized("token not yet valid (nbf is in the future)")
        if claims.iat is not None and claims.iat > now + self.leeway:
            raise Unauthorized("token not yet valid (iat is in the future)")

    def purge_revoked(self, now: float | None = None) -> int:
        """Drop revocations of tokens this verifier would refuse as expired anyway."""
        return self.revoked.purge(time.time() if now is None else now, self.leeway)


def mint_token(
    key: Secret | str,
    *,
    sub: str,
    roles: Sequence[str] = (),
    publish: Sequence[str] = (),
    subscribe: Sequence[str] = (),
    queues: Sequence[str] | None = None,
    ttl: float | None = 3600,
    algorithm: str = "HS256",
    now: float | None = None,
    jti: str | None = None,
) -> str:
    """Sign a token with ``sub``, ``iat``, ``exp`` (``iat + ttl``, omitted when ``ttl`` is None),
    ``jti`` (a random uuid4 hex unless given) and ``roles``; ``publish``, ``subscribe`` and
    ``queues`` only when given (``queues=[]`` is given: it allows no queue).

    ``key`` is the shared secret for HS256/384/512 and PEM private key text (unencrypted) for
    RS/PS/ES algorithms. Raises :class:`UsageError` for an unknown role, an invalid pattern or
    queue name, a weak or unusable key, an unsupported algorithm or ``none``.
    """
    if not isinstance(sub, str):
        raise UsageError("sub must be a string")
    if isinstance(roles, str) or isinstance(publish, str) or isinstance(subscribe, str):
        raise UsageError("roles, publish and subscribe are sequences, not single strings")
    if isinstance(queues, str):
        raise UsageError("queues is a sequence of names, not one string")
    for role in roles:
        if role not in _ROLE_SET:
            raise UsageError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    for name, patterns in (("publish", publish), ("subscribe", subscribe)):
        for pattern in patterns:
            try:
                parse_pattern(pattern)
            except BadRequest as exc:
                raise UsageError(f"{name}: {exc}") from None
    if queues is not None:
        for queue in queues:
            if not isinstance(queue, str) or not queue or len(queue) > MAX_QUEUE_NAME:
                raise UsageError(f"invalid queue name {queue!r} (1 to {MAX_QUEUE_NAME} characters)")
    if ttl is not None and not math.isfinite(ttl):
        raise UsageError("ttl must be a finite number of seconds or None")

    signing_key: Any
    if algorithm in HMAC_ALGORITHMS:
        signing_key = _hmac_key(algorithm, key)
    else:
        _algorithm(algorithm)
        pem = key.reveal() if isinstance(key, Secret) else key
        try:
            private_obj = load_pem_private_key(pem.encode("utf-8"), password=None)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{algorithm} needs an unencrypted PEM private key: {exc}") from None
        signing_key = _asymmetric_key(algorithm, private_obj, "private key")

    issued = time.time() if now is None else now
    payload: dict[str, Any] = {"sub": sub, "iat": int(issued)}
    if ttl is not None:
        payload["exp"] = int(issued + ttl)
    payload["jti"] = uuid.uuid4().hex if jti is None else jti
    payload["roles"] = list(dict.fromkeys(roles))
    if publish:
        payload["publish"] = list(dict.fromkeys(publish))
    if subscribe:
        payload["subscribe"] = list(dict.fromkeys(subscribe))
    if queues is not None:
        payload["queues"] = list(dict.fromkeys(queues))
    return jwt.encode(payload, signing_key, algorithm=algorithm)


def load_or_create_secret(data_dir: Path) -> tuple[Secret, bool]:
    """Read ``data_dir/secret``, or create it with 32 random bytes (urlsafe base64).

    Returns ``(secret, created)``. The file is created with ``O_CREAT | O_EXCL`` and mode 0600,
    so it is never readable by others, not even for a moment, and two processes racing to create
    it cannot overwrite each other (the loser reads the winner's file). ``data_dir`` is created
    when missing. Surrounding whitespace in the file is ignored. Raises :class:`UsageError`
    when the file is empty, and ``OSError`` when it cannot be read or written.
    """
    data_dir = Path(data_dir)
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        value = base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, value.encode("ascii") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            return Secret(value), True
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise UsageError(f"the secret file {path} is empty; delete it to generate a new one")
    return Secret(text), False


def secret_from_env(environ: Mapping[str, str]) -> Secret | None:
    """The secret from ``QUICKSILVER_SECRET``, or None when unset or blank."""
    value = environ.get(SECRET_ENV, "").strip()
    return Secret(value) if value else None
