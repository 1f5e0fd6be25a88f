"""pool-managerd's device and KV-cache series: each carries the pool that uses it (engine,
engine_version, pool_id, replica_id) beside the device; NVML is faked (no GPU here)."""

from __future__ import annotations

import asyncio

from observability_support import GIB, FakeNVML, fake_gpus
from prometheus_client.parser import text_string_to_metric_families
from support import eventually

from llama_orch.io.config import PoolManagerSettings
from llama_orch.io.handoff import Handoff, write_handoff
from llama_orch.io.pool_managerd.gpu import GpuDiscovery
from llama_orch.io.pool_managerd.manager import create_app, kv_cache_usage
from llama_orch.io.provisioner.mock_engine import MockConfig
from llama_orch.io.provisioner.mock_engine import create_app as mock_engine_app

POOL0 = dict(engine="llamacpp", engine_version="b1-mock", pool_id="pool-0", replica_id="r0")
POOL1 = dict(engine="llamacpp", engine_version="b1-mock", pool_id="pool-1", replica_id="r1")
NO_POOL = dict(engine="", engine_version="", pool_id="", replica_id="")


def settings(tmp_path) -> PoolManagerSettings:
    return PoolManagerSettings(runtime_dir=tmp_path / "engines", watch_interval_ms=20, health_interval_ms=30,
                               provisioner_url=None)


def handoff(server, i: int, mask: str, **kw) -> Handoff:
    return Handoff(pool_id=f"pool-{i}", replica_id=f"r{i}", url=str(server.make_url("")).rstrip("/"),
                   engine_version="b1-mock", slots_total=2, model_id="file:/models/tiny.gguf", device_mask=mask, **kw)


async def samples(client) -> dict[tuple[str, tuple], float]:
    text = await (await client.get("/metrics")).text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def key(name: str, **labels: str) -> tuple[str, tuple]:
    return name, tuple(sorted(labels.items()))


async def test_device_series_carry_the_pool_that_uses_the_device_and_follow_its_mask(aiohttp_server, aiohttp_client,
                                                                                    tmp_path):
    engines = [await aiohttp_server(mock_engine_app(MockConfig(slots=2))) for _ in range(2)]
    client = await aiohttp_client(create_app(settings(tmp_path), gpu=fake_gpus()))
    for i, engine in enumerate(engines):
        write_handoff(tmp_path / "engines", handoff(engine, i, str(i)))

    async def both_pools():
        got = await samples(client)
        return got if key("pool_ready", pool_id="pool-1") in got and got[key("pool_ready", pool_id="pool-1")] else None
    got = await eventually(both_pools, what="two ready pools")
    assert got[key("gpu_utilization", **POOL0, device="0")] == 71
    assert got[key("gpu_utilization", **POOL1, device="1")] == 12
    assert got[key("vram_used_bytes", **POOL0, device="0")] == 20 * GIB
    assert got[key("vram_used_bytes", **POOL1, device="1")] == 10 * GIB
    assert got[key("vram_used_bytes", **NO_POOL, device="2")] == 0  # no pool uses it: still watched
    assert key("gpu_utilization", **NO_POOL, device="2") not in got  # NVML cannot say: absent, not 0
    assert len([k for k in got if k[0] == "vram_used_bytes"]) == 3
    # pool-1 moves to device 2: its series go with it, and device 1 is nobody's
    write_handoff(tmp_path / "engines", handoff(engines[1], 1, "2", pid=4242))

    async def moved():
        got = await samples(client)
        return got if key("vram_used_bytes", **POOL1, device="2") in got else None
    got = await eventually(moved, what="pool-1's series on device 2")
    assert key("vram_used_bytes", **POOL1, device="1") not in got and key("gpu_utilization", **POOL1, device="1") \
        not in got
    assert got[key("vram_used_bytes", **NO_POOL, device="1")] == 10 * GIB
    assert key("vram_used_bytes", **NO_POOL, device="2") not in got
    assert len([k for k in got if k[0] == "vram_used_bytes"]) == 3


async def test_a_cpu_pool_reports_system_memory_on_the_cpu_device(aiohttp_server, aiohttp_client, tmp_path):
    engine = await aiohttp_server(mock_engine_app(MockConfig(slots=2)))
    no_driver = GpuDiscovery(nvml=FakeNVML([]))  # NVML finds nothing: the CPU fallback
    client = await aiohttp_client(create_app(settings(tmp_path), gpu=no_driver))
    write_handoff(tmp_path / "engines", handoff(engine, 0, ""))

    async def ready():
        got = await samples(client)
        return got if got.get(key("pool_ready", pool_id="pool-0")) else None
    got = await eventually(ready)
    assert got[key("vram_used_bytes", **POOL0, device="cpu")] > 0
    assert not [k for k in got if k[0] == "gpu_utilization"]


async def test_kv_cache_usage_follows_the_running_requests(aiohttp_server, aiohttp_client, tmp_path):
    engine = await aiohttp_server(mock_engine_app(MockConfig(slots=2, ctx=100, tokens_per_s=100)))
    client = await aiohttp_client(create_app(settings(tmp_path), gpu=fake_gpus()))
    write_handoff(tmp_path / "engines", handoff(engine, 0, "0"))
    usage = key("kv_cache_usage_ratio", **POOL0)

    async def idle():
        got = await samples(client)
        return usage in got and got[usage] == 0
    await eventually(idle, what="an idle engine's KV cache at 0")
    engine_client = await aiohttp_client(engine)
    # 10 prompt words and 60 tokens at 100 tokens/s in one of two slots of 100 tokens
    job = asyncio.ensure_future(engine_client.post("/completion", json={"prompt": " ".join(["w"] * 10),
                                                                         "n_predict": 60, "stream": True}))

    async def held():
        value = (await samples(client)).get(usage, 0)
        return value if 0.1 < value <= 0.35 else None
    assert 0.1 < await eventually(held, what="the running request's share of the KV cache") <= 0.35
    await (await job).read()
    await eventually(idle, what="the KV cache free again")


def test_kv_cache_usage_reads_llama_servers_slots():
    # llama-server b1-0c1e570: n_prompt_tokens counts the generated tokens too; an idle slot keeps
    # its last prompt for reuse, which no running request holds
    slots = [
        {"id": 0, "n_ctx": 2048, "speculative": False, "is_processing": False, "id_task": 0, "n_prompt_tokens": 223,
         "next_token": [{"has_next_token": False, "n_decoded": 0}]},
        {"id": 1, "n_ctx": 2048, "speculative": False, "is_processing": True, "id_task": 8, "n_prompt_tokens": 1233,
         "n_prompt_tokens_processed": 17, "next_token": [{"has_next_token": True, "n_decoded": 1216}]},
    ]
    assert kv_cache_usage(slots) == 1233 / 4096
    assert kv_cache_usage([{"id": 0, "n_ctx": 100, "is_processing": True, "n_past": 250}]) == 1.0  # older: n_past
    assert kv_cache_usage([{"id": 0, "n_ctx": 512, "is_processing": False}]) == 0.0  # a fresh idle slot
    assert kv_cache_usage([{"id": 0, "is_processing": True}]) is None  # no context size: unknown
    assert kv_cache_usage("not a list") is None
