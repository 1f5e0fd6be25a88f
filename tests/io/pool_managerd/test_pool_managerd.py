"""pool-managerd in process, against mock engines on loopback: watcher, registry, health, API."""

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from support import eventually

from llama_orch.io.config import ConfigError, PoolManagerSettings
from llama_orch.io.handoff import Handoff, write_handoff
from llama_orch.io.provisioner.mock_engine import MockConfig
from llama_orch.io.provisioner.mock_engine import create_app as mock_engine_app
from llama_orch.io.pool_managerd.manager import MANAGER, create_app


def settings(tmp_path: Path, **kw) -> PoolManagerSettings:
    base = dict(runtime_dir=tmp_path / "engines", watch_interval_ms=20, health_interval_ms=30, health_timeout_ms=500,
                stale_after_misses=2, provisioner_url=None, node_id="node-test")
    base.update(kw)
    return PoolManagerSettings(**base)


async def engine(aiohttp_server, **kw):
    return await aiohttp_server(mock_engine_app(MockConfig(**kw)))


def handoff_for(server, pool_id="pool-0", **kw) -> Handoff:
    base = dict(pool_id=pool_id, replica_id="r0", url=str(server.make_url("")).rstrip("/"), engine_version="mock",
                provisioning_mode="mock", model_id="file:/models/tiny.gguf", model_path="/models/tiny.gguf",
                slots_total=2, device_mask="", pid=None)
    base.update(kw)
    return Handoff(**base)


async def status(client, pool_id="pool-0"):
    resp = await client.get(f"/v2/pools/{pool_id}/status")
    return await resp.json() if resp.status == 200 else None


async def test_handoff_makes_a_ready_pool_with_the_engines_slots(aiohttp_server, aiohttp_client, tmp_path):
    eng = await engine(aiohttp_server, slots=3, ctx=1024)
    client = await aiohttp_client(create_app(settings(tmp_path)))
    path = write_handoff(tmp_path / "engines", handoff_for(eng))
    st = await eventually(lambda: _ready(client), what="pool ready")
    assert st["slots_total"] == 3 and st["slots_free"] == 3 and st["ctx_max"] == 1024
    assert st["engine_url"] == handoff_for(eng).url and st["model_ref"] == "file:/models/tiny.gguf"
    assert st["last_error"] is None and st["vram_total_bytes"] > 0  # CPU pool: system memory here
    assert not path.exists()  # auto-deleted once processed
    listing = await (await client.get("/v2/pools")).json()
    assert [p["pool_id"] for p in listing["pools"]] == ["pool-0"] and listing["devices"]


async def _ready(client, pool_id="pool-0"):
    st = await status(client, pool_id)
    return st if st and st["ready"] else None


async def test_slots_free_drops_while_a_completion_runs(aiohttp_server, aiohttp_client, tmp_path):
    eng = await engine(aiohttp_server, slots=2, tokens_per_s=40)
    client = await aiohttp_client(create_app(settings(tmp_path)))
    write_handoff(tmp_path / "engines", handoff_for(eng))
    await eventually(lambda: _ready(client))
    engine_client = await aiohttp_client(eng)
    job = asyncio.ensure_future(engine_client.post("/completion", json={"prompt": "x", "n_predict": 30}))

    async def busy():
        st = await status(client)
        return st["slots_free"] == 1 and st["active_leases"] == 1
    await eventually(busy, what="slots_free to drop")
    await job

    async def idle():
        return (await status(client))["slots_free"] == 2
    await eventually(idle, what="slots_free to recover")


async def test_malformed_handoffs_are_counted_and_named_and_harmless(aiohttp_server, aiohttp_client, tmp_path):
    eng = await engine(aiohttp_server)
    client = await aiohttp_client(create_app(settings(tmp_path)))
    (tmp_path / "engines" / "broken-r0.json").write_text('{"pool_id": "broken", "url": ')
    (tmp_path / "engines" / "nourl-r0.json").write_text('{"pool_id": "nourl"}')

    async def counted():
        text = await (await client.get("/metrics")).text()
        return 'pool_handoff_files_processed_total{outcome="malformed",pool_id="broken-r0"} 1.0' in text and text
    text = await eventually(counted, what="malformed handoff counted")
    assert 'outcome="malformed",pool_id="nourl-r0"' in text
    health = await (await client.get("/health")).json()
    assert health["malformed_handoffs"] == ["broken-r0.json", "nourl-r0.json"]
    write_handoff(tmp_path / "engines", handoff_for(eng))
    await eventually(lambda: _ready(client))  # the daemon carries on


async def test_unknown_pool_gets_the_404_envelope(aiohttp_client, tmp_path):
    client = await aiohttp_client(create_app(settings(tmp_path)))
    resp = await client.get("/v2/pools/nope/status")
    assert resp.status == 404
    assert await resp.json() == {"code": "POOL_NOT_FOUND", "message": "pool nope not found"}


