"""Engine adapters: open one upstream token stream for a dispatched task and relay it.

An adapter knows one engine's wire protocol and nothing about admission or placement. The
``CoreDriver`` picks one per pool from the engine named in the pool's status (``ADAPTERS``),
hands it an ``UpstreamRequest`` and a ``Sink``, and turns what the sink hears back into core
events. Every upstream read is relayed as one buffer of our ``token`` frames (the ext
``TokenRelay``), so the SSE writer does one write per read.

- ``llamacpp``: llama.cpp's ``POST /completion`` with ``stream: true``; chat messages are
  rendered by the engine's own template (``POST /apply-template``) first.
- ``openai``: any OpenAI-compatible engine (vLLM, TGI, llama.cpp's ``/v1``):
  ``/v1/completions``, or ``/v1/chat/completions`` for chat messages.
- ``mock``: no engine at all; deterministic words at a fixed rate, in process. For load
  tests and benchmarks of the orchestrator itself.

Timeouts: ``connect_s`` to open the connection, ``first_token_s`` from the request to the
first token (prefill and queueing in the engine), ``between_tokens_s`` between reads once
tokens flow, ``total_s`` for the whole stream. A failure before the first token is reported as
``before_first_token`` so the core may retry on another pool; after it, it ends the task.
Cancelling the adapter's asyncio task closes the connection, which frees the engine's slot.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import orjson

from ..ext.sse import TokenRelay, frame_events


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    connect_s: float = 5.0
    first_token_s: float = 120.0
    between_tokens_s: float = 30.0
    total_s: float = 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamRequest:
    task_id: str
    engine_url: str
    model: str
    prompt: str | None
    messages: tuple[dict, ...] | None
    max_tokens: int
    seed: int | None = None
    start_index: int = 0


class Sink(Protocol):
    """Where an adapter reports: tokens as framed bytes, then exactly one of ended/failed."""

    def tokens(self, frames: bytes, count: int) -> None: ...

    def ended(self, *, tokens_out: int | None, decode_ms: float | None) -> None: ...

    def failed(self, *, code: str, message: str, before_first_token: bool) -> None: ...


class Adapter(Protocol):
    name: str

    async def stream(self, request: UpstreamRequest, sink: Sink) -> None: ...


class _Deadlines:
    """The read deadline of the moment: first token, then between tokens, never past the total."""

    def __init__(self, timeouts: Timeouts, loop: asyncio.AbstractEventLoop) -> None:
        self.timeouts = timeouts
        self.loop = loop
        self.end = loop.time() + timeouts.total_s
        self.got_token = False

    def next_read(self) -> tuple[float, str]:
        t = self.timeouts
        step, what = (t.between_tokens_s, "between tokens") if self.got_token else (t.first_token_s, "to the first token")
        remaining = self.end - self.loop.time()
        if remaining <= step:
            return max(0.0, remaining), f"the whole stream ({t.total_s:g} s)"
        return step, f"{what} ({step:g} s)"


class HttpAdapter:
    """Shared by the HTTP adapters: POST, then relay reads under the timeouts."""

    name = "http"
    dialect = "llamacpp"

    def __init__(self, session: aiohttp.ClientSession, timeouts: Timeouts = Timeouts()) -> None:
        self.session = session
        self.timeouts = timeouts

    async def request_body(self, request: UpstreamRequest) -> tuple[str, dict]:
        raise NotImplementedError

    async def stream(self, request: UpstreamRequest, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        deadlines = _Deadlines(self.timeouts, loop)
        relay = TokenRelay(self.dialect, start_index=request.start_index)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect_s)
        try:
            path, body = await self.request_body(request)
            async with self.session.post(f"{request.engine_url}{path}", json=body, timeout=timeout) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:200]
                    sink.failed(code="WORKER_RESET", message=f"engine answered HTTP {resp.status}: {text}",
                                before_first_token=not deadlines.got_token)
                    return
                while True:
                    wait_s, what = deadlines.next_read()
                    try:
                        chunk = await asyncio.wait_for(resp.content.readany(), wait_s)
                    except asyncio.TimeoutError:
                        sink.failed(code="DECODE_TIMEOUT", message=f"engine sent nothing within {what}",
                                    before_first_token=not deadlines.got_token)
                        return
                    if not chunk:
                        break
                    frames, count, final = relay.feed(chunk)
                    if count:
                        deadlines.got_token = True
                        sink.tokens(frames, count)
                    if final is not None:
                        if final.get("kind") == "error":
                            sink.failed(code="INTERNAL", message=f"engine error: {final.get('message')}",
                                        before_first_token=not deadlines.got_token)
                        else:
                            sink.ended(tokens_out=final.get("tokens_predicted"), decode_ms=final.get("predicted_ms"))
                        return
            sink.failed(code="WORKER_RESET", message="engine closed the stream before its final frame",
                        before_first_token=not deadlines.got_token)
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            sink.failed(code="WORKER_RESET", message=f"{type(exc).__name__}: {exc}",
                        before_first_token=not deadlines.got_token)


class LlamaCppAdapter(HttpAdapter):
    name = "llamacpp"
    dialect = "llamacpp"

    async def request_body(self, request: UpstreamRequest) -> tuple[str, dict]:
        prompt = request.prompt
        if request.messages is not None:
            prompt = await self._apply_template(request)
        body = {"prompt": prompt or "", "n_predict": request.max_tokens, "stream": True, "cache_prompt": True}
        if request.seed is not None:
            body["seed"] = request.seed
        return "/completion", body

    async def _apply_template(self, request: UpstreamRequest) -> str:
        """The engine knows its model's chat template; ask it rather than guess one here."""
        timeout = aiohttp.ClientTimeout(total=self.timeouts.first_token_s, sock_connect=self.timeouts.connect_s)
        async with self.session.post(f"{request.engine_url}/apply-template", json={"messages": list(request.messages)},
                                     timeout=timeout) as resp:
            if resp.status != 200:
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                                  message=f"apply-template answered HTTP {resp.status}")
            return orjson.loads(await resp.read())["prompt"]


