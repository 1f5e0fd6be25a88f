"""Engine adapters: open one upstream token stream for a dispatched task and relay it.

An adapter knows one engine's wire protocol and nothing about admission or placement. The
``CoreDriver`` picks one per pool from the engine named in the pool's status (``ADAPTERS``),
hands it an ``UpstreamRequest`` and a ``Sink``, and turns what the sink hears back into core
events. Every upstream read is relayed as one buffer of our ``token`` frames (the ext
``TokenRelay``), so the SSE writer does one write per read.

- ``llamacpp``: llama.cpp's ``POST /completion`` with ``stream: true``; chat messages are
  rendered by the engine's own template (``POST /apply-template``) first. llama-server falls
  back to ChatML for a model without a template, so this works for every model it loads.
- ``openai``: any OpenAI-compatible engine (vLLM, TGI, llama.cpp's ``/v1``):
  ``/v1/completions``, or ``/v1/chat/completions`` for chat messages. ``stream_options:
  {include_usage: true}`` is asked for; an engine that refuses the field (HTTP 400/422 naming
  it) is asked again without it, and not asked again.
- ``mock``: no engine at all; deterministic words at a fixed rate, in process. For load
  tests and benchmarks of the orchestrator itself.

The sink hears ``tokens`` zero or more times, then exactly one of ``ended`` (with the prompt
tokens the engine found in its KV cache, when it says) or ``failed``;
nothing at all once the adapter's task is cancelled (even when the sink itself cancelled it
from inside ``tokens``). ``ended``'s ``tokens_out`` is the number of tokens relayed by this
stream, the count the client saw indices for, whatever the engine's own count says (an
engine counts tokens it sent no text for, and ``usage`` may be missing).

Timeouts, as deadlines: ``connect_s`` to open the connection; the first token is due
``first_token_s`` after the request (template, connection, the engine's queue and prefill
included), each next one ``between_tokens_s`` after the last token (reads that carry no token,
such as a chat role chunk, do not count); nothing past ``total_s`` after the request. A
failure before the first token is reported as ``before_first_token`` so the core may retry on
another pool; after it, it ends the task. Codes: ``DECODE_TIMEOUT`` for a deadline,
``WORKER_RESET`` for an engine that cannot be reached, answers an HTTP error or breaks the
stream, ``INVALID_PARAMS`` for an engine's 400/413/422 (the request itself was refused, e.g.
a prompt over the context), ``INTERNAL`` for an error frame in the stream or a bug here.
Cancelling the adapter's asyncio task closes the connection, which frees the engine's slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, fields
from typing import AsyncIterator, Mapping, Protocol

import aiohttp
import orjson

from ...ext.sse import TokenRelay, frame_events

log = logging.getLogger("llama_orch.adapters")

JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    connect_s: float = 5.0
    first_token_s: float = 120.0
    between_tokens_s: float = 30.0
    total_s: float = 3600.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"{f.name} must be > 0, got {getattr(self, f.name)!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamRequest:
    task_id: str
    engine_url: str
    model: str
    prompt: str | None
    messages: tuple[dict, ...] | None
    max_tokens: int
    seed: int | None = None
    #: Sampler settings by their OpenAI names (``wire.parse_sampling``); ``stop`` is a tuple.
    sampling: tuple[tuple[str, object], ...] = ()
    #: The ``i`` of the first token relayed (a stream resumed after ``start_index`` tokens).
    start_index: int = 0
    #: The client's ``X-Correlation-Id``, sent on to the engine with the request.
    correlation_id: str = ""
    #: W3C ``traceparent`` of the ``forward_to_engine`` span (tracing on), sent on to the engine.
    trace_headers: Mapping[str, str] | None = None


class Sink(Protocol):
    """Where an adapter reports: tokens as framed bytes, then exactly one of ended/failed."""

    def tokens(self, frames: bytes, count: int) -> None: ...

    def ended(self, *, tokens_out: int | None, decode_ms: float | None, cached_tokens: int | None = None) -> None: ...

    def failed(self, *, code: str, message: str, before_first_token: bool) -> None: ...


class Adapter(Protocol):
    name: str

    async def stream(self, request: UpstreamRequest, sink: Sink) -> None: ...


class _Report:
    """The sink, guarded: one terminal report, and nothing once the task is being cancelled."""

    __slots__ = ("sink", "task", "done", "got_token")

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.task = asyncio.current_task()
        self.done = False
        self.got_token = False

    @property
    def stopped(self) -> bool:
        return self.done or (self.task is not None and self.task.cancelling() > 0)

    def tokens(self, frames: bytes, count: int) -> None:
        if not self.stopped:
            self.got_token = True
            self.sink.tokens(frames, count)

    def ended(self, tokens_out: int, decode_ms: float | None, cached_tokens: int | None = None) -> None:
        if not self.stopped:
            self.done = True
            self.sink.ended(tokens_out=tokens_out, decode_ms=decode_ms, cached_tokens=cached_tokens)

    def failed(self, code: str, message: str) -> None:
        if not self.stopped:
            self.done = True
            self.sink.failed(code=code, message=message, before_first_token=not self.got_token)


class _Deadlines:
    """When the wait of the moment gives up: the first token is due ``first_token_s`` after the
    request, each next one ``between_tokens_s`` after the last token, none past ``total_s``."""

    __slots__ = ("timeouts", "started", "last_token")

    def __init__(self, timeouts: Timeouts, now: float) -> None:
        self.timeouts = timeouts
        self.started = now
        self.last_token: float | None = None

    def current(self) -> tuple[float, str]:
        """The deadline (loop time) and what missing it means."""
        t = self.timeouts
        if self.last_token is None:
            due, what = self.started + t.first_token_s, f"no first token within first_token_s={t.first_token_s:g} s"
        else:
            due, what = self.last_token + t.between_tokens_s, f"no token for between_tokens_s={t.between_tokens_s:g} s"
        end = self.started + t.total_s
        if end <= due:
            return end, f"the whole stream took longer than total_s={t.total_s:g} s"
        return due, what


class _Refused(Exception):
    """The engine refused or broke the exchange; carries the sink's code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def _error_text(resp: aiohttp.ClientResponse, limit: int = 4096) -> str:
    """The start of an error body, as text, without reading an unbounded one."""
    body = bytearray()
    while len(body) < limit:
        chunk = await resp.content.readany()
        if not chunk:
            break
        body += chunk
    return bytes(body[:300]).decode("utf-8", "replace").strip()


