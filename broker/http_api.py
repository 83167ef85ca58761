"""The HTTP API (Starlette): publishing, jobs, tokens, health and metrics.

Every error is JSON ``{"errors":[{"message": ..., "path": <JSON pointer or null>}]}`` with a fitting
status code, never an HTML page or a traceback.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from auth.permissions import Permissions
from protocol.codec import check_portable, client_frame_from_dict
from protocol.errors import (
    HTTP_STATUS,
    BadRequest,
    Forbidden,
    NotFound,
    ProtocolError,
    TooLarge,
    Unauthorized,
)
from protocol.frames import Enqueue
from protocol.topics import parse_pattern, parse_topic

from .core import Broker
from .dispatcher import stats_to_api
from .jobstate import JobState
from .presence import PREFIX as PRESENCE_PREFIX
from .recovery import Recovery
from .store.base import NewJob
from .topiclist import list_topics

log = logging.getLogger("quicksilver.http")

Endpoint = Callable[[Request], Awaitable[Response]]


def error_response(status: int, message: str, path: str | None = None) -> JSONResponse:
    return JSONResponse({"errors": [{"message": message, "path": path}]}, status_code=status)


def protocol_error_response(exc: ProtocolError) -> JSONResponse:
    response = error_response(HTTP_STATUS[exc.code], exc.message)
    if exc.code == "unauthorized":
        response.headers["WWW-Authenticate"] = 'Bearer realm="quicksilver"'
    return response


def broker_of(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


def permissions(request: Request, *, required: bool = True) -> Permissions:
    """The caller's permissions from ``Authorization: Bearer``; anonymous when absent."""
    broker = broker_of(request)
    header = request.headers.get("authorization")
    if header is None:
        if required or not broker.settings.allow_anonymous:
            raise Unauthorized("this endpoint needs 'Authorization: Bearer <token>'")
        return Permissions.anonymous(broker.settings.public_patterns)
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization header must be 'Bearer <token>'")
    _claims, perms = broker.verify(token.strip())
    return perms


async def json_body(request: Request) -> Any:
    broker = broker_of(request)
    limit = broker.settings.max_frame_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"request body is larger than {limit} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"request body is larger than {limit} bytes")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


def api(endpoint: Endpoint) -> Endpoint:
    """Turn protocol errors into JSON error responses and count requests."""

    async def wrapper(request: Request) -> Response:
        broker_of(request).metrics.http_requests += 1
        try:
            return await endpoint(request)
        except ProtocolError as exc:
            return protocol_error_response(exc)

    wrapper.__name__ = endpoint.__name__
    wrapper.__doc__ = endpoint.__doc__
    return wrapper


# --- publish ----------------------------------------------------------------------------------


@api
async def publish(request: Request) -> Response:
    """``POST /api/v1/publish`` ``{"topic", "data"}`` → ``{"offset": N}``."""
    perms = permissions(request)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("body must be an object with 'topic' and 'data'")
    topic = parse_topic(body.get("topic"))
    if not perms.can_publish(topic):
        raise Forbidden(f"this token may not publish on {topic!r}")
    data = body.get("data")
    check_portable(data)
    offset = await broker_of(request).publish_async(topic, data)
    return JSONResponse({"offset": offset})


# --- jobs -------------------------------------------------------------------------------------


def _new_job(obj: Any, perms: Permissions) -> NewJob:
    if not isinstance(obj, dict):
        raise BadRequest("a job must be an object")
    frame = client_frame_from_dict({**obj, "type": "enqueue", "id": 0})
    assert isinstance(frame, Enqueue)
    if not perms.can_enqueue(frame.queue):
        raise Forbidden(f"this token may not enqueue jobs on queue {frame.queue!r}")
    return NewJob(
        queue=frame.queue,
        payload=frame.payload,
        priority=frame.priority,
        delay=frame.delay,
        unique_key=frame.unique_key,
        max_attempts=frame.max_attempts,
    )


