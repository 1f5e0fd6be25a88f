"""The fast engine: a fake inference server that is never the bottleneck of a load test.

Owns a raw ``asyncio.Protocol`` HTTP/1.1 server (keep-alive, Content-Length request bodies,
bounded head and body) that speaks just enough of llama-server for orchestratord and the
baselines: ``POST /completion`` (llama.cpp frames ending in a ``stop: true`` frame),
``POST /v1/completions`` (OpenAI chunks ending in ``data: [DONE]``), ``GET /health``,
``/props``, ``/slots``, ``/v1/models``, and ``GET /v2/pools`` in pool-managerd's shape, so
orchestratord's discovery can poll the engine itself. Answers are rendered once per
``(route, tokens, prompt tokens, framing)`` and cached, so a request costs a JSON parse and a
dict look-up; ``--mode`` says how the frames go out: ``burst`` (one write, Content-Length),
``per-token`` (one chunked write per token) or ``paced`` (one chunked write every
``--pace-ms``, against deadlines from the request's arrival, so the rate does not drift).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass

import orjson

from ..daemon import announce_until_signalled
from .process import run

MODES = ("burst", "per-token", "paced")
MAX_HEAD_BYTES = 64 << 10
MAX_BODY_BYTES = 8 << 20
CACHE_ENTRIES = 256
LINGER_S = 2.0  # how long an errored connection waits for the client to close first
DEFAULT_TOKENS = 16

# Pre-escaped JSON string contents: a frame is bytes formatting, no encoder on the hot path.
WORDS = (b" the", b" llama", b" orch", b" pool", b" token", b" stream", b" queue", b" slot", b" engine",
         b" model", b" fast", b" ready")

_LLAMACPP_TOKEN = (b'data: {"index":0,"content":"%s","tokens":[],"stop":false,"id_slot":0,'
                   b'"tokens_predicted":%d,"tokens_evaluated":%d}\n\n')
_OPENAI_TOKEN = (b'data: {"id":"cmpl-1","object":"text_completion","created":0,"model":%s,'
                 b'"choices":[{"index":0,"text":"%s","finish_reason":null}]}\n\n')
_CHUNKED_END = b"0\r\n\r\n"
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 413: b"Payload Too Large",
            431: b"Request Header Fields Too Large"}
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                431: "invalid_request_error"}

LLAMACPP, OPENAI = 0, 1


@dataclass(frozen=True, slots=True, kw_only=True)
class FastEngineConfig:
    host: str = "127.0.0.1"
    port: int = 0
    mode: str = "burst"
    pace_ms: float = 2.0
    first_token_ms: float = 0.0
    slots: int = 64
    ctx: int = 8192
    model: str = "fast.gguf"
    #: What ``/v2/pools`` says the pool serves (a task's ``model_ref`` must match it); the model name if empty.
    model_ref: str = ""
    pool_id: str = "fast-0"
    #: Streaming, not burst: how many token frames go out in one write (one HTTP chunk).
    tokens_per_write: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.pace_ms < 0 or self.first_token_ms < 0 or self.slots < 1 or self.ctx < 1 or self.tokens_per_write < 1:
            raise ValueError("pace_ms and first_token_ms must be >= 0, slots, ctx and tokens_per_write >= 1")


def _head(status: int, content_type: bytes, framing: bytes, close: bool) -> bytes:
    """Status line and headers; *framing* is the ``Content-Length``/``Transfer-Encoding`` line or empty."""
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nCache-Control: no-cache\r\n%s%s\r\n"
            % (status, _REASONS[status], content_type, framing, b"Connection: close\r\n" if close else b""))


def _whole(status: int, content_type: bytes, body: bytes, close: bool) -> bytes:
    return _head(status, content_type, b"Content-Length: %d\r\n" % len(body), close) + body


def _error(status: int, message: str) -> bytes:
    body = orjson.dumps({"error": {"code": status, "message": message, "type": _ERROR_TYPES[status]}})
    return _whole(status, b"application/json", body, True)


def _prompt_tokens(prompt: object) -> int:
    # About four characters a token: O(1), so a long prompt costs nothing to count.
    if isinstance(prompt, str):
        return max(1, (len(prompt) + 3) // 4)
    if isinstance(prompt, list):
        return max(1, len(prompt))
    return 1


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _parse_head(head: bytes) -> tuple[bytes, bytes, bool, bool, int]:
    """Request line and headers -> (method, path, close after, chunked answers allowed, body length)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1].startswith(b"/") or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _HttpError(400, "malformed request line")
    http10 = parts[2] == b"HTTP/1.0"
    close = http10  # HTTP/1.0 keep-alive is not worth the header: one request, then close
    length = -1
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1:] in b" \t" or b" " in name:
            raise _HttpError(400, "malformed header line")
        name = name.lower()
        if name == b"content-length":
            value = value.strip()
            if not value.isdigit() or length >= 0 and int(value) != length:
                raise _HttpError(400, "malformed Content-Length")
            length = int(value)
        elif name == b"transfer-encoding":
            raise _HttpError(400, "only Content-Length request bodies are accepted")
        elif name == b"connection" and b"close" in value.lower():
            close = True
    length = max(length, 0)
    if length > MAX_BODY_BYTES:
        raise _HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
    return parts[0], parts[1].partition(b"?")[0], close, not http10, length


