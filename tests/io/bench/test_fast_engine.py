"""The fast engine, run as the harness runs it (a subprocess announcing ``READY <url>``): its
frames parse with the project's own relay into exactly the tokens asked for, in every write
mode, and its ``/v2/pools`` is what orchestratord's discovery reads."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from support import running

from llama_orch.ext.sse import SSEParser, TokenRelay
from llama_orch.io.bench.fast_engine import FastEngine, FastEngineConfig
from llama_orch.io.orchestratord.discovery import PoolDiscovery, snapshot_from_status

MODULE = "llama_orch.io.bench.fast_engine"
PACE_MS = 20
MODES = ("burst", "per-token", "paced")


@pytest.fixture(scope="module")
def engines():
    argvs = [[MODULE, "--mode", mode, "--pace-ms", str(PACE_MS), "--slots", "3", "--ctx", "100",
              "--model", f"m-{mode}.gguf", "--pool-id", f"pool-{mode}"] for mode in MODES]
    with running(*argvs) as urls:
        yield dict(zip(MODES, urls))


async def relayed(resp: aiohttp.ClientResponse, dialect: str) -> tuple[TokenRelay, dict | None, int]:
    """Feed the whole answer to a TokenRelay: the relay, its final, and how many reads it took."""
    relay, final, reads = TokenRelay(dialect), None, 0
    async for chunk in resp.content.iter_any():
        reads += 1
        _, _, done = relay.feed(chunk)
        final = final or done
    return relay, final, reads


async def raw_exchange(url: str, request: bytes) -> bytes:
    """Send raw bytes, read until the engine closes the connection."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            return await reader.read(-1)
    finally:
        writer.close()


def post(path: str, body: bytes, *, close: bool = True) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: engine\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path.encode(), len(body), b"Connection: close\r\n" if close else b"", body))


def dechunk(body: bytes) -> list[bytes]:
    chunks = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(body[:size])
        assert body[size:size + 2] == b"\r\n"
        body = body[size + 2:]


# -- the llama.cpp and OpenAI dialects, in every mode ---------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_completion_stream_parses_into_exactly_n_predict_tokens(engines, mode):
    async with aiohttp.ClientSession() as session:
        async with session.post(engines[mode] + "/completion",
                                json={"prompt": "hello there engine", "n_predict": 7, "stream": True}) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            relay, final, _ = await relayed(resp, "llamacpp")
    assert relay.tokens == 7
    assert final["kind"] == "end" and final["tokens_predicted"] == 7 and final["tokens_evaluated"] >= 1
    assert final["stop_type"] == "limit" and final["predicted_ms"] is not None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("usage", [True, False])
