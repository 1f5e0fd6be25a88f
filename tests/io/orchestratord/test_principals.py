"""Principals on orchestratord: API key names and OIDC subjects, ownership of tasks and sessions,
and the per-principal quotas (429 ``QUOTA_EXCEEDED``), with mock engines on loopback."""

import asyncio
import hashlib
import uuid

import orjson
import pytest
from oidc_support import AUDIENCE, LoopbackIssuer
from support import eventually, task_body

from llama_orch.core.admission import QueuePolicy
from llama_orch.core.orchestrator import OrchestratorConfig
from llama_orch.core.quotas import QuotaPolicy
from llama_orch.core.types import Priority, TaskSpec
from llama_orch.ext.sse import SSEParser
from llama_orch.io.config import ConfigError, OrchdSettings, PoolManagerSettings
from llama_orch.io.handoff import Handoff, write_handoff
from llama_orch.io.orchestratord.app import create_app
from llama_orch.io.client_auth import ApiKey, OidcSettings, derived_principal
from llama_orch.io.orchestratord.driver import DRIVER
from llama_orch.io.orchestratord.openai_api import session_id_for
from llama_orch.io.orchestratord.tenancy import Tenancy
from llama_orch.io.pool_managerd.manager import create_app as pool_managerd_app
from llama_orch.io.provisioner.mock_engine import MockConfig
from llama_orch.io.provisioner.mock_engine import create_app as mock_engine_app

MODEL = "file:/models/tiny.gguf"
ALICE_KEY = "alice-key-0123456789abcdef"
BOB_KEY = "bob-key-0123456789abcdef00"
BARE_KEY = "bare-key-0123456789abcdef0"
KEYS = (f"alice={ALICE_KEY}", f"bob={BOB_KEY}", BARE_KEY)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ALICE, BOB, BARE = auth(ALICE_KEY), auth(BOB_KEY), auth(BARE_KEY)


async def cluster(aiohttp_server, aiohttp_client, tmp_path, *, slots=4, tokens_per_s=500.0, api_keys=KEYS,
                  oidc=None, quotas=QuotaPolicy(), grace_s=0.5, **cfg):
    engine = await aiohttp_server(mock_engine_app(MockConfig(slots=slots, tokens_per_s=tokens_per_s)))
    pmd = await aiohttp_server(pool_managerd_app(PoolManagerSettings(
        runtime_dir=tmp_path / "engines", watch_interval_ms=20, health_interval_ms=30, provisioner_url=None)))
    write_handoff(tmp_path / "engines", Handoff(pool_id="pool-0", replica_id="r0", url=str(engine.make_url("")).rstrip("/"),
                                                slots_total=slots, model_id=MODEL))
    client = await aiohttp_client(create_app(OrchestratorConfig(**cfg), [str(pmd.make_url("")).rstrip("/")],
                                             poll_interval_ms=30, api_keys=api_keys, oidc=oidc, quotas=quotas,
                                             shutdown_grace_s=grace_s))

    async def ready():
        return (await client.get("/readyz")).status == 200
    await eventually(ready, what="a ready pool")
    client.driver = client.app[DRIVER]
    return client


def task(**kw) -> dict:
    return task_body(MODEL, **{"ctx": 2048, "deadline_ms": 120_000, **kw})


async def events_of(client, tid, headers):
    resp = await client.get(f"/v2/tasks/{tid}/events", headers=headers)
    assert resp.status == 200, await resp.text()
    parser, out = SSEParser(), []
    async for chunk in resp.content.iter_any():
        out += [(name, orjson.loads(data)) for name, data in parser.feed(chunk)]
    return out


# -- principals and ownership ---------------------------------------------------------------------


