"""The ``reports`` queue: turn a raw CPAN Testers report into its summary fields.

The broker enqueues one ``process_report`` job per report received on ``POST /v3/report``; its
payload is ``{"task": "process_report", "id": <report id>, "received_at": <unix seconds>,
"report": <the report as posted>}``. This handler extracts what summaries and statistics need,
reports its progress on ``jobs/<id>``, and returns the fields as the job's result::

    {"guid", "dist", "version", "grade", "reporter", "platform", "perl", "perl_maturity",
     "osname", "osvers", "date"}

It writes nothing itself: workers may run on other machines, so the broker applies the result
(summary row, release counts, statistics, live topics) when the job is done.

Failure behaviour: a payload that is not a report job, or a report without a distribution name
and version, a grade or a Perl version, fails the job for good (``PermanentFailure``: retrying
cannot help). Fields that are merely missing (OS version, archname, reporter) become ``""`` or
are read from the Perl configuration summary in ``environment.language.build`` when it has them.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from typing import Any

from .registry import JobContext, PermanentFailure, handler

__all__ = ["perl_maturity", "process_report", "summarize"]

GRADES = ("pass", "fail", "na", "unknown")
_PERL5_VERSION = re.compile(r"v?5\.(\d+)\.(\d+)")
_BUILD_FIELD = re.compile(r"\b(osname|osvers|archname)=([^,\s]+)")


def perl_maturity(language: str, version: str) -> str:
    """``dev`` for a development Perl: an odd Perl 5 minor version (5.25.x) or a release
    candidate; a Perl 6 build past a release (``2016.12-239-gc405f06``). Else ``stable``."""
    if language == "Perl 6":
        return "dev" if "-" in version else "stable"
    match = _PERL5_VERSION.match(version)
    if match is None:
        return "dev"
    if int(match.group(1)) % 2 or re.search(r"RC|-", version[match.end() :], re.IGNORECASE):
        return "dev"
    return "stable"


def _text(node: Mapping[str, Any], key: str) -> str:
    value = node.get(key)
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


def _object(node: Any, key: str) -> Mapping[str, Any]:
    value = node.get(key) if isinstance(node, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _build_fields(build: str) -> dict[str, str]:
    """``osname``, ``osvers`` and ``archname`` from Perl's ``-V`` summary, when present."""
    found: dict[str, str] = {}
    for name, value in _BUILD_FIELD.findall(build):
        found.setdefault(name, value.strip("'\""))
    return found


def summarize(report: Mapping[str, Any]) -> dict[str, str]:
    """The summary fields of one report (without ``guid`` and ``date``).

    Raises :class:`PermanentFailure` when the report lacks what no summary can do without."""
    distribution = _object(report, "distribution")
    environment = _object(report, "environment")
    language = _object(environment, "language")
    system = _object(environment, "system")
    result = _object(report, "result")
    reporter = _object(report, "reporter")

    dist, version = _text(distribution, "name"), _text(distribution, "version")
    if not dist or not version:
        raise PermanentFailure("the report names no distribution name and version")
    grade = _text(result, "grade").lower()
    if grade not in GRADES:
        raise PermanentFailure(f"the report's grade {grade!r} is not one of {', '.join(GRADES)}")
    perl = _text(language, "version")
    if not perl:
        raise PermanentFailure("the report names no Perl version")
    language_name = _text(language, "name") or "Perl 5"
    build = _build_fields(_text(language, "build"))

    name, email = _text(reporter, "name"), _text(reporter, "email")
    who = f"{name} <{email}>" if name and email else name or email
    return {
        "dist": dist,
        "version": version,
        "grade": grade,
        "reporter": who,
        "platform": _text(language, "archname") or build.get("archname", ""),
        "perl": perl.removeprefix("v"),
        "perl_maturity": perl_maturity(language_name, perl),
        "osname": _text(system, "osname") or build.get("osname", ""),
        "osvers": _text(system, "osversion") or build.get("osvers", ""),
    }


@handler("reports")
async def process_report(job: JobContext) -> dict[str, str]:
    """Handle one ``process_report`` job: parse, report progress, return the summary."""
    payload = job.payload
    if not isinstance(payload, Mapping) or not isinstance(payload.get("report"), Mapping):
        raise PermanentFailure("not a process_report job: the payload has no 'report' object")
    report_id = payload.get("id")
    if not isinstance(report_id, str) or not report_id:
        raise PermanentFailure("not a process_report job: the payload has no report 'id'")
    summary = summarize(payload["report"])
    received = payload.get("received_at")
    stamp = received if isinstance(received, int | float) and received > 0 else 0
    summary["guid"] = report_id
    summary["date"] = datetime.datetime.fromtimestamp(int(stamp), datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    await job.progress(
        {
            "stage": "parsed",
            "report": report_id,
            "dist": summary["dist"],
            "version": summary["version"],
            "grade": summary["grade"],
        }
    )
    return summary
