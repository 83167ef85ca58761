"""Statistics of the reports, as small plugins kept fresh as reports land.

A plugin is a named set of counters. For each processed report it names the counters the report
adds one to (:meth:`StatPlugin.keys`); the pipeline bumps those counters in the store in the same
transaction as the report's summary row, so a counter can neither miss a report nor count one
twice, and nothing is ever recomputed from scratch. The plugin then updates its copy in memory
(:meth:`StatPlugin.update`), which the HTTP API reads and which is published on
``stats/<name>`` when it changed. On start the copies are loaded from the store.

Limits: every key is a counter row, so a plugin must draw its keys from a small set (grades,
OS names, Perl versions, days); keys longer than :data:`MAX_KEY` characters are cut. Counters
live in one process: with several broker nodes on one database each node's copy only sees the
reports it applied until it restarts (the store's counters are always complete).
"""

from __future__ import annotations

import abc
import datetime
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from broker.store.base import ReportSummary

__all__ = ["MAX_KEY", "StatPlugin", "default_plugins"]

MAX_KEY = 64


class StatPlugin(abc.ABC):
    """One statistic: counters keyed by a property of the report.

    Subclasses set :attr:`name` (a topic segment: it becomes ``stats/<name>``) and
    :attr:`description` and implement :meth:`keys`.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.updated_at: float | None = None

    @abc.abstractmethod
    def keys(self, report: ReportSummary) -> Sequence[str]:
        """The counters ``report`` adds one to (usually one)."""

    def counter_keys(self, report: ReportSummary) -> list[str]:
        """:meth:`keys`, each cut to :data:`MAX_KEY` characters."""
        return [key[:MAX_KEY] for key in self.keys(report)]

    def update(self, report: ReportSummary) -> bool:
        """Count ``report`` in memory; True when a counter changed."""
        keys = self.counter_keys(report)
        for key in keys:
            self.counts[key] = self.counts.get(key, 0) + 1
        if keys:
            self.updated_at = time.time()
        return bool(keys)

    def load(self, counts: Mapping[str, int]) -> None:
        """Replace the counters in memory with those read from the store."""
        self.counts = dict(counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def snapshot(self) -> dict[str, Any]:
        """The statistic as the API shows it and ``stats/<name>`` carries it."""
        return {
            "name": self.name,
            "description": self.description,
            "total": self.total,
            "counts": dict(sorted(self.counts.items())),
            "updated_at": self.updated_at,
        }

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "description": self.description, "topic": f"stats/{self.name}"}


class Grades(StatPlugin):
    name = "grades"
    description = "reports by grade: pass, fail, na, unknown"

    def keys(self, report: ReportSummary) -> Sequence[str]:
        return (report.grade,)


class OperatingSystems(StatPlugin):
    name = "os"
    description = "reports by operating system name (Perl's $^O: linux, darwin, MSWin32, ...)"

    def keys(self, report: ReportSummary) -> Sequence[str]:
        return (report.osname or "unknown",)


class PerlVersions(StatPlugin):
    name = "perl"
    description = "reports by the version of Perl that ran the tests"

    def keys(self, report: ReportSummary) -> Sequence[str]:
        return (report.perl or "unknown",)


class Daily(StatPlugin):
    name = "daily"
    description = "reports received per day (UTC)"

    def keys(self, report: ReportSummary) -> Sequence[str]:
        day = datetime.datetime.fromtimestamp(report.received_at, datetime.UTC)
        return (day.strftime("%Y-%m-%d"),)


DEFAULT_PLUGINS: tuple[type[StatPlugin], ...] = (Grades, OperatingSystems, PerlVersions, Daily)


def default_plugins(classes: Iterable[type[StatPlugin]] = DEFAULT_PLUGINS) -> list[StatPlugin]:
    """One fresh instance of each plugin class."""
    return [cls() for cls in classes]
