"""HTTP and WebSocket routes of the CPAN Testers API v3 (base path ``/v3``), uploads and
statistics.

``/v3`` follows the shipped specification (:mod:`broker.cpantesters.spec`): request bodies and
query parameters are validated against it, answers have its shapes, errors are
``{"errors": [{"message", "path"}]}`` with ``path`` a JSON pointer (``/`` when no single input is
at fault). Reads are public, like the original API. Every ``GET`` answer carries an ``ETag``
(a hash of the body; ``If-None-Match`` gets 304) and ``Cache-Control`` (a report by id never
changes: one day; lists: ``v3_cache_max_age`` seconds).

Lists hold at most ``v3_max_rows`` rows (and ``limit`` when smaller), oldest first by the time
they were recorded or updated; ``since`` continues from a point in time.

Routes:

- ``POST /v3/report`` (open, or a token that may enqueue on the reports queue when
  ``reports_require_token``): 201 ``{"id"}``; the same report again: 303 to the stored one.
  Bodies may hold up to ``max_frame_bytes`` less :data:`JOB_FRAME_HEADROOM` (413 beyond).
- ``GET /v3/report/<id>``, ``/v3/summary[/<dist>[/<version>]]``,
  ``/v3/release[/dist/<dist>[/<version>] | /author/<author>]``,
  ``/v3/upload[/dist/<dist> | /author/<author>]``.
- WebSocket ``/v3/upload[/dist/<dist> | /author/<author>]``: each new upload as one JSON text
  frame (the ``Upload`` object), as it is recorded. Anonymous unless ``uploads/**`` is not
  public; then ``Authorization: Bearer`` on the upgrade. A client that falls
  :data:`FEED_BUFFER` uploads behind is closed with 1013.
- ``POST /api/v1/uploads`` (a token that may publish on ``uploads/dist/<dist>`` and
  ``uploads/author/<author>``): one upload ``{dist, version, author, filename?, released?}``
  or ``{"uploads": [...]}`` (up to 1,000, all checked before any is recorded) → 201.
- ``GET /api/v1/stats``, ``/api/v1/stats/<name>``, ``/api/v1/plugins``: readable by whoever
  may subscribe to ``stats/<name>`` (public by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from auth.permissions import Permissions
from broker.core import Broker
from broker.http_api import api, broker_of, error_response, permissions
from protocol.errors import (
    HTTP_STATUS,
    BadRequest,
    Forbidden,
    NotFound,
    ProtocolError,
    TooLarge,
    Unauthorized,
)

from .pipeline import ReportPipeline, release_to_api, summary_to_api, upload_to_api
from .schema import SchemaError
from .spec import format_date_time, parse_date_time, query_parameters, validator

__all__ = ["FEED_BUFFER", "ROUTES"]

log = logging.getLogger("quicksilver.v3")

#: Uploads queued for one WebSocket feed client before it is closed with 1013.
FEED_BUFFER = 1000
#: Most uploads in one ``POST /api/v1/uploads``.
MAX_UPLOADS = 1000
_NAME = re.compile(r"[A-Za-z0-9\-_.:@+~]{1,128}\Z")
_REPORT_MAX_AGE = 86_400
#: A report travels to its worker inside a job frame, which must stay within the frame limit
#: that workers accept (the server's ``max_frame_bytes``): this much is kept for the frame.
JOB_FRAME_HEADROOM = 4096

Handler = Callable[[Request], Awaitable[Response]]


class V3Error(Exception):
    """An answer other than success: status and the ``errors`` list."""

    def __init__(self, status: int, errors: list[dict[str, str]]) -> None:
        super().__init__(errors[0]["message"] if errors else str(status))
        self.status = status
        self.errors = errors

    @classmethod
    def one(cls, status: int, message: str, path: str = "/") -> V3Error:
        return cls(status, [{"message": message, "path": path}])


def _errors_response(status: int, errors: list[dict[str, str]], **extra: Any) -> JSONResponse:
    response = JSONResponse({"errors": errors, **extra}, status_code=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="quicksilver"'
    return response


def v3(endpoint: Handler) -> Handler:
    """Turn :class:`V3Error` and protocol errors into the spec's ``Error`` answers."""

    async def wrapper(request: Request) -> Response:
        broker_of(request).metrics.http_requests += 1
        try:
            return await endpoint(request)
        except V3Error as exc:
            return _errors_response(exc.status, exc.errors)
        except ProtocolError as exc:
            return _errors_response(HTTP_STATUS[exc.code], [{"message": exc.message, "path": "/"}])

    wrapper.__name__ = endpoint.__name__
    wrapper.__doc__ = endpoint.__doc__
    return wrapper


