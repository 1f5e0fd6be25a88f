"""A cluster whose metrics are worth reading: orchestratord, a pool-managerd that sees three fake
NVIDIA GPUs (two pools on devices 0 and 1, device 2 unused) and two mock engines, in process on
loopback; ``busy_scrapes`` runs a little of everything through it and returns both scrapes."""

from __future__ import annotations

from types import SimpleNamespace

import orjson
from support import eventually, task_body

from llama_orch.core.orchestrator import OrchestratorConfig
from llama_orch.ext.sse import SSEParser
from llama_orch.io.config import PoolManagerSettings
from llama_orch.io.handoff import Handoff, write_handoff
from llama_orch.io.orchestratord.app import create_app as orchestratord_app
from llama_orch.io.orchestratord.driver import DRIVER
from llama_orch.io.pool_managerd.gpu import GpuDiscovery
from llama_orch.io.pool_managerd.manager import create_app as pool_managerd_app
from llama_orch.io.provisioner.mock_engine import MockConfig
from llama_orch.io.provisioner.mock_engine import create_app as mock_engine_app

MODEL = "file:/models/tiny.gguf"
GIB = 1 << 30


class FakeNVMLError(Exception):
    pass


class FakeNVML:
    """The pynvml surface ``gpu.GpuDiscovery`` uses, over a list of device dicts."""

    NVMLError = FakeNVMLError

    def __init__(self, devices) -> None:
        self.devices = list(devices)

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int):
        return index

    def nvmlDeviceGetName(self, handle) -> str:
        return self.devices[handle]["name"]

    def nvmlDeviceGetUUID(self, handle) -> str:
        return f"GPU-{handle:08d}-fake"

    def nvmlDeviceGetMemoryInfo(self, handle):
        d = self.devices[handle]
        return SimpleNamespace(total=d["total"], free=d["free"], used=d["total"] - d["free"])

    def nvmlDeviceGetUtilizationRates(self, handle):
        util = self.devices[handle].get("util")
        if util is None:
            raise FakeNVMLError("Not Supported")
        return SimpleNamespace(gpu=util, memory=0)


def fake_gpus() -> GpuDiscovery:
    return GpuDiscovery(nvml=FakeNVML([
        {"name": "NVIDIA H100", "total": 80 * GIB, "free": 60 * GIB, "util": 71},
        {"name": "NVIDIA H100", "total": 80 * GIB, "free": 70 * GIB, "util": 12},
        {"name": "NVIDIA H100", "total": 80 * GIB, "free": 80 * GIB, "util": None},  # utilisation not supported
    ]))


def task(**kw) -> dict:
    return task_body(MODEL, **{"ctx": 1024, "prompt": "hello there", **kw})


async def events_of(client, task_id: str) -> list[tuple[str, dict]]:
    resp = await client.get(f"/v2/tasks/{task_id}/events")
    parser, out = SSEParser(), []
    async for chunk in resp.content.iter_any():
        out += [(name, orjson.loads(data)) for name, data in parser.feed(chunk)]
    return out


async def gpu_cluster(aiohttp_server, aiohttp_client, tmp_path, *, slots: int = 2, tokens_per_s: float = 2000.0,
                      **cfg):
    """orchestratord (the test client) polling a pool-managerd (``client.pmd``) with fake GPUs and two
    mock engines: ``pool-0`` (device 0, ``client.engines[0]``) and ``pool-1`` (device 1)."""
    engines = [await aiohttp_server(mock_engine_app(MockConfig(slots=slots, ctx=1024, tokens_per_s=tokens_per_s)))
               for _ in range(2)]
    pmd = await aiohttp_server(pool_managerd_app(PoolManagerSettings(
        runtime_dir=tmp_path / "engines", watch_interval_ms=20, health_interval_ms=30, provisioner_url=None),
        gpu=fake_gpus()))
    for i, engine in enumerate(engines):
        write_handoff(tmp_path / "engines", Handoff(
            pool_id=f"pool-{i}", replica_id=f"r{i}", url=str(engine.make_url("")).rstrip("/"), engine_version="b1-mock",
            slots_total=slots, model_id=MODEL, device_mask=str(i), ctx=1024))
    client = await aiohttp_client(orchestratord_app(OrchestratorConfig(**cfg), [str(pmd.make_url("")).rstrip("/")],
                                                    poll_interval_ms=30, shutdown_grace_s=5))

    async def both_ready():
        pools = (await (await client.get("/v2/pools")).json())["pools"]
        return len(pools) == 2 and all(p["ready"] for p in pools)
    await eventually(both_ready, what="two ready pools")
    client.pmd = pmd
    client.engines = engines
    return client


async def scrape(client, server=None) -> str:
    """orchestratord's /metrics (``server`` None) or another in-process server's."""
    if server is None:
        resp = await client.get("/metrics")
    else:
        resp = await client.session.get(str(server.make_url("/metrics")))
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    return await resp.text()


async def busy_scrapes(aiohttp_server, aiohttp_client, tmp_path) -> tuple[str, str]:
    """Completed, pinned, batch, canceled, refused (by the core and on the wire) and OpenAI tasks,
    then (orchestratord's scrape, pool-managerd's scrape)."""
    client = await gpu_cluster(aiohttp_server, aiohttp_client, tmp_path, admission_capacity=2)
    bodies = [task(), task(priority="batch"), task(placement={"mode": "pin", "pin_pool_id": "pool-1"})]
    for body in bodies:
        assert (await client.post("/v2/tasks", json=body)).status == 202
    for body in bodies:
        assert (await events_of(client, body["task_id"]))[-1][0] == "end"
    long = task(max_tokens=900)
    assert (await client.post("/v2/tasks", json=long)).status == 202
    resp = await client.get(f"/v2/tasks/{long['task_id']}/events")
    await resp.content.readany()  # it streams: cancel it
    assert (await client.post(f"/v2/tasks/{long['task_id']}/cancel")).status == 204
    resp.close()
    # a full queue: 4 slots busy, 2 tasks queued (capacity 2), the next one refused with a 429
    crowd = [task(max_tokens=900, priority="batch" if i % 2 else "interactive") for i in range(6)]
    for body in crowd:
        assert (await client.post("/v2/tasks", json=body)).status == 202
    assert (await client.post("/v2/tasks", json=task())).status == 429
    orchd = await scrape(client)  # with tasks queued
    for body in crowd:
        assert (await client.post(f"/v2/tasks/{body['task_id']}/cancel")).status == 204
    assert (await client.post("/v2/tasks", json=task(model_ref="file:/models/none.gguf"))).status == 503
    assert (await client.post("/v2/tasks", data=b'{"task_id": ')).status == 400  # refused on the wire
    assert (await client.post("/v2/tasks", json=task(max_tokens=0))).status == 400
    chat = await client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 4,
                                                           "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status == 200, await chat.text()

    async def settled():
        return not client.server.app[DRIVER].core.tasks
    await eventually(settled, what="every task ended")
    assert 'queue_depth{engine="llamacpp",engine_version="any",pool_id="any",priority="batch"} 1.0' in orchd
    return await scrape(client), await scrape(client, client.pmd)

