"""Tokens: minting, verification and every refusal, revocation, secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auth.tokens import (
    ROLES,
    Claims,
    RevocationList,
    Secret,
    TokenVerifier,
    load_or_create_secret,
    mint_token,
    secret_from_env,
)
from protocol.errors import Unauthorized, UsageError

NOW = 1_700_000_000
SECRET = Secret("0123456789abcdef0123456789abcdef-test-secret")
OTHER_SECRET = Secret("fedcba9876543210fedcba9876543210-other-secret")


# --- helpers: tokens built by hand, independent of the code under test -----------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def hs256_token(payload: Any, secret: Secret = SECRET, header: Any = None) -> str:
    """A correctly signed HS256 token whose payload may hold anything (even invalid claims)."""
    head = b64json({"alg": "HS256", "typ": "JWT"} if header is None else header)
    body = payload if isinstance(payload, str) else b64json(payload)
    signing_input = f"{head}.{body}".encode("ascii")
    digest = hmac.new(secret.reveal().encode("utf-8"), signing_input, hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(digest)}"


def decode_payload(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return data


def refused(verifier: TokenVerifier, token: object, *, now: float = NOW) -> str:
    """Verify and return the refusal message; fail the test when the token is accepted."""
    with pytest.raises(Unauthorized) as info:
        verifier.verify(cast(str, token), now=now)
    assert info.value.code == "unauthorized"
    assert info.value.close_code == 4401
    return info.value.message


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(secret=SECRET)


# --- Secret ------------------------------------------------------------------------------------


def test_secret_never_shows_itself() -> None:
    secret = Secret("hunter2-but-much-longer-than-that")
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", format(secret)):
        assert "hunter2" not in shown
    assert "hunter2" not in repr([secret, {"k": secret}])
    assert secret.reveal() == "hunter2-but-much-longer-than-that"


def test_secret_equality_compares_values() -> None:
    assert Secret("a" * 40) == Secret("a" * 40)
    assert Secret("a" * 40) != Secret("b" * 40)
    assert len({Secret("a" * 40), Secret("a" * 40)}) == 1


# --- minting and the happy path ----------------------------------------------------------------


def test_round_trip_hs256(verifier: TokenVerifier) -> None:
    token = mint_token(
        SECRET,
        sub="alice",
        roles=["publisher", "worker"],
        publish=["reports/**"],
        subscribe=["reports/*", "jobs/**"],
        queues=["reports"],
        ttl=60,
        now=NOW,
        jti="abc",
    )
    claims = verifier.verify(token, now=NOW + 1)
    assert claims == Claims(
        sub="alice",
        roles=frozenset({"publisher", "worker"}),
        publish=("reports/**",),
        subscribe=("reports/*", "jobs/**"),
        queues=("reports",),
        exp=NOW + 60,
        iat=NOW,
        jti="abc",
    )


def test_mint_includes_only_given_claims() -> None:
    payload = decode_payload(mint_token(SECRET, sub="bob", now=NOW))
    assert set(payload) == {"sub", "iat", "exp", "jti", "roles"}
    assert payload["roles"] == []
    assert payload["iat"] == NOW and payload["exp"] == NOW + 3600
    assert len(payload["jti"]) == 32 and int(payload["jti"], 16) >= 0

    payload = decode_payload(mint_token(SECRET, sub="bob", queues=[], ttl=None, now=NOW))
    assert "exp" not in payload
    assert payload["queues"] == []


def test_mint_uses_fresh_jti_each_time() -> None:
    first = decode_payload(mint_token(SECRET, sub="x"))["jti"]
    second = decode_payload(mint_token(SECRET, sub="x"))["jti"]
    assert first != second


def test_mint_accepts_plain_string_key(verifier: TokenVerifier) -> None:
    token = mint_token(SECRET.reveal(), sub="s", now=NOW)
    assert verifier.verify(token, now=NOW).sub == "s"


def test_token_without_exp_never_expires(verifier: TokenVerifier) -> None:
    token = mint_token(SECRET, sub="forever", ttl=None, now=NOW)
    claims = verifier.verify(token, now=NOW + 10 * 365 * 86400)
    assert claims.exp is None


def test_absent_claims_have_empty_defaults(verifier: TokenVerifier) -> None:
    claims = verifier.verify(hs256_token({}), now=NOW)
    assert claims == Claims(
        sub=None,
        roles=frozenset(),
        publish=(),
        subscribe=(),
        queues=None,
        exp=None,
        iat=None,
        jti=None,
    )


def test_unknown_claims_are_ignored(verifier: TokenVerifier) -> None:
    claims = verifier.verify(hs256_token({"sub": "a", "aud": "x", "custom": [1]}), now=NOW)
    assert claims.sub == "a"


def test_every_role_is_accepted(verifier: TokenVerifier) -> None:
    token = mint_token(SECRET, sub="all", roles=ROLES, now=NOW)
    assert verifier.verify(token, now=NOW).roles == frozenset(ROLES)


def test_hs384_when_configured() -> None:
    long_secret = Secret("k" * 48)
    token = mint_token(long_secret, sub="h", algorithm="HS384", now=NOW)
    both = TokenVerifier(secret=long_secret, algorithms=("HS256", "HS384"))
    assert both.verify(token, now=NOW).sub == "h"
    only256 = TokenVerifier(secret=long_secret)
    assert "not allowed" in refused(only256, token)


# --- refusals ----------------------------------------------------------------------------------


def alg_none_token(alg: str = "none") -> str:
    head = b64json({"alg": alg, "typ": "JWT"})
    body = b64json({"sub": "mallory", "roles": ["admin"]})
    return f"{head}.{body}."


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused(verifier: TokenVerifier, alg: str) -> None:
    assert "alg 'none'" in refused(verifier, alg_none_token(alg))


def test_alg_none_is_refused_even_when_configured() -> None:
    lax = TokenVerifier(secret=SECRET, algorithms=("HS256", "none"))
    assert lax.algorithms == ("HS256",)
    assert "alg 'none'" in refused(lax, alg_none_token())
    # A signature part does not help either.
    assert "alg 'none'" in refused(lax, alg_none_token() + "AAAA")


def test_only_none_configured_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        TokenVerifier(secret=SECRET, algorithms=("none",))


def test_wrong_secret_is_refused(verifier: TokenVerifier) -> None:
    token = mint_token(OTHER_SECRET, sub="a", now=NOW)
    assert refused(verifier, token) == "token signature is invalid"


def test_tampered_payload_is_refused(verifier: TokenVerifier) -> None:
    token = mint_token(SECRET, sub="a", roles=["subscriber"], now=NOW)
    head, _, sig = token.split(".")
    forged = f"{head}.{b64json({'sub': 'a', 'roles': ['admin']})}.{sig}"
    assert refused(verifier, forged) == "token signature is invalid"


def test_empty_signature_is_refused(verifier: TokenVerifier) -> None:
    token = mint_token(SECRET, sub="a", now=NOW)
    assert refused(verifier, token.rsplit(".", 1)[0] + ".") == "token signature is invalid"


def test_expired(verifier: TokenVerifier) -> None:
    token = mint_token(SECRET, sub="a", ttl=60, now=NOW)
    assert verifier.verify(token, now=NOW + 59).sub == "a"
    # RFC 7519: refused on or after exp.
    assert refused(verifier, token, now=NOW + 60) == "token expired"
    assert refused(verifier, token, now=NOW + 3600) == "token expired"


def test_leeway_tolerates_clock_skew() -> None:
    lenient = TokenVerifier(secret=SECRET, leeway=30)
    token = mint_token(SECRET, sub="a", ttl=60, now=NOW)
    assert lenient.verify(token, now=NOW + 89).sub == "a"
    assert refused(lenient, token, now=NOW + 90) == "token expired"
    early = hs256_token({"sub": "a", "nbf": NOW + 20})
    assert lenient.verify(early, now=NOW).sub == "a"
    assert "not yet valid" in refused(lenient, early, now=NOW - 11)


def test_nbf_in_future_is_refused(verifier: TokenVerifier) -> None:
    token = hs256_token({"sub": "a", "nbf": NOW + 10, "exp": NOW + 100})
    assert refused(verifier, token) == "token not yet valid (nbf is in the future)"
    assert verifier.verify(token, now=NOW + 10).sub == "a"


def test_iat_in_future_is_refused(verifier: TokenVerifier) -> None:
    token = mint_token(SECRET, sub="a", now=NOW + 300)
    assert refused(verifier, token) == "token not yet valid (iat is in the future)"
    assert verifier.verify(token, now=NOW + 300).sub == "a"


def test_revoked_jti_is_refused() -> None:
    revoked = RevocationList()
    verifier = TokenVerifier(secret=SECRET, revoked=revoked)
    token = mint_token(SECRET, sub="a", jti="j-1", ttl=60, now=NOW)
    assert verifier.verify(token, now=NOW).jti == "j-1"
    revoked.add("j-1", NOW + 60)
    assert refused(verifier, token) == "token has been revoked"
    # Once past exp the token is refused as expired, revoked or not.
    assert refused(verifier, token, now=NOW + 61) == "token expired"
    revoked.discard("j-1")
    assert verifier.verify(token, now=NOW).jti == "j-1"


def test_revocation_does_not_touch_other_tokens() -> None:
    verifier = TokenVerifier(secret=SECRET, revoked=RevocationList({"other": None}))
    token = mint_token(SECRET, sub="a", jti="mine", now=NOW)
    assert verifier.verify(token, now=NOW).jti == "mine"
    assert "other" in verifier.revoked


def test_algorithm_not_allowed(verifier: TokenVerifier) -> None:
    token = hs256_token({"sub": "a"}, header={"alg": "HS512", "typ": "JWT"})
    message = refused(verifier, token)
    assert "'HS512' is not allowed" in message and "HS256" in message


GARBAGE = [
    "",
    " ",
    "abc",
    "a.b",
    "a.b.c",
    "a.b.c.d",
    "...",
    "eyJ.eyJ.",
    "Bearer x.y.z",
    "!!!!.!!!!.!!!!",
    b64json([1, 2]) + "." + b64json({}) + ".",
    b64url(b"not json") + "." + b64json({}) + ".",
    b64json({"typ": "JWT"}) + "." + b64json({}) + ".",
    b64json({"alg": 256}) + "." + b64json({}) + ".",
    "é." + b64json({}) + ".x",
    "x" * 20_000,
]


@pytest.mark.parametrize("token", GARBAGE)
def test_garbage_is_refused_as_malformed(verifier: TokenVerifier, token: str) -> None:
    message = refused(verifier, token)
    assert message.startswith("malformed token")


@pytest.mark.parametrize("token", ["é.a.b", "\ud800.a.b", "a.b.\xa0", "a\u2024b\u2024c"])
def test_non_ascii_is_refused(verifier: TokenVerifier, token: str) -> None:
    assert refused(verifier, token) == "malformed token: a JWT is ASCII only"


@pytest.mark.parametrize("token", [None, b"a.b.c", 42, ["a", "b"]])
def test_non_string_is_refused(verifier: TokenVerifier, token: object) -> None:
    assert refused(verifier, token) == "malformed token: a token must be a string"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("W10", "not a JSON object"),  # []
        (b64url(b"{not json"), "not JSON"),
        (b64url(b"\xff\xfe"), "not JSON"),
        (b64url(b"[" * 10_000), "malformed token"),
    ],
)
def test_signed_payload_must_be_a_json_object(
    verifier: TokenVerifier, payload: str, expected: str
) -> None:
    assert expected in refused(verifier, hs256_token(payload))


def test_unsupported_critical_header_is_refused(verifier: TokenVerifier) -> None:
    token = hs256_token({"sub": "a"}, header={"alg": "HS256", "crit": ["exp"], "exp": 1})
    assert refused(verifier, token).startswith("malformed token")


def test_unencoded_payload_header_is_refused(verifier: TokenVerifier) -> None:
    token = hs256_token({"sub": "a"}, header={"alg": "HS256", "b64": True})
    assert refused(verifier, token).startswith("malformed token")


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("exp", "1700000100"),
        ("exp", 1700000100.5),
        ("exp", True),
        ("exp", [1700000100]),
        ("iat", "now"),
        ("iat", 1.5),
        ("nbf", 1.5),
        ("nbf", False),
    ],
)
def test_times_must_be_integers(verifier: TokenVerifier, claim: str, value: object) -> None:
    token = hs256_token({"sub": "a", claim: value})
    assert refused(verifier, token) == f"token claim {claim!r} must be an integer (unix seconds)"


def test_null_exp_counts_as_absent(verifier: TokenVerifier) -> None:
    assert verifier.verify(hs256_token({"exp": None}), now=NOW).exp is None


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"roles": ["root"]}, "token claim 'roles' has unknown role 'root'"),
        ({"roles": ["admin", "Admin"]}, "unknown role 'Admin'"),
        ({"roles": "admin"}, "token claim 'roles' must be a list of strings"),
        ({"roles": [1]}, "token claim 'roles' must be a list of strings"),
        ({"publish": ["a/**/b"]}, "token claim 'publish' has an invalid pattern"),
        ({"publish": [""]}, "token claim 'publish' has an invalid pattern"),
        ({"publish": "a/b"}, "token claim 'publish' must be a list of strings"),
        ({"subscribe": ["a//b"]}, "token claim 'subscribe' has an invalid pattern"),
        ({"subscribe": [None]}, "token claim 'subscribe' must be a list of strings"),
        ({"queues": [""]}, "token claim 'queues' has an invalid queue name"),
        ({"queues": ["q" * 129]}, "token claim 'queues' has an invalid queue name"),
        ({"queues": "reports"}, "token claim 'queues' must be a list of strings"),
        ({"sub": 7}, "token claim 'sub' must be a string"),
        ({"jti": 7}, "token claim 'jti' must be a string"),
    ],
)
def test_invalid_claims_are_refused(
    verifier: TokenVerifier, payload: dict[str, Any], expected: str
) -> None:
    assert expected in refused(verifier, hs256_token(payload))


def test_duplicate_patterns_are_collapsed(verifier: TokenVerifier) -> None:
    claims = verifier.verify(hs256_token({"publish": ["a", "b", "a"], "queues": ["q", "q"]}))
    assert claims.publish == ("a", "b")
    assert claims.queues == ("q",)


# --- configuration errors ----------------------------------------------------------------------


@pytest.mark.parametrize("short", ["", "short", "x" * 31])
def test_short_hmac_secret_is_a_usage_error(short: str) -> None:
    with pytest.raises(UsageError, match="RFC 7518"):
        TokenVerifier(secret=Secret(short))
    with pytest.raises(UsageError, match="RFC 7518"):
        mint_token(Secret(short), sub="a")


def test_secret_of_exactly_the_minimum_length_works() -> None:
    key = Secret("x" * 32)
    assert TokenVerifier(secret=key).verify(mint_token(key, sub="a")).sub == "a"


def test_verifier_needs_a_key_for_each_algorithm() -> None:
    with pytest.raises(UsageError, match="needs a secret"):
        TokenVerifier()
    with pytest.raises(UsageError, match="needs a PEM public key"):
        TokenVerifier(secret=SECRET, algorithms=("HS256", "RS256"))
    with pytest.raises(UsageError, match="unsupported"):
        TokenVerifier(secret=SECRET, algorithms=("HS257",))
    with pytest.raises(UsageError, match="sequence"):
        TokenVerifier(secret=SECRET, algorithms="HS256")
    with pytest.raises(UsageError, match="leeway"):
        TokenVerifier(secret=SECRET, leeway=-1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"roles": ["root"]}, "unknown role"),
        ({"roles": "admin"}, "not single strings"),
        ({"publish": ["a/**/b"]}, "publish"),
        ({"subscribe": ["a//b"]}, "subscribe"),
        ({"queues": [""]}, "invalid queue name"),
        ({"queues": "reports"}, "not one string"),
        ({"algorithm": "none"}, "never allowed"),
        ({"algorithm": "HS1"}, "unsupported"),
        ({"ttl": float("inf")}, "finite"),
    ],
)
def test_mint_usage_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        mint_token(SECRET, sub="a", **kwargs)


# --- RS256 and ES256 ---------------------------------------------------------------------------


def pem_private(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def pem_public(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_rs256_round_trip(rsa_key: rsa.RSAPrivateKey) -> None:
    token = mint_token(pem_private(rsa_key), sub="r", roles=["worker"], algorithm="RS256", now=NOW)
    verifier = TokenVerifier(public_key=pem_public(rsa_key), algorithms=("RS256",))
    claims = verifier.verify(token, now=NOW)
    assert claims.sub == "r" and claims.roles == {"worker"}
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = mint_token(pem_private(other), sub="r", algorithm="RS256", now=NOW)
    assert refused(verifier, forged) == "token signature is invalid"


def test_es256_round_trip(ec_key: ec.EllipticCurvePrivateKey) -> None:
    token = mint_token(
        Secret(pem_private(ec_key)), sub="e", subscribe=["a/*"], algorithm="ES256", now=NOW
    )
    verifier = TokenVerifier(public_key=pem_public(ec_key), algorithms=("ES256",))
    assert verifier.verify(token, now=NOW).subscribe == ("a/*",)
    head, body, sig = token.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    assert refused(verifier, f"{head}.{body}.{flipped}") == "token signature is invalid"
    assert refused(verifier, f"{head}.{body}.{b64url(b'short')}") == "token signature is invalid"


def test_mixed_hmac_and_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(
        secret=SECRET, public_key=pem_public(rsa_key), algorithms=("HS256", "RS256")
    )
    rs = mint_token(pem_private(rsa_key), sub="rs", algorithm="RS256", now=NOW)
    hs = mint_token(SECRET, sub="hs", now=NOW)
    assert verifier.verify(rs, now=NOW).sub == "rs"
    assert verifier.verify(hs, now=NOW).sub == "hs"


def test_public_key_used_as_hmac_secret_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    """The classic algorithm-confusion attack: sign HS256 with the public key's PEM text."""
    public = pem_public(rsa_key)
    verifier = TokenVerifier(public_key=public, algorithms=("RS256",))
    forged = hs256_token({"sub": "mallory", "roles": ["admin"]}, secret=Secret(public))
    assert "'HS256' is not allowed" in refused(verifier, forged)
    with pytest.raises(UsageError, match="not usable"):
        TokenVerifier(secret=Secret(public))


