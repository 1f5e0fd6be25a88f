"""Discovery against real pool-managerd apps with mock engines: updates, loss, removal."""

import pytest
from aiohttp import web
from support import eventually

from llama_orch.core.events import PoolLost, PoolRemoved, PoolUpdated
from llama_orch.io.config import PoolManagerSettings
from llama_orch.io.orchestratord.discovery import PoolDiscovery, snapshot_from_status
from llama_orch.io.handoff import Handoff, write_handoff
from llama_orch.io.provisioner.mock_engine import MockConfig
from llama_orch.io.provisioner.mock_engine import create_app as mock_engine_app
from llama_orch.io.pool_managerd.manager import create_app as pool_managerd_app


def test_snapshot_from_the_contract_status_shape():
    status = {"pool_id": "pool-0", "live": True, "ready": True, "draining": False, "slots_total": 4, "slots_free": 9,
              "active_leases": 2, "engine": "llamacpp", "engine_version": "b1234", "engine_url": "http://10.0.0.5:41231",
              "device_mask": "0", "vram_total_bytes": 24_000_000_000, "vram_free_bytes": 18_000_000_000,
              "model_ref": "file:/models/x.gguf", "last_error": None}
    snap = snapshot_from_status(status, "http://gpu-1:9200")
    assert (snap.pool_id, snap.ready, snap.slots_total, snap.slots_free) == ("pool-0", True, 4, 4)
    assert snap.vram_free_bytes == 18_000_000_000 and snap.manager_url == "http://gpu-1:9200"
    with pytest.raises(KeyError):
        snapshot_from_status({"ready": True}, "http://x")


async def test_discovery_follows_a_pool_managerd(aiohttp_server, tmp_path):
    engine = await aiohttp_server(mock_engine_app(MockConfig(slots=2)))
    settings = PoolManagerSettings(runtime_dir=tmp_path / "engines", watch_interval_ms=20, health_interval_ms=30,
                                   provisioner_url=None, node_id="n1")
    pmd = await aiohttp_server(pool_managerd_app(settings))
    events = []
    pmd_url = str(pmd.make_url("")).rstrip("/")
    disc = PoolDiscovery([pmd_url], events.append, interval_ms=30, timeout_ms=300)
    await disc.start()
    try:
        write_handoff(tmp_path / "engines", Handoff(pool_id="pool-0", replica_id="r0", url=str(engine.make_url("")).rstrip("/"),
                                                    slots_total=2, model_id="file:/m/tiny.gguf"))

        async def ready_seen():
            return any(isinstance(e, PoolUpdated) and e.snapshot.ready for e in events)
        await eventually(ready_seen, what="a ready PoolUpdated")
        snap = next(e.snapshot for e in events if isinstance(e, PoolUpdated) and e.snapshot.ready)
        assert snap.slots_total == 2 and snap.model_ref == "file:/m/tiny.gguf" and snap.engine_url.startswith("http://")
        assert disc.owner_of("pool-0").reachable
        await pmd.close()  # the manager goes away: nothing is said of its pools (they go stale in the core)
        seen = len(events)

        async def unreachable():
            return not disc.managers[pmd_url].reachable
        await eventually(unreachable, what="the manager marked unreachable")
        assert disc.managers[pmd_url].last_error
        await disc.poll_all()
        await disc.poll_all()
        # no PoolLost: the engine may be fine, and streams running on it must go on
        assert not [e for e in events[seen:] if not isinstance(e, PoolUpdated)] and len(events) == seen
    finally:
        await disc.stop()


async def test_a_pool_no_longer_listed_is_removed(aiohttp_server):
    listing = {"pools": [{"pool_id": "a", "ready": True, "slots_total": 1}, {"pool_id": "b", "ready": True, "slots_total": 1}]}

    async def pools(request):
        return web.json_response(listing)
    app = web.Application()
    app.router.add_get("/v2/pools", pools)
    server = await aiohttp_server(app)
    events = []
    disc = PoolDiscovery([str(server.make_url(""))], events.append, interval_ms=10_000)
    await disc.start()
    listing["pools"].pop()
    await disc.poll_all()
    await disc.stop()
    assert [type(e).__name__ for e in events] == ["PoolUpdated", "PoolUpdated", "PoolRemoved", "PoolUpdated"]
    assert events[2] == PoolRemoved(pool_id="b")


