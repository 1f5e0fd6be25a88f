"""SIGTERM drains with the listening socket open: a client arriving meanwhile gets the 503
"shutting down" (and ``/readyz`` 503) rather than a refused connection; the running task gets
its terminal event at the end of the grace; the process exits 0."""

import asyncio
import signal
from types import SimpleNamespace

import aiohttp
import orjson
from cluster_support import Orchd, task
from support import eventually, running

from llama_orch.ext.sse import SSEParser

ENGINE = ["llama_orch.io.bench.fast_engine", "--port", "0", "--mode", "paced", "--first-token-ms", "3600000",
          "--slots", "2", "--model", "fast.gguf", "--pool-id", "fast-0"]


async def test_sigterm_answers_503_while_it_drains_then_exits(tmp_path):
    # the fast engine answers /v2/pools as a pool-managerd would, and holds every task (no first token)
    with running(ENGINE) as (engine,):
        orchd = Orchd(tmp_path, SimpleNamespace(url=engine), ORCHD_SHUTDOWN_GRACE_MS="2000")
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                await orchd.wait_ready(http, SimpleNamespace(logs=lambda: (tmp_path / "orchestratord.log").read_text()))
                body = task(model_ref="fast.gguf", ctx=64, max_tokens=4)
                async with http.post(f"{orchd.url}/v2/tasks", json=body) as r:
                    assert r.status == 202, await r.text()
                events = asyncio.ensure_future(read_events(http, f"{orchd.url}/v2/tasks/{body['task_id']}/events"))
                orchd.proc.send_signal(signal.SIGTERM)

                async def refused_as_shutting_down():
                    async with http.post(f"{orchd.url}/v2/tasks", json=task(model_ref="fast.gguf", ctx=64)) as r:
                        return r.status == 503 and "shutting down" in (await r.json())["message"]
                await eventually(refused_as_shutting_down, timeout=5, what="a 503 'shutting down' during the drain")
                async with http.get(f"{orchd.url}/readyz") as r:
                    assert r.status == 503 and (await r.json())["accepting"] is False
                kinds = await asyncio.wait_for(events, 15)  # canceled at the end of the grace: its terminal event
                assert kinds[-1][0] in ("end", "error"), kinds
            assert orchd.proc.wait(timeout=15) == 0
            assert "Traceback" not in (tmp_path / "orchestratord.log").read_text()
        finally:
            orchd.close()


async def read_events(http, url):
    parser, out = SSEParser(), []
    async with http.get(url) as r:
        async for chunk in r.content.iter_any():
            out += [(name, orjson.loads(data)) for name, data in parser.feed(chunk)]
    return out
