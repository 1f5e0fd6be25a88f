"""orchestratord's core driver: the one ``core.Orchestrator``, its timer, and each task's stream.

The ``CoreDriver`` owns the core: it stamps every event with the loop's clock, executes the
commands that come back (open an upstream stream through the pool's adapter, forward tokens,
close an upstream, end a stream) and arms the single timer for the core's next deadline. Every
front door (``/v2/tasks`` in ``app``, ``/v1`` in ``openai_api``) admits through ``admit`` and
reads back through the task's ``Stream``: its SSE frames, narration for verbose readers, and
its readers (the last one leaving early cancels the task, which frees its engine slot). Adapter
reports come back through a per-attempt sink (``_TaskSink``) as core events.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import gc
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import aiohttp
import orjson
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from ...core.commands import Admitted, CloseUpstream, Dispatch, EmitEvent, Finish, ForwardTokens, Rejected
from ...core.events import (
    DispatchFailed,
    Event,
    StreamEnded,
    StreamFailed,
    TaskCanceled,
    TaskSubmitted,
    TaskWatched,
    Tick,
    TokensReceived,
)
from ...core.orchestrator import Orchestrator
from ...core.placement import Strategy
from ...core.quotas import QuotaPolicy
from ...core.types import TaskSpec
from ...ext.sse import frame_event
from ..daemon import CORRELATION, FULL_COLLECTION_IDLE_S, FULL_COLLECTION_MIN_INTERVAL_S
from ..tls import TlsContexts, engine_connector
from ..tracing import Tracing, end, wall_ns_ago
from .adapters import HttpAdapter, LlamaCppAdapter, MockAdapter, OpenAIAdapter, Timeouts, UpstreamRequest, adapter_for
from .auth import ANONYMOUS
from .metrics import OrchdMetrics
from .prefix import prefix_chain, prompt_text
from .tenancy import Tenancy
from .wire import TaskPayload, parse_task_request

log = logging.getLogger("llama_orch.orchestratord.tasks")

LIVENESS_CHECK_S = 1.0

#: What the adapters can run today; embedding and rerank are valid on the wire but not served.
SERVED_WORKLOADS = ("completion",)


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamLimits:
    """What orchestratord keeps of tasks' SSE streams, so no client can grow its memory without bound
    (``ORCHD_STREAM_BUFFER_FRAMES``, ``_BUFFER_BYTES``, ``ORCHD_RETAINED_STREAMS``, ``_TTL_MS``, ``_BYTES``).

    One stream holds at most ``buffer_frames`` frames (a frame is one upstream read, often several
    tokens) and ``buffer_bytes`` bytes: past that its oldest frames but the first (``started``) are
    dropped, and a reader that had not read them gets one ``gap`` event saying how many it missed.
    A finished stream stays readable for ``retained_ttl_s``; the oldest finished ones go first once
    there are more than ``retained_streams`` of them or they hold more than ``retained_bytes``.
    """

    buffer_frames: int = 4096
    buffer_bytes: int = 1 << 20
    retained_streams: int = 10_000
    retained_ttl_s: float = 300.0
    retained_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.buffer_frames < 2 or self.buffer_bytes < 1 or self.retained_streams < 0 or self.retained_ttl_s < 0 \
                or self.retained_bytes < 0:
            raise ValueError(f"stream limits out of range: {self}")


MAX_NOTES = 64  # narration lines one stream keeps (a few per task; never per token)
NO_PAYLOAD = TaskPayload(prompt=None, inputs=(), seed=None, kv_hint=None)


@dataclass(slots=True)
class Cursor:
    """Where one reader is: frames read (an absolute index, which is also the next frame's SSE id),
    narration lines sent (absolute), and the queued-progress update it saw last."""

    sent: int = 0
    noted: int = 0
    progress: int = 0


@dataclass(slots=True)
class Stream:
    """What a task's SSE readers will see: frames so far, and whether the terminal one is in.

    Frame ``n`` (absolute, from 0) goes out with SSE ``id: n`` on its last event, so a reader that
    reconnects with ``Last-Event-ID: n`` goes on at frame ``n + 1``. ``frames[0]`` is the first frame
    (``started``) and is kept; ``frames[1:]`` are frames ``skipped + 1`` onwards (see ``StreamLimits``).
    ``notes`` are the narration for ``?verbose=true`` readers: ``(n, text)`` goes out just before
    frame ``n``; the admission line is kept as its two numbers until someone reads or adds one
    (most tasks are never read verbosely, and a queued task should cost little). While the task is
    queued (no frame yet), ``progress`` is its latest ``metrics`` event (and ``progress_note`` its
    narration): only the latest is kept, and every reader gets each new one once, so a long wait
    costs one frame, not one per tick. Readers wait in ``wait_for_change``,
    each on a future of its own resolved by the next change (no timer per wait).
    """

    frames: list[bytes] = field(default_factory=list)
    skipped: int = 0
    nbytes: int = 0
    notes: list[tuple[int, str]] | None = None
    notes_skipped: int = 0
    admitted: tuple[int, int] | None = None  # (queue position, predicted start ms): the first note, not yet written
    progress: bytes | None = None
    progress_note: str | None = None
    progress_seq: int = 0
    done: bool = False
    started: bool = False  # the ``started`` frame is out: ``metrics`` may follow it
    readers: list = field(default_factory=list)  # attached readers' connections; the last leaving early cancels
    upstream: asyncio.Task | None = None
    payload: TaskPayload = NO_PAYLOAD  # what the adapter sends: dropped once dispatched
    limits: StreamLimits = StreamLimits()
    waiters: list[asyncio.Future] | None = None  # one future per waiting reader, resolved by the next change
    correlation_id: str = ""  # the submitting request's: on every log line about the task, and to the engine
    owner: str = ANONYMOUS  # the principal that submitted it: only it may read or cancel the task
    admitted_at: float = 0.0  # loop time (ms) of the submission: the task-end line's total_ms
    span: Any = None  # the task's trace span (tracing on), ended with its terminal event
    attempt_spans: tuple | None = None  # (dispatch, forward_to_engine) of the attempt under way

    @property
    def total(self) -> int:
        """Frames pushed so far, dropped ones included."""
        return len(self.frames) + self.skipped

    def _changed(self) -> None:
        waiters = self.waiters
        if waiters:
            self.waiters = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def push(self, frame: bytes, *, last: bool = False) -> None:
        frames = self.frames
        frame = _with_id(frame, len(frames) + self.skipped)  # once here, not once per reader
        frames.append(frame)
        self.nbytes += len(frame)
        limits = self.limits
        if len(frames) > limits.buffer_frames or self.nbytes > limits.buffer_bytes:
            self._trim()
        if last:
            self.done = True
        if self.waiters:
            self._changed()

    def _trim(self) -> None:
        """Drop the oldest frames but the first and the newest until the stream is within its limits."""
        frames, limits = self.frames, self.limits
        drop, nbytes = 0, self.nbytes
        while (len(frames) - drop > limits.buffer_frames or nbytes > limits.buffer_bytes) and len(frames) - drop > 2:
            drop += 1
            nbytes -= len(frames[drop])
        if drop:
            del frames[1:1 + drop]
            self.skipped += drop
            self.nbytes = nbytes

    def _notes(self) -> list[tuple[int, str]]:
        """The narration so far, the admission line written out first if it is still pending."""
        notes = self.notes
        if notes is None:
            notes = self.notes = []
        if self.admitted is not None:
            position, predicted = self.admitted
            self.admitted = None
            notes.insert(0, (0, f"Admitted at queue position {position}; predicted start in {predicted} ms."))
        return notes

    def note(self, text: str) -> None:
        if not self.done:
            notes = self._notes()
            notes.append((self.total, text))
            if len(notes) > MAX_NOTES:
                del notes[0]
                self.notes_skipped += 1
            self._changed()

    def queued(self, metrics: bytes, narration: str) -> None:
        """The latest progress of a queued task, replacing the one before."""
        self.progress = metrics
        self.progress_note = narration
        self.progress_seq += 1
        self._changed()

    def release(self) -> None:
        """What only a dispatch needs (prompt, messages): gone at the first token (no retry after it) or the end."""
        self.payload = NO_PAYLOAD
        self.progress = self.progress_note = None

    async def wait_for_change(self, request: web.Request) -> None:
        """Until the stream moves; ``ConnectionResetError`` once the reader's client is gone. The
        driver wakes the readers of every watched stream each ``LIVENESS_CHECK_S`` whose
        connection is closing, so a server that does not cancel handlers on disconnect does not
        keep a queued or stalled task for nobody; no reader holds a timer of its own."""
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        # A future per reader: a reader's handler cancelled cancels its own future, not the others'.
        waiter = asyncio.get_running_loop().create_future()
        if self.waiters is None:
            self.waiters = [waiter]
        else:
            self.waiters.append(waiter)
        await waiter

    def cursor_after(self, last_event_id: int) -> Cursor:
        """A reader resuming after frame ``last_event_id`` (its ``Last-Event-ID``)."""
        sent = min(max(last_event_id + 1, 0), self.total)
        notes = self._notes()
        return Cursor(sent=sent, noted=self.notes_skipped + sum(1 for n, _ in notes if n < sent),
                      progress=self.progress_seq)

    def read(self, cursor: Cursor, verbose: bool) -> list[bytes]:
        """Everything from the cursor on (narration too when verbose); the cursor moves past it."""
        out: list[bytes] = []
        frames, total, skipped = self.frames, self.total, self.skipped
        notes = self._notes() if verbose else ()
        sent = cursor.sent
        while True:
            if verbose:
                i = max(cursor.noted - self.notes_skipped, 0)
                while i < len(notes) and notes[i][0] <= sent:
                    out.append(narration_frame(notes[i][1]))
                    i += 1
                cursor.noted = i + self.notes_skipped
            if sent >= total:
                break
            if 0 < sent <= skipped:  # dropped past the buffer bounds: say so, do not leave a silent hole
                missed = skipped + 1 - sent
                out.append(_with_id(frame_event("gap", orjson.dumps({
                    "missed_frames": missed, "message": f"{missed} frames of this stream were dropped before they "
                                                        "were read (the stream buffer is bounded)"})), skipped))
                sent = skipped + 1
                continue
            out.append(frames[sent - skipped if sent else 0])
            sent += 1
        cursor.sent = sent
        if total == 0 and self.progress is not None and cursor.progress != self.progress_seq:
            if verbose and self.progress_note is not None:
                out.append(narration_frame(self.progress_note))
            out.append(self.progress)
            cursor.progress = self.progress_seq
        return out

    def retained_bytes(self) -> int:
        return self.nbytes + sum(len(text) for _, text in self.notes or ())


def narration_frame(text: str) -> bytes:
    return frame_event("narration", orjson.dumps({"text": text}))


def _with_id(frame: bytes, n: int) -> bytes:
    """The frame with ``id: n`` on its last event (a frame ends with its blank line)."""
    return b"%bid: %d\n\n" % (frame[:-1], n)


class CoreDriver:
    def __init__(self, core: Orchestrator, *, timeouts: Timeouts = Timeouts(),
                 limits: StreamLimits = StreamLimits(), tls: TlsContexts | None = None,
                 tracing: Tracing | None = None, quotas: QuotaPolicy | None = None) -> None:
        self.core = core
        # who owns which session, and the quotas per principal (a session forgotten with its owner record)
        self.tenancy = Tenancy(quotas, max_sessions=core.config.max_sessions, forget_session=core.forget_session)
        self.tls = tls
        self.tracing = tracing
        self.poll_span_of: Callable[[str], Any] = lambda pool_id: None  # the pool's last health check (tracing)
        self.streams: dict[str, Stream] = {}
        self.session: aiohttp.ClientSession | None = None
        self.fresh_session: aiohttp.ClientSession | None = None
        self.timeouts = timeouts
        self.adapters: dict[str, HttpAdapter | MockAdapter] = {}
        self.limits = limits
        self._finished: collections.deque[tuple[float, str, int]] = collections.deque()  # (when, task, bytes), oldest first
        self._finished_bytes = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self.metrics = OrchdMetrics()
        self.accepting = True  # False once SIGTERM arrived: running tasks finish, new ones are refused
        self.task_log = False  # a log line for every task's end, not only failed ones (the daemon's ORCHD_ACCESS_LOG)
        self.idle = asyncio.Event()  # set while no task is admitted and unfinished
        self.idle.set()
        self.collect_when_idle = False  # the daemon's: full GC collections only while nothing is in flight
        self._collector: asyncio.TimerHandle | None = None
        self._collected_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None
        self.watched: dict[str, Stream] = {}  # tasks with at least one reader
        self._liveness: asyncio.TimerHandle | None = None

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time() * 1000.0

    async def start(self) -> None:
        # One pooled session for every upstream: keep-alive connections per engine.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect_s)
        self.session = aiohttp.ClientSession(timeout=timeout, connector=engine_connector(self.tls))
        # a request whose pooled connection the engine had closed goes again on a new one
        self.fresh_session = aiohttp.ClientSession(timeout=timeout,
                                                   connector=engine_connector(self.tls, force_close=True))
        self.adapters = {"llamacpp": LlamaCppAdapter(self.session, self.timeouts, self.fresh_session),
                         "openai": OpenAIAdapter(self.session, self.timeouts, self.fresh_session), "mock": MockAdapter()}
        self.metrics.watch_gc(True)

    async def stop(self) -> None:
        for task_id in list(self.core.tasks):
            self.handle(TaskCanceled(task_id=task_id, reason="shutdown"))
        upstreams = [s.upstream for s in self.streams.values() if s.upstream is not None]
        for task in upstreams:
            task.cancel()
        await asyncio.gather(*upstreams, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._liveness is not None:
            self._liveness.cancel()
        if self._collector is not None:
            self._collector.cancel()
        self.metrics.watch_gc(False)
        if self.session is not None:
            await self.session.close()
        if self.fresh_session is not None:
            await self.fresh_session.close()

    # -- events in, commands out --------------------------------------------------------------

    def submit(self, body: object, correlation_id: str = "", principal: str = ANONYMOUS) -> Admitted | Rejected:
        """A ``POST /v2/tasks`` body: validate (``WireError`` is the handler's 400), then admit."""
        spec, payload = parse_task_request(body)
        return self.admit(spec, payload, correlation_id, principal)

    def admit(self, spec: TaskSpec, payload: TaskPayload, correlation_id: str = "",
              principal: str = ANONYMOUS) -> Admitted | Rejected:
        """Every front door ends here: one admission decision; when admitted, ``streams[task_id]``
        carries the task's SSE frames until the terminal one, and the task is ``principal``'s.
        The principal's session ownership and quotas are checked first (``tenancy``), before the
        task can take a queue slot; a quota slot taken is given back exactly once."""
        if spec.workload not in SERVED_WORKLOADS:
            return Rejected(task_id=spec.task_id, http_status=400, code="INVALID_PARAMS",
                            message=f"workload: {spec.workload!r} is not served by this orchestrator (served: "
                                    f"{', '.join(SERVED_WORKLOADS)})")
        if not self.accepting:
            return Rejected(task_id=spec.task_id, http_status=503, code="POOL_UNAVAILABLE", retriable=True,
                            retry_after_ms=1000, message="orchestratord is shutting down; retry on another replica")
        # A task id already streaming (or recently ended) keeps its stream; the core refuses a
        # live duplicate, and a finished one may not be reused while its stream is retained.
        if spec.task_id in self.streams:
            return Rejected(task_id=spec.task_id, http_status=400, code="INVALID_PARAMS",
                            message=f"task_id {spec.task_id} is already in use")
        refusal = self.tenancy.enter(spec, principal, self.now())
        if refusal is not None:
            self.metrics.observe(self.core, (refusal,), self.now())  # counted as the core's refusals are
            return refusal
        config = self.core.config
        if config.placement_strategy is Strategy.PREFIX_AWARE and not spec.prefix:
            chain = prefix_chain(prompt_text(payload.prompt, payload.messages), config.prefix_block_tokens)
            if chain:
                spec = dataclasses.replace(spec, prefix=chain)
        stream = self.streams[spec.task_id] = Stream(payload=payload, limits=self.limits,
                                                     correlation_id=correlation_id, admitted_at=self.now(),
                                                     owner=principal)
        tracing = self.tracing
        if tracing is not None:
            # a child of the client's traceparent (the current context: ``tracing_middleware``)
            stream.span = tracing.start("task", kind=SpanKind.SERVER, attributes={
                "task_id": spec.task_id, "priority": spec.priority.value, "engine": spec.engine,
                "correlation_id": correlation_id or None})
            admission = tracing.start("admission", parent=stream.span)
        try:
            decision = next(c for c in self.handle(TaskSubmitted(spec=spec)) if getattr(c, "task_id", None) == spec.task_id
                            and isinstance(c, (Admitted, Rejected)))
        except BaseException:  # a broken invariant in the core: give back what this admission took, then say so
            self.streams.pop(spec.task_id, None)
            self.tenancy.refused(spec.task_id, self.now())
            if tracing is not None:
                end(admission, outcome="error", error="INTERNAL")
                end(stream.span, outcome="error", error="INTERNAL")
            raise
        if isinstance(decision, Rejected):
            self.streams.pop(spec.task_id, None)
            self.tenancy.refused(spec.task_id, self.now())
        else:
            self.tenancy.admitted(spec, principal)  # the session is the principal's once a task of it is in
        if tracing is not None:
            if isinstance(decision, Rejected):
                end(admission, outcome="rejected", error=decision.code)
                end(stream.span, outcome="rejected", error=decision.code)
            else:
                end(admission, outcome="admitted", attributes={"queue_position": decision.queue_position})
        return decision

    def handle(self, event: Event) -> tuple:
        now = self.now()
        commands = self.core.handle(event, now)
        self.metrics.observe(self.core, commands, now)
        for cmd in commands:
            kind = type(cmd)
            if kind is Dispatch:
                self._narrate_dispatch(cmd)
                self._dispatch(cmd)
            elif kind is EmitEvent:
                stream = self.streams.get(cmd.task_id)
                if stream is not None and not stream.done:  # (a dispatch just refused by _abandoned ended it)
                    if cmd.kind == "started":
                        stream.started = True
                    elif cmd.kind == "metrics" and not stream.started:
                        # queued: every reader hears its progress, and only the latest is kept
                        stream.queued(frame_event("metrics", orjson.dumps(cmd.data)), self._queued_text(cmd.data))
                        continue
                    stream.push(frame_event(cmd.kind, orjson.dumps(cmd.data)))
            elif kind is Finish:
                self._narrate_finish(cmd)
                self._finish(cmd)
            elif kind is Admitted:
                stream = self.streams.get(cmd.task_id)
                if stream is not None:
                    stream.admitted = (cmd.queue_position, cmd.predicted_start_ms)  # narrated if anyone asks
            elif kind is CloseUpstream:
                stream = self.streams.get(cmd.task_id)
                if stream is not None and stream.upstream is not None:
                    stream.upstream.cancel()  # closing the connection frees the engine slot
        if self.core.tasks:
            self.idle.clear()
        elif not self.idle.is_set():
            self.idle.set()
            if self.collect_when_idle and self._collector is None:
                self._collector = asyncio.get_running_loop().call_later(FULL_COLLECTION_IDLE_S, self._collect)
        self._arm()
        return commands

    def _collect(self) -> None:
        """A full collection, if the daemon is still idle and the last one is not too recent: its
        pause (the whole heap is walked) then stalls no stream (``daemon.GC_THRESHOLDS``)."""
        self._collector = None
        now = asyncio.get_running_loop().time()
        if self.idle.is_set() and now - self._collected_at >= FULL_COLLECTION_MIN_INTERVAL_S:
            self._collected_at = now
            self.metrics.collecting_idle = True
            try:
                gc.collect()
            finally:
                self.metrics.collecting_idle = False

    def _arm(self) -> None:
        """Keep the one timer at the core's next deadline; most events leave it where it is."""
        deadline = self.core.next_deadline()
        if deadline == self._armed_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_at = deadline
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline / 1000.0, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_at = None
        self.handle(Tick())

    # -- narration for ?verbose=true: a few lines per task, never per token ---------------------

    def _narrate_dispatch(self, cmd: Dispatch) -> None:
        stream = self.streams.get(cmd.task_id)
        snap = self.core.placer.snapshot(cmd.pool_id)
        if stream is None or snap is None:
            return
        engine = f"{snap.engine} {snap.engine_version or ''}".strip()
        warmth = "the session's KV cache is warm there" if cmd.kv_warmth else "KV cache cold"
        if cmd.attempt == 1:
            stream.note(f"Placed on pool {cmd.pool_id} ({engine}, model {snap.model_ref}); {warmth}.")
        else:
            stream.note(f"Attempt {cmd.attempt}: retrying on pool {cmd.pool_id} ({engine}) before any token was "
                        f"sent; {warmth}.")

    def narrate_failure(self, task_id: str, code: str, message: str, before_first_token: bool) -> None:
        stream = self.streams.get(task_id)
        if stream is not None and before_first_token:
            stream.note(f"The pool failed before the first token ({code}: {message}).")

    @staticmethod
    def _queued_text(data: Mapping[str, Any]) -> str:
        position = data.get("queue_position")
        where = f"position {position} of {data.get('queue_depth')}" if position is not None else \
            f"{data.get('queue_depth')} queued"
        return (f"Still queued: {where}; predicted start in {data.get('predicted_start_ms')} ms; "
                f"on-time probability {data.get('on_time_probability')}.")

    def _narrate_finish(self, cmd: Finish) -> None:
        stream = self.streams.get(cmd.task_id)
        if stream is None:
            return
        data = cmd.data
        if cmd.kind == "error":
            stream.note(f"Failed with {data.get('code')}: {data.get('message')}")
        elif data.get("canceled"):
            stream.note(f"Canceled ({data.get('reason')}) after {data.get('tokens_out', 0)} tokens.")
        else:
            tokens, ms = data.get("tokens_out", 0), data.get("decode_ms") or 0
            rate = f" ({tokens * 1000 / ms:.1f} tokens/s)" if ms else ""
            stream.note(f"Done: {tokens} tokens in {ms} ms{rate}.")

    def _finish(self, cmd: Finish) -> None:
        self.tenancy.ended(cmd.task_id, self.now())  # first: whatever ended it, the quota slot comes back
        stream = self.streams.get(cmd.task_id)
        if stream is None:
            return
        if self.task_log or cmd.kind == "error":
            self._log_end(cmd, stream)
        if stream.span is not None:
            error = cmd.data.get("code") if cmd.kind == "error" else None
            self._end_attempt_spans(stream, cmd.outcome.value, error)
            end(stream.span, outcome=cmd.outcome.value, error=error,
                attributes={"pool_id": cmd.pool_id, "tokens_out": cmd.data.get("tokens_out")})
        stream.push(frame_event(cmd.kind, orjson.dumps(dict(cmd.data))), last=True)
        stream.release()
        stream.upstream = None
        self._retain(cmd.task_id, stream)

    def _log_end(self, cmd: Finish, stream: Stream) -> None:
        """One line per task at its end: what an operator greps (text) or filters on (JSON logs)."""
        data = cmd.data
        snap = self.core.placer.snapshot(cmd.pool_id) if cmd.pool_id is not None else None
        fields = {"task_id": cmd.task_id, "correlation_id": stream.correlation_id or None, "pool_id": cmd.pool_id,
                  "replica_id": snap.replica_id if snap is not None else None, "outcome": cmd.outcome.value,
                  "tokens_out": data.get("tokens_out"), "decode_ms": data.get("decode_ms"),
                  "total_ms": round(self.now() - stream.admitted_at, 1)}
        if stream.span is not None:
            fields["trace_id"] = f"{stream.span.get_span_context().trace_id:032x}"
        if cmd.kind == "error":
            fields["code"] = data.get("code")
            log.info("task %s ended with %s: %s correlation_id=%s", cmd.task_id, data.get("code"), data.get("message"),
                     stream.correlation_id or "-", extra=fields)
        else:
            log.info("task %s ended %s on pool %s: %s tokens, %s ms in all correlation_id=%s", cmd.task_id,
                     cmd.outcome.value, cmd.pool_id or "-", data.get("tokens_out", 0), fields["total_ms"],
                     stream.correlation_id or "-", extra=fields)

    def _retain(self, task_id: str, stream: Stream) -> None:
        """Keep a finished stream for late readers, within a count, a byte total and an age; forget the oldest."""
        size = stream.retained_bytes()
        self._finished.append((asyncio.get_running_loop().time(), task_id, size))
        self._finished_bytes += size
        self._sweep()

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        finished, limits = self._finished, self.limits
        while finished and (len(finished) > limits.retained_streams or self._finished_bytes > limits.retained_bytes
                            or finished[0][0] <= now - limits.retained_ttl_s):
            _, old, size = finished.popleft()
            self._finished_bytes -= size
            stream = self.streams.get(old)
            if stream is not None and stream.done:
                self.streams.pop(old, None)
        if finished and self._sweeper is None:  # the age limit holds without new traffic too
            self._sweeper = loop.call_at(finished[0][0] + limits.retained_ttl_s, self._swept)

    def _swept(self) -> None:
        self._sweeper = None
        self._sweep()

    # -- readers --------------------------------------------------------------------------------

    def reader_joined(self, task_id: str, stream: Stream, transport: Any) -> None:
        """A reader attached. The first one makes the task watched: the core sends its progress
        (``metrics``) only while someone reads it, so a queued task nobody follows costs no ticks."""
        stream.readers.append(transport)
        if len(stream.readers) == 1:
            self.watched[task_id] = stream
            if self._liveness is None:
                self._liveness = asyncio.get_running_loop().call_later(LIVENESS_CHECK_S, self._check_readers)
            if not stream.done:
                self.handle(TaskWatched(task_id=task_id, watched=True))

    def _check_readers(self) -> None:
        """Wake the readers of each watched stream whose connection is closing, so they see it and
        leave (their handler may not be cancelled on disconnect); one timer for all of them."""
        self._liveness = None
        for stream in self.watched.values():
            if stream.waiters and any(t is None or t.is_closing() for t in stream.readers):
                stream._changed()
        if self.watched:
            self._liveness = asyncio.get_running_loop().call_later(LIVENESS_CHECK_S, self._check_readers)

    def reader_left(self, task_id: str, stream: Stream, transport: Any, *, early: bool,
                    reason: str | None = None) -> None:
        """A reader is gone. The last one leaving before the end cancels the task (nobody listens:
        free the slot). A finished stream stays whole for later readers, within ``StreamLimits``."""
        with contextlib.suppress(ValueError):
            stream.readers.remove(transport)
        if stream.readers:
            return
        if self.watched.get(task_id) is stream:
            del self.watched[task_id]
        if stream.done:
            return
        if early:
            reason = reason or ("shutdown" if not self.accepting else "disconnect")
            self.handle(TaskCanceled(task_id=task_id, reason=reason))
        else:
            self.handle(TaskWatched(task_id=task_id, watched=False))

    @staticmethod
    def _abandoned(stream: Stream) -> bool:
        """Readers came and every one of their connections is closing: nobody will read this task.
        (Their handlers may not have run their goodbyes yet: a burst of disconnects lands at once.)"""
        return bool(stream.readers) and all(t is None or t.is_closing() for t in stream.readers)

    def cancel_all(self, reason: str) -> int:
        task_ids = list(self.core.tasks)
        for task_id in task_ids:
            self.handle(TaskCanceled(task_id=task_id, reason=reason))
        return len(task_ids)

    # -- adapters -------------------------------------------------------------------------------

    def _dispatch(self, cmd: Dispatch) -> None:
        stream = self.streams[cmd.task_id]
        if stream.upstream is not None:
            stream.upstream.cancel()
        if self._abandoned(stream):  # no prompt evaluation for a client that is gone
            self.handle(TaskCanceled(task_id=cmd.task_id, reason="disconnect"))
            return
        task = self.core.task(cmd.task_id)
        snap = self.core.placer.snapshot(cmd.pool_id)
        if task is None or snap is None or cmd.engine_url is None:
            self.handle(DispatchFailed(task_id=cmd.task_id, attempt=cmd.attempt, code="WORKER_RESET",
                                       message=f"pool {cmd.pool_id} has no engine URL"))
            return
        adapter_name = adapter_for(snap.engine, cmd.engine_url)
        adapter = self.adapters[adapter_name]
        payload = stream.payload
        trace_headers = None
        if self.tracing is not None and stream.span is not None:
            trace_headers = self._trace_dispatch(cmd, stream, snap, adapter_name)
        request = UpstreamRequest(
            task_id=cmd.task_id, engine_url=cmd.engine_url, model=task.spec.model_ref,
            prompt=payload.prompt if payload.prompt is not None else " ".join(payload.inputs),
            messages=payload.messages, max_tokens=task.spec.max_tokens, seed=task.spec.seed,
            sampling=payload.sampling, start_index=task.tokens_out, correlation_id=stream.correlation_id,
            trace_headers=trace_headers)
        # A context of its own, not the current one: a dispatch may happen while another request is
        # served (a cancel frees the slot this task takes), and the adapter's log lines must carry
        # this task's correlation id and trace, not that request's.
        context = contextvars.Context()
        context.run(CORRELATION.set, stream.correlation_id or None)
        if stream.attempt_spans is not None:
            context.run(otel_context.attach, trace.set_span_in_context(stream.attempt_spans[1]))
        stream.upstream = asyncio.get_running_loop().create_task(
            adapter.stream(request, _TaskSink(self, cmd, stream)), context=context)

    def _trace_dispatch(self, cmd: Dispatch, stream: Stream, snap, adapter_name: str) -> dict[str, str]:
        """The spans of one attempt: placement (from admission, or at once for a retry; linked to
        the chosen pool's last health check), adapter_bind, then dispatch and forward_to_engine,
        open until the attempt ends. Returns the ``traceparent`` headers for the engine."""
        tracing = self.tracing
        assert tracing is not None
        now = self.now()
        waited = now - stream.admitted_at if cmd.attempt == 1 else 0.0
        checked = self.poll_span_of(cmd.pool_id)
        pool = {"pool_id": cmd.pool_id, "replica_id": snap.replica_id, "engine": snap.engine,
                "engine_version": snap.engine_version}
        placement = tracing.start("placement", parent=stream.span, start_time=wall_ns_ago(waited),
                                  attributes={**pool, "attempt": cmd.attempt, "queue_ms": round(waited, 1)},
                                  links=[Link(checked)] if checked is not None else None)
        end(placement, outcome="placed")
        end(tracing.start("adapter_bind", parent=stream.span, attributes={**pool, "adapter": adapter_name}))
        self._end_attempt_spans(stream, "superseded", None)
        dispatch = tracing.start("dispatch", parent=stream.span, attributes={**pool, "attempt": cmd.attempt})
        forward = tracing.start("forward_to_engine", parent=dispatch, kind=SpanKind.CLIENT,
                                attributes={**pool, "server.address": cmd.engine_url})
        stream.attempt_spans = (dispatch, forward)
        return dict(tracing.inject({}, forward))

    @staticmethod
    def _end_attempt_spans(stream: Stream, outcome: str, error: str | None) -> None:
        spans = stream.attempt_spans
        if spans is not None:
            stream.attempt_spans = None
            for span in reversed(spans):
                end(span, outcome=outcome, error=error)


class _TaskSink:
    """One attempt's adapter reports, turned into core events stamped with that attempt."""

    __slots__ = ("driver", "task_id", "attempt", "pool_id", "stream")

    def __init__(self, driver: CoreDriver, cmd: Dispatch, stream: Stream) -> None:
        self.driver, self.task_id, self.attempt, self.pool_id, self.stream = (
            driver, cmd.task_id, cmd.attempt, cmd.pool_id, stream)

    def tokens(self, frames: bytes, count: int) -> None:
        out = self.driver.handle(TokensReceived(task_id=self.task_id, count=count, attempt=self.attempt))
        for cmd in out:
            if type(cmd) is ForwardTokens:
                stream = self.stream
                stream.push(frames)  # every token of this read, in one write
                if cmd.first_index == 0:
                    stream.release()  # no retry after the first token: the prompt is not needed again
                break

    def ended(self, *, tokens_out: int | None, decode_ms: float | None, cached_tokens: int | None = None) -> None:
        metrics = self.driver.metrics
        metrics.child(metrics.dispatched, self.pool_id, "completed").inc()
        if self.stream.attempt_spans is not None:
            self.driver._end_attempt_spans(self.stream, "completed", None)
        if cached_tokens:
            metrics.child(metrics.prefix_cache_hit_tokens, self.pool_id).inc(cached_tokens)
        self.driver.handle(StreamEnded(task_id=self.task_id, attempt=self.attempt, tokens_out=tokens_out,
                                       decode_ms=decode_ms, cached_tokens=cached_tokens))

    def failed(self, *, code: str, message: str, before_first_token: bool) -> None:
        log.info("task %s attempt %d on pool %s failed %s the first token: %s: %s correlation_id=%s",
                 self.task_id, self.attempt, self.pool_id, "before" if before_first_token else "after", code, message,
                 self.stream.correlation_id or "-",
                 extra={"task_id": self.task_id, "correlation_id": self.stream.correlation_id or None,
                        "pool_id": self.pool_id, "attempt": self.attempt, "outcome": "attempt_failed", "code": code})
        self.driver.narrate_failure(self.task_id, code, message, before_first_token)
        if self.stream.attempt_spans is not None:
            self.driver._end_attempt_spans(self.stream, "failed", code)
        metrics = self.driver.metrics
        metrics.child(metrics.dispatched, self.pool_id, "failed").inc()
        event = DispatchFailed if before_first_token else StreamFailed
        self.driver.handle(event(task_id=self.task_id, attempt=self.attempt, code=code, message=message))

#: The app key under which an orchestratord app holds its driver (every front door reads it).
DRIVER = web.AppKey("driver", CoreDriver)
