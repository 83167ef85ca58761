"""The exception tree: one error code per class, close codes, HTTP statuses, code round trips."""

from __future__ import annotations

import typing

import pytest

from protocol import errors
from protocol.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TOO_LARGE,
    CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNAUTHORIZED,
    ERROR_CODES,
    HTTP_STATUS,
    BadRequest,
    Conflict,
    ErrorCode,
    Forbidden,
    InternalError,
    NotFound,
    ProtocolError,
    QuicksilverError,
    RateLimited,
    TooLarge,
    Unauthorized,
    Unavailable,
    UsageError,
    error_for_code,
)

# The codes of the wire contract, in its order.
CONTRACT_CODES = (
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "too_large",
    "rate_limited",
    "unavailable",
    "internal",
)

CLASSES: dict[str, type[ProtocolError]] = {
    "bad_request": BadRequest,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "conflict": Conflict,
    "too_large": TooLarge,
    "rate_limited": RateLimited,
    "unavailable": Unavailable,
    "internal": InternalError,
}


def test_error_codes_are_the_contract_codes() -> None:
    assert ERROR_CODES == CONTRACT_CODES
    assert set(typing.get_args(ErrorCode)) == set(CONTRACT_CODES)


@pytest.mark.parametrize(("code", "cls"), CLASSES.items())
def test_each_class_has_its_code(code: str, cls: type[ProtocolError]) -> None:
    assert cls.code == code
    exc = cls("a human sentence")
    assert exc.code == code
    assert exc.message == "a human sentence"
    assert str(exc) == "a human sentence"
    assert isinstance(exc, ProtocolError)
    assert isinstance(exc, QuicksilverError)


def test_every_protocol_error_subclass_is_listed() -> None:
    found = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, ProtocolError) and obj is not ProtocolError
    }
    assert found == set(CLASSES.values())
    assert len({cls.code for cls in found}) == len(found)


@pytest.mark.parametrize(
    ("cls", "close_code"),
    [
        (BadRequest, None),
        (Unauthorized, 4401),
        (Forbidden, None),
        (NotFound, None),
        (Conflict, None),
        (TooLarge, 1009),
        (RateLimited, None),
        (Unavailable, None),
        (InternalError, None),
    ],
)
def test_close_codes(cls: type[ProtocolError], close_code: int | None) -> None:
    assert cls.close_code == close_code
    assert cls("x").close_code == close_code


def test_close_code_constants() -> None:
    assert (
        CLOSE_NORMAL,
        CLOSE_GOING_AWAY,
        CLOSE_POLICY,
        CLOSE_TOO_LARGE,
        CLOSE_INTERNAL,
        CLOSE_TRY_AGAIN_LATER,
        CLOSE_UNAUTHORIZED,
    ) == (1000, 1001, 1008, 1009, 1011, 1013, 4401)


def test_http_status_covers_every_code() -> None:
    assert set(HTTP_STATUS) == set(ERROR_CODES)
    assert HTTP_STATUS == {
        "bad_request": 400,
        "unauthorized": 401,
        "forbidden": 403,
        "not_found": 404,
        "conflict": 409,
        "too_large": 413,
        "rate_limited": 429,
        "unavailable": 503,
        "internal": 500,
    }


@pytest.mark.parametrize("code", CONTRACT_CODES)
def test_error_for_code_round_trip(code: str) -> None:
    exc = error_for_code(code, "said by the peer")
    assert type(exc) is CLASSES[code]
    assert exc.code == code
    assert exc.message == "said by the peer"
    assert type(error_for_code(exc.code, exc.message)) is type(exc)


@pytest.mark.parametrize("code", ["", "BAD_REQUEST", "teapot", "ok", "error"])
def test_unknown_codes_become_internal(code: str) -> None:
    exc = error_for_code(code, "odd")
    assert type(exc) is InternalError
    assert exc.message == "odd"


def test_usage_errors_are_not_protocol_errors() -> None:
    # A bug in the caller must never be sent to a peer as if the peer had erred.
    assert issubclass(UsageError, QuicksilverError)
    assert not issubclass(UsageError, ProtocolError)
    assert not issubclass(ProtocolError, UsageError)


def test_protocol_errors_can_be_caught_by_class() -> None:
    with pytest.raises(ProtocolError) as info:
        raise Forbidden("no")
    assert info.value.code == "forbidden"
    assert info.value.close_code is None
