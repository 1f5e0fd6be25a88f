"""A one-machine cluster of real processes: orchestratord -> pool-managerd -> engine-provisioner
-> llama-server with the tiny model. Tokens stream from the real engine through orchestratord."""

import os
import signal
import ssl
import subprocess
import sys

import aiohttp
import orjson
import pytest
from cluster_support import TLS, Node, Orchd, client_session, task, dev_certs
from support import eventually

from llama_orch.ext.sse import SSEParser


@pytest.fixture
async def session():
    async with client_session(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


async def test_tokens_from_a_real_engine_through_orchestratord(llama_server, tmp_path, session):
    node = Node(tmp_path)
    orchd = Orchd(tmp_path, node)
    orchd_url = orchd.url
    try:
        node.provision("--pool-id", "pool-0", "--slots", "2", "--ctx", "1024")
        await orchd.wait_ready(session, node)
        if TLS:  # the TLS run: every daemon on https, and a client without a certificate gets no answer
            assert orchd_url.startswith("https://") and node.url.startswith("https://")
            bare = ssl.create_default_context(cafile=str(dev_certs()["client"].ca))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=bare)) as stranger:
                with pytest.raises(aiohttp.ClientError):
                    async with stranger.get(f"{node.url}/v2/pools") as r:
                        pytest.fail(f"pool-managerd answered a client without a certificate: HTTP {r.status}")

        body = task()
        async with session.post(f"{orchd_url}/v2/tasks", json=body, headers={"X-Correlation-Id": "corr-e2e-1"}) as r:
            assert r.status == 202, await r.text()
            assert r.headers["X-Correlation-Id"] == "corr-e2e-1"
        events = []
        parser = SSEParser()
        async with session.get(f"{orchd_url}/v2/tasks/{body['task_id']}/events") as r:
            async for chunk in r.content.iter_any():
                events += [(k, orjson.loads(d)) for k, d in parser.feed(chunk)]
        kinds = [k for k, _ in events]
        assert kinds[0] == "started" and kinds[-1] == "end", kinds
        tokens = [d for k, d in events if k == "token"]
        assert len(tokens) == 24 and [t["i"] for t in tokens] == list(range(24))
        assert "".join(t["t"] for t in tokens).strip()  # real text from the tiny model
        assert events[-1][1]["tokens_out"] == 24

        async def logged():  # the access log line of the request carries its correlation id
            return "correlation_id=corr-e2e-1" in (tmp_path / "orchestratord.log").read_text()
        await eventually(logged, what="the correlation id in orchestratord's log")

        # Cancel mid-stream: a 204, then the stream ends with canceled. Tokens already on the wire
        # may still arrive after the 204 (another connection), but none was sent after the cancel
        # was processed: the stream holds exactly the end event's tokens_out tokens, then the end.
        long = task(max_tokens=900, ctx=1024)
        async with session.post(f"{orchd_url}/v2/tasks", json=long) as r:
            assert r.status == 202
        seen, after_cancel = [], None
        parser = SSEParser()
        async with session.get(f"{orchd_url}/v2/tasks/{long['task_id']}/events") as r:
            async for chunk in r.content.iter_any():
                seen += parser.feed(chunk)
                if after_cancel is None and sum(k == "token" for k, _ in seen) >= 1:
                    async with session.post(f"{orchd_url}/v2/tasks/{long['task_id']}/cancel") as c:
                        assert c.status == 204
                    after_cancel = len(seen)
        end = orjson.loads(seen[-1][1])
        assert seen[-1][0] == "end" and end["canceled"] is True and after_cancel is not None
        assert sum(k == "token" for k, _ in seen) == end["tokens_out"] < 900
    finally:
        orchd.close()
        node.close()


def test_orchestratord_refuses_a_public_address_without_auth():
    env = dict(os.environ, ORCHD_BIND_ADDR="0.0.0.0:8080")
    env.pop("ORCHD_API_KEYS", None)
    out = subprocess.run([sys.executable, "-m", "llama_orch.io.orchestratord"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "needs client auth configured" in out.stderr


async def test_sigterm_lets_running_streams_finish(tmp_path, session):
    node = Node(tmp_path)
    orchd = Orchd(tmp_path, node, ORCHD_SHUTDOWN_GRACE_MS="30000")
    orchd_url = orchd.url
    try:
        node.provision("--pool-id", "pool-0", "--mode", "mock", "--slots", "2")
        await orchd.wait_ready(session, node)
        body = task(max_tokens=400)  # about 2 s from the mock engine
        async with session.post(f"{orchd_url}/v2/tasks", json=body) as r:
            assert r.status == 202
        events, parser, signalled = [], SSEParser(), False
        async with session.get(f"{orchd_url}/v2/tasks/{body['task_id']}/events") as r:
            async for chunk in r.content.iter_any():
                events += parser.feed(chunk)
                if not signalled and any(k == "token" for k, _ in events):
                    orchd.proc.send_signal(signal.SIGTERM)
                    signalled = True
        assert events[-1][0] == "end"
        end = orjson.loads(events[-1][1])
        assert end["tokens_out"] == 400 and "canceled" not in end
        assert orchd.proc.wait(timeout=30) == 0
    finally:
        orchd.close()
        node.close()