@api
async def create_jobs(request: Request) -> Response:
    """``POST /api/v1/jobs``: one job (enqueue fields) → 201 ``{"job"}``; or ``{"jobs": [...]}``
    (bulk, up to 1,000, all or nothing) → 201 ``{"jobs": [{"job", "duplicate"}...]}``."""
    perms = permissions(request)
    body = await json_body(request)
    jobs = broker_of(request).jobs
    if isinstance(body, dict) and "jobs" in body:
        items = body["jobs"]
        if not isinstance(items, list) or not 1 <= len(items) <= 1000:
            raise BadRequest("'jobs' must be a list of 1 to 1000 jobs")
        specs = []
        for i, item in enumerate(items):
            try:
                specs.append(_new_job(item, perms))
            except BadRequest as exc:
                return error_response(400, exc.message, f"/jobs/{i}")
        results = await jobs.enqueue_many(specs)
        return JSONResponse(
            {"jobs": [{"job": rec.id, "duplicate": dup} for rec, dup in results]}, status_code=201
        )
    rec, duplicate = await jobs.enqueue(_new_job(body, perms))
    return JSONResponse(
        {"job": rec.id, "duplicate": duplicate}, status_code=200 if duplicate else 201
    )


def _require_job_access(perms: Permissions, queue: str) -> None:
    if not (perms.is_admin or perms.can_enqueue(queue) or perms.can_work(queue)):
        raise Forbidden(f"this token may not see jobs on queue {queue!r}")


@api
async def get_job(request: Request) -> Response:
    """``GET /api/v1/jobs/<id>``."""
    perms = permissions(request)
    rec = await broker_of(request).store.get_job(request.path_params["job_id"])
    if rec is None:
        raise NotFound(f"no job {request.path_params['job_id']}")
    _require_job_access(perms, rec.queue)
    return JSONResponse(rec.to_api())


@api
async def list_jobs(request: Request) -> Response:
    """``GET /api/v1/jobs?state=&queue=&limit=&before=`` (newest first; page with ``before``)."""
    perms = permissions(request)
    q = request.query_params
    state: JobState | None = None
    if q.get("state"):
        try:
            state = JobState(q["state"])
        except ValueError:
            raise BadRequest(f"unknown state {q['state']!r}") from None
    queue = q.get("queue") or None
    if queue is not None:
        _require_job_access(perms, queue)
    elif not perms.is_admin:
        raise Forbidden("listing jobs of every queue needs the admin role; give 'queue'")
    try:
        limit = int(q.get("limit", "50"))
    except ValueError:
        raise BadRequest("'limit' must be an integer") from None
    if not 1 <= limit <= 1000:
        raise BadRequest("'limit' must be between 1 and 1000")
    recs = await broker_of(request).store.list_jobs(
        state=state, queue=queue, limit=limit, before=q.get("before") or None
    )
    body: dict[str, Any] = {"jobs": [r.to_api() for r in recs]}
    if len(recs) == limit:
        body["next"] = recs[-1].id
    return JSONResponse(body)


def _admin(request: Request) -> Permissions:
    perms = permissions(request)
    if not perms.is_admin:
        raise Forbidden("this needs the admin role")
    return perms


@api
async def retry_job(request: Request) -> Response:
    """``POST /api/v1/jobs/<id>/retry`` (admin): a failed or cancelled job is queued again."""
    _admin(request)
    rec = await broker_of(request).jobs.retry(request.path_params["job_id"])
    return JSONResponse(rec.to_api())


@api
async def cancel_job(request: Request) -> Response:
    """``POST /api/v1/jobs/<id>/cancel``: cancel a queued or running job."""
    perms = permissions(request)
    broker = broker_of(request)
    rec = await broker.store.get_job(request.path_params["job_id"])
    if rec is None:
        raise NotFound(f"no job {request.path_params['job_id']}")
    if not (perms.is_admin or perms.can_enqueue(rec.queue)):
        raise Forbidden(f"this token may not cancel jobs on queue {rec.queue!r}")
    rec = await broker.jobs.cancel(rec.id)
    return JSONResponse(rec.to_api())


