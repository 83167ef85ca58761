"""Smoke tests of the benchmark suite: tiny sizes, real servers and sockets, seconds each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.baselines.servers import Launch, ServerSpec
from bench.baselines.wire import (
    STAMP_PREFIX,
    MarkerCounter,
    StampReader,
    baseline_dialect,
    stamped_payload,
    topic_name,
)
from bench.common import ROOT, CpuPlan
from bench.fanout import Case, FanoutConfig, measure
from bench.latency import percentile

BASELINES = ("websockets-broadcast", "bare-frame-writer")


def run_bench(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def results_of(path: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = json.loads(path.read_text())["results"]
    return results


def test_fanout_over_topics_delivers_each_message_to_its_topic_only(tmp_path: Path) -> None:
    out = tmp_path / "fanout.json"
    subscribers, topics, messages = 20, 2, 20
    proc = run_bench(
        "fanout",
        *("--subscribers", str(subscribers), "--topics", str(topics)),
        *("--messages", str(messages), "--processes", "2"),
        *("--servers", ",".join(BASELINES), "--variant", "both"),
        *("--timeout", "20", "--setup-timeout", "20", "--idle-check", "0"),
        *("--no-chart", "--json", str(out)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = results_of(out)
    assert {(r["server"], r["variant"]) for r in results} == {
        (server, variant) for server in BASELINES for variant in ("steady", "burst")
    }
    for r in results:
        assert r["status"] == "ok", r
        # Each subscriber hears only its topic's half of the messages, no more.
        assert r["expected"] == subscribers * messages // topics
        assert r["delivered"] == r["expected"], r
        assert r["deliveries_per_s"] > 0
    document = json.loads(out.read_text())
    assert document["machine"]["cpu_count"] >= 1
    assert document["config"]["cases"][0]["per_topic"] == subscribers // topics
    for server in BASELINES:
        assert server in proc.stdout


def test_latency_reports_ordered_percentiles_for_every_sample(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    subscribers, rate, seconds, warmup = 4, 100, 1.0, 0.2
    proc = run_bench(
        "latency",
        *("--subscribers", str(subscribers), "--rate", str(rate)),
        *("--seconds", str(seconds), "--warmup", str(warmup), "--processes", "1"),
        *("--servers", "bare-frame-writer", "--idle-check", "0"),
        *("--no-chart", "--json", str(out)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [r] = results_of(out)
    assert r["status"] == "ok", r
    assert r["delivered"] == r["expected"] == subscribers * rate * seconds
    # Messages sent during the warm-up are not counted; the rest all are.
    assert subscribers * rate * (seconds - warmup) * 0.9 <= r["samples"] < r["delivered"]
    assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["p999_ms"] <= r["max_ms"]
    assert r["max_ms"] < 1000
    assert "p99.9 ms" in proc.stdout


def test_connections_to_quicksilver_are_authenticated_and_held(tmp_path: Path) -> None:
    out = tmp_path / "connections.json"
    connections = 30
    proc = run_bench(
        "connections",
        *("--connections", str(connections), "--processes", "1", "--warmup", "2"),
        *("--settle", "0.5", "--servers", "quicksilver", "--no-chart", "--json", str(out)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [r] = results_of(out)
    assert r["status"] == "ok", r
    assert r["sockets_held"] == connections
    assert r["connect_seconds"] > 0
    assert r["rss_after_kib"] > 0 and r["kib_per_connection"] is not None
    assert "KiB/connection" in proc.stdout


def test_the_entry_point_lists_every_scenario() -> None:
    proc = run_bench("--help", timeout=30)
    assert proc.returncode == 0, proc.stderr
    for name in ("fanout", "latency", "connections", "jobs"):
        assert name in proc.stdout
    unknown = run_bench("no-such-scenario", timeout=30)
    assert unknown.returncode == 2
    assert "unknown scenario" in unknown.stderr


def test_a_server_that_cannot_start_is_an_error_not_a_crash(tmp_path: Path) -> None:
    def prepare(workdir: Path, port: int) -> Launch:
        return Launch([sys.executable, "-c", "raise SystemExit(3)"], port, baseline_dialect())

    spec = ServerSpec("broken", "exits at once", prepare, startup_timeout=10)
    cfg = FanoutConfig(
        cases=(Case("tiny", subscribers=2, topics=1, messages=2),),
        processes=1,
        idle_check=0,
        json_path=tmp_path / "fanout.json",
    )
    result = measure(spec, "steady", cfg, CpuPlan(None, None, "unpinned"))
    assert result.status == "error"
    assert result.error is not None and "exited with code 3" in result.error


def test_marker_counter_counts_markers_split_across_frames_once() -> None:
    counter = MarkerCounter(b"MSG ")
    pieces = [b"MSG a 1 2\r\nxx\r\nMS", b"G b 1 2\r\nyy\r\nMSG", b" c 1 2\r\nzz\r\n", b"MSG "]
    assert sum(counter.feed(piece) for piece in pieces) == 4


def test_stamp_reader_reads_each_stamp_once_wherever_the_stream_is_cut() -> None:
    bodies = [stamped_payload(1_700_000_000.25 + i, 40).encode() for i in range(3)]
    stream = b"MSG x 1 40\r\n".join(bodies)
    for cut in range(1, len(stream)):
        reader = StampReader()
        sent: list[float] = []
        latency: list[float] = []
        found = reader.feed(stream[:cut], 1_700_000_010.0, sent, latency)
        found += reader.feed(stream[cut:], 1_700_000_010.0, sent, latency)
        assert found == 3, cut
        assert sent == [1_700_000_000.25, 1_700_000_001.25, 1_700_000_002.25]
        assert latency == [9.75, 8.75, 7.75]


def test_stamped_payloads_have_a_fixed_size_and_refuse_too_small_a_body() -> None:
    body = stamped_payload(1_700_000_000.5)
    assert len(body) == 200 and body.startswith(STAMP_PREFIX.decode())
    with pytest.raises(ValueError, match="cannot hold"):
        stamped_payload(1_700_000_000.5, 10)


def test_topic_names_are_fixed_width_and_bounded() -> None:
    names = [topic_name(i, 1000) for i in range(1000)]
    assert len(set(names)) == 1000 and len({len(n) for n in names}) == 1
    assert topic_name(0, 1) == "bench/fanout"
    with pytest.raises(ValueError):
        topic_name(1000, 1000)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert percentile(values, 0.5) == 500.0
    assert percentile(values, 0.99) == 990.0
    assert percentile(values, 0.999) == 999.0
    assert percentile(values, 1.0) == 1000.0
    with pytest.raises(ValueError):
        percentile([], 0.5)
