"""Bytes in, values out: the frame codec of protocol v1 for both subprotocols.

Pure tests, no event loop and no sockets. Round trips are properties over every frame type;
hostile input (random bytes, random JSON and msgpack values, valid frames with one field
replaced) must only ever raise :class:`protocol.errors.BadRequest`.
"""

from __future__ import annotations

import contextlib
import json
import typing
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import (
    SUBPROTOCOL_JSON,
    SUBPROTOCOL_MSGPACK,
    SUBPROTOCOLS,
    Encoding,
    check_portable,
    decode_client,
    decode_server,
    encode,
    frame_to_dict,
    request_id_of,
)
from protocol.errors import BadRequest
from protocol.frames import (
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
    ServerFrame,
    Since,
    Stats,
    Subscribe,
    Unsubscribe,
    Welcome,
    Work,
)

ENCODINGS: tuple[Encoding, ...] = ("json", "msgpack")
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# --- strategies for valid field values ---------------------------------------------------------

# A lone surrogate cannot be encoded as UTF-8, so it is never a valid field value.
utf8_chars = st.characters(codec="utf-8")
text = st.text(utf8_chars, max_size=40)
int64 = st.integers(INT64_MIN, INT64_MAX)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)

portable_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(INT64_MIN, 2**64 - 1),
    finite_floats,
    text,
)
portable: st.SearchStrategy[Any] = st.recursive(
    portable_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(text, children, max_size=5),
    ),
    max_leaves=25,
)

request_ids: st.SearchStrategy[str | int] = st.one_of(st.text(utf8_chars, max_size=128), int64)
optional_ids: st.SearchStrategy[str | int | None] = st.one_of(st.none(), request_ids)
job_ids = st.text(utf8_chars, min_size=1, max_size=64).map(JobId)
queue_names = st.text(utf8_chars, min_size=1, max_size=128)
attempts = st.integers(1, INT64_MAX)

CLIENT_FRAMES: dict[type[Any], st.SearchStrategy[Any]] = {
    Auth: st.builds(Auth, token=st.none() | text, id=optional_ids),
    Refresh: st.builds(Refresh, id=request_ids, token=text),
    Ping: st.builds(Ping, id=optional_ids),
    Subscribe: st.builds(
        Subscribe,
        id=request_ids,
        topic=text,
        since=st.none() | st.builds(Since, offset=st.integers(0, INT64_MAX), epoch=text),
    ),
    Unsubscribe: st.builds(Unsubscribe, id=request_ids, topic=text),
    Publish: st.builds(Publish, id=request_ids, topic=text, data=portable),
    Enqueue: st.builds(
        Enqueue,
        id=request_ids,
        queue=queue_names,
        payload=portable,
        priority=st.integers(-(2**31), 2**31 - 1),
        delay=st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
        unique_key=st.none() | st.text(max_size=255),
        max_attempts=st.integers(1, 1000),
    ),
    Work: st.builds(
        Work,
        id=request_ids,
        queues=st.lists(queue_names, min_size=1, max_size=100).map(tuple),
        concurrency=st.integers(0, 10_000),
    ),
    Progress: st.builds(Progress, job=job_ids, attempt=attempts, data=portable),
    Heartbeat: st.just(Heartbeat()),
    Done: st.builds(Done, id=request_ids, job=job_ids, attempt=attempts, result=portable),
    Fail: st.builds(
        Fail, id=request_ids, job=job_ids, attempt=attempts, error=text, retry=st.booleans()
    ),
    CancelJob: st.builds(CancelJob, id=request_ids, job=job_ids),
    Stats: st.builds(Stats, id=request_ids),
}

SERVER_FRAMES: dict[type[Any], st.SearchStrategy[Any]] = {
    Welcome: st.builds(
        Welcome,
        session=text,
        sub=st.none() | text,
        roles=st.lists(text, max_size=4).map(tuple),
        expires_at=st.none() | int64,
        server=text,
    ),
    Ok: st.builds(
        Ok,
        id=optional_ids,
        fields=st.dictionaries(text.filter(lambda k: k not in ("type", "id")), portable),
    ),
    Error: st.builds(Error, id=optional_ids, code=text, message=text),
    Pong: st.builds(Pong, id=optional_ids),
    Message: st.builds(
        Message, topic=text, offset=int64, epoch=text, ts=finite_floats, data=portable
    ),
    Job: st.builds(
        Job, job=job_ids, queue=queue_names, attempt=attempts, payload=portable, lease=finite_floats
    ),
    Cancel: st.builds(Cancel, job=job_ids),
}

