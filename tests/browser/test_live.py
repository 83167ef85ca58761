"""The report pages against the whole pipeline: reports posted to ``POST /v3/report``, a real
``quicksilver worker`` process turning them into summaries, the pages updating without reload,
and catching up after a broker restart."""

from __future__ import annotations

import copy
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import ROOT, token

from .conftest import (
    BrokerProcess,
    WorkerProcess,
    ms,
    screenshot,
    spawn,
    until,
)
from .test_client import Gate

FIXTURE = ROOT.parent / "shared" / "data" / "cpantesters" / "perl5-valid.v3.json"


def _pipeline_installed() -> bool:
    from broker.cpantesters.routes import ROUTES

    return any(getattr(r, "path", "") == "/v3/report" for r in ROUTES)


pytestmark = pytest.mark.skipif(
    not _pipeline_installed(), reason="the report pipeline (/v3) is not installed"
)


def base_report() -> dict[str, Any]:
    if FIXTURE.exists():
        data: dict[str, Any] = json.loads(FIXTURE.read_text())
        return data
    return {
        "reporter": {"name": "Tester", "email": "tester@example.org"},
        "environment": {
            "language": {"name": "Perl 5", "version": "5.38.2", "archname": "x86_64-linux"},
            "system": {"osname": "linux", "osversion": "6.1.0"},
        },
        "distribution": {"name": "Data-Printer", "version": "0.39"},
        "result": {"grade": "pass", "output": {"test": "All tests successful.\nResult: PASS"}},
    }


def make_report(
    dist: str,
    version: str,
    grade: str = "pass",
    *,
    osname: str = "linux",
    perl: str = "5.38.2",
    test_output: str | None = None,
) -> dict[str, Any]:
    report = copy.deepcopy(base_report())
    report["distribution"]["name"] = dist
    report["distribution"]["version"] = version
    report["environment"]["language"]["version"] = perl
    report["environment"]["system"]["osname"] = osname
    report["result"]["grade"] = grade
    report["result"]["comments"] = f"{grade} report {secrets.token_hex(4)}"  # never a duplicate
    if test_output is not None:
        report["result"]["output"]["test"] = test_output
    return report


def post_report(broker: BrokerProcess, report: dict[str, Any]) -> str:
    with broker.http(None) as client:
        r = client.post("/v3/report", json=report)
        assert r.status_code == 201, r.text
        report_id: str = r.json()["id"]
        return report_id


def upload(broker: BrokerProcess, dist: str, version: str, author: str) -> None:
    with broker.http() as client:
        r = client.post(
            "/api/v1/uploads", json={"dist": dist, "version": version, "author": author}
        )
        assert r.status_code == 201, r.text


def counts(broker: BrokerProcess, dist: str, version: str) -> dict[str, int]:
    with broker.http(None) as client:
        r = client.get(f"/v3/release/dist/{dist}/{version}", headers={"Cache-Control": "no-cache"})
        if r.status_code == 404:
            return {}
        body = r.json()
        return {g: body.get(g, 0) for g in ("pass", "fail", "na", "unknown")}


def wait_counted(broker: BrokerProcess, dist: str, version: str, **expected: int) -> None:
    until(lambda: all(counts(broker, dist, version).get(g) == n for g, n in expected.items()), 20)


def names() -> tuple[str, str]:
    """A fresh author and distribution for one test."""
    tag = secrets.token_hex(3)
    return f"WEBUI{tag.upper()}", f"Webui-Test-{tag}"


def start_reports_worker(broker: BrokerProcess) -> WorkerProcess:
    args = [
        "worker",
        "--url",
        broker.ws_url,
        "--token",
        token(sub="reports-worker", roles=("worker",)),
    ]
    return WorkerProcess(spawn([*args, "--queue", "reports"]))


@pytest.fixture(scope="module")
def reports_worker(broker: BrokerProcess) -> Iterator[WorkerProcess]:
    worker = start_reports_worker(broker)
    try:
        yield worker
    finally:
        worker.stop()


def release_cell(page: Any, dist: str, version: str, cell: str) -> Any:
    return page.locator(f"#releases tr[data-release='{dist}/{version}'] td.c-{cell}")