def test_api_key_entries_name_their_principal_without_exposing_the_key():
    named, bare = ApiKey.parse(f"alice={ALICE_KEY}"), ApiKey.parse(BARE_KEY)
    assert named.principal == "alice" and named.key == ALICE_KEY
    assert bare.principal == "key-" + hashlib.sha256(BARE_KEY.encode()).hexdigest()[:12] == derived_principal(BARE_KEY)
    assert BARE_KEY not in repr(bare) and ALICE_KEY not in repr(named)
    padded = "c29tZSBzZWNyZXQga2V5IGJ5dGVz=="  # base64 padding is not a name
    assert ApiKey.parse(padded).key == padded and ApiKey.parse(padded).principal.startswith("key-")


async def test_tasks_and_sessions_belong_to_the_principal_that_made_them(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, tokens_per_s=50)
    body = task(max_tokens=40)
    tid, sid = body["task_id"], body["session_id"]
    assert (await client.post("/v2/tasks", json=body, headers=ALICE)).status == 202
    assert client.driver.streams[tid].owner == "alice"
    unknown = await client.get(f"/v2/tasks/{uuid.uuid4()}/events", headers=BOB)
    for method, path in (("GET", f"/v2/tasks/{tid}/events"), ("POST", f"/v2/tasks/{tid}/cancel"),
                         ("GET", f"/v2/sessions/{sid}"), ("DELETE", f"/v2/sessions/{sid}")):
        resp = await client.request(method, path, headers=BOB)
        assert resp.status == 404, (method, path, resp.status)  # as if it did not exist
        assert (await resp.json())["code"] in ("TASK_NOT_FOUND", "SESSION_NOT_FOUND")
    assert (await unknown.json())["code"] == "TASK_NOT_FOUND"
    stolen = await client.post("/v2/tasks", json=task(session_id=sid), headers=BOB)
    assert stolen.status == 403 and (await stolen.json())["code"] == "SESSION_FORBIDDEN"
    scrape = await (await client.get("/metrics")).text()
    assert 'tasks_rejected_total{engine="llamacpp",reason="SESSION_FORBIDDEN"} 1.0' in scrape
    # the owner's task was neither canceled nor its session touched by any of that
    events = await events_of(client, tid, ALICE)
    assert events[-1][0] == "end" and not events[-1][1].get("canceled") and events[-1][1]["tokens_out"] == 40
    assert (await client.get(f"/v2/sessions/{sid}", headers=ALICE)).status == 200
    assert (await client.delete(f"/v2/sessions/{sid}", headers=ALICE)).status == 204
    assert (await client.post("/v2/tasks", json=task(session_id=sid), headers=BOB)).status == 202  # free again


async def test_a_bare_key_is_a_principal_of_its_own(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path)
    body = task()
    assert (await client.post("/v2/tasks", json=body, headers=BARE)).status == 202
    assert client.driver.streams[body["task_id"]].owner == derived_principal(BARE_KEY)
    assert (await client.get(f"/v2/tasks/{body['task_id']}/events", headers=ALICE)).status == 404
    assert (await events_of(client, body["task_id"], BARE))[-1][0] == "end"


async def test_without_client_auth_everyone_is_anonymous(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, api_keys=())
    body = task()
    assert (await client.post("/v2/tasks", json=body)).status == 202
    assert client.driver.streams[body["task_id"]].owner == "anonymous"
    assert (await events_of(client, body["task_id"], {}))[-1][0] == "end"
    assert (await client.get(f"/v2/sessions/{body['session_id']}")).status == 200


async def test_openai_users_of_two_principals_are_two_sessions(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "user": "sam"}
    for headers in (ALICE, BOB):
        resp = await client.post("/v1/chat/completions", json=chat, headers=headers)
        assert resp.status == 200, await resp.text()
    tenancy, sessions = client.driver.tenancy, client.driver.core.sessions
    mine, his = session_id_for(None, "sam", "alice"), session_id_for(None, "sam", "bob")
    assert mine != his and mine in sessions and his in sessions
    assert tenancy.session_owner(mine) == "alice" and tenancy.session_owner(his) == "bob"
    task_id = resp.headers["X-Task-Id"]  # bob's: readable through /v2 by bob only
    assert (await client.get(f"/v2/tasks/{task_id}/events", headers=ALICE)).status == 404
    assert (await client.get(f"/v2/tasks/{task_id}/events", headers=BOB)).status == 200