#: Parsed request heads by their bytes: a load generator sends the same few heads again and again.
_heads: dict[bytes, tuple[bytes, bytes, bool, bool, int]] = {}


class FastEngine:
    """The server: ``await start()`` binds and returns the URL, ``await stop()`` closes everything."""

    def __init__(self, config: FastEngineConfig) -> None:
        self.config = config
        self.url = ""
        self.pace_s = config.pace_ms * config.tokens_per_write / 1000.0  # between writes
        self.first_token_s = config.first_token_ms / 1000.0
        self.burst = config.mode == "burst"
        self.paced = config.mode == "paced"
        self._model_json = orjson.dumps(config.model)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        #: (method, path) -> (keep-alive answer, closing answer) for the GET routes, rendered at start.
        self.static: dict[tuple[bytes, bytes], tuple[bytes, bytes]] = {}
        #: (dialect, tokens, prompt tokens, stream, usage, close, chunked) -> the writes of one answer.
        self._cache: dict[tuple, tuple[bytes, ...]] = {}

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), self.config.host, self.config.port,
                                                backlog=4096, reuse_address=True)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self.static = self._render_static()
        return self.url

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._connections):
            connection.abort()
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> FastEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _render_static(self) -> dict[tuple[bytes, bytes], tuple[bytes, bytes]]:
        c = self.config
        pool = {"pool_id": c.pool_id, "ready": True, "live": True, "draining": False, "state": "ready",
                "slots_total": c.slots, "slots_free": c.slots, "active_leases": 0,
                "vram_total_bytes": 24 << 30, "vram_free_bytes": 16 << 30, "engine": "llamacpp",
                "engine_version": "fast-engine", "engine_url": self.url, "model_ref": c.model_ref or c.model,
                "ctx_max": c.ctx, "device_mask": "0", "replica_id": c.pool_id, "last_error": None}
        bodies = {
            b"/health": {"status": "ok"},
            b"/props": {"default_generation_settings": {"n_ctx": c.ctx, "params": {}}, "total_slots": c.slots,
                        "model_path": c.model, "build_info": "fast-engine", "is_sleeping": False},
            b"/slots": [{"id": i, "id_task": -1, "n_ctx": c.ctx, "is_processing": False, "n_prompt_tokens": 0}
                        for i in range(c.slots)],
            b"/v1/models": {"object": "list", "data": [{"id": c.model, "object": "model", "created": 0,
                                                       "owned_by": "llamacpp"}]},
            b"/v2/pools": {"pools": [pool]},
        }
        return {(b"GET", path): (_whole(200, b"application/json", orjson.dumps(body), False),
                                 _whole(200, b"application/json", orjson.dumps(body), True))
                for path, body in bodies.items()}

    def answer(self, dialect: int, body: bytes, close: bool, chunked: bool) -> tuple[tuple[bytes, ...], int, bool]:
        """The writes for a generation request, its token count and whether it streams.

        ValueError (with the message for a 400) when the body is not a request."""
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ValueError("invalid JSON body") from None
        if not isinstance(request, dict):
            raise ValueError("the body must be a JSON object")
        n = request.get("max_tokens" if dialect == OPENAI else "n_predict")
        if n is None:
            n = DEFAULT_TOKENS
        elif not isinstance(n, int) or isinstance(n, bool):
            raise ValueError("n_predict/max_tokens: expected an integer")
        # As llama-server: -1 means "until the context is full", and nothing goes past it.
        n = self.config.ctx if n < 0 else min(n, self.config.ctx)
        stream = request.get("stream") is True
        usage = False
        if dialect == OPENAI and stream:
            options = request.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
        key = (dialect, n, _prompt_tokens(request.get("prompt")), stream, usage, close, chunked)
        writes = self._cache.get(key)
        if writes is None:
            writes = self._render(*key)
            if len(self._cache) >= CACHE_ENTRIES:
                del self._cache[next(iter(self._cache))]  # the oldest: a bound, not a policy
            self._cache[key] = writes
        return writes, n, stream

    def _render(self, dialect: int, n: int, prompt_n: int, stream: bool, usage: bool, close: bool,
                chunked: bool) -> tuple[bytes, ...]:
        words = [WORDS[i % len(WORDS)] for i in range(n)]
        # A nominal generation time: the answer is rendered once, not timed per request.
        predicted_ms = n * self.config.pace_ms if self.paced else 0.0
        if dialect == LLAMACPP:
            final = {"index": 0, "content": "", "tokens": [], "id_slot": 0, "stop": True, "model": self.config.model,
                     "tokens_predicted": n, "tokens_evaluated": prompt_n, "stop_type": "limit",
                     "timings": {"prompt_n": prompt_n, "prompt_ms": 0.0, "predicted_n": n,
                                 "predicted_ms": predicted_ms}}
            if not stream:
                final["content"] = b"".join(words).decode()
                return (_whole(200, b"application/json", orjson.dumps(final), close),)
            frames = [_LLAMACPP_TOKEN % (word, i + 1, prompt_n) for i, word in enumerate(words)]
            frames.append(b"data: " + orjson.dumps(final) + b"\n\n")
        else:
            counts = {"prompt_tokens": prompt_n, "completion_tokens": n, "total_tokens": prompt_n + n}
            last = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": self.config.model,
                    "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
            if not stream:
                last["choices"][0]["text"] = b"".join(words).decode()
                last["usage"] = counts
                return (_whole(200, b"application/json", orjson.dumps(last), close),)
            if usage:
                last["usage"] = counts
            frames = [_OPENAI_TOKEN % (self._model_json, word) for word in words]
            frames.append(b"data: " + orjson.dumps(last) + b"\n\ndata: [DONE]\n\n")
        if self.burst:
            return (_whole(200, b"text/event-stream", b"".join(frames), close),)
        if not chunked:  # HTTP/1.0: the body ends where the connection does
            frames[0] = _head(200, b"text/event-stream", b"", True) + frames[0]
            return tuple(frames)
        per = self.config.tokens_per_write
        if per > 1:  # the final frame rides with the last tokens
            frames = [b"".join(frames[i:i + per]) for i in range(0, n, per)] + frames[n:] if n else frames
            if len(frames) > 1:
                frames[-2:] = [frames[-2] + frames[-1]]
        writes = [b"%x\r\n%s\r\n" % (len(frame), frame) for frame in frames]
        writes[0] = _head(200, b"text/event-stream", b"Transfer-Encoding: chunked\r\n", close) + writes[0]
        writes[-1] += _CHUNKED_END
        return tuple(writes)


