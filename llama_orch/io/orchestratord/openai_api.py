"""The OpenAI-compatible front door: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

This module owns the translation between OpenAI's wire format and ours, and nothing else. A
request becomes a ``TaskSpec`` and a ``TaskPayload`` and goes through ``CoreDriver.admit``, the
same admission, placement, budgets and metrics as ``POST /v2/tasks``. The answer is read back
from the task's own SSE frames (``driver.streams[task_id]``) and framed again as OpenAI
chunks (``stream: true``) or as one JSON body. ``add_openai_routes(app)`` mounts the routes on
an orchestratord app.

Decisions (they are part of the contract of this front door):

- Model ids are model refs. ``GET /v1/models`` lists each distinct model ref of the usable
  pools (normalized: ``/abs/x.gguf`` is listed as ``file:/abs/x.gguf``), and a request's
  ``model`` becomes ``TaskSpec.model_ref`` unchanged, so one id works here and in
  ``/v2/tasks``. The engine is that of a pool serving the model (a usable one first). A model
  that no known pool serves is a 404 ``model_not_found``. A model whose pools are all unready
  goes to the core, which answers 503 ``POOL_UNREADY``.
- Session: the ``X-Session-Id`` header, else the ``user`` field; a UUID is used as it is and
  any other string is mapped to a stable UUIDv5 of the principal and the string, so a user keeps
  one session (replica affinity, token budget) across requests and orchestratord replicas, and
  two principals' ``user: "alice"`` are two sessions (``anonymous``, without client auth, maps
  the string alone). With neither, every request is a session of its own (UUIDv4). A UUID that
  another principal's session has is a 403 ``SESSION_FORBIDDEN`` (``tenancy``).
- Every request is its principal's (``auth``): the same quotas as ``/v2/tasks`` (429
  ``QUOTA_EXCEEDED``, a ``rate_limit_error``), and its task is the principal's through ``/v2``.
- Priority: ``interactive``; ``X-Priority: batch`` puts the request in the batch class.
  Deadline: the ``X-Deadline-Ms`` header, 300000 ms by default.
- ``max_completion_tokens``, else ``max_tokens``; by default 256 for chat (OpenAI has no
  bound, admission needs one) and 16 for completions (OpenAI's default). ``ctx`` is the prompt
  estimate plus ``max_tokens``, and the core refuses what a model cannot hold (400).
- Prompt tokens are an estimate, not a tokenizer count: UTF-8 bytes / 4, plus 4 per chat
  message for its template. ``usage.prompt_tokens`` reports that estimate;
  ``completion_tokens`` is exact (the tokens streamed).
- Supported: one choice (``n``, ``best_of`` other than 1 are a 400), text content parts,
  one prompt string per request, ``seed``. The features we cannot honour and that would change
  the answer are a 400 that names the parameter: batched or token-id prompts, ``echo``,
  ``suffix``, ``tools``/``functions``, ``response_format`` other than text, non-text content
  parts. Sampler settings (``temperature``, ``top_p``, ``top_k``, ``min_p``, ``stop``, the
  penalties) are range-checked and passed to the engine; other parameters are ignored, and
  ``logprobs`` is always null.
  The ``developer`` role is sent to the engine as ``system``, for templates that do not know it.
- ``finish_reason`` is ``length`` when the engine produced ``max_tokens`` tokens, else ``stop``.
- Errors have OpenAI's shape ``{"error": {message, type, param, code}}``. ``code`` is ours
  (``INVALID_PARAMS``, ``ADMISSION_REJECT``, ``POOL_UNREADY``...) or ``model_not_found``. The
  type is ``invalid_request_error`` (4xx), ``rate_limit_error`` (429) or ``server_error`` (5xx).
  The object also carries our envelope's ``retriable``, ``retry_after_ms``, ``policy_label`` and
  ``pool_id``. A 429 or 503 sends ``Retry-After``, ``X-Backoff-Ms`` and ``retry-after-ms``, which
  the official client reads to time its retries.
- A task that fails after admission: when not streaming, the HTTP status comes from the core's
  code (``INVALID_PARAMS`` 400, the engine refused the request; ``WORKER_RESET`` 502, ``DECODE_TIMEOUT`` and ``DEADLINE_UNMET`` 504,
  ``REPLICA_EXHAUSTED`` 503, ``QUEUE_FULL_DROP_LRU`` 429, ``INTERNAL`` 500; a task canceled
  by shutdown or through ``/v2`` is 503 ``CANCELED``). When streaming, the status is already
  200: one ``data: {"error": {...}}`` chunk is sent (the official client raises ``APIError``)
  and the stream closes without ``data: [DONE]``, so a client that ignores the error object
  still sees a truncated stream rather than a complete answer.
- A client that goes away cancels its task (``TaskCanceled(reason="disconnect")``), which frees
  the slot. The wait is ``Stream.wait_for_change``, shared with the v2 SSE reader: it also
  looks at the connection while nothing moves.
- Responses carry ``X-Task-Id``; the task can be followed or canceled through ``/v2/tasks``.
  ``chatcmpl-<task_id>`` and ``cmpl-<task_id>`` are the OpenAI ids.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import orjson
from aiohttp import web

from ...core.commands import Rejected
from ...core.placement import normalize_model_ref
from ...core.types import Priority, TaskSpec
from ...ext.sse import SSEParser
from ..http import CORRELATION_ID, retry_headers
from .auth import ANONYMOUS, principal_of
from .driver import DRIVER, CoreDriver, Cursor, Stream
from .wire import MAX_INT, TaskPayload, WireError, parse_sampling

DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_DEADLINE_MS = 300_000
TEMPLATE_TOKENS_PER_MESSAGE = 4
OWNER = "llama-orch"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer

#: Namespace of the session ids derived from ``user`` strings: fixed, so the same user gets the
#: same session on every orchestratord replica and across restarts.
SESSION_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:llama-orch:openai:user")

#: Roles accepted in ``messages``, and the role the engine's template is given.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}

#: HTTP status of a task that failed after admission, answered without streaming.
TERMINAL_STATUS = {"INVALID_PARAMS": 400, "WORKER_RESET": 502, "DECODE_TIMEOUT": 504, "DEADLINE_UNMET": 504, "REPLICA_EXHAUSTED": 503,
                   "QUEUE_FULL_DROP_LRU": 429, "INTERNAL": 500, "CANCELED": 503}

DONE = b"data: [DONE]\n\n"
#: One of our token events (``ext.sse``'s frame: ``{"t": text, "i": index}`` in that order), with
#: the ``id:`` line the stream adds to a frame's last event. A JSON string cannot hold an
#: unescaped ``"``, so the first ``,"i":`` after ``{"t":`` is where the text ends.
_TOKEN_EVENT = re.compile(rb'event: token\ndata: \{"t":(.*?),"i":\d+\}\n(?:id: \d+\n)?\n', re.DOTALL)
# One template for every response (a template per response is compiled again each call, missing
# ``re``'s cache): the markers stand for the response's own chunk head and tail, put in after.
_TOKEN_TEMPLATE = b"\0\\g<1>\1"


# -- errors -------------------------------------------------------------------------------------


def error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def backoff_headers(retry_after_ms: int | None) -> dict[str, str]:
    """``Retry-After`` in whole seconds (at least 1) as the contract wants, and the exact figure
    twice: ours (``X-Backoff-Ms``) and the one the official client reads (``retry-after-ms``)."""
    retry = retry_after_ms or 1000
    return {**retry_headers(retry), "retry-after-ms": str(retry)}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape; raised anywhere in a handler."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 extra: dict | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": error_type(self.status), "param": self.param,
                          "code": self.code, **self.extra}}

    def response(self) -> web.Response:
        resp = web.Response(body=orjson.dumps(self.body()), status=self.status, content_type="application/json")
        resp.headers.update(self.headers)
        return resp

    @classmethod
    def from_envelope(cls, status: int, envelope: dict) -> OpenAIError:
        """Our error envelope (a ``Rejected``, an ``error`` event's data) in OpenAI's shape."""
        extra = {k: envelope[k] for k in ("retriable", "retry_after_ms", "policy_label", "pool_id")
                 if envelope.get(k) is not None}
        headers = backoff_headers(envelope.get("retry_after_ms")) if status in (429, 503) else None
        return cls(status, str(envelope.get("message") or envelope.get("code")), code=envelope.get("code"),
                   extra=extra, headers=headers)


def rejection_error(decision: Rejected) -> OpenAIError:
    return OpenAIError.from_envelope(decision.http_status, {
        "code": decision.code, "message": decision.message, "retriable": decision.retriable,
        "retry_after_ms": decision.retry_after_ms, "policy_label": decision.policy_label, "pool_id": decision.pool_id})


def terminal_error(data: dict) -> OpenAIError:
    """The terminal event of a task that did not complete: an ``error``, or an ``end`` of a cancel."""
    if data.get("canceled"):
        data = {"code": "CANCELED", "message": f"the task was canceled ({data.get('reason', 'client')})",
                "retriable": True}
    return OpenAIError.from_envelope(TERMINAL_STATUS.get(str(data.get("code")), 502), data)


def _bad(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param, code="INVALID_PARAMS")


# -- requests -----------------------------------------------------------------------------------


def _optional_int(body: dict, name: str, *, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(name, f"expected an integer, got {type(value).__name__}")
    if not minimum <= value <= MAX_INT:
        raise _bad(name, f"expected an integer from {minimum} to {MAX_INT}, got {value}")
    return value


def _optional_bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"expected true or false, got {value!r}")
    return value


def _content(value: object, param: str, *, role: str) -> str:
    """A message's content as text: a string, or text parts joined by newlines."""
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        return ""  # an assistant turn that only called tools
    if not isinstance(value, list):
        raise _bad(param, "expected a string or a list of content parts")
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _bad(f"{param}[{i}]", f"only text parts {{\"type\": \"text\", \"text\": ...}} are supported, got {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def parse_messages(body: dict) -> tuple[dict, ...]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("messages", "expected a non-empty list of messages")
    messages = []
    for i, message in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(param, "expected an object with role and content")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(f"{param}.role", f"expected one of {', '.join(ROLES)}; got {role!r}")
        messages.append({"role": ROLES[role], "content": _content(message.get("content"), f"{param}.content", role=role)})
    return tuple(messages)


def parse_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise _bad("prompt", "batches of prompts are not supported: send one request per prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise _bad("prompt", "token-id prompts are not supported: send the text")
    raise _bad("prompt", "expected a string (or a list of one string)")


def _refuse_unsupported(body: dict, chat: bool) -> None:
    """Parameters that would change the answer and that we cannot honour: 400, not silence."""
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and (type(value) is not int or value != 1):
            raise _bad(name, f"only 1 is supported (one choice per request; send {value!r} requests instead)")
    if chat:
        for name in ("tools", "functions"):
            if body.get(name):
                raise _bad(name, "tool and function calling are not supported")
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise _bad("response_format", "only {\"type\": \"text\"} is supported")
    else:
        if body.get("echo"):
            raise _bad("echo", "echo is not supported")
        if body.get("suffix"):
            raise _bad("suffix", "suffix (insertion) is not supported")


def session_id_for(header: str | None, user: str | None, principal: str = ANONYMOUS) -> str:
    for value in (header, user):
        if value:
            try:
                return str(uuid.UUID(value))
            except ValueError:
                # scoped by principal (a NUL cannot be in either), so principals never share a session by name
                name = value if principal == ANONYMOUS else f"{principal}\0{value}"
                return str(uuid.uuid5(SESSION_NAMESPACE, name))
    return str(uuid.uuid4())


def _priority(request: web.Request) -> Priority:
    value = request.headers.get("X-Priority", "interactive").strip().lower()
    try:
        return Priority(value)
    except ValueError:
        raise OpenAIError(400, f"X-Priority: expected interactive or batch, got {value!r}",
                          code="INVALID_PARAMS") from None


def _deadline_ms(request: web.Request) -> int:
    value = request.headers.get("X-Deadline-Ms")
    if value is None:
        return DEFAULT_DEADLINE_MS
    try:
        deadline = int(value)
    except ValueError:
        raise OpenAIError(400, f"X-Deadline-Ms: expected an integer, got {value!r}", code="INVALID_PARAMS") from None
    return max(-MAX_INT, min(deadline, MAX_INT))  # <= 0 is DEADLINE_UNMET, decided by admission


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedRequest:
    chat: bool  # /v1/chat/completions (else /v1/completions)
    model: str  # as the client wrote it: echoed in every response
    spec: TaskSpec
    payload: TaskPayload
    stream: bool
    include_usage: bool
    prompt_tokens: int  # the estimate that usage reports


def engine_for(placer: Any, model: str) -> str | None:
    """The engine of a pool serving ``model``: a usable pool's first, else any pool's; None: unknown."""
    wanted = normalize_model_ref(model)
    fallback = None
    for pool_id in placer.pool_ids():
        snap = placer.snapshot(pool_id)
        if snap is None or normalize_model_ref(snap.model_ref) != wanted:
            continue
        if placer.is_usable(pool_id):
            return snap.engine
        fallback = fallback or snap.engine
    return fallback


def parse_request(request: web.Request, body: object, placer: Any, *, chat: bool,
                  principal: str = ANONYMOUS) -> ParsedRequest:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="INVALID_PARAMS")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model", "expected the id of a model (see GET /v1/models)")
    _refuse_unsupported(body, chat)
    if chat:
        messages: tuple[dict, ...] | None = parse_messages(body)
        prompt = None
        prompt_tokens = (sum(len(m["content"].encode()) for m in messages) // 4
                         + TEMPLATE_TOKENS_PER_MESSAGE * len(messages))
    else:
        messages, prompt = None, parse_prompt(body)
        prompt_tokens = len(prompt.encode()) // 4
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _optional_int(body, limit_name, minimum=1)
    if max_tokens is None:
        max_tokens = DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS
    seed = _optional_int(body, "seed", minimum=0)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", f"expected a string, got {type(user).__name__}")
    stream = _optional_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "expected an object")
    include_usage = False
    if stream and options:
        include_usage = options.get("include_usage") is True
        if options.get("include_usage") not in (None, True, False):
            raise _bad("stream_options.include_usage", "expected true or false")
    engine = engine_for(placer, model)
    if engine is None:
        raise OpenAIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    session_id = session_id_for(request.headers.get("X-Session-Id"), user, principal)
    spec = TaskSpec(task_id=str(uuid.uuid4()), session_id=session_id,
                    model_ref=model, priority=_priority(request), engine=engine, workload="completion",
                    ctx=min(MAX_INT, prompt_tokens + max_tokens), max_tokens=max_tokens,
                    deadline_ms=_deadline_ms(request), prompt_tokens=prompt_tokens, seed=seed)
    try:
        sampling = parse_sampling(body)
    except WireError as exc:
        raise _bad(exc.field, str(exc).split(": ", 1)[1]) from None
    payload = TaskPayload(prompt=prompt, inputs=(), seed=seed, kv_hint=None, messages=messages, sampling=sampling)
    return ParsedRequest(chat=chat, model=model, spec=spec, payload=payload, stream=stream,
                         include_usage=include_usage, prompt_tokens=prompt_tokens)


# -- responses ----------------------------------------------------------------------------------


def finish_reason(tokens_out: int, max_tokens: int) -> str:
    return "length" if tokens_out >= max_tokens else "stop"


class ChunkFramer:
    """OpenAI stream chunks of one response, as ``data: {json}\\n\\n`` bytes.

    Everything but the token text is the same in every chunk, so its bytes are built once.
    """

    def __init__(self, parsed: ParsedRequest, response_id: str, created: int) -> None:
        self.chat = parsed.chat
        self.usage_null = b',"usage":null' if parsed.include_usage else b""
        obj = "chat.completion.chunk" if parsed.chat else "text_completion"
        head = orjson.dumps({"id": response_id, "object": obj, "created": created, "model": parsed.model})
        self.head = b"data: " + head[:-1] + b',"choices":'
        self.token_head = self.head + (b'[{"index":0,"delta":{"content":' if self.chat else b'[{"index":0,"text":')
        self.token_tail = (b'},' if self.chat else b',') + b'"logprobs":null,"finish_reason":null}]' + self.usage_null + b"}\n\n"

    def tokens_only(self, frame: bytes) -> bytes | None:
        """A frame of our token events as OpenAI chunks, without parsing any JSON: each event's
        ``data`` is ``{"t":<JSON string>,"i":<n>}``, and the string is spliced in as it is
        (still valid, still escaped). None when the frame holds any other event."""
        if b"\0" in frame or b"\1" in frame:
            return None  # the markers below; never in a JSON literal, which escapes control characters
        out = _TOKEN_EVENT.sub(_TOKEN_TEMPLATE, frame)
        if b"event: " in out:
            return None
        return out.replace(b"\0", self.token_head).replace(b"\1", self.token_tail)

    def _chunk(self, choices: list, usage: dict | None = None) -> bytes:
        tail = (b',"usage":' + orjson.dumps(usage)) if usage is not None else self.usage_null
        return self.head + orjson.dumps(choices) + tail + b"}\n\n"

    def opening(self) -> bytes:
        if not self.chat:
            return b""
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def token(self, text: str) -> bytes:
        return self.token_head + orjson.dumps(text) + self.token_tail

    def closing(self, reason: str, usage: dict | None) -> bytes:
        body = {"delta": {}} if self.chat else {"text": ""}
        last = self._chunk([{"index": 0, **body, "logprobs": None, "finish_reason": reason}])
        if usage is not None:
            last += self._chunk([], usage)
        return last + DONE


def usage_of(parsed: ParsedRequest, tokens_out: int, final: dict) -> dict:
    """OpenAI's usage block; ``prompt_tokens_details.cached_tokens`` when the engine said how
    much of the prompt it found in its KV cache (the end event's ``cached_tokens``)."""
    usage: dict = {"prompt_tokens": parsed.prompt_tokens, "completion_tokens": tokens_out,
                   "total_tokens": parsed.prompt_tokens + tokens_out}
    cached = final.get("cached_tokens")
    if isinstance(cached, int):
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


async def follow(request: web.Request, stream: Stream, fast: Callable[[bytes], bytes | None] | None = None
                 ) -> AsyncIterator[list[bytes | tuple[str, bytes]]]:
    """The task's events as they come, one batch per wake-up, in order; ``ConnectionResetError``
    once the client is gone (the caller cancels the task). With ``fast``, a frame it converts
    comes as its bytes (a frame of tokens only, the usual one), any other as parsed events."""
    parser = SSEParser()
    cursor = Cursor()
    while True:
        frames = stream.read(cursor, False)
        if frames:
            batch: list[bytes | tuple[str, bytes]] = []
            for frame in frames:
                converted = fast(frame) if fast is not None else None
                if converted is not None:
                    batch.append(converted)
                    continue
                for name, data in parser.feed(frame):
                    if name == "gap":  # this reader fell behind the bounded buffer: the answer is incomplete
                        message = orjson.loads(data).get("message", "frames were dropped")
                        batch.append(("error", orjson.dumps({"code": "STREAM_GAP", "message": message,
                                                             "retriable": True})))
                        yield batch
                        return
                    batch.append((name, data))
            yield batch
            continue
        if stream.done:
            return
        await stream.wait_for_change(request)


class OpenAIFrontDoor:
    """The route handlers, and what they remember between requests."""

    def __init__(self) -> None:
        self.first_seen: dict[str, int] = {}  # model id -> when /v1/models first listed it (its "created")

    # -- models ---------------------------------------------------------------------------------

    def _models(self, driver: CoreDriver) -> list[dict]:
        placer = driver.core.placer
        ids: list[str] = []
        for pool_id in placer.pool_ids():
            snap = placer.snapshot(pool_id)
            if snap is not None and snap.model_ref and placer.is_usable(pool_id):
                model = normalize_model_ref(snap.model_ref)
                if model not in ids:
                    ids.append(model)
        now = int(time.time())
        return [{"id": model, "object": "model", "created": self.first_seen.setdefault(model, now), "owned_by": OWNER}
                for model in sorted(ids)]

    async def list_models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": self._models(request.app[DRIVER])})

    async def get_model(self, request: web.Request) -> web.Response:
        wanted = normalize_model_ref(request.match_info["model"])
        for model in self._models(request.app[DRIVER]):
            if model["id"] == wanted:
                return _json(model)
        return OpenAIError(404, f"The model '{request.match_info['model']}' does not exist", param="model",
                           code="model_not_found").response()

    # -- completions ----------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        driver = request.app[DRIVER]
        try:
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise OpenAIError(400, "the request body is not valid JSON", code="INVALID_PARAMS") from None
            principal = principal_of(request)
            parsed = parse_request(request, body, driver.core.placer, chat=chat, principal=principal)
            decision = driver.admit(parsed.spec, parsed.payload, request.get(CORRELATION_ID, ""), principal)
            if isinstance(decision, Rejected):
                raise rejection_error(decision)
            task_id = decision.task_id
            stream = driver.streams[task_id]
            transport = request.transport
            driver.reader_joined(task_id, stream, transport)
            finished, reason = False, None
            try:
                if parsed.stream:
                    resp = await self._stream(request, parsed, stream)
                else:
                    resp = await self._collect(request, parsed, stream)
                finished = True
                return resp
            except ConnectionError:
                # Nothing can reach the client any more; a response (not an exception) keeps
                # aiohttp from logging a traceback, and 499 is "client closed request" in the log.
                return web.Response(status=CLIENT_CLOSED_REQUEST)
            except asyncio.CancelledError:
                raise
            except BaseException:
                reason = "internal"
                raise
            finally:
                # the last reader gone before the end (an answer cut short by a gap too): cancel, which
                # frees the slot
                driver.reader_left(task_id, stream, transport, early=not (finished and stream.done), reason=reason)
        except OpenAIError as err:
            return err.response()

    def _headers(self, request: web.Request, task_id: str) -> dict[str, str]:
        headers = {"X-Task-Id": task_id}
        if CORRELATION_ID in request:
            headers["X-Correlation-Id"] = request[CORRELATION_ID]  # the middleware is too late for a stream
        return headers

    async def _collect(self, request: web.Request, parsed: ParsedRequest, stream: Stream) -> web.Response:
        spec = parsed.spec
        texts: list[str] = []
        async for batch in follow(request, stream):
            for name, data in batch:  # type: ignore[misc]  (no ``fast``: events only)
                if name == "token":
                    texts.append(orjson.loads(data)["t"])
                elif name == "end" or name == "error":
                    final = orjson.loads(data)
                    if name == "error" or final.get("canceled"):
                        err = terminal_error(final)
                        err.headers.update(self._headers(request, spec.task_id))
                        return err.response()
                    tokens_out = int(final.get("tokens_out", len(texts)))
                    text = "".join(texts)
                    reason = finish_reason(tokens_out, spec.max_tokens)
                    if parsed.chat:
                        rid, obj = f"chatcmpl-{spec.task_id}", "chat.completion"
                        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                  "finish_reason": reason}
                    else:
                        rid, obj = f"cmpl-{spec.task_id}", "text_completion"
                        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
                    resp = _json({"id": rid, "object": obj, "created": int(time.time()), "model": parsed.model,
                                  "choices": [choice], "usage": usage_of(parsed, tokens_out, final)})
                    resp.headers.update(self._headers(request, spec.task_id))
                    return resp
        raise RuntimeError(f"task {spec.task_id}: stream ended without a terminal event")

    async def _stream(self, request: web.Request, parsed: ParsedRequest, stream: Stream) -> web.StreamResponse:
        spec = parsed.spec
        framer = ChunkFramer(parsed, f"{'chatcmpl' if parsed.chat else 'cmpl'}-{spec.task_id}", int(time.time()))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **self._headers(request, spec.task_id)})
        await resp.prepare(request)
        opening = framer.opening()
        if opening:
            await resp.write(opening)
        async for batch in follow(request, stream, framer.tokens_only):
            out = []
            for item in batch:
                if type(item) is bytes:
                    out.append(item)
                    continue
                name, data = item
                if name == "token":
                    out.append(framer.token(orjson.loads(data)["t"]))
                elif name == "end" or name == "error":
                    final = orjson.loads(data)
                    if name == "error" or final.get("canceled"):
                        out.append(b"data: " + orjson.dumps(terminal_error(final).body()) + b"\n\n")  # and no [DONE]
                    else:
                        tokens_out = int(final.get("tokens_out", 0))
                        out.append(framer.closing(finish_reason(tokens_out, spec.max_tokens),
                                                  usage_of(parsed, tokens_out, final) if parsed.include_usage else None))
            if out:
                await resp.write(b"".join(out))  # every chunk of one upstream read in one write
        await resp.write_eof()
        return resp


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def add_openai_routes(app: web.Application) -> OpenAIFrontDoor:
    """Mount the ``/v1`` routes on an orchestratord app (one whose ``DRIVER`` is set)."""
    door = OpenAIFrontDoor()
    app.router.add_get("/v1/models", door.list_models)
    app.router.add_get("/v1/models/{model:.+}", door.get_model)  # model refs hold slashes
    app.router.add_post("/v1/chat/completions", door.chat_completions)
    app.router.add_post("/v1/completions", door.completions)
    return door
