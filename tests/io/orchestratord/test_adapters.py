"""Engine adapters against the mock engine in process: relayed frames, one terminal report,
the deadlines, engine faults, and cancellation freeing the engine's slot."""

from __future__ import annotations

import asyncio
import logging
import random
import subprocess
import sys

import aiohttp
import orjson
import pytest
from cluster_support import free_port
from support import eventually

from llama_orch.ext.sse import SSEParser
from llama_orch.io.orchestratord.adapters import (
    ADAPTERS,
    MOCK_WORDS,
    LlamaCppAdapter,
    MockAdapter,
    OpenAIAdapter,
    Timeouts,
    UpstreamRequest,
    adapter_for,
)
from llama_orch.io.provisioner.mock_engine import ENGINE, WORDS, MockConfig, create_app

FAST = Timeouts(connect_s=2.0, first_token_s=5.0, between_tokens_s=5.0, total_s=20.0)
CHAT = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"})
CHATML = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
KINDS = {"llamacpp": LlamaCppAdapter, "openai": OpenAIAdapter}


class RecordingSink:
    """Keeps every report; checks each ``tokens`` call's frames against its count."""

    def __init__(self) -> None:
        self.parser = SSEParser()
        self.events: list[dict] = []
        self.calls: list[int] = []
        self.ends: list[dict] = []
        self.failures: list[dict] = []

    def tokens(self, frames: bytes, count: int) -> None:
        events = self.parser.feed(frames)
        assert self.parser.pending == 0, "a tokens() buffer ended inside a frame"
        assert [name for name, _ in events] == ["token"] * count, frames
        self.events += [orjson.loads(data) for _, data in events]
        self.calls.append(count)

    def ended(self, *, tokens_out, decode_ms, cached_tokens=None) -> None:
        self.ends.append({"tokens_out": tokens_out, "decode_ms": decode_ms, "cached_tokens": cached_tokens})

    def failed(self, *, code, message, before_first_token) -> None:
        self.failures.append({"code": code, "message": message, "before_first_token": before_first_token})

    @property
    def texts(self) -> list[str]:
        return [e["t"] for e in self.events]

    @property
    def indices(self) -> list[int]:
        return [e["i"] for e in self.events]

    def only_failure(self) -> dict:
        assert self.ends == [] and len(self.failures) == 1, (self.ends, self.failures)
        return self.failures[0]

    def only_end(self) -> dict:
        assert self.failures == [] and len(self.ends) == 1, (self.ends, self.failures)
        return self.ends[0]


def request(url: str, *, prompt: str | None = "hello there", messages=None, max_tokens: int = 8, seed: int | None = 3,
            start_index: int = 0) -> UpstreamRequest:
    return UpstreamRequest(task_id="t-1", engine_url=url, model="mock.gguf", prompt=prompt, messages=messages,
                           max_tokens=max_tokens, seed=seed, start_index=start_index)


def mock_words(n: int, seed: int | None) -> list[str]:
    """What the mock engine generates for ``n_predict=n`` with ``seed``."""
    return [" " + w for w in random.Random(seed or 0).choices(WORDS, k=n)]


async def run(adapter, req: UpstreamRequest, sink: RecordingSink, bound: float = 15.0) -> None:
    """The adapter's stream must return by itself; the bound only turns a hang into a failure."""
    await asyncio.wait_for(adapter.stream(req, sink), bound)


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def mock_engine(aiohttp_server):
    async def start(**kw):
        server = await aiohttp_server(create_app(MockConfig(**kw)))
        return str(server.make_url("")).rstrip("/"), server.app[ENGINE]
    return start



async def slots_busy(session: aiohttp.ClientSession, url: str) -> list[bool]:
    async with session.get(f"{url}/slots") as r:
        return [s["is_processing"] for s in await r.json()]


# -- streams that end well ---------------------------------------------------------------------

