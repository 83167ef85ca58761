"""The public pages in a real browser, fed by messages published on their live topics: the home
feed and search, empty states, phone width, no layout shift as rows arrive."""

from __future__ import annotations

import time
from typing import Any

import pytest

from .conftest import BrokerProcess, ms, screenshot

PHONE = {"width": 390, "height": 844}


def report(n: int, grade: str, **fields: Any) -> dict[str, Any]:
    return {
        "guid": f"page-test-{n}-{time.monotonic_ns()}",
        "dist": "Page-Test",
        "version": "1.0",
        "grade": grade,
        "perl": "5.38.2",
        "osname": "linux",
        "osvers": "6.1.0",
        "platform": "x86_64-linux",
        "reporter": "Tester <tester@example.org>",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
    }


def boxes(page: Any, selectors: list[str]) -> list[dict[str, float]]:
    return [page.locator(s).bounding_box() for s in selectors]


def test_home_streams_the_latest_reports_without_moving_the_page(
    page: Any, own_broker: BrokerProcess
) -> None:
    broker = own_broker  # a fresh one: the feed starts empty
    page.goto(broker.url + "/")
    page.wait_for_selector("#conn[data-state=open]")
    page.get_by_text("Waiting for reports").wait_for()
    still = ["#search", "#feed", "footer.bottom"]
    before = boxes(page, still)

    for n, grade in enumerate(["pass", "fail", "na", "unknown", "pass", "pass"]):
        broker.publish("reports/new", report(n, grade, dist=f"Home-Dist-{n}"))
    rows = page.locator("#feed tbody tr[data-grade]")
    page.wait_for_function(
        "() => document.querySelectorAll('#feed tbody tr[data-grade]').length === 6"
    )
    assert boxes(page, still) == before, "rows arriving must not move the page"
    first = rows.first
    assert "Home-Dist-5 1.0" in first.inner_text()
    assert "new" in (first.get_attribute("class") or ""), "a new row is highlighted"
    # Readable without colour: every grade carries its word and a symbol.
    assert [rows.nth(i).locator(".grade").inner_text() for i in (1, 2, 3, 4)] == [
        "✔ pass",
        "? unknown",
        "⊘ na",
        "✘ fail",
    ]
    assert first.locator("a").first.get_attribute("href").startswith("/report/page-test-5-")
    screenshot(page, "home")


def test_search_goes_to_the_author_or_the_distribution(page: Any, broker: BrokerProcess) -> None:
    page.goto(broker.url + "/")
    page.fill("#q", "Data::Printer")
    page.press("#q", "Enter")
    page.wait_for_url("**/dist/Data-Printer")
    page.go_back()
    page.fill("#q", "PREACTION")
    page.press("#q", "Enter")
    page.wait_for_url("**/author/PREACTION")
    page.go_back()
    page.fill("#q", "garu")
    page.click("button[value=author]")
    page.wait_for_url("**/author/GARU")
    page.go_back()
    page.fill("#q", "no spaces/allowed")
    page.click("button[value=dist]")
    page.get_by_text("Names are letters, digits").wait_for()
    assert page.url.endswith("/")


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/author/NOBODYHERE", "No releases by NOBODYHERE are known yet."),
        ("/dist/No-Such-Dist", "No test reports for No-Such-Dist yet."),
        ("/dist/No-Such-Dist/0.01", "No test reports for No-Such-Dist 0.01 yet."),
        ("/report/00000000-0000-0000-0000-000000000000", "No report with this id is known here."),
    ],
)
def test_empty_states(page: Any, broker: BrokerProcess, path: str, text: str) -> None:
    page.goto(broker.url + path)
    page.get_by_text(text).wait_for(timeout=ms(5))
    if not path.startswith("/report/"):
        page.wait_for_selector("#conn[data-state=open]")


def test_not_found_page(page: Any, broker: BrokerProcess) -> None:
    response = page.goto(broker.url + "/author/has%20space")
    assert response.status == 404
    assert "That author name is not valid" in page.inner_text("main")


def test_author_page_counts_and_feed_from_live_topics(page: Any, broker: BrokerProcess) -> None:
    """Without the report pipeline: the page follows `reports/author/<id>` and the summaries."""
    page.goto(broker.url + "/author/LIVEAUTHOR")
    page.wait_for_selector("#conn[data-state=open]")
    page.get_by_text("No releases by LIVEAUTHOR").wait_for()
    before = boxes(page, ["#releases", "#feed", "footer.bottom"])
    broker.publish(
        "reports/author/LIVEAUTHOR",
        report(1, "fail", dist="Live-Dist", version="0.02", author="LIVEAUTHOR"),
    )
    row = page.locator("#releases tr[data-release='Live-Dist/0.02']")
    row.wait_for()
    assert page.locator("#feed tbody tr[data-grade=fail]").count() == 1
    broker.publish(
        "summary/dist/Live-Dist/0.02",
        {"dist": "Live-Dist", "version": "0.02", "pass": 3, "fail": 1, "na": 0, "unknown": 2},
    )
    page.wait_for_function(
        "() => document.querySelector(\"#releases tr[data-release='Live-Dist/0.02'] .c-total\")"
        ".textContent === '6'"
    )
    assert row.locator("td.c-fail").inner_text() == "1"
    assert "1 release · 6 reports: 3 pass, 1 fail, 0 na, 2 unknown" in page.inner_text("#summary")
    # An older summary arriving late never lowers a count.
    broker.publish(
        "summary/dist/Live-Dist/0.02",
        {"dist": "Live-Dist", "version": "0.02", "pass": 2, "fail": 1, "na": 0, "unknown": 2},
    )
    broker.publish(
        "summary/dist/Live-Dist/0.02",
        {"dist": "Live-Dist", "version": "0.02", "pass": 4, "fail": 1, "na": 0, "unknown": 2},
    )
    page.wait_for_function(
        "() => document.querySelector(\"#releases tr[data-release='Live-Dist/0.02'] .c-pass\")"
        ".textContent === '4'"
    )
    assert boxes(page, ["#releases", "#feed", "footer.bottom"]) == before


@pytest.mark.parametrize("path", ["/", "/author/PHONEAUTHOR", "/dist/Phone-Dist", "/ops"])
def test_phone_width_has_no_sideways_scrolling(
    browser: Any, broker: BrokerProcess, path: str
) -> None:
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        page.goto(broker.url + path)
        if path != "/ops":
            page.wait_for_selector("#conn[data-state=open]")
        broker.publish("reports/new", report(9, "fail", dist="A-Rather-Long-Distribution-Name"))
        if path == "/":
            page.locator("#feed tbody tr[data-grade]").first.wait_for()
            screenshot(page, "home-phone")
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"{path} is {width}px wide on a {PHONE['width']}px screen"
    finally:
        context.close()
