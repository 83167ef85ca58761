"""Webhooks: every message on a topic pattern is POSTed to a registered URL.

An administrator registers ``(url, pattern)`` (HTTP API ``/api/v1/webhooks``, CLI
``quicksilver webhook``). Each message matching the pattern becomes a delivery job on the queue
``webhooks:<webhook id>``; an in-process worker POSTs it::

    POST <url>
    Content-Type: application/json
    X-Quicksilver-Webhook: <webhook id>
    X-Quicksilver-Delivery: <job id>            (the same on every attempt: deduplicate on it)
    X-Quicksilver-Attempt: <n>
    X-Quicksilver-Timestamp: <unix seconds>
    X-Quicksilver-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

    {"webhook":"<id>","topic":"...","offset":N,"epoch":"...","ts":<float>,"data":<value>}

A 2xx answer completes the job. Anything else (another status, a timeout, a network error) fails
the attempt; the job is retried with exponential back-off and full jitter
(``webhook_backoff_base``/``_cap``) until ``max_attempts``, then it is ``failed``: visible in the
job list and ``/ops``, and an administrator's ``POST /api/v1/jobs/<id>/retry`` sends it again.

Order per webhook: one delivery at a time per webhook, oldest message first, and a delivery that
is waiting for its retry holds back the ones after it. Each delivery job's priority is minus the
microsecond it was accepted, so a retried job always outranks the newer ones in its queue (the
store hands out the highest priority first), across restarts too. A delivery that failed for good
no longer holds the others back; retried by hand, it goes out before the ones still waiting.

Secrets are kept in the store and never shown again: the API and CLI show a generated secret once,
when the webhook is created. Registrations live in the store's key-value table and are read at
start; a broker node sees changes made through itself (several nodes over one database each
deliver what reaches them, deduplicated by the job's unique key while the first is unfinished).

The worker never delivers messages about its own work: ``jobs/<id>`` state messages of webhook
delivery jobs and ``queues/webhooks:...`` figures are skipped, so a ``**`` webhook cannot feed
itself. Messages wait in a bounded intake (``webhook_intake_max``) until stored as jobs; beyond it
the oldest are dropped and counted (the ``webhook_intake_dropped`` gauge).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from auth.tokens import Secret
from protocol.errors import BadRequest, Conflict, NotFound
from protocol.topics import parse_pattern

from . import __version__
from .jobstate import JobState, backoff_delay
from .pushpull import announce
from .store.base import JobRecord, NewJob
from .taps import Tap, TapMessage
from .webhook_http import DeliveryError, check_url, post

if TYPE_CHECKING:
    from .core import Broker

log = logging.getLogger("quicksilver.webhooks")

QUEUE_PREFIX = "webhooks:"
META_KEY = "webhooks"
MIN_SECRET = 16
MAX_SECRET = 1024
SIGNATURE_HEADER = "X-Quicksilver-Signature"
TIMESTAMP_HEADER = "X-Quicksilver-Timestamp"
_INTAKE_CHUNK = 1000


def signature(secret: str, timestamp: int | str, body: bytes) -> str:
    """The signature header value: ``sha256=`` and the hex HMAC-SHA256 of
    ``"<timestamp>.<body>"`` keyed with the secret's UTF-8 bytes."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode("ascii") + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str,
    timestamp: str,
    body: bytes,
    header: str,
    *,
    tolerance: float = 300.0,
    now: float | None = None,
) -> bool:
    """What a receiver checks: the signature matches (in constant time) and the timestamp is
    within ``tolerance`` seconds of ``now`` (refusing replays of old deliveries)."""
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, sent, body), header)