async def test_a_dead_engine_makes_the_pool_unready_then_a_new_handoff_recovers(aiohttp_server, aiohttp_client, tmp_path):
    eng = await engine(aiohttp_server)
    client = await aiohttp_client(create_app(settings(tmp_path)))
    write_handoff(tmp_path / "engines", handoff_for(eng))
    await eventually(lambda: _ready(client))
    await eng.close()

    async def unready():
        st = await status(client)
        return st if not st["ready"] and st["last_error"] else None
    st = await eventually(unready, what="pool unready")
    assert st["state"] == "unready" and "health check failed" in st["last_error"] and st["slots_free"] == 0
    replacement = await engine(aiohttp_server, slots=4)
    write_handoff(tmp_path / "engines", handoff_for(replacement, pid=4242))
    st = await eventually(lambda: _ready(client), what="pool ready again")
    assert st["engine_url"] == handoff_for(replacement).url and st["slots_total"] == 4 and st["last_error"] is None


async def test_drain_stops_the_pool_once_idle(aiohttp_server, aiohttp_client, tmp_path):
    eng = await engine(aiohttp_server)
    client = await aiohttp_client(create_app(settings(tmp_path)))
    write_handoff(tmp_path / "engines", handoff_for(eng))
    await eventually(lambda: _ready(client))
    resp = await client.post("/v2/pools/pool-0/drain", json={"deadline_ms": 5000})
    assert resp.status == 202
    body = await resp.json()
    assert body["pool_id"] == "pool-0" and body["state"] in ("draining", "drained")

    async def drained():
        st = await status(client)
        return st if st["state"] == "drained" else None
    st = await eventually(drained, what="pool drained")
    assert st["ready"] is False and st["draining"] is False
    bad = await client.post("/v2/pools/pool-0/drain", json={"deadline_ms": "soon"})
    assert bad.status == 400 and "deadline_ms" in (await bad.json())["message"]


async def test_pool_ready_callback_arrives(aiohttp_server, aiohttp_client, tmp_path):
    received = []

    async def callback(request):
        received.append(await request.json())
        return web.json_response({}, status=202 if len(received) > 1 else 500)  # the first try fails

    orchd = web.Application()
    orchd.router.add_post("/callbacks/pool-ready", callback)
    orchd_server = await aiohttp_server(orchd)
    eng = await engine(aiohttp_server)
    cfg = settings(tmp_path, callback_url=str(orchd_server.make_url("/callbacks/pool-ready")))
    await aiohttp_client(create_app(cfg))
    write_handoff(tmp_path / "engines", handoff_for(eng))

    async def arrived():
        return len(received) >= 2
    await eventually(arrived, what="callback retried and accepted")
    assert received[-1]["pool_id"] == "pool-0" and received[-1]["node_id"] == "node-test"


class HeldHealth:
    """A mock engine whose /health answers only when released: a switch to it stays in flight."""

    def __init__(self) -> None:
        self.asked, self.answer = asyncio.Event(), asyncio.Event()

    async def server(self, aiohttp_server):
        @web.middleware
        async def held(request, handler):
            if request.path == "/health" and not self.answer.is_set():
                self.asked.set()
                await self.answer.wait()
            return await handler(request)
        app = mock_engine_app(MockConfig())
        app.middlewares.append(held)
        return await aiohttp_server(app)


async def _switch_done(client):
    return not any(t.get_coro().__qualname__.endswith("_switch") for t in client.app[MANAGER]._tasks)


async def test_a_reload_is_announced_even_when_news_of_the_new_engine_lands_during_the_switch(
        aiohttp_server, aiohttp_client, tmp_path):
    # The provisioner writes the new engine's handoff, then again once it is ready: the second
    # write must not make pool-managerd give up switching to the engine the first one named.
    received = []

    async def callback(request):
        received.append(await request.json())
        return web.json_response({}, status=202)

    orchd = web.Application()
    orchd.router.add_post("/callbacks/pool-ready", callback)
    orchd_server = await aiohttp_server(orchd)
    old, held = await engine(aiohttp_server), HeldHealth()
    new = await held.server(aiohttp_server)
    cfg = settings(tmp_path, callback_url=str(orchd_server.make_url("/callbacks/pool-ready")),
                   health_interval_ms=60_000, health_timeout_ms=30_000)  # the held check must not time out
    client = await aiohttp_client(create_app(cfg))
    write_handoff(tmp_path / "engines", handoff_for(old, pid=1))
    await eventually(lambda: _ready(client))
    await eventually(lambda: len(received) == 1, what="the first callback")
    path = write_handoff(tmp_path / "engines", handoff_for(new, pid=2))
    await asyncio.wait_for(held.asked.wait(), 10)  # the switch is checking the new engine now
    await eventually(lambda: not path.exists(), what="the first handoff read")
    path = write_handoff(tmp_path / "engines", handoff_for(new, pid=2, notice="ready"))
    await eventually(lambda: not path.exists(), what="the rewrite read")
    held.answer.set()
    await eventually(lambda: len(received) == 2, what="the callback announcing the new engine")
    st = await _ready(client)
    assert st["engine_url"] == handoff_for(new).url and st["engine_pid"] == 2


