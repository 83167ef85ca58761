"""The CPAN Testers API v3 and the report pipeline, end to end against a real server.

Reports are posted over HTTP, processed by a real worker (in this process, or as its own
process where the test is about workers), and read back through ``/v3``, topics and the
statistics endpoints. Every answer is checked against the specification's response schemas.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from broker.cpantesters.spec import response_schema, validator
from workers.runtime import Worker

from .helpers import (
    UNIT,
    RunningServer,
    http,
    raw_client,
    running_server,
    start_process,
    stop_process,
    token,
    until_async,
    wait_for,
)

FIXTURES = Path(__file__).parent / "data" / "cpantesters"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
WORKER = token(sub="reports-worker", roles=("worker",), queues=["reports"])
ADMIN = token()


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def variant(grade: str, n: int, base: str = "perl5-valid.v3.json") -> dict[str, Any]:
    """A fixture report with another grade and output (``n`` makes it a different report)."""
    report = copy.deepcopy(fixture(base))
    report["result"]["grade"] = grade
    report["result"]["output"] = {
        "pass": report["result"]["output"],
        "fail": {"test": f"t/01-p.t .. Failed 2/40 subtests\nResult: FAIL (run {n})"},
        "na": {"configure": f"OS unsupported (run {n})"},
        "unknown": {"uncategorized": f"Bailout called: no database (run {n})"},
    }[grade]
    report["result"]["duration"] = n
    return report


def conforms(path: str, response: httpx.Response, method: str = "get") -> Any:
    """The JSON body, after checking it against the spec's schema for this status."""
    body = response.json()
    try:
        schema: Any = response_schema(path, method, response.status_code)
    except KeyError:
        schema = None
    if schema is None and response.status_code >= 400:
        schema = "#/definitions/Error"
    assert schema is not None, (path, response.status_code)
    assert validator().validate(body, schema) == [], (path, body)
    return body


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with running_server(tmp_path / "data", stats_publish_interval=0.01) as running:
        yield running


@asynccontextmanager
async def worker(server: RunningServer, concurrency: int = 8) -> AsyncIterator[Worker]:
    w = Worker(server.ws_url, WORKER, queues=["reports"], concurrency=concurrency)
    task = asyncio.create_task(w.run())
    try:
        yield w
    finally:
        w.request_stop()
        assert await wait_for(task, 10) == 0


async def post(h: httpx.AsyncClient, report: Any) -> httpx.Response:
    return await h.post("/v3/report", json=report)


async def counts_become(
    h: httpx.AsyncClient, dist: str, version: str, expected: dict[str, int]
) -> dict[str, Any]:
    latest: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal latest
        r = await h.get(f"/v3/release/dist/{dist}/{version}")
        if r.status_code != 200:
            return False
        latest = r.json()
        return {g: latest[g] for g in expected} == expected

    try:
        await until_async(check, units=15)
    except TimeoutError:
        raise AssertionError(f"counts are {latest}, expected {expected}") from None
    return latest


# --- posting ------------------------------------------------------------------------------------


async def test_the_three_fixtures(srv: RunningServer) -> None:
    async with http(srv) as h:
        r = await post(h, fixture("perl5-valid.v3.json"))
        assert r.status_code == 201
        assert UUID.match(conforms("/report", r, "post")["id"])
        r = await post(h, fixture("perl5-invalid-version-v.json"))
        assert r.status_code == 400
        body = conforms("/report", r, "post")
        assert body["errors"][0]["path"] == "/report/environment/language/version"
        assert re.search("String does not match", body["errors"][0]["message"])
        r = await post(h, fixture("perl6-valid.v3.json"))
        assert r.status_code == 201 and UUID.match(r.json()["id"])
        report_id = r.json()["id"]
        r = await h.get(f"/v3/report/{report_id}")
        report = conforms("/report/{id}", r)
        assert report["id"] == report_id and report["created"].endswith("Z")
        assert {k: report[k] for k in fixture("perl6-valid.v3.json")} == fixture(
            "perl6-valid.v3.json"
        )
        assert r.headers["cache-control"] == "public, max-age=86400, immutable"
        missing = await h.get("/v3/report/XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX")
        assert missing.status_code == 404
        assert conforms("/report/{id}", missing) == {
            "errors": [{"message": "Report ID not found", "path": "/id"}]
        }