async def test_v1_completions_stream_parses_into_exactly_max_tokens(engines, mode, usage):
    body = {"model": "any", "prompt": "hi", "max_tokens": 5, "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(engines[mode] + "/v1/completions", json=body) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            raw = await resp.read()
    relay = TokenRelay("openai")
    _, count, final = relay.feed(raw)
    assert count == 5 and final["kind"] == "end" and final["finish_reason"] == "length"
    assert final["tokens_predicted"] == 5  # from usage, or the count relayed without it
    assert (final["tokens_evaluated"] is not None) == usage
    assert raw.endswith(b"data: [DONE]\n\n") and f'"model":"m-{mode}.gguf"'.encode() in raw


@pytest.mark.parametrize("mode", MODES)
async def test_non_streaming_answers_are_one_json_object(engines, mode):
    async with aiohttp.ClientSession() as session:
        async with session.post(engines[mode] + "/completion", json={"n_predict": 4}) as resp:
            done = await resp.json()
            assert resp.content_length is not None
        async with session.post(engines[mode] + "/v1/completions", json={"max_tokens": 3, "stream": False}) as resp:
            completion = await resp.json()
    assert done["stop"] is True and done["tokens_predicted"] == 4 and len(done["content"].split()) == 4
    assert completion["choices"][0]["finish_reason"] == "length" and completion["usage"]["completion_tokens"] == 3
    assert len(completion["choices"][0]["text"].split()) == 3


async def test_defaults_and_the_context_bound(engines):
    async with aiohttp.ClientSession() as session:
        async with session.post(engines["burst"] + "/completion", json={"stream": True}) as resp:
            default, _, _ = await relayed(resp, "llamacpp")
        async with session.post(engines["burst"] + "/completion", json={"n_predict": -1, "stream": True}) as resp:
            until_full, _, _ = await relayed(resp, "llamacpp")
        async with session.post(engines["burst"] + "/v1/completions", json={"max_tokens": 10**9, "stream": True}) as resp:
            bounded, _, _ = await relayed(resp, "openai")
    assert (default.tokens, until_full.tokens, bounded.tokens) == (16, 100, 100)  # --ctx 100


# -- how the frames go out ------------------------------------------------------------------------


async def test_burst_is_one_body_with_a_content_length(engines):
    answer = await raw_exchange(engines["burst"], post("/completion", b'{"n_predict":20,"stream":true}'))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % len(body) in head and b"Transfer-Encoding" not in head
    assert len(SSEParser().feed(body)) == 21


async def test_per_token_writes_each_token_on_its_own(engines):
    # One HTTP chunk per write: 20 token chunks and the final frame's, whatever loopback coalesces.
    answer = await raw_exchange(engines["per-token"], post("/completion", b'{"n_predict":20,"stream":true}'))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    chunks = dechunk(body)
    assert len(chunks) == 21 and all(len(SSEParser().feed(chunk)) == 1 for chunk in chunks)
    relay = TokenRelay("llamacpp")
    assert relay.feed(b"".join(chunks))[1] == 20 and relay.final["kind"] == "end"


async def test_paced_tokens_come_at_the_pace(engines):
    started = time.monotonic()
    arrivals = []
    async with aiohttp.ClientSession() as session:
        async with session.post(engines["paced"] + "/completion", json={"n_predict": 10, "stream": True}) as resp:
            relay = TokenRelay("llamacpp")
            async for chunk in resp.content.iter_any():
                if relay.feed(chunk)[1]:
                    arrivals.append(time.monotonic() - started)
    elapsed = time.monotonic() - started
    assert relay.tokens == 10 and relay.final["kind"] == "end"
    # Token k is due at k * 20 ms: the tenth at 180 ms (a little slack for timer granularity).
    assert elapsed >= 0.175 and arrivals[-1] >= 0.175
    assert len(arrivals) >= 2  # 180 ms of pacing cannot arrive as one read


async def test_a_client_leaving_mid_stream_stops_the_writes_quietly(engines):
    host, port = engines["paced"].removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(post("/completion", b'{"n_predict":50,"stream":true}'))
    async with asyncio.timeout(10):
        await reader.readuntil(b"data: ")
    writer.transport.abort()
    async with aiohttp.ClientSession() as session:  # still serving; no traceback (checked at exit)
        async with session.get(engines["paced"] + "/health") as resp:
            assert resp.status == 200


# -- the other routes -----------------------------------------------------------------------------


async def test_status_routes(engines):
    url = engines["burst"]
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/health") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}
        async with session.get(url + "/props") as resp:
            props = await resp.json()
        async with session.get(url + "/slots") as resp:
            slots = await resp.json()
        async with session.get(url + "/v1/models") as resp:
            models = await resp.json()
    assert props["default_generation_settings"]["n_ctx"] == 100 and props["total_slots"] == 3
    assert [s["is_processing"] for s in slots] == [False] * 3
    assert models == {"object": "list", "data": [{"id": "m-burst.gguf", "object": "model", "created": 0,
                                                  "owned_by": "llamacpp"}]}


async def test_v2_pools_is_what_discovery_reads(engines):
    url = engines["burst"]
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/v2/pools") as resp:
            listing = await resp.json()
    [status] = listing["pools"]
    snap = snapshot_from_status(status, url)
    assert snap.pool_id == "pool-burst" and snap.ready and snap.live and not snap.draining
    assert snap.engine_url == url and snap.slots_total == snap.slots_free == 3 and snap.ctx_max == 100
    assert snap.model_ref == "m-burst.gguf" and snap.engine == "llamacpp" and snap.vram_free_bytes == 16 << 30
    # ORCHD_POOL_MANAGERS pointed straight at the engine: discovery sees the pool ready.
    events = []
    discovery = PoolDiscovery([url], events.append, timeout_ms=5000)
    await discovery.start()
    await discovery.stop()
    assert [e.snapshot.pool_id for e in events if e.snapshot.ready] == ["pool-burst"]


async def test_keep_alive_serves_several_requests_on_one_connection(engines):
    created = []
    trace = aiohttp.TraceConfig()

    async def on_create(session, context, params):
        created.append(params)
    trace.on_connection_create_end.append(on_create)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), trace_configs=[trace]) as session:
        for n in (3, 4, 5):
            async with session.post(engines["per-token"] + "/completion", json={"n_predict": n, "stream": True}) as resp:
                relay, final, _ = await relayed(resp, "llamacpp")
                assert relay.tokens == n and final["kind"] == "end"
        async with session.get(engines["per-token"] + "/health") as resp:
            assert resp.status == 200
    assert len(created) == 1


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health HTTP/9.9\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"POST /completion HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /completion HTTP/1.1\r\nContent-Length: nine\r\n\r\n", 400),
    (post("/completion", b"{not json", close=False), 400),
    (post("/completion", b'{"n_predict": "many"}', close=False), 400),
    (post("/completion", b"[1, 2]", close=False), 400),
    (b"GET /nowhere HTTP/1.1\r\n\r\n", 404),
    (b"POST /health HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 404),
    (b"POST /completion HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % ((8 << 20) + 1), 413),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"x" * (70 << 10), 431),
])
async def test_malformed_requests_are_answered_and_closed(engines, request_bytes, status):
    answer = await raw_exchange(engines["burst"], request_bytes)  # returns at EOF: the engine closed
    assert answer.startswith(b"HTTP/1.1 %d " % status) and b"Connection: close" in answer


