"""Small HTTP helpers shared by the daemons: JSON responses, error envelopes, JSON bodies.

Errors are raised, not returned, so a handler reads as its happy path: ``fail(404, ...)``
raises an aiohttp HTTP exception whose body is the contract's envelope ``{code, message}``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from typing import Mapping, NoReturn, TypeVar

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .daemon import CORRELATION

_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 404: web.HTTPNotFound, 409: web.HTTPConflict,
    429: web.HTTPTooManyRequests, 500: web.HTTPInternalServerError, 503: web.HTTPServiceUnavailable,
}
log = logging.getLogger("llama_orch.http")
_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "INVALID_PARAMS", 500: "INTERNAL"}

#: The contract: 429 and 503 tell the client when to come back.
RETRY_STATUSES = (429, 503)
CORRELATION_ID = web.RequestKey("correlation_id", str)
class AccessLogger(AbstractAccessLogger):
    """The daemons' access log line: peer, request line, status, body bytes, seconds and the
    request's correlation id (``%a "%r" %s %b %Tf s correlation_id=%{X-Correlation-Id}o`` in
    aiohttp's terms), built in one %-format. aiohttp's general logger interprets its format per
    request and fills ``extra`` with every field, a cost on every request of a daemon that answers
    thousands a second; the format aiohttp hands this class is ignored."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        version = request.version
        self.logger.info('%s "%s %s HTTP/%d.%d" %d %d %.6f s correlation_id=%s', request.remote, request.method,
                         request.path_qs, version.major, version.minor, response.status, response.body_length, time,
                         response.headers.get("X-Correlation-Id", "-"),
                         extra={"correlation_id": response.headers.get("X-Correlation-Id"), "method": request.method,
                                "path": request.path, "status": response.status, "duration_ms": round(time * 1000, 3)})


def retry_headers(retry_after_ms: int) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(retry_after_ms / 1000))), "X-Backoff-Ms": str(retry_after_ms)}


@web.middleware
async def correlation(request: web.Request, handler):
    """Echo the client's ``X-Correlation-Id`` (or a new UUIDv4) on every non-204 response."""
    cid = request.headers.get("X-Correlation-Id") or str(uuid.uuid4())
    request[CORRELATION_ID] = cid
    # this handler's task is this request's alone: its log lines carry the id (JSON logs)
    CORRELATION.set(cid)
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        if exc.content_type != "application/json" and exc.status >= 400:  # aiohttp's own 404/405/413: our envelope
            detail = exc.text if exc.content_type == "text/plain" and exc.text else exc.reason
            exc.text = orjson.dumps(error_body(request, exc.status, _HTTP_CODES.get(exc.status, "INVALID_PARAMS"),
                                               detail)).decode()
            exc.content_type = "application/json"
        resp = exc
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unexpected error on %s %s (correlation id %s)", request.method, request.path, cid)
        writer = request.writer
        if writer is not None and writer.output_size > 0:
            raise  # a response is already on the wire: a second one would land inside its body
        resp = json_response(error_body(request, 500, "INTERNAL", f"internal error; quote correlation id {cid}"), 500)
    if resp.status != 204 and not (isinstance(resp, web.StreamResponse) and resp.prepared):
        resp.headers["X-Correlation-Id"] = cid
    if isinstance(resp, web.HTTPException):
        raise resp
    return resp


def serve_metrics_on(app: web.Application, host: str, port: int | None, handler, *keys: web.AppKey) -> None:
    """``PROMETHEUS_METRICS_PORT``: ``/metrics`` on a port of its own too, for scrapers kept off the API port.
    ``keys`` are the app keys the handler reads, shared with the small metrics app."""
    if port is None:
        return

    async def listener(app: web.Application):
        side = web.Application()
        for key in keys:
            side[key] = app[key]
        side.router.add_get("/metrics", handler)
        runner = web.AppRunner(side, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        yield
        await runner.cleanup()

    app.cleanup_ctx.append(listener)


def error_body(request: web.Request, status: int, code: str, message: str) -> dict:
    """Our envelope, or OpenAI's shape on the OpenAI-compatible routes (their clients parse it)."""
    if request.path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return {"code": code, "message": message}


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def fail(status: int, code: str, message: str, *, retry_after_ms: int | None = None) -> NoReturn:
    body: dict = {"code": code, "message": message}
    headers = None
    if status in RETRY_STATUSES:
        retry = retry_after_ms or 1000
        body.update(retriable=True, retry_after_ms=retry)
        headers = retry_headers(retry)
    raise _ERRORS[status](text=orjson.dumps(body).decode(), content_type="application/json", headers=headers)


T = TypeVar("T")


def pool_or_404(pools: Mapping[str, T], request: web.Request) -> T:
    """The pool named by the route's ``{pool_id}``, or the contract's 404 envelope."""
    pool_id = request.match_info["pool_id"]
    pool = pools.get(pool_id)
    if pool is None:
        fail(404, "POOL_NOT_FOUND", f"pool {pool_id} not found")
    return pool


async def json_body(request: web.Request) -> dict:
    """The request's JSON object (an empty body is ``{}``); anything else is a 400 naming why."""
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        fail(400, "INVALID_PARAMS", "request body is not valid JSON")
    if not isinstance(body, dict):
        fail(400, "INVALID_PARAMS", "request body must be a JSON object")
    return body
