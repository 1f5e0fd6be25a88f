"""The engine adapters against a real llama-server (cached build, the tiny model): its native
``/completion`` with ``/apply-template`` for chat, and its OpenAI ``/v1`` endpoints."""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.error
import urllib.request

import aiohttp
import orjson
import pytest
from cluster_support import CACHE, free_port

from llama_orch.ext.sse import SSEParser
from llama_orch.io.orchestratord.adapters import LlamaCppAdapter, OpenAIAdapter, Timeouts, UpstreamRequest
from llama_orch.io.provisioner.tiny_model import write_tiny_model

MODEL = CACHE / "models" / "tiny.gguf"
TIMEOUTS = Timeouts(connect_s=5, first_token_s=30, between_tokens_s=30, total_s=60)
CHAT = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})


@pytest.fixture(scope="module")
def engine_url(tmp_path_factory, llama_server):
    binary = llama_server
    if not MODEL.is_file():  # the first e2e test of a fresh machine: nothing has written it yet
        write_tiny_model(MODEL)
    port = free_port()
    log = (tmp_path_factory.mktemp("llama-server") / "llama-server.log").open("wb")
    proc = subprocess.Popen([str(binary), "-m", str(MODEL), "--host", "127.0.0.1", "--port", str(port), "-np", "2",
                             "-c", "1024", "--slots"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"llama-server exited with {proc.returncode}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "llama-server did not become healthy"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Sink:
    def __init__(self) -> None:
        self.parser = SSEParser()
        self.tokens_seen: list[dict] = []
        self.reports: list[tuple[str, dict]] = []

    def tokens(self, frames: bytes, count: int) -> None:
        events = self.parser.feed(frames)
        assert [name for name, _ in events] == ["token"] * count
        self.tokens_seen += [orjson.loads(data) for _, data in events]

    def ended(self, **kw) -> None:
        self.reports.append(("ended", kw))

    def failed(self, **kw) -> None:
        self.reports.append(("failed", kw))


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def request(url: str, *, chat: bool, max_tokens: int = 24) -> UpstreamRequest:
    return UpstreamRequest(task_id="t", engine_url=url, model="tiny", prompt=None if chat else "Once upon a time",
                           messages=CHAT if chat else None, max_tokens=max_tokens, seed=7)


async def stream(adapter, req: UpstreamRequest) -> Sink:
    sink = Sink()
    await asyncio.wait_for(adapter.stream(req, sink), 60)
    assert len(sink.reports) == 1 and sink.reports[0][0] == "ended", sink.reports
    n = len(sink.tokens_seen)
    assert 0 < n <= req.max_tokens
    assert [t["i"] for t in sink.tokens_seen] == list(range(n))
    assert sink.reports[0][1]["tokens_out"] == n, "tokens_out is the count relayed"
    return sink


@pytest.mark.parametrize("chat", [False, True])
async def test_llamacpp_adapter_streams_from_llama_server(engine_url, session, chat):
    sink = await stream(LlamaCppAdapter(session, TIMEOUTS), request(engine_url, chat=chat))
    assert sink.reports[0][1]["decode_ms"] is not None  # from llama.cpp's timings


async def test_llama_server_renders_chat_for_a_model_without_a_template(engine_url, session):
    # The tiny model has no chat template: llama-server falls back to ChatML, which is what the
    # llamacpp adapter sends to /completion.
    async with session.post(f"{engine_url}/apply-template", json={"messages": list(CHAT)}) as r:
        assert r.status == 200
        prompt = (await r.json())["prompt"]
    assert prompt == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("usage", [True, False])
async def test_openai_adapter_streams_from_llama_servers_v1(engine_url, session, chat, usage):
    adapter = OpenAIAdapter(session, TIMEOUTS)
    if not usage:
        adapter.no_stream_options.add(engine_url)  # as for an engine that refused stream_options
    await stream(adapter, request(engine_url, chat=chat))
    assert (engine_url in adapter.no_stream_options) is not usage, "llama-server accepts stream_options"


async def test_a_prompt_over_the_context_is_refused_as_invalid_params(engine_url, session):
    sink = Sink()
    req = UpstreamRequest(task_id="t", engine_url=engine_url, model="tiny", prompt="w " * 2000, messages=None,
                          max_tokens=4)
    await asyncio.wait_for(LlamaCppAdapter(session, TIMEOUTS).stream(req, sink), 60)
    assert sink.tokens_seen == [] and len(sink.reports) == 1
    kind, report = sink.reports[0]
    assert kind == "failed" and report["code"] == "INVALID_PARAMS" and report["before_first_token"] is True
    assert "HTTP 400" in report["message"] and "context" in report["message"]
