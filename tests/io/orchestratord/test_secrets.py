"""No secret leaves orchestratord or pool-managerd: a full flow with known API keys and JWTs, then
every log line, every metrics scrape, every response (status, headers, body) and every exported
trace span (name, attributes, events, status, links) is searched for them, whole and in pieces.

``Exposure`` gathers what the outside world saw, by source; a new source is one more
``exposure.add(source, text)`` before the search.
"""

import base64
import logging
import secrets
import uuid
from typing import Mapping

import pytest
from cluster_support import free_port
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from oidc_support import AUDIENCE, LoopbackIssuer
from support import eventually

from llama_orch.core.orchestrator import OrchestratorConfig
from llama_orch.core.quotas import QuotaPolicy
from llama_orch.io.config import ConfigError, OrchdSettings, PoolManagerSettings
from llama_orch.io.handoff import Handoff, write_handoff
from llama_orch.io.orchestratord.app import create_app
from llama_orch.io.client_auth import OidcSettings
from llama_orch.io.pool_managerd.manager import create_app as pool_managerd_app
from llama_orch.io.provisioner.mock_engine import MockConfig
from llama_orch.io.provisioner.mock_engine import create_app as mock_engine_app
from llama_orch.io.tracing import setup as setup_tracing

MODEL = "file:/models/tiny.gguf"
FRAGMENT = 12  # a piece of a secret this long, anywhere, is a leak too