def _broker(conn: HTTPConnection) -> Broker:
    broker: Broker = conn.app.state.broker
    return broker


def pipeline_of(conn: HTTPConnection) -> ReportPipeline:
    return _broker(conn).reports


def cached_json(
    request: Request, data: Any, *, max_age: int, immutable: bool = False, status: int = 200
) -> Response:
    """JSON with an ``ETag`` of its bytes and ``Cache-Control``; 304 when ``If-None-Match``
    names the same ETag."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    etag = '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'
    cache = f"public, max-age={max_age}" + (", immutable" if immutable else "")
    headers = {"ETag": etag, "Cache-Control": cache}
    wanted = request.headers.get("if-none-match")
    if wanted is not None:
        tags = {tag.strip().removeprefix("W/") for tag in wanted.split(",")}
        if etag in tags or "*" in tags:
            return Response(status_code=304, headers=headers)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def _body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _int64(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise ValueError("an integer is outside the 64-bit range")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def parse_json(raw: bytes, path: str) -> Any:
    """Decode a JSON request body strictly: no NaN or Infinity, integers within 64 bits,
    finite numbers (what both JSON and msgpack carry); :class:`V3Error` 400 otherwise."""
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_int=_int64, parse_float=_finite)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise V3Error.one(400, f"Invalid JSON: {exc}", path) from None


def _query(request: Request, operation: str) -> dict[str, Any]:
    """The operation's query parameters, typed and validated (absent ones are left out)."""
    values: dict[str, Any] = {}
    errors: list[SchemaError] = []
    query = request.query_params
    for param in query_parameters(operation):
        raw = query.getlist(param.name)
        if not raw or (not param.multi and raw[-1] == ""):
            continue
        value, problems = param.parse(raw)
        if problems:
            errors += problems
        else:
            values[param.name] = value
    if errors:
        raise V3Error(400, [e.to_api() for e in errors])
    return values


def _rows(request: Request, params: Mapping[str, Any]) -> int:
    """How many rows to return: ``limit`` when given and positive, at most ``v3_max_rows``."""
    cap = broker_of(request).settings.v3_max_rows
    limit = params.get("limit")
    return min(cap, limit) if isinstance(limit, int) and limit > 0 else cap


def _list_age(request: Request) -> int:
    return broker_of(request).settings.v3_cache_max_age


# --- reports ------------------------------------------------------------------------------------


@v3
async def report_post(request: Request) -> Response:
    """``POST /v3/report``: validate against ``NewReport``, store, enqueue its job."""
    broker = broker_of(request)
    pipeline = pipeline_of(request)
    if broker.settings.reports_require_token:
        perms = permissions(request)
        if not perms.can_enqueue(pipeline.queue):
            raise Forbidden(f"this token may not submit reports (queue {pipeline.queue!r})")
    limit = broker.settings.max_frame_bytes - JOB_FRAME_HEADROOM
    report = parse_json(await _body(request, limit), "/report")
    errors = validator().validate(report, "#/definitions/NewReport", "/report")
    if errors:
        raise V3Error(400, [e.to_api() for e in errors])
    try:
        report_id, duplicate = await pipeline.submit(report)
    except BadRequest as exc:
        raise V3Error.one(400, exc.message, "/report") from None
    if duplicate:
        response = _errors_response(
            303,
            [{"message": f"Duplicate report: stored before as {report_id}", "path": "/report"}],
            id=report_id,
        )
        response.headers["Location"] = f"/v3/report/{report_id}"
        return response
    return JSONResponse({"id": report_id}, status_code=201)


