"""/ops in a real browser: the admin token, workers joining and leaving, failed jobs retried and
cancelled with a click, live queue figures and charts, the topic tail."""

from __future__ import annotations

from typing import Any

from tests.helpers import token

from .conftest import (
    ADMIN,
    BrokerProcess,
    ms,
    screenshot,
    start_worker,
    until,
)


def open_ops(page: Any, broker: BrokerProcess, tok: str = ADMIN) -> None:
    page.goto(broker.url + "/ops")
    page.fill("#token", tok)
    page.click("text=Use token")


def job_state(broker: BrokerProcess, job_id: str) -> str:
    with broker.http() as client:
        state: str = client.get(f"/api/v1/jobs/{job_id}").json()["state"]
        return state


def enqueue(broker: BrokerProcess, queue: str, payload: Any, **fields: Any) -> str:
    with broker.http() as client:
        r = client.post("/api/v1/jobs", json={"queue": queue, "payload": payload, **fields})
        assert r.status_code == 201, r.text
        job: str = r.json()["job"]
        return job


def test_token_is_checked_and_kept_in_the_tab(page: Any, broker: BrokerProcess) -> None:
    page.goto(broker.url + "/ops")
    page.fill("#token", "garbage")
    page.click("text=Use token")
    page.get_by_text("The token was refused").wait_for()
    page.fill("#token", token(sub="reader", roles=("subscriber",)))
    page.click("text=Use token")
    page.get_by_text("does not have the admin role").wait_for()
    assert page.locator("#dashboard").is_hidden()

    page.fill("#token", ADMIN)
    page.click("text=Use token")
    page.locator("#dashboard").wait_for(state="visible")
    page.wait_for_selector("#conn[data-state=open]")
    assert page.evaluate("() => sessionStorage.getItem('quicksilver.ops.token')") == ADMIN
    assert page.input_value("#token") == "", "the token does not stay in the field"
    page.reload()
    page.locator("#dashboard").wait_for(state="visible")
    page.click("#forget")
    page.wait_for_load_state()
    assert page.evaluate("() => sessionStorage.getItem('quicksilver.ops.token')") is None
    assert page.locator("#dashboard").is_hidden()


def test_workers_join_and_leave_and_failed_jobs_are_retried(
    page: Any, broker: BrokerProcess
) -> None:
    open_ops(page, broker)
    page.wait_for_selector("#conn[data-state=open]")
    workers = page.locator("#workers tbody tr[data-session]")
    assert workers.count() == 0

    worker = start_worker(broker, "t-flaky", "t-stall", sub="ops-worker-1")
    killed = False
    try:
        row = page.locator("#workers tr[data-name='ops-worker-1']")
        row.wait_for(timeout=ms(10))
        assert "t-flaky, t-stall" in row.inner_text()

        # A job that fails its only attempt, then succeeds when retried from the page.
        failing = enqueue(broker, "t-flaky", {"succeed_on": 2}, max_attempts=1)
        until(lambda: job_state(broker, failing) == "failed")
        job_row = page.locator(f"#jobs tr[data-job='{failing}']")
        job_row.wait_for(timeout=ms(5))
        assert "✘ failed" in job_row.inner_text()
        assert "attempt 1 fails on purpose" in job_row.inner_text()
        page.locator("#queues tr[data-queue='t-flaky']").wait_for()
        page.fill("#tail-pattern", "jobs/*")
        page.click("#tail-form button[type=submit]")
        # Charts need two samples (2 s apart) before they draw a line.
        page.wait_for_function(
            "() => document.querySelectorAll('#cards polyline').length >= 4", timeout=ms(10)
        )
        page.locator("#queues tr[data-queue='t-flaky'] polyline").first.wait_for(state="attached")
        assert int(page.inner_text("[data-card=connections]")) >= 1
        job_row.locator("button[data-action=retry]").click()
        page.wait_for_selector(f"#jobs tr[data-job='{failing}'][data-state=done]", timeout=ms(10))
        assert "✔ done" in job_row.inner_text()
        assert job_state(broker, failing) == "done"
        assert job_row.locator("button[data-action=retry]").is_disabled()
        page.locator("#tail li").nth(2).wait_for()  # queued, active, done of the retried job
        screenshot(page, "ops")

        # A job whose worker dies mid-attempt waits as retrying; cancel it from the page.
        stalled = enqueue(broker, "t-stall", {})
        until(lambda: job_state(broker, stalled) == "active")
        worker.kill()
        killed = True
        row.wait_for(state="detached", timeout=ms(10))
        page.get_by_text("No worker is connected.").wait_for()
        stalled_row = page.locator(f"#jobs tr[data-job='{stalled}']")
        stalled_row.wait_for(timeout=ms(10))
        assert stalled_row.get_attribute("data-state") == "retrying"
        stalled_row.locator("button[data-action=cancel]").click()
        page.wait_for_selector(f"#jobs tr[data-job='{stalled}'][data-state=cancelled]")
        assert job_state(broker, stalled) == "cancelled"
    finally:
        if not killed:
            worker.stop()
    assert page.locator("#latency svg[data-histogram=job_pickup_seconds] polyline").count() >= 1


def test_topic_tail(page: Any, broker: BrokerProcess) -> None:
    open_ops(page, broker)
    page.wait_for_selector("#conn[data-state=open]")
    page.fill("#tail-pattern", "not a//pattern")
    page.click("#tail-form button[type=submit]")
    page.get_by_text("not a valid topic pattern").wait_for()

    page.fill("#tail-pattern", "tail-test/*")
    page.click("#tail-form button[type=submit]")
    page.get_by_text("subscribed, waiting for messages").wait_for()
    broker.publish("tail-test/a", {"hello": "world"})
    broker.publish("tail-test/b", [1, 2, 3])
    page.wait_for_function("() => document.querySelectorAll('#tail li').length === 2")
    lines = page.locator("#tail li").all_inner_texts()
    assert "tail-test/b #1 [1,2,3]" in lines[0]
    assert 'tail-test/a #1 {"hello":"world"}' in lines[1]
    page.click("#tail-stop")
    broker.publish("tail-test/a", "after stop")
    page.click("#tail-clear")
    page.fill("#tail-pattern", "tail-test/a")
    page.click("#tail-form button[type=submit]")
    broker.publish("tail-test/a", "again")
    page.wait_for_function("() => document.querySelectorAll('#tail li').length === 1")
    assert "#3" in page.inner_text("#tail li")
