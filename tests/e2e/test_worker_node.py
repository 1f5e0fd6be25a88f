"""A worker node for real: engine-provisioner and pool-managerd processes, a real llama-server
built from source (cached), the tiny model. Provision, ready, slots in use, kill -9, restart,
metrics, drain, callback, and a corrupt model."""

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cluster_support import Node, client_session
from support import eventually

from llama_orch.ext.sse import TokenRelay
from llama_orch.io.provisioner.supervisor import pid_alive


@pytest.fixture
async def session():
    async with client_session(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def get_json(session, url):
    try:
        async with session.get(url) as r:
            return await r.json() if r.status == 200 else None
    except aiohttp.ClientError:
        return None


async def test_worker_node_with_a_real_llama_server(llama_server, tmp_path, session, aiohttp_server):
    callbacks = []

    async def pool_ready(request):
        callbacks.append(await request.json())
        return web.json_response({"bound": True}, status=202)

    orchd = web.Application()
    orchd.router.add_post("/callbacks/pool-ready", pool_ready)
    orchd_server = await aiohttp_server(orchd)
    node = Node(tmp_path, callback_url=str(orchd_server.make_url("/callbacks/pool-ready")))
    try:
        node.provision("--pool-id", "pool-0", "--slots", "2", "--ctx", "2048")
        status_url = f"{node.url}/v2/pools/pool-0/status"

        async def ready():
            st = await get_json(session, status_url)
            return st if st and st["ready"] else None
        st = await eventually(ready, timeout=60, what=lambda: "pool ready\n" + node.logs())
        assert st["slots_total"] == 2 and st["slots_free"] == 2 and st["ctx_max"] == 2048
        assert st["engine"] == "llamacpp" and "+" in st["engine_version"] and st["provisioning_mode"] == "source"
        assert st["model_ref"].endswith("tiny.gguf") and st["last_error"] is None and st["live"] is True
        listing = await get_json(session, f"{node.url}/v2/pools")
        assert [p["pool_id"] for p in listing["pools"]] == ["pool-0"]
        await eventually(lambda: callbacks, timeout=10, what="pool-ready callback")
        assert callbacks[0]["pool_id"] == "pool-0"

        # Two long completions at once: pool-managerd sees both slots taken while they stream.
        engine_url = st["engine_url"]
        seen_free = set()

        async def complete():
            relay = TokenRelay("llamacpp")
            async with session.post(f"{engine_url}/completion",
                                    json={"prompt": "hello", "n_predict": 1800, "stream": True}) as r:
                async for chunk in r.content.iter_any():
                    relay.feed(chunk)
            return relay

        async def watch():
            while True:
                st = await get_json(session, status_url)
                seen_free.add(st["slots_free"])
                await asyncio.sleep(0.02)
        watcher = asyncio.ensure_future(watch())
        relays = await asyncio.gather(complete(), complete())
        watcher.cancel()
        assert all(r.tokens > 0 and r.final and r.final["kind"] == "end" for r in relays)
        assert min(seen_free) < 2, f"slots_free never dropped: {seen_free}"

        # kill -9 of the engine: unready with the cause, restarted with backoff, ready again.
        os.kill(st["engine_pid"], signal.SIGKILL)

        async def down():
            s = await get_json(session, status_url)
            return s if s and not s["ready"] and s["last_error"] else None
        st_down = await eventually(down, what="pool unready after kill -9")
        assert "exited" in st_down["last_error"] or "health check failed" in st_down["last_error"]

        async def back():
            s = await get_json(session, status_url)
            return s if s and s["ready"] and s["engine_pid"] != st["engine_pid"] else None
        st_back = await eventually(back, what=lambda: "pool ready again\n" + node.logs())
        assert pid_alive(st_back["engine_pid"]) and st_back["last_error"] is None

        metrics = await (await session.get(f"{node.url}/metrics")).text()
        assert 'pool_ready{pool_id="pool-0"} 1.0' in metrics and 'pool_slots_total{pool_id="pool-0"} 2.0' in metrics

        # Reload through pool-managerd: a corrupt model is rolled back, a good one swapped in,
        # and the pool stays ready all along.
        watcher_ready = []

        async def watch_ready():
            while True:
                s = await get_json(session, status_url)
                watcher_ready.append(s["ready"])
                await asyncio.sleep(0.02)
        watcher = asyncio.ensure_future(watch_ready())
        corrupt = tmp_path / "corrupt.gguf"
        corrupt.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(4096))
        async with session.post(f"{node.url}/v2/pools/pool-0/reload", json={"new_model_ref": f"file:{corrupt}"}) as r:
            assert r.status == 202, await r.text()

        async def rolled_back():
            s = await get_json(session, status_url)
            return s if s["last_error"] and "rolled back" in s["last_error"] else None
        st_rb = await eventually(rolled_back, what=lambda: "reload rolled back\n" + node.logs())
        assert st_rb["ready"] and st_rb["engine_pid"] == st_back["engine_pid"] and st_rb["model_ref"] == st["model_ref"]
        second = tmp_path / "second.gguf"
        second.write_bytes(Path(st["model_ref"].removeprefix("file:")).read_bytes())
        async with session.post(f"{node.url}/v2/pools/pool-0/reload", json={"new_model_ref": f"file:{second}"}) as r:
            assert r.status == 202

        async def reloaded():
            s = await get_json(session, status_url)
            return s if s["model_ref"] == f"file:{second}" and s["ready"] else None
        st_new = await eventually(reloaded, what=lambda: "reloaded\n" + node.logs())
        watcher.cancel()
        assert all(watcher_ready), "the pool went unready during a reload"
        assert st_new["engine_pid"] != st_back["engine_pid"] and st_new["last_error"] is None
        await eventually(lambda: not pid_alive(st_back["engine_pid"]), what="old engine retired")

        # Drain: no new work, then the provisioner stops the engine.
        async with session.post(f"{node.url}/v2/pools/pool-0/drain", json={"deadline_ms": 5000}) as r:
            assert r.status == 202

        last = {}

        async def drained():
            s = last["status"] = await get_json(session, status_url)
            return s if s["state"] == "drained" else None
        assert (await eventually(drained, what=lambda: f"drained; last status {last.get('status')}\n{node.logs()}"))["ready"] is False
        await eventually(lambda: not pid_alive(st_new["engine_pid"]), what="drained engine stopped")

        # Undrain: the operator takes the drain back; the same model on a new engine, ready again.
        async with session.post(f"{node.url}/v2/pools/pool-0/undrain") as r:
            assert r.status == 202, await r.text()

        async def undrained():
            s = await get_json(session, status_url)
            return s if s["ready"] and s["engine_pid"] not in (None, st_new["engine_pid"]) else None
        st_back_again = await eventually(undrained, what=lambda: "undrained\n" + node.logs())
        assert st_back_again["model_ref"] == st_new["model_ref"] and st_back_again["last_error"] is None
        async with session.post(f"{node.url}/v2/pools/pool-0/undrain") as r:
            assert r.status == 409 and (await r.json())["code"] == "POOL_NOT_DRAINED"

        node.prov.send_signal(signal.SIGTERM)
        assert node.prov.wait(timeout=30) == 0
    finally:
        node.close()



async def test_a_corrupt_model_leaves_the_pool_unready_with_last_error(llama_server, tmp_path, session):
    model = tmp_path / "corrupt.gguf"
    model.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(4096))
    node = Node(tmp_path)
    try:
        node.provision("--pool-id", "bad", "--model", f"file:{model}")

        async def reported():
            s = await get_json(session, f"{node.url}/v2/pools/bad/status")
            return s if s and s["last_error"] else None
        st = await eventually(reported, what=lambda: "last_error for the corrupt model\n" + node.logs())
        assert st["ready"] is False and "exited" in st["last_error"]

        async def failed_again():  # each failed restart is reported by a new error handoff
            text = await (await session.get(f"{node.url}/metrics")).text()
            line = next((x for x in text.splitlines()
                         if x.startswith('pool_handoff_files_processed_total{outcome="ok",pool_id="bad"}')), "")
            return line and float(line.split()[-1]) >= 3
        await eventually(failed_again, what="restarts of the corrupt model failing")
        st = await get_json(session, f"{node.url}/v2/pools/bad/status")
        assert st["ready"] is False and st["last_error"]
    finally:
        node.close()