def test_author_page_shows_a_new_report_and_its_counts_within_a_second(
    page: Any, broker: BrokerProcess, reports_worker: WorkerProcess
) -> None:
    author, dist = names()
    upload(broker, dist, "1.00", author)
    upload(broker, dist, "1.01", author)
    post_report(broker, make_report(dist, "1.00", "pass"))
    post_report(broker, make_report(dist, "1.01", "pass", osname="darwin"))
    wait_counted(broker, dist, "1.01", **{"pass": 1})

    page.goto(f"{broker.url}/author/{author}")
    page.wait_for_selector("#conn[data-state=open]")
    assert release_cell(page, dist, "1.01", "pass").inner_text() == "1"
    assert release_cell(page, dist, "1.01", "fail").inner_text() == "0"
    page.wait_for_function("() => window.performance.now() > 0")  # the page has settled
    before = page.locator("#feed").bounding_box(), page.locator("footer").bounding_box()

    start = time.monotonic()
    report_id = post_report(broker, make_report(dist, "1.01", "fail", perl="5.36.0"))
    row = page.locator(f"#feed tr[data-id='{report_id}']")
    row.wait_for(timeout=ms(1))
    page.wait_for_function(
        "([sel]) => document.querySelector(sel).textContent === '1'",
        arg=[f"#releases tr[data-release='{dist}/1.01'] td.c-fail"],
        timeout=ms(1),
    )
    elapsed = time.monotonic() - start
    print(f"report posted → row and counts on the author page: {elapsed * 1000:.0f} ms")
    assert "new" in (row.get_attribute("class") or "")
    assert "✘ fail" in row.inner_text() and f"{dist} 1.01" in row.inner_text()
    assert release_cell(page, dist, "1.01", "total").inner_text() == "2"
    assert "2 releases · 3 reports: 2 pass, 1 fail" in page.inner_text("#summary")
    assert (page.locator("#feed").bounding_box(), page.locator("footer").bounding_box()) == before
    screenshot(page, "author")


def test_author_page_catches_up_after_a_broker_restart(
    page: Any, own_broker: BrokerProcess
) -> None:
    author, dist = names()
    worker = start_reports_worker(own_broker)
    gate = Gate()
    page.route_web_socket("**/ws", gate)
    try:
        upload(own_broker, dist, "2.00", author)
        page.goto(f"{own_broker.url}/author/{author}")
        page.wait_for_selector("#conn[data-state=open]")
        first = post_report(own_broker, make_report(dist, "2.00", "pass"))
        page.locator(f"#feed tr[data-id='{first}']").wait_for()

        gate.open = False  # hold the page off until the test has posted what it will miss
        own_broker.stop()
        page.wait_for_selector("#conn[data-state=reconnecting]")
        own_broker.start()
        missed = post_report(own_broker, make_report(dist, "2.00", "fail"))
        wait_counted(own_broker, dist, "2.00", **{"pass": 1, "fail": 1})
        assert page.locator(f"#feed tr[data-id='{missed}']").count() == 0
        gate.open = True

        page.locator(f"#feed tr[data-id='{missed}']").wait_for(timeout=ms(20))
        page.wait_for_function(
            "([sel]) => document.querySelector(sel).textContent === '1'",
            arg=[f"#releases tr[data-release='{dist}/2.00'] td.c-fail"],
        )
        page.wait_for_selector("#conn[data-state=open]")
        assert int(page.get_attribute("#conn", "data-reconnects") or 0) >= 1
        assert page.locator("#feed tbody tr[data-id]").count() == 2
        # And it is live again.
        after = post_report(own_broker, make_report(dist, "2.00", "na"))
        page.locator(f"#feed tr[data-id='{after}']").wait_for(timeout=ms(2))
    finally:
        worker.stop()


