"""Mutual TLS between the daemons: which files, the SSL contexts made from them, their reload
when the files change on disk, and telling a certificate failure from a peer that is down.

A daemon with ``<PREFIX>_TLS_CERT``, ``<PREFIX>_TLS_KEY`` and ``<PREFIX>_TLS_CA`` set serves
HTTPS and presents its certificate when it calls a peer; the CA is the only one it trusts, both
for the servers it calls and for the clients it serves. pool-managerd and the provisioner
require a client certificate from that CA: a peer without one fails the handshake and gets no
answer. orchestratord's port is also its clients' (who have API keys or OIDC tokens, not
certificates), so there a certificate is asked for but optional, and the routes only nodes call
(registration, heartbeats, the pool-ready callback) refuse a caller without a verified one.

Rotation without a restart: the files are checked every few seconds, and a changed certificate
and key are loaded into the same contexts, so every new connection uses them (open ones keep
theirs). A CA file that changes is added to the trusted set: rotating a CA works by overlap (old
and new trusted together); to stop trusting a CA, restart. A half-written pair (certificate and
key not matching yet) is not loaded: the old pair stays until the next check finds them whole.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import ssl
import tempfile
from pathlib import Path
from typing import Iterator

import aiohttp
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .config import TlsFiles

log = logging.getLogger("llama_orch.tls")

#: How often the certificate files are checked for a change (seconds).
RELOAD_INTERVAL_S = 5.0


class TlsContexts:
    """One daemon's server and client SSL contexts, loaded from its files and reloaded in place.

    ``client_cert`` is the server side's demand: ``required`` (pool-managerd, the provisioner) or
    ``optional`` (orchestratord: its clients authenticate with keys or tokens)."""

    def __init__(self, files: TlsFiles, *, client_cert: str = "required") -> None:
        self.files = files
        self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server.verify_mode = ssl.CERT_REQUIRED if client_cert == "required" else ssl.CERT_OPTIONAL
        self.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its host name
        self.client.minimum_version = ssl.TLSVersion.TLSv1_2
        # engines: an OpenAI-compatible one may sit behind a public certificate, so the system's
        # CAs are trusted there too, besides the cluster's (the daemons' hops trust the cluster's only)
        self.engines = ssl.create_default_context()
        self.engines.minimum_version = ssl.TLSVersion.TLSv1_2
        self.reloads = {"ok": 0, "failed": 0}
        self.handshake_failures: dict[str, int] = {}  # peer role -> failures seen by this daemon as a client
        self.not_after: float | None = None
        self._seen = self._fingerprint()
        self._load()

    def _fingerprint(self) -> bytes:
        digest = hashlib.sha256()
        for path in (self.files.cert, self.files.key, self.files.ca):
            try:
                digest.update(path.read_bytes())
            except OSError:
                digest.update(b"missing")
        return digest.digest()

    def _load(self) -> None:
        """Load one snapshot of the files, checked on a scratch context first: a failed
        ``load_cert_chain`` leaves a context half-changed (the new certificate with the old key),
        and a live one in that state fails every handshake."""
        with tempfile.TemporaryDirectory(prefix="llama-orch-tls-") as scratch:
            snapshot = {}
            for part in ("cert", "key", "ca"):
                snapshot[part] = Path(scratch) / part
                snapshot[part].write_bytes(getattr(self.files, part).read_bytes())
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            probe.load_cert_chain(snapshot["cert"], snapshot["key"])
            probe.load_verify_locations(cafile=str(snapshot["ca"]))
            for ctx in (self.server, self.client, self.engines):
                ctx.load_cert_chain(snapshot["cert"], snapshot["key"])
                ctx.load_verify_locations(cafile=str(snapshot["ca"]))
            self.not_after = certificate_not_after(snapshot["cert"])

    def reload_if_changed(self) -> bool | None:
        """Load the files again when their content changed: True loaded, False a failed load (the
        previous certificate stays), None unchanged."""
        seen = self._fingerprint()
        if seen == self._seen:
            return None
        try:
            self._load()
        except (ssl.SSLError, OSError, ValueError) as exc:
            self.reloads["failed"] += 1
            log.warning("TLS: certificate files changed but do not load yet (%s); keeping the previous "
                        "certificate, checking again in %.0f s", exc, RELOAD_INTERVAL_S)
            return False  # not remembered as seen: the next check tries again
        self._seen = seen
        self.reloads["ok"] += 1
        log.info("TLS: certificate reloaded from %s (valid until %s)", self.files.cert, _utc(self.not_after))
        return True

    async def watch(self, interval_s: float = RELOAD_INTERVAL_S) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.reload_if_changed()

    def failed(self, peer: str, exc: BaseException) -> str | None:
        """The TLS failure ``exc`` is, counted against ``peer`` (a role, never an address), as the
        text for ``last_error`` and the log; None when ``exc`` is not a TLS failure."""
        text = tls_failure(exc)
        if text is not None:
            self.handshake_failures[peer] = self.handshake_failures.get(peer, 0) + 1
        return text

    def collector(self, daemon: str) -> Collector:
        return _TlsCollector(self, daemon)


def connector(tls: TlsContexts | None, **kwargs) -> aiohttp.TCPConnector:
    """A connector that presents the daemon's certificate to https peers and trusts only its CA
    (plain http URLs stay plain); without TLS configured, aiohttp's default verification."""
    return aiohttp.TCPConnector(ssl=tls.client if tls is not None else True, **kwargs)


