"""The mock engine: llama-server's HTTP protocol, as observed, with configurable faults.

For benchmarks and fault injection only; tests that check behaviour run the real
``llama-server``. It answers ``/health`` (503 ``Loading model`` during a configurable start,
then 200), ``/props``, ``/slots``, ``/metrics``, ``/apply-template`` (chat messages rendered
as ChatML, llama-server's fallback for a model without a template), ``/completion`` (llama.cpp
frames, a final ``stop: true`` frame with ``timings``, no ``[DONE]``), ``/v1/completions`` and
``/v1/chat/completions`` (OpenAI chunks ending in ``data: [DONE]``; chat opens with a role
chunk and carries ``usage`` only when ``stream_options.include_usage`` asks, as llama-server
does). Each slot keeps its last prompt, as llama-server's do: a request takes the free slot
sharing the longest prefix of words with it, and that prefix is reported as cached
(``timings.cache_n``, ``usage.prompt_tokens_details.cached_tokens``) and not prefilled again. Requests beyond the slot count wait for a slot, as llama-server's do; a client that
goes away frees its slot. A prompt of the context size or more is refused (HTTP 400
``exceed_context_size_error``), as llama-server refuses it.

Timing, as a service-time model the replay simulator shares (``SimConfig``): a prompt's first
token is due ``first_token_ms + prefill_ms_per_token * prompt_tokens`` after its slot is taken,
and token ``i`` ``i / tokens_per_s`` seconds after that. Each token is paced against its own due
time (never a sleep per token, which overshoots on a loaded machine and drifts), so the engine
keeps the speed it was given. A prompt's tokens are its whitespace-separated words. Faults: ``crash_after`` tokens (the process exits), ``stall_after``
tokens (the stream goes silent until the client leaves), ``error_after`` tokens (an error
frame ends the stream), ``error_rate`` (HTTP 500s, seeded), ``reject_stream_options`` (HTTP
400 for an OpenAI request carrying ``stream_options``, as a strict server answers).

Every generation request's path and body are kept in ``app[ENGINE].requests`` for tests.
"""

from __future__ import annotations

import argparse
import collections
import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass

import orjson
from aiohttp import web

from ...core.prefix import common_prefix_length
from ..daemon import prepare
from ..http import json_response

WORDS = ("the", "llama", "orch", "pool", "token", "stream", "queue", "slot", "engine", "model", "fast", "ready")


@dataclass(frozen=True, slots=True, kw_only=True)
class MockConfig:
    slots: int = 4
    ctx: int = 2048  # per slot (llama-server's ``n_ctx`` of a slot)
    tokens_per_s: float = 200.0
    prefill_ms_per_token: float = 0.0
    first_token_ms: float = 0.0
    start_delay_s: float = 0.0
    crash_after: int | None = None
    stall_after: int | None = None
    error_after: int | None = None
    error_rate: float = 0.0
    reject_stream_options: bool = False
    seed: int = 0
    model: str = "mock.gguf"


