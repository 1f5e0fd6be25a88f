"""A loopback OIDC issuer for tests: discovery and JWKS on 127.0.0.1, keys generated here.

``issuer.token(...)`` signs a token with one of its keys (published or not); ``publish`` and
``withdraw`` rotate the JWKS; ``down`` makes both documents answer 503; ``hits`` counts requests.
"""

from __future__ import annotations

import time
import uuid

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

AUDIENCE = "llama-orch"


class FakeClock:
    """A monotonic clock (seconds) that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class LoopbackIssuer:
    def __init__(self) -> None:
        self.url = ""
        self.private: dict[str, object] = {}  # kid -> private key
        self.algorithm: dict[str, str] = {}
        self.published: list[str] = []
        self.extra_jwks: list[dict] = []  # served as they are (an oct key, a broken one)
        self.down = False
        self.discovery_issuer: str | None = None  # what discovery claims (None: the real URL)
        self.hits = {"discovery": 0, "jwks": 0}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        return app

    async def start(self, aiohttp_server) -> "LoopbackIssuer":
        server = await aiohttp_server(self.app(), host="127.0.0.1")
        self.url = str(server.make_url("")).rstrip("/")
        return self

    async def _discovery(self, request: web.Request) -> web.Response:
        self.hits["discovery"] += 1
        if self.down:
            return web.Response(status=503)
        return web.json_response({"issuer": self.discovery_issuer or self.url, "jwks_uri": f"{self.url}/jwks",
                                  "id_token_signing_alg_values_supported": ["RS256", "ES256"]})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.hits["jwks"] += 1
        if self.down:
            return web.Response(status=503)
        return web.json_response({"keys": [self.jwk(kid) for kid in self.published] + self.extra_jwks})

    # -- keys ------------------------------------------------------------------------------------

    def make_key(self, kid: str, alg: str = "ES256", *, publish: bool = True) -> str:
        if alg.startswith(("RS", "PS")):
            self.private[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.private[kid] = ec.generate_private_key(ec.SECP256R1())
        self.algorithm[kid] = alg
        if publish:
            self.publish(kid)
        return kid

    def publish(self, kid: str) -> None:
        if kid not in self.published:
            self.published.append(kid)

    def withdraw(self, kid: str) -> None:
        self.published.remove(kid)

    def jwk(self, kid: str) -> dict:
        public = self.private[kid].public_key()
        codec = RSAAlgorithm if isinstance(public, rsa.RSAPublicKey) else ECAlgorithm
        return {**codec.to_jwk(public, as_dict=True), "kid": kid, "use": "sig", "alg": self.algorithm[kid]}

    def public_pem(self, kid: str) -> bytes:
        from cryptography.hazmat.primitives import serialization
        return self.private[kid].public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)

    # -- tokens ----------------------------------------------------------------------------------

    def claims(self, **overrides) -> dict:
        now = int(time.time())
        claims = {"iss": self.url, "aud": AUDIENCE, "sub": "alice", "iat": now, "nbf": now, "exp": now + 300,
                  "jti": str(uuid.uuid4())}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, kid: str | None = None, *, header_kid: str | None = "same", alg: str | None = None,
              **claims) -> str:
        """A token signed by ``kid`` (the first published key by default); ``header_kid`` other than
        "same" puts another kid (or none, with None) in the header. Claims set to None are left out."""
        kid = kid or self.published[0]
        headers = {} if header_kid is None else {"kid": kid if header_kid == "same" else header_kid}
        return jwt.encode(self.claims(**claims), self.private[kid], algorithm=alg or self.algorithm[kid],
                          headers=headers)
