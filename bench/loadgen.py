"""Load-generator processes: many WebSocket clients per process, driven by a coordinator.

A :class:`ClientPool` starts P processes (``spawn``), each holding its share of the clients
(picows, one event loop per process, so the load generator is not the bottleneck of one Python
process). Every process runs the same conversation with the coordinator over a pipe:

1. ``("spawned", pid)`` once imported; the coordinator then sends ``("connect", None)`` to all at
   once, so connecting starts together;
2. each process connects its clients, runs each one's set-up steps, and reports ``("ready",
   {...})`` with when it started and finished, or ``("error", reason)``;
3. any number of phases: ``("go", Phase)`` → ``("armed", None)`` once counting has started
   (the coordinator publishes only after every process is armed) → ``("result", {...})``. In a
   ``count`` phase each client counts its deliveries until it has its target; in a ``latency``
   phase it also reads the send-time stamp of each delivery and the process returns every
   (send time, latency) pair;
4. ``("stop", reason)``, a closed pipe, or the death of the coordinator ends the process (the
   kernel kills it: see :func:`bench.common.die_with_parent`).

Every wait is bounded; a failure in a process is reported as an error, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

import picows
import uvloop

from bench.baselines.wire import (
    Dialect,
    MarkerCounter,
    StampReader,
    Step,
    client_frame,
    stamped_payload,
)
from bench.common import BenchError, die_with_parent, pin_to, raise_nofile_limit

_TEXT = picows.WSMsgType.TEXT
_BINARY = picows.WSMsgType.BINARY
_DATA = (_TEXT, _BINARY)
_IDLE_LIMIT = 3600.0
"""The longest a process waits for its next instruction before it gives up and exits."""

PhaseKind = Literal["count", "latency"]


@dataclass(frozen=True)
class ClientGroup:
    """Clients that do the same thing: the same set-up steps and the same delivery marker."""

    steps: tuple[Step, ...]
    marker: bytes | None = None


@dataclass(frozen=True)
class ClientJob:
    """What one load-generator process does; picklable, sent to a spawned process.

    ``members[i]`` is the index in ``groups`` of the process's i-th client.
    """

    index: int
    url: str
    headers: dict[str, str]
    binary: bool
    failure: bytes | None
    groups: tuple[ClientGroup, ...]
    members: tuple[int, ...]
    cpus: frozenset[int] | None
    setup_timeout: float
    connect_concurrency: int


@dataclass(frozen=True)
class Phase:
    """One measured phase: each client of group g expects ``targets[g]`` deliveries before
    ``deadline`` (``time.time()``)."""

    kind: PhaseKind
    deadline: float
    targets: tuple[int, ...]


# --- inside a load-generator process ------------------------------------------------------------


class _State:
    """What the clients of one process share: the phase under way and its outcome."""

    def __init__(self) -> None:
        self.latency = False
        self.pending = 0
        self.lost = 0
        self.finished = asyncio.Event()
        self.sent: array[float] = array("d")
        self.latencies: array[float] = array("d")

    def begin(self, clients: Sequence[_Client], phase: Phase) -> None:
        self.latency = phase.kind == "latency"
        self.sent = array("d")
        self.latencies = array("d")
        self.lost = 0
        self.pending = 0
        self.finished = asyncio.Event()
        for client in clients:
            target = phase.targets[client.group]
            client.reset(target)
            if target <= 0:
                continue
            if client.closed:
                self.lost += 1
            else:
                self.pending += 1
        if self.pending == 0:
            self.finished.set()

    def client_completed(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.finished.set()

    def client_lost(self) -> None:
        self.lost += 1
        self.client_completed()


class _Client(picows.WSListener):
    """One client: runs its set-up steps, then counts (or times) deliveries in each phase."""

    def __init__(self, job: ClientJob, group: int, state: _State) -> None:
        super().__init__()
        spec = job.groups[group]
        self.group = group
        self.steps = spec.steps
        self.marker = spec.marker
        self.msg_type = _BINARY if job.binary else _TEXT
        self.failure = job.failure
        self.state = state
        self.step = 0
        self.transport: picows.WSTransport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.set_up = False
        self.closed = False
        self.counter: MarkerCounter | None = None
        self.stamps = StampReader()
        self.target = 0
        self.received = 0
        self.first_at = 0.0
        self.done_at = 0.0

    # set-up

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.transport = transport
        self._next_step()

    def _next_step(self) -> None:
        if self.step < len(self.steps):
            send = self.steps[self.step].send
            if send is not None and self.transport is not None:
                self.transport.send(self.msg_type, send)
            return
        self.set_up = True
        if not self.ready.done():
            self.ready.set_result(None)

    def _setup_frame(self, frame: picows.WSFrame) -> None:
        if frame.msg_type not in _DATA:
            return
        data = frame.get_payload_as_bytes()
        if self.failure is not None and self.failure in data:
            self._fail(f"server refused set-up step {self.step + 1}: {data[:300]!r}")
            return
        if self.steps[self.step].expect in data:
            self.step += 1
            self._next_step()

    def _fail(self, message: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(BenchError(message))

    # phases

    def reset(self, target: int) -> None:
        self.target = target
        self.received = 0
        self.first_at = 0.0
        self.done_at = 0.0
        self.counter = MarkerCounter(self.marker) if self.marker is not None else None
        self.stamps = StampReader()

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if not self.set_up:
            self._setup_frame(frame)
            return
        msg_type = frame.msg_type
        if msg_type is not _TEXT and msg_type is not _BINARY:
            return
        state = self.state
        if state.latency:
            now = time.time()
            n = self.stamps.feed(frame.get_payload_as_bytes(), now, state.sent, state.latencies)
        else:
            counter = self.counter
            n = 1 if counter is None else counter.feed(frame.get_payload_as_bytes())
        before = self.received
        self.received = before + n
        if before == 0 and n:
            self.first_at = time.time()
        if before < self.target <= self.received:
            self.done_at = time.time()
            state.client_completed()

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        self.closed = True
        if not self.ready.done():
            self._fail("server closed a connection during set-up")
        elif self.received < self.target:
            self.state.client_lost()


class _Inbox:
    """Messages from the coordinator's pipe, delivered into the event loop."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(conn.fileno(), self._readable)
        # uvloop made the pipe non-blocking; a result of several MiB must not fail with EAGAIN.
        os.set_blocking(conn.fileno(), True)

    def _readable(self) -> None:
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            self.loop.remove_reader(self.conn.fileno())
            message = ("stop", "coordinator went away")
        self.queue.put_nowait(message)

    async def get(self, within: float) -> tuple[str, Any]:
        try:
            async with asyncio.timeout(max(within, 0.0)):
                return await self.queue.get()
        except TimeoutError:
            return ("stop", "no word from the coordinator")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.conn.fileno())


