"""Settings of the daemons: the contract's environment variables and the matching flags.

Each daemon has one typed, frozen settings object, read once at start-up. Every value is
validated there: a bad one stops the daemon with one line naming the variable (or flag), the
value and what was expected (``ConfigError``). Where the contract lists two names for one
setting, the first one set wins. A flag given on the command line beats the environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, TypeVar
from urllib.parse import urlparse

from ..core.quotas import QuotaPolicy
from .client_auth import (ASYMMETRIC_ALGORITHMS, DEFAULT_REQUIRED_CLAIMS, ApiKey, OidcSettings, parse_api_keys,
                          url_allowed)

T = TypeVar("T")


class ConfigError(ValueError):
    pass


#: A node id: a host name's characters (letters, digits, ``.``, ``_``, ``-``; a letter or digit
#: first), at most 253 of them. It is a path segment of ``/v2/nodes/{node_id}``, so nothing a route
#: cannot match; ``register`` is taken by ``POST /v2/nodes/register``.
NODE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}"
NODE_ID_RULE = "1-253 letters, digits, '.', '_' or '-', starting with a letter or digit, and not 'register'"


def is_node_id(value: object) -> bool:
    return isinstance(value, str) and value != "register" and re.fullmatch(NODE_ID_PATTERN, value) is not None


def _node_id(raw: str) -> str:
    if not is_node_id(raw):
        raise ValueError(raw)
    return raw


class Env:
    """Typed reads from a mapping of environment variables, each failing with a named error."""

    def __init__(self, environ: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}

    def _raw(self, names: tuple[str, ...]) -> tuple[str, str] | None:
        for name in names:
            if name in self.overrides:
                return name, str(self.overrides[name])
        for name in names:
            value = self.environ.get(name)
            if value is not None and value != "":
                return name, value
        return None

    def get(self, *names: str, default: T, parse: Callable[[str], T], expected: str) -> T:
        found = self._raw(names)
        if found is None:
            return default
        name, raw = found
        try:
            return parse(raw)
        except (ValueError, TypeError):
            raise ConfigError(f"{name}={raw!r}: expected {expected}") from None

    def text(self, *names: str, default: str) -> str:
        return self.get(*names, default=default, parse=str, expected="text")

    def integer(self, *names: str, default: int, minimum: int = 0) -> int:
        def parse(raw: str) -> int:
            value = int(raw)
            if value < minimum:
                raise ValueError
            return value
        return self.get(*names, default=default, parse=parse, expected=f"an integer >= {minimum}")

    def boolean(self, *names: str, default: bool) -> bool:
        def parse(raw: str) -> bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return self.get(*names, default=default, parse=parse, expected="true or false")

    def address(self, *names: str, default: str) -> tuple[str, int]:
        return self.get(*names, default=parse_address(default), parse=parse_address, expected="HOST:PORT")

    def url(self, *names: str, default: str | None) -> str | None:
        def parse(raw: str) -> str:
            u = urlparse(raw)
            if u.scheme not in ("http", "https") or not u.netloc:
                raise ValueError
            return raw.rstrip("/")
        return self.get(*names, default=default, parse=parse, expected="an http(s) URL")

    def path(self, *names: str, default: str) -> Path:
        return self.get(*names, default=Path(default).expanduser(), parse=lambda raw: Path(raw).expanduser(),
                        expected="a path")


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(raw)
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 65535:
        raise ValueError(raw)
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError(raw)
    return value


def _names(raw: str) -> tuple[str, ...]:
    found = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    if not found:
        raise ValueError(raw)
    return found


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError(raw)
    return value


def parse_address(raw: str) -> tuple[str, int]:
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(raw)
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """By address, not by prefix: "127.example.com" is a name, and may be anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_node_id() -> str:
    """The host name when it is a valid node id, else its valid characters (a container's host
    name is almost always valid already)."""
    name = os.uname().nodename
    if is_node_id(name):
        return name
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-")[:253]
    return cleaned if is_node_id(cleaned) else "node"


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsFiles:
    """A daemon's mTLS files (``io.tls`` makes its SSL contexts from them)."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_env(cls, prefix: str, environ: Mapping[str, str]) -> "TlsFiles | None":
        """``{prefix}_TLS_CERT/KEY/CA``: all three or none; each must exist and the set must load."""
        names = {part: f"{prefix}_TLS_{part.upper()}" for part in ("cert", "key", "ca")}
        given = {part: environ.get(name, "") for part, name in names.items()}
        if not any(given.values()):
            return None
        missing = [names[p] for p, v in given.items() if not v]
        if missing:
            raise ConfigError(f"{', '.join(missing)}: mTLS needs {names['cert']}, {names['key']} and "
                              f"{names['ca']} together (missing: {', '.join(missing)})")
        files = cls(**{p: Path(v).expanduser() for p, v in given.items()})
        for part in ("cert", "key", "ca"):
            path = getattr(files, part)
            if not path.is_file():
                raise ConfigError(f"{names[part]}={str(path)!r}: expected a readable PEM file (not found)")
        try:
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            probe.load_cert_chain(files.cert, files.key)
            probe.load_verify_locations(cafile=str(files.ca))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{names['cert']}/{names['key']}/{names['ca']}: the files do not load as a "
                              f"certificate, its key and a CA: {exc}") from None
        return files


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolManagerSettings:
    host: str = "127.0.0.1"
    port: int = 9200
    runtime_dir: Path = Path("/var/lib/llama-orch/engines")
    watch_interval_ms: int = 1000
    auto_delete_handoff: bool = True
    gpu_discovery_interval_ms: int = 10_000
    health_interval_ms: int = 1000
    health_timeout_ms: int = 2000
    stale_after_misses: int = 3
    callback_url: str | None = None
    provisioner_url: str | None = "http://127.0.0.1:9300"
    node_id: str = ""
    orchestratord_url: str | None = None
    advertise_url: str | None = None
    orchestratord_api_key: str | None = None
    metrics_port: int | None = None
    tls: TlsFiles | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **flags: object) -> "PoolManagerSettings":

        env = Env(environ, {"POOL_MANAGERD_BIND_ADDR": flags.get("bind"), "POOL_MANAGERD_RUNTIME_DIR": flags.get("runtime_dir")})
        host, port = env.address("POOL_MANAGERD_BIND_ADDR", "POOL_MANAGERD_ADDR", default="127.0.0.1:9200")
        return cls(
            host=host, port=port,
            runtime_dir=env.path("POOL_MANAGERD_RUNTIME_DIR", default="/var/lib/llama-orch/engines"),
            watch_interval_ms=env.integer("POOL_MANAGERD_WATCH_INTERVAL_MS", default=1000, minimum=10),
            auto_delete_handoff=env.boolean("POOL_MANAGERD_AUTO_DELETE_HANDOFF", default=True),
            gpu_discovery_interval_ms=env.integer("POOL_MANAGERD_GPU_DISCOVERY_INTERVAL_MS", default=10_000, minimum=100),
            health_interval_ms=env.integer("POOL_MANAGERD_HEALTH_INTERVAL_MS", default=1000, minimum=10),
            health_timeout_ms=env.integer("POOL_MANAGERD_HEALTH_TIMEOUT_MS", default=2000, minimum=10),
            stale_after_misses=env.integer("POOL_MANAGERD_STALE_AFTER_MISSES", default=3, minimum=1),
            callback_url=env.url("POOL_MANAGERD_ORCHESTRATORD_CALLBACK_URL", default=None),
            provisioner_url=env.url("POOL_MANAGERD_PROVISIONER_URL", default="http://127.0.0.1:9300"),
            node_id=env.get("POOL_MANAGERD_NODE_ID", default=_default_node_id(), parse=_node_id,
                            expected=f"a node id ({NODE_ID_RULE})"),
            orchestratord_url=env.url("POOL_MANAGERD_ORCHESTRATORD_URL", default=None),
            advertise_url=env.url("POOL_MANAGERD_ADVERTISE_URL", default=None),
            orchestratord_api_key=env.text("POOL_MANAGERD_ORCHESTRATORD_API_KEY", default="") or None,
            metrics_port=env.get("PROMETHEUS_METRICS_PORT", default=None, parse=_port, expected="a port number"),
            tls=TlsFiles.from_env("POOL_MANAGERD", env.environ),
        )


def _oidc_settings(env: Env) -> "OidcSettings | None":
    """``ORCHD_OIDC_*``: None unless both the issuer and the audience are set (one alone is an error)."""

    def issuer(raw: str) -> str:
        if not url_allowed(raw.strip()):
            raise ValueError(raw)
        return raw.strip()

    def names(raw: str) -> tuple[str, ...]:
        found = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
        if not found:
            raise ValueError(raw)
        return found

    def algorithms(raw: str) -> tuple[str, ...]:
        found = names(raw)
        if any(a not in ASYMMETRIC_ALGORITHMS for a in found):
            raise ValueError(raw)  # none and HS*: a public key must never verify an HMAC
        return found

    def claims(raw: str) -> tuple[str, ...]:
        found = names(raw)
        if not set(DEFAULT_REQUIRED_CLAIMS) <= set(found):
            raise ValueError(raw)  # sub is the principal; without exp a token never expires (PyJWT checks it when present)
        return found

    def ca_file(raw: str) -> str:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise ValueError(raw)
        return str(path)

    url = env.get("ORCHD_OIDC_ISSUER", default=None, parse=issuer,
                  expected="the https URL of the OIDC issuer (http only on a loopback address)")
    audiences = env.get("ORCHD_OIDC_AUDIENCE", default=(), parse=names, expected="comma-separated audiences")
    if url is None and not audiences:
        return None
    if url is None or not audiences:
        missing, given = ("ORCHD_OIDC_ISSUER", "ORCHD_OIDC_AUDIENCE") if url is None else \
            ("ORCHD_OIDC_AUDIENCE", "ORCHD_OIDC_ISSUER")
        raise ConfigError(f"{given} is set but {missing} is not: OIDC needs both")
    return OidcSettings(
        issuer=url, audiences=audiences,
        algorithms=env.get("ORCHD_OIDC_ALGORITHMS", default=("RS256", "ES256"), parse=algorithms,
                           expected=f"comma-separated signature algorithms among {', '.join(ASYMMETRIC_ALGORITHMS)}"),
        required_claims=env.get("ORCHD_OIDC_REQUIRED_CLAIMS", default=DEFAULT_REQUIRED_CLAIMS, parse=claims,
                                expected="comma-separated claim names including exp, iss, aud and sub"),
        leeway_s=env.integer("ORCHD_OIDC_LEEWAY_MS", default=30_000, minimum=0) / 1000,
        # at least a second: the bound on refetches a client sending unknown kids can cause
        jwks_min_refresh_s=env.integer("ORCHD_OIDC_JWKS_MIN_REFRESH_MS", default=30_000, minimum=1000) / 1000,
        jwks_max_age_s=env.integer("ORCHD_OIDC_JWKS_MAX_AGE_MS", default=600_000, minimum=1000) / 1000,
        timeout_s=env.integer("ORCHD_OIDC_TIMEOUT_MS", default=5000, minimum=1) / 1000,
        ca_file=env.get("ORCHD_OIDC_CA", default=None, parse=ca_file, expected="an existing CA certificate file (PEM)"),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class OrchdSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    pool_managers: tuple[str, ...] = ()
    poll_interval_ms: int = 5000
    admission_capacity: int = 100
    admission_policy: str = "reject"
    placement_strategy: str = "vram-aware"
    prefix_block_tokens: int = 64
    prefix_load_slack: float = 0.25
    prefix_blocks_per_pool: int | None = None
    shutdown_grace_ms: int = 30_000
    session_token_budget: int | None = None
    session_time_budget_ms: int | None = None
    session_cost_budget: float | None = None
    cost_per_1k_prompt_tokens: float = 0.0
    cost_per_1k_output_tokens: float = 0.0
    metrics_interval_ms: int = 1000
    connect_timeout_ms: int = 5000
    first_token_timeout_ms: int = 60_000
    token_timeout_ms: int = 30_000
    stream_timeout_ms: int = 3_600_000
    profile: str = "cloud"
    api_keys: "tuple[ApiKey, ...]" = ()
    oidc: "OidcSettings | None" = None
    quotas: QuotaPolicy = QuotaPolicy()
    metrics_port: int | None = None
    stream_buffer_frames: int = 4096
    stream_buffer_bytes: int = 1 << 20
    retained_streams: int = 10_000
    retained_stream_ttl_ms: int = 300_000
    retained_stream_bytes: int = 256 << 20
    listen_backlog: int = 1024
    access_log: bool = True
    tls: TlsFiles | None = None
    tls_client_cert: str = "optional"
    tls_node_names: tuple[str, ...] = ("pool-managerd",)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **flags: object) -> "OrchdSettings":

        env = Env(environ, {"ORCHD_BIND_ADDR": flags.get("bind"), "ORCHD_POOL_MANAGERS": flags.get("pool_managers")})
        host, port = env.address("ORCHD_BIND_ADDR", "ORCHD_ADDR", default="127.0.0.1:8080")
        raw_keys = env.text("ORCHD_API_KEYS", default="")
        try:
            api_keys = parse_api_keys(raw_keys) if raw_keys else ()
        except ValueError as exc:
            raise ConfigError(f"ORCHD_API_KEYS: {exc}") from None  # never the value: it is the keys
        oidc = _oidc_settings(env)
        if not is_loopback(host) and not api_keys and oidc is None:
            raise ConfigError(f"ORCHD_BIND_ADDR={host}:{port}: a non-loopback address needs client auth configured "
                              "(ORCHD_API_KEYS, or ORCHD_OIDC_ISSUER with ORCHD_OIDC_AUDIENCE)")

        def managers(raw: str) -> tuple[str, ...]:
            urls = tuple(u.strip().rstrip("/") for u in raw.split(",") if u.strip())
            for u in urls:
                parsed = urlparse(u)
                if parsed.scheme not in ("http", "https") or not parsed.netloc:
                    raise ValueError(u)
            return urls

        def choice(*allowed: str) -> Callable[[str], str]:
            def parse(raw: str) -> str:
                if raw not in allowed:
                    raise ValueError(raw)
                return raw
            return parse

        return cls(
            host=host, port=port,
            pool_managers=env.get("ORCHD_POOL_MANAGERS", default=(), parse=managers,
                                  expected="comma-separated http(s) URLs of pool-managerd"),
            poll_interval_ms=env.integer("ORCHD_POOL_POLL_INTERVAL_MS", default=5000, minimum=10),
            admission_capacity=env.integer("ORCHD_ADMISSION_CAPACITY", default=100, minimum=1),
            admission_policy=env.get("ORCHD_ADMISSION_POLICY", default="reject", parse=choice("reject", "drop-lru"),
                                     expected="reject or drop-lru"),
            placement_strategy=env.get("ORCHD_PLACEMENT_STRATEGY", default="vram-aware",
                                       parse=choice("vram-aware", "least-loaded", "round-robin", "random",
                                                    "prefix-aware"),
                                       expected="vram-aware, least-loaded, round-robin, random or prefix-aware"),
            prefix_block_tokens=env.integer("ORCHD_PREFIX_BLOCK_TOKENS", default=64, minimum=1),
            prefix_load_slack=env.get("ORCHD_PREFIX_LOAD_SLACK", default=0.25, parse=_non_negative_float,
                                      expected="a number >= 0 (a share of a pool's slots)"),
            prefix_blocks_per_pool=env.get("ORCHD_PREFIX_BLOCKS_PER_POOL", default=None, parse=_positive_int,
                                           expected="an integer >= 1 (blocks)"),
            shutdown_grace_ms=env.integer("ORCHD_SHUTDOWN_GRACE_MS", default=30_000, minimum=0),
            session_token_budget=env.get("ORCHD_SESSION_TOKEN_BUDGET", default=None, parse=_positive_int,
                                         expected="an integer >= 1 (tokens per session)"),
            session_time_budget_ms=env.get("ORCHD_SESSION_TIME_BUDGET_MS", default=None, parse=_positive_int,
                                           expected="an integer >= 1 (engine milliseconds per session)"),
            session_cost_budget=env.get("ORCHD_SESSION_COST_BUDGET", default=None, parse=_positive_float,
                                        expected="a number > 0 (cost units per session)"),
            cost_per_1k_prompt_tokens=env.get("ORCHD_COST_PER_1K_PROMPT_TOKENS", default=0.0, parse=_non_negative_float,
                                              expected="a number >= 0"),
            cost_per_1k_output_tokens=env.get("ORCHD_COST_PER_1K_OUTPUT_TOKENS", default=0.0, parse=_non_negative_float,
                                              expected="a number >= 0"),
            metrics_interval_ms=env.integer("ORCHD_METRICS_INTERVAL_MS", default=1000, minimum=0),
            connect_timeout_ms=env.integer("ORCHD_CONNECT_TIMEOUT_MS", default=5000, minimum=1),
            first_token_timeout_ms=env.integer("ORCHD_FIRST_TOKEN_TIMEOUT_MS", default=60_000, minimum=1),
            token_timeout_ms=env.integer("ORCHD_TOKEN_TIMEOUT_MS", default=30_000, minimum=1),
            stream_timeout_ms=env.integer("ORCHD_STREAM_TIMEOUT_MS", default=3_600_000, minimum=1),
            stream_buffer_frames=env.integer("ORCHD_STREAM_BUFFER_FRAMES", default=4096, minimum=2),
            stream_buffer_bytes=env.integer("ORCHD_STREAM_BUFFER_BYTES", default=1 << 20, minimum=1024),
            retained_streams=env.integer("ORCHD_RETAINED_STREAMS", default=10_000, minimum=0),
            retained_stream_ttl_ms=env.integer("ORCHD_RETAINED_STREAM_TTL_MS", default=300_000, minimum=0),
            retained_stream_bytes=env.integer("ORCHD_RETAINED_STREAM_BYTES", default=256 << 20, minimum=0),
            # aiohttp's default backlog (128) drops connections in a burst of new clients
            listen_backlog=env.integer("ORCHD_LISTEN_BACKLOG", default=1024, minimum=1),
            access_log=env.boolean("ORCHD_ACCESS_LOG", default=True),
            api_keys=api_keys,
            oidc=oidc,
            quotas=QuotaPolicy(
                concurrent_tasks=env.get("ORCHD_QUOTA_CONCURRENT_TASKS", default=None, parse=_positive_int,
                                         expected="an integer >= 1 (tasks queued or running per principal)"),
                tasks_per_minute=env.get("ORCHD_QUOTA_TASKS_PER_MINUTE", default=None, parse=_positive_int,
                                         expected="an integer >= 1 (tasks admitted per principal per minute)")),
            metrics_port=env.get("PROMETHEUS_METRICS_PORT", default=None, parse=_port, expected="a port number"),
            profile=env.get("ORCHD_PROFILE", default="cloud", parse=choice("cloud", "home"), expected="cloud or home"),
            tls=TlsFiles.from_env("ORCHD", env.environ),
            # optional: the port is also the clients', who bring API keys or tokens, not certificates
            tls_client_cert=env.get("ORCHD_TLS_CLIENT_CERT", default="optional", parse=choice("optional", "required"),
                                    expected="optional or required"),
            tls_node_names=env.get("ORCHD_TLS_NODE_NAMES", default=("pool-managerd",), parse=_names,
                                   expected="comma-separated certificate common names"),
        )
