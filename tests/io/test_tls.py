"""mTLS between the daemons: the development certificates, the settings, who gets an answer, a
certificate failure reported as such, and rotation without a restart. Real sockets, real TLS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import stat

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from support import eventually

from llama_orch.core.orchestrator import OrchestratorConfig
from llama_orch.io.certs import ensure_ca, issue, make_dev_certs
from llama_orch.io.config import ConfigError, OrchdSettings, PoolManagerSettings, TlsFiles
from llama_orch.io.handoff import Handoff, write_handoff
from llama_orch.io.orchestratord.app import create_app as orchestratord_app
from llama_orch.io.orchestratord.discovery import PoolDiscovery
from llama_orch.io.pool_managerd.manager import MANAGER
from llama_orch.io.pool_managerd.manager import create_app as pool_managerd_app
from llama_orch.io.provisioner.mock_engine import MockConfig
from llama_orch.io.provisioner.mock_engine import create_app as mock_engine_app
from llama_orch.io.tls import TlsContexts, tls_failure


def files(certs, name: str) -> TlsFiles:
    c = certs[name]
    return TlsFiles(cert=c.cert, key=c.key, ca=c.ca)


def client_context(certs, name: str | None) -> ssl.SSLContext:
    """What a peer presents: ``name``'s certificate (None: none), trusting the cluster CA."""
    any_cert = next(iter(certs.values()))
    ctx = ssl.create_default_context(cafile=str(any_cert.ca))
    if name is not None:
        ctx.load_cert_chain(certs[name].cert, certs[name].key)
    return ctx


@contextlib.asynccontextmanager
async def serve(app: web.Application, ssl_context: ssl.SSLContext | None):
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}", port
    finally:
        await runner.cleanup()


async def peer_serial(port: int, ctx: ssl.SSLContext) -> int:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


@pytest.fixture
def certs(tmp_path):
    return make_dev_certs(tmp_path / "certs")


@pytest.fixture
def other_certs(tmp_path):
    """A second CA and its certificates: trusted by nobody in the cluster."""
    return make_dev_certs(tmp_path / "other")


# -- certificates and settings ---------------------------------------------------------------------

def test_dev_certs_are_server_and_client_certificates_for_loopback_and_given_hosts(tmp_path):
    made = make_dev_certs(tmp_path / "c", hosts=("gpu-1.internal", "10.0.0.7"))
    assert set(made) == {"orchestratord", "pool-managerd", "engine-provisioner", "client"}
    cert = x509.load_pem_x509_certificate(made["pool-managerd"].cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "gpu-1.internal"} <= set(names.get_values_for_type(x509.DNSName))
    assert {str(a) for a in names.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "10.0.0.7"}
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {u._name for u in usage} == {"serverAuth", "clientAuth"}
    for service in made.values():  # private keys are the owner's alone
        assert stat.S_IMODE(service.key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "c" / "ca-key.pem").stat().st_mode) == 0o600
    assert not list((tmp_path / "c").glob(".*.tmp"))  # written whole, then renamed


def test_an_existing_ca_is_reused_so_new_certificates_stay_trusted(tmp_path):
    first = make_dev_certs(tmp_path / "c", services=("orchestratord",))
    ca_before = (tmp_path / "c" / "ca.pem").read_bytes()
    again = make_dev_certs(tmp_path / "c", services=("orchestratord",))
    assert (tmp_path / "c" / "ca.pem").read_bytes() == ca_before
    assert again["orchestratord"].cert.read_bytes() != b"" and first["orchestratord"].ca == again["orchestratord"].ca