client_frames: st.SearchStrategy[Any] = st.one_of(*CLIENT_FRAMES.values())


def _name(cls: type[Any]) -> str:
    return cls.__name__


def test_every_client_frame_type_has_a_strategy() -> None:
    assert set(CLIENT_FRAMES) == set(typing.get_args(ClientFrame))


def test_every_server_frame_type_has_a_strategy() -> None:
    assert set(SERVER_FRAMES) == set(typing.get_args(ServerFrame))


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("cls", list(CLIENT_FRAMES), ids=_name)
@given(data=st.data())
def test_client_frame_round_trip(cls: type[Any], encoding: Encoding, data: st.DataObject) -> None:
    frame = data.draw(CLIENT_FRAMES[cls])
    decoded = decode_client(encode(frame, encoding), encoding)
    assert type(decoded) is cls
    assert decoded == frame


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("cls", list(SERVER_FRAMES), ids=_name)
@given(data=st.data())
def test_server_frame_round_trip(cls: type[Any], encoding: Encoding, data: st.DataObject) -> None:
    frame = data.draw(SERVER_FRAMES[cls])
    decoded = decode_server(encode(frame, encoding), encoding)
    assert type(decoded) is cls
    assert decoded == frame


@given(frame=client_frames)
def test_json_and_msgpack_carry_the_same_keys(frame: ClientFrame) -> None:
    from_json = json.loads(encode(frame, "json").decode("utf-8"))
    from_msgpack = msgpack.unpackb(encode(frame, "msgpack"), raw=False)
    assert from_json == from_msgpack == frame_to_dict(frame)
    assert next(iter(from_json)) == "type"


@given(frame=client_frames)
def test_json_is_compact_utf8_without_ascii_escapes(frame: ClientFrame) -> None:
    raw = encode(frame, "json")
    assert raw == json.dumps(
        frame_to_dict(frame), ensure_ascii=False, separators=(",", ":")
    ).encode("utf-8")


def test_json_encoding_exact_bytes() -> None:
    frame = Publish(id=1, topic="news/fr", data={"titre": "Élan ✓", "n": [1, 2.5, None, True]})
    assert (
        encode(frame, "json")
        == (
            '{"type":"publish","id":1,"topic":"news/fr",'
            '"data":{"titre":"Élan ✓","n":[1,2.5,null,true]}}'
        ).encode()
    )


def test_msgpack_encoding_is_a_map_with_string_keys() -> None:
    raw = encode(Message(topic="t", offset=3, epoch="e1", ts=1.5, data="x"), "msgpack")
    assert raw[0] & 0xF0 == 0x80  # fixmap
    assert msgpack.unpackb(raw, raw=False) == {
        "type": "message",
        "topic": "t",
        "offset": 3,
        "epoch": "e1",
        "ts": 1.5,
        "data": "x",
    }


def test_optional_keys_are_left_out() -> None:
    assert frame_to_dict(Auth()) == {"type": "auth", "token": None}
    assert frame_to_dict(Subscribe(id=1, topic="a")) == {"type": "subscribe", "id": 1, "topic": "a"}
    assert frame_to_dict(Subscribe(id=1, topic="a", since=Since(offset=4, epoch="e"))) == {
        "type": "subscribe",
        "id": 1,
        "topic": "a",
        "since": {"offset": 4, "epoch": "e"},
    }
    assert frame_to_dict(Heartbeat()) == {"type": "heartbeat"}
    assert frame_to_dict(Ok(id=7, fields={"offset": 12})) == {"type": "ok", "id": 7, "offset": 12}


