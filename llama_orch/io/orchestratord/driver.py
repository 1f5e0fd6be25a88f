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
from dataclasses import dataclass, field
from typing import Any, Mapping

import aiohttp
import orjson
from aiohttp import web

from ...core.commands import Admitted, CloseUpstream, Dispatch, EmitEvent, Finish, ForwardTokens, Rejected
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
from ...core.orchestrator import Orchestrator
from ...core.types import TaskSpec
from ...ext.sse import frame_event
from .adapters import HttpAdapter, LlamaCppAdapter, MockAdapter, OpenAIAdapter, Timeouts, UpstreamRequest, adapter_for
from .metrics import OrchdMetrics
from .wire import TaskPayload, parse_task_request

LIVENESS_CHECK_S = 1.0

#: What the adapters can run today; embedding and rerank are valid on the wire but not served.
SERVED_WORKLOADS = ("completion",)


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

#: The app key under which an orchestratord app holds its driver (every front door reads it).
DRIVER = web.AppKey("driver", CoreDriver)