def _refusal(path: str, status: int, text: str) -> _Refused:
    code = "INVALID_PARAMS" if status in (400, 413, 422) else "WORKER_RESET"
    return _Refused(code, f"engine answered HTTP {status} to {path}: {text}")


class HttpAdapter:
    """Shared by the HTTP adapters: POST, then relay reads under the deadlines."""

    name = "http"
    dialect = "llamacpp"

    def __init__(self, session: aiohttp.ClientSession, timeouts: Timeouts = Timeouts(),
                 fresh: aiohttp.ClientSession | None = None) -> None:
        self.session = session
        #: Where a request goes again when a pooled connection turns out closed: a session whose
        #: every request opens a new connection (``force_close``); the main session when None.
        self.fresh = fresh
        self.timeouts = timeouts
        # Every field given: the deadlines do the rest, whatever the session's defaults.
        self.client_timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_read=None,
                                                    sock_connect=timeouts.connect_s)

    async def request_body(self, request: UpstreamRequest) -> tuple[str, dict]:
        raise NotImplementedError

    def retry_body(self, request: UpstreamRequest, body: dict, status: int, text: str) -> dict | None:
        """A body to send again after an HTTP error before any token, or None to fail."""
        return None

    async def stream(self, request: UpstreamRequest, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        report = _Report(sink)
        deadlines = _Deadlines(self.timeouts, loop.time())
        scope: asyncio.Timeout | None = None
        try:
            async with asyncio.timeout_at(deadlines.current()[0]) as scope:
                await self._relay(request, report, deadlines, scope, loop)
        except asyncio.CancelledError:
            raise
        except TimeoutError as exc:
            if scope is not None and scope.expired():
                report.failed("DECODE_TIMEOUT", deadlines.current()[1])
            else:  # aiohttp's own: sock_connect
                report.failed("WORKER_RESET", f"engine unreachable within connect_s={self.timeouts.connect_s:g} s: "
                                              f"{type(exc).__name__}: {exc}")
        except _Refused as exc:
            report.failed(exc.code, str(exc))
        except (aiohttp.ClientError, OSError) as exc:
            # Refused or reset connections, and a stream cut mid-body (ClientPayloadError).
            report.failed("WORKER_RESET", f"engine connection failed: {type(exc).__name__}: {exc}")
        except Exception as exc:
            log.exception("adapter %s failed on task %s", self.name, request.task_id)
            report.failed("INTERNAL", f"adapter {self.name}: {type(exc).__name__}: {exc}")

    @contextlib.asynccontextmanager
    async def _post(self, url: str, data: bytes, headers: dict[str, str] = JSON_HEADERS
                    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST on a pooled connection; when the engine had already closed it (it closes idle
        keep-alive connections), the request never reached the engine: it goes once more on a
        new connection, and nothing has failed (no failure reaches the pool's breaker)."""
        try:
            resp = await self.session.post(url, data=data, headers=headers, timeout=self.client_timeout)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):  # no connection at all: the engine is down
                raise
            log.info("engine closed a pooled connection before the request to %s (%s: %s); sending it on a new one",
                     url, type(exc).__name__, exc)
            resp = await (self.fresh or self.session).post(url, data=data, headers=headers,
                                                            timeout=self.client_timeout)
        try:
            yield resp
        finally:
            resp.release()  # an unread stream closes its connection, which frees the engine's slot
            await resp.wait_for_close()

    async def _relay(self, request: UpstreamRequest, report: _Report, deadlines: _Deadlines,
                     scope: asyncio.Timeout, loop: asyncio.AbstractEventLoop) -> None:
        relay = TokenRelay(self.dialect, start_index=request.start_index)
        path, body = await self.request_body(request)
        url = request.engine_url.rstrip("/") + path
        headers = {**JSON_HEADERS, "X-Correlation-Id": request.correlation_id} if request.correlation_id else JSON_HEADERS
        if request.trace_headers:
            headers = {**headers, **request.trace_headers}
        while True:
            # orjson, not aiohttp's ``json=`` (the standard library's encoder): the body is on every task's path
            async with self._post(url, orjson.dumps(body), headers) as resp:
                if resp.status != 200:
                    text = await _error_text(resp)
                    again = self.retry_body(request, body, resp.status, text)
                    if again is None:
                        raise _refusal(path, resp.status, text)
                    body = again
                    continue
                while True:
                    chunk = await resp.content.readany()
                    if not chunk:
                        break
                    frames, count, final = relay.feed(chunk)
                    if count:
                        deadlines.last_token = loop.time()
                        scope.reschedule(deadlines.current()[0])
                        report.tokens(frames, count)
                        if report.stopped:
                            return  # the sink cancelled this stream
                    if final is not None:
                        if final.get("kind") == "error":
                            report.failed("INTERNAL", f"engine error: {final.get('message')}")
                        else:
                            report.ended(relay.tokens, final.get("predicted_ms"), final.get("cached_tokens"))
                        return
            raise _Refused("WORKER_RESET", f"engine closed the stream after {relay.tokens} tokens, before its final frame")


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
        for name, value in request.sampling:  # llama.cpp's /completion takes the same names
            body[name] = list(value) if name == "stop" else value
        return "/completion", body

    async def _apply_template(self, request: UpstreamRequest) -> str:
        """The engine knows its model's chat template; ask it rather than guess one here."""
        path = "/apply-template"
        async with self.session.post(request.engine_url.rstrip("/") + path, headers=JSON_HEADERS,
                                     data=orjson.dumps({"messages": list(request.messages or ())}),
                                     timeout=self.client_timeout) as resp:
            if resp.status != 200:
                raise _refusal(path, resp.status, await _error_text(resp))
            raw = await resp.read()
        try:
            prompt = orjson.loads(raw)["prompt"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            prompt = None
        if not isinstance(prompt, str):
            raise _Refused("WORKER_RESET", f"engine answered {path} without a prompt: {raw[:200]!r}")
        return prompt


class OpenAIAdapter(HttpAdapter):
    name = "openai"
    dialect = "openai"

    def __init__(self, session: aiohttp.ClientSession, timeouts: Timeouts = Timeouts(),
                 fresh: aiohttp.ClientSession | None = None) -> None:
        super().__init__(session, timeouts, fresh)
        #: Engines that refused ``stream_options``: asked without it from then on.
        self.no_stream_options: set[str] = set()
        #: The model ids each engine serves (its ``GET /v1/models``), asked once per engine.
        self.served: dict[str, tuple[str, ...]] = {}

    async def model_name(self, request: UpstreamRequest) -> str:
        """The name the engine knows the model by. vLLM and TGI refuse any other (404), while the
        task names the model as the pools do (``file:/...``): an engine serving one model gets
        that model's id; one serving several, or unable to say, gets the task's own name."""
        engine = request.engine_url.rstrip("/")
        served = self.served.get(engine)
        if served is None:
            try:
                async with self.session.get(engine + "/v1/models", timeout=self.client_timeout) as resp:
                    listing = orjson.loads(await resp.read()) if resp.status == 200 else {}
                    definite = resp.status < 500  # a 404 is an answer; a 503 (loading) is not yet
                data = listing.get("data") if isinstance(listing, dict) else None
                served = tuple(m["id"] for m in data or () if isinstance(m, dict) and isinstance(m.get("id"), str))
            except (aiohttp.ClientError, OSError, orjson.JSONDecodeError):
                served, definite = (), False
            if definite:
                self.served[engine] = served  # else asked again with the next task
        if request.model in served or len(served) != 1:
            return request.model
        return served[0]

    async def request_body(self, request: UpstreamRequest) -> tuple[str, dict]:
        body: dict = {"model": await self.model_name(request), "max_tokens": request.max_tokens, "stream": True}
        if request.engine_url not in self.no_stream_options:
            body["stream_options"] = {"include_usage": True}
        if request.seed is not None:
            body["seed"] = request.seed
        for name, value in request.sampling:
            body[name] = list(value) if name == "stop" else value
        if request.messages is not None:
            return "/v1/chat/completions", {**body, "messages": list(request.messages)}
        return "/v1/completions", {**body, "prompt": request.prompt or ""}

    def retry_body(self, request: UpstreamRequest, body: dict, status: int, text: str) -> dict | None:
        if status == 404:  # a model the engine no longer serves (restarted with another?): ask it again next time
            self.served.pop(request.engine_url.rstrip("/"), None)
        if status in (400, 422) and "stream_options" in body and "stream_options" in text:
            log.info("engine %s refuses stream_options; asking without it", request.engine_url)
            self.no_stream_options.add(request.engine_url)
            return {k: v for k, v in body.items() if k != "stream_options"}
        return None


MOCK_WORDS = ("the", " llama", " orch", " pool", " token", " stream", " queue", " slot", " engine", " model")


class MockAdapter:
    """No engine: ``max_tokens`` words at ``tokens_per_s``, a few per write, in process.

    The word of index ``i`` is ``MOCK_WORDS[i % len(MOCK_WORDS)]``, whatever the request."""

    name = "mock"

    def __init__(self, tokens_per_s: float = 1000.0, tokens_per_write: int = 4) -> None:
        if not tokens_per_s > 0 or tokens_per_write < 1:
            raise ValueError("tokens_per_s must be > 0 and tokens_per_write >= 1")
        self.tokens_per_s = tokens_per_s
        self.tokens_per_write = tokens_per_write

    async def stream(self, request: UpstreamRequest, sink: Sink) -> None:
        report = _Report(sink)
        loop = asyncio.get_running_loop()
        i = start = request.start_index
        end = start + max(0, request.max_tokens)
        started = loop.time()
        while i < end:
            n = min(self.tokens_per_write, end - i)
            await asyncio.sleep(n / self.tokens_per_s)  # the decode rate being simulated, not a synchronisation
            events = [("token", orjson.dumps({"t": MOCK_WORDS[(i + k) % len(MOCK_WORDS)], "i": i + k})) for k in range(n)]
            report.tokens(frame_events(events), n)
            if report.stopped:
                return
            i += n
        report.ended(end - start, (loop.time() - started) * 1000.0)


#: Adapter kind per engine name in a pool's status.
ADAPTERS = {"llamacpp": "llamacpp", "vllm": "openai", "tgi": "openai", "openai": "openai", "mock": "mock"}


def adapter_for(engine: str, engine_url: str | None = None) -> str:
    """The adapter for a pool: a ``mock:`` engine URL is the in-process mock whatever the
    engine's name (so tasks for ``llamacpp`` place on it); otherwise by engine name, and an
    engine we do not know is assumed to speak OpenAI's API."""
    if engine_url is not None and engine_url.startswith("mock:"):
        return "mock"
    return ADAPTERS.get(engine, "openai")