def test_subprotocol_names() -> None:
    assert SUBPROTOCOL_JSON == "quicksilver.v1.json"
    assert SUBPROTOCOL_MSGPACK == "quicksilver.v1.msgpack"
    assert SUBPROTOCOLS == {"quicksilver.v1.json": "json", "quicksilver.v1.msgpack": "msgpack"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"type": "auth"}, Auth(token=None, id=None)),
        ({"type": "auth", "token": "T"}, Auth(token="T")),
        ({"type": "ping"}, Ping(id=None)),
        ({"type": "heartbeat", "id": 3}, Heartbeat()),
        (
            {"type": "enqueue", "id": 1, "queue": "q"},
            Enqueue(id=1, queue="q", payload=None, priority=0, delay=0.0, max_attempts=5),
        ),
        (
            {"type": "enqueue", "id": 1, "queue": "q", "delay": None, "max_attempts": None},
            Enqueue(id=1, queue="q"),
        ),
        (
            {"type": "enqueue", "id": 1, "queue": "q", "delay": 5},
            Enqueue(id=1, queue="q", delay=5.0),
        ),
        ({"type": "work", "id": 1, "queues": ["a", "b"]}, Work(id=1, queues=("a", "b"))),
        (
            {"type": "fail", "id": 1, "job": "j", "attempt": 2},
            Fail(id=1, job=JobId("j"), attempt=2, error="", retry=True),
        ),
        (
            {"type": "fail", "id": 1, "job": "j", "attempt": 2, "error": None, "retry": None},
            Fail(id=1, job=JobId("j"), attempt=2, error="", retry=True),
        ),
        ({"type": "cancel", "id": "c", "job": "j"}, CancelJob(id="c", job=JobId("j"))),
        ({"type": "publish", "id": 1, "topic": "a", "extra": [1]}, Publish(id=1, topic="a")),
    ],
)
def test_defaults_and_ignored_extras(raw: dict[str, Any], expected: ClientFrame) -> None:
    for encoding in ENCODINGS:
        assert decode_client(_raw(raw, encoding), encoding) == expected


def test_cancel_means_different_frames_in_each_direction() -> None:
    to_server = encode(CancelJob(id=1, job=JobId("j1")), "json")
    to_worker = encode(Cancel(job=JobId("j1")), "json")
    assert decode_client(to_server, "json") == CancelJob(id=1, job=JobId("j1"))
    assert decode_server(to_worker, "json") == Cancel(job=JobId("j1"))
    with pytest.raises(BadRequest):
        decode_client(to_worker, "json")


# --- validation rules --------------------------------------------------------------------------


def _raw(obj: Any, encoding: Encoding) -> bytes:
    if encoding == "json":
        return json.dumps(obj).encode("utf-8")
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


VALID_CLIENT: dict[str, dict[str, Any]] = {
    "refresh": {"type": "refresh", "id": 1, "token": "T"},
    "subscribe": {"type": "subscribe", "id": 1, "topic": "a/b"},
    "unsubscribe": {"type": "unsubscribe", "id": 1, "topic": "a/b"},
    "publish": {"type": "publish", "id": 1, "topic": "a/b", "data": {"k": [1, 2]}},
    "enqueue": {"type": "enqueue", "id": 1, "queue": "reports", "payload": {"n": 1}},
    "work": {"type": "work", "id": 1, "queues": ["reports"], "concurrency": 2},
    "done": {"type": "done", "id": 1, "job": "j1", "attempt": 1, "result": {"ok": True}},
    "fail": {"type": "fail", "id": 1, "job": "j1", "attempt": 1, "error": "boom"},
    "cancel": {"type": "cancel", "id": 1, "job": "j1"},
    "stats": {"type": "stats", "id": 1},
}
NEEDS_ID = sorted(VALID_CLIENT)
VALID_NO_ID: dict[str, dict[str, Any]] = {
    "auth": {"type": "auth", "token": "T"},
    "ping": {"type": "ping"},
    "progress": {"type": "progress", "job": "j1", "attempt": 1, "data": 50},
    "heartbeat": {"type": "heartbeat"},
}


def _with(kind: str, **changes: Any) -> dict[str, Any]:
    base = dict({**VALID_CLIENT, **VALID_NO_ID}[kind])
    base.update(changes)
    return base


def _without(kind: str, key: str) -> dict[str, Any]:
    base = dict({**VALID_CLIENT, **VALID_NO_ID}[kind])
    del base[key]
    return base


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("kind", sorted({**VALID_CLIENT, **VALID_NO_ID}))
def test_valid_examples_decode(kind: str, encoding: Encoding) -> None:
    frame = decode_client(_raw(_with(kind), encoding), encoding)
    assert frame.type == kind


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("kind", NEEDS_ID)
def test_missing_id_is_refused(kind: str, encoding: Encoding) -> None:
    with pytest.raises(BadRequest, match="'id'"):
        decode_client(_raw(_without(kind, "id"), encoding), encoding)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("kind", NEEDS_ID)
