"""The baselines, run as the harness runs them (subprocesses announcing ``READY <url>``) in
front of two fast engines: the relay passes streams through byte for byte and round-robin,
the two-step relay turns a stored task into llama.cpp frames, bare admission echoes 202."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from support import running

from llama_orch.ext.sse import TokenRelay

BASELINES = "llama_orch.io.bench.baselines"


@pytest.fixture(scope="module")
def stack():
    # Paced, so a stream of a few hundred tokens is still running when a client walks away.
    engine = ["llama_orch.io.bench.fast_engine", "--mode", "paced", "--pace-ms", "1"]
    with running(engine + ["--model", "a.gguf"], engine + ["--model", "b.gguf"]) as engines:
        joined = ",".join(engines)
        with running([f"{BASELINES}.relay", "--engines", joined, "--backlog", "64"],
                     [f"{BASELINES}.relay_two_step", "--engines", joined],
                     [f"{BASELINES}.bare_admission"]) as (relay, two_step, bare):
            yield {"engines": engines, "relay": relay, "two_step": two_step, "bare": bare}


async def test_relay_passes_the_engine_stream_through_unchanged_and_round_robin(stack):
    body = {"model": "x", "prompt": "hello", "max_tokens": 9, "stream": True}
    async with aiohttp.ClientSession() as session:
        direct = []
        for engine in stack["engines"]:
            async with session.post(engine + "/v1/completions", json=body) as resp:
                direct.append(await resp.read())
        relayed = []
        for _ in range(4):
            async with session.post(stack["relay"] + "/v1/completions", json=body) as resp:
                assert resp.status == 200 and resp.content_type == "text/event-stream"
                relayed.append(await resp.read())
    assert direct[0] != direct[1]  # the engines name their models: which one answered shows
    assert sorted(relayed[:2]) == sorted(direct) and relayed[2:] == relayed[:2]
    relay = TokenRelay("openai")
    _, count, final = relay.feed(relayed[0])
    assert count == 9 and final["kind"] == "end"


async def test_relay_passes_status_and_content_type_through(stack):
    async with aiohttp.ClientSession() as session:
        async with session.post(stack["relay"] + "/v1/completions", json={"max_tokens": 2}) as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            assert (await resp.json())["choices"][0]["finish_reason"] == "length"
        async with session.post(stack["relay"] + "/v1/completions", data=b"{nope") as resp:
            assert resp.status == 400  # the engine's answer, relayed


async def test_two_step_relay_streams_the_stored_task(stack):
    url = stack["two_step"]
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v2/tasks", json={"task_id": "t-1", "prompt": "hi", "max_tokens": 5}) as resp:
            assert resp.status == 202
            accepted = await resp.json()
        assert accepted == {"task_id": "t-1", "streams": {"sse": "/v2/tasks/t-1/events"}}
        async with session.get(url + accepted["streams"]["sse"]) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            relay, final = TokenRelay("llamacpp"), None
            async for chunk in resp.content.iter_any():
                final = relay.feed(chunk)[2] or final
        assert relay.tokens == 5 and final["kind"] == "end" and final["tokens_predicted"] == 5
        async with session.get(url + "/v2/tasks/t-1/events") as resp:
            assert resp.status == 404  # taken by the first GET
        async with session.post(url + "/v2/tasks", json={"task_id": "t-2"}) as resp:
            assert resp.status == 202
        async with session.get(url + "/v2/tasks/t-2/events") as resp:
            relay = TokenRelay("llamacpp")
            relay.feed(await resp.read())
            assert relay.tokens == 16  # max_tokens defaults to 16


@pytest.mark.parametrize("body", [b'{"prompt": "no id"}', b'{"task_id": 7}', b"[]", b"{broken"])
async def test_two_step_relay_refuses_a_task_without_a_string_id(stack, body):
    async with aiohttp.ClientSession() as session:
        async with session.post(stack["two_step"] + "/v2/tasks", data=body) as resp:
            assert resp.status == 400


async def test_two_step_relay_unknown_task_is_404(stack):
    async with aiohttp.ClientSession() as session:
        async with session.get(stack["two_step"] + "/v2/tasks/never-submitted/events") as resp:
            assert resp.status == 404


async def test_bare_admission_echoes_the_task_id(stack):
    async with aiohttp.ClientSession() as session:
        async with session.post(stack["bare"] + "/v2/tasks", json={"task_id": "t-9", "prompt": "x"}) as resp:
            assert resp.status == 202 and resp.content_type == "application/json"
            assert await resp.json() == {"task_id": "t-9", "queue_position": 0}
        async with session.post(stack["bare"] + "/v2/tasks", data=b'{"prompt": "no id"}') as resp:
            assert resp.status == 400


async def test_a_client_leaving_mid_stream_is_no_error(stack):
    async with aiohttp.ClientSession() as session:
        async with session.post(stack["two_step"] + "/v2/tasks", json={"task_id": "gone", "max_tokens": 500}) as resp:
            assert resp.status == 202
    body = b'{"max_tokens":500,"stream":true}'
    for url, request in [
        (stack["relay"], b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)),
        (stack["two_step"], b"GET /v2/tasks/gone/events HTTP/1.1\r\nHost: x\r\n\r\n"),
    ]:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        async with asyncio.timeout(10):
            await reader.readuntil(b"data: ")
        writer.transport.abort()  # no traceback on the baselines' stderr: checked when they exit
    async with aiohttp.ClientSession() as session:
        async with session.post(stack["relay"] + "/v1/completions", json={"max_tokens": 2, "stream": True}) as resp:
            assert resp.status == 200 and (await resp.read()).endswith(b"data: [DONE]\n\n")