def test_tls_settings_need_all_three_files_and_name_what_is_wrong(certs, tmp_path):
    c = certs["pool-managerd"]
    with pytest.raises(ConfigError, match="POOL_MANAGERD_TLS_CA"):
        PoolManagerSettings.from_env({"POOL_MANAGERD_TLS_CERT": str(c.cert), "POOL_MANAGERD_TLS_KEY": str(c.key)})
    with pytest.raises(ConfigError, match=r"ORCHD_TLS_KEY='.*nope.pem': expected a readable PEM file"):
        OrchdSettings.from_env({"ORCHD_TLS_CERT": str(c.cert), "ORCHD_TLS_KEY": str(tmp_path / "nope.pem"),
                                "ORCHD_TLS_CA": str(c.ca)})
    wrong_key = certs["orchestratord"].key  # a key that is not this certificate's
    with pytest.raises(ConfigError, match="do not load as a certificate, its key and a CA"):
        OrchdSettings.from_env({"ORCHD_TLS_CERT": str(c.cert), "ORCHD_TLS_KEY": str(wrong_key), "ORCHD_TLS_CA": str(c.ca)})
    with pytest.raises(ConfigError, match="ORCHD_TLS_CLIENT_CERT='maybe': expected optional or required"):
        OrchdSettings.from_env({"ORCHD_TLS_CLIENT_CERT": "maybe"})
    ok = OrchdSettings.from_env({"ORCHD_TLS_CERT": str(c.cert), "ORCHD_TLS_KEY": str(c.key), "ORCHD_TLS_CA": str(c.ca)})
    assert ok.tls == TlsFiles(cert=c.cert, key=c.key, ca=c.ca) and ok.tls_client_cert == "optional"
    assert OrchdSettings.from_env({}).tls is None


# -- who gets an answer ----------------------------------------------------------------------------

async def test_pool_managerd_answers_only_peers_with_a_certificate_from_its_ca(certs, other_certs, tmp_path):
    settings = PoolManagerSettings(runtime_dir=tmp_path / "engines", provisioner_url=None, node_id="n1",
                                   tls=files(certs, "pool-managerd"))
    app = pool_managerd_app(settings)
    async with serve(app, app[MANAGER].tls.server) as (url, _):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(certs, "orchestratord"))) as s:
            async with s.get(f"{url}/health") as r:
                assert r.status == 200
        refused = {
            "no certificate": client_context(certs, None),
            "another CA's certificate": client_context(other_certs, "orchestratord"),
        }
        for why, ctx in refused.items():
            # the other CA's client also distrusts the server: let it skip that check, so the
            # refusal measured is the server's
            if why == "another CA's certificate":
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
                with pytest.raises((aiohttp.ClientSSLError, aiohttp.ClientOSError,
                                    aiohttp.ServerDisconnectedError)) as caught:
                    async with s.get(f"{url}/health") as r:
                        await r.read()
                        pytest.fail(f"{why}: answered HTTP {r.status}")
            assert tls_failure(caught.value) is not None or isinstance(caught.value, aiohttp.ServerDisconnectedError), why
        async with aiohttp.ClientSession() as s:  # plain HTTP to the TLS port: no HTTP answer either
            with pytest.raises(aiohttp.ClientError):
                async with s.get(url.replace("https", "http") + "/health") as r:
                    await r.read()
                    assert r.status >= 400  # nothing of pool-managerd's: aiohttp's own refusal at most


async def test_orchestratord_node_routes_need_a_client_certificate_and_clients_do_not(certs):
    tls = TlsContexts(files(certs, "orchestratord"), client_cert="optional")
    app = orchestratord_app(OrchestratorConfig(), [], poll_interval_ms=10_000, tls=tls)
    async with serve(app, tls.server) as (url, _):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(certs, None))) as client:
            async with client.get(f"{url}/v2/pools") as r:
                assert r.status == 200  # a client without a certificate: the client API answers
            for method, path in (("POST", "/v2/nodes/register"), ("POST", "/v2/nodes/n1/heartbeat"),
                                 ("DELETE", "/v2/nodes/n1"), ("POST", "/callbacks/pool-ready")):
                async with client.request(method, f"{url}{path}", json={}) as r:
                    assert r.status == 403, path
                    assert (await r.json())["code"] == "PEER_CERTIFICATE_REQUIRED"
        # an operator's or a scraper's certificate from the same CA is no node's: it cannot register one
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(certs, "client"))) as tool:
            async with tool.post(f"{url}/v2/nodes/register", json={}) as r:
                assert r.status == 403 and (await r.json())["code"] == "PEER_NOT_A_NODE"
            async with tool.get(f"{url}/v2/pools") as r:
                assert r.status == 200
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(certs, "pool-managerd"))) as node:
            async with node.post(f"{url}/v2/nodes/register", json={}) as r:
                assert r.status == 400  # past the certificate check: the body is what is wrong now
            async with node.get(f"{url}/metrics") as r:
                text = await r.text()
        assert 'tls_certificate_expiry_timestamp_seconds{daemon="orchestratord"}' in text
        assert "tls_certificate_reloads_total" in text


