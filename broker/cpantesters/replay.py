"""Realistic CPAN Testers traffic for demos and benchmarks: ``quicksilver replay``.

:class:`Traffic` invents a small CPAN (about 50 distributions by about 20 authors, one to three
releases each, a few of them developer releases) and test reports with the shape of real v3
reports: the reporter, the Perl (mostly stable Perl 5 releases, a few development Perls and some
Perl 6), the OS with its version and archname, the Perl configuration summary, and test output
that matches the grade. Grades come in the proportions CPAN Testers sees (mostly pass, some fail,
few na and unknown). Everything is drawn from a seeded random generator: the same seed gives the
same traffic (release dates count back from ``now``, the current time unless given); ``unique``
(the default) adds a serial number so no two reports are equal.

:func:`replay` posts the uploads first (so releases have authors), then reports at a steady
rate through a small pool of keep-alive HTTP/1.1 connections (:class:`HttpPool`, enough
for a few thousand requests a second from one process and no dependency), drawing a progress
bar on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

__all__ = ["HttpError", "HttpPool", "ReplayStats", "Traffic", "http_base_url", "replay"]

GRADE_WEIGHTS = (("pass", 88.0), ("fail", 7.0), ("na", 2.5), ("unknown", 2.5))

# osname, weight, archnames, OS versions
_OSES: tuple[tuple[str, float, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "linux",
        55.0,
        ("x86_64-linux", "x86_64-linux-thread-multi", "aarch64-linux", "i686-linux"),
        ("6.1.0-18-amd64", "5.15.0-91-generic", "6.6.13-200.fc39.x86_64", "4.19.0-26-amd64"),
    ),
    (
        "freebsd",
        10.0,
        ("amd64-freebsd", "amd64-freebsd-thread-multi"),
        ("13.2-release", "14.0-release"),
    ),
    (
        "darwin",
        10.0,
        ("darwin-2level", "darwin-thread-multi-2level"),
        ("16.4.0", "22.6.0", "23.2.0"),
    ),
    ("MSWin32", 10.0, ("MSWin32-x64-multi-thread", "MSWin32-x86-multi-thread-64int"), ("10.0",)),
    ("openbsd", 5.0, ("OpenBSD.amd64-openbsd",), ("7.3", "7.4")),
    ("netbsd", 4.0, ("amd64-netbsd-thread-multi",), ("9.3", "10.0")),
    ("solaris", 2.0, ("i86pc-solaris-64",), ("2.11",)),
    ("cygwin", 2.0, ("x86_64-cygwin-threads-multi",), ("3.4.10(0.34153)",)),
    ("dragonfly", 2.0, ("x86_64-dragonfly",), ("6.4-release",)),
)

_PERL5 = (
    ("5.24.1", 3.0),
    ("5.26.3", 4.0),
    ("5.28.2", 5.0),
    ("5.30.3", 7.0),
    ("5.32.1", 10.0),
    ("5.34.1", 12.0),
    ("5.36.3", 16.0),
    ("5.38.2", 20.0),
    ("5.39.9", 5.0),
    ("5.40.0", 14.0),
    ("5.41.4", 2.0),
)
_PERL6 = ("2016.12", "2017.07", "2018.04", "2016.12-239-gc405f06")
_PERL6_SHARE = 0.02

_WORDS_A = (
    "Data",
    "Text",
    "Net",
    "HTTP",
    "JSON",
    "Test",
    "Mojo",
    "DBIx",
    "File",
    "Time",
    "Math",
    "Crypt",
    "XML",
    "App",
    "IO",
    "Log",
    "Config",
    "Term",
    "Web",
    "Cache",
    "Date",
    "List",
)
_WORDS_B = (
    "Printer",
    "Tiny",
    "Simple",
    "Lite",
    "Any",
    "Util",
    "Parser",
    "Client",
    "Builder",
    "Table",
    "Stream",
    "Pool",
    "Reader",
    "Writer",
    "Shell",
    "Dumper",
    "Class",
    "Diff",
    "Template",
    "Queue",
)
_SYLLABLES = (
    "GA",
    "RU",
    "PRE",
    "AC",
    "TION",
    "MI",
    "YA",
    "GAWA",
    "ETH",
    "ER",
    "DO",
    "LO",
    "RJ",
    "BS",
    "HAA",
    "RG",
    "SRI",
    "NI",
    "KA",
    "TO",
    "BIN",
    "GO",
    "DA",
    "VID",
)
_TESTERS = (
    ("Andreas J. Koenig", "andreas.koenig@example.org"),
    ("Chris Williams", "bingos@example.org"),
    ("Slaven Rezic", "srezic@example.org"),
    ("Carlos Guevara", "carlos@example.org"),
    ("Alexandr Ciornii", "alexchorny@example.org"),
    ("Nigel Horne", "njh@example.org"),
    ("Peter John Acklam", "pjacklam@example.org"),
    ("James E Keenan", "jkeenan@example.org"),
    ("Martin McGrath", "mcgrath@example.org"),
    ("Jean-Louis Morel", "jl_morel@example.org"),
    ("Chad Granum", "exodist@example.org"),
    ("Doug Bell", "preaction@example.org"),
    ("Breno G. de Oliveira", "garu@example.org"),
    ("Eric Brine", "ikegami@example.org"),
    ("Tux", "h.m.brand@example.org"),
)
_PREREQS = (
    "Test::More",
    "Scalar::Util",
    "Carp",
    "File::Spec",
    "File::Temp",
    "Encode",
    "JSON::PP",
    "Moo",
    "Try::Tiny",
    "List::Util",
    "HTTP::Tiny",
    "Storable",
    "Time::HiRes",
    "Exporter",
)


def _weighted(rng: random.Random, pairs: Sequence[tuple[Any, float]]) -> Any:
    return rng.choices([p[0] for p in pairs], weights=[p[1] for p in pairs])[0]


@dataclass(frozen=True, slots=True)
class Release:
    """One invented CPAN release."""

    dist: str
    version: str
    author: str
    released: float

    def upload(self) -> dict[str, str]:
        """The body of ``POST /api/v1/uploads`` for this release."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.released))
        return {
            "dist": self.dist,
            "version": self.version,
            "author": self.author,
            "filename": f"{self.dist}-{self.version}.tar.gz",
            "released": stamp,
        }