async def test_counts_match_what_was_posted(srv: RunningServer) -> None:
    plan = ["pass", "pass", "fail", "fail", "fail", "na", "unknown"]
    async with http(srv, ADMIN) as h:
        r = await h.post(
            "/api/v1/uploads", json={"dist": "Data-Printer", "version": "0.39", "author": "GARU"}
        )
        assert r.status_code == 201
        ids = []
        for n, grade in enumerate(plan):
            r = await post(h, variant(grade, n))
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        async with worker(srv):
            release = await counts_become(
                h, "Data-Printer", "0.39", {"pass": 2, "fail": 3, "na": 1, "unknown": 1}
            )
        assert release["author"] == "GARU"
        conforms(
            "/release/dist/{dist}/{version}", await h.get("/v3/release/dist/Data-Printer/0.39")
        )
        listed = conforms("/release/dist/{dist}", await h.get("/v3/release/dist/Data-Printer"))
        assert listed == [release]
        assert conforms("/release/author/{author}", await h.get("/v3/release/author/GARU")) == [
            release
        ]
        assert release in conforms("/release", await h.get("/v3/release"))

        rows = conforms("/summary/{dist}/{version}", await h.get("/v3/summary/Data-Printer/0.39"))
        assert sorted(row["guid"] for row in rows) == sorted(ids)
        assert sorted(row["grade"] for row in rows) == sorted(plan)
        assert {row["reporter"] for row in rows} == {"GARU <garu@cpan.org>"}
        assert {(row["perl"], row["osname"], row["osvers"], row["platform"]) for row in rows} == {
            ("5.24.1", "darwin", "16.4.0", "darwin-2level")
        }
        fails = conforms(
            "/summary/{dist}/{version}",
            await h.get("/v3/summary/Data-Printer/0.39", params={"grade": "fail"}),
        )
        assert len(fails) == 3
        assert len(conforms("/summary/{dist}", await h.get("/v3/summary/Data-Printer"))) == 7
        by_os = await h.get("/v3/summary", params=[("osname", "darwin"), ("osname", "linux")])
        assert len(conforms("/summary", by_os)) == 7
        assert conforms("/summary", await h.get("/v3/summary", params={"perl": "5.99.0"})) == []

        stats = (await h.get("/api/v1/stats")).json()
        assert stats["reports"] == 7 and stats["applied"] == 7
        assert stats["stats"]["grades"] == {"pass": 2, "fail": 3, "na": 1, "unknown": 1}
        assert stats["stats"]["os"] == {"darwin": 7}
        assert stats["stats"]["perl"] == {"5.24.1": 7}
        assert sum(stats["stats"]["daily"].values()) == 7
        latency = stats["latency"]
        assert latency["samples"] == 7 and 0 < latency["p50"] <= latency["p99"] <= latency["max"]
        metrics = (await h.get("/metrics")).text
        assert "quicksilver_report_pipeline_seconds_count 7" in metrics
        assert 'quicksilver_report_pipeline_seconds_bucket{le="+Inf"} 7' in metrics


async def test_the_same_report_is_stored_once(srv: RunningServer) -> None:
    report = fixture("perl5-valid.v3.json")
    reordered = json.loads(json.dumps(report, sort_keys=True))
    async with http(srv, ADMIN) as h:
        first = await post(h, report)
        assert first.status_code == 201
        for again in (report, reordered):
            r = await post(h, again)
            assert r.status_code == 303
            body = conforms("/report", r, "post")
            assert body["id"] == first.json()["id"]
            assert r.headers["location"] == f"/v3/report/{first.json()['id']}"
        queues = (await h.get("/api/v1/queues")).json()
        assert queues["reports"]["counts"]["queued"] == 1
        async with worker(srv):
            await counts_become(h, "Data-Printer", "0.39", {"pass": 1})
            assert len((await h.get("/v3/summary/Data-Printer/0.39")).json()) == 1
        assert (await h.get("/api/v1/stats")).json()["duplicates"] == 2