class Exposure:
    """Everything a run showed the outside world, by source."""

    def __init__(self) -> None:
        self.sources: dict[str, list[str]] = {}

    def add(self, source: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        self.sources.setdefault(source, []).append(text)

    async def response(self, resp, what: str) -> bytes:
        """Record an HTTP answer (status line, headers, body) and hand back its body."""
        body = await resp.read()
        head = "\n".join(f"{k}: {v}" for k, v in resp.headers.items())
        self.add("responses", f"{what} -> {resp.status}\n{head}\n\n{body.decode('utf-8', errors='replace')}")
        return body

    @staticmethod
    def fragments(secret: str) -> set[str]:
        """The secret and every piece of it ``FRAGMENT`` long; for a JWT, of its signature only
        (its header and payload are readable by anyone who holds it, and their pieces are common)."""
        core = secret.rsplit(".", 1)[-1] if secret.count(".") == 2 else secret
        return {secret} | {core[i:i + FRAGMENT] for i in range(max(1, len(core) - FRAGMENT + 1))}

    @classmethod
    def find(cls, text: str, secrets_: Mapping[str, str]) -> list[str]:
        return [name for name, secret in secrets_.items() if any(f in text for f in cls.fragments(secret))]

    def spans(self, source: str, exporter: InMemorySpanExporter) -> int:
        """Record every span the exporter got, as text; how many."""
        spans = exporter.get_finished_spans()
        for span in spans:
            self.add(source, span.to_json())  # name, attributes, events, status, links, resource
        return len(spans)

    def leaks(self, secrets_: Mapping[str, str]) -> list[str]:
        found = []
        for source, texts in self.sources.items():
            for text in texts:
                for name in self.find(text, secrets_):
                    found.append(f"{name} in {source}: {text[:300]!r}")
        return found


def test_the_search_finds_a_secret_whole_or_in_pieces():
    key, token = secrets.token_urlsafe(24), "eyJh.eyJz." + secrets.token_urlsafe(40)
    wanted = {"key": key, "token": token}
    assert Exposure.find(f"Authorization: Bearer {key}", wanted) == ["key"]
    assert Exposure.find(f"prefix {key[3:3 + FRAGMENT]} suffix", wanted) == ["key"]
    assert Exposure.find(f"sig={token.split('.')[2][5:25]}", wanted) == ["token"]
    assert Exposure.find("eyJh.eyJz. and nothing else", wanted) == []


async def test_no_key_or_token_reaches_a_log_a_scrape_or_an_answer(aiohttp_server, aiohttp_client, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    seen = Exposure()
    issuer = await LoopbackIssuer().start(aiohttp_server)
    issuer.make_key("ec-1", "ES256")
    client_key, node_key, wrong_key = (secrets.token_urlsafe(24) for _ in range(3))
    token = issuer.token(sub="carol")
    expired = issuer.token(sub="carol", exp=1_000_000)
    wrong_audience = issuer.token(sub="carol", aud="someone-else")
    head, payload, _ = token.split(".")
    forged = f"{head}.{payload}.{base64.urlsafe_b64encode(secrets.token_bytes(64)).rstrip(b'=').decode()}"
    wanted = {"client key": client_key, "node key": node_key, "wrong key": wrong_key, "token": token,
              "expired token": expired, "wrong-audience token": wrong_audience, "forged token": forged}

    engine = await aiohttp_server(mock_engine_app(MockConfig(slots=4, tokens_per_s=200)))
    orchd_spans, pmd_spans = InMemorySpanExporter(), InMemorySpanExporter()
    orchd = await aiohttp_server(create_app(
        OrchestratorConfig(), [], poll_interval_ms=30, api_keys=(f"dave={client_key}", f"nodes={node_key}"),
        oidc=OidcSettings(issuer=issuer.url, audiences=(AUDIENCE,)), quotas=QuotaPolicy(concurrent_tasks=2),
        tracing=setup_tracing("orchestratord", {}, exporter=orchd_spans)))
    client = await aiohttp_client(orchd)
    write_handoff(tmp_path / "engines", Handoff(pool_id="pool-s", replica_id="r0", url=str(engine.make_url("")).rstrip("/"),
                                                slots_total=4, model_id=MODEL))
    port = free_port()
    pmd = await aiohttp_server(pool_managerd_app(PoolManagerSettings(
        runtime_dir=tmp_path / "engines", watch_interval_ms=20, health_interval_ms=30, provisioner_url=None,
        node_id="w1", orchestratord_url=str(orchd.make_url("")).rstrip("/"), advertise_url=f"http://127.0.0.1:{port}",
        orchestratord_api_key=node_key), tracing=setup_tracing("pool-managerd", {}, exporter=pmd_spans)), port=port)

    async def ready():
        return (await client.get("/readyz")).status == 200
    await eventually(ready, what="pool-managerd registered with its key, its pool ready")

    dave, carol = {"Authorization": f"Bearer {client_key}"}, {"Authorization": f"Bearer {token}"}

    async def call(method: str, path: str, headers: Mapping[str, str], **kw) -> tuple[int, bytes]:
        resp = await client.request(method, path, headers=headers, **kw)
        return resp.status, await seen.response(resp, f"{method} {path}")

    def task(**kw):
        return {"task_id": str(uuid.uuid4()), "session_id": str(uuid.uuid4()), "workload": "completion",
                "model_ref": MODEL, "engine": "llamacpp", "ctx": 2048, "priority": "interactive", "max_tokens": 6,
                "deadline_ms": 60_000, "prompt": "hello", **kw}

    # submit and stream, as an API key and as an OIDC subject
    done, slow = task(), task(max_tokens=1500)
    assert (await call("POST", "/v2/tasks", dave, json=done))[0] == 202
    status, body = await call("GET", f"/v2/tasks/{done['task_id']}/events?verbose=true", dave)
    assert status == 200 and b"event: end" in body
    assert (await call("POST", "/v2/tasks", carol, json=slow))[0] == 202
    # a quota refusal, ownership refusals
    second = task(max_tokens=1500)
    assert (await call("POST", "/v2/tasks", carol, json=second))[0] == 202
    assert (await call("POST", "/v2/tasks", carol, json=task()))[0] == 429
    assert (await call("GET", f"/v2/tasks/{slow['task_id']}/events", dave))[0] == 404
    assert (await call("POST", f"/v2/tasks/{slow['task_id']}/cancel", dave))[0] == 404
    assert (await call("POST", "/v2/tasks", dave, json=task(session_id=slow["session_id"])))[0] == 403
    # cancel, then the stream's end
    assert (await call("POST", f"/v2/tasks/{slow['task_id']}/cancel", carol))[0] == 204
    status, body = await call("GET", f"/v2/tasks/{slow['task_id']}/events", carol)
    assert status == 200 and b'"canceled":true' in body
    # the OpenAI door, streaming and not
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert (await call("POST", "/v1/chat/completions", carol, json={**chat, "stream": True}))[0] == 200
    assert (await call("POST", f"/v2/tasks/{second['task_id']}/cancel", carol))[0] == 204
    assert (await call("POST", "/v1/completions", dave, json={"model": MODEL, "prompt": "x", "max_tokens": 3}))[0] == 200
    # every kind of bad credential
    for bad in ({"Authorization": f"Bearer {wrong_key}"}, {"Authorization": f"Bearer {expired}"},
                {"Authorization": f"Bearer {wrong_audience}"}, {"Authorization": f"Bearer {forged}"},
                {"Authorization": f"Basic {client_key}"}, {"Authorization": f"Bearer {token}x"}):
        for method, path in (("POST", "/v2/tasks"), ("GET", "/v1/models"), ("GET", f"/v2/sessions/{done['session_id']}")):
            status, _ = await call(method, path, bad, json=task() if method == "POST" else None)
            assert status == 401, (method, path, status)
    # sessions: someone else's, then the owner's
    assert (await call("GET", f"/v2/sessions/{done['session_id']}", carol))[0] == 404
    assert (await call("DELETE", f"/v2/sessions/{done['session_id']}", carol))[0] == 404
    assert (await call("GET", f"/v2/sessions/{done['session_id']}", dave))[0] == 200
    assert (await call("DELETE", f"/v2/sessions/{done['session_id']}", dave))[0] == 204
    assert (await call("GET", "/v2/nodes", {"Authorization": f"Bearer {node_key}"}))[0] == 200
    # scrapes of both daemons
    status, scrape = await call("GET", "/metrics", {})
    assert status == 200 and b"tasks_enqueued_total" in scrape
    async with client.session.get(pmd.make_url("/metrics")) as resp:
        assert resp.status == 200 and b"pool_" in await seen.response(resp, "pool-managerd /metrics")
    # a settings error about the keys, as the daemon would print it
    with pytest.raises(ConfigError) as err:
        OrchdSettings.from_env({"ORCHD_API_KEYS": f"{client_key},{node_key[:10]}"})
    seen.add("start-up errors", str(err.value))
    # both daemons stopped, so their shutdown lines are in too
    await pmd.close()
    await client.close()

    for record in caplog.records:
        seen.add(f"log {record.name}", record.getMessage())
    seen.add("log text", caplog.text)
    assert seen.spans("orchestratord spans", orchd_spans) > 10 and seen.spans("pool-managerd spans", pmd_spans) > 1
    assert len(seen.sources["responses"]) >= 38 and len(caplog.records) > 20  # the search had something to search
    assert any("OIDC issuer" in r.getMessage() for r in caplog.records)  # the verifier's own lines included
    assert any(r.name.startswith("llama_orch.pool_managerd") for r in caplog.records)
    assert seen.leaks(wanted) == []