@pytest.mark.parametrize("bad_id", [None, True, False, 1.5, [1], {"a": 1}, "x" * 129])
def test_id_of_wrong_type_is_refused(kind: str, bad_id: Any, encoding: Encoding) -> None:
    with pytest.raises(BadRequest, match="'id'"):
        decode_client(_raw(_with(kind, id=bad_id), encoding), encoding)


@pytest.mark.parametrize("kind", ["auth", "ping"])
@pytest.mark.parametrize("bad_id", [True, 2.0, ["x"]])
def test_optional_id_is_still_checked(kind: str, bad_id: Any) -> None:
    with pytest.raises(BadRequest, match="'id'"):
        decode_client(_raw(_with(kind, id=bad_id), "json"), "json")


@pytest.mark.parametrize("good_id", ["", "x" * 128, 0, -1, INT64_MAX, INT64_MIN])
def test_id_limits_accepted(good_id: str | int) -> None:
    frame = decode_client(_raw(_with("publish", id=good_id), "json"), "json")
    assert isinstance(frame, Publish)
    assert frame.id == good_id


@pytest.mark.parametrize("big", [2**63, 2**64, -(2**63) - 1, 10**30])
def test_id_outside_64_bits_is_refused(big: int) -> None:
    # The id is echoed back; one outside 64 bits could not be sent in msgpack.
    with pytest.raises(BadRequest, match="'id'"):
        decode_client(_raw(_with("publish", id=big), "json"), "json")