async def test_subscribers_see_every_report(srv: RunningServer) -> None:
    async with (
        http(srv, ADMIN) as h,
        raw_client(srv.ws_url, None) as dist_sub,
        raw_client(srv.ws_url, None) as others,
    ):
        await h.post(
            "/api/v1/uploads", json={"dist": "Data-Printer", "version": "0.39", "author": "GARU"}
        )
        assert (
            await dist_sub.request({"type": "subscribe", "topic": "reports/dist/Data-Printer"})
        )["type"] == "ok"
        for topic in (
            "reports/new",
            "reports/dist/Data-Printer/0.39",
            "reports/author/GARU",
            "summary/dist/Data-Printer/0.39",
            "stats/grades",
        ):
            assert (await others.request({"type": "subscribe", "topic": topic}))["type"] == "ok"
        grades = ["pass", "fail", "na"]
        ids = [(await post(h, variant(g, n))).json()["id"] for n, g in enumerate(grades)]
        async with worker(srv, concurrency=1):
            seen = [await dist_sub.expect("message") for _ in ids]
            assert sorted(m["data"]["guid"] for m in seen) == sorted(ids)
            for m in seen:
                assert m["topic"] == "reports/dist/Data-Printer"
                assert validator().validate(m["data"], "#/definitions/ReportSummary") == []
                assert m["data"]["author"] == "GARU"
            by_topic: dict[str, list[Any]] = {}
            while (
                len(by_topic.get("summary/dist/Data-Printer/0.39", [])) < 3
                or sum(by_topic.get("stats/grades", [{"total": 0}])[-1]["counts"].values()) < 3
            ):
                m = await others.expect("message")
                by_topic.setdefault(m["topic"], []).append(m["data"])
        for topic in ("reports/new", "reports/dist/Data-Printer/0.39", "reports/author/GARU"):
            assert sorted(d["guid"] for d in by_topic[topic]) == sorted(ids)
        totals = [
            sum(d[g] for g in ("pass", "fail", "na", "unknown"))
            for d in by_topic["summary/dist/Data-Printer/0.39"]
        ]
        assert totals == [1, 2, 3]
        assert by_topic["stats/grades"][-1]["counts"] == {"pass": 1, "fail": 1, "na": 1}


async def test_a_worker_started_later_processes_everything(srv: RunningServer) -> None:
    plan = ["pass", "fail", "na", "unknown", "pass"]
    async with http(srv, ADMIN) as h:
        for n, grade in enumerate(plan):
            assert (await post(h, variant(grade, n))).status_code == 201
        queues = (await h.get("/api/v1/queues")).json()
        assert queues["reports"]["counts"]["queued"] == len(plan)
        assert (await h.get("/v3/summary/Data-Printer")).status_code == 404  # nothing yet
        proc = start_process(
            ["worker", "--url", srv.ws_url, "--token", WORKER, "--queue", "reports"]
        )
        try:
            await counts_become(
                h, "Data-Printer", "0.39", {"pass": 2, "fail": 1, "na": 1, "unknown": 1}
            )
        finally:
            # In a thread: the broker runs in this event loop and must answer the worker's drain.
            _out, err = await asyncio.to_thread(stop_process, proc)
        assert proc.returncode == 0, err
        queues = (await h.get("/api/v1/queues")).json()
        assert queues["reports"]["counts"]["done"] == len(plan)


