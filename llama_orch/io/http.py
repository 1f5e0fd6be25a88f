"""Small HTTP helpers shared by the daemons: JSON responses, error envelopes, JSON bodies.

Errors are raised, not returned, so a handler reads as its happy path: ``fail(404, ...)``
raises an aiohttp HTTP exception whose body is the contract's envelope ``{code, message}``.
"""

from __future__ import annotations

from typing import Mapping, NoReturn, TypeVar

import orjson
from aiohttp import web

_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest, 404: web.HTTPNotFound, 409: web.HTTPConflict, 500: web.HTTPInternalServerError,
    503: web.HTTPServiceUnavailable,
}


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def fail(status: int, code: str, message: str) -> NoReturn:
    raise _ERRORS[status](text=orjson.dumps({"code": code, "message": message}).decode(), content_type="application/json")


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
