"""What client authentication is configured with, shared by the settings and orchestratord's
auth: API keys (``ORCHD_API_KEYS``: ``NAME=KEY`` or a bare ``KEY``, each with its principal) and
the OIDC issuer's settings (``ORCHD_OIDC_*``). Parsing only: ``orchestratord.auth`` checks
requests against them, ``orchestratord.oidc`` fetches the issuer's keys and verifies tokens.
Nothing here ever puts key material in a message or a repr.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable
from urllib.parse import urlparse

MIN_KEY_CHARS = 16

#: An API key's name: no colon (``oidc:`` principals), and not a derived ``key-...`` principal.
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEY_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, not starting with 'key-'"


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKey:
    principal: str
    key: str = field(repr=False)  # never in a repr: reprs end up in logs and tracebacks

    @classmethod
    def parse(cls, entry: str, index: int = 1) -> "ApiKey":
        """``NAME=KEY`` or a bare ``KEY``. A base64 key's trailing ``=`` padding is no name: an
        entry is named only when what precedes its first ``=`` is a valid name and something
        other than ``=`` follows. ``ValueError`` messages never hold key material."""
        entry = entry.strip()
        name, sep, key = entry.partition("=")
        if sep and KEY_NAME.fullmatch(name) and key.strip("="):
            if name.startswith("key-"):
                raise ValueError(f"entry {index}: the name {name!r} starts with 'key-', which is kept for the "
                                 "principals of unnamed keys")
            principal = name
        else:
            key, principal = entry, derived_principal(entry)
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"entry {index} has a key of {len(key)} characters; keys need at least {MIN_KEY_CHARS} "
                             "characters")
        return cls(principal=principal, key=key)


def derived_principal(key: str) -> str:
    """An unnamed key's principal: stable, and says nothing usable about the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def parse_api_keys(raw: str | Iterable[str | ApiKey]) -> tuple[ApiKey, ...]:
    """``ORCHD_API_KEYS``, or a list of entries; ``ValueError`` (without key material) when wrong."""
    entries = [e for e in (raw.split(",") if isinstance(raw, str) else raw) if isinstance(e, ApiKey) or e.strip()]
    keys = tuple(e if isinstance(e, ApiKey) else ApiKey.parse(e, i) for i, e in enumerate(entries, 1))
    if isinstance(raw, str) and not keys:
        raise ValueError(f"expected comma-separated API keys (KEY or NAME=KEY) of at least {MIN_KEY_CHARS} "
                         "characters each")
    principals = [k.principal for k in keys]
    if len(set(principals)) != len(principals):
        dup = next(p for p in principals if principals.count(p) > 1)
        raise ValueError(f"two entries have the principal {dup!r} (a repeated name or key)")
    return keys


#: Signature algorithms a JWKS public key can verify; the allow-list is a subset of these.
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
DEFAULT_REQUIRED_CLAIMS = ("exp", "iss", "aud", "sub")


def _is_loopback_host(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_allowed(url: str) -> bool:
    """https anywhere; plain http only to a loopback address (a test or a sidecar issuer)."""
    parsed = urlparse(url)
    if not parsed.netloc:
        return False
    return parsed.scheme == "https" or (parsed.scheme == "http" and _is_loopback_host(parsed.hostname))


@dataclass(frozen=True, slots=True, kw_only=True)
class OidcSettings:
    """The issuer and how its tokens are checked (``ORCHD_OIDC_*``, validated in ``config``)."""

    issuer: str
    audiences: tuple[str, ...]  # a token must name at least one of them in ``aud``
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    required_claims: tuple[str, ...] = DEFAULT_REQUIRED_CLAIMS
    leeway_s: float = 30.0  # clock skew allowed on exp, nbf, iat
    jwks_min_refresh_s: float = 30.0  # at most one refresh for unknown kids per this
    jwks_max_age_s: float = 600.0  # cached keys older than this are refreshed in the background
    timeout_s: float = 5.0  # per request to the issuer
    ca_file: str | None = None  # trust this CA for the issuer (else the system's)

    def __post_init__(self) -> None:
        if not url_allowed(self.issuer):
            raise ValueError(f"OIDC issuer {self.issuer!r}: expected an https URL (http only on loopback)")
        if not self.audiences or not all(self.audiences):
            raise ValueError("OIDC audiences: expected at least one")
        bad = [a for a in self.algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if not self.algorithms or bad:
            raise ValueError(f"OIDC algorithms {bad}: expected some of {', '.join(ASYMMETRIC_ALGORITHMS)}")
        if "sub" not in self.required_claims:
            raise ValueError("OIDC required claims must include sub (the principal)")
        if self.leeway_s < 0 or self.jwks_min_refresh_s < 0 or self.jwks_max_age_s <= 0 or self.timeout_s <= 0:
            raise ValueError(f"OIDC timings out of range: {self}")
