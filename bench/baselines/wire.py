"""How the load generator talks to each kind of server: set-up steps, publish frames, counting.

A :class:`Dialect` is data, not code with I/O: the fan-out harness runs its set-up steps on a
WebSocket connection, pre-builds the publisher's frames with :func:`client_frame`, and counts
deliveries and acknowledgements with the counters made by ``new_delivery_counter`` and
``new_ack_counter``. Deliveries are counted without decoding any payload: one data frame is one
delivery where the server sends one message per frame, and otherwise a byte marker that occurs
exactly once per message is counted (NATS and MQTT may pack several messages into one frame).
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass

from protocol.codec import SUBPROTOCOL_JSON, encode
from protocol.frames import Auth, Publish, Subscribe

PAYLOAD_SIZE = 200
TOPIC = "bench/fanout"
NATS_SUBJECT = "bench.fanout"
PUBLISHER_HELLO = b"I am the publisher"
"""The first frame of the publisher on the baseline servers; every other connection subscribes."""
SUBSCRIBE_PREFIX = b"subscribe "
"""A baseline subscriber's first frame ``subscribe <topic>`` moves it to that topic."""
STAMP_PREFIX = b"T="
STAMP_WIDTH = 17
"""A send-time stamp in a body is ``T=`` and ``%017.6f`` of ``time.time()``: 17 characters."""