def test_session_owners_are_bounded_and_a_dropped_owner_takes_its_session_along():
    forgotten = []
    tenancy = Tenancy(QuotaPolicy(concurrent_tasks=1), max_sessions=3, forget_session=forgotten.append)

    def spec(n, session):
        return TaskSpec(task_id=f"t{n}", session_id=session, model_ref=MODEL, priority=Priority.INTERACTIVE, ctx=64,
                        max_tokens=8, deadline_ms=1000)
    assert tenancy.enter(spec(0, "s0"), "alice", 0.0) is None
    assert tenancy.session_owner("s0") is None  # not before admission took the task
    tenancy.admitted(spec(0, "s0"), "alice")
    refused = tenancy.enter(spec(1, "s-other"), "alice", 0.0)  # over her quota: nothing claimed
    assert refused.code == "QUOTA_EXCEEDED" and tenancy.session_owner("s-other") is None
    tenancy.ended("t0", 0.0)
    assert tenancy.enter(spec(7, "s-refused"), "bob", 0.0) is None
    tenancy.refused("t7", 0.0)  # admission refused it (a full queue, say): the id stays free
    assert tenancy.session_owner("s-refused") is None
    for n in range(1, 6):
        assert tenancy.enter(spec(n, f"s{n}"), "bob", 0.0) is None
        tenancy.admitted(spec(n, f"s{n}"), "bob")
        tenancy.ended(f"t{n}", 0.0)
    assert [tenancy.session_owner(f"s{n}") for n in range(6)] == [None, None, None, "bob", "bob", "bob"]
    assert forgotten == ["s0", "s1", "s2"]  # the core forgets them too: no session outlives its owner record
    assert tenancy.enter(spec(9, "s5"), "alice", 0.0).code == "SESSION_FORBIDDEN"


# -- quotas ---------------------------------------------------------------------------------------


async def test_the_concurrent_quota_is_a_429_naming_it_and_per_principal(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, tokens_per_s=20,
                           quotas=QuotaPolicy(concurrent_tasks=2))
    first, second = task(max_tokens=200), task(max_tokens=200)
    for body in (first, second):
        assert (await client.post("/v2/tasks", json=body, headers=ALICE)).status == 202
    resp = await client.post("/v2/tasks", json=task(), headers=ALICE)
    body = await resp.json()
    assert resp.status == 429 and body["code"] == "QUOTA_EXCEEDED" and body["policy_label"] == "concurrent_tasks"
    assert "concurrent tasks quota (2) reached" in body["message"] and body["retriable"] is True
    assert int(resp.headers["Retry-After"]) >= 1 and int(resp.headers["X-Backoff-Ms"]) >= 1
    assert (await client.post("/v2/tasks", json=task(), headers=BOB)).status == 202  # bob's slots are his
    assert (await client.post(f"/v2/tasks/{first['task_id']}/cancel", headers=ALICE)).status == 204
    assert client.driver.tenancy.quotas.running("alice") == 1
    assert (await client.post("/v2/tasks", json=task(), headers=ALICE)).status == 202
    metrics = await (await client.get("/metrics")).text()
    assert 'tasks_rejected_total{engine="llamacpp",reason="QUOTA_EXCEEDED"} 1.0' in metrics  # once, by its engine
    assert 'engine="unknown",reason="QUOTA_EXCEEDED"' not in metrics  # not counted a second time as a wire refusal
    assert "admission_backpressure_events_total{" not in metrics  # a principal's quota is not a full queue


