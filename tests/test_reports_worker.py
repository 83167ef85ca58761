"""The ``reports`` job handler: what it extracts from a report, without a broker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from workers import JobContext, PermanentFailure, registry
from workers.reports import perl_maturity, process_report, summarize

FIXTURES = Path(__file__).parent / "data" / "cpantesters"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def test_perl5_fixture() -> None:
    assert summarize(fixture("perl5-valid.v3.json")) == {
        "dist": "Data-Printer",
        "version": "0.39",
        "grade": "pass",
        "reporter": "GARU <garu@cpan.org>",
        "platform": "darwin-2level",
        "perl": "5.24.1",
        "perl_maturity": "stable",
        "osname": "darwin",
        "osvers": "16.4.0",
    }


def test_perl6_fixture() -> None:
    summary = summarize(fixture("perl6-valid.v3.json"))
    assert summary["dist"] == "PackUnpack" and summary["version"] == "0.07"
    assert summary["perl"] == "2016.12-239-gc405f06"
    assert summary["perl_maturity"] == "dev"  # a Rakudo build past the 2016.12 release


@pytest.mark.parametrize(
    ("language", "version", "maturity"),
    [
        ("Perl 5", "5.24.1", "stable"),
        ("Perl 5", "5.25.3", "dev"),
        ("Perl 5", "5.36.0-RC1", "dev"),
        ("Perl 5", "5.38.0RC2", "dev"),
        ("Perl 5", "v5.40.0", "stable"),
        ("Perl 5", "blead", "dev"),
        ("Perl 6", "2017.07", "stable"),
        ("Perl 6", "2017.07-12-gabcdef", "dev"),
    ],
)
def test_perl_maturity(language: str, version: str, maturity: str) -> None:
    assert perl_maturity(language, version) == maturity


def test_missing_os_fields_come_from_the_perl_configuration() -> None:
    report = fixture("perl5-valid.v3.json")
    del report["environment"]["system"]["osversion"]
    report["environment"]["system"]["osname"] = ""
    del report["environment"]["language"]["archname"]
    summary = summarize(report)
    assert (summary["osname"], summary["osvers"], summary["platform"]) == (
        "darwin",
        "16.4.0",
        "darwin-2level",
    )


def test_grades_are_lower_cased_and_reporter_may_be_email_only() -> None:
    report = fixture("perl5-valid.v3.json")
    report["result"]["grade"] = "FAIL"
    del report["reporter"]["name"]
    summary = summarize(report)
    assert summary["grade"] == "fail" and summary["reporter"] == "garu@cpan.org"


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r.pop("distribution"),
        lambda r: r["distribution"].update(version=""),
        lambda r: r["result"].update(grade="great"),
        lambda r: r["environment"]["language"].pop("version"),
        lambda r: r.update(environment="linux"),
    ],
)
def test_unusable_reports_fail_for_good(damage: Any) -> None:
    report = fixture("perl5-valid.v3.json")
    damage(report)
    with pytest.raises(PermanentFailure):
        summarize(report)


def run_handler(ctx: JobContext) -> Any:
    async def go() -> Any:
        return await process_report(ctx)

    return asyncio.run(go())


def _context(payload: Any, progress: list[Any]) -> JobContext:
    async def report(data: Any) -> None:
        progress.append(data)

    return JobContext(
        job="j1", queue="reports", attempt=1, payload=payload, lease=30.0, report=report
    )


def test_the_handler_reports_progress_and_returns_the_summary() -> None:
    assert registry.get("reports") is process_report
    progress: list[Any] = []
    payload = {
        "task": "process_report",
        "id": "r-1",
        "received_at": 60.0,
        "report": fixture("perl5-valid.v3.json"),
    }
    result = run_handler(_context(payload, progress))
    assert result["guid"] == "r-1" and result["date"] == "1970-01-01T00:01:00Z"
    assert result["dist"] == "Data-Printer" and result["grade"] == "pass"
    assert progress == [
        {
            "stage": "parsed",
            "report": "r-1",
            "dist": "Data-Printer",
            "version": "0.39",
            "grade": "pass",
        }
    ]


@pytest.mark.parametrize("payload", [None, {"id": "x"}, {"report": {}}, {"id": 5, "report": {}}])
def test_the_handler_refuses_payloads_that_are_not_report_jobs(payload: Any) -> None:
    with pytest.raises(PermanentFailure):
        run_handler(_context(payload, []))