def first_error(exc: BaseException) -> BaseException:
    """The first leaf exception of a (possibly nested) exception group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException) -> str:
    """``Type: message`` (or just the type when the message is empty)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def disconnect_all(transports: Sequence[picows.WSTransport]) -> None:
    """Drop every transport at once, without a close handshake; never raises."""
    for transport in transports:
        with contextlib.suppress(Exception):
            transport.disconnect(graceful=False)


async def connect_clients(job: ClientJob, state: _State) -> list[_Client]:
    """Connect and set up every client of ``job``, at most ``connect_concurrency`` at a time.

    Raises :class:`BenchError` (after dropping the connections made) when one fails or all are
    not set up within ``setup_timeout``.
    """
    clients: list[_Client] = []
    gate = asyncio.Semaphore(job.connect_concurrency)

    async def connect_one(group: int) -> None:
        async with gate:
            _, listener = await picows.ws_connect(
                lambda: _Client(job, group, state),
                job.url,
                extra_headers=job.headers,
                websocket_handshake_timeout=job.setup_timeout,
            )
            assert isinstance(listener, _Client)
            clients.append(listener)
            await listener.ready

    try:
        async with asyncio.timeout(job.setup_timeout), asyncio.TaskGroup() as tasks:
            for group in job.members:
                tasks.create_task(connect_one(group))
    except TimeoutError:
        disconnect_all([c.transport for c in clients if c.transport is not None])
        ready = sum(1 for c in clients if c.set_up)
        raise BenchError(
            f"only {ready} of {len(job.members)} clients were connected and set up "
            f"within {job.setup_timeout:.0f} s"
        ) from None
    except BaseException as exc:
        disconnect_all([c.transport for c in clients if c.transport is not None])
        if isinstance(exc, BaseExceptionGroup):
            raise BenchError(f"client set-up failed: {describe(first_error(exc))}") from exc
        raise
    return clients