@api
async def delete_job(request: Request) -> Response:
    """``DELETE /api/v1/jobs/<id>`` (admin): an unfinished job is cancelled first (its holder is
    told to stop), then the record is removed."""
    _admin(request)
    broker = broker_of(request)
    job_id = request.path_params["job_id"]
    rec = await broker.store.get_job(job_id)
    if rec is None:
        raise NotFound(f"no job {job_id}")
    if rec.state not in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
        await broker.jobs.cancel(job_id)
    await broker.store.delete(job_id)
    return Response(status_code=204)


@api
async def queues(request: Request) -> Response:
    """``GET /api/v1/queues``: depth by state, oldest ready age and throughput per queue."""
    perms = permissions(request)
    stats = await broker_of(request).store.queue_stats()
    return JSONResponse(
        {
            name: stats_to_api(qs)
            for name, qs in sorted(stats.items())
            if perms.is_admin or perms.can_enqueue(name) or perms.can_work(name)
        }
    )


@api
async def workers(request: Request) -> Response:
    """``GET /api/v1/workers`` (admin): the worker connections of this node."""
    _admin(request)
    now = time.time()
    return JSONResponse(
        {"workers": [slot.describe(now) for slot in broker_of(request).jobs.workers.values()]}
    )


@api
async def overview(request: Request) -> Response:
    """``GET /api/v1/overview`` (admin): this node's gauges, counters and latency histograms
    (bucket bounds in seconds with per-bucket counts), for dashboards that diff two snapshots."""
    _admin(request)
    m = broker_of(request).metrics
    histograms = {"job_pickup_seconds": m.pickup_latency}
    histograms.update({name: h for name, (_help, h) in sorted(m.histograms.items())})
    return JSONResponse(
        {
            "time": time.time(),
            "gauges": {name: read() for name, (_help, read) in sorted(m.gauges.items())},
            "counters": {k: v for k, v in vars(m).items() if type(v) is int},
            "histograms": {
                name: {"bounds": h.bounds, "counts": h.counts, "count": h.count, "sum": h.total}
                for name, h in histograms.items()
            },
        }
    )


# --- tokens -----------------------------------------------------------------------------------


@api
async def revoke_token(request: Request) -> Response:
    """``POST /api/v1/tokens/revoke`` ``{"jti", "exp"}`` (admin): refuse that token from now on
    and close the connections using it (4401)."""
    _admin(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("jti"), str) or not body["jti"]:
        raise BadRequest("body must be an object with a 'jti' string")
    exp = body.get("exp")
    if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int)):
        raise BadRequest("'exp' must be an integer or null")
    closed = await broker_of(request).revoke(body["jti"], exp)
    return JSONResponse({"revoked": body["jti"], "closed": closed})


# --- webhooks ---------------------------------------------------------------------------------


@api
async def create_webhook(request: Request) -> Response:
    """``POST /api/v1/webhooks`` ``{"url","pattern","secret"?,"max_attempts"?,"description"?}``
    (admin) → 201 the webhook; a generated secret is in this answer only (``"secret"``)."""
    from .webhooks import parse_registration

    _admin(request)
    registration = parse_registration(await json_body(request))
    webhook, generated = await broker_of(request).webhooks.add(registration)
    body = webhook.to_api()
    if generated is not None:
        body["secret"] = generated
    return JSONResponse(body, status_code=201)


@api
async def list_webhooks(request: Request) -> Response:
    """``GET /api/v1/webhooks`` (admin) → ``{"webhooks": [...]}`` (never their secrets)."""
    _admin(request)
    hooks = broker_of(request).webhooks.registered()
    return JSONResponse({"webhooks": [h.to_api() for h in hooks]})


@api
async def get_webhook(request: Request) -> Response:
    """``GET /api/v1/webhooks/<id>`` (admin)."""
    _admin(request)
    return JSONResponse(broker_of(request).webhooks.get(request.path_params["hook_id"]).to_api())


@api
async def delete_webhook(request: Request) -> Response:
    """``DELETE /api/v1/webhooks/<id>`` (admin) → 204; unfinished deliveries are cancelled."""
    _admin(request)
    await broker_of(request).webhooks.remove(request.path_params["hook_id"])
    return Response(status_code=204)


# --- topics -----------------------------------------------------------------------------------