async def test_results_done_before_a_restart_are_applied_after_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with running_server(data) as first:
        async with http(first) as h:
            report_id = (await post(h, variant("fail", 1))).json()["id"]
        first.broker.jobs.done_hooks.clear()  # as if the broker stopped right after the job
        async with worker(first):
            await until_async(lambda: _queue_done(first, 1))
        assert first.broker.reports.applied == 0
    async with running_server(data) as second, http(second) as h:
        release = await counts_become(h, "Data-Printer", "0.39", {"fail": 1})
        assert release["pass"] == 0
        rows = (await h.get("/v3/summary/Data-Printer")).json()
        assert [row["guid"] for row in rows] == [report_id]


async def _queue_done(server: RunningServer, n: int) -> bool:
    stats = await server.broker.store.queue_stats()
    return "reports" in stats and stats["reports"].counts[_done_state()] == n


def _done_state() -> Any:
    from broker.jobstate import JobState

    return JobState.DONE


async def test_a_result_that_is_not_a_summary_is_rejected_not_counted(srv: RunningServer) -> None:
    async with http(srv) as h, raw_client(srv.ws_url, WORKER) as w:
        report_id = (await post(h, fixture("perl5-valid.v3.json"))).json()["id"]
        await w.request({"type": "work", "queues": ["reports"], "concurrency": 1})
        job = await w.expect("job")
        assert job["payload"]["id"] == report_id and job["payload"]["task"] == "process_report"
        reply = await w.request(
            {"type": "done", "job": job["job"], "attempt": 1, "result": {"grade": "pass"}}
        )
        assert reply["type"] == "ok"
        await until_async(lambda: _rejected(srv))
        stats = (await h.get("/api/v1/stats")).json()
        assert stats["applied"] == 0 and stats["reports"] == 0
        assert (await h.get("/v3/summary/Data-Printer")).status_code == 404


async def _rejected(server: RunningServer) -> bool:
    return server.broker.reports.rejected == 1


# --- reading ------------------------------------------------------------------------------------


async def test_etags_and_cache_control(srv: RunningServer) -> None:
    async with http(srv, ADMIN) as h:
        await post(h, variant("pass", 1))
        async with worker(srv):
            await counts_become(h, "Data-Printer", "0.39", {"pass": 1})
            r = await h.get("/v3/summary/Data-Printer")
            etag = r.headers["etag"]
            assert r.headers["cache-control"] == "public, max-age=5"
            same = await h.get("/v3/summary/Data-Printer", headers={"If-None-Match": etag})
            assert same.status_code == 304 and same.content == b""
            assert same.headers["etag"] == etag
            weak = await h.get("/v3/summary/Data-Printer", headers={"If-None-Match": f"W/{etag}"})
            assert weak.status_code == 304
            await post(h, variant("fail", 2))
            await counts_become(h, "Data-Printer", "0.39", {"fail": 1})
        changed = await h.get("/v3/summary/Data-Printer", headers={"If-None-Match": etag})
        assert changed.status_code == 200 and changed.headers["etag"] != etag


