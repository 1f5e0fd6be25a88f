"""Client authentication for orchestratord: API keys as bearer tokens.

With ``ORCHD_API_KEYS`` set (comma-separated), every request needs ``Authorization: Bearer
<key>`` except the probes, ``/metrics``, ``/openapi.json`` and ``/v2/meta/*``, which carry no
client data. Without it, orchestratord serves loopback only (the settings refuse another bind
address). A missing token is 401 ``MISSING_TOKEN``, a wrong one 401 ``BAD_TOKEN``; on ``/v1``
the error has OpenAI's shape. Keys are compared in constant time. pool-managerd presents a key
for its registration, heartbeats and callbacks (``POOL_MANAGERD_ORCHESTRATORD_API_KEY``).
"""

from __future__ import annotations

import hmac

import orjson
from aiohttp import web

OPEN_PATHS = frozenset({"/livez", "/readyz", "/metrics", "/openapi.json"})
OPEN_PREFIXES = ("/v2/meta/",)


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _unauthorized(path: str, code: str, message: str) -> web.Response:
    if path.startswith("/v1/"):
        body: dict = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    else:
        body = {"code": code, "message": message}
    return web.Response(body=orjson.dumps(body), status=401, content_type="application/json",
                        headers={"WWW-Authenticate": 'Bearer realm="llama-orch"'})


def api_key_middleware(keys: tuple[str, ...]):
    encoded = tuple(k.encode() for k in keys)

    @web.middleware
    async def authenticate(request: web.Request, handler):
        path = request.path
        if _is_open(path):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            return _unauthorized(path, "MISSING_TOKEN", "this endpoint needs Authorization: Bearer <api key>")
        if scheme.lower() != "bearer" or not token.strip():
            return _unauthorized(path, "BAD_TOKEN", "expected Authorization: Bearer <api key>")
        given = token.strip().encode()
        # compare with every key, not stopping at a match, so timing says nothing about which
        ok = False
        for key in encoded:
            ok |= hmac.compare_digest(given, key)
        if not ok:
            return _unauthorized(path, "BAD_TOKEN", "the API key is not valid")
        return await handler(request)

    return authenticate