async def test_the_tasks_per_minute_quota_counts_admitted_tasks_only(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, quotas=QuotaPolicy(tasks_per_minute=2))
    refused = await client.post("/v2/tasks", json=task(model_ref="file:/models/none.gguf"), headers=ALICE)
    assert refused.status == 503  # not admitted: no token spent
    for _ in range(2):
        assert (await client.post("/v2/tasks", json=task(), headers=ALICE)).status == 202
    resp = await client.post("/v2/tasks", json=task(), headers=ALICE)
    body = await resp.json()
    assert resp.status == 429 and body["policy_label"] == "tasks_per_minute"
    assert "tasks per minute quota (2) reached" in body["message"]
    assert 25 <= int(resp.headers["Retry-After"]) <= 31  # the next token, due 30 s after the first
    assert (await client.post("/v2/tasks", json=task(), headers=BOB)).status == 202


async def test_the_openai_routes_share_the_quotas_as_rate_limit_errors(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, tokens_per_s=20,
                           quotas=QuotaPolicy(concurrent_tasks=1))
    assert (await client.post("/v2/tasks", json=task(max_tokens=200), headers=ALICE)).status == 202
    resp = await client.post("/v1/chat/completions", headers=ALICE,
                             json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    error = (await resp.json())["error"]
    assert resp.status == 429 and error["type"] == "rate_limit_error" and error["code"] == "QUOTA_EXCEEDED"
    assert "concurrent tasks quota (1)" in error["message"] and int(resp.headers["retry-after-ms"]) >= 1
    assert (await client.post("/v1/completions", headers=BOB, json={"model": MODEL, "prompt": "x",
                                                                      "max_tokens": 2})).status == 200


async def _end(client, tid):
    await events_of(client, tid, ALICE)


async def _cancel(client, tid):
    assert (await client.post(f"/v2/tasks/{tid}/cancel", headers=ALICE)).status == 204


async def _disconnect(client, tid):
    # a reader that reads a little, then resets its connection: the last reader leaving cancels
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(f"GET /v2/tasks/{tid}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}\r\n\r\n".encode())
    await writer.drain()
    await reader.read(100)
    writer.transport.abort()


async def _shutdown(client, tid):
    await asyncio.wait_for(client.app.shutdown(), 10)


@pytest.mark.parametrize("outcome", [_end, _cancel, _disconnect, _shutdown], ids=lambda f: f.__name__[1:])
async def test_a_quota_slot_comes_back_once_whatever_ends_the_task(aiohttp_server, aiohttp_client, tmp_path, outcome):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, tokens_per_s=40, grace_s=0.2,
                           quotas=QuotaPolicy(concurrent_tasks=3))
    quotas = client.driver.tenancy.quotas
    body = task(max_tokens=60 if outcome is _end else 400)
    assert (await client.post("/v2/tasks", json=body, headers=ALICE)).status == 202
    assert quotas.running("alice") == 1 and quotas.holds(body["task_id"])
    await outcome(client, body["task_id"])
    await eventually(lambda: quotas.running("alice") == 0, timeout=10, what="the slot given back")
    assert not quotas.holds(body["task_id"]) and not client.driver.tenancy.ended(body["task_id"], 0.0)
    quotas.check_invariants()


async def test_a_task_evicted_by_drop_lru_gives_its_slot_back(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path, slots=1, tokens_per_s=20,
                           admission_capacity=1, admission_policy=QueuePolicy.DROP_LRU,
                           quotas=QuotaPolicy(concurrent_tasks=5))
    quotas = client.driver.tenancy.quotas
    running, queued, newcomer = task(max_tokens=300), task(max_tokens=300), task(max_tokens=300)
    for body in (running, queued):
        assert (await client.post("/v2/tasks", json=body, headers=ALICE)).status == 202
    assert quotas.running("alice") == 2
    assert (await client.post("/v2/tasks", json=newcomer, headers=BOB)).status == 202  # evicts alice's queued task
    events = await events_of(client, queued["task_id"], ALICE)
    assert events[-1][0] == "error" and events[-1][1]["code"] == "QUEUE_FULL_DROP_LRU"
    assert quotas.running("alice") == 1 and not quotas.holds(queued["task_id"]) and quotas.running("bob") == 1