class MockEngine:
    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.slots = asyncio.Semaphore(config.slots)
        self.busy = [False] * config.slots
        # As llama-server: each slot keeps the last prompt it served (and what it generated), a
        # request takes the free slot sharing the longest prefix with it, and that prefix is not
        # evaluated again (``timings.cache_n``; the prefill is charged for the rest).
        self.kept: list[list[str]] = [[] for _ in range(config.slots)]
        self.cached = [0] * config.slots
        # Tokens each slot's KV cache holds (its prompt and what it generated so far) and those it
        # generated, as llama-server's ``/slots`` reports them (``n_prompt_tokens``, ``n_decoded``).
        self.held = [0] * config.slots
        self.decoded = [0] * config.slots
        self.rng = random.Random(config.seed)
        self.prompt_tokens_total = 0
        self.predicted_total = 0
        self.deferred = 0
        #: ``(path, body)`` of every generation and template request, in arrival order.
        self.requests: collections.deque[tuple[str, dict]] = collections.deque(maxlen=64)  # the latest, for tests

    def loading(self) -> bool:
        return time.monotonic() - self.started < self.config.start_delay_s

    # -- endpoints --------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if self.loading():
            return json_response({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}, 503)
        return json_response({"status": "ok"})

    async def props(self, request: web.Request) -> web.Response:
        return json_response({"default_generation_settings": {"n_ctx": self.config.ctx, "params": {}},
                      "total_slots": self.config.slots, "model_path": self.config.model,
                      "build_info": "mock-engine", "is_sleeping": False})

    async def v1_models(self, request: web.Request) -> web.Response:
        # llama-server lists the one model it serves, by its alias or path
        return json_response({"object": "list", "data": [{"id": self.config.model, "object": "model", "created": 0,
                                                          "owned_by": "llamacpp"}]})

    async def slots_state(self, request: web.Request) -> web.Response:
        # llama-server's shape (b1-0c1e570): ``n_prompt_tokens`` counts the tokens the slot holds,
        # the generated ones included, while it runs and after
        return json_response([{"id": i, "n_ctx": self.config.ctx, "speculative": False, "is_processing": busy,
                               "n_prompt_tokens": self.held[i],
                               "next_token": [{"has_next_token": busy, "n_decoded": self.decoded[i]}]}
                              for i, busy in enumerate(self.busy)])

    async def metrics(self, request: web.Request) -> web.Response:
        busy = sum(self.busy)
        text = (
            "# TYPE llamacpp:prompt_tokens_total counter\n"
            f"llamacpp:prompt_tokens_total {self.prompt_tokens_total}\n"
            "# TYPE llamacpp:tokens_predicted_total counter\n"
            f"llamacpp:tokens_predicted_total {self.predicted_total}\n"
            "# TYPE llamacpp:requests_processing gauge\n"
            f"llamacpp:requests_processing {busy}\n"
            "# TYPE llamacpp:requests_deferred gauge\n"
            f"llamacpp:requests_deferred {self.deferred}\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def apply_template(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _invalid("invalid JSON body")
        if not isinstance(body, dict) or "messages" not in body:
            return _invalid("'messages' is required")
        messages = body["messages"]
        if not isinstance(messages, list):
            return _invalid("Expected 'messages' to be an array")
        self.requests.append((request.path, body))
        parts = []
        for m in messages:
            if not isinstance(m, dict) or "content" not in m and m.get("role") != "assistant":
                return _invalid("All non-assistant messages must contain 'content'")
            content = m.get("content") or ""
            if isinstance(content, list):  # OpenAI content parts: the text ones, a line each
                content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            parts.append(f"<|im_start|>{m.get('role', 'user')}\n{content}<|im_end|>\n")
        parts.append("<|im_start|>assistant\n")
        return json_response({"prompt": "".join(parts)})

    async def completion(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "llamacpp")

    async def v1_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "openai-text")

    async def v1_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "openai-chat")

    # -- generation -------------------------------------------------------------------------

    async def _generate(self, request: web.Request, dialect: str) -> web.StreamResponse:
        if self.loading():
            return json_response({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}, 503)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _invalid("invalid JSON body")
        if not isinstance(body, dict):
            return _invalid("the body must be a JSON object")
        self.requests.append((request.path, body))
        if dialect != "llamacpp" and self.config.reject_stream_options and "stream_options" in body:
            return _invalid("Unrecognized request argument supplied: stream_options")
        if self.config.error_rate and self.rng.random() < self.config.error_rate:
            return json_response({"error": {"code": 500, "message": "injected fault", "type": "server_error"}}, 500)
        n_predict = body.get("n_predict", body.get("max_tokens", 16)) or 16
        if not isinstance(n_predict, int) or isinstance(n_predict, bool):
            return _invalid("n_predict: expected an integer")
        # As llama-server: generation stops at the context (-1 means "until then"), so what one
        # request makes is bounded by --ctx-size, never by the number a client asked for.
        n_predict = self.config.ctx if n_predict < 0 else min(n_predict, self.config.ctx)
        seed = body.get("seed")
        seed = seed if isinstance(seed, int) else 0
        prompt = body.get("prompt") or " ".join(m.get("content", "") for m in body.get("messages", []))
        prompt_words = str(prompt).split()
        prompt_tokens = max(1, len(prompt_words))
        if prompt_tokens >= self.config.ctx:
            return json_response({"error": {"code": 400, "type": "exceed_context_size_error",
                                            "message": "the request exceeds the available context size, try increasing it",
                                            "n_prompt_tokens": prompt_tokens, "n_ctx": self.config.ctx}}, 400)
        stream = bool(body.get("stream", False))
        options = body.get("stream_options")
        usage = dialect != "openai-chat" or isinstance(options, dict) and bool(options.get("include_usage"))
        words = random.Random(seed).choices(WORDS, k=n_predict)
        self.deferred += 1
        async with self.slots:
            self.deferred -= 1
            slot = self._take_slot(prompt_words, body.get("cache_prompt", True) is not False)
            try:
                return await self._run(request, dialect, slot, words, prompt_tokens, stream, usage)
            finally:
                self.busy[slot] = False
                self.kept[slot] = prompt_words + words

    def _take_slot(self, prompt_words: list[str], reuse: bool) -> int:
        best, best_common = -1, -1
        for slot, kept in enumerate(self.kept):
            if self.busy[slot]:
                continue
            common = common_prefix_length(kept, prompt_words) if reuse else 0
            if common > best_common:
                best, best_common = slot, common
        self.busy[best] = True
        self.held[best] = max(1, len(prompt_words))
        self.decoded[best] = 0
        # the last prompt token is always evaluated again (its logits start the generation)
        self.cached[best] = min(best_common, max(0, len(prompt_words) - 1))
        return best

    def prefill_s(self, prompt_tokens: int, cached: int = 0) -> float:
        return (self.config.first_token_ms + self.config.prefill_ms_per_token * (prompt_tokens - cached)) / 1000.0

    async def _run(self, request, dialect, slot, words, prompt_tokens, stream, usage) -> web.StreamResponse:
        self.prompt_tokens_total += prompt_tokens
        started = time.monotonic()
        if not stream:
            await asyncio.sleep(self.prefill_s(prompt_tokens, self.cached[slot]) + len(words) / self.config.tokens_per_s)
            self.predicted_total += len(words)
            self.held[slot] += len(words)
            self.decoded[slot] = len(words)
            text = "".join(" " + w for w in words)
            return json_response(self._final(dialect, text, len(words), prompt_tokens, started, slot, stream=False))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            await self._stream(request, resp, dialect, slot, words, prompt_tokens, started, usage)
        except ConnectionResetError:
            pass  # the client went away mid-stream: the slot is free again, as llama-server frees it
        return resp

    async def _stream(self, request, resp, dialect, slot, words, prompt_tokens, started, usage) -> None:
        loop = asyncio.get_running_loop()
        first_due = loop.time() + self.prefill_s(prompt_tokens, self.cached[slot])
        per_token = 1.0 / self.config.tokens_per_s
        if dialect == "openai-chat":
            role = {"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}
            await resp.write(b"data: " + orjson.dumps(self._openai(dialect, [role])) + b"\n\n")
        for i, word in enumerate(words):
            if self.config.crash_after is not None and i >= self.config.crash_after:
                os._exit(3)  # a crash mid-stream, as an engine would die: no goodbye
            if self.config.stall_after is not None and i >= self.config.stall_after:
                await self._until_gone(request)
                return
            if self.config.error_after is not None and i >= self.config.error_after:
                error = {"code": 500, "message": "injected mid-stream error", "type": "server_error"}
                await resp.write(b"data: " + orjson.dumps({"error": error}) + b"\n\n")
                await resp.write_eof()
                return
            wait = first_due + i * per_token - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the simulated decode time: paced against the token's due time
            self.predicted_total += 1
            self.held[slot] += 1
            self.decoded[slot] += 1
            await resp.write(b"data: " + orjson.dumps(self._chunk(dialect, " " + word, i, slot)) + b"\n\n")
        final = self._final(dialect, "", len(words), prompt_tokens, started, slot, stream=True)
        if dialect == "openai-chat":
            usage_chunk = final.pop("usage")
            await resp.write(b"data: " + orjson.dumps(final) + b"\n\n")
            if usage:
                await resp.write(b"data: " + orjson.dumps({**self._openai(dialect, []), "usage": usage_chunk}) + b"\n\n")
        else:
            await resp.write(b"data: " + orjson.dumps(final) + b"\n\n")
        if dialect != "llamacpp":
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()

    @staticmethod
    async def _until_gone(request: web.Request) -> None:
        """A stalled stream holds its slot until the client gives up and closes the connection."""
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.02)

    def _openai(self, dialect: str, choices: list) -> dict:
        if dialect == "openai-text":
            return {"id": "cmpl-mock", "object": "text_completion", "model": self.config.model, "choices": choices}
        return {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": self.config.model, "choices": choices}

    def _chunk(self, dialect: str, text: str, i: int, slot: int) -> dict:
        if dialect == "llamacpp":
            return {"index": 0, "content": text, "tokens": [i], "stop": False, "id_slot": slot,
                    "tokens_predicted": i + 1, "tokens_evaluated": 0}
        if dialect == "openai-text":
            return self._openai(dialect, [{"index": 0, "text": text, "finish_reason": None}])
        return self._openai(dialect, [{"index": 0, "delta": {"content": text}, "finish_reason": None}])

    def _final(self, dialect, text, n, prompt_tokens, started, slot, *, stream: bool) -> dict:
        cached = self.cached[slot]
        prompt_ms = self.prefill_s(prompt_tokens, cached) * 1000
        ms = max(0.0, (time.monotonic() - started) * 1000 - prompt_ms)
        if dialect == "llamacpp":
            return {"index": 0, "content": text, "tokens": [], "id_slot": slot, "stop": True, "model": self.config.model,
                    "tokens_predicted": n, "tokens_evaluated": prompt_tokens, "stop_type": "limit",
                    "timings": {"cache_n": cached, "prompt_n": prompt_tokens - cached, "prompt_ms": round(prompt_ms, 3),
                                "predicted_n": n, "predicted_ms": ms}}
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        if dialect == "openai-text":
            choice = {"index": 0, "text": text, "finish_reason": "length"}
            return {"id": "cmpl-mock", "object": "text_completion", "model": self.config.model,
                    "choices": [choice], "usage": usage}
        choice = ({"index": 0, "delta": {}, "finish_reason": "length"} if stream else
                  {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        return {"id": "chatcmpl-mock", "object": "chat.completion.chunk" if stream else "chat.completion",
                "model": self.config.model, "choices": [choice], "usage": usage}


def _invalid(message: str) -> web.Response:
    return json_response({"error": {"code": 400, "message": message, "type": "invalid_request_error"}}, 400)


ENGINE = web.AppKey("engine", MockEngine)


def create_app(config: MockConfig) -> web.Application:
    engine = MockEngine(config)
    app = web.Application()
    app[ENGINE] = engine
    app.router.add_get("/health", engine.health)
    app.router.add_get("/props", engine.props)
    app.router.add_get("/slots", engine.slots_state)
    app.router.add_get("/v1/models", engine.v1_models)
    app.router.add_get("/metrics", engine.metrics)
    app.router.add_post("/apply-template", engine.apply_template)
    app.router.add_post("/completion", engine.completion)
    app.router.add_post("/completions", engine.completion)
    app.router.add_post("/v1/completions", engine.v1_completions)
    app.router.add_post("/v1/chat/completions", engine.v1_chat)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama-orch mock-engine", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--parallel", "-np", dest="slots", type=int, default=4)
    parser.add_argument("--ctx-size", "-c", dest="ctx", type=int, default=2048,
                        help="context tokens of all slots together, shared out as llama-server does (per slot: this / --parallel)")
    parser.add_argument("--tokens-per-s", type=float, default=200.0)
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.0, help="prompt processing per prompt token")
    parser.add_argument("--first-token-ms", type=float, default=0.0, help="fixed time before the first token")
    parser.add_argument("--start-delay-s", type=float, default=0.0)
    parser.add_argument("--crash-after", type=int, default=None)
    parser.add_argument("--stall-after", type=int, default=None)
    parser.add_argument("--error-after", type=int, default=None)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--reject-stream-options", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", "-m", default="mock.gguf")
    parser.add_argument("--metrics", action="store_true", help="accepted for llama-server parity; /metrics is always on")
    args = parser.parse_args(argv)
    if args.slots < 1 or args.ctx < 1 or args.tokens_per_s <= 0 or not 0 <= args.error_rate <= 1 \
            or args.prefill_ms_per_token < 0 or args.first_token_ms < 0:
        parser.error("--parallel and --ctx-size must be >= 1, --tokens-per-s > 0, --error-rate within [0, 1], "
                     "--prefill-ms-per-token and --first-token-ms >= 0")
    config = MockConfig(slots=args.slots, ctx=max(1, args.ctx // args.slots), tokens_per_s=args.tokens_per_s,
                        prefill_ms_per_token=args.prefill_ms_per_token, first_token_ms=args.first_token_ms,
                        start_delay_s=args.start_delay_s,
                        crash_after=args.crash_after, stall_after=args.stall_after, error_after=args.error_after,
                        error_rate=args.error_rate, reject_stream_options=args.reject_stream_options,
                        seed=args.seed, model=os.path.basename(args.model))
    prepare("mock-engine")
    web.run_app(create_app(config), host=args.host, port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