@dataclass(frozen=True, slots=True)
class Webhook:
    """One registration. ``secret`` never appears in :meth:`to_api` nor in a repr."""

    id: str
    url: str
    pattern: str
    secret: Secret
    max_attempts: int
    description: str | None
    created_at: float

    @property
    def queue(self) -> str:
        return QUEUE_PREFIX + self.id

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "pattern": self.pattern,
            "queue": self.queue,
            "max_attempts": self.max_attempts,
            "description": self.description,
            "created_at": self.created_at,
        }

    def to_store(self) -> dict[str, Any]:
        return {**self.to_api(), "secret": self.secret.reveal()}

    @classmethod
    def from_store(cls, obj: Any) -> Webhook:
        if not isinstance(obj, dict):
            raise ValueError("a stored webhook must be an object")
        return cls(
            id=str(obj["id"]),
            url=str(obj["url"]),
            pattern=parse_pattern(obj["pattern"]),
            secret=Secret(str(obj["secret"])),
            max_attempts=int(obj["max_attempts"]),
            description=obj.get("description"),
            created_at=float(obj["created_at"]),
        )


@dataclass(frozen=True, slots=True)
class Registration:
    """A validated request to register a webhook (``secret`` None: generate one)."""

    url: str
    pattern: str
    secret: str | None
    max_attempts: int | None
    description: str | None


def parse_registration(body: Any) -> Registration:
    """Validate ``{"url", "pattern", "secret"?, "max_attempts"?, "description"?}``; raises
    :class:`BadRequest` with a message naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("body must be an object with 'url' and 'pattern'")
    url = body.get("url")
    if not isinstance(url, str):
        raise BadRequest("'url' must be a string (http:// or https://)")
    try:
        check_url(url)
    except ValueError as exc:
        raise BadRequest(f"'url': {exc}") from None
    pattern = parse_pattern(body.get("pattern"))
    secret = body.get("secret")
    if secret is not None and (
        not isinstance(secret, str) or not MIN_SECRET <= len(secret) <= MAX_SECRET
    ):
        raise BadRequest(f"'secret' must be a string of {MIN_SECRET} to {MAX_SECRET} characters")
    max_attempts = body.get("max_attempts")
    if max_attempts is not None and (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= 1000
    ):
        raise BadRequest("'max_attempts' must be an integer from 1 to 1000")
    description = body.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > 1000):
        raise BadRequest("'description' must be a string of at most 1000 characters")
    return Registration(url, pattern, secret, max_attempts, description)


def is_own_traffic(message: TapMessage) -> bool:
    """Messages about the webhook worker's own jobs and queues (never delivered)."""
    topic = message.topic
    if topic.startswith("jobs/"):
        data = message.data
        queue = data.get("queue") if isinstance(data, dict) else None
        return isinstance(queue, str) and queue.startswith(QUEUE_PREFIX)
    return topic.startswith("queues/" + QUEUE_PREFIX)


class _Active:
    """A registered webhook at work on this node."""

    __slots__ = ("blocked_until", "removed", "tap", "task", "wake", "webhook")

    def __init__(self, webhook: Webhook) -> None:
        self.webhook = webhook
        self.wake = asyncio.Event()
        self.blocked_until = 0.0
        self.removed = False
        self.tap: Tap | None = None
        self.task: asyncio.Task[None] | None = None