async def test_undecodable_bytes_in_the_token_are_a_401_not_a_crash(aiohttp_server, aiohttp_client, tmp_path):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"GET /v2/pools HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe" + ALICE_KEY.encode()
                 + b"\r\nConnection: close\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401") and b"BAD_TOKEN" in answer


# -- OIDC through the app -------------------------------------------------------------------------


@pytest.fixture
async def issuer(aiohttp_server):
    issuer = await LoopbackIssuer().start(aiohttp_server)
    issuer.make_key("ec-1", "ES256")
    return issuer


async def test_an_oidc_subject_is_a_principal_beside_the_api_keys(aiohttp_server, aiohttp_client, tmp_path, issuer):
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path,
                           oidc=OidcSettings(issuer=issuer.url, audiences=(AUDIENCE,)))
    token = issuer.token(sub="alice")
    body = task()
    assert (await client.post("/v2/tasks", json=body, headers=auth(token))).status == 202
    assert client.driver.streams[body["task_id"]].owner == "oidc:alice"  # not the API key named alice
    assert (await client.get(f"/v2/tasks/{body['task_id']}/events", headers=ALICE)).status == 404
    assert (await events_of(client, body["task_id"], auth(token)))[-1][0] == "end"
    expired = issuer.token(sub="alice", exp=1_000_000)
    resp = await client.post("/v2/tasks", json=task(), headers=auth(expired))
    text = await resp.text()
    assert resp.status == 401 and orjson.loads(text)["code"] == "TOKEN_EXPIRED"
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"] and expired not in text
    wrong = await client.get("/v1/models", headers=auth(issuer.token(aud="other")))
    assert wrong.status == 401 and (await wrong.json())["error"]["code"] == "TOKEN_WRONG_AUDIENCE"
    assert (await client.get("/v2/pools", headers=auth("x" * 20))).status == 401  # neither a key nor a JWT


async def test_an_unreachable_issuer_is_a_503_for_tokens_and_keys_still_work(aiohttp_server, aiohttp_client,
                                                                             tmp_path, issuer):
    issuer.down = True
    client = await cluster(aiohttp_server, aiohttp_client, tmp_path,
                           oidc=OidcSettings(issuer=issuer.url, audiences=(AUDIENCE,)))
    resp = await client.post("/v2/tasks", json=task(), headers=auth(issuer.token()))
    body = await resp.json()
    assert resp.status == 503 and body["code"] == "AUTH_UNAVAILABLE" and body["retriable"] is True
    assert int(resp.headers["Retry-After"]) >= 1
    v1 = await client.get("/v1/models", headers=auth(issuer.token()))
    assert v1.status == 503 and (await v1.json())["error"]["type"] == "server_error"
    assert (await client.post("/v2/tasks", json=task(), headers=ALICE)).status == 202


# -- settings -------------------------------------------------------------------------------------


def test_client_auth_and_quota_settings_are_read_from_the_environment():
    s = OrchdSettings.from_env({
        "ORCHD_BIND_ADDR": "0.0.0.0:8080", "ORCHD_OIDC_ISSUER": "https://idp.example/realms/x",
        "ORCHD_OIDC_AUDIENCE": "llama-orch, other", "ORCHD_OIDC_ALGORITHMS": "ES256,PS256",
        "ORCHD_OIDC_LEEWAY_MS": "5000", "ORCHD_QUOTA_CONCURRENT_TASKS": "4", "ORCHD_QUOTA_TASKS_PER_MINUTE": "60",
        "ORCHD_API_KEYS": f"alice={ALICE_KEY},{BARE_KEY}"})
    assert s.oidc.issuer == "https://idp.example/realms/x" and s.oidc.audiences == ("llama-orch", "other")
    assert s.oidc.algorithms == ("ES256", "PS256") and s.oidc.leeway_s == 5.0
    assert s.quotas == QuotaPolicy(concurrent_tasks=4, tasks_per_minute=60)
    assert [k.principal for k in s.api_keys] == ["alice", derived_principal(BARE_KEY)]
    only_oidc = OrchdSettings.from_env({"ORCHD_BIND_ADDR": "0.0.0.0:8080", "ORCHD_OIDC_ISSUER": "https://idp.example",
                                        "ORCHD_OIDC_AUDIENCE": "a"})
    assert only_oidc.oidc is not None and only_oidc.api_keys == ()  # OIDC alone is client auth too


