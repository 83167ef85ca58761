"""Process counters and gauges, rendered in the Prometheus text format for ``GET /metrics``.

Counters are plain attributes incremented on the hot path (an attribute add costs less than any
registry lookup); gauges are read from live objects when ``/metrics`` is scraped.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable


class Histogram:
    """A cumulative histogram with fixed bucket bounds (seconds)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = sorted(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (None when empty)."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return self.bounds[i] if i < len(self.bounds) else float("inf")
        return float("inf")

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            cumulative += n
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.total:.6f}")
        lines.append(f"{name}_count {self.count}")
        return lines


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Everything ``/metrics`` reports. Counters only grow; gauges come from callbacks."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.published = 0
        self.errors_sent = 0
        self.auth_failures = 0
        self.slow_consumer_closes = 0
        self.oversize_closes = 0
        self.keepalive_timeouts = 0
        self.http_requests = 0
        self.jobs_enqueued = 0
        self.jobs_done = 0
        self.jobs_failed = 0
        self.jobs_retried = 0
        self.jobs_dispatched = 0
        self.job_conflicts = 0
        self.pickup_latency = Histogram(LATENCY_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.histograms: dict[str, tuple[str, Histogram]] = {}

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def histogram(
        self, name: str, help_text: str, bounds: Iterable[float] = LATENCY_BUCKETS
    ) -> Histogram:
        """Register a histogram rendered as ``quicksilver_<name>``; returns it to observe into.
        Registering a name again returns the histogram already registered."""
        if name not in self.histograms:
            self.histograms[name] = (help_text, Histogram(bounds))
        return self.histograms[name][1]

    def render(self) -> str:
        counters = [
            ("connections_total", "WebSocket connections accepted"),
            ("messages_in", "frames received from clients"),
            ("messages_out", "frames sent to clients"),
            ("bytes_in", "bytes received in WebSocket frames"),
            ("bytes_out", "bytes sent in WebSocket frames"),
            ("published", "messages published"),
            ("errors_sent", "error frames sent"),
            ("auth_failures", "refused authentications"),
            ("slow_consumer_closes", "connections closed with 1013 for overflowing their buffer"),
            ("oversize_closes", "connections closed with 1009 for an oversized frame"),
            ("keepalive_timeouts", "connections closed for not answering pings"),
            ("http_requests", "HTTP API requests"),
            ("jobs_enqueued", "jobs accepted"),
            ("jobs_done", "jobs finished successfully"),
            ("jobs_failed", "jobs failed for good"),
            ("jobs_retried", "job attempts that will be retried"),
            ("jobs_dispatched", "jobs pushed to workers"),
            ("job_conflicts", "late done/fail frames refused by fencing"),
        ]
        lines: list[str] = []
        for attr, help_text in counters:
            name = f"quicksilver_{attr}" + ("" if attr.endswith("_total") else "_total")
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            lines.append(f"{name} {getattr(self, attr)}")
        for name, (help_text, read) in sorted(self.gauges.items()):
            full = f"quicksilver_{name}"
            lines += [f"# HELP {full} {help_text}", f"# TYPE {full} gauge", f"{full} {read():g}"]
        lines += self.pickup_latency.render(
            "quicksilver_job_pickup_seconds", "time from a job becoming ready to its dispatch"
        )
        for name, (help_text, histogram) in sorted(self.histograms.items()):
            lines += histogram.render(f"quicksilver_{name}", help_text)
        return "\n".join(lines) + "\n"