async def test_a_drain_during_a_switch_is_not_undone_by_it(aiohttp_server, aiohttp_client, tmp_path):
    # Seen end to end: the switch's health check answered after the drain, and the drained pool
    # came back as starting, then unready once the provisioner had stopped the engine.
    old, held = await engine(aiohttp_server), HeldHealth()
    new = await held.server(aiohttp_server)
    client = await aiohttp_client(create_app(settings(tmp_path, health_interval_ms=60_000, health_timeout_ms=30_000)))
    write_handoff(tmp_path / "engines", handoff_for(old, pid=1))
    await eventually(lambda: _ready(client))
    write_handoff(tmp_path / "engines", handoff_for(new, pid=2))
    await asyncio.wait_for(held.asked.wait(), 10)
    drain = await client.post("/v2/pools/pool-0/drain", json={"deadline_ms": 0})
    assert drain.status == 202 and (await drain.json())["state"] == "drained"
    held.answer.set()
    await eventually(lambda: _switch_done(client), what="the switch to finish")
    st = await status(client)
    assert st["state"] == "drained" and st["ready"] is False



async def test_reload_without_a_provisioner_is_a_clear_503(aiohttp_server, aiohttp_client, tmp_path):
    eng = await engine(aiohttp_server)
    client = await aiohttp_client(create_app(settings(tmp_path, provisioner_url="http://127.0.0.1:9")))
    write_handoff(tmp_path / "engines", handoff_for(eng))
    await eventually(lambda: _ready(client))
    resp = await client.post("/v2/pools/pool-0/reload", json={"new_model_ref": "file:/m/other.gguf"})
    assert resp.status == 503 and (await resp.json())["code"] == "PROVISIONER_UNAVAILABLE"
    resp = await client.post("/v2/pools/pool-0/reload", json={})
    assert resp.status == 400 and "new_model_ref" in (await resp.json())["message"]


async def test_metrics_expose_the_contract_names(aiohttp_server, aiohttp_client, tmp_path):
    eng = await engine(aiohttp_server, slots=2)
    client = await aiohttp_client(create_app(settings(tmp_path)))
    write_handoff(tmp_path / "engines", handoff_for(eng))
    await eventually(lambda: _ready(client))
    text = await (await client.get("/metrics")).text()
    for line in ('pool_ready{pool_id="pool-0"} 1.0', 'pool_slots_total{pool_id="pool-0"} 2.0',
                 'pool_health_checks_total{outcome="ok",pool_id="pool-0"}', "pool_vram_total_bytes",
                 "pool_handoff_processing_duration_ms_bucket", "vram_used_bytes"):
        assert line in text, line


@pytest.mark.parametrize("env, message", [
    ({"POOL_MANAGERD_BIND_ADDR": "nohost"}, "POOL_MANAGERD_BIND_ADDR='nohost': expected HOST:PORT"),
    ({"POOL_MANAGERD_WATCH_INTERVAL_MS": "fast"}, "POOL_MANAGERD_WATCH_INTERVAL_MS='fast': expected an integer"),
    ({"POOL_MANAGERD_AUTO_DELETE_HANDOFF": "maybe"}, "expected true or false"),
    ({"POOL_MANAGERD_ORCHESTRATORD_CALLBACK_URL": "orchd:8080"}, "expected an http(s) URL"),
])
def test_bad_settings_are_named(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PoolManagerSettings.from_env(env)


def test_the_first_of_two_names_wins():
    s = PoolManagerSettings.from_env({"POOL_MANAGERD_BIND_ADDR": "127.0.0.1:9300", "POOL_MANAGERD_ADDR": "0.0.0.0:1"})
    assert (s.host, s.port) == ("127.0.0.1", 9300)
    s = PoolManagerSettings.from_env({"POOL_MANAGERD_ADDR": "127.0.0.2:9201"})
    assert (s.host, s.port) == ("127.0.0.2", 9201)


async def test_a_failed_provisioning_shows_as_a_failed_pool_with_its_cause(aiohttp_server, aiohttp_client, tmp_path):
    eng = await engine(aiohttp_server)
    client = await aiohttp_client(create_app(settings(tmp_path)))
    failed = Handoff(pool_id="pool-0", replica_id="r0", url="", error="model file /m/x.gguf does not exist")
    write_handoff(tmp_path / "engines", failed)

    async def shown():
        st = await status(client)
        return st if st and st["state"] == "failed" else None
    st = await eventually(shown, what="failed pool listed")
    assert st["ready"] is False and st["last_error"] == "model file /m/x.gguf does not exist"
    write_handoff(tmp_path / "engines", handoff_for(eng))  # a later successful provisioning
    assert (await eventually(lambda: _ready(client)))["last_error"] is None
    write_handoff(tmp_path / "engines", failed)  # and a failed reprovisioning of a ready pool
    assert (await eventually(shown))["last_error"].startswith("model file")