@pytest.mark.parametrize("env, words", [
    ({"ORCHD_OIDC_ISSUER": "https://idp.example"}, "ORCHD_OIDC_AUDIENCE"),
    ({"ORCHD_OIDC_AUDIENCE": "a"}, "ORCHD_OIDC_ISSUER"),
    ({"ORCHD_OIDC_ISSUER": "http://idp.example", "ORCHD_OIDC_AUDIENCE": "a"}, "ORCHD_OIDC_ISSUER='http://idp.example'"),
    ({"ORCHD_OIDC_ISSUER": "https://idp.example", "ORCHD_OIDC_AUDIENCE": "a", "ORCHD_OIDC_ALGORITHMS": "HS256"},
     "ORCHD_OIDC_ALGORITHMS"),
    ({"ORCHD_OIDC_ISSUER": "https://idp.example", "ORCHD_OIDC_AUDIENCE": "a", "ORCHD_OIDC_ALGORITHMS": "none"},
     "ORCHD_OIDC_ALGORITHMS"),
    ({"ORCHD_OIDC_ISSUER": "https://idp.example", "ORCHD_OIDC_AUDIENCE": "a", "ORCHD_OIDC_REQUIRED_CLAIMS": "exp"},
     "ORCHD_OIDC_REQUIRED_CLAIMS"),
    ({"ORCHD_OIDC_ISSUER": "https://idp.example", "ORCHD_OIDC_AUDIENCE": "a",
      "ORCHD_OIDC_REQUIRED_CLAIMS": "sub,iss,aud"}, "ORCHD_OIDC_REQUIRED_CLAIMS"),  # no exp: tokens that never expire
    ({"ORCHD_OIDC_ISSUER": "https://idp.example", "ORCHD_OIDC_AUDIENCE": "a", "ORCHD_OIDC_JWKS_MIN_REFRESH_MS": "0"},
     "ORCHD_OIDC_JWKS_MIN_REFRESH_MS"),
    ({"ORCHD_QUOTA_CONCURRENT_TASKS": "0"}, "ORCHD_QUOTA_CONCURRENT_TASKS"),
    ({"ORCHD_QUOTA_TASKS_PER_MINUTE": "lots"}, "ORCHD_QUOTA_TASKS_PER_MINUTE"),
    ({"ORCHD_API_KEYS": f"alice={ALICE_KEY},alice={BOB_KEY}"}, "principal 'alice'"),
    ({"ORCHD_API_KEYS": "key-x=" + ALICE_KEY}, "starts with 'key-'"),
])
def test_bad_client_auth_settings_stop_the_daemon_with_the_variable_named(env, words):
    with pytest.raises(ConfigError, match=words) as err:
        OrchdSettings.from_env(env)
    assert "\n" not in str(err.value)


def test_a_bad_api_key_setting_never_echoes_the_keys():
    secret = "s3cr3t-but-short"[:12]
    with pytest.raises(ConfigError) as err:
        OrchdSettings.from_env({"ORCHD_API_KEYS": f"{ALICE_KEY},{secret}"})
    message = str(err.value)
    assert message.startswith("ORCHD_API_KEYS") and "entry 2" in message and "at least 16" in message
    assert secret not in message and ALICE_KEY not in message