# -- a certificate failure is reported as one ------------------------------------------------------

async def test_a_pool_managerd_with_an_untrusted_certificate_is_a_tls_error_not_a_silent_pool(
        certs, other_certs, tmp_path, caplog):
    engine_runner = web.AppRunner(mock_engine_app(MockConfig(slots=2)), access_log=None)
    await engine_runner.setup()
    await web.TCPSite(engine_runner, "127.0.0.1", 0).start()
    engine_url = f"http://127.0.0.1:{engine_runner.addresses[0][1]}"
    write_handoff(tmp_path / "engines", Handoff(pool_id="pool-0", replica_id="r0", url=engine_url, slots_total=2,
                                                model_id="file:/m/tiny.gguf"))
    # pool-managerd's certificate is from a CA orchestratord does not trust
    settings = PoolManagerSettings(runtime_dir=tmp_path / "engines", provisioner_url=None, node_id="n1",
                                   watch_interval_ms=20, health_interval_ms=30, tls=files(other_certs, "pool-managerd"))
    pmd = pool_managerd_app(settings)
    try:
        async with serve(pmd, pmd[MANAGER].tls.server) as (url, _):
            tls = TlsContexts(files(certs, "orchestratord"))
            disc = PoolDiscovery([url], lambda event: None, interval_ms=50, timeout_ms=1000, tls=tls)
            with caplog.at_level(logging.ERROR, logger="llama_orch"):
                await disc.start()
                try:
                    manager = disc.managers[url]
                    await eventually(lambda: tls.handshake_failures.get("pool-managerd", 0) >= 2,
                                     what="polls failing in TLS")
                finally:
                    await disc.stop()
            assert manager.last_error.startswith("TLS: the peer's certificate is not trusted"), manager.last_error
            assert "self-signed certificate in certificate chain" in manager.last_error  # OpenSSL's reason
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and "TLS:" in errors[0] and "does not answer" not in errors[0], errors
            assert not [r for r in caplog.records if "does not answer" in r.getMessage()]
    finally:
        await engine_runner.cleanup()


# -- rotation without a restart --------------------------------------------------------------------

async def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(certs, tmp_path):
    directory = certs["pool-managerd"].cert.parent
    tls = TlsContexts(files(certs, "pool-managerd"))
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")
    app.router.add_get("/", hello)
    client = client_context(certs, "orchestratord")
    async with serve(app, tls.server) as (_, port):
        before = await peer_serial(port, client)
        assert tls.reload_if_changed() is None  # nothing changed: nothing loaded
        # a half-done rotation (a new certificate, its key not yet written) keeps the old pair
        fresh_key = directory / "pool-managerd-key.pem"
        old_key = fresh_key.read_bytes()
        issue(directory, "pool-managerd", ca=ensure_ca(directory))
        new_key = fresh_key.read_bytes()
        fresh_key.write_bytes(old_key)
        assert tls.reload_if_changed() is False and tls.reloads == {"ok": 0, "failed": 1}
        assert await peer_serial(port, client) == before
        fresh_key.write_bytes(new_key)  # the rotation completes: the next check loads it
        watcher = asyncio.ensure_future(tls.watch(interval_s=0.05))
        try:
            await eventually(lambda: tls.reloads["ok"] == 1, what="the reload")
        finally:
            watcher.cancel()
        after = await peer_serial(port, client)
        expected = x509.load_pem_x509_certificate((directory / "pool-managerd.pem").read_bytes()).serial_number
        assert after == expected != before
