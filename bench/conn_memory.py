"""Where the memory of an idle authenticated quicksilver connection goes, by allocation site.

``python -m bench.conn_memory [--connections N] [--frames F] [--top K]``

Runs the broker in this process (the same :class:`broker.core.Broker` and uvicorn server as
``quicksilver serve``, on a free port of 127.0.0.1, SQLite in a temporary directory) so that
``tracemalloc`` can see it; nothing in the broker changes. After a warm-up (a few connections
made and dropped), it takes a snapshot, connects N clients from load-generator processes (each
sends ``auth`` with a valid token and waits for ``welcome``), collects garbage, takes a second
snapshot, and prints the growth per connection grouped by the line that allocated it, each with
the innermost frame of the project (``broker/``, ``auth/``, ``protocol/``) on its way there.

What tracemalloc cannot see is not in the table: kernel socket buffers (not in RSS either),
and memory that C libraries take from ``malloc`` directly. The RSS growth of this process is
printed too, but tracemalloc's own bookkeeping inflates it; ``python -m bench connections`` is
the figure to quote for RSS. Writes ``bench/results/connections-memory.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import re
import socket
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench.baselines.wire import quicksilver_dialect
from bench.common import (
    HOST,
    RESULTS_DIR,
    format_table,
    machine_info,
    mint_admin_token,
    new_secret,
    raise_nofile_limit,
    write_json,
)
from bench.connections import rss_kib
from bench.loadgen import ClientGroup, ClientPool, connect_and_drop, plan_jobs

PROJECT_DIRS = ("/broker/", "/auth/", "/protocol/", "/quicksilver/")
_STDLIB = re.compile(r"^.*/lib/python3\.\d+/")


@dataclass(frozen=True)
class Site:
    """Growth attributed to one allocating line, per connection."""

    where: str
    via: str
    bytes_per_connection: float
    blocks_per_connection: float


def _frame_text(frame: tracemalloc.Frame) -> str:
    name = frame.filename
    if "/site-packages/" in name:
        name = name.split("/site-packages/", 1)[1]
    elif _STDLIB.search(name):
        name = _STDLIB.sub("", name)
    else:
        for marker in PROJECT_DIRS:
            if marker in name:
                name = marker.strip("/") + "/" + name.split(marker, 1)[1]
                break
    return f"{name}:{frame.lineno}"


def _project_frame(trace: tracemalloc.Traceback) -> str:
    # Frames are ordered most recent call last unless told otherwise; look from the innermost.
    for frame in reversed(list(trace)):
        if any(marker in frame.filename for marker in PROJECT_DIRS):
            return _frame_text(frame)
    return "-"


def sites(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, connections: int, top: int
) -> tuple[list[Site], dict[str, float], float]:
    """The ``top`` allocating lines by growth per connection, the growth per connection by
    innermost project frame, and the total growth in bytes."""
    grouped: dict[str, list[Any]] = {}
    total = 0
    for diff in after.compare_to(before, "traceback"):
        total += diff.size_diff
        innermost = _frame_text(diff.traceback[-1])
        entry = grouped.setdefault(innermost, [0, 0, {}])
        entry[0] += diff.size_diff
        entry[1] += diff.count_diff
        via = _project_frame(diff.traceback)
        entry[2][via] = entry[2].get(via, 0) + diff.size_diff
    by_via: dict[str, int] = {}
    for _, _, vias in grouped.values():
        for via, size in vias.items():
            by_via[via] = by_via.get(via, 0) + size
    ranked = sorted(grouped.items(), key=lambda item: item[1][0], reverse=True)[:top]
    out = [
        Site(
            where=where,
            via=max(vias.items(), key=lambda kv: kv[1])[0] if vias else "-",
            bytes_per_connection=size / connections,
            blocks_per_connection=count / connections,
        )
        for where, (size, count, vias) in ranked
    ]
    per_via = {
        via: size / connections
        for via, size in sorted(by_via.items(), key=lambda kv: kv[1], reverse=True)[:top]
    }
    return out, per_via, float(total)


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    from auth.tokens import Secret
    from broker.config import Settings
    from broker.core import Broker
    from broker.server import serve_on_socket

    secret = new_secret()
    dialect = quicksilver_dialect(mint_admin_token(secret, sub="bench-memory"))
    with tempfile.TemporaryDirectory(prefix="bench-conn-memory-") as tmp:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
        settings = Settings(
            host=HOST, port=port, data_dir=Path(tmp), secret=Secret(secret), log_level="warning"
        )
        broker = Broker(settings)
        server = await serve_on_socket(broker, sock)
        try:

            def jobs(count: int, processes: int) -> list[Any]:
                return plan_jobs(
                    url=f"ws://{HOST}:{port}{dialect.path}",
                    headers=dialect.headers(),
                    binary=dialect.binary,
                    failure=dialect.failure,
                    groups=[ClientGroup(dialect.session_steps)],
                    members=[0] * count,
                    processes=processes,
                    cpus=None,
                    setup_timeout=args.setup_timeout,
                    connect_concurrency=100,
                )

            await connect_and_drop(jobs(50, 1)[0])
            pool = ClientPool(jobs(args.connections, max(1, -(-args.connections // 5000))))
            try:
                await asyncio.to_thread(pool.gather, "spawned", time.time() + 60)
                # Let the dropped warm-up connections be cleaned up before the first snapshot.
                await asyncio.sleep(0.5)
                tracemalloc.start(args.frames)
                gc.collect()
                before = tracemalloc.take_snapshot()
                rss_before = rss_kib_self()
                pool.send(("connect", None))
                ready = await asyncio.to_thread(
                    pool.gather, "ready", time.time() + args.setup_timeout + 30
                )
                held = sum(r["clients"] for r in ready)
                # Let the last welcomes be written before looking.
                await asyncio.sleep(0.5)
                gc.collect()
                after = tracemalloc.take_snapshot()
                rss_after = rss_kib_self()
                tracemalloc.stop()
                connections_seen = len(broker.connections)
            finally:
                await asyncio.to_thread(pool.close)
        finally:
            server.should_exit = True
            await asyncio.wait_for(server._task, 30)  # type: ignore[attr-defined]
            sock.close()
    top, per_via, total = sites(before, after, held, args.top)
    return {
        "connections": held,
        "connections_seen_by_broker": connections_seen,
        "traced_bytes_per_connection": total / held,
        "rss_kib_per_connection_with_tracemalloc": (rss_after - rss_before) / held,
        "frames": args.frames,
        "sites": [site.__dict__ for site in top],
        "by_project_frame": per_via,
    }


def rss_kib_self() -> int:
    """VmRSS of this process in KiB."""
    import os

    return rss_kib(os.getpid())


def report(result: dict[str, Any]) -> str:
    """The text report: totals, then one row per allocating line."""
    rows = [
        [
            s["where"],
            s["via"],
            f"{s['bytes_per_connection']:.0f}",
            f"{s['blocks_per_connection']:.2f}",
        ]
        for s in result["sites"]
    ]
    return "\n".join(
        [
            f"quicksilver, {result['connections']:,} idle authenticated connections "
            f"(broker saw {result['connections_seen_by_broker']:,}), in-process, tracemalloc "
            f"with {result['frames']} frames",
            f"traced growth: {result['traced_bytes_per_connection'] / 1024:.2f} KiB per "
            f"connection; RSS growth with tracemalloc on: "
            f"{result['rss_kib_per_connection_with_tracemalloc']:.2f} KiB (inflated by "
            "tracemalloc's bookkeeping; quote `python -m bench connections` for RSS)",
            "",
            format_table(
                ["allocated at", "via (innermost project frame)", "bytes/conn", "blocks/conn"],
                rows,
            ),
            "",
            "the same growth by innermost project frame ('-': none, e.g. the event loop's own):",
            format_table(
                ["project frame", "bytes/conn"],
                [[via, f"{size:.0f}"] for via, size in result["by_project_frame"].items()],
            ),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.conn_memory",
        description="Allocation sites of an idle authenticated quicksilver connection.",
    )
    parser.add_argument("--connections", type=int, default=2000, metavar="N")
    parser.add_argument("--frames", type=int, default=25, help="traceback depth kept")
    parser.add_argument("--top", type=int, default=25, help="rows in the table")
    parser.add_argument(
        "--setup-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="for connecting (tracemalloc slows the broker down several times)",
    )
    parser.add_argument(
        "--json", type=Path, default=RESULTS_DIR / "connections-memory.json", metavar="PATH"
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not 1 <= args.connections <= 19_000 or args.frames < 1 or args.top < 1:
        parser.error("connections must be 1..19000, frames and top at least 1")
    raise_nofile_limit()
    result = uvloop.run(_measure(args))
    print(report(result))
    write_json(args.json, {"scenario": "connections-memory", "machine": machine_info(), **result})
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
