"""The report pipeline on the broker: intake, the applying of worker results, uploads, statistics.

The path of one report::

    POST /v3/report ─▶ validate (spec's NewReport) ─▶ one transaction: the report row and its
    process_report job (queue ``reports``, unique key = report id) ─▶ 201 {"id"}
        ─▶ a worker (any machine) parses it and answers ``done`` with the summary fields
        ─▶ the broker, once the store has the job done, applies the result in one transaction:
           summary row, release counts, statistics counters, report marked done
        ─▶ publishes the report on ``reports/new``, ``reports/dist/<dist>``,
           ``reports/dist/<dist>/<version>``, ``reports/author/<author>`` and the release's new
           counts on ``summary/dist/<dist>/<version>``; changed statistics on ``stats/<name>``.

Why the broker applies the result and not the worker: workers may run on other machines and
cannot write the SQLite file; the broker writes it anyway and has the topics at hand. The apply
step runs from the dispatcher's ``done_hooks`` callback for the reports queue, after the store
committed the job as done. It is idempotent (the summary row is keyed by the report id, and
counts only move when that row is new), so a retried job, a worker that answers twice or the
catch-up below never count a report twice. If the broker stops between the two transactions,
the catch-up at the next start applies the results of done jobs whose report is still pending.

Nothing is lost when no worker is connected: the job waits in the store.

Latency of every report, from its arrival to the publication of its summary, goes into the
``quicksilver_report_pipeline_seconds`` histogram of ``/metrics``; the last
``latency_window`` values give exact p50/p99 for ``/api/v1/stats``.

Failure behaviour: a worker result that does not have the summary fields is logged and counted
as rejected (the job stays done, the report stays pending, and ``POST /api/v1/jobs/<id>/retry``
does not apply to done jobs: fix the worker and re-post the report). A store that is unavailable
while applying is retried three times with a short pause, then left to the catch-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from broker.metrics import LATENCY_BUCKETS
from broker.store.base import (
    IncomingReport,
    JobRecord,
    NewJob,
    ReleaseRecord,
    ReportSummary,
    UploadRecord,
)
from protocol.errors import BadRequest, Unavailable, UsageError
from protocol.topics import is_valid_topic

from .spec import format_date_time
from .stats import StatPlugin, default_plugins

if TYPE_CHECKING:
    from broker.core import Broker

__all__ = [
    "ReportPipeline",
    "release_to_api",
    "summary_from_job",
    "summary_to_api",
    "upload_to_api",
    "version_maturity",
]

log = logging.getLogger("quicksilver.reports")

TASK = "process_report"
_DEV_VERSION = re.compile(r"_|-TRIAL\b", re.IGNORECASE)
_SUMMARY_FIELDS = (
    "dist",
    "version",
    "grade",
    "reporter",
    "platform",
    "perl",
    "perl_maturity",
    "osname",
    "osvers",
)
_APPLY_ATTEMPTS = 3
#: Levels of arrays and objects a report may have: a job frame carries it two levels down, and
#: frames may nest 64 levels.
MAX_REPORT_NESTING = 60


def version_maturity(version: str) -> str:
    """``dev`` for a CPAN developer release (``1.002_001``, ``1.0-TRIAL``), else ``stable``."""
    return "dev" if _DEV_VERSION.search(version) else "stable"


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: equal values give equal text (the duplicate check)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _nesting_within(value: Any, limit: int) -> bool:
    """Whether no array or object in ``value`` lies more than ``limit`` levels deep (walks
    containers only, so it costs little next to the report's size)."""
    if limit < 0:
        return False
    children = value.values() if type(value) is dict else value if type(value) is list else ()
    for child in children:
        kind = type(child)
        if (kind is dict or kind is list) and not _nesting_within(child, limit - 1):
            return False
    return True


def summary_to_api(summary: ReportSummary) -> dict[str, str]:
    """The spec's ``ReportSummary``."""
    return {
        "guid": summary.guid,
        "date": format_date_time(summary.received_at),
        "grade": summary.grade,
        "reporter": summary.reporter,
        "dist": summary.dist,
        "version": summary.version,
        "platform": summary.platform,
        "perl": summary.perl,
        "osname": summary.osname,
        "osvers": summary.osvers,
    }


def release_to_api(release: ReleaseRecord) -> dict[str, Any]:
    """The spec's ``Release`` (``author`` left out while no upload names one)."""
    out: dict[str, Any] = {"dist": release.dist, "version": release.version}
    if release.author is not None:
        out["author"] = release.author
    out.update(release.counts())
    return out


def upload_to_api(upload: UploadRecord) -> dict[str, str]:
    """The spec's ``Upload``."""
    return {
        "dist": upload.dist,
        "version": upload.version,
        "author": upload.author,
        "filename": upload.filename,
        "released": format_date_time(upload.released),
    }


def summary_from_job(rec: JobRecord) -> ReportSummary:
    """The summary a worker returned for a ``process_report`` job, checked.

    The report id and arrival time come from the job's payload (set by the broker), the
    release maturity from the version; everything else from the result. Raises
    :class:`UsageError` naming what is wrong."""
    payload, result = rec.payload, rec.result
    if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
        raise UsageError(f"job {rec.id} is not a {TASK} job (no report id in its payload)")
    if not isinstance(result, dict):
        raise UsageError(f"job {rec.id}: the result is not an object")
    missing = [name for name in _SUMMARY_FIELDS if not isinstance(result.get(name), str)]
    if missing:
        raise UsageError(f"job {rec.id}: the result lacks string field(s) {', '.join(missing)}")
    if result.get("guid", payload["id"]) != payload["id"]:
        raise UsageError(f"job {rec.id}: the result is for another report")
    return ReportSummary(
        guid=payload["id"],
        received_at=float(payload.get("received_at") or rec.created_at),
        maturity=version_maturity(result["version"]),
        **{name: result[name] for name in _SUMMARY_FIELDS},
    )


class ReportPipeline:
    """The broker's half of the report pipeline (see the module docstring)."""

    def __init__(
        self,
        broker: Broker,
        *,
        plugins: Sequence[StatPlugin] | None = None,
        latency_window: int = 10_000,
    ) -> None:
        self.broker = broker
        self.settings = broker.settings
        self.queue = broker.settings.reports_queue
        self.plugins: dict[str, StatPlugin] = {
            p.name: p for p in (default_plugins() if plugins is None else plugins)
        }
        for name in self.plugins:
            if not is_valid_topic(f"stats/{name}") or "/" in name:
                raise UsageError(f"statistics plugin name {name!r} is not a topic segment")
        metrics = broker.metrics
        self.latency = metrics.histogram(
            "report_pipeline_seconds",
            "time from a test report's arrival to the publication of its summary",
            LATENCY_BUCKETS,
        )
        self.recent: deque[float] = deque(maxlen=latency_window)
        self.received = 0
        self.duplicates = 0
        self.applied = 0
        self.rejected = 0
        self.uploads = 0
        metrics.gauge("reports_received", "test reports accepted", lambda: self.received)
        metrics.gauge("reports_duplicate", "test reports posted again", lambda: self.duplicates)
        metrics.gauge("reports_applied", "test reports summarised", lambda: self.applied)
        metrics.gauge(
            "reports_rejected", "worker results that were not summaries", lambda: self.rejected
        )
        self._dirty: set[str] = set()
        self._stats_task: asyncio.Task[None] | None = None
        self._stats_wake = asyncio.Event()

    # --- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the statistics, hook into job completion, catch up on pending results."""
        counts = await self.broker.store.report_stats()
        for plugin in self.plugins.values():
            plugin.load(counts.get(plugin.name, {}))
        self.broker.jobs.done_hooks[self.queue] = self._job_done
        self._stats_task = asyncio.create_task(self._publish_stats(), name="report-stats")
        self.broker.spawn(self.catch_up(), name="report-catch-up")

    async def stop(self) -> None:
        self.broker.jobs.done_hooks.pop(self.queue, None)
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task

    # --- intake ---------------------------------------------------------------------------

    async def submit(self, report: dict[str, Any], max_attempts: int = 5) -> tuple[str, bool]:
        """Store a validated report and enqueue its job; returns ``(id, duplicate)``.

        A report equal to one already stored (same JSON, whatever the key order) is not stored
        again: the first one's id comes back with ``duplicate=True``. The report must be a
        decoded JSON object whose integers fit 64 bits and whose floats are finite (the HTTP
        route parses it so); one nested too deeply or holding a lone surrogate raises
        :class:`BadRequest`."""
        if not _nesting_within(report, MAX_REPORT_NESTING):
            raise BadRequest(f"the report is nested more than {MAX_REPORT_NESTING} levels deep")
        body = canonical_json(report)
        try:
            encoded = body.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(
                "the report holds a lone surrogate, which UTF-8 cannot carry"
            ) from None
        digest = hashlib.sha256(encoded).hexdigest()
        report_id = str(uuid.uuid4())
        now = time.time()
        job = NewJob(
            queue=self.queue,
            payload={"task": TASK, "id": report_id, "received_at": now, "report": report},
            unique_key=report_id,
            max_attempts=max_attempts,
        )
        # The payload as JSON, around the report's text already encoded (the same value).
        payload_json = (
            f'{{"task":"{TASK}","id":"{report_id}","received_at":{now!r},"report":{body}}}'
        )
        stored_id, rec = await self.broker.store.add_report(
            IncomingReport(report_id, now, digest, body), job, payload_json
        )
        if rec is None:
            self.duplicates += 1
            return stored_id, True
        self.received += 1
        self.broker.jobs.accepted(rec)
        return stored_id, False

    async def record_upload(
        self, dist: str, version: str, author: str, filename: str, released: float
    ) -> UploadRecord:
        """Record an upload and publish it on ``uploads/dist/<dist>`` and
        ``uploads/author/<author>`` (names must be topic segments)."""
        upload = UploadRecord(dist, version, author, filename, released, version_maturity(version))
        await self.broker.store.record_upload(upload)
        self.uploads += 1
        data = upload_to_api(upload)
        self._publish(f"uploads/dist/{dist}", data)
        self._publish(f"uploads/author/{author}", data)
        return upload

    # --- applying results -----------------------------------------------------------------

    def _job_done(self, rec: JobRecord) -> None:
        self.broker.spawn(self.apply(rec), name=f"apply-{rec.id}")

    async def apply(self, rec: JobRecord) -> bool:
        """Apply the result of a done ``process_report`` job; True when it counted (False for a
        result applied before, or one that is not a summary)."""
        try:
            summary = summary_from_job(rec)
        except UsageError as exc:
            self.rejected += 1
            log.warning("report result not applied: %s", exc)
            return False
        stats = {name: p.counter_keys(summary) for name, p in self.plugins.items()}
        release: ReleaseRecord | None = None
        for attempt in range(1, _APPLY_ATTEMPTS + 1):
            try:
                release = await self.broker.store.apply_report(summary, stats)
                break
            except Unavailable as exc:
                if attempt == _APPLY_ATTEMPTS:
                    log.error(
                        "report %s not applied (left for the catch-up): %s", summary.guid, exc
                    )
                    return False
                await asyncio.sleep(0.2 * attempt)
        if release is None:
            return False
        self._announce(summary, release)
        for name, plugin in self.plugins.items():
            if plugin.update(summary):
                self._dirty.add(name)
        if self._dirty:
            self._stats_wake.set()
        latency = max(0.0, time.time() - summary.received_at)
        self.latency.observe(latency)
        self.recent.append(latency)
        self.applied += 1
        return True

    def _announce(self, summary: ReportSummary, release: ReleaseRecord) -> None:
        data: dict[str, Any] = summary_to_api(summary)
        if release.author is not None:
            data["author"] = release.author
        dist, version = summary.dist, summary.version
        self._publish("reports/new", data)
        self._publish(f"reports/dist/{dist}", data)
        self._publish(f"reports/dist/{dist}/{version}", data)
        if release.author is not None:
            self._publish(f"reports/author/{release.author}", data)
        self._publish(f"summary/dist/{dist}/{version}", release_to_api(release))

    def _publish(self, topic: str, data: Any) -> None:
        # Names come from reports; one that cannot be a topic gets no live message (the data
        # is still stored and served by /v3).
        if is_valid_topic(topic):
            self.broker.publish(topic, data)
        else:
            log.debug("not published: %r is not a valid topic name", topic)

    async def catch_up(self, batch: int = 500) -> int:
        """Apply the results of done jobs whose report is still pending; returns how many."""
        applied = 0
        seen: set[str] = set()
        while True:
            recs = [
                r for r in await self.broker.store.unapplied_report_jobs(batch) if r.id not in seen
            ]
            if not recs:
                return applied
            for rec in recs:
                seen.add(rec.id)
                if await self.apply(rec):
                    applied += 1

    # --- statistics -----------------------------------------------------------------------

    async def _publish_stats(self) -> None:
        interval = self.settings.stats_publish_interval
        while True:
            await self._stats_wake.wait()
            self._stats_wake.clear()
            dirty, self._dirty = self._dirty, set()
            for name in sorted(dirty):
                self.broker.publish(f"stats/{name}", self.plugins[name].snapshot())
            await asyncio.sleep(interval)

    def latency_summary(self) -> dict[str, Any]:
        """p50 and p99 of the last reports' arrival→publication latency, in seconds."""
        values = sorted(self.recent)
        if not values:
            return {"samples": 0, "p50": None, "p99": None, "max": None}

        def rank(q: float) -> float:
            return values[min(len(values) - 1, int(q * len(values)))]

        return {
            "samples": len(values),
            "p50": round(rank(0.50), 6),
            "p99": round(rank(0.99), 6),
            "max": round(values[-1], 6),
        }

    def overview(self) -> dict[str, Any]:
        """``GET /api/v1/stats``: totals, latency and every statistic's counters."""
        grades = self.plugins.get("grades")
        return {
            "reports": grades.total if grades is not None else self.applied,
            "received": self.received,
            "duplicates": self.duplicates,
            "applied": self.applied,
            "rejected": self.rejected,
            "latency": self.latency_summary(),
            "stats": {name: p.snapshot()["counts"] for name, p in self.plugins.items()},
        }
