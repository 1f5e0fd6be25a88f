"""Client authentication: API keys as bearer tokens on orchestratord, presented by pool-managerd too."""

import pytest
from cluster_support import free_port
from support import eventually

from llama_orch.core.orchestrator import OrchestratorConfig
from llama_orch.io.config import ConfigError, OrchdSettings, PoolManagerSettings
from llama_orch.io.handoff import Handoff, write_handoff
from llama_orch.io.provisioner.mock_engine import MockConfig
from llama_orch.io.provisioner.mock_engine import create_app as mock_engine_app
from llama_orch.io.orchestratord.app import create_app
from llama_orch.io.pool_managerd.manager import create_app as pool_managerd_app

KEY = "k" * 24
OTHER = "o" * 24
MODEL = "file:/models/tiny.gguf"


async def test_api_keys_guard_client_routes_and_leave_probes_open(aiohttp_client):
    client = await aiohttp_client(create_app(OrchestratorConfig(), [], api_keys=(KEY, OTHER)))
    missing = await client.post("/v2/tasks", json={})
    assert missing.status == 401 and (await missing.json())["code"] == "MISSING_TOKEN"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer") and missing.headers["X-Correlation-Id"]
    wrong = await client.get("/v2/pools", headers={"Authorization": "Bearer " + "x" * 24})
    assert wrong.status == 401 and (await wrong.json())["code"] == "BAD_TOKEN"
    basic = await client.get("/v2/pools", headers={"Authorization": "Basic abc"})
    assert basic.status == 401 and (await basic.json())["code"] == "BAD_TOKEN"
    openai_shape = await client.get("/v1/models")
    assert openai_shape.status == 401 and (await openai_shape.json())["error"]["code"] == "MISSING_TOKEN"
    for key in (KEY, OTHER):
        ok = await client.get("/v2/pools", headers={"Authorization": f"Bearer {key}"})
        assert ok.status == 200
    for path in ("/livez", "/metrics", "/openapi.json", "/v2/meta/version"):
        assert (await client.get(path)).status == 200, path
    assert (await client.get("/readyz")).status == 503  # open, and honest: no pools
    assert (await client.post("/v2/nodes/register", json={"node_id": "n", "base_url": "http://a:1"})).status == 401


async def test_pool_managerd_presents_its_key_to_register(aiohttp_server, aiohttp_client, tmp_path):
    engine = await aiohttp_server(mock_engine_app(MockConfig(slots=1)))
    orchd = await aiohttp_server(create_app(OrchestratorConfig(), [], poll_interval_ms=30, api_keys=(KEY,)))
    client = await aiohttp_client(orchd)
    write_handoff(tmp_path / "engines", Handoff(pool_id="pool-k", replica_id="r0", url=str(engine.make_url("")).rstrip("/"),
                                                slots_total=1, model_id=MODEL))
    port = free_port()
    await aiohttp_server(pool_managerd_app(PoolManagerSettings(
        runtime_dir=tmp_path / "engines", watch_interval_ms=20, health_interval_ms=30, provisioner_url=None,
        node_id="w1", orchestratord_url=str(orchd.make_url("")).rstrip("/"), advertise_url=f"http://127.0.0.1:{port}",
        orchestratord_api_key=KEY)), port=port)
    auth = {"Authorization": f"Bearer {KEY}"}

    async def registered():
        nodes = (await (await client.get("/v2/nodes", headers=auth)).json())["nodes"]
        return [n["node_id"] for n in nodes] == ["w1"]
    await eventually(registered, what="pool-managerd registered with its API key")


@pytest.mark.parametrize("env, words", [
    ({"ORCHD_BIND_ADDR": "0.0.0.0:8080"}, "needs client auth"),
    ({"ORCHD_API_KEYS": "short"}, "at least 16 characters"),
    ({"ORCHD_OIDC_ISSUER": "https://issuer.example"}, "ORCHD_OIDC_AUDIENCE is not"),
])
def test_auth_settings_are_checked_at_start(env, words):
    with pytest.raises(ConfigError, match=words):
        OrchdSettings.from_env(env)


def test_a_public_bind_with_keys_is_allowed():
    s = OrchdSettings.from_env({"ORCHD_BIND_ADDR": "0.0.0.0:8080", "ORCHD_API_KEYS": f"{KEY}, {OTHER}"})
    assert tuple(k.key for k in s.api_keys) == (KEY, OTHER) and s.host == "0.0.0.0"