class Webhooks:
    """The registrations of one broker, their taps and their delivering tasks."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.settings = broker.settings
        self.store = broker.store
        self.worker = "webhooks"
        self._active: dict[str, _Active] = {}
        self._intake: deque[tuple[_Active, NewJob]] = deque()
        self._intake_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._last_priority = 0
        self.dropped = 0
        self.running = False
        m = broker.metrics
        m.gauge("webhooks", "registered webhooks", lambda: len(self._active))
        m.gauge(
            "webhook_intake_pending",
            "messages waiting to become deliveries",
            lambda: len(self._intake),
        )
        m.gauge(
            "webhook_intake_dropped",
            "messages dropped since start because the intake was full (cumulative)",
            lambda: self.dropped,
        )

    # --- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self.running = True
        for webhook in await self._load():
            await self._activate(webhook)

    async def stop(self) -> None:
        """Stop delivering; messages already taken in are stored first (bounded wait)."""
        self.running = False
        for act in self._active.values():
            if act.tap is not None:
                act.tap.close()
        if self._intake_task is not None and not self._intake_task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._intake_task), 5.0)
        tasks = [act.task for act in self._active.values() if act.task is not None]
        if self._intake_task is not None:
            tasks.append(self._intake_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _load(self) -> list[Webhook]:
        raw = await self.store.get_meta(META_KEY)
        if raw is None:
            return []
        try:
            entries = json.loads(raw)["webhooks"]
        except (ValueError, KeyError, TypeError):
            log.error("the stored webhook registrations cannot be read; none are active")
            return []
        hooks = []
        for entry in entries:
            try:
                hooks.append(Webhook.from_store(entry))
            except Exception as exc:
                log.error("skipping a stored webhook that cannot be read: %s", exc)
        return hooks

    async def _save(self, hooks: list[Webhook]) -> None:
        text = json.dumps({"webhooks": [h.to_store() for h in hooks]}, ensure_ascii=False)
        await self.store.set_meta(META_KEY, text)

    async def _activate(self, webhook: Webhook) -> None:
        act = _Active(webhook)
        # A delivery waiting for its retry holds back the newer ones, restart or not.
        waiting = await self.store.list_jobs(state=JobState.RETRYING, queue=webhook.queue)
        act.blocked_until = max((rec.run_at for rec in waiting), default=0.0)
        act.tap = Tap.open(self.broker.hub, webhook.pattern, lambda ms: self._take(act, ms))
        act.task = asyncio.create_task(self._deliver_loop(act), name=f"webhook:{webhook.id}")
        self._active[webhook.id] = act

    # --- registrations --------------------------------------------------------------------------

    def registered(self) -> list[Webhook]:
        return sorted((a.webhook for a in self._active.values()), key=lambda w: w.created_at)

    def get(self, webhook_id: str) -> Webhook:
        act = self._active.get(webhook_id)
        if act is None:
            raise NotFound(f"no webhook {webhook_id}")
        return act.webhook

    async def add(self, reg: Registration) -> tuple[Webhook, str | None]:
        """Register a webhook; returns it and the generated secret (None when one was given)."""
        generated = None if reg.secret is not None else secrets.token_urlsafe(32)
        webhook = Webhook(
            id=secrets.token_hex(8),
            url=reg.url,
            pattern=reg.pattern,
            secret=Secret(reg.secret if reg.secret is not None else generated or ""),
            max_attempts=reg.max_attempts or self.settings.webhook_max_attempts,
            description=reg.description,
            created_at=time.time(),
        )
        async with self._lock:
            await self._save([*self.registered(), webhook])
            await self._activate(webhook)
        log.info("webhook %s registered for %r", webhook.id, webhook.pattern)
        return webhook, generated

    async def remove(self, webhook_id: str) -> int:
        """Unregister a webhook and cancel its unfinished deliveries; returns how many were
        cancelled. Raises :class:`NotFound`."""
        async with self._lock:
            act = self._active.get(webhook_id)
            if act is None:
                raise NotFound(f"no webhook {webhook_id}")
            await self._save([h for h in self.registered() if h.id != webhook_id])
            del self._active[webhook_id]
        act.removed = True
        if act.tap is not None:
            act.tap.close()
        if act.task is not None:
            act.task.cancel()
            await asyncio.gather(act.task, return_exceptions=True)
        cancelled = 0
        for state in (JobState.QUEUED, JobState.RETRYING, JobState.ACTIVE):
            while True:
                recs = await self.store.list_jobs(state=state, queue=act.webhook.queue, limit=500)
                for rec in recs:
                    with contextlib.suppress(Conflict, NotFound):
                        await self.broker.jobs.cancel(rec.id)
                        cancelled += 1
                if len(recs) < 500:
                    break
        return cancelled

    # --- intake ---------------------------------------------------------------------------------

    def _priority(self) -> int:
        priority = min(-(time.time_ns() // 1000), self._last_priority - 1)
        self._last_priority = priority
        return priority

    def _take(self, act: _Active, messages: list[TapMessage]) -> None:
        webhook = act.webhook
        intake = self._intake
        for m in messages:
            if is_own_traffic(m):
                continue
            key = hashlib.sha256(f"{m.topic}\0{m.epoch}\0{m.offset}".encode()).hexdigest()[:32]
            job = NewJob(
                queue=webhook.queue,
                payload={
                    "webhook": webhook.id,
                    "topic": m.topic,
                    "offset": m.offset,
                    "epoch": m.epoch,
                    "ts": m.ts,
                    "data": m.data,
                },
                priority=self._priority(),
                max_attempts=webhook.max_attempts,
                unique_key=f"webhook:{webhook.id}:{key}",
            )
            intake.append((act, job))
        overflow = len(intake) - self.settings.webhook_intake_max
        if overflow > 0:
            for _ in range(overflow):
                intake.popleft()
            self.dropped += overflow
            log.warning("webhook intake full: dropped %d message(s)", overflow)
        if intake and (self._intake_task is None or self._intake_task.done()):
            self._intake_task = asyncio.create_task(self._store_intake(), name="webhook-intake")

    async def _store_intake(self) -> None:
        intake = self._intake
        while intake:
            batch = [intake.popleft() for _ in range(min(len(intake), _INTAKE_CHUNK))]
            batch = [(act, job) for act, job in batch if not act.removed]
            if not batch:
                continue
            try:
                await self.broker.jobs.enqueue_many([job for _, job in batch])
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("storing %d webhook deliveries failed; trying again", len(batch))
                intake.extendleft(reversed(batch))
                await asyncio.sleep(self.settings.webhook_poll_interval)
                continue
            for act in {id(a): a for a, _ in batch}.values():
                act.wake.set()

    # --- delivery -------------------------------------------------------------------------------

    async def _deliver_loop(self, act: _Active) -> None:
        queue = act.webhook.queue
        woken = True
        while True:
            try:
                now = time.time()
                if act.blocked_until > now:
                    await asyncio.sleep(act.blocked_until - now)
                    woken = True
                    continue
                if not woken and not await self._due(queue):
                    woken = await self._sleep(act)
                    continue
                act.wake.clear()
                jobs = await self.store.claim(self.worker, [queue], 1, self.settings.job_lease)
                if not jobs:
                    woken = await self._sleep(act)
                    continue
                announce(self.broker, jobs[0])
                await self._attempt(act, jobs[0])
                woken = True
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook %s: delivery round failed", act.webhook.id)
                woken = await self._sleep(act)

    async def _due(self, queue: str) -> bool:
        at = await self.store.next_run_at([queue])
        return at is not None and at <= time.time()

    async def _sleep(self, act: _Active) -> bool:
        """Wait for new deliveries or the poll interval; True when woken."""
        try:
            await asyncio.wait_for(act.wake.wait(), self.settings.webhook_poll_interval)
        except TimeoutError:
            return False
        return True

    async def _attempt(self, act: _Active, rec: JobRecord) -> None:
        webhook = act.webhook
        settings = self.settings
        body = json.dumps(
            rec.payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode("utf-8")
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"quicksilver/{__version__}",
            "X-Quicksilver-Webhook": webhook.id,
            "X-Quicksilver-Delivery": rec.id,
            "X-Quicksilver-Attempt": str(rec.attempt),
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: signature(webhook.secret.reveal(), timestamp, body),
        }
        timeout = min(settings.webhook_timeout, settings.job_lease / 2)
        status: int | None = None
        error: str | None = None
        try:
            status = await post(webhook.url, body, headers, seconds=timeout)
        except DeliveryError as exc:
            error = str(exc)
        else:
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        metrics = self.broker.metrics
        if error is None:
            done = await self.store.complete(
                rec.id, rec.attempt, {"status": status}, worker=self.worker
            )
            if done is not None:
                metrics.jobs_done += 1
        else:
            delay = backoff_delay(
                rec.attempt, base=settings.webhook_backoff_base, cap=settings.webhook_backoff_cap
            )
            done = await self.store.fail(
                rec.id, rec.attempt, error, True, delay, worker=self.worker
            )
            if done is not None and done.state is JobState.RETRYING:
                act.blocked_until = done.run_at
                metrics.jobs_retried += 1
            elif done is not None:
                metrics.jobs_failed += 1
                log.warning(
                    "webhook %s: delivery %s failed for good after %d attempts: %s",
                    webhook.id,
                    rec.id,
                    rec.attempt,
                    error,
                )
        if done is None:
            log.warning(
                "webhook %s: delivery %s was taken away during the attempt", webhook.id, rec.id
            )
            return
        announce(self.broker, done)