def _int_param(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name!r} must be an integer") from None
    if not low <= value <= high:
        raise BadRequest(f"{name!r} must be between {low} and {high}")
    return value


@api
async def topic_history(request: Request) -> Response:
    """``GET /api/v1/topics/<topic>/history?since=N&limit=M&epoch=E``: the kept messages after
    offset ``since`` (without ``since``: the last ``limit``), oldest first."""
    perms = permissions(request, required=False)
    topic = parse_topic(request.path_params["topic"])
    if not perms.can_subscribe(topic):
        raise Forbidden(f"this token may not read {topic!r}")
    limit = _int_param(request, "limit", 100, 1, 1000)
    since = _int_param(request, "since", None, 0, 2**63 - 1)
    epoch = request.query_params.get("epoch") or None
    broker = broker_of(request)
    hub = broker.hub
    if since is None:
        assert limit is not None
        since = max(0, hub.log.state(topic).offset - limit)
    found = await Recovery(hub.log, topic, since, epoch, hub.clock(), limit).run(broker.store)
    st = found.state
    body: dict[str, Any] = {
        "topic": topic,
        "epoch": st.epoch,
        "offset": st.offset,
        "recovered": found.recovered,
        "messages": [{"offset": e.offset, "ts": e.ts, "data": e.data} for e in found.entries],
    }
    if found.truncated:
        body["next"] = found.cursor
    return JSONResponse(body)


@api
async def topic_presence(request: Request) -> Response:
    """``GET /api/v1/topics/<topic>/presence``: who is subscribed, for a tracked topic."""
    perms = permissions(request, required=False)
    topic = parse_topic(request.path_params["topic"])
    if not perms.can_subscribe(PRESENCE_PREFIX + topic):
        raise Forbidden(f"this token may not see the presence of {topic!r}")
    snapshot = broker_of(request).hub.presence.snapshot(topic)
    if snapshot is None:
        raise NotFound(f"presence is not tracked on {topic!r}")
    return JSONResponse(snapshot)


@api
async def topics(request: Request) -> Response:
    """``GET /api/v1/topics?pattern=&limit=`` (admin): active topics and held patterns."""
    _admin(request)
    raw = request.query_params.get("pattern") or None
    pattern = parse_pattern(raw) if raw is not None else None
    limit = _int_param(request, "limit", 1000, 1, 100_000)
    assert limit is not None
    return JSONResponse(list_topics(broker_of(request), pattern, limit))


# --- health -----------------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    broker = broker_of(request)
    if broker.ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "starting"}, status_code=503)


async def metrics(request: Request) -> Response:
    return PlainTextResponse(
        broker_of(request).metrics.render(), media_type="text/plain; version=0.0.4"
    )


async def http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return error_response(exc.status_code, message)


async def server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error")


ROUTES = [
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
    Route("/api/v1/publish", publish, methods=["POST"]),
    Route("/api/v1/jobs", create_jobs, methods=["POST"]),
    Route("/api/v1/jobs", list_jobs, methods=["GET"]),
    Route("/api/v1/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/api/v1/jobs/{job_id}", delete_job, methods=["DELETE"]),
    Route("/api/v1/jobs/{job_id}/retry", retry_job, methods=["POST"]),
    Route("/api/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/api/v1/queues", queues, methods=["GET"]),
    Route("/api/v1/workers", workers, methods=["GET"]),
    Route("/api/v1/overview", overview, methods=["GET"]),
    Route("/api/v1/tokens/revoke", revoke_token, methods=["POST"]),
    Route("/api/v1/webhooks", create_webhook, methods=["POST"]),
    Route("/api/v1/webhooks", list_webhooks, methods=["GET"]),
    Route("/api/v1/webhooks/{hook_id}", get_webhook, methods=["GET"]),
    Route("/api/v1/webhooks/{hook_id}", delete_webhook, methods=["DELETE"]),
    Route("/api/v1/topics", topics, methods=["GET"]),
    Route("/api/v1/topics/{topic:path}/history", topic_history, methods=["GET"]),
    Route("/api/v1/topics/{topic:path}/presence", topic_presence, methods=["GET"]),
]