@pytest.mark.parametrize(
    ("kind", "field", "value", "reason"),
    [
        ("subscribe", "since", {"offset": -1, "epoch": "e"}, "since.offset"),
        ("subscribe", "since", {"offset": 1.0, "epoch": "e"}, "offset"),
        ("subscribe", "since", {"offset": True, "epoch": "e"}, "offset"),
        ("subscribe", "since", {"epoch": "e"}, "offset"),
        ("subscribe", "since", {"offset": 1}, "epoch"),
        ("subscribe", "since", {"offset": 1, "epoch": 5}, "epoch"),
        ("subscribe", "since", [1, "e"], "since"),
        ("subscribe", "since", 0, "since"),
        ("subscribe", "topic", 5, "topic"),
        ("subscribe", "topic", None, "topic"),
        ("subscribe", "topic", ["a"], "topic"),
        ("unsubscribe", "topic", 5, "topic"),
        ("publish", "topic", {"a": 1}, "topic"),
        ("publish", "topic", None, "topic"),
        ("refresh", "token", None, "token"),
        ("refresh", "token", 1, "token"),
        ("enqueue", "max_attempts", 0, "max_attempts"),
        ("enqueue", "max_attempts", 1001, "max_attempts"),
        ("enqueue", "max_attempts", -5, "max_attempts"),
        ("enqueue", "max_attempts", 2.0, "max_attempts"),
        ("enqueue", "max_attempts", True, "max_attempts"),
        ("enqueue", "delay", -0.001, "delay"),
        ("enqueue", "delay", -1, "delay"),
        ("enqueue", "delay", "5", "delay"),
        ("enqueue", "delay", True, "delay"),
        ("enqueue", "priority", 2**31, "priority"),
        ("enqueue", "priority", -(2**31) - 1, "priority"),
        ("enqueue", "priority", 1.5, "priority"),
        ("enqueue", "unique_key", "k" * 256, "unique_key"),
        ("enqueue", "unique_key", 5, "unique_key"),
        ("enqueue", "queue", "", "queue"),
        ("enqueue", "queue", "q" * 129, "queue"),
        ("enqueue", "queue", None, "queue"),
        ("work", "queues", [], "queues"),
        ("work", "queues", "reports", "queues"),
        ("work", "queues", ["q"] * 101, "queues"),
        ("work", "queues", ["ok", 5], "queue"),
        ("work", "queues", ["ok", ""], "queue"),
        ("work", "concurrency", -1, "concurrency"),
        ("work", "concurrency", 10_001, "concurrency"),
        ("work", "concurrency", "2", "concurrency"),
        ("done", "attempt", 0, "attempt"),
        ("done", "attempt", -1, "attempt"),
        ("done", "attempt", "1", "attempt"),
        ("done", "attempt", None, "attempt"),
        ("done", "job", "", "job"),
        ("done", "job", "j" * 65, "job"),
        ("done", "job", 17, "job"),
        ("fail", "retry", "yes", "retry"),
        ("fail", "retry", 1, "retry"),
        ("fail", "error", 5, "error"),
        ("cancel", "job", None, "job"),
        ("progress", "attempt", 0, "attempt"),
        ("progress", "job", ["j"], "job"),
    ],
)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_field_rules(kind: str, field: str, value: Any, reason: str, encoding: Encoding) -> None:
    with pytest.raises(BadRequest, match=reason):
        decode_client(_raw(_with(kind, **{field: value}), encoding), encoding)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize(
    ("kind", "field"), [("enqueue", "delay"), ("enqueue", "priority"), ("done", "attempt")]
)
def test_non_finite_numbers_are_refused(
    kind: str, field: str, value: float, encoding: Encoding
) -> None:
    with pytest.raises(BadRequest):
        decode_client(_raw(_with(kind, **{field: value}), encoding), encoding)


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("enqueue", "max_attempts", 1),
        ("enqueue", "max_attempts", 1000),
        ("enqueue", "delay", 0),
        ("enqueue", "delay", 86400.5),
        ("enqueue", "priority", 2**31 - 1),
        ("enqueue", "priority", -(2**31)),
        ("enqueue", "unique_key", "k" * 255),
        ("enqueue", "unique_key", ""),
        ("enqueue", "queue", "q" * 128),
        ("work", "queues", ["q"] * 100),
        ("work", "concurrency", 10_000),
        ("work", "concurrency", 0),
        ("subscribe", "since", {"offset": 0, "epoch": ""}),
        ("subscribe", "since", None),
        ("done", "job", "j" * 64),
    ],
)
def test_field_limits_accepted(kind: str, field: str, value: Any) -> None:
    frame = decode_client(_raw(_with(kind, **{field: value}), "json"), "json")
    assert frame.type == kind


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("done", "attempt", 2**63),
        ("progress", "attempt", 2**64),
        ("subscribe", "since", {"offset": 2**63, "epoch": "e"}),
        ("enqueue", "delay", 10**400),
    ],
    ids=["attempt-2^63", "attempt-2^64", "since.offset-2^63", "delay-10^400"],
)
def test_integers_beyond_64_bits_are_refused(kind: str, field: str, value: Any) -> None:
    raw = json.dumps(_with(kind, **{field: value})).encode("utf-8")
    with pytest.raises(BadRequest):
        decode_client(raw, "json")


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"type": "subscribe-all", "id": 1}, "unknown frame type"),
        ({"type": "welcome", "id": 1}, "unknown frame type"),
        ({"type": "", "id": 1}, "unknown frame type"),
        ({"type": 5, "id": 1}, "no 'type'"),
        ({"type": None, "id": 1}, "no 'type'"),
        ({"type": ["ping"], "id": 1}, "no 'type'"),
        ({"id": 1}, "no 'type'"),
        ([{"type": "ping"}], "must be an object"),
        ("ping", "must be an object"),
        (5, "must be an object"),
        (None, "must be an object"),
    ],
)
def test_frame_shape_rules(obj: Any, reason: str, encoding: Encoding) -> None:
    with pytest.raises(BadRequest, match=reason):
        decode_client(_raw(obj, encoding), encoding)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"{'type': 'ping'}",
        b'{"type":"ping"} {"type":"ping"}',
        b'\xef\xbb\xbf{"type":"ping"}',
        b'{"type":"ping","id":"\xff"}',
        b'{"type":"ping","id":1' + b"1" * 5000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_undecodable_json(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_client(raw, "json")
    assert request_id_of(raw, "json") is None


def test_text_frames_decode_like_bytes() -> None:
    assert decode_client('{"type":"ping","id":"é"}', "json") == Ping(id="é")
    with pytest.raises(BadRequest):
        decode_client('{"type":"ping"}', "msgpack")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        b"\x81",
        msgpack.packb({"type": "ping"}) + b"\x00",
        msgpack.packb({1: "ping"}),
        msgpack.packb({"type": "ping", "id": 1, "x": {2: 3}}),
        b"\x91" * 100_000,
    ],
)
def test_undecodable_msgpack(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_client(raw, "msgpack")


# --- portable data -----------------------------------------------------------------------------

NON_PORTABLE_JSON = [
    b'{"type":"publish","id":1,"topic":"a","data":NaN}',
    b'{"type":"publish","id":1,"topic":"a","data":[Infinity]}',
    b'{"type":"publish","id":1,"topic":"a","data":{"x":-Infinity}}',
    b'{"type":"publish","id":1,"topic":"a","data":1e999}',
    b'{"type":"publish","id":1,"topic":"a","data":18446744073709551616}',
    b'{"type":"publish","id":1,"topic":"a","data":-9223372036854775809}',
    b'{"type":"enqueue","id":1,"queue":"q","payload":{"n":NaN}}',
]


@pytest.mark.parametrize("raw", NON_PORTABLE_JSON)
def test_non_portable_json_data_is_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_client(raw, "json")


def _publish_msgpack(data: Any) -> bytes:
    return msgpack.packb(  # type: ignore[no-any-return]
        {"type": "publish", "id": 1, "topic": "a", "data": data},
        use_bin_type=True,
        strict_types=False,
    )


@pytest.mark.parametrize(
    "data",
    [
        float("nan"),
        [float("inf")],
        {"k": float("-inf")},
        b"bytes",
        [b"\x00"],
        msgpack.ExtType(5, b"x"),
        msgpack.Timestamp(1, 0),
    ],
    ids=["nan", "inf", "-inf", "bin", "nested-bin", "ext", "timestamp"],
)
def test_non_portable_msgpack_data_is_refused(data: Any) -> None:
    with pytest.raises(BadRequest):
        decode_client(_publish_msgpack(data), "msgpack")


@pytest.mark.parametrize(
    "key", [1, 1.5, True, None, b"k"], ids=["int", "float", "bool", "nil", "bin"]
)
def test_non_string_map_keys_in_msgpack_are_refused(key: Any) -> None:
    raw = _publish_msgpack({"ok": 1, "nested": {key: "v"}})
    with pytest.raises(BadRequest):
        decode_client(raw, "msgpack")


@pytest.mark.parametrize("value", [2**64 - 1, INT64_MIN, -0.0, 1e308, "", [], {}])
def test_portable_edges_accepted(value: Any) -> None:
    for encoding in ENCODINGS:
        frame = decode_client(_publish_msgpack(value), "msgpack")
        assert isinstance(frame, Publish)
        assert frame.data == value
        assert decode_client(encode(frame, encoding), encoding) == frame


def _nested(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = [value]
    return value


def test_nesting_limit() -> None:
    check_portable(_nested(64))
    with pytest.raises(BadRequest, match="nested"):
        check_portable(_nested(65))
    raw = json.dumps({"type": "publish", "id": 1, "topic": "a", "data": _nested(65)})
    with pytest.raises(BadRequest, match="nested"):
        decode_client(raw, "json")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type":"progress","job":"j","attempt":1,"data":NaN}',
        b'{"type":"progress","job":"j","attempt":1,"data":18446744073709551616}',
        b'{"type":"done","id":1,"job":"j","attempt":1,"result":[1e999]}',
        b'{"type":"done","id":1,"job":"j","attempt":1,"result":{"big":-9223372036854775809}}',
    ],
)
def test_job_progress_and_results_must_be_portable(raw: bytes) -> None:
    # Progress is published on jobs/<id> and results are served over HTTP as JSON.
    with pytest.raises(BadRequest):
        decode_client(raw, "json")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type":"publish","id":1,"topic":"a","data":"\\ud800"}',
        b'{"type":"publish","id":1,"topic":"a","data":{"\\udfff":1}}',
        b'{"type":"enqueue","id":1,"queue":"q","payload":["\\udc00x"]}',
        b'{"type":"ping","id":"\\ud83d"}',
        b'{"type":"subscribe","id":1,"topic":"a\\ud800"}',
    ],
)
def test_lone_surrogate_escapes_are_refused(raw: bytes) -> None:
    # A lone surrogate decodes into a str that neither JSON nor msgpack can encode as UTF-8.
    with pytest.raises(BadRequest):
        decode_client(raw, "json")


