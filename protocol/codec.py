"""Encode and decode frames for the two subprotocols. Pure functions, no I/O.

``quicksilver.v1.json`` carries one JSON object per text frame; ``quicksilver.v1.msgpack`` one
msgpack map per binary frame, with the same keys. Decoding validates every field and raises
:class:`protocol.errors.BadRequest` (and nothing else) on any malformed input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import msgpack

from .errors import BadRequest
from .frames import (
    Auth,
    Cancel,
    CancelJob,
    ClientFrame,
    Done,
    Enqueue,
    Error,
    Fail,
    Frame,
    Heartbeat,
    Job,
    JobId,
    Message,
    Ok,
    Ping,
    Pong,
    Progress,
    Publish,
    Refresh,
    RequestId,
    ServerFrame,
    Since,
    Stats,
    Subscribe,
    Unsubscribe,
    Welcome,
    Work,
)

Encoding = Literal["json", "msgpack"]
SUBPROTOCOL_JSON = "quicksilver.v1.json"
SUBPROTOCOL_MSGPACK = "quicksilver.v1.msgpack"
SUBPROTOCOLS: dict[str, Encoding] = {SUBPROTOCOL_JSON: "json", SUBPROTOCOL_MSGPACK: "msgpack"}

_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _no_constant(name: str) -> Any:
    raise BadRequest(f"frame is not valid json: {name} is not a JSON number")


_json_decoder = json.JSONDecoder(parse_constant=_no_constant)
MAX_QUEUE_NAME = 128
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


# --- values <-> bytes ---------------------------------------------------------------------------


def dumps(obj: Any, encoding: Encoding) -> bytes:
    """Serialise a plain value. Raises :class:`BadRequest` when it cannot be represented."""
    try:
        if encoding == "json":
            return _json_encoder.encode(obj).encode("utf-8")
        return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"value cannot be encoded as {encoding}: {exc}") from None


def loads(raw: bytes | str, encoding: Encoding) -> Any:
    """Parse bytes into a plain value. Raises :class:`BadRequest` on malformed input."""
    try:
        if encoding == "json":
            text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
            value = _json_decoder.decode(text)
            if "\\u" in text:
                # A \uD800-style escape decodes to a lone surrogate that no UTF-8 encoder can
                # send on (to JSON or msgpack clients); re-encoding finds one anywhere in the value.
                _json_encoder.encode(value).encode("utf-8")
            return value
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except BadRequest:
        raise
    except Exception as exc:
        # msgpack raises a zoo of exception types on garbage; all mean the same thing here.
        raise BadRequest(f"frame is not valid {encoding}: {type(exc).__name__}") from None


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("data holds a lone surrogate, which UTF-8 cannot carry") from None


def check_portable(value: Any, depth: int = 0) -> None:
    """Raise :class:`BadRequest` unless ``value`` encodes identically in JSON and msgpack.

    Published data reaches JSON and msgpack subscribers alike, so it is held to the common
    subset: null, booleans, integers within 64 bits, finite floats, strings, lists and string-keyed
    maps.
    """
    if depth > 64:
        raise BadRequest("data is nested too deeply (more than 64 levels)")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _check_text(value)
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise BadRequest("integer in data is outside the 64-bit range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadRequest("data holds a non-finite number")
        return
    if isinstance(value, list | tuple):
        for item in value:
            check_portable(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise BadRequest("map keys in data must be strings")
            _check_text(key)
            check_portable(item, depth + 1)
        return
    raise BadRequest(f"data holds a value of type {type(value).__name__} that JSON cannot carry")


# --- field readers ------------------------------------------------------------------------------


def _req_id(d: Mapping[str, Any], required: bool = True) -> RequestId:
    if "id" not in d:
        if required:
            raise BadRequest("request has no 'id'")
        return None
    value = d["id"]
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRequest("'id' must be a string or an integer")
    if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
        raise BadRequest("'id' must be an integer within 64 bits")
    if isinstance(value, str) and len(value) > 128:
        raise BadRequest("'id' is longer than 128 characters")
    return value


def _str(d: Mapping[str, Any], key: str, *, optional: bool = False) -> Any:
    value = d.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string")
    return value


def _int(d: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = d.get(key, default)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{key}' must be an integer")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise BadRequest(f"'{key}' must be an integer within 64 bits")
    return value


def _num(d: Mapping[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{key}' must be a number")
    try:
        number = float(value)
    except OverflowError:
        raise BadRequest(f"'{key}' must be a finite number") from None
    if not math.isfinite(number):
        raise BadRequest(f"'{key}' must be a finite number")
    return number


def _bool(d: Mapping[str, Any], key: str, default: bool) -> bool:
    value = d.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"'{key}' must be true or false")
    return value


def _queue(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_QUEUE_NAME:
        raise BadRequest(f"queue name must be a string of 1 to {MAX_QUEUE_NAME} characters")
    return value


def _job_id(d: Mapping[str, Any]) -> JobId:
    value = d.get("job")
    if not isinstance(value, str) or not value or len(value) > 64:
        raise BadRequest("'job' must be a job id string")
    return JobId(value)


def _since(d: Mapping[str, Any]) -> Since | None:
    value = d.get("since")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("'since' must be an object with 'offset' and 'epoch'")
    offset = _int(value, "offset")
    if offset < 0:
        raise BadRequest("'since.offset' must not be negative")
    return Since(offset=offset, epoch=_str(value, "epoch"))


# --- client frames ------------------------------------------------------------------------------


def _enqueue(d: Mapping[str, Any]) -> Enqueue:
    max_attempts = _int(d, "max_attempts", 5)
    if not 1 <= max_attempts <= 1000:
        raise BadRequest("'max_attempts' must be between 1 and 1000")
    delay = _num(d, "delay", 0.0)
    if delay < 0:
        raise BadRequest("'delay' must not be negative")
    unique_key = _str(d, "unique_key", optional=True)
    if unique_key is not None and len(unique_key) > 255:
        raise BadRequest("'unique_key' is longer than 255 characters")
    priority = _int(d, "priority", 0)
    if not -(2**31) <= priority < 2**31:
        raise BadRequest("'priority' must fit in 32 bits")
    payload = d.get("payload")
    check_portable(payload)
    return Enqueue(
        id=_req_id(d),
        queue=_queue(d.get("queue")),
        payload=payload,
        priority=priority,
        delay=delay,
        unique_key=unique_key,
        max_attempts=max_attempts,
    )


def _work(d: Mapping[str, Any]) -> Work:
    queues = d.get("queues")
    if not isinstance(queues, list) or not queues or len(queues) > 100:
        raise BadRequest("'queues' must be a list of 1 to 100 queue names")
    concurrency = _int(d, "concurrency", 1)
    if not 0 <= concurrency <= 10_000:
        raise BadRequest("'concurrency' must be between 0 and 10000")
    return Work(id=_req_id(d), queues=tuple(_queue(q) for q in queues), concurrency=concurrency)


def _publish(d: Mapping[str, Any]) -> Publish:
    data = d.get("data")
    check_portable(data)
    return Publish(id=_req_id(d), topic=_str(d, "topic"), data=data)


def _attempt(d: Mapping[str, Any]) -> int:
    attempt = _int(d, "attempt")
    if attempt < 1:
        raise BadRequest("'attempt' must be a positive integer")
    return attempt


def _progress(d: Mapping[str, Any]) -> Progress:
    data = d.get("data")
    check_portable(data)  # published on jobs/<id>
    return Progress(job=_job_id(d), attempt=_attempt(d), data=data)


def _done(d: Mapping[str, Any]) -> Done:
    result = d.get("result")
    check_portable(result)  # published on jobs/<id> and served by the HTTP API
    return Done(id=_req_id(d), job=_job_id(d), attempt=_attempt(d), result=result)


_CLIENT: dict[str, Callable[[Mapping[str, Any]], ClientFrame]] = {
    "auth": lambda d: Auth(token=_str(d, "token", optional=True), id=_req_id(d, False)),
    "refresh": lambda d: Refresh(id=_req_id(d), token=_str(d, "token")),
    "ping": lambda d: Ping(id=_req_id(d, False)),
    "subscribe": lambda d: Subscribe(id=_req_id(d), topic=_str(d, "topic"), since=_since(d)),
    "unsubscribe": lambda d: Unsubscribe(id=_req_id(d), topic=_str(d, "topic")),
    "publish": _publish,
    "enqueue": _enqueue,
    "work": _work,
    "progress": _progress,
    "heartbeat": lambda d: Heartbeat(),
    "done": _done,
    "fail": lambda d: Fail(
        id=_req_id(d),
        job=_job_id(d),
        attempt=_attempt(d),
        error=_str(d, "error", optional=True) or "",
        retry=_bool(d, "retry", True),
    ),
    "cancel": lambda d: CancelJob(id=_req_id(d), job=_job_id(d)),
    "stats": lambda d: Stats(id=_req_id(d)),
}


def _server_ok(d: Mapping[str, Any]) -> Ok:
    return Ok(id=_req_id(d, False), fields={k: v for k, v in d.items() if k not in ("type", "id")})


def _welcome(d: Mapping[str, Any]) -> Welcome:
    roles = d.get("roles") or []
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise BadRequest("'roles' must be a list of strings")
    expires = d.get("expires_at")
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int)):
        raise BadRequest("'expires_at' must be an integer or null")
    return Welcome(
        session=_str(d, "session"),
        sub=_str(d, "sub", optional=True),
        roles=tuple(roles),
        expires_at=expires,
        server=_str(d, "server"),
    )


_SERVER: dict[str, Callable[[Mapping[str, Any]], ServerFrame]] = {
    "welcome": _welcome,
    "ok": _server_ok,
    "error": lambda d: Error(
        id=_req_id(d, False), code=_str(d, "code"), message=_str(d, "message")
    ),
    "pong": lambda d: Pong(id=_req_id(d, False)),
    "message": lambda d: Message(
        topic=_str(d, "topic"),
        offset=_int(d, "offset"),
        epoch=_str(d, "epoch"),
        ts=_num(d, "ts", 0.0),
        data=d.get("data"),
    ),
    "job": lambda d: Job(
        job=_job_id(d),
        queue=_queue(d.get("queue")),
        attempt=_attempt(d),
        payload=d.get("payload"),
        lease=_num(d, "lease", 0.0),
    ),
    "cancel": lambda d: Cancel(job=_job_id(d)),
}


def _frame_type(obj: Any) -> str:
    if not isinstance(obj, dict):
        raise BadRequest("a frame must be an object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise BadRequest("frame has no 'type'")
    return kind


def client_frame_from_dict(obj: Any) -> ClientFrame:
    kind = _frame_type(obj)
    parser = _CLIENT.get(kind)
    if parser is None:
        raise BadRequest(f"unknown frame type {kind!r}")
    return parser(obj)


def server_frame_from_dict(obj: Any) -> ServerFrame:
    kind = _frame_type(obj)
    parser = _SERVER.get(kind)
    if parser is None:
        raise BadRequest(f"unknown frame type {kind!r}")
    return parser(obj)


def decode_client(raw: bytes | str, encoding: Encoding) -> ClientFrame:
    """Decode one frame sent by a client. Raises only :class:`BadRequest`."""
    return client_frame_from_dict(loads(raw, encoding))


def decode_server(raw: bytes | str, encoding: Encoding) -> ServerFrame:
    """Decode one frame sent by the server (used by clients). Raises only :class:`BadRequest`."""
    return server_frame_from_dict(loads(raw, encoding))


def request_id_of(raw: bytes | str, encoding: Encoding) -> RequestId:
    """Best-effort ``id`` of an undecodable request, so its error can still be matched."""
    try:
        obj = loads(raw, encoding)
        # PROTOCOL.md: a frame with no valid type gets an error with "id": null.
        if isinstance(obj, dict) and isinstance(obj.get("type"), str) and obj["type"] in _CLIENT:
            return _req_id(obj, False)
    except BadRequest:
        pass
    return None


# --- to dicts and bytes -------------------------------------------------------------------------


def frame_to_dict(frame: Frame) -> dict[str, Any]:
    """The wire form of a frame as a plain dict (key order: type first)."""
    if isinstance(frame, Ok):
        out: dict[str, Any] = {"type": "ok", "id": frame.id}
        out.update(frame.fields)
        return out
    out = {"type": frame.type}
    for name in frame.__slots__:
        value = getattr(frame, name)
        if isinstance(value, Since):
            value = {"offset": value.offset, "epoch": value.epoch}
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    if isinstance(frame, Auth) and frame.id is None:
        del out["id"]
    if isinstance(frame, Subscribe) and frame.since is None:
        del out["since"]
    return out


def encode(frame: Frame, encoding: Encoding) -> bytes:
    """Encode a frame for the wire (JSON as UTF-8 bytes, to be sent as a text frame)."""
    return dumps(frame_to_dict(frame), encoding)


__all__ = [
    "SUBPROTOCOLS",
    "SUBPROTOCOL_JSON",
    "SUBPROTOCOL_MSGPACK",
    "Cancel",
    "CancelJob",
    "Done",
    "Encoding",
    "Error",
    "Fail",
    "Heartbeat",
    "Job",
    "Message",
    "Pong",
    "check_portable",
    "client_frame_from_dict",
    "decode_client",
    "decode_server",
    "dumps",
    "encode",
    "frame_to_dict",
    "loads",
    "request_id_of",
    "server_frame_from_dict",
]
