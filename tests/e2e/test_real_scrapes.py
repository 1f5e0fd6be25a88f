"""The metrics of real daemons as an operator runs them: orchestratord, pool-managerd and a real
llama-server (cached build, the tiny model) as processes. promtool passes both scrapes after tasks
ran, and pool-managerd reads the KV cache a running request holds from llama-server's ``/slots``."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from cluster_support import Node, Orchd, client_session, task
from prometheus_client.parser import text_string_to_metric_families
from promtool_support import lint_problems
from support import eventually


@pytest.fixture
async def session():
    async with client_session(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


async def kv_usage(session, node: Node) -> float | None:
    async with session.get(f"{node.url}/metrics") as r:
        text = await r.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kv_cache_usage_ratio" and sample.labels.get("pool_id") == "pool-0":
                return sample.value
    return None


async def test_real_daemons_scrapes_pass_promtool_and_show_the_kv_cache_in_use(llama_server, tmp_path, session):
    node = Node(tmp_path)
    orchd = Orchd(tmp_path, node)
    try:
        node.provision("--pool-id", "pool-0", "--slots", "2", "--ctx", "2048")
        await orchd.wait_ready(session, node)

        async def idle() -> bool:
            return await kv_usage(session, node) == 0
        await eventually(idle, timeout=30, what=lambda: "an idle pool's KV cache series at 0\n" + node.logs())
        body = task(max_tokens=1900, ctx=2048, prompt="once upon a time")  # the engine stops at its context

        async def run_task() -> list[bytes]:
            async with session.post(f"{orchd.url}/v2/tasks", json=body) as r:
                assert r.status == 202, await r.text()
            async with session.get(f"{orchd.url}/v2/tasks/{body['task_id']}/events") as r:
                return [line async for line in r.content]
        running = asyncio.ensure_future(run_task())

        async def in_use():
            value = await kv_usage(session, node)
            return value if value else None
        held = await eventually(in_use, timeout=30, what=lambda: "the running task's KV cache\n" + node.logs())
        assert 0 < held <= 1
        assert any(line.startswith(b"event: end") for line in await running)
        await eventually(idle, timeout=30, what="the KV cache free again")
        async with session.post(f"{orchd.url}/v2/tasks", data=b"{") as r:
            assert r.status == 400
        for url in (orchd.url, node.url):
            async with session.get(f"{url}/metrics") as r:
                text = await r.text()
            assert lint_problems(text) == [], url
            if url == orchd.url:
                assert 'tasks_rejected_total{engine="unknown",reason="INVALID_PARAMS"} 1.0' in text
                assert 'tokens_out_total{engine="llamacpp",' in text and 'pool_id="pool-0",replica_id="r0"}' in text
            else:
                assert 'vram_used_bytes{device="cpu",engine="llamacpp",' in text  # no GPU here: the CPU pool
    finally:
        orchd.close()
        node.close()