async def test_query_parameters(srv: RunningServer) -> None:
    async with http(srv, ADMIN) as h:
        uploads = [
            {"dist": "Foo", "version": "1.0", "author": "ME", "released": "2024-01-01T00:00:00Z"},
            {
                "dist": "Foo",
                "version": "1.1_01",
                "author": "ME",
                "released": "2024-02-01T00:00:00Z",
            },
            {"dist": "Bar", "version": "0.1", "author": "YOU", "released": "2024-03-01T00:00:00Z"},
        ]
        assert (await h.post("/api/v1/uploads", json={"uploads": uploads})).status_code == 201

        def names(r: httpx.Response, path: str) -> list[str]:
            return [f"{u['dist']}-{u['version']}" for u in conforms(path, r)]

        assert names(await h.get("/v3/upload"), "/upload") == ["Foo-1.0", "Foo-1.1_01", "Bar-0.1"]
        r = await h.get("/v3/upload", params={"since": "2024-01-15T00:00:00Z", "limit": "1"})
        assert names(r, "/upload") == ["Foo-1.1_01"]
        r = await h.get("/v3/upload/dist/Foo", params={"maturity": "stable"})
        assert names(r, "/upload/dist/{dist}") == ["Foo-1.0"]
        r = await h.get("/v3/upload/author/YOU")
        assert names(r, "/upload/author/{author}") == ["Bar-0.1"]
        r = await h.get("/v3/release/dist/Foo", params={"maturity": "dev"})
        assert names(r, "/release/dist/{dist}") == ["Foo-1.1_01"]
        assert conforms("/upload", await h.get("/v3/upload", params={"limit": "0"}))  # ignored

        bad = {
            "/v3/upload?limit=ten": ("/limit", "Expected integer - got string."),
            "/v3/upload?since=yesterday": ("/since", "Does not match date-time format."),
            "/v3/release/dist/Foo?maturity=beta": ("/maturity", "Not in enum list: stable, dev."),
            "/v3/summary/Foo?grade=PASS": ("/grade", "Not in enum list: pass, fail, na, unknown."),
            "/v3/summary/Foo?perl_maturity=old": (
                "/perl_maturity",
                "Not in enum list: stable, dev.",
            ),
        }
        for url, (path, message) in bad.items():
            r = await h.get(url)
            assert r.status_code == 400, url
            assert r.json() == {"errors": [{"message": message, "path": path}]}, url
        r = await h.get("/v3/summary")
        assert r.status_code == 400 and conforms("/summary", r)["errors"][0]["path"] == "/"
        for url, path in (
            ("/v3/upload/dist/Nope", "/dist"),
            ("/v3/upload/author/NOBODY", "/author"),
            ("/v3/release/dist/Nope", "/dist"),
            ("/v3/release/author/NOBODY", "/author"),
            ("/v3/release/dist/Foo/9.9", "/version"),
            ("/v3/summary/Nope", "/dist"),
            ("/v3/summary/Foo/9.9", "/version"),
        ):
            r = await h.get(url)
            assert r.status_code == 404, url
            assert r.json()["errors"][0]["path"] == path
        # Known release, no reports yet: an empty list, not a 404.
        assert conforms("/summary/{dist}", await h.get("/v3/summary/Foo")) == []
        assert conforms(
            "/release/dist/{dist}/{version}", await h.get("/v3/release/dist/Foo/1.0")
        ) == {
            "dist": "Foo",
            "version": "1.0",
            "author": "ME",
            "pass": 0,
            "fail": 0,
            "na": 0,
            "unknown": 0,
        }