def payload(size: int = PAYLOAD_SIZE) -> str:
    """The message body: ``size`` lower-case ASCII characters.

    Lower case only, so it can never contain the NATS marker ``MSG `` nor a NUL byte of the MQTT
    marker, and needs no JSON escaping.
    """
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    return (alphabet * (size // len(alphabet) + 1))[:size]


def stamped_payload(sent: float, size: int = PAYLOAD_SIZE) -> str:
    """A body of ``size`` characters that starts with the send-time stamp ``T=<sent>``.

    The stamp has a fixed width, so the body size does not depend on the time; the rest is the
    lower-case filler of :func:`payload`. Raises ValueError when ``size`` cannot hold the stamp.
    """
    stamp = f"T={sent:017.6f}"
    if len(stamp) != len(STAMP_PREFIX) + STAMP_WIDTH:
        raise ValueError(f"time {sent!r} does not fit the stamp width")
    if size < len(stamp):
        raise ValueError(f"a body of {size} bytes cannot hold a {len(stamp)}-byte stamp")
    return stamp + payload(size - len(stamp))


# --- counters -----------------------------------------------------------------------------------


class FrameCounter:
    """Counts one per data frame; ``feed`` ignores the payload."""

    __slots__ = ()

    def feed(self, data: bytes) -> int:
        """Count one for the frame whose payload is ``data``."""
        return 1


class MarkerCounter:
    """Counts occurrences of ``marker`` in a byte stream fed in arbitrary pieces.

    The last ``len(marker) - 1`` bytes are carried over, so a marker split across two frames is
    counted once, and never twice: a carried tail is too short to hold a whole marker.
    """

    __slots__ = ("_keep", "_marker", "_tail")

    def __init__(self, marker: bytes) -> None:
        if not marker:
            raise ValueError("marker must not be empty")
        self._marker = marker
        self._keep = len(marker) - 1
        self._tail = b""

    def feed(self, data: bytes) -> int:
        """Count the markers that end in ``data``."""
        if self._tail:
            data = self._tail + data
        self._tail = data[-self._keep :] if self._keep else b""
        return data.count(self._marker)


class FixedSizeCounter:
    """Counts fixed-size records (MQTT PUBACK packets are 4 bytes) in a stream of pieces."""

    __slots__ = ("_carry", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._carry = 0

    def feed(self, data: bytes) -> int:
        """Count the records completed by ``data``."""
        total = self._carry + len(data)
        self._carry = total % self._size
        return total // self._size


class StampReader:
    """Finds the send-time stamps (see :func:`stamped_payload`) in a byte stream fed in pieces.

    ``feed(data, now, sent, latency)`` appends, for each complete stamp, its send time to
    ``sent`` and ``now - sent`` to ``latency``, and returns how many it found. A stamp split
    across two pieces is read once, when its last byte arrives. Bytes that are not a stamp (a
    ``T=`` followed by something that is not a number) raise ValueError.
    """

    __slots__ = ("_tail",)

    _SPAN = len(STAMP_PREFIX) + STAMP_WIDTH

    def __init__(self) -> None:
        self._tail = b""

    def feed(
        self, data: bytes, now: float, sent: MutableSequence[float], latency: MutableSequence[float]
    ) -> int:
        """Read the stamps that end in ``data``; see the class docstring."""
        if self._tail:
            data = self._tail + data
            self._tail = b""
        found = 0
        pos = 0
        span = self._SPAN
        while True:
            i = data.find(STAMP_PREFIX, pos)
            if i < 0:
                # The last byte may be the first of a prefix split across pieces.
                if data[-1:] == STAMP_PREFIX[:1]:
                    self._tail = data[-1:]
                return found
            end = i + span
            if end > len(data):
                self._tail = data[i:]
                return found
            t = float(data[i + 2 : end])
            sent.append(t)
            latency.append(now - t)
            found += 1
            pos = end


Counter = FrameCounter | MarkerCounter | FixedSizeCounter


# --- dialects -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One set-up exchange: send ``send`` (if any) as one frame, then wait for a data frame that
    contains ``expect``."""

    send: bytes | None
    expect: bytes


@dataclass(frozen=True)
class Dialect:
    """What a subscriber, an idle client and the publisher do on one kind of server.

    ``session_steps`` bring a connection to an authenticated, idle session;
    ``subscribe_steps(topic)`` to a session subscribed to ``topic``; ``publish_frame(n, topic,
    body)`` is the payload of the publisher's ``n``-th frame (1-based), carrying ``body`` on
    ``topic``. Topics are given in the harness's ``/``-separated form (see :func:`topic_name`);
    each dialect maps them to its server's syntax. ``delivery_marker_for(topic)`` None means one
    data frame per delivery; ``failure`` is a byte string that marks an error answer during
    set-up or in the publisher's acknowledgements.
    """

    name: str
    path: str
    subprotocol: str | None
    binary: bool
    session_steps: tuple[Step, ...]
    subscribe_steps: Callable[[str], tuple[Step, ...]]
    publisher_steps: tuple[Step, ...]
    publish_frame: Callable[[int, str, str], bytes]
    delivery_marker_for: Callable[[str], bytes | None] = lambda topic: None
    ack_record_size: int | None = None
    ack_marker: bytes | None = None
    failure: bytes | None = None

    @property
    def subscriber_steps(self) -> tuple[Step, ...]:
        """The set-up steps of a subscriber of the default topic :data:`TOPIC`."""
        return self.subscribe_steps(TOPIC)

    @property
    def delivery_marker(self) -> bytes | None:
        """The delivery marker on the default topic :data:`TOPIC`."""
        return self.delivery_marker_for(TOPIC)

    def publish_payload(self, n: int) -> bytes:
        """The ``n``-th publish on the default topic, with the standard 200-byte body."""
        return self.publish_frame(n, TOPIC, payload())

    def headers(self) -> dict[str, str]:
        """Extra upgrade-request headers: the subprotocol offer, if the dialect has one."""
        return {"Sec-WebSocket-Protocol": self.subprotocol} if self.subprotocol else {}

    def new_delivery_counter(self, topic: str = TOPIC) -> Counter:
        """A fresh counter of deliveries for one subscriber connection of ``topic``."""
        marker = self.delivery_marker_for(topic)
        return FrameCounter() if marker is None else MarkerCounter(marker)

    def new_ack_counter(self) -> Counter:
        """A fresh counter of acknowledgements for the publisher connection."""
        if self.ack_record_size is not None:
            return FixedSizeCounter(self.ack_record_size)
        if self.ack_marker is not None:
            return MarkerCounter(self.ack_marker)
        return FrameCounter()


def topic_name(index: int, topics: int) -> str:
    """The harness's name of topic ``index`` (0-based) in a run over ``topics`` topics.

    One topic is :data:`TOPIC`; several are ``bench/t/00000`` ... , fixed width so that no name is
    a prefix of another (the MQTT delivery marker relies on it).
    """
    if topics < 1 or not 0 <= index < topics:
        raise ValueError(f"topic index {index} out of range for {topics} topic(s)")
    return TOPIC if topics == 1 else f"bench/t/{index:05d}"


def baseline_dialect() -> Dialect:
    """The baseline servers: every connection gets ``ready`` and is subscribed to :data:`TOPIC`.

    A first frame ``subscribe <topic>`` moves a subscriber to another topic (answered with
    ``subscribed``); ``I am the publisher`` makes a connection the publisher. A published frame
    is ``@<topic> `` followed by the message, which the server forwards as it is and answers with
    one ``ok``; the message is shaped and sized like a quicksilver delivery so the bytes per
    delivery on the wire are comparable.
    """
    ready = Step(None, b"ready")

    def subscribe(topic: str) -> tuple[Step, ...]:
        if topic == TOPIC:
            return (ready,)
        return (ready, Step(SUBSCRIBE_PREFIX + topic.encode(), b"subscribed"))

    def publish(n: int, topic: str, body: str) -> bytes:
        return (
            f'@{topic} {{"type":"message","topic":"{topic}","offset":{n},"epoch":"bench",'
            f'"ts":1700000000.0,"data":"{body}"}}'
        ).encode()

    return Dialect(
        name="baseline",
        path="/",
        subprotocol=None,
        binary=False,
        session_steps=(ready,),
        subscribe_steps=subscribe,
        publisher_steps=(ready, Step(PUBLISHER_HELLO, b"publisher")),
        publish_frame=publish,
    )


def quicksilver_dialect(token: str) -> Dialect:
    """quicksilver v1 over JSON: auth, then subscribe (subscribers) or publish (the publisher)."""
    auth = (Step(encode(Auth(token=token), "json"), b'"welcome"'),)

    def subscribe(topic: str) -> tuple[Step, ...]:
        return (*auth, Step(encode(Subscribe(id=1, topic=topic), "json"), b'"ok"'))

    def publish(n: int, topic: str, body: str) -> bytes:
        return encode(Publish(id=n, topic=topic, data=body), "json")

    return Dialect(
        name="quicksilver",
        path="/ws",
        subprotocol=SUBPROTOCOL_JSON,
        binary=False,
        session_steps=auth,
        subscribe_steps=subscribe,
        publisher_steps=auth,
        publish_frame=publish,
        failure=b'"error"',
    )


def nats_subject(topic: str) -> str:
    """The NATS subject for a harness topic (``/`` becomes ``.``)."""
    return topic.replace("/", ".")


def nats_dialect() -> Dialect:
    """The NATS text protocol over WebSocket; the publisher runs in verbose mode so that every
    PUB is acknowledged with ``+OK``, which is what bounds its window."""
    connect = b'CONNECT {"verbose":%s,"pedantic":false,"protocol":1,"lang":"bench"}\r\n'
    info = Step(None, b"INFO")

    def subscribe(topic: str) -> tuple[Step, ...]:
        sub = b"SUB " + nats_subject(topic).encode() + b" 1\r\n"
        return (info, Step(connect % b"false" + sub + b"PING\r\n", b"PONG"))

    def publish(n: int, topic: str, body: str) -> bytes:
        raw = body.encode()
        return b"PUB %s %d\r\n%s\r\n" % (nats_subject(topic).encode(), len(raw), raw)

    return Dialect(
        name="nats",
        path="/",
        subprotocol=None,
        binary=True,
        session_steps=(info, Step(connect % b"false" + b"PING\r\n", b"PONG")),
        subscribe_steps=subscribe,
        publisher_steps=(info, Step(connect % b"true" + b"PING\r\n", b"PONG")),
        publish_frame=publish,
        delivery_marker_for=lambda topic: b"MSG ",
        ack_marker=b"+OK",
        failure=b"-ERR",
    )


def _mqtt_length(n: int) -> bytes:
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_string(s: str) -> bytes:
    raw = s.encode()
    return len(raw).to_bytes(2, "big") + raw


def _mqtt_packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + _mqtt_length(len(body)) + body


def mqtt_dialect() -> Dialect:
    """MQTT 3.1.1 over WebSocket (subprotocol ``mqtt``): subscribers at QoS 0, the publisher at
    QoS 1 so that every message is acknowledged with a 4-byte PUBACK."""
    # Clean session, no keep-alive (a run must not be cut by a missed PINGREQ), empty client id.
    connect = _mqtt_packet(0x10, _mqtt_string("MQTT") + b"\x04\x02\x00\x00" + _mqtt_string(""))
    connack_ok = b"\x20\x02\x00\x00"
    session = (Step(connect, connack_ok),)

    def subscribe(topic: str) -> tuple[Step, ...]:
        packet = _mqtt_packet(0x82, b"\x00\x01" + _mqtt_string(topic) + b"\x00")
        return (*session, Step(packet, b"\x90\x03\x00\x01\x00"))

    def publish(n: int, topic: str, body: str) -> bytes:
        packet_id = n % 65535 + 1
        return _mqtt_packet(
            0x32, _mqtt_string(topic) + packet_id.to_bytes(2, "big") + body.encode()
        )

    return Dialect(
        name="mqtt",
        path="/",
        subprotocol="mqtt",
        binary=True,
        session_steps=session,
        subscribe_steps=subscribe,
        publisher_steps=session,
        publish_frame=publish,
        delivery_marker_for=_mqtt_string,
        ack_record_size=4,
    )


# --- client frames ------------------------------------------------------------------------------


def _mask(data: bytes, key: bytes) -> bytes:
    n = len(data)
    if not n:
        return data
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def client_frame(data: bytes, *, binary: bool, key: bytes | None = None) -> bytes:
    """One complete, final, masked client-to-server WebSocket frame (RFC 6455 section 5.2).

    The publisher pre-builds its frames with this so that encoding is outside the measured time
    and several frames can be handed to the kernel in one write. ``key`` defaults to 4 random
    bytes (section 5.3 asks for an unpredictable key).
    """
    key = os.urandom(4) if key is None else key
    if len(key) != 4:
        raise ValueError("masking key must be 4 bytes")
    head = bytearray([0x82 if binary else 0x81])
    n = len(data)
    if n < 126:
        head.append(0x80 | n)
    elif n < 1 << 16:
        head.append(0x80 | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(0x80 | 127)
        head += n.to_bytes(8, "big")
    return bytes(head) + key + _mask(data, key)