async def _run_phase(
    conn: Connection, clients: list[_Client], state: _State, phase: Phase, inbox: _Inbox
) -> dict[str, Any]:
    state.begin(clients, phase)
    # Counting starts now: the coordinator publishes only once every process has said so.
    conn.send(("armed", None))
    cpu0 = time.process_time()
    finished = asyncio.ensure_future(state.finished.wait())
    stop = asyncio.ensure_future(inbox.get(phase.deadline - time.time()))
    await asyncio.wait(
        (finished, stop),
        timeout=max(phase.deadline - time.time(), 0.0),
        return_when=asyncio.FIRST_COMPLETED,
    )
    for task in (finished, stop):
        task.cancel()
    cpu = time.process_time() - cpu0
    complete = [c for c in clients if c.target == 0 or c.done_at]
    firsts = [c.first_at for c in clients if c.first_at]
    lasts = [c.done_at for c in clients if c.done_at]
    return {
        "received": sum(c.received for c in clients),
        "expected": sum(c.target for c in clients),
        "complete": len(complete),
        "clients": len(clients),
        "lost": state.lost,
        "first_at": min(firsts) if firsts else None,
        "last_at": max(lasts) if lasts else None,
        "cpu_seconds": cpu,
        "sent": state.sent.tobytes() if state.latency else b"",
        "latencies": state.latencies.tobytes() if state.latency else b"",
    }


async def _process_main(conn: Connection, job: ClientJob) -> None:
    inbox = _Inbox(conn)
    state = _State()
    clients: list[_Client] = []
    try:
        conn.send(("spawned", os.getpid()))
        kind, _ = await inbox.get(job.setup_timeout + 60)
        if kind != "connect":
            return
        started = time.time()
        try:
            clients = await connect_clients(job, state)
        except BenchError as exc:
            conn.send(("error", str(exc)))
            return
        conn.send(("ready", {"clients": len(clients), "started_at": started, "at": time.time()}))
        while True:
            kind, value = await inbox.get(_IDLE_LIMIT)
            if kind != "go":
                return
            conn.send(("result", await _run_phase(conn, clients, state, value, inbox)))
    finally:
        inbox.close()
        disconnect_all([c.transport for c in clients if c.transport is not None])


def client_process(conn: Connection, job: ClientJob) -> None:
    """Entry point of one load-generator process (started with the ``spawn`` method)."""
    die_with_parent()
    raise_nofile_limit()
    pin_to(job.cpus)
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        uvloop.run(_process_main(conn, job))


# --- the coordinator's side ---------------------------------------------------------------------


class ClientPool:
    """The load-generator processes of one measurement; ``close`` stops and reaps them.

    Use as a context manager. Every method that waits takes a deadline (``time.time()``) and
    raises :class:`BenchError` when a process fails, exits or misses it.
    """

    def __init__(self, jobs: Sequence[ClientJob]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.sizes = [len(job.members) for job in jobs]
        try:
            for job in jobs:
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=client_process,
                    args=(child, job),
                    name=f"bench-clients-{job.index}",
                    daemon=True,
                )
                self.procs.append(proc)
                self.conns.append(parent)
                proc.start()
                child.close()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, deadline: float) -> tuple[float, list[dict[str, Any]]]:
        """Wait until every process is up, tell them all to connect at once, wait until every
        client is set up. Returns the instant connecting began and each process's report."""
        self.gather("spawned", deadline)
        started = time.time()
        self.send(("connect", None))
        return started, self.gather("ready", deadline)

    def arm(self, phase: Phase) -> None:
        """Start ``phase`` in every process and wait until all count (before its deadline)."""
        self.send(("go", phase))
        self.gather("armed", phase.deadline)

    def results(self, phase: Phase, grace: float = 15.0) -> list[dict[str, Any]]:
        """The results of the armed ``phase`` (bounded by its deadline plus ``grace`` s)."""
        return self.gather("result", phase.deadline + grace)

    def gather(self, kind: str, deadline: float) -> list[Any]:
        """Wait for one ``kind`` message from every process until ``deadline`` (time.time())."""
        answers: dict[int, Any] = {}
        pending = {id(c): i for i, c in enumerate(self.conns)}
        while pending:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise BenchError(
                    f"{len(pending)} client process(es) did not report '{kind}' in time"
                )
            conns = [self.conns[i] for i in pending.values()]
            for conn in multiprocessing.connection.wait(conns, timeout=remaining):
                assert isinstance(conn, Connection)
                i = pending.pop(id(conn))
                try:
                    got, value = conn.recv()
                except (EOFError, OSError):
                    code = self.procs[i].exitcode
                    raise BenchError(
                        f"client process {i} exited (code {code}) before '{kind}'"
                    ) from None
                if got == "error":
                    raise BenchError(f"client process {i}: {value}")
                if got != kind:
                    raise BenchError(f"client process {i} said {got!r}, expected {kind!r}")
                answers[i] = value
        return [answers[i] for i in range(len(self.conns))]

    def send(self, message: tuple[str, Any]) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(message)

    def close(self) -> None:
        """Ask every process to stop, wait up to 5 s, then kill what is left. Never raises."""
        self.send(("stop", "done"))
        deadline = time.monotonic() + 5.0
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.join(timeout=max(deadline - time.monotonic(), 0.0))
        for proc in self.procs:
            with contextlib.suppress(Exception):
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=2.0)
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()