@pytest.mark.parametrize("kind, chat, path", [
    ("llamacpp", False, "/completion"),
    ("llamacpp", True, "/completion"),
    ("openai", False, "/v1/completions"),
    ("openai", True, "/v1/chat/completions"),
])
@pytest.mark.parametrize("start_index", [0, 5])
async def test_a_stream_relays_every_token_as_our_frames_and_ends_once(mock_engine, session, kind, chat, path,
                                                                      start_index):
    url, engine = await mock_engine(tokens_per_s=2000)
    sink = RecordingSink()
    req = request(url + "/", prompt=None if chat else "hello there", messages=CHAT if chat else None, max_tokens=9,
                  start_index=start_index)
    await run(KINDS[kind](session, FAST), req, sink)

    assert sink.indices == list(range(start_index, start_index + 9))
    assert sink.texts == mock_words(9, seed=3)
    assert sum(sink.calls) == 9 and all(sink.calls)
    end = sink.only_end()
    assert end["tokens_out"] == 9
    assert (end["decode_ms"] is not None) == (kind == "llamacpp")  # only llama.cpp's frames carry timings
    paths = [p for p, _ in engine.requests]
    if kind == "llamacpp" and chat:
        assert paths == ["/apply-template", "/completion"]
        assert engine.requests[0][1]["messages"] == list(CHAT)
        assert engine.requests[1][1]["prompt"] == CHATML, "the engine must be sent the prompt its template rendered"
    else:
        assert paths == [path]
    body = engine.requests[-1][1]
    assert body["stream"] is True and body.get("seed") == 3
    if kind == "llamacpp":
        assert body["n_predict"] == 9 and (chat or body["prompt"] == "hello there")
    else:
        assert body["max_tokens"] == 9 and body["model"] == "mock.gguf"
        assert body["stream_options"] == {"include_usage": True}
        assert body["messages"] == list(CHAT) if chat else body["prompt"] == "hello there"


@pytest.mark.parametrize("chat", [False, True])
async def test_openai_asks_again_without_stream_options_when_refused_and_remembers(mock_engine, session, chat):
    url, engine = await mock_engine(tokens_per_s=2000, reject_stream_options=True)
    adapter = OpenAIAdapter(session, FAST)
    req = request(url, prompt=None if chat else "x", messages=CHAT if chat else None, max_tokens=6)
    for _ in range(2):
        sink = RecordingSink()
        await run(adapter, req, sink)
        # No usage in the stream now: the count is still what was relayed.
        assert sink.only_end()["tokens_out"] == 6 and sink.indices == list(range(6))
    sent = [("stream_options" in body) for _, body in engine.requests]
    assert sent == [True, False, False], "refused once, then never sent again to that engine"


async def test_a_chat_stream_without_usage_still_counts_its_tokens(mock_engine, session):
    # llama-server sends chat usage only on request; our count never depended on it.
    url, engine = await mock_engine(tokens_per_s=2000)
    adapter = OpenAIAdapter(session, FAST)
    adapter.no_stream_options.add(url)
    sink = RecordingSink()
    await run(adapter, request(url, prompt=None, messages=CHAT, max_tokens=4), sink)
    assert "stream_options" not in engine.requests[0][1]
    assert sink.only_end()["tokens_out"] == 4 and len(sink.events) == 4


async def test_the_openai_adapter_names_the_model_as_the_engine_serves_it(mock_engine, session, aiohttp_server):
    # vLLM refuses a model name it does not serve; tasks name models as the pools do (file:/...).
    from dataclasses import replace

    from aiohttp import web

    url, engine = await mock_engine(tokens_per_s=2000, model="served-name")
    adapter = OpenAIAdapter(session, FAST)
    for model in ("file:/models/tiny.gguf", "served-name"):
        sink = RecordingSink()
        await run(adapter, replace(request(url, max_tokens=2), model=model), sink)
        sink.only_end()
    assert [body["model"] for _, body in engine.requests] == ["served-name", "served-name"]
    assert adapter.served == {url: ("served-name",)}  # asked once per engine

    @web.middleware
    async def no_listing(request, handler):
        if request.path == "/v1/models":
            raise web.HTTPNotFound()
        return await handler(request)
    app = create_app(MockConfig(tokens_per_s=2000, model="served-name"))
    app.middlewares.append(no_listing)
    quiet = await aiohttp_server(app)
    quiet_url = str(quiet.make_url("")).rstrip("/")
    sink = RecordingSink()
    await run(adapter, replace(request(quiet_url, max_tokens=2), model="file:/models/tiny.gguf"), sink)
    sink.only_end()
    assert quiet.app[ENGINE].requests[-1][1]["model"] == "file:/models/tiny.gguf"  # cannot say: the task's name
    assert adapter.served[quiet_url] == ()  # a definite answer: not asked again for every task


