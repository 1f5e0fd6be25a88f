"""The OpenAI-compatible front door, in process: the orchestratord app with its core fed pools
directly, on a scripted in-process engine (``engine: "mock"``, no engine process). The last
tests use the official ``openai`` client against the app on a real socket."""

import asyncio
import contextlib
import uuid

import aiohttp
import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from aiohttp import web
from support import eventually

from llama_orch.core.admission import QueuePolicy
from llama_orch.core.events import PoolUpdated
from llama_orch.core.orchestrator import OrchestratorConfig
from llama_orch.core.types import PoolSnapshot, Priority
from llama_orch.ext.sse import frame_events
from llama_orch.io.orchestratord.adapters import MOCK_WORDS
from llama_orch.io.orchestratord.app import create_app
from llama_orch.io.orchestratord.driver import DRIVER
from llama_orch.io.orchestratord.openai_api import SESSION_NAMESPACE, OpenAIError, parse_request, terminal_error

MODEL = "file:/models/tiny.gguf"
UNREADY_MODEL = "file:/models/unready.gguf"


def words(n: int, start: int = 0) -> str:
    return "".join(MOCK_WORDS[i % len(MOCK_WORDS)] for i in range(start, start + n))


class ScriptedEngine:
    """In-process engine for the ``mock`` pools: ``MOCK_WORDS`` at a fixed rate; it records each
    request, and can stop early (an end-of-sequence) or break after some tokens."""

    name = "mock"

    def __init__(self, tokens_per_s: float = 2000.0, stop_after: int | None = None, fail_after: int | None = None):
        self.tokens_per_s, self.stop_after, self.fail_after = tokens_per_s, stop_after, fail_after
        self.requests = []

    async def stream(self, request, sink) -> None:
        self.requests.append(request)
        n = request.max_tokens if self.stop_after is None else min(self.stop_after, request.max_tokens)
        for i in range(n):
            if self.fail_after is not None and i == self.fail_after:
                sink.failed(code="WORKER_RESET", message="engine died", before_first_token=i == 0)
                return
            await asyncio.sleep(1 / self.tokens_per_s)  # the decode rate being simulated
            sink.tokens(frame_events([("token", orjson.dumps({"t": MOCK_WORDS[i % len(MOCK_WORDS)], "i": i}))]), 1)
        sink.ended(tokens_out=n, decode_ms=1.0)


def orchestratord_app(**cfg) -> web.Application:
    app = create_app(OrchestratorConfig(pool_stale_ms=3_600_000, **cfg), [])
    return app


def prime(app: web.Application, engine: ScriptedEngine, *, slots: int = 2, ctx_max: int = 4096):
    """Once the app started: the scripted engine, a ready pool serving MODEL and an unready one."""
    driver = app[DRIVER]
    driver.adapters["mock"] = engine
    driver.handle(PoolUpdated(snapshot=PoolSnapshot(pool_id="pool-0", ready=True, slots_total=slots, slots_free=slots,
                                                    engine="mock", model_ref=MODEL, ctx_max=ctx_max,
                                                    engine_url="mock://pool-0")))
    driver.handle(PoolUpdated(snapshot=PoolSnapshot(pool_id="pool-1", ready=False, engine="mock",
                                                    model_ref=UNREADY_MODEL, engine_url="mock://pool-1")))
    return driver


async def front_door(aiohttp_client, engine: ScriptedEngine | None = None, *, slots=2, ctx_max=4096, **cfg):
    engine = engine or ScriptedEngine()
    app = orchestratord_app(**cfg)
    client = await aiohttp_client(app)
    return client, prime(app, engine, slots=slots, ctx_max=ctx_max), engine


def chat(**kw):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
    body.update(kw)
    return body


def completion(**kw):
    body = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 5}
    body.update(kw)
    return body


async def chunks_of(resp) -> list:
    """The ``data:`` payloads of an OpenAI stream, JSON-decoded, ``[DONE]`` kept as a string."""
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    text = (await resp.read()).decode()
    assert text.endswith("\n\n")
    out = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return out


def assert_openai_error(body: dict, *, type_: str, code: str, param=None) -> dict:
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    assert (err["type"], err["code"], err["param"]) == (type_, code, param), err
    return err


