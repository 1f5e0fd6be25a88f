"""SIGTERM drains with the listening socket open: a client arriving meanwhile gets the 503
"shutting down" (and ``/readyz`` 503) rather than a refused connection; the running task gets
its terminal event at the end of the grace; the process exits 0."""

import asyncio
import os
import signal
import subprocess
import sys
import uuid

import aiohttp
import orjson
from cluster_support import free_port
from support import ROOT, eventually, running

from llama_orch.ext.sse import SSEParser

ENGINE = ["llama_orch.io.bench.fast_engine", "--port", "0", "--mode", "paced", "--first-token-ms", "3600000",
          "--slots", "2", "--model", "fast.gguf", "--pool-id", "fast-0"]


async def test_sigterm_answers_503_while_it_drains_then_exits():
    with running(ENGINE) as (engine,):
        port = free_port()
        env = dict(os.environ, ORCHD_BIND_ADDR=f"127.0.0.1:{port}", ORCHD_POOL_MANAGERS=engine,
                   ORCHD_POOL_POLL_INTERVAL_MS="100", ORCHD_SHUTDOWN_GRACE_MS="2000")
        orchd = subprocess.Popen([sys.executable, "-m", "llama_orch.io.orchestratord"], cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                async def ready():
                    try:
                        async with http.get(f"{url}/readyz") as r:
                            return r.status == 200
                    except aiohttp.ClientConnectionError:
                        return False
                await eventually(ready, timeout=20, what="orchestratord ready")
                held = str(uuid.uuid4())
                body = {"task_id": held, "session_id": str(uuid.uuid4()), "workload": "completion", "model_ref": "fast.gguf",
                        "engine": "llamacpp", "priority": "interactive", "ctx": 64, "max_tokens": 4, "deadline_ms": 60_000, "prompt": "hi"}
                async with http.post(f"{url}/v2/tasks", json=body) as r:
                    assert r.status == 202, await r.text()  # dispatched: the engine holds it (no first token for an hour)
                events = asyncio.ensure_future(read_events(http, f"{url}/v2/tasks/{held}/events"))
                orchd.send_signal(signal.SIGTERM)

                async def refused_as_shutting_down():
                    async with http.post(f"{url}/v2/tasks", json={**body, "task_id": str(uuid.uuid4())}) as r:
                        return r.status == 503 and "shutting down" in (await r.json())["message"]
                await eventually(refused_as_shutting_down, timeout=5, what="a 503 'shutting down' during the drain")
                async with http.get(f"{url}/readyz") as r:
                    assert r.status == 503 and (await r.json())["accepting"] is False
                kinds = await asyncio.wait_for(events, 15)
                assert kinds[-1][0] == "error" and kinds[-1][1]["code"] == "CANCELED" or kinds[-1][0] == "end", kinds
            assert orchd.wait(timeout=15) == 0
            assert b"Traceback" not in orchd.stderr.read()
        finally:
            if orchd.poll() is None:
                orchd.kill()
                orchd.wait()


async def read_events(http, url):
    parser, out = SSEParser(), []
    async with http.get(url) as r:
        async for chunk in r.content.iter_any():
            out += [(name, orjson.loads(data)) for name, data in parser.feed(chunk)]
    return out
