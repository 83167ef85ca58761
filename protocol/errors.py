"""The protocol's exception tree.

Every failure a peer can cause maps to exactly one error code (sent in an ``error`` frame) and,
where the failure ends the connection, one WebSocket close code::

    QuicksilverError
    ├── UsageError                  you called the API wrongly (a bug in the caller, never sent)
    └── ProtocolError               the peer's request cannot be served; sent as an ``error`` frame
        ├── BadRequest              bad_request   (undecodable frame, unknown type, bad field)
        ├── Unauthorized            unauthorized  close 4401
        ├── Forbidden               forbidden
        ├── NotFound                not_found
        ├── Conflict                conflict
        ├── TooLarge                too_large     close 1009
        ├── RateLimited             rate_limited
        ├── Unavailable             unavailable
        └── InternalError           internal
"""

from __future__ import annotations

from typing import ClassVar, Literal

ErrorCode = Literal[
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "too_large",
    "rate_limited",
    "unavailable",
    "internal",
]

ERROR_CODES: tuple[ErrorCode, ...] = (
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

# WebSocket close codes used by the broker (RFC 6455 section 7.4 plus the 4000-4999 private range).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_TOO_LARGE = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_UNAUTHORIZED = 4401

# The HTTP status that goes with each code, for the HTTP API.
HTTP_STATUS: dict[ErrorCode, int] = {
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


class QuicksilverError(Exception):
    """Root of every exception this project raises on purpose."""


class UsageError(QuicksilverError):
    """The API was called wrongly: a bug in the calling code, never the peer's fault."""


class ProtocolError(QuicksilverError):
    """A request from the peer that cannot be served.

    ``code`` goes into the ``error`` frame; ``close_code`` is not None when the failure ends the
    connection.
    """

    code: ClassVar[ErrorCode] = "internal"
    close_code: ClassVar[int | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ProtocolError):
    code = "bad_request"


class Unauthorized(ProtocolError):
    code = "unauthorized"
    close_code = CLOSE_UNAUTHORIZED


class Forbidden(ProtocolError):
    code = "forbidden"


class NotFound(ProtocolError):
    code = "not_found"


class Conflict(ProtocolError):
    code = "conflict"


class TooLarge(ProtocolError):
    code = "too_large"
    close_code = CLOSE_TOO_LARGE


class RateLimited(ProtocolError):
    code = "rate_limited"


class Unavailable(ProtocolError):
    code = "unavailable"


class InternalError(ProtocolError):
    code = "internal"


_BY_CODE: dict[str, type[ProtocolError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        TooLarge,
        RateLimited,
        Unavailable,
        InternalError,
    )
}


def error_for_code(code: str, message: str) -> ProtocolError:
    """The exception that stands for an ``error`` frame's code (unknown codes become internal)."""
    return _BY_CODE.get(code, InternalError)(message)