def engine_connector(tls: TlsContexts | None, **kwargs) -> aiohttp.TCPConnector:
    """``connector`` for engine URLs: the cluster's CA and the system's trusted."""
    return aiohttp.TCPConnector(ssl=tls.engines if tls is not None else True, **kwargs)


def describe_failure(tls: TlsContexts | None, peer: str, exc: BaseException) -> str:
    """``last_error`` text for a failed call to ``peer``: a TLS failure says so (and is counted),
    anything else is the exception's type and message."""
    text = tls.failed(peer, exc) if tls is not None else tls_failure(exc)
    return text if text is not None else f"{type(exc).__name__}: {exc}".rstrip(": ")


def require_peer_certificate(paths: tuple[str, ...], names: tuple[str, ...]):
    """Middleware: the routes under ``paths`` (those only nodes call) need a client certificate
    the handshake verified whose common name is one of ``names``: any certificate of the CA is
    not enough (an operator's or a scraper's must not register a node); everyone else
    authenticates as clients do."""
    allowed = frozenset(names)

    @web.middleware
    async def check(request: web.Request, handler):
        if request.path.startswith(paths):
            name = peer_name(request)
            if name is None:
                raise web.HTTPForbidden(
                    text='{"code":"PEER_CERTIFICATE_REQUIRED","message":"this route is for pool-managerd nodes: '
                         'present a client certificate from the cluster CA"}', content_type="application/json")
            if name not in allowed:
                log.warning("TLS: %s %s refused to a peer certificate named %r (node names: %s)", request.method,
                            request.path, name[:64], ", ".join(sorted(allowed)))
                raise web.HTTPForbidden(
                    text='{"code":"PEER_NOT_A_NODE","message":"this route is for pool-managerd nodes: the client '
                         'certificate\'s common name is not one of ORCHD_TLS_NODE_NAMES"}', content_type="application/json")
        return await handler(request)

    return check


def tls_failure(exc: BaseException) -> str | None:
    """A readable "TLS: ..." when ``exc`` (from an aiohttp call) is a certificate or handshake
    failure, not a peer that is down or slow: the two need different fixes, so they are never
    reported alike."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert_error = exc.certificate_error
        reason = getattr(cert_error, "verify_message", None) or str(cert_error)
        return f"TLS: the peer's certificate is not trusted ({reason})"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS: handshake failed ({_ssl_reason(exc)})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: handshake failed ({exc.reason or exc})"
    if isinstance(exc, aiohttp.ClientOSError) and isinstance(exc.__cause__, ssl.SSLError):
        return f"TLS: handshake failed ({exc.__cause__.reason or exc.__cause__})"
    return None


def _ssl_reason(exc: aiohttp.ClientSSLError) -> str:
    inner = getattr(exc, "os_error", None) or exc.__cause__
    if isinstance(inner, ssl.SSLError):
        return inner.reason or str(inner)
    return str(inner or exc)


def certificate_not_after(path: Path) -> float | None:
    """The certificate's expiry (Unix seconds), for the expiry gauge; None when it cannot be read."""
    try:
        from cryptography import x509
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (ImportError, ValueError, OSError):
        return None
    return cert.not_valid_after_utc.timestamp()


def _utc(ts: float | None) -> str:
    if ts is None:
        return "unknown"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def peer_name(request: web.Request) -> str | None:
    """The common name of the client certificate the TLS handshake verified, or None (plain
    HTTP, or no certificate offered where one was optional)."""
    transport = request.transport
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None  # the ssl module returns {} for an unverified certificate: never trusted
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return "unnamed"


class _TlsCollector(Collector):
    def __init__(self, tls: TlsContexts, daemon: str) -> None:
        self.tls = tls
        self.daemon = daemon

    def collect(self) -> Iterator:
        reloads = CounterMetricFamily("tls_certificate_reloads", "Certificate reloads after the files changed",
                                      labels=["outcome"])
        for outcome, count in self.tls.reloads.items():
            reloads.add_metric([outcome], count)
        yield reloads
        failures = CounterMetricFamily("tls_handshake_failures", "Calls to a peer that failed in TLS (certificate "
                                       "or handshake), by the peer's role", labels=["peer"])
        for peer, count in sorted(self.tls.handshake_failures.items()):
            failures.add_metric([peer], count)
        yield failures
        if self.tls.not_after is not None:
            expiry = GaugeMetricFamily("tls_certificate_expiry_timestamp_seconds",
                                       "When this daemon's certificate expires (Unix time)", labels=["daemon"])
            expiry.add_metric([self.daemon], self.tls.not_after)
            yield expiry
