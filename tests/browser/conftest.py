"""Browser tests: Playwright (sync API) driving Debian's Chromium against real broker and worker
processes.

`scripts/install-browser` installs both (scripts/test runs it). Playwright never downloads a
browser here: it launches /usr/bin/chromium. Without it these tests fail with a message saying
how to install it, unless QUICKSILVER_BROWSER_TESTS=0 asks to skip them.

One browser serves the whole package; each test gets a fresh context (cookies, sessionStorage).
Screenshots go to docs/screenshots/ (QUICKSILVER_SCREENSHOTS overrides the folder).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ROOT, UNIT, cli_env, free_port, token

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(os.environ.get("QUICKSILVER_SCREENSHOTS", ROOT / "docs" / "screenshots"))
ADMIN = token(sub="ops", roles=("admin",), ttl=None)
WORKER = token(sub="worker", roles=("worker",), ttl=None)

# Console noise that is expected: a fetch answered 404 (the page then shows its empty state) and
# WebSocket attempts while a test has the broker stopped.
EXPECTED_CONSOLE = (
    "Failed to load resource",
    "WebSocket connection to",
)


def ms(units: float) -> float:
    """A Playwright timeout (milliseconds) of ``units`` scaled time units."""
    return units * UNIT * 1000


def until(predicate: Callable[[], bool], units: float = 10.0, step: float = 0.05) -> None:
    """Wait until ``predicate()`` holds, at most ``units`` units (a synchronous helpers.until)."""
    deadline = time.monotonic() + units * UNIT
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        time.sleep(step)


def spawn(args: list[str], **env: str) -> subprocess.Popen[str]:
    """``python -m quicksilver ARGS`` with the test secret. Its output goes to a file, never to
    a pipe nobody reads (a full pipe would stall a long-running process)."""
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - owned by the process object
    proc = subprocess.Popen(
        [sys.executable, "-m", "quicksilver", *args],
        env=cli_env(**env),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def output_of(proc: subprocess.Popen[str]) -> str:
    log = proc.log  # type: ignore[attr-defined]
    log.seek(0)
    text: str = log.read()
    return text


def end(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> str:
    """Signal the process, wait for it (kill it after 10 units), return its output."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=10 * UNIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = output_of(proc)
    proc.log.close()  # type: ignore[attr-defined]
    return text


@dataclass
class BrokerProcess:
    """``quicksilver serve`` on a fixed port and data directory, so it can be restarted."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> None:
        args = ["serve", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        proc = self.proc = spawn(args, QUICKSILVER_LOG_LEVEL="warning", **self.env)

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the broker exited: {output_of(proc)[-2000:]}")
            try:
                return httpx.get(self.url + "/readyz", timeout=UNIT).status_code == 200
            except httpx.TransportError:
                return False

        until(ready, 20)

    def stop(self) -> None:
        if self.proc is not None:
            self.output.append(end(self.proc))
            self.proc = None

    def http(self, tok: str | None = ADMIN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {tok}"} if tok else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10 * UNIT)

    def publish(self, topic: str, data: Any) -> int:
        with self.http() as client:
            r = client.post("/api/v1/publish", json={"topic": topic, "data": data})
            assert r.status_code == 200, r.text
            return int(r.json()["offset"])


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[str]

    def kill(self) -> str:
        return end(self.proc, signal.SIGKILL)

    def stop(self) -> str:
        return end(self.proc)


def start_worker(broker: BrokerProcess, *queues: str, sub: str = "worker") -> WorkerProcess:
    args = ["worker", "--url", broker.ws_url, "--token", token(sub=sub, roles=("worker",))]
    args += ["--app", "tests.worker_app", "--concurrency", "2"]
    for queue in queues:
        args += ["--queue", queue]
    return WorkerProcess(spawn(args))


def _launch(playwright: Any) -> Any:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-browser", pytrace=False)
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    if os.environ.get("QUICKSILVER_BROWSER_TESTS") == "0":
        pytest.skip("QUICKSILVER_BROWSER_TESTS=0")
    # Playwright must not fetch a browser of its own.
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run scripts/install-browser", pytrace=False)
    with sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="package")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One broker shared by the tests that do not stop it (each uses its own names)."""
    proc = BrokerProcess(tmp_path_factory.mktemp("broker") / "data")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A broker for one test, which may stop and restart it."""
    proc = BrokerProcess(tmp_path / "data")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


class PageErrors:
    """Uncaught exceptions and unexpected console errors of one page."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def console(self, message: Any) -> None:
        if message.type == "error" and not any(s in message.text for s in EXPECTED_CONSOLE):
            self.errors.append(f"console: {message.text}")

    def page_error(self, error: Any) -> None:
        self.errors.append(f"uncaught: {error}")


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page_errors() -> PageErrors:
    return PageErrors()


@pytest.fixture
def page(context: Any, page_errors: PageErrors) -> Iterator[Any]:
    """A page that fails the test on an uncaught exception or an unexpected console error."""
    pg = context.new_page()
    pg.set_default_timeout(ms(10))
    pg.on("console", page_errors.console)
    pg.on("pageerror", page_errors.page_error)
    yield pg
    assert not page_errors.errors, page_errors.errors


def screenshot(page: Any, name: str, *, full_page: bool = True) -> Path:
    """Write docs/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page, animations="disabled")
    return path