def test_surrogate_pairs_are_fine() -> None:
    frame = decode_client(b'{"type":"publish","id":1,"topic":"a","data":"\\ud83d\\ude00"}', "json")
    assert isinstance(frame, Publish)
    assert frame.data == "\U0001f600"


@pytest.mark.parametrize(
    ("frame", "encoding"),
    [
        (Publish(id=1, topic="a", data=float("nan")), "json"),
        (Publish(id=1, topic="a", data={"k": float("inf")}), "json"),
        (Publish(id=1, topic="a", data=2**64), "msgpack"),
        (Publish(id=1, topic="a", data=object()), "json"),
        (Publish(id=1, topic="a", data=object()), "msgpack"),
        (Publish(id=1, topic="a", data="\ud800"), "json"),
        (Publish(id=1, topic="a", data="\ud800"), "msgpack"),
    ],
)
def test_encode_refuses_what_it_cannot_carry(frame: Frame, encoding: Encoding) -> None:
    with pytest.raises(BadRequest):
        encode(frame, encoding)


# --- request_id_of ------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"type": "publish", "id": 7, "topic": 5}, 7),
        ({"type": "subscribe", "id": "s-1"}, "s-1"),
        ({"type": "enqueue", "id": 3, "queue": "q", "max_attempts": 0}, 3),
        ({"type": "publish", "topic": "a"}, None),
        ({"type": "publish", "id": None, "topic": 5}, None),
        ({"type": "publish", "id": True, "topic": 5}, None),
        ({"type": "publish", "id": 1.5, "topic": 5}, None),
        ({"type": "publish", "id": "x" * 129, "topic": 5}, None),
        ([1, 2], None),
        ("id", None),
    ],
)
def test_request_id_of(obj: Any, expected: Any, encoding: Encoding) -> None:
    assert request_id_of(_raw(obj, encoding), encoding) == expected


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    "obj",
    [
        {"type": "bogus", "id": 7},
        {"type": 5, "id": 7},
        {"type": ["ping"], "id": 7},
        {"id": 7},
    ],
)
def test_request_id_of_frame_without_valid_type_is_null(obj: Any, encoding: Encoding) -> None:
    # PROTOCOL.md: a frame with no valid type gets an error with "id": null.
    assert request_id_of(_raw(obj, encoding), encoding) is None


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"null"])
def test_request_id_of_garbage(raw: bytes) -> None:
    assert request_id_of(raw, "json") is None
    assert request_id_of(raw, "msgpack") is None