def test_public_key_configuration_errors(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(UsageError, match="no RS/PS/ES algorithm"):
        TokenVerifier(secret=SECRET, public_key=pem_public(rsa_key))
    with pytest.raises(UsageError, match="not a PEM public key"):
        TokenVerifier(public_key=pem_private(rsa_key), algorithms=("RS256",))
    with pytest.raises(UsageError, match="not a PEM public key"):
        TokenVerifier(public_key="hello", algorithms=("RS256",))
    with pytest.raises(UsageError, match="not usable for RS256"):
        TokenVerifier(public_key=pem_public(ec_key), algorithms=("RS256",))
    with pytest.raises(UsageError, match="not usable for ES384"):
        TokenVerifier(public_key=pem_public(ec_key), algorithms=("ES384",))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(UsageError, match="too weak"):
        TokenVerifier(public_key=pem_public(small), algorithms=("RS256",))
    with pytest.raises(UsageError, match="private key"):
        mint_token(pem_public(rsa_key), sub="a", algorithm="RS256")
    with pytest.raises(UsageError, match="not usable for ES256"):
        mint_token(pem_private(rsa_key), sub="a", algorithm="ES256")


# --- revocation list ---------------------------------------------------------------------------


def test_revocation_list_purge() -> None:
    revoked = RevocationList()
    revoked.add("old", NOW - 1)
    revoked.add("edge", NOW)
    revoked.add("new", NOW + 1)
    revoked.add("forever", None)
    assert len(revoked) == 4 and "old" in revoked
    assert revoked.purge(NOW) == 2
    assert sorted(jti for jti, _ in revoked.items()) == ["forever", "new"]
    assert "old" not in revoked and "edge" not in revoked
    assert revoked.purge(NOW + 10**9) == 1
    assert list(revoked.items()) == [("forever", None)]


def test_revocation_purge_keeps_entries_within_leeway() -> None:
    verifier = TokenVerifier(secret=SECRET, leeway=30)
    token = mint_token(SECRET, sub="a", jti="j", ttl=60, now=NOW)
    verifier.revoked.add("j", NOW + 60)
    # Still acceptable by exp + leeway, so the revocation must survive a purge.
    assert verifier.purge_revoked(now=NOW + 70) == 0
    assert refused(verifier, token, now=NOW + 70) == "token has been revoked"
    assert verifier.purge_revoked(now=NOW + 90) == 1
    assert refused(verifier, token, now=NOW + 90) == "token expired"


def test_revocation_list_refuses_empty_jti() -> None:
    with pytest.raises(UsageError):
        RevocationList().add("", None)


# --- secrets on disk and in the environment ----------------------------------------------------


def test_load_or_create_secret(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    old_umask = os.umask(0)
    try:
        secret, created = load_or_create_secret(data_dir)
    finally:
        os.umask(old_umask)
    assert created
    path = data_dir / "secret"
    # With umask 0 a default open() would give 0o666: the 0600 comes from os.open's mode.
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.urlsafe_b64decode(secret.reveal())) == 32
    assert path.read_text().strip() == secret.reveal()

    again, created_again = load_or_create_secret(data_dir)
    assert not created_again
    assert again == secret
    # The secret is strong enough to sign with.
    assert TokenVerifier(secret=again).verify(mint_token(secret, sub="a")).sub == "a"


def test_load_or_create_secret_gives_different_secrets(tmp_path: Path) -> None:
    first, _ = load_or_create_secret(tmp_path / "one")
    second, _ = load_or_create_secret(tmp_path / "two")
    assert first != second


def test_load_secret_written_by_hand(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("  my-own-secret-that-is-long-enough-32b \n")
    secret, created = load_or_create_secret(tmp_path)
    assert not created
    assert secret.reveal() == "my-own-secret-that-is-long-enough-32b"


def test_empty_secret_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("\n")
    with pytest.raises(UsageError, match="empty"):
        load_or_create_secret(tmp_path)


def test_secret_from_env() -> None:
    assert secret_from_env({}) is None
    assert secret_from_env({"QUICKSILVER_SECRET": "   "}) is None
    found = secret_from_env({"QUICKSILVER_SECRET": "from-the-environment", "OTHER": "x"})
    assert found is not None and found.reveal() == "from-the-environment"


# --- properties --------------------------------------------------------------------------------

_B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_="
_VERIFIER = TokenVerifier(secret=SECRET)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_verify_random_text_only_raises_unauthorized(token: str) -> None:
    with pytest.raises(Unauthorized):
        _VERIFIER.verify(token)


@settings(max_examples=400)
@given(st.lists(st.text(alphabet=_B64_CHARS, max_size=60), min_size=1, max_size=5))
def test_verify_random_jwt_shaped_strings_only_raises_unauthorized(parts: list[str]) -> None:
    with pytest.raises(Unauthorized):
        _VERIFIER.verify(".".join(parts))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_claim_names = st.sampled_from(
    ["sub", "exp", "iat", "nbf", "jti", "roles", "publish", "subscribe", "queues", "x"]
)


@settings(max_examples=300)
@given(st.dictionaries(_claim_names, _json | st.lists(st.sampled_from([*ROLES, "a/*", ""]))))
def test_verify_signed_random_payloads_returns_claims_or_raises_unauthorized(
    payload: dict[str, Any],
) -> None:
    token = hs256_token(payload)
    try:
        claims = _VERIFIER.verify(token, now=NOW)
    except Unauthorized:
        return
    assert isinstance(claims, Claims)
    assert claims.roles <= set(ROLES)