# -- failures before the first token -----------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
async def test_an_engine_500_fails_before_the_first_token(mock_engine, session, kind):
    url, _ = await mock_engine(error_rate=1.0)
    sink = RecordingSink()
    await run(KINDS[kind](session, FAST), request(url), sink)
    failure = sink.only_failure()
    assert failure["code"] == "WORKER_RESET" and failure["before_first_token"] is True
    assert "HTTP 500" in failure["message"] and "injected fault" in failure["message"]
    assert sink.events == []


async def test_a_refused_template_is_the_requests_fault_not_the_pools(mock_engine, session):
    url, engine = await mock_engine()
    sink = RecordingSink()
    await run(LlamaCppAdapter(session, FAST), request(url, prompt=None, messages=({"role": "user"},)), sink)
    failure = sink.only_failure()
    assert failure["code"] == "INVALID_PARAMS" and failure["before_first_token"] is True
    assert "/apply-template" in failure["message"] and "content" in failure["message"]
    assert "/completion" not in [p for p, _ in engine.requests], "no completion after a refused template"


@pytest.mark.parametrize("kind", KINDS)
async def test_connection_refused_fails_before_the_first_token(session, kind):
    sink = RecordingSink()
    await run(KINDS[kind](session, FAST), request(f"http://127.0.0.1:{free_port()}"), sink)
    failure = sink.only_failure()
    assert failure["code"] == "WORKER_RESET" and failure["before_first_token"] is True
    assert "connect" in failure["message"].lower()


@pytest.mark.parametrize("kind, chat", [("llamacpp", False), ("openai", False), ("openai", True)])
async def test_a_stall_before_the_first_token_is_a_decode_timeout_and_frees_the_slot(mock_engine, session, kind, chat):
    # The chat stream sends its role chunk before stalling: a read with no token moves no deadline.
    url, engine = await mock_engine(stall_after=0, slots=1)
    sink = RecordingSink()
    timeouts = Timeouts(connect_s=2, first_token_s=0.3, between_tokens_s=0.05, total_s=20)
    req = request(url, prompt=None if chat else "x", messages=CHAT if chat else None)
    await run(KINDS[kind](session, timeouts), req, sink)
    failure = sink.only_failure()
    assert failure["code"] == "DECODE_TIMEOUT" and failure["before_first_token"] is True
    assert "first_token_s=0.3" in failure["message"]
    await eventually(lambda: _free(session, url), timeout=5, what="the stalled slot to be freed")


async def _free(session, url) -> bool:
    return not any(await slots_busy(session, url))


@pytest.mark.parametrize("kind", KINDS)
async def test_an_engine_with_no_free_slot_times_out_before_the_first_token(mock_engine, session, kind):
    # The engine queues the request and sends not even its headers: the first-token deadline
    # covers that wait as well as the reads.
    url, engine = await mock_engine(stall_after=0, slots=1)
    patient = Timeouts(first_token_s=60, total_s=120)  # holds the slot for the whole test
    hog = asyncio.ensure_future(run(LlamaCppAdapter(session, patient), request(url), RecordingSink(), bound=60))
    try:
        await eventually(lambda: _busy(session, url), timeout=5,
                         what="the one slot to be taken")
        sink = RecordingSink()
        timeouts = Timeouts(connect_s=2, first_token_s=0.3, between_tokens_s=5, total_s=20)
        await run(KINDS[kind](session, timeouts), request(url), sink, bound=5)
        failure = sink.only_failure()
        assert failure["code"] == "DECODE_TIMEOUT" and failure["before_first_token"] is True
        assert "first_token_s" in failure["message"]
        assert not hog.done()
    finally:
        hog.cancel()
        await asyncio.gather(hog, return_exceptions=True)


async def _busy(session, url) -> bool:
    return all(await slots_busy(session, url))