# -- models ------------------------------------------------------------------------------------


async def test_models_lists_the_ready_pools_models_by_their_model_ref(aiohttp_client):
    client, _, _ = await front_door(aiohttp_client)
    resp = await client.get("/v1/models")
    listing = await resp.json()
    assert resp.status == 200 and listing["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in listing["data"]] == [(MODEL, "model", "llama-orch")]
    assert isinstance(listing["data"][0]["created"], int)
    one = await client.get(f"/v1/models/{MODEL}")
    assert one.status == 200 and (await one.json())["id"] == MODEL
    missing = await client.get("/v1/models/file:/models/nope.gguf")
    assert missing.status == 404
    assert_openai_error(await missing.json(), type_="invalid_request_error", code="model_not_found", param="model")


# -- chat and completions ----------------------------------------------------------------------


async def test_chat_completion_goes_through_admission_and_returns_one_body(aiohttp_client):
    client, driver, engine = await front_door(aiohttp_client)
    resp = await client.post("/v1/chat/completions", json=chat(
        messages=[{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]}],
        user="alice", seed=7, temperature=0.2), headers={"X-Correlation-Id": "corr-7"})
    body = await resp.json()
    assert resp.status == 200 and resp.headers["X-Correlation-Id"] == "corr-7"
    task_id = resp.headers["X-Task-Id"]
    assert body["id"] == f"chatcmpl-{task_id}" and body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": words(5)}, "logprobs": None,
                                "finish_reason": "length"}]
    usage = body["usage"]
    assert usage["completion_tokens"] == 5 and usage["total_tokens"] == usage["prompt_tokens"] + 5
    sent = engine.requests[0]
    assert sent.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hello\nthere"})
    assert sent.seed == 7 and sent.max_tokens == 5 and sent.model == MODEL
    assert sent.sampling == (("temperature", 0.2),)  # passed on to the engine
    assert str(uuid.uuid5(SESSION_NAMESPACE, "alice")) in driver.core.sessions  # one session per user