def plan_jobs(
    *,
    url: str,
    headers: dict[str, str],
    binary: bool,
    failure: bytes | None,
    groups: Sequence[ClientGroup],
    members: Sequence[int],
    processes: int,
    cpus: frozenset[int] | None,
    setup_timeout: float,
    connect_concurrency: int,
) -> list[ClientJob]:
    """Deal ``members`` (a group index per client) over ``processes`` jobs, round-robin, so that
    each process holds a fair share of every group."""
    if processes < 1 or processes > max(len(members), 1):
        raise ValueError("need at least one process and no more processes than clients")
    shares: list[list[int]] = [[] for _ in range(processes)]
    for i, group in enumerate(members):
        shares[i % processes].append(group)
    return [
        ClientJob(
            index=i,
            url=url,
            headers=headers,
            binary=binary,
            failure=failure,
            groups=tuple(groups),
            members=tuple(share),
            cpus=cpus,
            setup_timeout=setup_timeout,
            connect_concurrency=connect_concurrency,
        )
        for i, share in enumerate(shares)
    ]


def merge_results(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sum the per-process results of one phase (latency samples concatenated)."""
    firsts = [r["first_at"] for r in reports if r["first_at"] is not None]
    lasts = [r["last_at"] for r in reports if r["last_at"] is not None]
    sent: array[float] = array("d")
    latencies: array[float] = array("d")
    for r in reports:
        sent.frombytes(r["sent"])
        latencies.frombytes(r["latencies"])
    return {
        "received": sum(r["received"] for r in reports),
        "expected": sum(r["expected"] for r in reports),
        "complete": sum(r["complete"] for r in reports),
        "clients": sum(r["clients"] for r in reports),
        "lost": sum(r["lost"] for r in reports),
        "first_at": min(firsts) if firsts else None,
        "last_at": max(lasts) if lasts else None,
        "cpu_seconds": sum(r["cpu_seconds"] for r in reports),
        "sent": sent,
        "latencies": latencies,
    }


# --- the publisher (runs in the coordinator's process) ------------------------------------------


class Publisher(picows.WSListener):
    """The publisher connection: its set-up steps, then acknowledgement counting.

    Subclasses decide what to send (``start``) and may send more on each acknowledgement
    (``on_ack``). ``done`` resolves to the ``time.time()`` of the last acknowledgement once
    ``total`` messages are sent and acknowledged, or fails with :class:`BenchError` on an error
    answer or a closed connection.
    """

    def __init__(self, dialect: Dialect) -> None:
        super().__init__()
        self.steps = dialect.publisher_steps
        self.msg_type = _BINARY if dialect.binary else _TEXT
        self.binary = dialect.binary
        self.failure = dialect.failure
        self.ack_counter = dialect.new_ack_counter()
        self.step = 0
        self.set_up = False
        self.transport: picows.WSTransport | None = None
        self.loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.done: asyncio.Future[float] = self.loop.create_future()
        self.total = 0
        self.sent = 0
        self.acked = 0
        self.t0 = 0.0

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.transport = transport
        self._next_step()

    def _next_step(self) -> None:
        if self.step < len(self.steps):
            send = self.steps[self.step].send
            if send is not None and self.transport is not None:
                self.transport.send(self.msg_type, send)
            return
        self.set_up = True
        if not self.ready.done():
            self.ready.set_result(None)

    def _fail(self, message: str) -> None:
        error = BenchError(message)
        for future in (self.ready, self.done):
            if not future.done():
                future.set_exception(error)
                # Retrieved by whoever awaits; mark it so an unawaited one logs nothing.
                future.exception()

    def write(self, data: bytes) -> None:
        """Hand pre-built wire bytes (complete masked frames) to the kernel."""
        assert self.transport is not None
        self.transport.underlying_transport.write(data)

    def start(self) -> None:
        raise NotImplementedError

    def on_ack(self) -> None:
        """Called after each batch of acknowledgements while messages remain."""

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type not in _DATA:
            return
        data = frame.get_payload_as_bytes()
        if not self.set_up:
            if self.failure is not None and self.failure in data:
                self._fail(f"server refused publisher set-up step {self.step + 1}: {data[:300]!r}")
            elif self.steps[self.step].expect in data:
                self.step += 1
                self._next_step()
            return
        if self.failure is not None and self.failure in data:
            self._fail(f"server refused a publish after {self.acked} acks: {data[:300]!r}")
            return
        self.acked += self.ack_counter.feed(data)
        if self.total and self.acked >= self.total:
            if not self.done.done():
                self.done.set_result(time.time())
        else:
            self.on_ack()

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        if not self.set_up:
            self._fail("server closed the publisher connection during set-up")
        else:
            self._fail(
                f"server closed the publisher connection after {self.acked} of "
                f"{self.total} acknowledgements"
            )


class WindowPublisher(Publisher):
    """Sends pre-built chunks as fast as acknowledged, never more than ``window`` unanswered.

    ``chunks`` are wire bytes, each holding ``count`` complete frames written at once.
    """

    def __init__(self, dialect: Dialect, chunks: list[tuple[bytes, int]], window: int) -> None:
        super().__init__(dialect)
        self.chunks = chunks
        self.total = sum(count for _, count in chunks)
        self.window = window
        self.next_chunk = 0

    def start(self) -> None:
        self.t0 = time.time()
        self.on_ack()

    def on_ack(self) -> None:
        chunks = self.chunks
        i, sent = self.next_chunk, self.sent
        limit = self.acked + self.window
        write = self.transport.underlying_transport.write if self.transport else None
        if write is None:
            return
        while i < len(chunks) and sent + chunks[i][1] <= limit:
            data, count = chunks[i]
            write(data)
            sent += count
            i += 1
        self.next_chunk, self.sent = i, sent


class RatePublisher(Publisher):
    """Sends ``count`` messages at ``rate`` per second, each stamped with its send time.

    Message n (1-based) goes to ``topics[(n - 1) % len(topics)]``; the body is
    :func:`bench.baselines.wire.stamped_payload` of the ``time.time()`` just before the write.
    Sending does not wait for acknowledgements (an open loop: a server that falls behind shows
    it as latency); when the loop is late, messages due meanwhile are sent at once.
    """

    def __init__(
        self,
        dialect: Dialect,
        *,
        rate: float,
        count: int,
        topics: Sequence[str],
        body_size: int,
    ) -> None:
        super().__init__(dialect)
        if rate <= 0 or count < 1 or not topics:
            raise ValueError("rate must be positive, count at least 1, topics not empty")
        self.publish_frame = dialect.publish_frame
        self.rate = rate
        self.total = count
        self.topics = list(topics)
        self.body_size = body_size
        self.loop_t0 = 0.0

    def start(self) -> None:
        self.t0 = time.time()
        self.loop_t0 = self.loop.time()
        self._tick()

    def _tick(self) -> None:
        if self.done.done() or self.transport is None:
            return
        now = self.loop.time()
        due = min(self.total, int((now - self.loop_t0) * self.rate) + 1)
        topics = self.topics
        while self.sent < due:
            n = self.sent + 1
            body = stamped_payload(time.time(), self.body_size)
            payload = self.publish_frame(n, topics[(n - 1) % len(topics)], body)
            self.write(client_frame(payload, binary=self.binary))
            self.sent = n
        if self.sent < self.total:
            self.loop.call_at(self.loop_t0 + self.sent / self.rate, self._tick)


async def connect_publisher(
    factory: Callable[[], Publisher], url: str, headers: dict[str, str], within: float
) -> tuple[picows.WSTransport, Publisher]:
    """Connect the publisher and run its set-up steps, within ``within`` seconds.

    Raises :class:`BenchError` on a timeout or a refused step (the connection is dropped).
    """
    try:
        async with asyncio.timeout(within):
            transport, listener = await picows.ws_connect(
                factory, url, extra_headers=headers, websocket_handshake_timeout=within
            )
    except TimeoutError:
        raise BenchError(f"publisher not connected within {within:.0f} s") from None
    except OSError as exc:
        raise BenchError(f"publisher cannot connect: {describe(exc)}") from None
    assert isinstance(listener, Publisher)
    try:
        async with asyncio.timeout(within):
            await listener.ready
    except TimeoutError:
        transport.disconnect(graceful=False)
        raise BenchError(f"publisher set-up not answered within {within:.0f} s") from None
    except BaseException:
        transport.disconnect(graceful=False)
        raise
    return transport, listener


async def connect_and_drop(job: ClientJob) -> None:
    """Connect and set up the clients of ``job`` in this process, then drop them at once.

    Used to warm a server up (lazy imports, first-use caches) before measuring it. Raises
    :class:`BenchError` like :func:`connect_clients`.
    """
    clients = await connect_clients(job, _State())
    disconnect_all([c.transport for c in clients if c.transport is not None])
