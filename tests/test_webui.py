"""The web UI over HTTP: pages, their headers and data, static files, the ops overview endpoint.

What the pages do in a browser is tested under tests/browser/.
"""

from __future__ import annotations

import glob
import json
import re
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from webui import routes

from .helpers import ROOT, RunningServer, http, raw_client, token

STATIC = ROOT / "webui" / "static"


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.data: str | None = None
        self._in_data = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script" and a.get("type") == "module" and a.get("src"):
            self.scripts.append(a["src"] or "")
        if tag == "link" and a.get("rel") == "stylesheet":
            self.styles.append(a.get("href") or "")
        self._in_data = tag == "script" and a.get("id") == "page-data"

    def handle_endtag(self, tag: str) -> None:
        self._in_data = False

    def handle_data(self, data: str) -> None:
        if self._in_data:
            self.data = (self.data or "") + data


def parse(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    return parser


@pytest.mark.parametrize(
    ("path", "page", "data"),
    [
        ("/", "home", {}),
        ("/author/PREACTION", "author", {"author": "PREACTION"}),
        ("/dist/Data-Printer", "dist", {"dist": "Data-Printer", "version": None}),
        ("/dist/Data-Printer/0.39_01", "dist", {"dist": "Data-Printer", "version": "0.39_01"}),
        (
            "/report/01be7be2-2aec-11e7-a074-e1beba07c9dd",
            "report",
            {"report": "01be7be2-2aec-11e7-a074-e1beba07c9dd"},
        ),
        ("/ops", "ops", {}),
    ],
)
async def test_pages(server: RunningServer, path: str, page: str, data: dict[str, Any]) -> None:
    async with http(server) as client:
        r = await client.get(path)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        parsed = parse(r.text)
        assert parsed.scripts == [f"/static/pages/{page}.js"]
        assert parsed.data is not None
        assert json.loads(parsed.data) == {"page": page, **data}
        for asset in parsed.scripts + parsed.styles:
            assert (await client.get(asset)).status_code == 200, asset
        head = await client.head(path)
        assert head.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/author/has%20space",
        "/dist/a%3Cscript%3E",
        "/dist/Ok/bad%22version",
        "/report/" + "x" * 129,
    ],
)
async def test_invalid_names_get_an_html_404(server: RunningServer, path: str) -> None:
    async with http(server) as client:
        r = await client.get(path)
        assert r.status_code == 404
        assert r.headers["content-type"].startswith("text/html")
        assert "not valid" in r.text
        assert "<script>" not in r.text.replace('<script type="', "")


def test_page_data_cannot_close_its_script_element() -> None:
    text = routes._json_for_script({"x": "</script><script>alert(1)</script>&"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"x": "</script><script>alert(1)</script>&"}


async def test_fields_are_escaped_in_the_html() -> None:
    response = routes.render_page(
        "author.html", title="<b>", page="author", data={}, author='"><i>x</i>'
    )
    body = bytes(response.body).decode()
    assert "<i>x</i>" not in body and "&lt;i&gt;" in body
    assert "<title>&lt;b&gt; · quicksilver</title>" in body


async def test_static_files(server: RunningServer) -> None:
    async with http(server) as client:
        r = await client.get("/static/quicksilver.js")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/javascript")
        assert r.headers["cache-control"] == "no-cache"
        assert "etag" in r.headers
        again = await client.get(
            "/static/quicksilver.js", headers={"If-None-Match": r.headers["etag"]}
        )
        assert again.status_code == 304
        css = await client.get("/static/style.css")
        assert css.headers["content-type"].startswith("text/css")
        for path in ("/static/nope.js", "/static/../routes.py", "/static/%2e%2e/routes.py"):
            missing = await client.get(path)
            assert missing.status_code == 404, path
            assert missing.json()["errors"][0]["message"]


IMPORT = re.compile(r"""^\s*(?:import|export)\s[^;]*?from\s+["']([^"']+)["']""", re.M | re.S)


def test_every_module_import_resolves() -> None:
    """No build step: each relative import must name a file that is served."""
    modules = sorted(STATIC.rglob("*.js"))
    assert len(modules) >= 8
    for module in modules:
        for target in IMPORT.findall(module.read_text()):
            assert target.startswith("."), f"{module.name} imports {target!r}: vendor it instead"
            assert (module.parent / target).resolve().is_file(), f"{module}: {target}"


def test_package_data_covers_the_templates_and_static_files() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["webui"]
    base = ROOT / "webui"
    covered = {
        Path(p).resolve()
        for pattern in patterns
        for p in glob.glob(str(base / pattern), recursive=True)
        if Path(p).is_file()
    }
    files = {
        p.resolve() for d in ("templates", "static") for p in (base / d).rglob("*") if p.is_file()
    }
    assert files and files <= covered, sorted(str(p) for p in files - covered)


async def test_overview_needs_an_admin_token(server: RunningServer) -> None:
    async with http(server) as client:
        assert (await client.get("/api/v1/overview")).status_code == 401
    reader = token(sub="reader", roles=("subscriber",))
    async with http(server, reader) as client:
        assert (await client.get("/api/v1/overview")).status_code == 403


async def test_overview_counts_connections_and_subscriptions(server: RunningServer) -> None:
    async with raw_client(server.ws_url) as ws:
        assert (await ws.request({"type": "subscribe", "topic": "overview/a"}))["type"] == "ok"
        assert (await ws.request({"type": "subscribe", "topic": "overview/*"}))["type"] == "ok"
        async with http(server, token()) as client:
            r = await client.get("/api/v1/overview")
    assert r.status_code == 200
    body = r.json()
    assert body["gauges"]["connections"] == 1
    assert body["gauges"]["subscriptions"] == 2
    assert body["counters"]["connections_total"] >= 1
    pickup = body["histograms"]["job_pickup_seconds"]
    assert len(pickup["counts"]) == len(pickup["bounds"]) + 1
    assert isinstance(body["time"], float)
