"""OIDC bearer tokens: the issuer's signing keys, and the verification of one JWT.

This module owns what orchestratord knows of its OIDC issuer (``ORCHD_OIDC_ISSUER``): the
discovery document (``{issuer}/.well-known/openid-configuration``) and the JWKS it names, both
fetched with aiohttp (never a blocking call in the event loop), and the check of a token against
them with PyJWT: signature, ``iss``, ``aud``, ``exp``, ``nbf`` and ``iat`` when present (with a
leeway), the required claims, and an allow-list of asymmetric algorithms (``none`` and the HMAC
family are never accepted: an HMAC "verified" with a public key is the classic forgery).

Keys and availability:
- ``start`` begins loading the keys in the background and returns at once: start-up never waits
  for the issuer. Until the first load succeeds (retried with backoff), a token is answered 503
  ``AUTH_UNAVAILABLE`` (retriable, ``Retry-After``), not 401: the token may be fine.
- A token whose ``kid`` is not among the cached keys makes one refresh (key rotation is picked up
  without a restart), at most once per ``jwks_min_refresh_s`` and single-flight: every request
  waiting for keys waits on the same fetch, so a client sending random kids cannot cause a fetch
  storm; past that rate an unknown kid is 401 ``TOKEN_UNKNOWN_KEY`` at once. Keys older than
  ``jwks_max_age_s`` are refreshed in the background (so a key the issuer withdrew stops working)
  while the cached ones keep serving. A failed refresh keeps the cached keys.
- Symmetric (``oct``) keys, encryption keys and malformed keys in the JWKS are skipped.

Refusals name what was wrong (``TOKEN_EXPIRED``, ``TOKEN_NOT_YET_VALID``, ``TOKEN_WRONG_AUDIENCE``,
``TOKEN_WRONG_ISSUER``, ``TOKEN_UNKNOWN_KEY``, ``TOKEN_BAD_SIGNATURE``, ``TOKEN_ALGORITHM_NOT_ALLOWED``,
``TOKEN_MISSING_CLAIM``, ``BAD_TOKEN``) and never echo the token or its claims.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import aiohttp
import jwt
import orjson
from jwt import PyJWK

from ..client_auth import ASYMMETRIC_ALGORITHMS, OidcSettings, url_allowed

log = logging.getLogger("llama_orch.orchestratord.oidc")

#: Named in a refusal when a token asks for one of them (anything else is "an unknown algorithm").
_KNOWN_ALGORITHMS = frozenset(ASYMMETRIC_ALGORITHMS) | {"none", "HS256", "HS384", "HS512", "ES256K"}
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
#: The principal of a token is this prefix and its ``sub``: it cannot collide with an API key's
#: name (names have no colon).
PRINCIPAL_PREFIX = "oidc:"
MAX_DOCUMENT_BYTES = 1 << 20  # discovery document or JWKS: a hostile or broken issuer cannot fill memory
MAX_KEYS = 100
MAX_SUBJECT_CHARS = 255
#: Backoff of the first load while the issuer does not answer.
LOAD_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Verified:
    subject: str

    @property
    def principal(self) -> str:
        return PRINCIPAL_PREFIX + self.subject


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRefused:
    """Why a token was not accepted: 401 (the token) or 503 (the issuer, retriable)."""

    status: int
    code: str
    message: str
    retry_after_ms: int | None = None


def _unavailable(message: str, retry_after_s: float) -> TokenRefused:
    return TokenRefused(status=503, code="AUTH_UNAVAILABLE", message=message,
                        retry_after_ms=max(1000, math.ceil(retry_after_s * 1000)))


def _refused(code: str, message: str) -> TokenRefused:
    return TokenRefused(status=401, code=code, message=message)


class IssuerError(Exception):
    """The issuer's documents could not be had or used (one line, for the log and ``last_error``)."""


