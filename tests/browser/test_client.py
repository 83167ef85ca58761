"""webui/static/quicksilver.js in a real browser against a real broker process: auth, requests,
backfill, resuming with ``since`` after a dropped connection and after a broker restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ADMIN, BrokerProcess, ms, until

# A page-side harness: one Client, one subscription, everything it sees kept on window.
HARNESS = """async ([topic, options]) => {
  const qs = await import("/static/quicksilver.js");
  const client = new qs.Client({ minDelay: 100, maxDelay: 500, token: options.token || null });
  window.got = []; window.gaps = []; window.states = [];
  client.addEventListener("state", (e) => window.states.push(e.detail.state));
  client.connect();
  window.client = client;
  window.sub = client.subscribe(topic, (m) => window.got.push(m), {
    backfill: options.backfill || 0,
    onGap: (info) => window.gaps.push(info),
  });
  await window.sub.ready;
  return client.state;
}"""


class Gate:
    """Routes the page's WebSockets through Playwright so a test can cut them and hold the page
    off the broker: while closed, every new connection is closed at once (1011)."""

    def __init__(self) -> None:
        self.open = True
        self.live: list[Any] = []

    def __call__(self, ws: Any) -> None:
        if not self.open:
            ws.close(code=1011, reason="held off by the test")
            return
        ws.connect_to_server()
        self.live.append(ws)

    def cut(self) -> None:
        self.open = False
        for ws in self.live:
            ws.close(code=1011, reason="cut by the test")
        self.live.clear()


def got(page: Any) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = page.evaluate("window.got")
    return result


def test_resumes_with_since_after_a_dropped_connection(page: Any, broker: BrokerProcess) -> None:
    gate = Gate()
    page.route_web_socket("**/ws", gate)
    page.goto(broker.url + "/")
    topic = "reports/client-test/resume"
    assert page.evaluate(HARNESS, [topic, {}]) == "open"
    broker.publish(topic, {"n": 1})
    until(lambda: len(got(page)) == 1)

    gate.cut()
    page.wait_for_function("() => window.client.state !== 'open'", timeout=ms(5))
    broker.publish(topic, {"n": 2})
    broker.publish(topic, {"n": 3})
    gate.open = True
    until(lambda: len(got(page)) == 3)

    messages = got(page)
    assert [m["data"]["n"] for m in messages] == [1, 2, 3]
    assert [m["offset"] for m in messages] == [1, 2, 3]
    assert len({m["epoch"] for m in messages}) == 1
    assert page.evaluate("window.client.reconnects") >= 1
    assert page.evaluate("window.gaps") == [], "same epoch, history complete: nothing missing"
    assert page.evaluate("window.sub.position") == {"epoch": messages[0]["epoch"], "offset": 3}
    broker.publish(topic, {"n": 4})
    until(lambda: len(got(page)) == 4)
    assert page.evaluate("window.got.map((m) => m.offset)") == [1, 2, 3, 4], "no duplicate"


def restart_while_held_off(page: Any, broker: BrokerProcess, gate: Gate, topic: str) -> str:
    """Publish 1, restart the broker while the page is held off, publish 2 and 3, let the page
    back; returns the epoch of message 1."""
    page.evaluate(HARNESS, [topic, {}])
    broker.publish(topic, {"n": 1})
    until(lambda: len(got(page)) == 1)
    epoch: str = got(page)[0]["epoch"]
    gate.open = False  # the page may not come back before the test has published
    broker.stop()
    page.wait_for_function("() => window.client.state === 'reconnecting'", timeout=ms(5))
    broker.start()
    broker.publish(topic, {"n": 2})
    broker.publish(topic, {"n": 3})
    gate.open = True
    until(lambda: len(got(page)) == 3, 15)
    return epoch


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A broker that keeps the history of ``kept/**`` in its store and of nothing else."""
    proc = BrokerProcess(tmp_path / "data", env={"QUICKSILVER_HISTORY_RULES": "kept/**=100:3600"})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def test_catches_up_after_a_restart_that_lost_the_history(
    page: Any, restartable: BrokerProcess
) -> None:
    gate = Gate()
    page.route_web_socket("**/ws", gate)
    page.goto(restartable.url + "/")
    topic = "reports/client-test/restart"  # public, history in memory only: lost on restart
    old_epoch = restart_while_held_off(page, restartable, gate, topic)

    messages = got(page)
    assert [m["data"]["n"] for m in messages] == [1, 2, 3]
    assert messages[1]["epoch"] != old_epoch, "history lost: a new epoch"
    assert [m["replayed"] for m in messages[1:]] == [True, True]
    gaps = page.evaluate("window.gaps")
    assert [g["reason"] for g in gaps] == ["epoch"], gaps
    restartable.publish(topic, {"n": 4})
    until(lambda: len(got(page)) == 4)
    assert [m["offset"] for m in got(page)[1:]] == [1, 2, 3]