# --- hostile input ------------------------------------------------------------------------------

DECODERS: list[Callable[[bytes | str, Encoding], Any]] = [decode_client, decode_server]
ENC_DEC = [(enc, dec) for enc in ENCODINGS for dec in DECODERS]


def _only_bad_request(decoder: Callable[[bytes | str, Encoding], Any], raw: Any, enc: Any) -> None:
    with contextlib.suppress(BadRequest):
        decoder(raw, enc)


@pytest.mark.parametrize(("encoding", "decoder"), ENC_DEC)
@given(raw=st.binary(max_size=200))
def test_random_bytes_raise_only_bad_request(
    raw: bytes, encoding: Encoding, decoder: Callable[[bytes | str, Encoding], Any]
) -> None:
    _only_bad_request(decoder, raw, encoding)
    request_id_of(raw, encoding)


@pytest.mark.parametrize(("encoding", "decoder"), ENC_DEC)
@given(raw=st.text(max_size=200))
def test_random_text_raises_only_bad_request(
    raw: str, encoding: Encoding, decoder: Callable[[bytes | str, Encoding], Any]
) -> None:
    _only_bad_request(decoder, raw, encoding)
    request_id_of(raw, encoding)


# Values as a hostile peer might send them: unbounded integers, every float, lone surrogates.
hostile_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.integers(min_value=10**300, max_value=10**400),
    st.floats(),
    st.text(max_size=10),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2),
    st.sampled_from(["auth", "ping", "publish", "job", "ok", "welcome", "cancel", "message"]),
)
hostile_json: st.SearchStrategy[Any] = st.recursive(
    hostile_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)