class _Connection(asyncio.Protocol):
    """One client connection: requests one after the other, each answer's writes scheduled on the loop."""

    __slots__ = ("engine", "loop", "transport", "buffer", "head", "busy", "serving", "paused", "blocked",
                 "discarding", "close_after", "writes", "next_write", "due", "last_token", "timer")

    def __init__(self, engine: FastEngine) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        #: The parsed head of a request whose body is still arriving:
        #: (method, path, close, chunked, body start, body end) in the buffer.
        self.head: tuple[bytes, bytes, bool, bool, int, int] | None = None
        self.busy = False  # an answer is being written: the next request waits for it
        self.serving = False  # inside _serve, which loops itself: no re-entry
        self.paused = False  # the transport is over its high-water mark
        self.blocked = False  # a write is waiting for resume_writing
        self.discarding = False  # an error was answered: the connection only waits to close
        self.close_after = False
        self.writes: tuple[bytes, ...] = ()
        self.next_write = 0
        self.due = 0.0
        self.last_token = 0
        self.timer: asyncio.Handle | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.engine._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # A client gone mid-stream: the writes stop here, quietly.
        self.transport = None
        self.writes = ()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.engine._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        self.buffer += data
        if not self.busy:
            self._serve()
        elif len(self.buffer) > MAX_HEAD_BYTES + MAX_BODY_BYTES:
            self.abort()  # a client writing without reading: not one we owe an answer

    def eof_received(self) -> bool:
        if not self.busy:
            return False  # the transport closes itself
        self.close_after = True  # half-closed while answering: finish the answer, then close
        return True

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.blocked:
            self.blocked = False
            self._step()
        elif not self.busy and self.buffer:
            self._serve()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- requests -------------------------------------------------------------------------------

    def _serve(self) -> None:
        if self.serving:
            return
        self.serving = True
        try:
            while not self.busy and not self.paused and self.transport is not None and self.buffer:
                if not self._next_request():
                    return
        finally:
            self.serving = False

    def _next_request(self) -> bool:
        """Take one complete request off the buffer and answer it; False when more bytes are needed."""
        buf = self.buffer
        if self.head is None:
            end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    self._fail(431, "request head too large")
                return False
            raw = bytes(buf[:end])
            head = _heads.get(raw)
            if head is None:
                try:
                    head = _parse_head(raw)
                except _HttpError as exc:
                    self._fail(exc.status, exc.message)
                    return False
                if len(_heads) >= CACHE_ENTRIES:
                    del _heads[next(iter(_heads))]
                _heads[raw] = head
            method, path, close, chunked, length = head
            self.head = (method, path, close, chunked, end + 4, end + 4 + length)
        method, path, close, chunked, body_start, body_end = self.head
        if len(buf) < body_end:
            return False
        self.head = None
        body = bytes(buf[body_start:body_end]) if body_end > body_start else b""
        del buf[:body_end]
        return self._dispatch(method, path, body, close, chunked)

    def _dispatch(self, method: bytes, path: bytes, body: bytes, close: bool, chunked: bool) -> bool:
        """Answer one request; False when the connection is closing."""
        engine = self.engine
        static = engine.static.get((method, path))
        if static is not None:
            self._start((static[1] if close else static[0],), close, 0, False, generation=False)
            return True
        if method == b"POST" and (path == b"/completion" or path == b"/v1/completions"):
            try:
                writes, n, stream = engine.answer(LLAMACPP if path == b"/completion" else OPENAI, body, close, chunked)
            except ValueError as exc:
                self._fail(400, str(exc))
                return False
            self._start(writes, close, n, stream)
            return True
        self._fail(404, f"no route {method.decode('latin-1')} {path.decode('latin-1')}")
        return False

    # -- answers --------------------------------------------------------------------------------

    def _start(self, writes: tuple[bytes, ...], close: bool, n: int, stream: bool, *, generation: bool = True) -> None:
        """Send an answer: a generation after the first-token delay (and paced), any other at once."""
        engine = self.engine
        self.busy = True
        self.close_after = close
        self.writes = writes
        self.next_write = 0
        self.last_token = max(len(writes) - 1, 0)  # the last write's index: paced writes are due one pace apart
        delay = engine.first_token_s if generation else 0.0
        if generation and engine.paced and not stream:
            delay += self.last_token * engine.pace_s  # a whole answer is ready when its last token is
        self.due = self.loop.time() + delay
        if delay > 0:
            self.timer = self.loop.call_at(self.due, self._step)
        else:
            self._step()

    def _step(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None:
            return
        if self.paused:
            self.blocked = True
            return
        writes = self.writes
        k = self.next_write
        transport.write(writes[k])
        k += 1
        if k == len(writes):
            self._finish()
            return
        self.next_write = k
        engine = self.engine
        if engine.paced:
            # Token k is due at start + k * pace: a late callback does not push the later ones back.
            self.timer = self.loop.call_at(self.due + min(k, self.last_token) * engine.pace_s, self._step)
        else:
            self.timer = self.loop.call_soon(self._step)

    def _finish(self) -> None:
        self.writes = ()
        self.busy = False
        if self.close_after:
            self.buffer.clear()
            if self.transport is not None:
                self.transport.close()
            return
        if self.buffer and not self.serving:
            self._serve()

    def _fail(self, status: int, message: str) -> None:
        """Answer an error and close. The close lingers: closing with unread bytes in the socket
        would send a reset, which can destroy the answer before the client reads it; so the
        write side is shut and what the client still sends is dropped until it closes too."""
        self.buffer.clear()
        self.head = None
        self.discarding = True
        transport = self.transport
        if transport is None:
            return
        transport.write(_error(status, message))
        if transport.can_write_eof():
            transport.write_eof()
            self.timer = self.loop.call_later(LINGER_S, self.abort)
        else:
            transport.close()


async def serve(config: FastEngineConfig) -> FastEngine:
    """A started engine (its ``url`` set); ``await engine.stop()`` when done."""
    engine = FastEngine(config)
    await engine.start()
    return engine


async def _run(config: FastEngineConfig) -> None:
    engine = await serve(config)
    try:
        await announce_until_signalled(engine.url)
    finally:
        await engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_orch.io.bench.fast_engine",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (the READY line says which)")
    parser.add_argument("--mode", choices=MODES, default="burst")
    parser.add_argument("--pace-ms", type=float, default=2.0, help="paced mode: time between tokens")
    parser.add_argument("--first-token-ms", type=float, default=0.0, help="delay before the first frame")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--model", default="fast.gguf")
    parser.add_argument("--model-ref", default="", help="the pool's model_ref in /v2/pools (default: --model)")
    parser.add_argument("--pool-id", default="fast-0")
    parser.add_argument("--tokens-per-write", type=int, default=1,
                        help="per-token and paced modes: token frames per write (default 1)")
    args = parser.parse_args(argv)
    try:
        config = FastEngineConfig(host=args.host, port=args.port, mode=args.mode, pace_ms=args.pace_ms,
                                  first_token_ms=args.first_token_ms, slots=args.slots, ctx=args.ctx,
                                  model=args.model, model_ref=args.model_ref, pool_id=args.pool_id,
                                  tokens_per_write=args.tokens_per_write)
    except ValueError as exc:
        parser.error(str(exc))
    run(_run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