async def test_completion_finish_reason_is_stop_when_the_engine_stops_early(aiohttp_client):
    client, _, engine = await front_door(aiohttp_client, ScriptedEngine(stop_after=3))
    resp = await client.post("/v1/completions", json=completion(max_tokens=5))
    body = await resp.json()
    assert resp.status == 200 and body["object"] == "text_completion"
    assert body["id"] == f"cmpl-{resp.headers['X-Task-Id']}"
    assert body["choices"] == [{"index": 0, "text": words(3), "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"]["completion_tokens"] == 3
    assert engine.requests[0].prompt == "once upon a time" and engine.requests[0].messages is None
    resp = await client.post("/v1/completions", json=completion(prompt=["a list of one prompt"], max_tokens=3))
    assert (await resp.json())["choices"][0]["finish_reason"] == "length"


async def test_chat_stream_is_openai_chunks_with_usage_then_done(aiohttp_client):
    client, _, _ = await front_door(aiohttp_client)
    resp = await client.post("/v1/chat/completions", json=chat(max_completion_tokens=6, stream=True,
                                                               stream_options={"include_usage": True}))
    chunks = await chunks_of(resp)
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    task_id = resp.headers["X-Task-Id"]
    assert {c["id"] for c in chunks} == {f"chatcmpl-{task_id}"}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and {c["model"] for c in chunks} == {MODEL}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = chunks[1:-2]
    assert len(tokens) == 6 and all(c["choices"][0]["finish_reason"] is None for c in tokens)
    assert "".join(c["choices"][0]["delta"]["content"] for c in tokens) == words(6)
    assert all(c["usage"] is None for c in chunks[:-1])  # include_usage: null until the last chunk
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


async def test_completion_stream_without_usage(aiohttp_client):
    client, _, _ = await front_door(aiohttp_client, ScriptedEngine(stop_after=2))
    chunks = await chunks_of(await client.post("/v1/completions", json=completion(stream=True)))
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    assert {c["object"] for c in chunks} == {"text_completion"} and not any("usage" in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == words(2)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_headers_choose_priority_session_and_deadline(aiohttp_client):
    client, driver, _ = await front_door(aiohttp_client, ScriptedEngine(tokens_per_s=20))
    session = str(uuid.uuid4())
    resp = await client.post("/v1/chat/completions", json=chat(max_tokens=50, stream=True, user="ignored"),
                             headers={"X-Priority": "batch", "X-Session-Id": session, "X-Deadline-Ms": "60000"})
    assert resp.status == 200
    spec = driver.core.task(resp.headers["X-Task-Id"]).spec
    assert (spec.priority, spec.session_id, spec.deadline_ms, spec.engine) == (Priority.BATCH, session, 60_000, "mock")
    resp.close()
    late = await client.post("/v1/chat/completions", json=chat(), headers={"X-Deadline-Ms": "0"})
    assert late.status == 400
    assert_openai_error(await late.json(), type_="invalid_request_error", code="DEADLINE_UNMET")


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, body, param, words_in_message", [
    ("/v1/chat/completions", chat(messages=[]), "messages", "non-empty"),
    ("/v1/chat/completions", chat(messages="hi"), "messages", "non-empty"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]),
     "messages[1].role", "expected one of"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content[0]", "text parts"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": 3}]), "messages[0].content", "string"),
    ("/v1/chat/completions", chat(messages=[{"role": {}, "content": "hi"}]), "messages[0].role", "expected one of"),
    ("/v1/chat/completions", chat(messages=[{"role": ["user"], "content": "hi"}]), "messages[0].role",
     "expected one of"),
    ("/v1/chat/completions", chat(n=True), "n", "one choice"),
    ("/v1/chat/completions", chat(n=2), "n", "one choice"),
    ("/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "not supported"),
    ("/v1/chat/completions", chat(max_tokens=0), "max_tokens", "integer from 1"),
    ("/v1/chat/completions", chat(max_completion_tokens="5"), "max_completion_tokens", "integer"),
    ("/v1/chat/completions", chat(model=None), "model", "GET /v1/models"),
    ("/v1/completions", completion(prompt=["one", "two"]), "prompt", "one request per prompt"),
    ("/v1/completions", completion(prompt=[1, 2, 3]), "prompt", "token-id"),
    ("/v1/completions", completion(prompt=None), "prompt", "expected a string"),
    ("/v1/completions", completion(best_of=3), "best_of", "one choice"),
    ("/v1/completions", completion(echo=True), "echo", "not supported"),
    ("/v1/completions", completion(seed=-1), "seed", "integer from 0"),
    ("/v1/chat/completions", chat(temperature=2.5), "temperature", "[0, 2]"),
    ("/v1/completions", completion(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
])
async def test_bad_requests_are_400s_naming_the_param(aiohttp_client, path, body, param, words_in_message):
    client, driver, engine = await front_door(aiohttp_client)
    resp = await client.post(path, json=body)
    assert resp.status == 400
    err = assert_openai_error(await resp.json(), type_="invalid_request_error", code="INVALID_PARAMS", param=param)
    assert words_in_message in err["message"] and resp.headers["X-Correlation-Id"]
    assert not engine.requests and not driver.core.tasks


async def test_malformed_bodies_and_headers_are_400s(aiohttp_client):
    client, _, _ = await front_door(aiohttp_client)
    for resp in (await client.post("/v1/chat/completions", data=b"{not json"),
                 await client.post("/v1/completions", json=["a list"]),
                 await client.post("/v1/completions", json=completion(), headers={"X-Priority": "urgent"}),
                 await client.post("/v1/completions", json=completion(), headers={"X-Deadline-Ms": "soon"})):
        assert resp.status == 400
        assert_openai_error(await resp.json(), type_="invalid_request_error", code="INVALID_PARAMS")


async def test_unknown_model_is_a_404_in_openai_shape(aiohttp_client):
    client, _, _ = await front_door(aiohttp_client)
    for path, body in (("/v1/chat/completions", chat(model="gpt-4o")), ("/v1/completions", completion(model="x"))):
        resp = await client.post(path, json=body)
        assert resp.status == 404
        err = assert_openai_error(await resp.json(), type_="invalid_request_error", code="model_not_found", param="model")
        assert err["message"] == f"The model '{body['model']}' does not exist"


async def test_a_model_without_a_ready_pool_is_a_503_with_retry_after(aiohttp_client):
    client, _, _ = await front_door(aiohttp_client)
    resp = await client.post("/v1/chat/completions", json=chat(model=UNREADY_MODEL))
    assert resp.status == 503
    err = assert_openai_error(await resp.json(), type_="server_error", code="POOL_UNREADY")
    assert err["retriable"] is True and err["retry_after_ms"] >= 1
    assert int(resp.headers["Retry-After"]) >= 1 and resp.headers["X-Backoff-Ms"] == resp.headers["retry-after-ms"]


async def test_a_prompt_above_the_models_ctx_is_a_400(aiohttp_client):
    client, _, _ = await front_door(aiohttp_client, ctx_max=64)
    resp = await client.post("/v1/completions", json=completion(max_tokens=100))
    assert resp.status == 400
    assert "ctx" in assert_openai_error(await resp.json(), type_="invalid_request_error", code="INVALID_PARAMS")["message"]


async def test_full_queue_is_a_429_with_retry_after(aiohttp_client):
    client, driver, _ = await front_door(aiohttp_client, ScriptedEngine(tokens_per_s=20), slots=1,
                                         admission_capacity=1, admission_policy=QueuePolicy.REJECT)
    running = await client.post("/v1/chat/completions", json=chat(max_tokens=200, stream=True))
    queued = await client.post("/v1/completions", json=completion(max_tokens=200, stream=True))
    assert running.status == queued.status == 200
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 429
    err = assert_openai_error(await resp.json(), type_="rate_limit_error", code="ADMISSION_REJECT")
    assert err["policy_label"] == "reject" and err["retriable"] is True
    assert int(resp.headers["Retry-After"]) >= 1 and int(resp.headers["X-Backoff-Ms"]) >= 1
    running.close()
    queued.close()

    async def all_canceled():
        return not driver.core.tasks and driver.core.outcomes["canceled"] == 2
    await eventually(all_canceled, timeout=10, what="both streams canceled by their disconnects")


async def test_an_engine_failure_is_a_502_or_an_error_chunk_without_done(aiohttp_client):
    client, _, _ = await front_door(aiohttp_client, ScriptedEngine(fail_after=2))
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 502 and resp.headers["X-Task-Id"]
    err = assert_openai_error(await resp.json(), type_="server_error", code="WORKER_RESET")
    assert "engine died" in err["message"]
    chunks = await chunks_of(await client.post("/v1/completions", json=completion(stream=True)))
    assert "[DONE]" not in chunks
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == words(2)
    assert_openai_error(chunks[-1], type_="server_error", code="WORKER_RESET")


@pytest.mark.parametrize("data, status, type_, code", [
    ({"code": "INVALID_PARAMS", "message": "prompt over the context", "retriable": False}, 400,
     "invalid_request_error", "INVALID_PARAMS"),
    ({"code": "DECODE_TIMEOUT", "message": "no token for 30000 ms", "retriable": False}, 504, "server_error",
     "DECODE_TIMEOUT"),
    ({"code": "REPLICA_EXHAUSTED", "message": "3 attempts", "retriable": True, "retry_after_ms": 2500}, 503,
     "server_error", "REPLICA_EXHAUSTED"),
    ({"code": "QUEUE_FULL_DROP_LRU", "message": "evicted", "retriable": True, "retry_after_ms": 800}, 429,
     "rate_limit_error", "QUEUE_FULL_DROP_LRU"),
    ({"tokens_out": 3, "canceled": True, "reason": "shutdown"}, 503, "server_error", "CANCELED"),
    ({"code": "SOMETHING_NEW", "message": "?"}, 502, "server_error", "SOMETHING_NEW"),
])
def test_a_task_that_fails_after_admission_maps_to_an_http_status(data, status, type_, code):
    err = terminal_error(data)
    assert err.status == status
    assert_openai_error(err.body(), type_=type_, code=code)
    if status in (429, 503):
        retry_ms = data.get("retry_after_ms", 1000)
        assert err.headers == {"Retry-After": str(-(-retry_ms // 1000)), "X-Backoff-Ms": str(retry_ms),
                               "retry-after-ms": str(retry_ms)}


async def test_a_streaming_client_that_goes_away_frees_its_slot(aiohttp_client):
    client, driver, _ = await front_door(aiohttp_client, ScriptedEngine(tokens_per_s=20), slots=1)
    resp = await client.post("/v1/chat/completions", json=chat(max_tokens=500, stream=True))
    task_id = resp.headers["X-Task-Id"]
    seen = b""
    async for chunk in resp.content.iter_any():
        seen += chunk
        if seen.count(b"data: ") >= 3:  # the role chunk and two tokens
            break
    assert driver.core.task(task_id) is not None and driver.core.placer.leases("pool-0") == 1
    resp.close()

    async def freed():
        return driver.core.task(task_id) is None and driver.core.placer.leases("pool-0") == 0
    await eventually(freed, timeout=10, what="the task canceled and its slot freed")
    assert driver.core.outcomes["canceled"] == 1


# -- a real socket, served as web.run_app serves it; the official openai client ----------------


@contextlib.asynccontextmanager
async def served(engine: ScriptedEngine, *, slots: int = 2, **cfg):
    app = orchestratord_app(**cfg)
    runner = web.AppRunner(app, handler_cancellation=False)  # web.run_app's default: no cancel on disconnect
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        driver = prime(app, engine, slots=slots)
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", driver
    finally:
        await runner.cleanup()


def openai_client(url: str) -> openai.AsyncOpenAI:
    # No retries: the errors are what these tests look at.
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


async def test_a_non_streaming_client_that_goes_away_frees_its_slot_or_its_queue_place():
    async with served(ScriptedEngine(tokens_per_s=20), slots=1) as (url, driver):
        async with aiohttp.ClientSession() as http:
            running = asyncio.ensure_future(http.post(f"{url}/v1/completions", json=completion(max_tokens=500)))

            async def streaming():
                return any(t.tokens_out > 0 for t in driver.core.tasks.values())
            await eventually(streaming, timeout=10, what="the first task streaming")
            queued = asyncio.ensure_future(http.post(f"{url}/v1/completions", json=completion(max_tokens=500)))

            async def waiting():
                return driver.core.queue_depth() == 1
            await eventually(waiting, timeout=10, what="the second task queued")
            # Queued: no token wakes its reader, the periodic liveness check notices the leave.
            queued.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await queued

            async def queue_place_freed():
                return driver.core.queue_depth() == 0 and driver.core.outcomes["canceled"] == 1
            await eventually(queue_place_freed, timeout=10, what="the queued task canceled")
            assert len(driver.core.tasks) == 1  # the running one goes on
            # Streaming: the next token wakes the reader, which finds the connection closed.
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running

            async def freed():
                return not driver.core.tasks and driver.core.placer.leases("pool-0") == 0
            await eventually(freed, timeout=10, what="the disconnect noticed without handler cancellation")
            assert driver.core.outcomes["canceled"] == 2


async def test_the_official_openai_client_works_unchanged():
    async with served(ScriptedEngine(stop_after=4)) as (url, _):
        client = openai_client(url)
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        assert (await client.models.retrieve(MODEL)).id == MODEL

        reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=8, seed=1)
        assert reply.choices[0].message.content == words(4) and reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens == 4 and reply.id.startswith("chatcmpl-")

        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=3, stream=True, stream_options={"include_usage": True})
        parts, reasons, usage = [], [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                reasons.append(chunk.choices[0].finish_reason)
            usage = chunk.usage or usage
        assert "".join(parts) == words(3) and reasons[-1] == "length" and usage.completion_tokens == 3

        text = await client.completions.create(model=MODEL, prompt="once", max_tokens=2)
        assert text.choices[0].text == words(2) and text.choices[0].finish_reason == "length"
        pieces = [c.choices[0].text async for c in await client.completions.create(model=MODEL, prompt="once",
                                                                                   max_tokens=6, stream=True)]
        assert "".join(pieces) == words(4)


async def test_the_official_openai_client_raises_its_own_errors():
    async with served(ScriptedEngine(tokens_per_s=20), slots=1, admission_capacity=1) as (url, driver):
        client = openai_client(url)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert missing.value.code == "model_not_found" and missing.value.param == "model"
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model=MODEL, prompt="x", n=2)
        assert bad.value.param == "n"
        with pytest.raises(openai.InternalServerError) as unready:
            await client.completions.create(model=UNREADY_MODEL, prompt="x")
        assert unready.value.status_code == 503 and unready.value.code == "POOL_UNREADY"

        running = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                       max_tokens=300, stream=True)
        queued = await client.completions.create(model=MODEL, prompt="x", max_tokens=300, stream=True)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.completions.create(model=MODEL, prompt="x")
        assert limited.value.code == "ADMISSION_REJECT" and int(limited.value.response.headers["Retry-After"]) >= 1
        await running.close()
        await queued.close()

        async def canceled():
            return not driver.core.tasks
        await eventually(canceled, timeout=10, what="closed streams canceled")

    async with served(ScriptedEngine(fail_after=1)) as (url, _):
        stream = await openai_client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True)
        with pytest.raises(openai.APIError, match="engine died"):
            async for _ in stream:
                pass


