"""Pages and static assets of the web UI.

Every page is a small HTML shell rendered from ``webui/templates`` with :class:`string.Template`;
the data comes from the HTTP API (``/v3/...``, ``/api/v1/...``) and live topics, fetched by the ES
modules under ``webui/static``. Nothing is built: the files are served as they are.

Names in the URL (author IDs, distribution names, versions, report ids) must be made of topic
segment characters (letters, digits and ``-_.:@+~``, at most 128): they become topic names such as
``reports/dist/<dist>``. Anything else gets an HTML 404 page; a page never shows a traceback.
"""

from __future__ import annotations

import html
import json
import re
from functools import lru_cache
from pathlib import Path
from string import Template
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from broker import __version__

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

NAME = re.compile(r"[A-Za-z0-9\-_.:@+~]{1,128}")

#: Pages load scripts, styles and data only from this origin; the WebSocket is same-origin too.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)

PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=32)
def _template(name: str) -> Template:
    return Template((TEMPLATES / name).read_text(encoding="utf-8"))


def _json_for_script(value: Any) -> str:
    """JSON that can sit inside ``<script type="application/json">`` without ending it early."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(
    body: str,
    *,
    title: str,
    page: str,
    data: dict[str, Any] | None = None,
    status: int = 200,
    **fields: str,
) -> HTMLResponse:
    """Render ``templates/<body>`` inside the layout.

    ``fields`` fill ``$name`` placeholders of the body template and are HTML-escaped here;
    ``data`` is handed to the page's script as JSON. A placeholder without a value raises
    :class:`KeyError` (a bug in this module, caught by the tests), never a half-rendered page.
    """
    inner = _template(body).substitute({k: html.escape(v) for k, v in fields.items()})
    text = _template("layout.html").substitute(
        title=html.escape(title),
        page=page,
        body=inner,
        data=_json_for_script({"page": page, **(data or {})}),
        version=__version__,
    )
    return HTMLResponse(text, status_code=status, headers=PAGE_HEADERS)


def not_found(what: str) -> HTMLResponse:
    return render_page("notfound.html", title="Not found", page="notfound", status=404, what=what)


def _name(request: Request, key: str) -> str | None:
    value = request.path_params.get(key)
    if isinstance(value, str) and NAME.fullmatch(value):
        return value
    return None


async def home(request: Request) -> Response:
    return render_page("home.html", title="CPAN Testers, live", page="home")


async def author(request: Request) -> Response:
    name = _name(request, "author")
    if name is None:
        return not_found("author")
    return render_page(
        "author.html",
        title=f"{name}: releases and reports",
        page="author",
        data={"author": name},
        author=name,
    )


async def dist(request: Request) -> Response:
    name = _name(request, "dist")
    version = _name(request, "version") if "version" in request.path_params else ""
    if name is None or version is None:
        return not_found("distribution")
    title = f"{name} {version}".strip()
    return render_page(
        "dist.html",
        title=f"{title}: test reports",
        page="dist",
        data={"dist": name, "version": version or None},
        dist=name,
        version=version,
    )


async def report(request: Request) -> Response:
    report_id = _name(request, "report_id")
    if report_id is None:
        return not_found("report")
    return render_page(
        "report.html",
        title=f"Report {report_id}",
        page="report",
        data={"report": report_id},
        report=report_id,
    )


async def ops(request: Request) -> Response:
    return render_page("ops.html", title="Operations", page="ops")


class _Static(StaticFiles):
    """Static files that always revalidate (no build step, so no fingerprinted names)."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


ROUTES: list[BaseRoute] = [
    Route("/", home, methods=["GET", "HEAD"]),
    Route("/author/{author}", author, methods=["GET", "HEAD"]),
    Route("/dist/{dist}", dist, methods=["GET", "HEAD"]),
    Route("/dist/{dist}/{version}", dist, methods=["GET", "HEAD"]),
    Route("/report/{report_id}", report, methods=["GET", "HEAD"]),
    Route("/ops", ops, methods=["GET", "HEAD"]),
    Mount("/static", app=_Static(directory=STATIC), name="static"),
]