@v3
async def report_get(request: Request) -> Response:
    """``GET /v3/report/<id>``: the report as posted, with ``id`` and ``created``."""
    report_id = request.path_params["id"]
    found = await broker_of(request).store.get_report(report_id)
    if found is None:
        raise V3Error.one(404, "Report ID not found", "/id")
    body, received_at = found
    report = json.loads(body)
    report["id"] = report_id
    report["created"] = format_date_time(received_at)
    return cached_json(request, report, max_age=_REPORT_MAX_AGE, immutable=True)


# --- summaries ----------------------------------------------------------------------------------


async def _summaries(request: Request, operation: str) -> Response:
    params = _query(request, operation)
    dist = request.path_params.get("dist")
    version = request.path_params.get("version")
    perls = params.get("perl") or []
    osnames = params.get("osname") or []
    if dist is None and not perls and not osnames:
        raise V3Error.one(400, "You must provide one of 'perl' or 'osname'")
    store = broker_of(request).store
    rows = await store.list_report_summaries(
        dist=dist,
        version=version,
        grade=params.get("grade"),
        perls=perls,
        osnames=osnames,
        perl_maturity=params.get("perl_maturity"),
        since=params.get("since"),
        limit=_rows(request, params),
    )
    if not rows and dist is not None and not await store.release_known(dist, version):
        what = f'Distribution "{dist}"' + (f' version "{version}"' if version else "")
        raise V3Error.one(404, f"{what} not found", "/version" if version else "/dist")
    return cached_json(request, [summary_to_api(s) for s in rows], max_age=_list_age(request))


@v3
async def summary_all(request: Request) -> Response:
    """``GET /v3/summary?perl=...&osname=...``."""
    return await _summaries(request, "/summary")


@v3
async def summary_dist(request: Request) -> Response:
    """``GET /v3/summary/<dist>``."""
    return await _summaries(request, "/summary/{dist}")


@v3
async def summary_release(request: Request) -> Response:
    """``GET /v3/summary/<dist>/<version>``."""
    return await _summaries(request, "/summary/{dist}/{version}")


# --- releases -----------------------------------------------------------------------------------


@v3
async def release_list(request: Request) -> Response:
    """``GET /v3/release``, ``/v3/release/dist/<dist>``, ``/v3/release/author/<author>``."""
    dist = request.path_params.get("dist")
    author = request.path_params.get("author")
    operation = (
        "/release/dist/{dist}" if dist is not None or author is None else "/release/author/{author}"
    )
    params = _query(request, operation)
    rows = await broker_of(request).store.list_releases(
        dist=dist,
        author=author,
        maturity=params.get("maturity"),
        since=params.get("since"),
        limit=_rows(request, params),
    )
    if not rows and (dist is not None or author is not None):
        store = broker_of(request).store
        if dist is not None and not await store.release_known(dist):
            raise V3Error.one(404, f'Distribution "{dist}" not found', "/dist")
        if author is not None and not await store.list_releases(author=author, limit=1):
            raise V3Error.one(404, f'Author "{author}" not found', "/author")
    return cached_json(request, [release_to_api(r) for r in rows], max_age=_list_age(request))


@v3
async def release_one(request: Request) -> Response:
    """``GET /v3/release/dist/<dist>/<version>``: one ``Release``."""
    dist, version = request.path_params["dist"], request.path_params["version"]
    _query(request, "/release/dist/{dist}/{version}")
    rows = await broker_of(request).store.list_releases(dist=dist, version=version, limit=1)
    if not rows:
        raise V3Error.one(404, f'Distribution "{dist}" version "{version}" not found', "/version")
    return cached_json(request, release_to_api(rows[0]), max_age=_list_age(request))


# --- uploads ------------------------------------------------------------------------------------


@v3
async def upload_list(request: Request) -> Response:
    """``GET /v3/upload``, ``/v3/upload/dist/<dist>``, ``/v3/upload/author/<author>``."""
    dist = request.path_params.get("dist")
    author = request.path_params.get("author")
    operation = (
        "/upload/dist/{dist}"
        if dist is not None
        else "/upload/author/{author}"
        if author is not None
        else "/upload"
    )
    params = _query(request, operation)
    store = broker_of(request).store
    rows = await store.list_uploads(
        dist=dist,
        author=author,
        maturity=params.get("maturity"),
        since=params.get("since"),
        limit=_rows(request, params),
    )
    if not rows and dist is not None and not await store.list_uploads(dist=dist, limit=1):
        raise V3Error.one(404, f'Distribution "{dist}" not found', "/dist")
    if not rows and author is not None and not await store.list_uploads(author=author, limit=1):
        raise V3Error.one(404, f'Author "{author}" not found', "/author")
    return cached_json(request, [upload_to_api(u) for u in rows], max_age=_list_age(request))


