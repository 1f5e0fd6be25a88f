"""The hot path makes no reference cycles, which is what lets the daemon run its garbage collector
rarely (``daemon.settle_gc``): a finished task's objects go by reference counting alone, so
collections stay short and rare however long the daemon runs. Checked with the collector off
and ``DEBUG_SAVEALL``: what a collection finds afterwards is exactly the cyclic garbage made.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import uuid

import aiohttp
import pytest
from aiohttp import web

from llama_orch.core.events import PoolUpdated
from llama_orch.core.orchestrator import OrchestratorConfig
from llama_orch.core.types import PoolSnapshot
from llama_orch.io.bench.fast_engine import FastEngineConfig, serve
from llama_orch.io.orchestratord.app import create_app
from llama_orch.io.orchestratord.driver import DRIVER

MODEL = "fast.gguf"


def _v2_body() -> dict:
    return {"task_id": str(uuid.uuid4()), "session_id": str(uuid.uuid4()), "workload": "completion",
            "model_ref": MODEL, "engine": "llamacpp", "ctx": 8192, "priority": "interactive", "max_tokens": 50,
            "deadline_ms": 60_000, "prompt": "a prompt of a few words"}


async def _cyclic_garbage(one, tasks: int) -> collections.Counter:
    for _ in range(20):  # warm: first-use caches, pooled connections
        await one()
    gc.collect()
    gc.disable()
    try:
        await asyncio.gather(*(one() for _ in range(tasks)))
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return collections.Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.parametrize("front_door", ["v2", "v1"])
async def test_completed_tasks_leave_no_reference_cycles(front_door: str) -> None:
    engine = await serve(FastEngineConfig(port=0, slots=64))
    app = create_app(OrchestratorConfig(admission_capacity=4096, pool_stale_ms=3_600_000, metrics_interval_ms=1000), [])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        app[DRIVER].handle(PoolUpdated(snapshot=PoolSnapshot(
            pool_id="pool-0", ready=True, slots_total=64, slots_free=64, model_ref=MODEL, engine="llamacpp",
            engine_url=engine.url, vram_total_bytes=24 << 30, vram_free_bytes=8 << 30, ctx_max=8192,
            replica_id="r0")))
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as session:
            async def one() -> None:
                if front_door == "v2":
                    async with session.post(url + "/v2/tasks", json=_v2_body()) as resp:
                        assert resp.status == 202
                        task_id = (await resp.json())["task_id"]
                    async with session.get(f"{url}/v2/tasks/{task_id}/events") as resp:
                        assert b"event: end" in await resp.read()
                else:
                    async with session.post(url + "/v1/completions", json={
                            "model": MODEL, "prompt": "a prompt", "max_tokens": 50, "stream": True}) as resp:
                        assert (await resp.read()).endswith(b"data: [DONE]\n\n")

            garbage = await _cyclic_garbage(one, 300)
        # The client's side runs in this process too; a handful of objects is slack for it, not a
        # per-task leak (300 tasks with one cycle each would be hundreds).
        assert sum(garbage.values()) < 30, garbage.most_common(10)
    finally:
        await runner.cleanup()
        await engine.stop()


async def test_the_daemon_runs_full_collections_only_when_idle() -> None:
    """With the daemon's GC settings a full collection is never started by allocation; the driver
    runs one once nothing has been in flight for a second, and it is not counted as a pause."""
    from support import eventually

    engine = await serve(FastEngineConfig(port=0, slots=4))
    app = create_app(OrchestratorConfig(admission_capacity=16, pool_stale_ms=3_600_000), [])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        driver = app[DRIVER]
        driver.collect_when_idle = True
        driver.handle(PoolUpdated(snapshot=PoolSnapshot(
            pool_id="pool-0", ready=True, slots_total=4, slots_free=4, model_ref=MODEL, engine="llamacpp",
            engine_url=engine.url, vram_total_bytes=24 << 30, vram_free_bytes=8 << 30, ctx_max=8192, replica_id="r0")))
        idle_collections = driver.metrics.gc_idle._value.get
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v2/tasks", json=_v2_body()) as resp:
                task_id = (await resp.json())["task_id"]
            assert not driver.idle.is_set() and idle_collections() == 0  # in flight: no collection
            async with session.get(f"{url}/v2/tasks/{task_id}/events") as resp:
                assert b"event: end" in await resp.read()
        await eventually(lambda: idle_collections() == 1, what="a full collection once idle", timeout=10)
        assert driver.metrics.gc_pause_max._value.get() < 1.0  # the idle collection is not a pause under load
    finally:
        await runner.cleanup()
        await engine.stop()