# -- fuzzing: any JSON in any field is an OpenAIError or a task, never another exception ---------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
_OPENAI_FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "seed", "user", "stream",
                  "stream_options", "n", "best_of", "tools", "functions", "response_format", "echo", "suffix",
                  "temperature", "top_p", "top_k", "min_p", "stop", "presence_penalty", "frequency_penalty"]
_MESSAGE_FIELDS = ["role", "content", "name"]


class _Placer:
    """Just enough of the core's placer for ``parse_request``: one usable pool serving MODEL."""

    def pool_ids(self):
        return ["pool-0"]

    def snapshot(self, pool_id):
        return PoolSnapshot(pool_id=pool_id, ready=True, engine="mock", model_ref=MODEL)

    def is_usable(self, pool_id):
        return True


class _Request:
    headers: dict = {}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat_=st.booleans(),
       changes=st.dictionaries(st.sampled_from(_OPENAI_FIELDS), _json_values, max_size=4),
       message=st.dictionaries(st.sampled_from(_MESSAGE_FIELDS), _json_values, max_size=3))
def test_any_json_in_any_openai_field_is_a_400_or_a_task(chat_, changes, message):
    body = chat(**changes) if chat_ else completion(**changes)
    if chat_ and "messages" not in changes:
        body["messages"] = [{"role": "user", "content": "hi", **message}]
    try:
        parsed = parse_request(_Request(), body, _Placer(), chat=chat_)
    except OpenAIError as exc:
        assert 400 <= exc.status < 500 and exc.message
        return
    assert parsed.spec.max_tokens >= 1 and parsed.spec.ctx >= parsed.spec.max_tokens


