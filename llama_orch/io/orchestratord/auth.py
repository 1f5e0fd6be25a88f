"""Client authentication for orchestratord: who is asking (the principal), from a bearer token.

Every request but the probes, ``/metrics``, ``/openapi.json`` and ``/v2/meta/*`` (which carry no
client data) needs ``Authorization: Bearer <token>`` once client auth is configured, and then
carries its principal in ``request[PRINCIPAL]``:

- API keys (``ORCHD_API_KEYS``, comma-separated): ``NAME=KEY`` gives the principal ``NAME``; a
  bare ``KEY`` gives ``key-`` and the first 12 hex digits of its SHA-256 (the key itself is never
  the principal, so it never reaches a log line, a label or an error). Keys are compared in
  constant time, against every key.
- OIDC JWTs (``ORCHD_OIDC_ISSUER``, ``ORCHD_OIDC_AUDIENCE``; ``oidc``): the principal is
  ``oidc:`` and the token's ``sub``. Names have no colon, so the two never collide. Both kinds
  may be configured together: a token that is not a known key is tried as a JWT.
- Neither configured: orchestratord serves loopback only (the settings refuse another bind
  address) and every request is the one principal ``anonymous``.

A missing token is 401 ``MISSING_TOKEN``; an unknown key or a malformed token 401 ``BAD_TOKEN``;
a JWT that fails a check 401 with a code naming the check (see ``oidc``); an issuer that cannot
be reached 503 ``AUTH_UNAVAILABLE`` with ``Retry-After``. No answer echoes the token. On ``/v1``
errors have OpenAI's shape. pool-managerd presents a key for its registration, heartbeats and
callbacks (``POOL_MANAGERD_ORCHESTRATORD_API_KEY``).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable

import orjson
from aiohttp import web

from ..client_auth import ApiKey, parse_api_keys
from ..http import error_body, retry_headers
from .oidc import OidcVerifier, TokenRefused

OPEN_PATHS = frozenset({"/livez", "/readyz", "/metrics", "/openapi.json"})
OPEN_PREFIXES = ("/v2/meta/",)

#: The principal of the request, set by the middleware on every route that is not open.
PRINCIPAL = web.RequestKey("principal", str)
#: The one principal of an orchestratord without client auth (loopback only).
ANONYMOUS = "anonymous"

def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _digest(text: str) -> bytes:
    # surrogatepass: a header's undecodable bytes become surrogates, which no configured key holds
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


def _refusal(request: web.Request, status: int, code: str, message: str,
             retry_after_ms: int | None = None) -> web.Response:
    path = request.path
    body = error_body(request, status, code, message)  # ours, or OpenAI's shape on /v1
    if retry_after_ms is not None:
        (body["error"] if path.startswith("/v1/") else body).update(retriable=True, retry_after_ms=retry_after_ms)
    if status == 401:
        # RFC 6750: a presented token that failed is "invalid_token"; none presented, no error
        challenge = 'Bearer realm="llama-orch"' + ('' if code == "MISSING_TOKEN" else ', error="invalid_token"')
        headers = {"WWW-Authenticate": challenge}
    else:
        headers = dict(retry_headers(retry_after_ms or 1000))
        if path.startswith("/v1/"):
            headers["retry-after-ms"] = str(retry_after_ms or 1000)
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def principal_of(request: web.Request) -> str:
    """The request's principal: the middleware's, or ``anonymous`` when no client auth is
    configured (then there is no middleware: it would cost every request and decide nothing)."""
    return request.get(PRINCIPAL, ANONYMOUS)


def auth_middleware(api_keys: Iterable[str | ApiKey] = (), oidc: OidcVerifier | None = None):
    """The middleware that sets ``request[PRINCIPAL]`` or answers 401/503 (see the module); None
    without client auth."""
    keys = parse_api_keys(tuple(api_keys))
    if not keys and oidc is None:
        return None

    # digests, so a comparison takes the same time whatever the lengths
    digests = tuple((_digest(k.key), k.principal) for k in keys)
    what = " or ".join(w for w, on in (("<api key>", keys), ("<OIDC token>", oidc)) if on)

    @web.middleware
    async def authenticate(request: web.Request, handler):
        path = request.path
        if _is_open(path):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if not header:
            return _refusal(request, 401, "MISSING_TOKEN", f"this endpoint needs Authorization: Bearer {what}")
        if scheme.lower() != "bearer" or not token:
            return _refusal(request, 401, "BAD_TOKEN", f"expected Authorization: Bearer {what}")
        given = _digest(token)
        # compare with every key, not stopping at a match, so timing says nothing about which
        principal = None
        for key, name in digests:
            if hmac.compare_digest(given, key):
                principal = name
        if principal is None:
            if oidc is None or not _looks_like_jwt(token):
                return _refusal(request, 401, "BAD_TOKEN", "the API key is not valid" if oidc is None else
                                "the bearer token is neither a known API key nor a JWT")
            verdict = await oidc.verify(token)
            if isinstance(verdict, TokenRefused):
                return _refusal(request, verdict.status, verdict.code, verdict.message, verdict.retry_after_ms)
            principal = verdict.principal
        request[PRINCIPAL] = principal
        return await handler(request)

    return authenticate