# -- failures after the first token ------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
async def test_a_stall_after_tokens_is_a_decode_timeout_after_the_first_token(mock_engine, session, kind):
    url, _ = await mock_engine(stall_after=3, tokens_per_s=1000)
    sink = RecordingSink()
    timeouts = Timeouts(connect_s=2, first_token_s=5, between_tokens_s=1, total_s=20)
    await run(KINDS[kind](session, timeouts), request(url, max_tokens=10), sink)
    failure = sink.only_failure()
    assert failure["code"] == "DECODE_TIMEOUT" and failure["before_first_token"] is False
    assert "between_tokens_s=1" in failure["message"]
    assert sink.indices == [0, 1, 2]


@pytest.mark.parametrize("kind", KINDS)
async def test_the_total_deadline_ends_a_slow_stream_that_keeps_flowing(mock_engine, session, kind):
    url, _ = await mock_engine(tokens_per_s=25)
    sink = RecordingSink()
    timeouts = Timeouts(connect_s=2, first_token_s=5, between_tokens_s=5, total_s=1.5)
    await run(KINDS[kind](session, timeouts), request(url, max_tokens=1000), sink)
    failure = sink.only_failure()
    assert failure["code"] == "DECODE_TIMEOUT" and failure["before_first_token"] is False
    assert "the whole stream" in failure["message"] and "total_s=1.5" in failure["message"]
    assert 0 < len(sink.events) < 1000 and sink.indices == list(range(len(sink.events)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("after", [0, 2])
async def test_an_upstream_error_frame_is_an_internal_failure(mock_engine, session, kind, after):
    url, _ = await mock_engine(error_after=after, tokens_per_s=1000)
    sink = RecordingSink()
    await run(KINDS[kind](session, FAST), request(url, max_tokens=10), sink)
    failure = sink.only_failure()
    assert failure["code"] == "INTERNAL" and failure["before_first_token"] is (after == 0)
    assert "injected mid-stream error" in failure["message"]
    assert len(sink.events) == after


async def _start_mock_process(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_orch.io.provisioner.mock_engine", "--port", str(port), *args])
    url = f"http://127.0.0.1:{port}"

    async def healthy() -> bool:
        assert proc.poll() is None, "mock engine exited early"
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{url}/health") as r:
                return r.status == 200
        except aiohttp.ClientConnectionError:
            return False
    await eventually(healthy, timeout=30, what="the mock engine process")
    return proc, url


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("after", [0, 3])
async def test_an_engine_crash_is_a_worker_reset(session, kind, after):
    proc, url = await _start_mock_process("--crash-after", str(after), "--tokens-per-s", "500")
    try:
        sink = RecordingSink()
        await run(KINDS[kind](session, FAST), request(url, max_tokens=50), sink)
        failure = sink.only_failure()
        assert failure["code"] == "WORKER_RESET" and failure["before_first_token"] is (after == 0)
        assert "ClientPayloadError" in failure["message"], "a chunked body cut short, read by readany()"
        assert len(sink.events) == after
        assert proc.wait(timeout=10) == 3
    finally:
        proc.kill()
        proc.wait()


# -- cancellation --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stall_after", [None, 0])
async def test_cancelling_closes_the_upstream_and_frees_the_engine_slot(mock_engine, session, kind, stall_after):
    url, engine = await mock_engine(slots=1, tokens_per_s=50, stall_after=stall_after)
    sink = RecordingSink()
    task = asyncio.ensure_future(KINDS[kind](session, FAST).stream(request(url, max_tokens=10_000), sink))
    await eventually(lambda: _busy(session, url), timeout=5, what="the engine slot to be taken")
    if stall_after is None:
        await eventually(lambda: _true(len(sink.events) >= 2), timeout=5, what="tokens to flow")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: _free(session, url), timeout=5, what="the engine slot to be freed")
    assert engine.busy == [False]
    assert sink.ends == [] and sink.failures == []
    assert sink.indices == list(range(len(sink.events)))


async def _true(value) -> bool:
    return bool(value)


class CancellingSink(RecordingSink):
    """Cancels the adapter's task from inside tokens(), as the driver's CloseUpstream does."""

    def tokens(self, frames: bytes, count: int) -> None:
        super().tokens(frames, count)
        asyncio.current_task().cancel()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_cancelled_by_its_sink_reports_nothing_more(mock_engine, session, kind):
    # One token then the end, likely in the same read: the end must not be reported either.
    url, _ = await mock_engine(tokens_per_s=5000)
    sink = CancellingSink()
    task = asyncio.ensure_future(KINDS[kind](session, FAST).stream(request(url, max_tokens=1), sink))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert len(sink.events) == 1 and sink.ends == [] and sink.failures == []


# -- bad input is a failure, never an exception ------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
async def test_a_bad_start_index_is_reported_not_raised(mock_engine, session, kind, caplog):
    url, engine = await mock_engine()
    sink = RecordingSink()
    with caplog.at_level(logging.ERROR, logger="llama_orch.adapters"):
        await run(KINDS[kind](session, FAST), request(url, start_index=-1), sink)
    failure = sink.only_failure()
    assert failure["code"] == "INTERNAL" and failure["before_first_token"] is True
    assert "start_index" in failure["message"]
    assert not engine.requests


def test_timeouts_must_be_positive():
    with pytest.raises(ValueError, match="first_token_s"):
        Timeouts(first_token_s=0)


# -- the in-process mock adapter ---------------------------------------------------------------

@pytest.mark.parametrize("start_index, max_tokens, per_write", [(0, 11, 4), (7, 5, 1), (3, 0, 4)])
async def test_the_mock_adapter_streams_deterministic_words(start_index, max_tokens, per_write):
    sinks = []
    for _ in range(2):
        sink = RecordingSink()
        req = request("unused", max_tokens=max_tokens, start_index=start_index)
        await run(MockAdapter(tokens_per_s=5000, tokens_per_write=per_write), req, sink)
        sinks.append(sink)
    sink = sinks[0]
    assert sink.indices == list(range(start_index, start_index + max_tokens))
    assert sink.texts == [MOCK_WORDS[i % len(MOCK_WORDS)] for i in sink.indices]
    assert sink.texts == sinks[1].texts
    assert all(1 <= n <= per_write for n in sink.calls)
    assert sink.only_end()["tokens_out"] == max_tokens


async def test_the_mock_adapter_reports_nothing_once_cancelled():
    sink = RecordingSink()
    task = asyncio.ensure_future(MockAdapter(tokens_per_s=100, tokens_per_write=1).stream(request("x", max_tokens=1000),
                                                                                          sink))
    await eventually(lambda: _true(sink.events), timeout=5, what="a first mock token")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sink.ends == [] and sink.failures == []


def test_engines_map_to_adapters():
    assert adapter_for("llamacpp") == "llamacpp" and adapter_for("vllm") == "openai"
    assert adapter_for("mock") == "mock" and adapter_for("something-new") == "openai"
    assert adapter_for("llamacpp", "mock://pool-0") == "mock" and adapter_for("llamacpp", "http://e:1") == "llamacpp"
    assert set(ADAPTERS.values()) == {"llamacpp", "openai", "mock"}


# -- the engine's own count is not ours ---------------------------------------------------------

def scripted_engine(frames: list[bytes]):
    """An engine that answers every POST with these SSE frames, one write each."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for frame in frames:
            await resp.write(frame)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/{path:.*}", handler)
    return app


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"


@pytest.mark.parametrize("kind, frames", [
    # llama.cpp holds back an incomplete UTF-8 character: a token with no text, counted by the engine.
    ("llamacpp", [sse({"content": "a", "stop": False}), sse({"content": "", "stop": False}),
                  sse({"content": "\u00e9", "stop": False}),
                  sse({"content": "", "stop": True, "tokens_predicted": 4, "timings": {"predicted_ms": 2.5}})]),
    ("openai", [sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]}),
                sse({"choices": [{"index": 0, "delta": {"content": "a"}}]}),
                sse({"choices": [{"index": 0, "delta": {"content": "\u00e9"}, "finish_reason": "stop"}]}),
                sse({"choices": [], "usage": {"completion_tokens": 4, "prompt_tokens": 2}}), sse(b"[DONE]")]),
])
async def test_tokens_out_is_what_was_relayed_not_the_engines_count(aiohttp_server, session, kind, frames):
    server = await aiohttp_server(scripted_engine(frames))
    sink = RecordingSink()
    await run(KINDS[kind](session, FAST), request(str(server.make_url("")).rstrip("/"), start_index=10), sink)
    assert sink.texts == ["a", "\u00e9"] and sink.indices == [10, 11]
    end = sink.only_end()
    assert end["tokens_out"] == 2
    assert end["decode_ms"] == (2.5 if kind == "llamacpp" else None)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_that_ends_without_its_final_frame_is_a_worker_reset(aiohttp_server, session, kind):
    frame = {"content": "a", "stop": False} if kind == "llamacpp" else {"choices": [{"index": 0, "text": "a"}]}
    server = await aiohttp_server(scripted_engine([sse(frame)]))
    sink = RecordingSink()
    await run(KINDS[kind](session, FAST), request(str(server.make_url("")).rstrip("/")), sink)
    failure = sink.only_failure()
    assert failure["code"] == "WORKER_RESET" and failure["before_first_token"] is False
    assert "before its final frame" in failure["message"] and sink.texts == ["a"]


@pytest.mark.parametrize("kind", ["llamacpp", "openai"])
async def test_sampler_settings_reach_the_engine(mock_engine, session, kind):
    from dataclasses import replace

    from llama_orch.io.orchestratord.wire import parse_sampling

    url, engine = await mock_engine(tokens_per_s=2000)
    sampling = parse_sampling({"temperature": 0.2, "top_p": 0.9, "top_k": 40, "stop": ["\n\n", "END"]})
    req = replace(request(url, max_tokens=3), sampling=sampling)
    sink = RecordingSink()
    await run(KINDS[kind](session, FAST), req, sink)
    sink.only_end()
    body = engine.requests[-1][1]
    assert (body["temperature"], body["top_p"], body["top_k"], body["stop"]) == (0.2, 0.9, 40, ["\n\n", "END"])


@pytest.mark.parametrize("body, field", [
    ({"temperature": 3}, "temperature"), ({"top_p": -0.1}, "top_p"), ({"top_k": 1.5}, "top_k"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"), ({"presence_penalty": True}, "presence_penalty"),
])
def test_bad_sampler_settings_name_the_field(body, field):
    from llama_orch.io.orchestratord.wire import WireError, parse_sampling

    with pytest.raises(WireError) as err:
        parse_sampling(body)
    assert err.value.field == field


# -- a pooled connection the engine had closed --------------------------------------------------

class DropsReusedConnections(asyncio.Protocol):
    """An engine that answers one streamed /completion per connection with keep-alive, and drops
    a connection sent a second request without answering it: what a client meets when the engine
    closes an idle keep-alive connection just as the client reuses it."""

    answered = 0

    def connection_made(self, transport) -> None:
        self.transport, self.buffer, self.served = transport, b"", False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), b"0"))
        if not sep or len(rest) < length:
            return
        self.buffer = rest[length:]
        if self.served:
            self.transport.abort()  # the request never reaches the engine
            return
        self.served = True
        body = (b'data: {"content":" a","stop":false}\n\n'
                b'data: {"content":"","stop":true,"tokens_predicted":1,"tokens_evaluated":2,'
                b'"timings":{"cache_n":0,"prompt_n":2}}\n\n')
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: keep-alive\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        type(self).answered += 1


async def test_a_request_on_a_pooled_connection_the_engine_closed_goes_again_on_a_new_one(caplog):
    loop = asyncio.get_running_loop()
    DropsReusedConnections.answered = 0
    server = await loop.create_server(DropsReusedConnections, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    caplog.set_level(logging.INFO, "llama_orch.adapters")
    try:
        async with aiohttp.ClientSession() as pooled, aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)) as fresh:
            adapter = LlamaCppAdapter(pooled, FAST, fresh)
            sinks = [RecordingSink() for _ in range(3)]
            for n, sink in enumerate(sinks):
                await adapter.stream(UpstreamRequest(task_id=f"t{n}", engine_url=url, model="m", prompt="hi",
                                                     messages=None, max_tokens=1), sink)
    finally:
        server.close()
        await server.wait_closed()
    # every request was answered, none failed: no pool breaker hears of a failure
    assert [len(s.ends) for s in sinks] == [1, 1, 1] and [s.failures for s in sinks] == [[], [], []]
    assert DropsReusedConnections.answered == 3
    assert "closed a pooled connection" in caplog.text