class Traffic:
    """A seeded generator of uploads and test reports (see the module docstring)."""

    def __init__(
        self,
        seed: int = 1,
        *,
        dists: int = 50,
        authors: int = 20,
        unique: bool = True,
        test_output: int = 0,
        now: float | None = None,
    ) -> None:
        """``now``: the time releases are dated back from (default: the current time)."""
        if dists < 1 or authors < 1:
            raise ValueError("dists and authors must be at least 1")
        self.rng = random.Random(seed)
        self.unique = unique
        #: Verbose test output is added until a report's ``result.output.test`` has this many
        #: characters (real reports range from 2 kB to well over 100 kB).
        self.test_output = test_output
        self.serial = 0
        rng = self.rng
        names: list[str] = []
        while len(names) < authors:
            name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))[:9]
            if name not in names:
                names.append(name)
        self.authors = names
        dist_names: list[str] = []
        while len(dist_names) < dists:
            parts = [rng.choice(_WORDS_A), rng.choice(_WORDS_B)]
            if rng.random() < 0.3:
                parts.insert(1, rng.choice(_WORDS_A))
            name = "-".join(parts)
            if name not in dist_names:
                dist_names.append(name)
        if now is None:
            now = time.time()
        self.releases: list[Release] = []
        for i, dist in enumerate(dist_names):
            author = names[i % len(names)] if i < len(names) else rng.choice(names)
            major, minor = rng.randint(0, 3), rng.randint(1, 60)
            for n in range(rng.randint(1, 3)):
                version = f"{major}.{minor + n:02d}"
                if rng.random() < 0.1:
                    version += f"_{rng.randint(1, 9):02d}"
                released = now - rng.uniform(0, 86400 * 30) + n * 3600
                self.releases.append(Release(dist, version, author, released))

    def uploads(self) -> list[dict[str, str]]:
        """Every release as an upload, oldest first."""
        return [r.upload() for r in sorted(self.releases, key=lambda r: r.released)]

    def report(self, grade: str | None = None) -> dict[str, Any]:
        """One v3 test report (valid against the spec's ``NewReport``)."""
        rng = self.rng
        self.serial += 1
        release = rng.choice(self.releases)
        grade = grade or _weighted(rng, GRADE_WEIGHTS)
        osname, _w, archnames, versions = _weighted(rng, [(o, o[1]) for o in _OSES])
        archname, osvers = rng.choice(archnames), rng.choice(versions)
        tester = rng.choice(_TESTERS)
        perl6 = rng.random() < _PERL6_SHARE
        language: dict[str, Any]
        if perl6:
            perl = rng.choice(_PERL6)
            language = {
                "name": "Perl 6",
                "version": perl,
                "implementation": "rakudo",
                "backend": {"engine": "moarvm", "version": perl},
                "archname": archname,
                "toolchain": {"zef": "0.1.11"},
            }
        else:
            perl = _weighted(rng, _PERL5)
            language = {
                "name": "Perl 5",
                "version": perl,
                "archname": archname,
                "variables": {"$^X": f"/usr/local/perls/{perl}/bin/perl"},
                "toolchain": {"ExtUtils::MakeMaker": "7.70", "CPAN": "2.36"},
                "build": self._perl_build(perl, osname, osvers, archname),
            }
        tests = rng.randint(5, 900)
        failures = 0 if grade != "fail" else rng.randint(1, max(1, tests // 10))
        prereqs = [
            {
                "phase": rng.choice(("requires", "test_requires", "build_requires")),
                "name": name,
                "need": f"{rng.randint(0, 2)}.{rng.randint(0, 99):02d}",
                "have": f"{rng.randint(1, 3)}.{rng.randint(0, 99):02d}",
            }
            for name in rng.sample(_PREREQS, rng.randint(2, 8))
        ]
        report: dict[str, Any] = {
            "reporter": {"name": tester[0], "email": tester[1]},
            "environment": {
                "user_agent": "CPAN-Reporter/1.2019",
                "language": language,
                "system": {
                    "osname": osname,
                    "osversion": osvers,
                    "hostname": f"smoker{rng.randint(1, 40)}",
                    "cpu_count": str(rng.choice((1, 2, 4, 8, 16))),
                    "cpu_type": rng.choice(("Intel Xeon", "AMD EPYC", "Apple M2", "ARM Neoverse")),
                    "filesystem": rng.choice(("ext4", "zfs", "apfs", "ntfs", "ufs")),
                    "variables": {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
                },
            },
            "distribution": {
                "name": release.dist,
                "version": release.version,
                "prerequisites": prereqs,
            },
            "result": {
                "grade": grade,
                "tests": tests,
                "failures": failures,
                "skipped": rng.randint(0, 5),
                "todo": {"pass": 0, "fail": rng.randint(0, 2)},
                "warnings": rng.randint(0, 3),
                "duration": rng.randint(1, 300),
                "output": self._output(release, grade, tests, failures),
            },
        }
        if self.unique:
            report["comments"] = f"replay report #{self.serial} at {time.time():.6f}"
        return report

    def _perl_build(self, perl: str, osname: str, osvers: str, archname: str) -> str:
        minor, patch = perl.split(".")[1:3]
        return (
            f"Summary of my perl5 (revision 5 version {minor} subversion {patch}) configuration:\n"
            f" Platform:\n  osname={osname}, osvers={osvers}, archname={archname}\n"
            "  config_args='-des -Dprefix=/usr/local/perls -Dusethreads'\n"
            "  hint=recommended, useposix=true, d_sigaction=define\n"
            "  useithreads=define, usemultiplicity=define\n"
            "  use64bitint=define, use64bitall=define, uselongdouble=undef\n"
            " Compiler:\n  cc='cc', ccflags ='-fwrapv -fno-strict-aliasing -pipe'\n"
            "  optimize='-O2', intsize=4, longsize=8, ptrsize=8, doublesize=8\n"
            " Linker and Libraries:\n  ld='cc', libs=-lpthread -ldl -lm -lcrypt -lutil -lc\n"
            " Dynamic Linking:\n  dlsrc=dl_dlopen.xs, dlext=so, d_dlsymun=undef\n"
        )

    def _output(self, release: Release, grade: str, tests: int, failures: int) -> dict[str, str]:
        rng = self.rng
        module = release.dist.replace("-", "::")
        files = [f"t/{i:02d}-{rng.choice(_WORDS_B).lower()}.t" for i in range(rng.randint(3, 25))]
        configure = (
            "Checking if your kit is complete...\nLooks good\n"
            f"Generating a Unix-style Makefile\nWriting Makefile for {module}\n"
            "Writing MYMETA.yml and MYMETA.json"
        )
        if grade == "na":
            return {"configure": configure + f"\nOS unsupported: {module} needs a newer Perl"}
        build = "\n".join(
            f"cp lib/{module.replace('::', '/')}/{rng.choice(_WORDS_B)}.pm blib/lib/..."
            for _ in range(rng.randint(1, 6))
        )
        lines = []
        failed = set(rng.sample(files, min(len(files), max(1, failures)))) if failures else set()
        for name in files:
            if name in failed:
                lines.append(f"{name} .. Failed {rng.randint(1, 3)}/{rng.randint(4, 40)} subtests")
            else:
                lines.append(f"{name} .. ok")
        if grade == "pass":
            lines.append(f"All tests successful.\nFiles={len(files)}, Tests={tests}\nResult: PASS")
        elif grade == "fail":
            lines.append(f"Files={len(files)}, Tests={tests}\nResult: FAIL")
        else:
            lines.append("Bailout called.  Further testing stopped: no database\nResult: UNKNOWN")
        test = "\n".join(lines)
        if len(test) < self.test_output:
            verbose = [
                f"# {rng.choice(_WORDS_B)}: ok {n} - {rng.choice(_WORDS_A)} {rng.random():.6f}"
                for n in range(1, (self.test_output - len(test)) // 30 + 2)
            ]
            test = "\n".join(verbose) + "\n" + test
        return {"configure": configure, "build": build, "test": test}


# --- a small HTTP/1.1 client ----------------------------------------------------------------------


class HttpError(Exception):
    """The server could not be reached, or answered with something that is not HTTP."""


def http_base_url(url: str) -> str:
    """``http://host:port`` from an http(s) URL or the broker's ws(s)://host:port/ws URL."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) or ws(s) URL: {url!r}")
    return f"{scheme}://{parts.netloc}"


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class HttpPool:
    """Up to ``size`` keep-alive HTTP/1.1 connections to one server, one request each at a time.

    Bodies are JSON; answers need a ``Content-Length`` (Starlette sends one). Connections idle
    for ``idle_timeout`` seconds are closed rather than reused (servers close them about then:
    uvicorn after 5 s). A reused connection that fails is replaced and the request sent once
    more on a new one (a report posted twice is recognised by the server as a duplicate); any
    other failure fails the request with :class:`HttpError`. Each attempt waits at most
    ``timeout`` seconds.
    """

    def __init__(
        self, base_url: str, *, size: int = 8, timeout: float = 30.0, idle_timeout: float = 4.0
    ) -> None:
        parts = urlsplit(http_base_url(base_url))
        self.host = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.authority = parts.netloc
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(size)

    async def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """``(status, headers with lower-case names, body)``; ``body`` is a value to send as
        JSON, or JSON already encoded as bytes."""
        if isinstance(body, bytes):
            payload = body
        else:
            payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.authority}"]
        if body is not None:
            head.append("Content-Type: application/json")
        head.append(f"Content-Length: {len(payload)}")
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}")
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
        async with self._slots:
            conn = self._reusable()
            while True:
                reused = conn is not None
                try:
                    if conn is None:
                        conn = await asyncio.wait_for(self._open(), self.timeout)
                    answer = await asyncio.wait_for(self._exchange(conn, raw), self.timeout)
                    break
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    if conn is not None:
                        conn.close()
                    conn = None
                    if not reused:
                        detail = str(exc) or type(exc).__name__
                        raise HttpError(f"{method} {path}: {detail}") from None
            status, response_headers, data = answer
            if response_headers.get("connection", "").lower() == "close":
                conn.close()
            else:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            return status, response_headers, data

    def _reusable(self) -> _Connection | None:
        """The most recently used idle connection that is not too old (others are closed)."""
        while self._idle:
            conn = self._idle.pop()
            if time.monotonic() - conn.idle_since < self.idle_timeout:
                return conn
            conn.close()
        return None

    async def _open(self) -> _Connection:
        context = ssl.create_default_context() if self.tls else None
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=context)
        return _Connection(reader, writer)

    @staticmethod
    async def _exchange(conn: _Connection, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        conn.writer.write(raw)
        await conn.writer.drain()
        head = await conn.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP answer: {lines[0][:60]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        data = await conn.reader.readexactly(length) if length else b""
        return int(parts[1]), headers, data


# --- replay ---------------------------------------------------------------------------------------


@dataclass
class ReplayStats:
    """What a replay did so far."""

    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    refused: int = 0
    failed: int = 0
    uploads: int = 0
    started: float = field(default_factory=time.monotonic)
    last_error: str = ""

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.sent / elapsed if elapsed > 0 else 0.0


class Progress:
    """A one-line progress bar redrawn on ``stream`` (a terminal) or a line per ``every`` s."""

    def __init__(self, stream: TextIO, total: int | None, every: float = 0.2) -> None:
        self.stream = stream
        self.total = total
        self.every = every if stream.isatty() else max(every, 5.0)
        self.tty = stream.isatty()
        self._last = 0.0

    def draw(self, stats: ReplayStats, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        counts = (
            f"{stats.sent} sent, {stats.accepted} ok, {stats.duplicates} dup, "
            f"{stats.refused} refused, {stats.failed} failed, {stats.rate:.1f}/s"
        )
        if self.total:
            width = 30
            done = min(width, int(width * stats.sent / self.total))
            bar = f"[{'#' * done}{'.' * (width - done)}] {100 * stats.sent / self.total:5.1f}% "
        else:
            bar = ""
        line = f"replay {bar}{counts}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self, stats: ReplayStats) -> None:
        self.draw(stats, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


async def post_uploads(
    pool: HttpPool, token: str | None, uploads: Sequence[dict[str, str]], batch: int = 500
) -> int:
    """Record ``uploads`` with ``POST /api/v1/uploads`` in batches; returns how many."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    done = 0
    for start in range(0, len(uploads), batch):
        chunk = list(uploads[start : start + batch])
        status, _h, body = await pool.request(
            "POST", "/api/v1/uploads", {"uploads": chunk}, headers
        )
        if status != 201:
            raise HttpError(f"uploads refused ({status}): {body[:200].decode('utf-8', 'replace')}")
        done += len(chunk)
    return done


async def replay(
    url: str,
    *,
    token: str | None = None,
    rate: float = 5.0,
    count: int | None = None,
    duration: float | None = None,
    connections: int = 8,
    seed: int = 1,
    uploads: bool = True,
    progress: TextIO | None = sys.stderr,
    traffic: Traffic | None = None,
    reports: Sequence[Any] | None = None,
    on_accepted: Callable[[str, float], None] | None = None,
    stop: asyncio.Event | None = None,
) -> ReplayStats:
    """Post uploads, then reports at ``rate`` per second until ``count`` reports, ``duration``
    seconds or ``stop`` (whichever comes first; none given: until cancelled).

    Reports are sent on a fixed schedule (report *i* at ``i / rate`` seconds), up to
    ``connections`` in flight; when the server is slower the schedule slips rather than
    piling up requests. ``reports`` (values, or JSON bytes) are posted instead of generated
    ones, all of them unless ``count`` is smaller. ``on_accepted(id, sent_at)`` is called for
    each report stored (``sent_at`` from :func:`time.perf_counter`). Raises
    :class:`HttpError` when the uploads are refused or the server cannot be reached at all.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    if reports is not None:
        count = len(reports) if count is None else min(count, len(reports))
    traffic = traffic or Traffic(seed)
    pool = HttpPool(url, size=connections)
    stats = ReplayStats()
    bar = Progress(progress, count) if progress is not None else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        if uploads:
            stats.uploads = await post_uploads(pool, token, traffic.uploads())
        stats.started = time.monotonic()
        inflight: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(connections)

        async def send(report: Any) -> None:
            sent_at = time.perf_counter()
            try:
                status, _h, body = await pool.request("POST", "/v3/report", report, headers)
            except HttpError as exc:
                stats.failed += 1
                stats.last_error = str(exc)
                return
            finally:
                slots.release()
            if status == 201:
                stats.accepted += 1
                report_id = json.loads(body)["id"]
                if on_accepted is not None:
                    on_accepted(report_id, sent_at)
            elif status == 303:
                stats.duplicates += 1
            else:
                stats.refused += 1
                stats.last_error = f"{status}: {body[:200].decode('utf-8', 'replace')}"

        begin = time.perf_counter()
        i = 0
        while (count is None or i < count) and (
            duration is None or time.perf_counter() - begin < duration
        ):
            if stop is not None and stop.is_set():
                break
            due = begin + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            report = traffic.report() if reports is None else reports[i]
            stats.sent += 1
            task = asyncio.create_task(send(report))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            i += 1
            if bar is not None:
                bar.draw(stats)
        if inflight:
            await asyncio.gather(*inflight)
    finally:
        await pool.close()
        if bar is not None:
            bar.finish(stats)
    return stats