async def _listing_server(aiohttp_server, listing):
    async def pools(request):
        return web.json_response(listing)
    app = web.Application()
    app.router.add_get("/v2/pools", pools)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def test_a_pool_id_served_by_another_manager_is_ignored_not_taken_over(aiohttp_server):
    first = await _listing_server(aiohttp_server, {"pools": [{"pool_id": "p", "ready": True, "slots_total": 1,
                                                              "engine_url": "http://honest:1"}]})
    second = await _listing_server(aiohttp_server, {"pools": [{"pool_id": "p", "ready": True, "slots_total": 1,
                                                               "engine_url": "http://stray:1"},
                                                              {"pool_id": "q", "ready": True, "slots_total": 1}]})
    events = []
    disc = PoolDiscovery([first], events.append, interval_ms=10_000)
    await disc.start()
    try:
        disc.add_manager(second)
        for _ in range(2):
            await disc.poll_all()
        urls = {e.snapshot.engine_url for e in events if isinstance(e, PoolUpdated) and e.snapshot.pool_id == "p"}
        assert urls == {"http://honest:1"}  # the stray listing never replaced the first owner's engine
        assert {e.snapshot.pool_id for e in events if isinstance(e, PoolUpdated)} == {"p", "q"}
        assert "p" in disc.managers[second].last_error and disc.owner_of("p").url == first
    finally:
        await disc.stop()


async def test_configured_managers_survive_a_deregistration_of_the_same_url(aiohttp_server):
    url = await _listing_server(aiohttp_server, {"pools": [{"pool_id": "p", "ready": True, "slots_total": 1}]})
    events = []
    disc = PoolDiscovery([url], events.append, interval_ms=10_000)
    await disc.start()
    try:
        disc.remove_manager(url)  # a node that registered with the configured URL goes away
        assert url in disc.managers and not any(isinstance(e, PoolRemoved) for e in events)
    finally:
        await disc.stop()


async def test_a_pool_handed_over_stays_with_its_new_owner_when_the_old_one_returns(aiohttp_server):
    listing_a = {"pools": [{"pool_id": "p", "ready": True, "slots_total": 1, "engine_url": "http://a:1"}]}
    listing_b = {"pools": [{"pool_id": "p", "ready": True, "slots_total": 1, "engine_url": "http://b:1"}]}
    up = {"a": True}

    async def pools_a(request):
        if not up["a"]:
            return web.json_response({}, status=503)
        return web.json_response(listing_a)
    app = web.Application()
    app.router.add_get("/v2/pools", pools_a)
    a = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    b = await _listing_server(aiohttp_server, listing_b)
    events = []
    disc = PoolDiscovery([a, b], events.append, interval_ms=10_000)
    await disc.start()
    try:
        assert disc.owner_of("p").url == a
        up["a"] = False
        await disc.poll_all()  # a is down: p lost, then b (which lists it too) takes over
        await disc.poll_all()
        assert disc.owner_of("p").url == b
        up["a"] = True
        events.clear()
        for _ in range(2):
            await disc.poll_all()  # a is back: b keeps p, and nobody loses or removes it
        assert disc.owner_of("p").url == b
        assert not [e for e in events if isinstance(e, (PoolLost, PoolRemoved))], events
        assert {e.snapshot.engine_url for e in events if isinstance(e, PoolUpdated)} == {"http://b:1"}
        disc.suspend(a, "stale")  # a's node going stale says nothing about b's pool
        disc.remove_manager(a)
        assert not [e for e in events if isinstance(e, (PoolLost, PoolRemoved))], events
    finally:
        await disc.stop()


async def test_a_manager_that_never_answers_does_not_slow_the_polls_of_the_others(aiohttp_server):
    """A stopped pool-managerd makes every poll of it wait its whole timeout: the healthy one must
    still be polled every interval, or its pools go stale too (every task refused for one
    silent machine, seen on the namespace lab with SIGSTOP)."""
    import asyncio

    hung = asyncio.Event()

    async def never(request):
        await hung.wait()
        return web.json_response({"pools": []})

    silent_app = web.Application()
    silent_app.router.add_get("/v2/pools", never)
    silent = await aiohttp_server(silent_app)
    polls = []

    async def listing(request):
        polls.append(asyncio.get_running_loop().time())
        return web.json_response({"pools": []})

    healthy_app = web.Application()
    healthy_app.router.add_get("/v2/pools", listing)
    healthy = await aiohttp_server(healthy_app)
    disc = PoolDiscovery([str(silent.make_url("")), str(healthy.make_url(""))], lambda e: None,
                         interval_ms=50, timeout_ms=1000)
    start_task = asyncio.ensure_future(disc.start())  # its first round waits for the silent one
    try:
        await eventually(lambda: len(polls) >= 12, what="12 polls of the healthy manager", timeout=5)
        gaps = [b - a for a, b in zip(polls[1:], polls[2:])]
        # every 50 ms, never one silent manager's 1,000 ms timeout
        assert max(gaps) < 0.5, gaps
    finally:
        hung.set()
        await start_task
        await disc.stop()