def test_distribution_page_splits_grades_by_os_and_perl(
    page: Any, broker: BrokerProcess, reports_worker: WorkerProcess
) -> None:
    author, dist = names()
    upload(broker, dist, "0.10", author)
    upload(broker, dist, "0.11", author)
    post_report(broker, make_report(dist, "0.10", "pass", osname="linux", perl="5.38.2"))
    post_report(broker, make_report(dist, "0.11", "fail", osname="linux", perl="5.36.0"))
    wait_counted(broker, dist, "0.11", fail=1)

    page.goto(f"{broker.url}/dist/{dist}")
    page.wait_for_selector("#conn[data-state=open]")
    page.locator("#by-os tr[data-key=linux]").wait_for()
    post_report(broker, make_report(dist, "0.11", "na", osname="darwin", perl="5.38.2"))
    post_report(broker, make_report(dist, "0.11", "unknown", osname="MSWin32", perl="5.36.0"))
    post_report(broker, make_report(dist, "0.11", "pass", osname="darwin", perl="5.40.0"))
    page.locator("#by-perl tr[data-key='5.40.0']").wait_for(timeout=ms(2))
    page.wait_for_function(
        "() => document.querySelectorAll('#feed tbody tr[data-id]').length === 5", timeout=ms(2)
    )

    def split(table: str) -> dict[str, list[str]]:
        rows = page.locator(f"#{table} tbody tr[data-key]")
        out = {}
        for i in range(rows.count()):
            cells = rows.nth(i).locator("td.num").all_inner_texts()
            out[rows.nth(i).get_attribute("data-key")] = cells
        return out

    assert split("by-os") == {
        "MSWin32": ["0", "0", "0", "1"],
        "darwin": ["1", "0", "1", "0"],
        "linux": ["1", "1", "0", "0"],
    }
    assert split("by-perl") == {
        "5.40.0": ["1", "0", "0", "0"],
        "5.38.2": ["1", "0", "1", "0"],
        "5.36.0": ["0", "1", "0", "1"],
    }
    assert list(split("by-perl")) == ["5.40.0", "5.38.2", "5.36.0"], "newest Perl first"
    page.wait_for_function(
        "([sel]) => document.querySelector(sel).textContent === '4'",
        arg=[f"#releases tr[data-release='{dist}/0.11'] td.c-total"],
    )
    assert author in page.inner_text("#summary")
    screenshot(page, "dist")

    # One release: only its reports.
    page.goto(f"{broker.url}/dist/{dist}/0.10")
    page.locator("#by-os tr[data-key=linux]").wait_for()
    assert page.locator("#by-os tbody tr[data-key]").count() == 1
    assert "1 reports: 1 pass" in page.inner_text("#summary")


def test_report_page_shows_its_output_sections(
    page: Any, broker: BrokerProcess, reports_worker: WorkerProcess
) -> None:
    _author, dist = names()
    lines = ["t/00-load.t .. ok", "t/01-fail.t ..", "not ok 3 - it works"]
    output = "\n".join([*lines, "#   Failed test 'it works'", "Result: FAIL"])
    report_id = post_report(broker, make_report(dist, "3.14", "fail", test_output=output))
    page.goto(f"{broker.url}/report/{report_id}")
    page.locator(".report h1 .grade").wait_for()
    assert " ".join(page.inner_text(".report h1").split()) == f"✘ fail {dist} 3.14"
    sections = page.locator("details.output-section")
    names_ = [sections.nth(i).get_attribute("data-section") for i in range(sections.count())]
    expected = [
        s
        for s in ("configure", "build", "test", "install")
        if s in base_report()["result"]["output"] or s == "test"
    ]
    assert names_ == expected
    test_section = page.locator("details[data-section=test]")
    assert test_section.get_attribute("open") is not None
    problems = test_section.locator("mark.problem").all_text_contents()
    assert problems == [
        "problem: not ok 3 - it works",
        "problem: #   Failed test 'it works'",
        "problem: Result: FAIL",
    ]
    assert "2 flagged" not in test_section.inner_text() and "3 flagged" in test_section.inner_text()
    facts = page.inner_text("dl.facts")
    assert "linux" in facts and "5.38.2" in facts
    if base_report()["distribution"].get("prerequisites"):
        rows = page.locator("table.prereqs tbody tr")
        assert rows.count() == len(base_report()["distribution"]["prerequisites"])
    page.click("button.wrap-toggle")
    assert page.get_attribute("button.wrap-toggle", "aria-pressed") == "true"
    screenshot(page, "report")