class OidcVerifier:
    """The issuer's keys, cached and refreshed, and ``verify`` for one token.

    ``clock`` (seconds, monotonic) paces refreshes; tests pass their own to step over the rate
    limit. Token times (``exp``, ``nbf``) are PyJWT's, against the wall clock.
    """

    def __init__(self, settings: OidcSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._keys: dict[str | None, dict] = {}  # kid (None: a key without one) -> its JWK
        self._verifiers: dict[tuple[str | None, str], PyJWK] = {}  # (kid, alg) -> key object, built once
        self._loaded_at: float | None = None
        self._attempted_at: float | None = None
        self._failed = False  # the last fetch failed
        self._jwks_uri: str | None = None
        self._fetch: asyncio.Future[bool] | None = None  # the one fetch in flight
        self._loader: asyncio.Task | None = None
        self._next_load_at: float | None = None
        self._background: asyncio.Future | None = None
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0  # JWKS fetches made
        self.last_error: str | None = None

    @property
    def loaded(self) -> bool:
        return self._loaded_at is not None

    @property
    def key_ids(self) -> tuple[str | None, ...]:
        return tuple(self._keys)

    # -- life ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start loading the keys in the background; never waits for the issuer."""
        if self._session is None:
            ssl_context: ssl.SSLContext | bool = True
            if self.settings.ca_file:
                ssl_context = ssl.create_default_context(cafile=self.settings.ca_file)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
                connector=aiohttp.TCPConnector(ssl=ssl_context, limit=4))
        if self._loader is None:
            self._loader = asyncio.ensure_future(self._load_until_loaded())

    async def stop(self) -> None:
        tasks = [t for t in (self._loader, self._fetch, self._background) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loader = self._fetch = self._background = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _load_until_loaded(self) -> None:
        attempt = 0
        while not self.loaded:
            if await self._refresh():
                return
            delay = LOAD_RETRY_S[min(attempt, len(LOAD_RETRY_S) - 1)]
            attempt += 1
            self._next_load_at = self._clock() + delay
            await asyncio.sleep(delay)

    # -- fetching ------------------------------------------------------------------------------

    async def _refresh(self) -> bool:
        """Fetch the keys, or join the fetch already in flight (single-flight). True: keys fresh."""
        if self._fetch is None or self._fetch.done():
            self._attempted_at = self._clock()
            self._fetch = asyncio.ensure_future(self._fetch_keys())
        # shielded: a request that goes away does not cancel the fetch the others wait on
        return await asyncio.shield(self._fetch)

    async def _fetch_keys(self) -> bool:
        try:
            if self._jwks_uri is None:
                self._jwks_uri = self._jwks_uri_from(await self._get_json(
                    self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"))
            self.fetches += 1
            keys = self._usable_keys(await self._get_json(self._jwks_uri))
        except IssuerError as exc:
            self._failed = True
            self._jwks_uri = None  # discover again next time: the issuer may have moved its keys
            self.last_error = str(exc)
            log.warning("OIDC issuer %s: %s; %s", self.settings.issuer, exc,
                        "the cached keys still serve" if self.loaded else "tokens are answered 503 until its keys load")
            return False
        changed = set(keys) != set(self._keys)
        self._keys = keys
        self._verifiers = {}
        self._loaded_at = self._clock()
        self._failed = False
        self.last_error = None
        if changed:
            log.info("OIDC issuer %s: %d signing keys (kid %s)", self.settings.issuer, len(keys),
                     ", ".join(str(k) for k in keys))
        return True

    async def _get_json(self, url: str) -> Mapping[str, Any]:
        session = self._session
        if session is None:
            raise IssuerError("the verifier is not started")
        try:
            # no redirects: one to plain http would be a downgrade nobody checked
            async with session.get(url, allow_redirects=False, headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise IssuerError(f"GET {url}: HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > MAX_DOCUMENT_BYTES:
                    raise IssuerError(f"GET {url}: {resp.content_length} bytes, more than {MAX_DOCUMENT_BYTES}")
                body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            raise IssuerError(f"GET {url}: {type(exc).__name__}: {exc}") from None
        if len(body) > MAX_DOCUMENT_BYTES:
            raise IssuerError(f"GET {url}: more than {MAX_DOCUMENT_BYTES} bytes")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise IssuerError(f"GET {url}: not JSON") from None
        if not isinstance(doc, dict):
            raise IssuerError(f"GET {url}: expected a JSON object")
        return doc

    def _jwks_uri_from(self, discovery: Mapping[str, Any]) -> str:
        # OpenID Connect Discovery 1.0, 4.3: the issuer in the document must be the one asked for
        if str(discovery.get("issuer", "")).rstrip("/") != self.settings.issuer.rstrip("/"):
            raise IssuerError(f"the discovery document names issuer {discovery.get('issuer')!r}, "
                              f"not {self.settings.issuer!r}")
        uri = discovery.get("jwks_uri")
        if not isinstance(uri, str) or not url_allowed(uri):
            raise IssuerError(f"the discovery document's jwks_uri {uri!r} is not an https URL (http only on loopback)")
        return uri

    @staticmethod
    def _usable_keys(jwks: Mapping[str, Any]) -> dict[str | None, dict]:
        raw = jwks.get("keys")
        if not isinstance(raw, list):
            raise IssuerError("the JWKS has no keys list")
        keys: dict[str | None, dict] = {}
        for jwk in raw[:MAX_KEYS]:
            if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "EC", "OKP"):
                continue  # oct (a shared secret) never verifies a token here; unknown types are no use
            if jwk.get("use", "sig") != "sig":
                continue
            ops = jwk.get("key_ops")
            if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
                continue
            kid = jwk.get("kid")
            if kid is not None and not isinstance(kid, str):
                continue
            try:
                PyJWK(jwk)  # a key that cannot be built is skipped now, not at every token
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                log.warning("OIDC: skipping JWKS key kid=%s: %s", kid, type(exc).__name__)
                continue
            keys.setdefault(kid, jwk)
        if not keys:
            raise IssuerError("the JWKS holds no usable signing key")
        return keys

    # -- verifying -----------------------------------------------------------------------------

    def _may_refresh(self) -> bool:
        if self._fetch is not None and not self._fetch.done():
            return True  # joining the fetch in flight costs the issuer nothing
        return self._attempted_at is None or self._clock() - self._attempted_at >= self.settings.jwks_min_refresh_s

    def _refresh_in_background(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.ensure_future(self._refresh())

    def _key(self, kid: str | None, alg: str) -> PyJWK | TokenRefused | None:
        """The key object for this kid and algorithm; None when the kid is not known."""
        if kid is None:
            candidates = [k for k in self._keys.values() if k.get("kty") == _KEY_TYPES.get(alg[:2])]
            if len(candidates) != 1:
                return _refused("TOKEN_UNKNOWN_KEY", "the token names no key (kid) and the issuer publishes "
                                                     f"{len(candidates)} keys for its algorithm")
            kid = candidates[0].get("kid")
        built = self._verifiers.get((kid, alg))
        if built is not None:
            return built
        jwk = self._keys.get(kid)
        if jwk is None:
            return None
        if jwk.get("alg") not in (None, alg):
            return _refused("TOKEN_ALGORITHM_NOT_ALLOWED", "the token's algorithm is not the one its key is for")
        try:
            built = PyJWK(jwk, algorithm=alg)
        except (jwt.PyJWTError, ValueError, TypeError):
            return _refused("TOKEN_ALGORITHM_NOT_ALLOWED", "the token's algorithm does not fit its key's type")
        self._verifiers[(kid, alg)] = built
        return built

    async def verify(self, token: str) -> Verified | TokenRefused:
        settings = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return _refused("BAD_TOKEN", "the bearer token is neither a known API key nor a well-formed JWT")
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in settings.algorithms:
            named = repr(alg) if alg in _KNOWN_ALGORITHMS else "an unknown algorithm"
            return _refused("TOKEN_ALGORITHM_NOT_ALLOWED", f"the token is signed with {named}; allowed: "
                                                           f"{', '.join(settings.algorithms)}")
        if kid is not None and not isinstance(kid, str):
            return _refused("BAD_TOKEN", "the token's kid is not a string")
        if not self.loaded:
            if self._attempted_at is None or (self._fetch is not None and not self._fetch.done()):
                await self._refresh()  # the first load has not begun or is under way: wait for it, not a 503
            if not self.loaded:
                wait = max(0.0, (self._next_load_at or 0.0) - self._clock()) or 1.0
                # the detail (the issuer's URLs, the error) is in the log: an unauthenticated caller gets none
                return _unavailable("the OIDC issuer's keys are not loaded yet; retry shortly", wait)
        key = self._key(kid, alg)
        if key is None:
            if self._may_refresh() and await self._refresh():
                key = self._key(kid, alg)
            if key is None:
                if self._failed:
                    return _unavailable("the token's key is not cached and the OIDC issuer did not answer; retry "
                                        "shortly", settings.jwks_min_refresh_s)
                return _refused("TOKEN_UNKNOWN_KEY", "the token is signed with a key the issuer does not publish "
                                                     "(unknown kid)")
        elif self._loaded_at is not None and self._clock() - self._loaded_at >= settings.jwks_max_age_s \
                and self._may_refresh():
            self._refresh_in_background()
        if isinstance(key, TokenRefused):
            return key
        return self._decode(token, key, alg)

    def _decode(self, token: str, key: PyJWK, alg: str) -> Verified | TokenRefused:
        settings = self.settings
        try:
            # the key object, not the PyJWK (accepted by decode only since PyJWT 2.9); the PyJWK was
            # built for this algorithm, so a key of another type never got here
            claims = jwt.decode(token, key=key.key, algorithms=[alg], audience=list(settings.audiences),
                                issuer=settings.issuer, leeway=settings.leeway_s,
                                options={"require": list(settings.required_claims)})
        except jwt.ExpiredSignatureError:
            return _refused("TOKEN_EXPIRED", "the token has expired (exp)")
        except jwt.ImmatureSignatureError:
            return _refused("TOKEN_NOT_YET_VALID", "the token is not valid yet (nbf or iat in the future)")
        except jwt.InvalidAudienceError:
            return _refused("TOKEN_WRONG_AUDIENCE", f"the token is not meant for this service (aud must include "
                                                    f"{' or '.join(settings.audiences)})")
        except jwt.InvalidIssuerError:
            return _refused("TOKEN_WRONG_ISSUER", f"the token was not issued by {settings.issuer}")
        except jwt.MissingRequiredClaimError as exc:
            claim = exc.claim if exc.claim in settings.required_claims else "a required claim"
            return _refused("TOKEN_MISSING_CLAIM", f"the token lacks the claim {claim}")
        except jwt.InvalidSignatureError:
            return _refused("TOKEN_BAD_SIGNATURE", "the token's signature does not verify")
        except jwt.InvalidAlgorithmError:
            return _refused("TOKEN_ALGORITHM_NOT_ALLOWED", "the token's algorithm is not allowed for its key")
        except jwt.PyJWTError as exc:
            return _refused("BAD_TOKEN", f"the token is not valid ({type(exc).__name__})")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT_CHARS:
            return _refused("TOKEN_MISSING_CLAIM", f"the token's sub must be a string of 1 to {MAX_SUBJECT_CHARS} "
                                                   "characters")
        return Verified(subject=subject)