def _upload_fields(item: Any, where: str) -> tuple[str, str, str, str, float]:
    """``(dist, version, author, filename, released)`` of one upload; :class:`V3Error` 400
    with the pointer of the bad field."""
    if not isinstance(item, dict):
        raise V3Error.one(400, "Expected object - got " + type(item).__name__ + ".", where or "/")
    names: dict[str, str] = {}
    for key in ("dist", "version", "author"):
        value = item.get(key)
        if not isinstance(value, str) or not _NAME.match(value):
            raise V3Error.one(
                400,
                f"'{key}' must be 1 to 128 letters, digits or -_.:@+~",
                f"{where}/{key}",
            )
        names[key] = value
    filename = item.get("filename")
    if filename is None:
        filename = f"{names['dist']}-{names['version']}.tar.gz"
    if not isinstance(filename, str) or not 0 < len(filename) <= 255:
        raise V3Error.one(
            400, "'filename' must be a string of 1 to 255 characters", f"{where}/filename"
        )
    released = item.get("released")
    if released is None:
        stamp = time.time()
    elif isinstance(released, str):
        try:
            stamp = parse_date_time(released)
        except ValueError:
            raise V3Error.one(
                400, "Does not match date-time format.", f"{where}/released"
            ) from None
    else:
        raise V3Error.one(400, "'released' must be a date-time string", f"{where}/released")
    return names["dist"], names["version"], names["author"], filename, stamp


def _require_upload_rights(perms: Permissions, dist: str, author: str) -> None:
    for topic in (f"uploads/dist/{dist}", f"uploads/author/{author}"):
        if not perms.can_publish(topic):
            raise Forbidden(f"this token may not publish on {topic!r}")


@api
async def uploads_post(request: Request) -> Response:
    """``POST /api/v1/uploads``: record uploads, publish them on their topics."""
    perms = permissions(request)
    if perms.is_anonymous:
        raise Unauthorized("this endpoint needs 'Authorization: Bearer <token>'")
    broker = broker_of(request)
    try:
        body = parse_json(await _body(request, broker.settings.max_frame_bytes), "/")
        if isinstance(body, dict) and "uploads" in body:
            items = body["uploads"]
            if not isinstance(items, list) or not 1 <= len(items) <= MAX_UPLOADS:
                raise V3Error.one(
                    400, f"'uploads' must be a list of 1 to {MAX_UPLOADS}", "/uploads"
                )
            specs = [_upload_fields(item, f"/uploads/{i}") for i, item in enumerate(items)]
        else:
            specs = [_upload_fields(body, "")]
    except V3Error as exc:
        return error_response(exc.status, exc.errors[0]["message"], exc.errors[0]["path"])
    for dist, _version, author, _filename, _released in specs:
        _require_upload_rights(perms, dist, author)
    pipeline = pipeline_of(request)
    recorded = [upload_to_api(await pipeline.record_upload(*spec)) for spec in specs]
    if isinstance(body, dict) and "uploads" in body:
        return JSONResponse({"uploads": recorded}, status_code=201)
    return JSONResponse(recorded[0], status_code=201)


# --- statistics ---------------------------------------------------------------------------------


def _stats_reader(request: Request, name: str) -> None:
    perms = permissions(request, required=False)
    if not perms.can_subscribe(f"stats/{name}"):
        if perms.is_anonymous:
            raise Unauthorized("this endpoint needs 'Authorization: Bearer <token>'")
        raise Forbidden(f"this token may not read stats/{name}")


@api
async def stats_all(request: Request) -> Response:
    """``GET /api/v1/stats``: totals, pipeline latency p50/p99 and every statistic."""
    _stats_reader(request, "**")
    return JSONResponse(pipeline_of(request).overview())