def test_resumes_seamlessly_after_a_restart_that_kept_the_history(
    page: Any, restartable: BrokerProcess
) -> None:
    gate = Gate()
    page.route_web_socket("**/ws", gate)
    page.goto(restartable.url + "/")
    topic = "kept/client-test"  # not public: the harness authenticates
    page.evaluate(HARNESS, [topic, {"token": ADMIN}])
    restartable.publish(topic, {"n": 1})
    until(lambda: len(got(page)) == 1)
    gate.open = False
    restartable.stop()
    page.wait_for_function("() => window.client.state === 'reconnecting'", timeout=ms(5))
    restartable.start()
    restartable.publish(topic, {"n": 2})
    gate.open = True
    until(lambda: len(got(page)) == 2, 15)

    messages = got(page)
    assert [(m["offset"], m["epoch"], m["replayed"]) for m in messages] == [
        (1, messages[0]["epoch"], False),
        (2, messages[0]["epoch"], False),
    ]
    assert page.evaluate("window.gaps") == []


def test_backfill_replays_the_last_messages_once(page: Any, broker: BrokerProcess) -> None:
    topic = "reports/client-test/backfill"
    for n in range(1, 6):
        broker.publish(topic, {"n": n})
    page.goto(broker.url + "/")
    page.evaluate(HARNESS, [topic, {"backfill": 3}])
    until(lambda: len(got(page)) == 3)
    broker.publish(topic, {"n": 6})
    until(lambda: len(got(page)) == 4)
    messages = got(page)
    assert [m["offset"] for m in messages] == [3, 4, 5, 6]
    assert [m["replayed"] for m in messages] == [True, True, True, False]


def test_async_iterator_requests_and_errors(page: Any, broker: BrokerProcess) -> None:
    page.goto(broker.url + "/")
    result = page.evaluate(
        """async ([admin]) => {
          const qs = await import("/static/quicksilver.js");
          const anon = new qs.Client().connect();
          const out = {};
          try { await anon.publish("reports/client-test/x", 1); out.publish = "allowed"; }
          catch (e) { out.publish = [e.name, e.code]; }
          try { anon.subscribe("bad//pattern"); out.pattern = "accepted"; }
          catch (e) { out.pattern = e.name; }
          const refused = anon.subscribe("jobs/**");
          out.refused = await refused.ready.then(() => "ok", (e) => e.code);
          const admin_ = new qs.Client({ token: admin }).connect();
          const sub = admin_.subscribe("client-test/iter/*");
          await sub.ready;
          await admin_.publish("client-test/iter/a", { n: 1 });
          await admin_.publish("client-test/iter/b", { n: 2 });
          out.iterated = [];
          for await (const m of sub) {
            out.iterated.push([m.topic, m.data.n]);
            if (out.iterated.length === 2) break;
          }
          out.rtt = typeof (await admin_.ping());
          anon.close(); admin_.close();
          out.closed = [anon.state, admin_.state];
          return out;
        }""",
        [ADMIN],
    )
    assert result == {
        "publish": ["QuicksilverError", "forbidden"],
        "pattern": "TypeError",
        "refused": "forbidden",
        "iterated": [["client-test/iter/a", 1], ["client-test/iter/b", 2]],
        "rtt": "number",
        "closed": ["closed", "closed"],
    }


def test_a_refused_token_stops_reconnecting(page: Any, broker: BrokerProcess) -> None:
    page.goto(broker.url + "/")
    page.evaluate(
        """async () => {
          const qs = await import("/static/quicksilver.js");
          window.states = [];
          const c = new qs.Client({ token: "not-a-jwt", minDelay: 50 });
          c.addEventListener("state", (e) => window.states.push(e.detail.state));
          window.bad = c.connect();
        }"""
    )
    page.wait_for_function("() => window.bad.state === 'unauthorized'", timeout=ms(5))
    assert page.evaluate("window.bad.lastClose.code") == 4401
    page.wait_for_timeout(300)  # several backoff periods: it must not have tried again
    assert page.evaluate("window.states") == ["connecting", "unauthorized"]


def test_pattern_matching_follows_the_protocol(page: Any, broker: BrokerProcess) -> None:
    page.goto(broker.url + "/")
    cases = [  # protocol/README.md section 8.3
        ("reports/dist/*", "reports/dist/Foo", True),
        ("reports/dist/*", "reports/dist/Foo/1.0", False),
        ("reports/dist/*", "reports/dist", False),
        ("reports/**", "reports", True),
        ("reports/**", "reports/dist/Foo/1.0", True),
        ("reports/**", "reportsX", False),
        ("reports/**", "other/reports", False),
        ("*", "a", True),
        ("*", "a/b", False),
        ("**", "a/b/c", True),
        ("a/*/**", "a", False),
        ("a/*/**", "a/b/c", True),
        ("a/*/c", "a/b/c", True),
        ("a/*/c", "a/b/d", False),
    ]
    result = page.evaluate(
        """async (cases) => {
          const qs = await import("/static/quicksilver.js");
          return {
            matches: cases.map(([p, t]) => qs.matches(p, t)),
            valid: ["a*", "**/a", "a/**/b", "", "a//b", "x".repeat(256)].map(qs.isPattern),
            exact: [qs.isExactTopic("reports/dist/Data-Printer/0.39"), qs.isExactTopic("a/*")],
          };
        }""",
        cases,
    )
    assert result["matches"] == [expected for _p, _t, expected in cases]
    assert result["valid"] == [False] * 6
    assert result["exact"] == [True, False]