async def test_lists_are_capped(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", v3_max_rows=2) as server, http(server, ADMIN) as h:
        uploads = [{"dist": f"D{i}", "version": "1", "author": "ME"} for i in range(5)]
        await h.post("/api/v1/uploads", json={"uploads": uploads})
        assert len((await h.get("/v3/upload")).json()) == 2
        assert len((await h.get("/v3/upload", params={"limit": "1"})).json()) == 1
        assert len((await h.get("/v3/upload", params={"limit": "100"})).json()) == 2


# --- bad input ----------------------------------------------------------------------------------


async def test_bad_reports_get_clear_errors(srv: RunningServer) -> None:
    deep: Any = "x"
    for _ in range(70):
        deep = {"d": deep}
    too_deep = fixture("perl5-valid.v3.json")
    too_deep["comments"] = deep
    huge = fixture("perl5-valid.v3.json")
    huge["comments"] = 2**70
    cases: list[tuple[bytes, int, str]] = [
        (b"{not json", 400, "/report"),
        (b"", 400, "/report"),
        (b"[1, 2]", 400, "/report"),
        (json.dumps(huge).encode(), 400, "/report"),
        (json.dumps(too_deep).encode(), 400, "/report"),
        (b'{"comments": NaN}', 400, "/report"),
        (b'{"comments": 1e999}', 400, "/report"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "/report"),
        (b"x" * (2 << 20), 413, "/"),
    ]
    async with http(srv) as h:
        for raw, status, path in cases:
            r = await h.post("/v3/report", content=raw)
            assert r.status_code == status, (raw[:40], r.text)
            body = conforms("/report", r, "post")
            assert body["errors"][0]["path"] == path and body["errors"][0]["message"]
        surrogate = b'{"reporter": "\\ud800"}'
        r = await h.post("/v3/report", content=surrogate)
        assert r.status_code == 400
        report = fixture("perl5-valid.v3.json")
        report["comments"] = "\ud800"
        raw = json.dumps(report).encode()
        r = await h.post("/v3/report", content=raw)
        assert r.status_code == 400 and "surrogate" in r.json()["errors"][0]["message"]
        assert (await h.get("/healthz")).status_code == 200


async def test_report_posting_may_require_a_token(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", reports_require_token=True) as server:
        report = fixture("perl5-valid.v3.json")
        async with http(server) as anonymous:
            r = await post(anonymous, report)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        async with http(server, token(roles=("subscriber",))) as reader:
            assert (await post(reader, report)).status_code == 403
        async with http(server, token(roles=("publisher",), queues=["reports"])) as reporter:
            assert (await post(reporter, report)).status_code == 201


# --- uploads ------------------------------------------------------------------------------------


async def test_uploads_need_rights_and_are_published(srv: RunningServer) -> None:
    upload = {
        "dist": "Foo-Bar",
        "version": "1.0",
        "author": "ME",
        "released": "2024-01-01T00:00:00Z",
    }
    async with raw_client(srv.ws_url, None) as sub:
        await sub.request({"type": "subscribe", "topic": "uploads/dist/Foo-Bar"})
        await sub.request({"type": "subscribe", "topic": "uploads/author/ME"})
        async with http(srv) as anonymous:
            assert (await anonymous.post("/api/v1/uploads", json=upload)).status_code == 401
        async with http(srv, token(roles=("subscriber",))) as reader:
            assert (await reader.post("/api/v1/uploads", json=upload)).status_code == 403
        narrow = token(roles=("publisher",), publish=["uploads/dist/Foo-Bar"])
        async with http(srv, narrow) as h:
            r = await h.post("/api/v1/uploads", json=upload)
            assert r.status_code == 403 and "uploads/author/ME" in r.json()["errors"][0]["message"]
        wide = token(roles=("publisher",), publish=["uploads/**"])
        async with http(srv, wide) as h:
            r = await h.post("/api/v1/uploads", json=upload)
            assert r.status_code == 201
            expected = {**upload, "filename": "Foo-Bar-1.0.tar.gz"}
            assert r.json() == expected
            assert validator().validate(r.json(), "#/definitions/Upload") == []
            for bad, path in (
                ({**upload, "dist": "Foo/Bar"}, "/dist"),
                ({**upload, "version": ""}, "/version"),
                ({**upload, "author": 7}, "/author"),
                ({**upload, "released": "someday"}, "/released"),
                ({**upload, "filename": ""}, "/filename"),
                ({"uploads": [upload, {**upload, "dist": " "}]}, "/uploads/1/dist"),
                ({"uploads": []}, "/uploads"),
                ([upload], "/"),
            ):
                r = await h.post("/api/v1/uploads", json=bad)
                assert r.status_code == 400, bad
                assert r.json()["errors"][0]["path"] == path, (bad, r.json())
        got = [await sub.expect("message") for _ in range(2)]
        assert {m["topic"] for m in got} == {"uploads/dist/Foo-Bar", "uploads/author/ME"}
        assert all(m["data"] == expected for m in got)


async def test_upload_feeds_stream_new_uploads(srv: RunningServer) -> None:
    base = f"ws://127.0.0.1:{srv.port}/v3/upload"
    async with (
        connect(base, open_timeout=5 * UNIT) as everything,
        connect(base + "/dist/Foo", open_timeout=5 * UNIT) as foo,
        connect(base + "/author/YOU", open_timeout=5 * UNIT) as you,
        http(srv, ADMIN) as h,
    ):
        # The feeds listen from the moment the handshake is done; an upload now is streamed.
        await until_async(lambda: _listeners(srv, 3))
        for upload in (
            {"dist": "Foo", "version": "1.0", "author": "ME"},
            {"dist": "Bar", "version": "2.0", "author": "YOU"},
        ):
            assert (await h.post("/api/v1/uploads", json=upload)).status_code == 201
        all_frames = [json.loads(await wait_for(everything.recv())) for _ in range(2)]
        assert [(u["dist"], u["author"]) for u in all_frames] == [("Foo", "ME"), ("Bar", "YOU")]
        assert json.loads(await wait_for(foo.recv()))["version"] == "1.0"
        frame = await wait_for(you.recv())
        assert isinstance(frame, str) and json.loads(frame)["dist"] == "Bar"
        for upload in all_frames:
            assert validator().validate(upload, "#/definitions/Upload") == []
    with pytest.raises(InvalidStatus) as refused:
        async with connect(base + "/dist/bad%20name", open_timeout=5 * UNIT):
            pass
    assert refused.value.response.status_code == 403
    await until_async(lambda: _listeners(srv, 0))


async def _listeners(server: RunningServer, n: int) -> bool:
    index = server.broker.hub.index
    return len(index) == n


async def test_private_upload_feeds_need_a_token(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", public_patterns=("reports/**",)) as server:
        url = f"ws://127.0.0.1:{server.port}/v3/upload"
        with pytest.raises(InvalidStatus):
            async with connect(url, open_timeout=5 * UNIT):
                pass
        headers = {"Authorization": f"Bearer {token(roles=('subscriber',))}"}
        async with connect(url, additional_headers=headers, open_timeout=5 * UNIT) as ws:
            async with http(server, ADMIN) as h:
                await until_async(lambda: _listeners(server, 1))
                await h.post("/api/v1/uploads", json={"dist": "A", "version": "1", "author": "B"})
            assert json.loads(await wait_for(ws.recv()))["dist"] == "A"


# --- statistics ---------------------------------------------------------------------------------


async def test_statistics_endpoints(srv: RunningServer) -> None:
    async with http(srv) as h:
        plugins = (await h.get("/api/v1/plugins")).json()["plugins"]
        assert [p["name"] for p in plugins] == ["grades", "os", "perl", "daily"]
        assert all(p["description"] and p["topic"] == f"stats/{p['name']}" for p in plugins)
        await post(h, variant("na", 1))
        await post(h, variant("pass", 2, base="perl6-valid.v3.json"))
        async with worker(srv):
            await until_async(lambda: _applied(srv, 2))
        grades = (await h.get("/api/v1/stats/grades")).json()
        assert grades["counts"] == {"na": 1, "pass": 1} and grades["total"] == 2
        assert grades["name"] == "grades" and grades["updated_at"] > 0
        perl = (await h.get("/api/v1/stats/perl")).json()["counts"]
        assert perl == {"5.24.1": 1, "2016.12-239-gc405f06": 1}
        r = await h.get("/api/v1/stats/nope")
        assert r.status_code == 404 and r.json()["errors"][0]["message"]


async def _applied(server: RunningServer, n: int) -> bool:
    return server.broker.reports.applied == n


async def test_statistics_follow_the_public_patterns(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", public_patterns=("reports/**",)) as server:
        async with http(server) as anonymous:
            assert (await anonymous.get("/api/v1/stats")).status_code == 401
            assert (await anonymous.get("/api/v1/stats/grades")).status_code == 401
        async with http(server, token(roles=("subscriber",), subscribe=["stats/os"])) as h:
            assert (await h.get("/api/v1/stats/os")).status_code == 200
            assert (await h.get("/api/v1/stats/grades")).status_code == 403


async def test_counters_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with running_server(data) as first, http(first) as h:
        await post(h, variant("fail", 1))
        async with worker(first):
            await until_async(lambda: _applied(first, 1))
    async with running_server(data) as second, http(second) as h:
        stats = (await h.get("/api/v1/stats")).json()
        assert stats["reports"] == 1 and stats["stats"]["grades"] == {"fail": 1}