@api
async def stats_one(request: Request) -> Response:
    """``GET /api/v1/stats/<name>``: one statistic's counters."""
    name = request.path_params["name"]
    plugin = pipeline_of(request).plugins.get(name)
    if plugin is None:
        raise NotFound(f"no statistic named {name!r}; GET /api/v1/plugins lists them")
    _stats_reader(request, name)
    return JSONResponse(plugin.snapshot())


@api
async def plugins(request: Request) -> Response:
    """``GET /api/v1/plugins``: the installed statistics plugins."""
    _stats_reader(request, "**")
    return JSONResponse({"plugins": [p.describe() for p in pipeline_of(request).plugins.values()]})


# --- the upload feeds ---------------------------------------------------------------------------


def _feed_pattern(ws: WebSocket) -> str | None:
    params = ws.path_params
    for key in ("dist", "author"):
        if key in params:
            value = params[key]
            return f"uploads/{key}/{value}" if _NAME.match(value) else None
    return "uploads/dist/*"


def _feed_permissions(ws: WebSocket) -> Permissions | None:
    broker = _broker(ws)
    header = ws.headers.get("authorization")
    if header is None:
        if not broker.settings.allow_anonymous:
            return None
        return Permissions.anonymous(broker.settings.public_patterns)
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    try:
        return broker.verify(token.strip())[1]
    except ProtocolError:
        return None


async def upload_feed(ws: WebSocket) -> None:
    """WebSocket ``/v3/upload[/dist/<dist> | /author/<author>]``: new uploads as JSON text."""
    pattern = _feed_pattern(ws)
    perms = _feed_permissions(ws)
    if pattern is None or perms is None or not perms.can_subscribe(pattern):
        await ws.close(code=4403)  # before accept: the handshake is refused with 403
        return
    await ws.accept()
    queue: asyncio.Queue[Any] = asyncio.Queue(FEED_BUFFER)
    overflow: list[bool] = []

    def deliver(topic: str, data: object) -> None:
        try:
            queue.put_nowait(data)
        except asyncio.QueueFull:
            overflow.append(True)

    stop = _broker(ws).hub.listen(pattern, deliver)

    async def send() -> None:
        while not overflow:
            data = await queue.get()
            await ws.send_text(json.dumps(data, separators=(",", ":"), ensure_ascii=False))
        await ws.close(code=1013, reason="too far behind")

    async def receive() -> None:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return

    tasks = [asyncio.create_task(send()), asyncio.create_task(receive())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop()
        for task in tasks:
            task.cancel()
        for task in tasks:
            # The peer is gone or the server stops: nothing left to tell anyone.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


ROUTES: list[BaseRoute] = [
    Route("/v3/report", report_post, methods=["POST"]),
    Route("/v3/report/{id}", report_get, methods=["GET"]),
    Route("/v3/summary", summary_all, methods=["GET"]),
    Route("/v3/summary/{dist}", summary_dist, methods=["GET"]),
    Route("/v3/summary/{dist}/{version}", summary_release, methods=["GET"]),
    Route("/v3/release", release_list, methods=["GET"]),
    Route("/v3/release/dist/{dist}", release_list, methods=["GET"]),
    Route("/v3/release/dist/{dist}/{version}", release_one, methods=["GET"]),
    Route("/v3/release/author/{author}", release_list, methods=["GET"]),
    Route("/v3/upload", upload_list, methods=["GET"]),
    Route("/v3/upload/dist/{dist}", upload_list, methods=["GET"]),
    Route("/v3/upload/author/{author}", upload_list, methods=["GET"]),
    WebSocketRoute("/v3/upload", upload_feed),
    WebSocketRoute("/v3/upload/dist/{dist}", upload_feed),
    WebSocketRoute("/v3/upload/author/{author}", upload_feed),
    Route("/api/v1/uploads", uploads_post, methods=["POST"]),
    Route("/api/v1/stats", stats_all, methods=["GET"]),
    Route("/api/v1/stats/{name}", stats_one, methods=["GET"]),
    Route("/api/v1/plugins", plugins, methods=["GET"]),
]