class OpenAIAdapter(HttpAdapter):
    name = "openai"
    dialect = "openai"

    async def request_body(self, request: UpstreamRequest) -> tuple[str, dict]:
        body: dict = {"model": request.model, "max_tokens": request.max_tokens, "stream": True,
                      "stream_options": {"include_usage": True}}
        if request.seed is not None:
            body["seed"] = request.seed
        if request.messages is not None:
            return "/v1/chat/completions", {**body, "messages": list(request.messages)}
        return "/v1/completions", {**body, "prompt": request.prompt or ""}


MOCK_WORDS = ("the", " llama", " orch", " pool", " token", " stream", " queue", " slot", " engine", " model")


class MockAdapter:
    """No engine: ``max_tokens`` words at ``tokens_per_s``, a few per write, in process."""

    name = "mock"

    def __init__(self, tokens_per_s: float = 1000.0, tokens_per_write: int = 4) -> None:
        self.tokens_per_s = tokens_per_s
        self.tokens_per_write = tokens_per_write

    async def stream(self, request: UpstreamRequest, sink: Sink) -> None:
        i = request.start_index
        end = request.start_index + request.max_tokens
        started = asyncio.get_running_loop().time()
        while i < end:
            n = min(self.tokens_per_write, end - i)
            await asyncio.sleep(n / self.tokens_per_s)  # the decode rate being simulated, not a synchronisation
            events = [("token", orjson.dumps({"t": MOCK_WORDS[(i + k) % len(MOCK_WORDS)], "i": i + k})) for k in range(n)]
            sink.tokens(frame_events(events), n)
            i += n
        sink.ended(tokens_out=request.max_tokens, decode_ms=(asyncio.get_running_loop().time() - started) * 1000.0)


#: Adapter kind per engine name in a pool's status.
ADAPTERS = {"llamacpp": "llamacpp", "vllm": "openai", "tgi": "openai", "openai": "openai", "mock": "mock"}


def adapter_for(engine: str) -> str:
    return ADAPTERS.get(engine, "openai")