# -- the streaming fast path: token frames become chunks without parsing JSON -------------------

def _framer(chat: bool, model: str = 'm"\\odel', include_usage: bool = False):
    from types import SimpleNamespace

    from llama_orch.io.orchestratord.openai_api import ChunkFramer

    return ChunkFramer(SimpleNamespace(chat=chat, include_usage=include_usage, model=model), "cmpl-x", 1)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.text(min_size=1), min_size=1, max_size=8), first=st.integers(0, 10**6),
       chat=st.booleans(), with_id=st.booleans())
def test_token_frames_become_the_same_chunks_as_the_parsed_path(texts, first, chat, with_id):
    """Any token text (quotes, backslashes, newlines, ``event: ``, ``,"i":``) comes out as the chunk
    the parsing path makes, or the frame is left to that path (None), never as something else."""
    from llama_orch.io.orchestratord.driver import _with_id

    framer = _framer(chat)
    frame = frame_events([("token", orjson.dumps({"t": t, "i": first + k})) for k, t in enumerate(texts)])
    if with_id:
        frame = _with_id(frame, 7)
    fast = framer.tokens_only(frame)
    slow = b"".join(framer.token(t) for t in texts)
    assert fast is None or fast == slow
    if not any("event: " in t for t in texts):
        assert fast == slow  # only a text that itself says ``event: `` is left to the slow path


def test_frames_with_other_events_are_left_to_the_parsing_path():
    framer = _framer(chat=False)
    frame = frame_events([("token", orjson.dumps({"t": "a", "i": 0})), ("end", orjson.dumps({"tokens_out": 1}))])
    assert framer.tokens_only(frame) is None
    assert framer.tokens_only(frame_events([("started", b"{}")])) is None