msgpack_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=10),
    st.binary(max_size=10),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
)
hostile_msgpack: st.SearchStrategy[Any] = st.recursive(
    msgpack_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.integers(0, 9), st.binary(max_size=3)),
            children,
            max_size=4,
        ),
    ),
    max_leaves=15,
)


@pytest.mark.parametrize("decoder", DECODERS)
@given(value=hostile_json)
def test_random_json_values_raise_only_bad_request(
    value: Any, decoder: Callable[[bytes | str, Encoding], Any]
) -> None:
    raw = json.dumps(value).encode("ascii")
    _only_bad_request(decoder, raw, "json")
    request_id_of(raw, "json")


@pytest.mark.parametrize("decoder", DECODERS)
@given(value=hostile_msgpack)
def test_random_msgpack_values_raise_only_bad_request(
    value: Any, decoder: Callable[[bytes | str, Encoding], Any]
) -> None:
    raw = msgpack.packb(value, use_bin_type=True)
    _only_bad_request(decoder, raw, "msgpack")
    request_id_of(raw, "msgpack")


ALL_FRAMES: st.SearchStrategy[Any] = st.one_of(*CLIENT_FRAMES.values(), *SERVER_FRAMES.values())


@st.composite
def mutated_frames(draw: st.DrawFn, frames: st.SearchStrategy[Any]) -> dict[str, Any]:
    """A valid frame with one to three keys replaced by junk or removed."""
    obj = frame_to_dict(draw(frames))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*obj, "id", "type", "since", "data"]))
        if draw(st.booleans()) and key in obj:
            del obj[key]
        else:
            obj[key] = draw(hostile_json)
    return obj


def _packable(obj: Any) -> bytes | None:
    try:
        return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError):
        return None


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(obj=mutated_frames(ALL_FRAMES))
def test_mutated_frames_raise_only_bad_request(obj: dict[str, Any]) -> None:
    raw_json = json.dumps(obj).encode("ascii")
    raw_msgpack = _packable(obj)
    for decoder in DECODERS:
        _only_bad_request(decoder, raw_json, "json")
        if raw_msgpack is not None:
            _only_bad_request(decoder, raw_msgpack, "msgpack")
    request_id_of(raw_json, "json")


FIELDS = [
    (cls, name)
    for cls in [*CLIENT_FRAMES, *SERVER_FRAMES]
    for name in [*getattr(cls, "__slots__", ()), "id", "type"]
]


@pytest.mark.parametrize(
    ("cls", "key"), FIELDS, ids=[f"{cls.__name__}.{key}" for cls, key in FIELDS]
)
@given(data=st.data())
def test_junk_in_any_field_raises_only_bad_request(
    cls: type[Any], key: str, data: st.DataObject
) -> None:
    frames = {**CLIENT_FRAMES, **SERVER_FRAMES}
    obj = frame_to_dict(data.draw(frames[cls]))
    obj[key] = data.draw(hostile_scalars)
    raw_json = json.dumps(obj).encode("ascii")
    raw_msgpack = _packable(obj)
    for decoder in DECODERS:
        _only_bad_request(decoder, raw_json, "json")
        if raw_msgpack is not None:
            _only_bad_request(decoder, raw_msgpack, "msgpack")


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(obj=mutated_frames(client_frames))
def test_accepted_client_frames_can_be_sent_on_in_both_encodings(obj: dict[str, Any]) -> None:
    """Whatever the server accepts, it can echo and forward to JSON and msgpack clients alike."""
    raw = json.dumps(obj).encode("ascii")
    try:
        frame = decode_client(raw, "json")
    except BadRequest:
        return
    for encoding in ENCODINGS:
        assert decode_client(encode(frame, encoding), encoding) == frame


@given(value=hostile_json)
def test_check_portable_agrees_with_both_encoders(value: Any) -> None:
    """check_portable accepts exactly what both encoders carry and bring back unchanged."""
    try:
        check_portable(value)
    except BadRequest:
        portable_ok = False
    else:
        portable_ok = True
    try:
        via_json = json.loads(
            json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
        )
        via_msgpack = msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)
        carried = via_json == value == via_msgpack
    except (ValueError, TypeError, OverflowError):
        carried = False
    if portable_ok:
        assert carried
    # NaN never compares equal, so an encodable value may still fail the equality above.
    if carried:
        assert portable_ok
