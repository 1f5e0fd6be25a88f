"""The mock engine speaks llama-server's protocol: parsed here with the project's own relay."""

import asyncio
import subprocess
import sys
import time

import aiohttp
import pytest
from cluster_support import free_port

from llama_orch.ext.sse import TokenRelay
from llama_orch.io.provisioner.mock_engine import MockConfig, create_app


async def client_for(aiohttp_client, **kw):
    return await aiohttp_client(create_app(MockConfig(**kw)))


async def test_health_reports_loading_then_ok(aiohttp_client):
    client = await client_for(aiohttp_client, start_delay_s=2)  # room for a slow start before the first probe
    resp = await client.get("/health")
    assert resp.status == 503 and (await resp.json())["error"]["message"] == "Loading model"
    deadline = time.monotonic() + 5
    while (await client.get("/health")).status != 200:
        assert time.monotonic() < deadline, "mock engine never finished loading"
        await asyncio.sleep(0.05)


async def test_props_and_slots(aiohttp_client):
    client = await client_for(aiohttp_client, slots=3, ctx=512)
    props = await (await client.get("/props")).json()
    assert props["total_slots"] == 3 and props["default_generation_settings"]["n_ctx"] == 512
    slots = await (await client.get("/slots")).json()
    assert [s["is_processing"] for s in slots] == [False, False, False]


async def test_streamed_completion_in_llamacpp_frames(aiohttp_client):
    client = await client_for(aiohttp_client, tokens_per_s=1000)
    resp = await client.post("/completion", json={"prompt": "hello there", "n_predict": 7, "stream": True})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    relay = TokenRelay("llamacpp")
    final = None
    async for chunk in resp.content.iter_any():
        frames, _, done = relay.feed(chunk)
        final = done or final
    assert relay.tokens == 7
    assert final["kind"] == "end" and final["tokens_predicted"] == 7 and final["tokens_evaluated"] == 2
    metrics = await (await client.get("/metrics")).text()
    assert "llamacpp:tokens_predicted_total 7" in metrics


@pytest.mark.parametrize("n_predict", [10**12, -1])
async def test_generation_stops_at_the_context_whatever_was_asked(aiohttp_client, n_predict):
    # A huge n_predict once made the mock build a list of that many words before the first byte.
    client = await client_for(aiohttp_client, tokens_per_s=100_000, ctx=40)
    resp = await client.post("/completion", json={"prompt": "hello", "n_predict": n_predict, "stream": True})
    relay = TokenRelay("llamacpp")
    async for chunk in resp.content.iter_any():
        relay.feed(chunk)
    assert relay.tokens == 40


async def test_a_non_integer_n_predict_is_a_400(aiohttp_client):
    client = await client_for(aiohttp_client)
    resp = await client.post("/completion", json={"prompt": "hello", "n_predict": "lots", "seed": {}})
    assert resp.status == 400 and "n_predict" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 4, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "stream": True}),
])
async def test_openai_streams_end_with_done(aiohttp_client, path, body):
    client = await client_for(aiohttp_client, tokens_per_s=1000)
    raw = await (await client.post(path, json=body)).read()
    assert raw.endswith(b"data: [DONE]\n\n")
    relay = TokenRelay("openai")
    _, tokens, final = relay.feed(raw)
    assert tokens == 4 and final["kind"] == "end"


async def test_a_busy_engine_defers_requests_until_a_slot_frees(aiohttp_client):
    # 4 s of decoding: the deferred count is only visible while the first request holds the slot
    client = await client_for(aiohttp_client, slots=1, tokens_per_s=50)
    first = asyncio.ensure_future(client.post("/completion", json={"prompt": "a", "n_predict": 200}))
    deadline = time.monotonic() + 5
    while not (await (await client.get("/slots")).json())[0]["is_processing"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    second = asyncio.ensure_future(client.post("/completion", json={"prompt": "b", "n_predict": 1}))
    while "llamacpp:requests_deferred 1" not in await (await client.get("/metrics")).text():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert not second.done()
    assert (await (await first).json())["tokens_predicted"] == 200
    assert (await (await second).json())["tokens_predicted"] == 1


async def test_a_prompt_of_the_context_size_is_refused_as_llama_server_refuses_it(aiohttp_client):
    client = await client_for(aiohttp_client, ctx=8)
    resp = await client.post("/completion", json={"prompt": " ".join(["w"] * 8), "n_predict": 1, "stream": True})
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["type"] == "exceed_context_size_error" and error["n_prompt_tokens"] == 8
    resp = await client.post("/completion", json={"prompt": " ".join(["w"] * 7), "n_predict": 1})
    assert resp.status == 200


async def test_first_token_after_the_prefill_then_tokens_paced_against_their_due_times(aiohttp_client):
    """The prefill model holds, and a stall of the engine's loop is caught up (a sleep per token would
    add the stall to the stream: the replay's service-time model would then be wrong)."""
    client = await client_for(aiohttp_client, tokens_per_s=200, first_token_ms=100, prefill_ms_per_token=2)
    prompt = " ".join(["w"] * 50)  # first token due 100 + 2 * 50 = 200 ms after the request
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    resp = await client.post("/completion", json={"prompt": prompt, "n_predict": 100, "stream": True})
    relay = TokenRelay("llamacpp")
    first = None
    async for chunk in resp.content.iter_any():
        _, count, final = relay.feed(chunk)
        if count and first is None:
            first = time.monotonic() - started
            loop.call_later(0.05, time.sleep, 0.3)  # the whole engine stalls for 300 ms mid-stream
    total = time.monotonic() - started
    assert relay.tokens == 100 and relay.final["prompt_ms"] == pytest.approx(200.0)
    assert first >= 0.2
    expected = 0.2 + 99 / 200  # the last token is due 695 ms after the request, stall or not
    assert expected <= total < expected + 0.2, f"stream took {total:.3f} s, due in {expected:.3f} s"


async def test_injected_errors(aiohttp_client):
    client = await client_for(aiohttp_client, error_rate=1.0)
    resp = await client.post("/completion", json={"prompt": "a"})
    assert resp.status == 500 and (await resp.json())["error"]["message"] == "injected fault"



async def test_crash_mid_stream_kills_the_process():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_orch.io.provisioner.mock_engine", "--port", str(port),
                             "--crash-after", "3", "--tokens-per-s", "500"])
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "mock engine did not start"
                await asyncio.sleep(0.05)
            relay = TokenRelay("llamacpp")
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.post(f"http://127.0.0.1:{port}/completion",
                                        json={"prompt": "x", "n_predict": 50, "stream": True}) as r:
                    async for chunk in r.content.iter_any():
                        relay.feed(chunk)
            assert relay.tokens == 3 and relay.final is None
        assert proc.wait(timeout=10) == 3
    finally:
        proc.kill()