async def test_http10_gets_a_close_delimited_stream(engines):
    body = b'{"n_predict":3,"stream":true}'
    request = b"POST /completion HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    answer = await raw_exchange(engines["per-token"], request)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Connection: close" in head and b"Transfer-Encoding" not in head
    assert TokenRelay("llamacpp").feed(body)[1] == 3


# -- in process -------------------------------------------------------------------------------------


async def test_in_process_engine_with_a_first_token_delay():
    async with FastEngine(FastEngineConfig(mode="burst", first_token_ms=100, pool_id="inproc")) as engine:
        assert engine.url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.post(engine.url + "/completion", json={"n_predict": 2, "stream": True}) as resp:
                relay, final, _ = await relayed(resp, "llamacpp")
            assert time.monotonic() - started >= 0.095 and relay.tokens == 2 and final["kind"] == "end"


async def test_status_routes_do_not_wait_for_the_first_token_delay():
    """An engine holding its slots (an hour to the first token) still answers its status at once:
    the admission bench relies on it to keep tasks queued behind busy pools."""
    async with FastEngine(FastEngineConfig(mode="paced", first_token_ms=3_600_000, pool_id="held")) as engine:
        async with aiohttp.ClientSession() as session:
            for path in ("/health", "/v2/pools", "/slots"):
                async with session.get(engine.url + path, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    assert resp.status == 200, path


def test_config_is_checked():
    with pytest.raises(ValueError):
        FastEngineConfig(mode="sometimes")
    with pytest.raises(ValueError):
        FastEngineConfig(pace_ms=-1)
