"""orchestratord: the control plane. Clients in, admission and placement by the core, tokens out.

The ``CoreDriver`` owns the one ``core.Orchestrator``: it stamps every event with the loop's
clock, executes the commands that come back (open an upstream stream through the pool's
adapter, forward tokens, close an upstream, end a stream) and arms the single timer for the
core's next deadline. Handlers stay thin: parse, hand an event to the driver, stream what comes
back. Each admitted task has a ``Stream``: its SSE frames, narration for verbose readers, and
its readers (the last one leaving early cancels the task, which frees its engine slot).

This module serves the v2 API (tasks, events, cancel, sessions, pools, drain and reload
forwarded to the owning pool-managerd, capabilities, version, metrics, the pool-ready callback,
probes) and mounts the rest: ``/v2/nodes/*`` (``node_registry``), ``/v1/*`` (``openai_api``)
and ``/openapi.json`` (``openapi_doc``). Pools come from ``PoolDiscovery``; adapters from
``adapters``; every non-204 response carries ``X-Correlation-Id`` (``http.correlation``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Mapping

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ... import __version__
from ...core.commands import (
    Admitted,
    CloseUpstream,
    Dispatch,
    EmitEvent,
    Finish,
    ForwardTokens,
    Rejected,
)
from ...core.events import (
    DispatchFailed,
    Event,
    StreamEnded,
    StreamFailed,
    TaskCanceled,
    TaskSubmitted,
    Tick,
    TokensReceived,
)
from ...core.admission import QueuePolicy
from ...core.orchestrator import Orchestrator, OrchestratorConfig
from ...core.placement import Strategy
from ...core.sessions import BudgetPolicy
from ...core.types import Priority, TaskSpec
from ...ext.sse import frame_event
from .auth import api_key_middleware
from .adapters import HttpAdapter, LlamaCppAdapter, MockAdapter, OpenAIAdapter, Timeouts, UpstreamRequest, adapter_for
from ..daemon import prepare
from .discovery import PoolDiscovery
from ..config import OrchdSettings
from ..http import (
    ACCESS_LOG_FORMAT, CORRELATION_ID, correlation, fail, json_body, json_response, retry_headers, serve_metrics_on,
)
from .nodes import add_node_routes
from .openai_api import add_openai_routes
from ..openapi_doc import add_openapi_route
from ..waits import within
from .wire import TaskPayload, WireError, parse_task_request

log = logging.getLogger("llama_orch.orchestratord")


LIVENESS_CHECK_S = 1.0

#: What the adapters can run today; embedding and rerank are valid on the wire but not served.
SERVED_WORKLOADS = ("completion",)
ANY_POOL = "any"  # the pool_id label of queue-level series: a queued task has no pool yet


class OrchdMetrics:
    """The contract's orchestratord metrics (no task id is ever a label)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.enqueued = Counter("tasks_enqueued", "Tasks admitted to the queue", registry=r)
        self.started = Counter("tasks_started", "Tasks dispatched to an engine for the first time", registry=r)
        self.canceled = Counter("tasks_canceled", "Tasks canceled", ["reason"], registry=r)
        self.rejected = Counter("tasks_rejected", "Submissions not admitted", ["reason"], registry=r)
        self.backpressure = Counter("admission_backpressure_events", "429s from a full queue", ["policy"], registry=r)
        self.queue_depth = Gauge("queue_depth", "Queued tasks", ["priority"], registry=r)
        self.first_token = Histogram("latency_first_token_ms", "Submission to first token (ms)", registry=r,
                                     buckets=(50, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000))
        self.decode = Histogram("latency_decode_ms", "First token to the end of the stream (ms)", registry=r,
                                buckets=(250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000, 12000))
        self.tokens_in = Counter("tokens_in", "Prompt tokens sent to engines (estimated)", registry=r)
        self.tokens_out = Counter("tokens_out", "Tokens streamed to clients", registry=r)
        self.placements = Counter("placement_decisions", "Placement decisions", ["outcome", "pinned", "fallback"],
                                  registry=r)
        self.orchd_queue_depth = Gauge("orchd_admission_queue_depth", "Queued tasks", ["pool_id"], registry=r)
        self.orchd_enqueued = Counter("orchd_admission_enqueued", "Submissions by admission outcome",
                                      ["pool_id", "outcome"], registry=r)
        self.orchd_rejected = Counter("orchd_admission_rejected", "Submissions refused", ["pool_id", "reason"],
                                      registry=r)
        self.health_checks = Counter("orchd_pool_health_checks", "Pool status polls", ["pool_id", "outcome"],
                                     registry=r)
        self.health_check_ms = Histogram("orchd_pool_health_check_duration_ms", "Pool status poll duration (ms)",
                                         ["pool_id"], registry=r,
                                         buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500))
        self.dispatched = Counter("orchd_tasks_dispatched", "Dispatch attempts", ["pool_id", "outcome"], registry=r)
        self.dispatch_latency = Histogram("orchd_dispatch_latency_ms", "Dispatch to the first token from that pool (ms)",
                                          ["pool_id"], registry=r,
                                          buckets=(5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
        self.pools_available = Gauge("orchd_pools_available", "1 when the pool takes work", ["pool_id"], registry=r)
        self._dispatched_at: dict[str, tuple[str, float]] = {}  # task -> (pool, time) until its first token

    def health_check(self, pool_id: str, ok: bool, duration_ms: float) -> None:
        self.health_checks.labels(pool_id=pool_id, outcome="ok" if ok else "error").inc()
        self.health_check_ms.labels(pool_id=pool_id).observe(duration_ms)

    def observe(self, core: Orchestrator, commands: tuple, now: float) -> None:
        for cmd in commands:
            kind = type(cmd)
            if kind is ForwardTokens:
                self.tokens_out.inc(cmd.count)
                if cmd.first_index == 0:
                    task = core.task(cmd.task_id)
                    if task is not None:
                        self.first_token.observe(now - task.submitted_at)
                    pending = self._dispatched_at.pop(cmd.task_id, None)
                    if pending is not None:
                        self.dispatch_latency.labels(pool_id=pending[0]).observe(now - pending[1])
            elif kind is Admitted:
                self.enqueued.inc()
                self.orchd_enqueued.labels(pool_id=self._pool_label(core, cmd.task_id), outcome="admitted").inc()
            elif kind is Rejected:
                self.rejected.labels(reason=cmd.code).inc()
                pool = cmd.pool_id or ANY_POOL
                self.orchd_enqueued.labels(pool_id=pool, outcome="rejected").inc()
                self.orchd_rejected.labels(pool_id=pool, reason=cmd.code).inc()
                if cmd.http_status == 429:
                    self.backpressure.labels(policy=cmd.policy_label or "reject").inc()
            elif kind is Dispatch:
                self.dispatched.labels(pool_id=cmd.pool_id, outcome="sent").inc()
                task = core.task(cmd.task_id)
                placement = task.spec.placement if task is not None else None
                pinned = placement is not None and placement.mode.value == "pin"
                preferred = placement is not None and placement.prefer_pools and cmd.pool_id not in placement.prefer_pools
                self.placements.labels(outcome="placed" if cmd.attempt == 1 else "retried", pinned=str(pinned).lower(),
                                       fallback=str(cmd.attempt > 1 or bool(preferred)).lower()).inc()
                self._dispatched_at[cmd.task_id] = (cmd.pool_id, now)
                if cmd.attempt == 1:
                    self.started.inc()
                    if task is not None:
                        self.tokens_in.inc(task.spec.prompt_tokens)
            elif kind is Finish:
                self._dispatched_at.pop(cmd.task_id, None)
                if cmd.outcome.value == "canceled":
                    self.canceled.labels(reason=str(cmd.data.get("reason", "client"))).inc()
                elif cmd.kind == "end" and cmd.data.get("decode_ms") is not None:
                    self.decode.observe(cmd.data["decode_ms"])

    @staticmethod
    def _pool_label(core: Orchestrator, task_id: str) -> str:
        task = core.task(task_id)
        if task is not None and task.spec.placement.mode.value == "pin" and task.spec.placement.pin_pool_id:
            return task.spec.placement.pin_pool_id
        return ANY_POOL


@dataclass(slots=True)
class Stream:
    """What a task's SSE readers will see: frames so far, and whether the terminal one is in.

    ``notes`` are the narration for ``?verbose=true`` readers: ``(n, frame)`` goes out just
    before ``frames[n]``. Plain readers never see them.
    """

    frames: list[bytes] = field(default_factory=list)
    notes: list[tuple[int, bytes]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False
    started: bool = False  # the ``started`` frame is out: ``metrics`` may follow it
    readers: int = 0  # attached readers; the task is canceled when the last one leaves early
    upstream: asyncio.Task | None = None
    payload: TaskPayload = TaskPayload(prompt=None, inputs=(), seed=None, kv_hint=None)

    def push(self, frame: bytes, *, last: bool = False) -> None:
        self.frames.append(frame)
        self.done = self.done or last
        self.changed.set()

    def note(self, text: str) -> None:
        if not self.done:
            self.notes.append((len(self.frames), frame_event("narration", orjson.dumps({"text": text}))))
            self.changed.set()

    async def wait_for_change(self, request: web.Request) -> None:
        """Until the stream moves; ``ConnectionResetError`` once the reader's client is gone. The
        connection is looked at every ``LIVENESS_CHECK_S`` too: a server that does not cancel
        handlers on disconnect would otherwise keep a queued or stalled task for nobody."""
        self.changed.clear()
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the client went away")
            try:
                async with asyncio.timeout(LIVENESS_CHECK_S):
                    await self.changed.wait()
                return
            except TimeoutError:
                pass  # nothing new: look at the connection again

    def read(self, sent: int, noted: int, verbose: bool) -> tuple[list[bytes], int, int]:
        """Frames (and, verbose, notes) from the cursors on, with the new cursors."""
        frames = self.frames
        if not verbose:
            return frames[sent:], len(frames), noted
        out: list[bytes] = []
        notes = self.notes
        end = len(frames)
        while sent < end or noted < len(notes):
            if noted < len(notes) and notes[noted][0] <= sent:
                out.append(notes[noted][1])
                noted += 1
            elif sent < end:
                out.append(frames[sent])
                sent += 1
            else:
                break
        return out, sent, noted


class CoreDriver:
    def __init__(self, core: Orchestrator, *, timeouts: Timeouts = Timeouts(), stream_ttl_s: float = 300.0,
                 max_finished_streams: int = 10_000) -> None:
        self.core = core
        self.streams: dict[str, Stream] = {}
        self.session: aiohttp.ClientSession | None = None
        self.timeouts = timeouts
        self.adapters: dict[str, HttpAdapter | MockAdapter] = {}
        self.stream_ttl_s = stream_ttl_s
        self.max_finished_streams = max_finished_streams
        self._finished: collections.deque[tuple[float, str]] = collections.deque()  # (when, task) oldest first
        self._sweeper: asyncio.TimerHandle | None = None
        self.metrics = OrchdMetrics()
        self.accepting = True  # False once SIGTERM arrived: running tasks finish, new ones are refused
        self.idle = asyncio.Event()  # set while no task is admitted and unfinished
        self.idle.set()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time() * 1000.0

    async def start(self) -> None:
        # One pooled session for every upstream: keep-alive connections per engine.
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect_s))
        self.adapters = {"llamacpp": LlamaCppAdapter(self.session, self.timeouts),
                         "openai": OpenAIAdapter(self.session, self.timeouts), "mock": MockAdapter()}

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
        if self.session is not None:
            await self.session.close()

    # -- events in, commands out --------------------------------------------------------------

    def submit(self, body: object) -> Admitted | Rejected:
        """A ``POST /v2/tasks`` body: validate (``WireError`` is the handler's 400), then admit."""
        spec, payload = parse_task_request(body)
        return self.admit(spec, payload)

    def admit(self, spec: TaskSpec, payload: TaskPayload) -> Admitted | Rejected:
        """Every front door ends here: one admission decision; when admitted, ``streams[task_id]``
        carries the task's SSE frames until the terminal one."""
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
        self.streams[spec.task_id] = Stream(payload=payload)
        decision = next(c for c in self.handle(TaskSubmitted(spec=spec)) if getattr(c, "task_id", None) == spec.task_id
                        and isinstance(c, (Admitted, Rejected)))
        if isinstance(decision, Rejected):
            self.streams.pop(spec.task_id, None)
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
                if stream is not None:
                    if cmd.kind == "started":
                        stream.started = True
                    elif cmd.kind == "metrics" and not stream.started:
                        self._narrate_queued(stream, cmd.data)  # the contract's order: nothing before started
                        continue
                    stream.push(frame_event(cmd.kind, orjson.dumps(cmd.data)))
            elif kind is Finish:
                self._narrate_finish(cmd)
                self._finish(cmd)
            elif kind is Admitted:
                stream = self.streams.get(cmd.task_id)
                if stream is not None:
                    stream.note(f"Admitted at queue position {cmd.queue_position}; predicted start in "
                                f"{cmd.predicted_start_ms} ms.")
            elif kind is CloseUpstream:
                stream = self.streams.get(cmd.task_id)
                if stream is not None and stream.upstream is not None:
                    stream.upstream.cancel()  # closing the connection frees the engine slot
        if self.core.tasks:
            self.idle.clear()
        else:
            self.idle.set()
        self._arm()
        return commands

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
    def _narrate_queued(stream: Stream, data: Mapping[str, Any]) -> None:
        position = data.get("queue_position")
        where = f"position {position} of {data.get('queue_depth')}" if position is not None else \
            f"{data.get('queue_depth')} queued"
        stream.note(f"Still queued: {where}; predicted start in {data.get('predicted_start_ms')} ms; "
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
        stream = self.streams.get(cmd.task_id)
        if stream is None:
            return
        stream.push(frame_event(cmd.kind, orjson.dumps(dict(cmd.data))), last=True)
        self._retain(cmd.task_id)

    def _retain(self, task_id: str) -> None:
        """Keep a finished stream for late readers, within a count and an age; forget the oldest."""
        self._finished.append((asyncio.get_running_loop().time(), task_id))
        self._sweep()

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        finished = self._finished
        while finished and (len(finished) > self.max_finished_streams or finished[0][0] < now - self.stream_ttl_s):
            _, old = finished.popleft()
            stream = self.streams.get(old)
            if stream is not None and stream.done:
                self.streams.pop(old, None)
        if finished and self._sweeper is None:  # the age limit holds without new traffic too
            self._sweeper = loop.call_at(finished[0][0] + self.stream_ttl_s, self._swept)

    def _swept(self) -> None:
        self._sweeper = None
        self._sweep()

    # -- readers --------------------------------------------------------------------------------

    def reader_joined(self, stream: Stream) -> None:
        stream.readers += 1

    def reader_left(self, task_id: str, stream: Stream, *, early: bool, reason: str | None = None) -> None:
        """A reader is gone. The last one leaving before the end cancels the task (nobody listens:
        free the slot); one that read to the end lets the stream shrink to its terminal frame."""
        stream.readers -= 1
        if early:
            if stream.readers == 0 and not stream.done:
                reason = reason or ("shutdown" if not self.accepting else "disconnect")
                self.handle(TaskCanceled(task_id=task_id, reason=reason))
            return
        if stream.readers == 0 and stream.done and len(stream.frames) > 2:
            # Read to the end: a latecomer gets started and the end (the tokens were delivered).
            # Readers' cursors index frames, so this happens only with none attached.
            stream.frames = [stream.frames[0], stream.frames[-1]]
            stream.notes = [(1, frame) for _, frame in stream.notes[-1:]]

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
        task = self.core.task(cmd.task_id)
        snap = self.core.placer.snapshot(cmd.pool_id)
        if task is None or snap is None or cmd.engine_url is None:
            self.handle(DispatchFailed(task_id=cmd.task_id, attempt=cmd.attempt, code="WORKER_RESET",
                                       message=f"pool {cmd.pool_id} has no engine URL"))
            return
        adapter = self.adapters[adapter_for(snap.engine, cmd.engine_url)]
        payload = stream.payload
        request = UpstreamRequest(
            task_id=cmd.task_id, engine_url=cmd.engine_url, model=task.spec.model_ref,
            prompt=payload.prompt if payload.prompt is not None else " ".join(payload.inputs),
            messages=payload.messages, max_tokens=task.spec.max_tokens, seed=task.spec.seed,
            sampling=payload.sampling, start_index=task.tokens_out)
        stream.upstream = asyncio.ensure_future(adapter.stream(request, _TaskSink(self, cmd, stream)))


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
                self.stream.push(frames)  # every token of this read, in one write
                break

    def ended(self, *, tokens_out: int | None, decode_ms: float | None) -> None:
        self.driver.metrics.dispatched.labels(pool_id=self.pool_id, outcome="completed").inc()
        self.driver.handle(StreamEnded(task_id=self.task_id, attempt=self.attempt, tokens_out=tokens_out,
                                       decode_ms=decode_ms))

    def failed(self, *, code: str, message: str, before_first_token: bool) -> None:
        self.driver.narrate_failure(self.task_id, code, message, before_first_token)
        self.driver.metrics.dispatched.labels(pool_id=self.pool_id, outcome="failed").inc()
        event = DispatchFailed if before_first_token else StreamFailed
        self.driver.handle(event(task_id=self.task_id, attempt=self.attempt, code=code, message=message))


# -- HTTP ---------------------------------------------------------------------------------------

DRIVER = web.AppKey("driver", CoreDriver)
DISCOVERY = web.AppKey("discovery", PoolDiscovery)
PROFILE = web.AppKey("profile", str)


def _rejection(decision: Rejected) -> web.Response:
    body = {"code": decision.code, "message": decision.message, "retriable": decision.retriable}
    for name in ("retry_after_ms", "policy_label", "pool_id"):
        if getattr(decision, name) is not None:
            body[name] = getattr(decision, name)
    resp = json_response(body, decision.http_status)
    if decision.http_status in (429, 503):
        resp.headers.update(retry_headers(decision.retry_after_ms or 1000))
    return resp


async def create_task(request: web.Request) -> web.Response:
    driver = request.app[DRIVER]
    try:
        decision = driver.submit(await json_body(request))
    except WireError as exc:
        return json_response({"code": "INVALID_PARAMS", "message": str(exc), "field": exc.field}, 400)
    if isinstance(decision, Rejected):
        return _rejection(decision)
    tid = decision.task_id
    task = driver.core.task(tid)
    budget = _budget_headers(driver.core.sessions.view(task.spec.session_id)) if task else {}
    resp = json_response({
        "task_id": tid, "queue_position": decision.queue_position, "predicted_start_ms": decision.predicted_start_ms,
        "backoff_ms": decision.backoff_ms,
        "streams": {"sse": f"/v2/tasks/{tid}/events", "sse_verbose": f"/v2/tasks/{tid}/events?verbose=true"}}, 202)
    resp.headers.update(budget)
    return resp


async def task_events(request: web.Request) -> web.StreamResponse:
    driver = request.app[DRIVER]
    tid = request.match_info["task_id"]
    stream = driver.streams.get(tid)
    if stream is None:
        return json_response({"code": "TASK_NOT_FOUND", "message": f"task {tid} not found"}, 404)
    verbose = request.query.get("verbose", "false").lower() in ("true", "1", "yes")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Correlation-Id": request[CORRELATION_ID]})
    driver.reader_joined(stream)  # before the first await: a reader leaving meanwhile must count this one
    finished = False
    try:
        await resp.prepare(request)
        sent = noted = 0
        while True:
            out, sent, noted = stream.read(sent, noted, verbose)
            if out:
                await resp.write(b"".join(out))
                continue
            if stream.done:
                break
            await stream.wait_for_change(request)
        finished = True
    finally:
        driver.reader_left(tid, stream, early=not finished)
    await resp.write_eof()
    return resp


async def cancel_task(request: web.Request) -> web.Response:
    driver = request.app[DRIVER]
    tid = request.match_info["task_id"]
    if tid not in driver.streams:
        return json_response({"code": "TASK_NOT_FOUND", "message": f"task {tid} not found"}, 404)
    driver.handle(TaskCanceled(task_id=tid, reason="client"))
    return web.Response(status=204)


async def list_pools(request: web.Request) -> web.Response:
    placer = request.app[DRIVER].core.placer
    pools = []
    for pool_id in placer.pool_ids():
        snap = placer.snapshot(pool_id)
        leases = placer.leases(pool_id)
        pools.append({"pool_id": pool_id, "ready": placer.is_usable(pool_id), "live": snap.live,
                      "draining": snap.draining, "slots_total": snap.slots_total,
                      "slots_free": max(0, snap.slots_total - leases), "leases": leases, "model_ref": snap.model_ref,
                      "engine": snap.engine, "engine_version": snap.engine_version, "engine_url": snap.engine_url,
                      "ctx_max": snap.ctx_max, "device_mask": snap.device_mask, "replica_id": snap.replica_id,
                      "vram_total_bytes": snap.vram_total_bytes, "vram_free_bytes": snap.vram_free_bytes,
                      "manager_url": snap.manager_url, "last_error": snap.last_error})
    return json_response({"pools": pools})


def _snapshot(request: web.Request):
    placer = request.app[DRIVER].core.placer
    pool_id = request.match_info["pool_id"]
    snap = placer.snapshot(pool_id)
    if snap is None:
        fail(404, "POOL_NOT_FOUND", f"pool {pool_id} not found")
    return placer, snap


async def pool_health(request: web.Request) -> web.Response:
    placer, snap = _snapshot(request)
    leases = placer.leases(snap.pool_id)
    return json_response({"pool_id": snap.pool_id, "live": snap.live, "ready": placer.is_usable(snap.pool_id),
                          "draining": snap.draining, "last_error": snap.last_error,
                          "metrics": {"slots_total": snap.slots_total, "leases": leases,
                                      "slots_free": max(0, snap.slots_total - leases),
                                      "vram_free_bytes": snap.vram_free_bytes}})


async def _forward(request: web.Request, action: str) -> web.Response:
    """Drain and reload belong to the pool's own pool-managerd: pass them on, answer with its reply."""
    _, snap = _snapshot(request)
    body = await json_body(request)
    if not snap.manager_url:
        fail(503, "POOL_UNAVAILABLE", f"pool {snap.pool_id} has no known pool-managerd")
    driver = request.app[DRIVER]
    url = f"{snap.manager_url}/v2/pools/{snap.pool_id}/{action}"
    try:
        assert driver.session is not None
        async with driver.session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            return web.Response(body=await resp.read(), status=resp.status, content_type="application/json")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        fail(503, "POOL_UNAVAILABLE", f"pool-managerd {snap.manager_url} did not answer: {exc}")


async def pool_drain(request: web.Request) -> web.Response:
    return await _forward(request, "drain")


async def pool_reload(request: web.Request) -> web.Response:
    return await _forward(request, "reload")


async def capabilities(request: web.Request) -> web.Response:
    placer = request.app[DRIVER].core.placer
    engines: dict[str, dict] = {}
    for pool_id in placer.pool_ids():
        if not placer.is_usable(pool_id):
            continue
        snap = placer.snapshot(pool_id)
        e = engines.setdefault(snap.engine, {"engine": snap.engine, "ctx_max": 0, "slots": 0, "models": set(),
                                             "versions": set()})
        e["ctx_max"] = max(e["ctx_max"], snap.ctx_max)
        e["slots"] += snap.slots_total
        e["models"].add(snap.model_ref)
        e["versions"].add(snap.engine_version or "unknown")
    listed = [{**e, "models": sorted(e["models"]), "versions": sorted(e["versions"])} for _, e in sorted(engines.items())]
    return json_response({"api_version": "v2", "profile": request.app[PROFILE], "engines": listed,
                          "workloads": list(SERVED_WORKLOADS)})


async def version(request: web.Request) -> web.Response:
    return json_response({"version": __version__, "api_version": "v2"})


async def metrics(request: web.Request) -> web.Response:
    driver = request.app[DRIVER]
    m, core = driver.metrics, driver.core
    for priority in Priority:
        m.queue_depth.labels(priority=priority.value).set(core.queue_depth(priority))
    m.orchd_queue_depth.labels(pool_id=ANY_POOL).set(core.queue_depth())
    for pool_id in core.placer.pool_ids():
        m.pools_available.labels(pool_id=pool_id).set(1 if core.placer.is_usable(pool_id) else 0)
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


_BUDGET_HEADERS = (("tokens_used", "X-Budget-Tokens-Used"), ("tokens_remaining", "X-Budget-Tokens-Remaining"),
                   ("time_used_ms", "X-Budget-Time-Used-Ms"), ("time_remaining_ms", "X-Budget-Time-Remaining-Ms"),
                   ("cost_used", "X-Budget-Cost-Used"), ("cost_remaining", "X-Budget-Cost-Remaining"))


def _budget_headers(view: dict) -> dict[str, str]:
    """Used amounts always; remaining ones for the budgets that are configured."""
    return {header: str(view[key]) for key, header in _BUDGET_HEADERS if view[key] is not None}


async def get_session(request: web.Request) -> web.Response:
    core = request.app[DRIVER].core
    sid = request.match_info["session_id"]
    if sid not in core.sessions:
        fail(404, "SESSION_NOT_FOUND", f"session {sid} not found")
    view = core.sessions.view(sid)
    resp = json_response(view)
    resp.headers.update(_budget_headers(view))
    return resp


async def delete_session(request: web.Request) -> web.Response:
    sid = request.match_info["session_id"]
    if not request.app[DRIVER].core.forget_session(sid):
        fail(404, "SESSION_NOT_FOUND", f"session {sid} not found")
    return web.Response(status=204)


async def pool_ready_callback(request: web.Request) -> web.Response:
    body = await json_body(request)
    pool_id = body.get("pool_id")
    if not isinstance(pool_id, str) or not pool_id:
        fail(400, "INVALID_PARAMS", "pool_id: expected the id of the pool that became ready")
    discovery = request.app[DISCOVERY]
    await discovery.poll_all()  # bind at once instead of waiting for the next poll
    return json_response({"pool_id": pool_id, "known": pool_id in request.app[DRIVER].core.placer}, 202)


async def livez(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    driver = request.app[DRIVER]
    placer = driver.core.placer
    ready = [p for p in placer.pool_ids() if placer.is_usable(p)]
    ok = bool(ready) and driver.accepting
    resp = json_response({"ready": ok, "ready_pools": len(ready), "accepting": driver.accepting}, 200 if ok else 503)
    if not ok:
        resp.headers.update(retry_headers(1000))
    return resp


def create_app(config: OrchestratorConfig, manager_urls: list[str], *, poll_interval_ms: int = 5000,
               seed: int = 0, shutdown_grace_s: float = 30.0, timeouts: Timeouts = Timeouts(),
               node_stale_after_ms: float = 30_000.0, profile: str = "cloud",
               api_keys: tuple[str, ...] = (), metrics_host: str = "127.0.0.1",
               metrics_port: int | None = None) -> web.Application:
    app = web.Application(middlewares=[correlation, *([api_key_middleware(api_keys)] if api_keys else [])])
    app[PROFILE] = profile
    driver = app[DRIVER] = CoreDriver(Orchestrator(config, rng=random.Random(seed)), timeouts=timeouts)
    app[DISCOVERY] = PoolDiscovery(manager_urls, driver.handle, interval_ms=poll_interval_ms,
                                   on_check=driver.metrics.health_check)

    async def resources(app: web.Application):
        await driver.start()
        await app[DISCOVERY].start()
        yield
        await app[DISCOVERY].stop()
        await driver.stop()

    async def drain_streams(app: web.Application) -> None:
        """SIGTERM: stop admitting, let admitted tasks finish within the grace, then cancel the rest."""
        driver.accepting = False
        log.info("shutting down: %d tasks to finish (grace %.0f s)", len(driver.core.tasks), shutdown_grace_s)
        if not await within(driver.idle.wait(), shutdown_grace_s):
            # Every stream gets its terminal event now, so its reader's handler returns at once.
            log.warning("shutdown grace over: canceled %d tasks", driver.cancel_all("shutdown"))

    app.cleanup_ctx.append(resources)
    add_node_routes(app, app[DISCOVERY], stale_after_ms=node_stale_after_ms)
    add_openai_routes(app, DRIVER, CORRELATION_ID)
    add_openapi_route(app, "orchestratord")
    serve_metrics_on(app, metrics_host, metrics_port, metrics, DRIVER)
    app.on_shutdown.append(drain_streams)
    app.router.add_post("/v2/tasks", create_task)
    app.router.add_get("/v2/tasks/{task_id}/events", task_events)
    app.router.add_post("/v2/tasks/{task_id}/cancel", cancel_task)
    app.router.add_get("/v2/sessions/{session_id}", get_session)
    app.router.add_delete("/v2/sessions/{session_id}", delete_session)
    app.router.add_get("/v2/pools", list_pools)
    app.router.add_get("/v2/pools/{pool_id}/health", pool_health)
    app.router.add_post("/v2/pools/{pool_id}/drain", pool_drain)
    app.router.add_post("/v2/pools/{pool_id}/reload", pool_reload)
    app.router.add_get("/v2/meta/capabilities", capabilities)
    app.router.add_get("/v2/meta/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/callbacks/pool-ready", pool_ready_callback)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    return app


def core_config(settings: OrchdSettings) -> tuple[OrchestratorConfig, Timeouts]:
    """The core's configuration and the adapters' timeouts from the daemon's settings."""
    config = OrchestratorConfig(
        admission_capacity=settings.admission_capacity, admission_policy=QueuePolicy(settings.admission_policy),
        placement_strategy=Strategy(settings.placement_strategy), pool_stale_ms=settings.poll_interval_ms * 3,
        first_token_timeout_ms=settings.first_token_timeout_ms, token_timeout_ms=settings.token_timeout_ms,
        metrics_interval_ms=settings.metrics_interval_ms or None,
        budgets=BudgetPolicy(tokens=settings.session_token_budget, time_ms=settings.session_time_budget_ms,
                             cost=settings.session_cost_budget,
                             cost_per_1k_prompt_tokens=settings.cost_per_1k_prompt_tokens,
                             cost_per_1k_output_tokens=settings.cost_per_1k_output_tokens))
    # The core's timers decide; the adapter's read timeouts are the backstop a little behind them.
    timeouts = Timeouts(connect_s=settings.connect_timeout_ms / 1000,
                        first_token_s=settings.first_token_timeout_ms / 1000 + 1,
                        between_tokens_s=settings.token_timeout_ms / 1000 + 1, total_s=settings.stream_timeout_ms / 1000)
    return config, timeouts


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from ..config import ConfigError, OrchdSettings

    parser = argparse.ArgumentParser(prog="orchestratord", description="llama-orch control plane")
    parser.add_argument("--bind", help="HOST:PORT (env ORCHD_BIND_ADDR, default 127.0.0.1:8080)")
    parser.add_argument("--pool-managers", help="comma-separated pool-managerd URLs (env ORCHD_POOL_MANAGERS)")
    args = parser.parse_args(argv)
    prepare("orchestratord")
    try:
        settings = OrchdSettings.from_env(bind=args.bind, pool_managers=args.pool_managers)
    except ConfigError as exc:
        print(f"orchestratord: error: {exc}", file=sys.stderr)
        return 2
    if not settings.pool_managers:
        log.warning("no pool managers configured (ORCHD_POOL_MANAGERS): every task will get 503 until one is")
    config, timeouts = core_config(settings)
    log.info("listening on %s:%s, pool managers %s", settings.host, settings.port, ", ".join(settings.pool_managers))
    web.run_app(create_app(config, list(settings.pool_managers), poll_interval_ms=settings.poll_interval_ms,
                           shutdown_grace_s=settings.shutdown_grace_ms / 1000, timeouts=timeouts,
                           profile=settings.profile, api_keys=settings.api_keys, metrics_host=settings.host,
                           metrics_port=settings.metrics_port),
                host=settings.host, port=settings.port, print=None, shutdown_timeout=settings.shutdown_grace_ms / 1000 + 5,
                handler_cancellation=True,  # a client that leaves cancels its handler, hence its task
                access_log_format=ACCESS_LOG_FORMAT)
    return 0
