"""Demo traffic: the report generator, ``replay`` against a real server, the CLI and the bench."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from broker.cpantesters.replay import HttpError, HttpPool, Traffic, http_base_url, replay
from broker.cpantesters.spec import validator
from workers.reports import summarize

from .helpers import (
    ROOT,
    UNIT,
    http,
    running_server,
    start_process,
    stop_process,
    token,
    until_async,
)


def test_traffic_is_realistic_and_valid() -> None:
    traffic = Traffic(7)
    reports = [traffic.report() for _ in range(1500)]
    v = validator()
    for report in reports[:300]:
        assert v.validate(report, "#/definitions/NewReport") == []
    summaries = [summarize(r) for r in reports]
    grades = Counter(s["grade"] for s in summaries)
    assert set(grades) == {"pass", "fail", "na", "unknown"}
    assert grades["pass"] > 0.8 * len(reports) and grades["fail"] > grades["na"] > 0
    assert len({s["osname"] for s in summaries}) >= 6
    assert len({s["perl"] for s in summaries}) >= 8
    assert {s["perl_maturity"] for s in summaries} == {"stable", "dev"}
    dists = {s["dist"] for s in summaries}
    assert len(dists) == 50 and len(traffic.authors) == 20
    uploads = traffic.uploads()
    assert {u["dist"] for u in uploads} == dists
    assert {u["author"] for u in uploads} == set(traffic.authors)
    assert any("_" in u["version"] for u in uploads)
    assert len({json.dumps(r, sort_keys=True) for r in reports}) == len(reports)


def test_traffic_is_reproducible_and_sized_on_request() -> None:
    # The same seed and the same clock give the same traffic (release dates count back from it).
    now = 1_790_000_000.0
    first, second = Traffic(3, unique=False, now=now), Traffic(3, unique=False, now=now)
    assert [first.report() for _ in range(20)] == [second.report() for _ in range(20)]
    assert first.uploads() == second.uploads()
    big = Traffic(3, test_output=20_000).report("pass")
    assert len(big["result"]["output"]["test"]) >= 20_000
    assert Traffic(3).report("na")["result"]["grade"] == "na"


def test_http_base_url() -> None:
    assert http_base_url("ws://127.0.0.1:8000/ws") == "http://127.0.0.1:8000"
    assert http_base_url("wss://example.org/ws") == "https://example.org"
    assert http_base_url("http://h:1/") == "http://h:1"
    with pytest.raises(ValueError):
        http_base_url("ftp://h")


async def test_replay_posts_uploads_then_reports(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data") as srv:
        traffic = Traffic(5)
        accepted: list[str] = []
        progress = io.StringIO()
        stats = await replay(
            srv.http_url,
            token=token(),
            rate=500,
            count=30,
            traffic=traffic,
            progress=progress,
            on_accepted=lambda report_id, _at: accepted.append(report_id),
        )
        assert (stats.sent, stats.accepted, stats.failed, stats.refused) == (30, 30, 0, 0)
        assert stats.uploads == len(traffic.releases) and len(set(accepted)) == 30
        assert "30 sent, 30 ok" in progress.getvalue()
        async with http(srv) as h:
            uploads = (await h.get("/v3/upload")).json()
            assert len(uploads) == len(traffic.releases)
            queues = (
                await h.get("/api/v1/queues", headers={"Authorization": f"Bearer {token()}"})
            ).json()
            assert queues["reports"]["counts"]["queued"] == 30


async def test_replay_keeps_its_rate_and_stops_on_time(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data") as srv:
        stats = await replay(
            srv.http_url, rate=40, duration=0.5 * UNIT, uploads=False, progress=None
        )
        assert 0.5 * 20 * UNIT <= stats.sent <= 0.5 * 40 * UNIT + 1
        assert stats.accepted == stats.sent


async def test_replay_reports_an_unreachable_server() -> None:
    with pytest.raises(HttpError):
        await replay("http://127.0.0.1:9", token="t", count=1, progress=None)
    stats = await replay("http://127.0.0.1:9", count=2, rate=100, uploads=False, progress=None)
    assert stats.failed == 2 and stats.accepted == 0 and stats.last_error


async def test_the_pool_reconnects_after_the_server_closed_an_idle_connection(
    tmp_path: Path,
) -> None:
    async with running_server(tmp_path / "data") as srv:
        pool = HttpPool(srv.http_url, size=1)
        try:
            assert (await pool.request("GET", "/healthz"))[0] == 200
            for conn in pool._idle:
                conn.writer.close()  # as the server's keep-alive timeout would
            assert (await pool.request("GET", "/healthz"))[0] == 200
        finally:
            await pool.close()


async def test_the_replay_command(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data") as srv:
        proc = start_process(
            ["replay", "--url", srv.ws_url, "--token", token(), "--count", "5", "--rate", "50"]
        )
        try:
            await until_async(lambda: _exited(proc), units=20)
        finally:
            _out, err = await asyncio.to_thread(stop_process, proc)
        assert proc.returncode == 0, err
        assert "5 sent, 5 ok" in err
        assert srv.broker.reports.received == 5
        bad = start_process(["replay", "--url", "ftp://nowhere", "--count", "1"])
        _out, err = await asyncio.to_thread(bad.communicate, None, 20 * UNIT)
        assert bad.returncode == 2 and "not an http(s) or ws(s) URL" in err


async def _exited(proc: subprocess.Popen[str]) -> bool:
    return proc.poll() is not None


def test_the_pipeline_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "pipeline",
            "--reports",
            "60",
            "--rates",
            "40",
            "--seconds",
            "1",
            "--concurrency",
            "8",
            "--report-bytes",
            "4000",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    document = json.loads(out.read_text())
    phases = {r["name"]: r for r in document["results"]}
    assert set(phases) == {"steady 40/s", "throughput"}
    assert phases["throughput"]["published"] == 60 and phases["throughput"]["end_to_end_rate"] > 0
    steady = phases["steady 40/s"]
    assert steady["published"] == 40 and steady["server_p99_ms"] >= steady["server_p50_ms"] > 0
    assert "end-to-end/s" in proc.stdout and document["machine"]["cpu_count"] >= 1
