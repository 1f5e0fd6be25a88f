"""orchestratord's Prometheus metrics: the contract's task metrics and the ``orchd_*`` series.

``OrchdMetrics`` owns one registry per app and learns everything from the commands the core
returns (``observe``), so the metrics can never disagree with what the driver did. ``render``
sets the gauges from the core's state at scrape time and writes the exposition format.

Labels (the ones dashboards filter by) and where their values come from:
- ``engine``, ``engine_version``, ``pool_id``, ``replica_id``: the snapshot of the pool the task
  runs on, as orchestratord last polled it from the pool's pool-managerd. A queued task has no
  pool yet: its ``pool_id``, ``engine_version`` and ``replica_id`` are ``any`` (a pinned task's
  are its pool's); its ``engine`` is the one it asked for.
- No label ever carries a task id, a session id, a model name or anything else a client chose
  freely: ``engine`` and ``priority`` are validated against fixed sets before they get here (an
  engine no pool serves and the wire layer does not know is ``other``), a pool id a client named
  that no pool has is ``unknown``, and reasons are the core's codes (a bounded set; a cancel
  reason or an error code outside it is ``other``).
- Submissions refused before the core sees them, on ``POST /v2/tasks`` and the ``/v1`` OpenAI
  routes (bad JSON, schema errors: the wire layer's 400s; the driver's own refusals, a duplicate
  task id or a shutting-down daemon; an unknown ``/v1`` model) are counted by the middleware
  ``count_wire_rejections`` in ``tasks_rejected_total{engine="unknown"}``, by the envelope's
  code. Authentication failures are not submissions and are not counted there; the driver's
  tenancy refusals (403 ``SESSION_FORBIDDEN``, 429 ``QUOTA_EXCEEDED``) go through ``observe``.

The hot path (one ``ForwardTokens`` per upstream read) costs four dictionary lookups (the task,
its pool's snapshot, the pool's cached series) and one ``inc``: each pool's label values and its
``tokens_out`` child are built once per snapshot.
"""

from __future__ import annotations

import contextvars
import gc
import time

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ...core.commands import Admitted, Dispatch, Finish, ForwardTokens, Rejected
from ...core.orchestrator import Orchestrator
from ...core.types import BreakerState, PlacementMode, Priority, TaskSpec
from .wire import ENGINES

ANY_POOL = "any"  # the pool_id (and engine_version, replica_id) label of a task that has no pool yet
UNKNOWN_POOL = "unknown"  # a pool id a client named that no pool has: never a label of its own
UNKNOWN = "unknown"  # a label value nobody reported (an engine without a version; a wire-level refusal's engine)
OTHER = "other"  # a value outside a label's fixed set
#: Cancel reasons as labels; a reason outside this set is counted as ``other``.
CANCEL_REASONS = frozenset({"client", "disconnect", "shutdown", "internal"})
#: Codes a refused submission's envelope may carry (the contract's); anything else is ``other``.
REJECT_REASONS = frozenset({
    "INVALID_PARAMS", "DEADLINE_UNMET", "ADMISSION_REJECT", "QUEUE_FULL_DROP_LRU", "POOL_UNREADY",
    "POOL_UNAVAILABLE", "INTERNAL", "QUOTA_EXCEEDED", "SESSION_FORBIDDEN", "REPLICA_EXHAUSTED", "DECODE_TIMEOUT",
    "WORKER_RESET",
})
#: The routes that submit tasks: their refusals before the core count in ``tasks_rejected_total``.
SUBMISSION_ROUTES = frozenset({"/v2/tasks", "/v1/chat/completions", "/v1/completions"})
#: Not counted here as refused submissions: no principal submitted anything (authentication). The
#: driver's own 403 (``SESSION_FORBIDDEN``) and 429 (``QUOTA_EXCEEDED``) are counted by ``observe``.
_NOT_SUBMISSIONS = frozenset({401, 403})
_AUTH_CODES = frozenset({"MISSING_TOKEN", "BAD_TOKEN", "AUTH_UNAVAILABLE"})

FIRST_TOKEN_BUCKETS = (50, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000)
DECODE_BUCKETS = (250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000, 12000)
CANDIDATE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)

POOL_LABELS = ("engine", "engine_version", "pool_id", "replica_id")

#: Set by ``count_wire_rejections`` for the request it wraps; ``observe`` marks it when the core
#: answers the submission (``Admitted`` or ``Rejected``), so a refusal the core already counted is
#: not counted again.
_CORE_ANSWERED: contextvars.ContextVar[list | None] = contextvars.ContextVar("llama_orch_core_answered",
                                                                             default=None)


class _PoolSeries:
    """One pool's label values and its hottest children, for one snapshot of the pool."""

    __slots__ = ("snapshot", "labels", "tokens_out", "tokens_in")

    def __init__(self, snapshot, labels: tuple[str, str, str, str], tokens_out, tokens_in) -> None:
        self.snapshot = snapshot
        self.labels = labels  # (engine, engine_version, pool_id, replica_id)
        self.tokens_out = tokens_out
        self.tokens_in = tokens_in


class OrchdMetrics:
    """The contract's orchestratord metrics (no task id is ever a label)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        task_labels = [*POOL_LABELS, "priority"]
        self.enqueued = Counter("tasks_enqueued", "Tasks admitted to the queue", task_labels, registry=r)
        self.started = Counter("tasks_started", "Tasks dispatched to an engine for the first time", task_labels,
                               registry=r)
        self.canceled = Counter("tasks_canceled", "Tasks canceled", [*POOL_LABELS, "reason"], registry=r)
        self.rejected = Counter("tasks_rejected", "Submissions not admitted (wire-level refusals included)",
                                ["engine", "reason"], registry=r)
        self.backpressure = Counter("admission_backpressure_events", "429s from a full queue", ["engine", "policy"],
                                    registry=r)
        self.queue_depth = Gauge("queue_depth", "Queued tasks", ["engine", "engine_version", "pool_id", "priority"],
                                 registry=r)
        latency_labels = ["engine", "engine_version", "pool_id", "priority"]
        self.first_token = Histogram("latency_first_token_ms", "Submission to first token (ms)", latency_labels,
                                     registry=r, buckets=FIRST_TOKEN_BUCKETS)
        self.decode = Histogram("latency_decode_ms", "First token to the end of the stream (ms)", latency_labels,
                                registry=r, buckets=DECODE_BUCKETS)
        self.tokens_in = Counter("tokens_in", "Prompt tokens sent to engines (estimated)", POOL_LABELS, registry=r)
        self.tokens_out = Counter("tokens_out", "Tokens streamed to clients", POOL_LABELS, registry=r)
        self.placements = Counter("placement_decisions", "Placement decisions", ["outcome", "pinned", "fallback"],
                                  registry=r)
        self.candidates = Histogram("placement_candidates_considered", "Pools a placement chose among (usable, "
                                    "with a free slot, serving the task's engine and model; 1 for a pin)",
                                    registry=r, buckets=CANDIDATE_BUCKETS)
        self.orchd_queue_depth = Gauge("orchd_admission_queue_depth", "Queued tasks", ["pool_id"], registry=r)
        self.queue_capacity = Gauge("orchd_admission_queue_capacity", "Tasks the admission queue holds at most",
                                    registry=r)
        self.finished = Counter("orchd_tasks_finished", "Admitted tasks by how they ended (completed, failed, "
                                "canceled, evicted)", ["pool_id", "outcome"], registry=r)
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
        self.prefix_cache_hit_tokens = Counter("prefix_cache_hit_tokens", "Prompt tokens an engine found in its KV "
                                               "cache (as the engine reports it)", ["pool_id"], registry=r)
        self.dispatch_latency = Histogram("orchd_dispatch_latency_ms", "Dispatch to the first token from that pool (ms)",
                                          ["pool_id"], registry=r,
                                          buckets=(5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
        self.pools_available = Gauge("orchd_pools_available", "1 when the pool takes work", ["pool_id"], registry=r)
        self.breaker_open = Gauge("orchd_pool_breaker_open", "1 while the pool's circuit breaker is open (placement "
                                  "skips the pool until a probe after the cooldown succeeds)", ["pool_id"], registry=r)
        self._dispatched_at: dict[str, tuple[str, float]] = {}  # task -> (pool, time) until its first token
        self.gc_pause = Histogram("orchd_gc_pause_seconds", "Pauses of the cyclic garbage collector", ["generation"],
                                  registry=r, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))
        self.gc_pause_max = Gauge("orchd_gc_pause_max_seconds", "The longest garbage collector pause so far",
                                  registry=r)
        self._children: dict[tuple, object] = {}  # (metric, label values) -> child: labels() is slow per call
        self._pools: dict[str | None, _PoolSeries] = {}  # pool id -> its labels for its current snapshot
        #: Engine label values: the wire layer's engines and those pools reported; any other is ``other``.
        self._engines: set[str] = set(ENGINES)
        self._queue_keys: set[tuple[str, str, str, str]] = set()  # queue_depth label values ever set
        self.gc_idle = Counter("orchd_gc_idle_collections", "Full collections run while idle (not pauses under load)",
                               registry=r)
        self.collecting_idle = False  # the driver's idle-time full collection is running
        self._gc_children = [self.gc_pause.labels(generation=str(g)) for g in range(3)]
        self._gc_started = 0.0
        self._gc_longest = 0.0

    def child(self, metric, *values: str):
        """``metric.labels(*values)``, looked up once: the hot path counts every dispatch and end."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    @staticmethod
    def total(metric, **labels: str) -> float:
        """The sum of a counter's or a gauge's samples whose labels include ``labels`` (for tests and tools)."""
        value = 0.0
        for family in metric.collect():
            for sample in family.samples:
                if sample.name.endswith(("_created", "_bucket")):
                    continue
                if all(sample.labels.get(k) == v for k, v in labels.items()):
                    value += sample.value
        return value

    def watch_gc(self, on: bool) -> None:
        """Time every collection (``gc.callbacks``): a pause stalls every stream at once."""
        if on and self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        elif not on and self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        if self.collecting_idle:  # no stream was waiting on it
            self.gc_idle.inc()
            return
        pause = time.perf_counter() - self._gc_started
        self._gc_children[min(2, info.get("generation", 2))].observe(pause)
        if pause > self._gc_longest:
            self._gc_longest = pause
            self.gc_pause_max.set(pause)

    def health_check(self, pool_id: str, ok: bool, duration_ms: float) -> None:
        self.health_checks.labels(pool_id=pool_id, outcome="ok" if ok else "error").inc()
        self.health_check_ms.labels(pool_id=pool_id).observe(duration_ms)

    # -- labels ---------------------------------------------------------------------------------

    def _engine(self, engine: str | None) -> str:
        """A task's engine as a label: one the wire layer or a pool knows, else ``other``."""
        if engine is None:
            return UNKNOWN
        return engine if engine in self._engines else OTHER

    def _series(self, core: Orchestrator, pool_id: str | None) -> _PoolSeries:
        """The pool's label values (and hot children), rebuilt only when its snapshot changed."""
        snap = core.placer.snapshot(pool_id) if pool_id is not None else None
        found = self._pools.get(pool_id)
        if found is not None and found.snapshot is snap:
            return found
        if snap is not None:
            self._engines.add(snap.engine)  # an operator's pool: its engine is a label value of its own
            labels = (snap.engine, str(snap.engine_version or UNKNOWN), snap.pool_id, snap.replica_id or UNKNOWN)
        elif pool_id is not None:  # removed while its task ran: the id came from a pool, not a client
            labels = (UNKNOWN, UNKNOWN, pool_id, UNKNOWN)
        else:
            labels = (UNKNOWN, ANY_POOL, ANY_POOL, ANY_POOL)
        found = self._pools[pool_id] = _PoolSeries(snap, labels, self.child(self.tokens_out, *labels),
                                                   self.child(self.tokens_in, *labels))
        return found

    @staticmethod
    def _known_pool(core: Orchestrator, pool_id: str) -> str:
        """A client-named pool id as a label: itself when that pool exists, else ``unknown``, so
        made-up ids cannot grow the series (each series is memory kept for good)."""
        return pool_id if pool_id in core.placer else UNKNOWN_POOL

    @classmethod
    def _pool_label(cls, core: Orchestrator, task_id: str) -> str:
        task = core.task(task_id)
        if task is not None and task.spec.placement.mode.value == "pin" and task.spec.placement.pin_pool_id:
            return cls._known_pool(core, task.spec.placement.pin_pool_id)
        return ANY_POOL

    def _queued_labels(self, core: Orchestrator, spec: TaskSpec) -> tuple[str, str, str, str]:
        """(engine, engine_version, pool_id, replica_id) of a task without a pool: ``any``, or its
        pinned pool's when that pool exists."""
        placement = spec.placement
        if placement.mode is PlacementMode.PIN and placement.pin_pool_id and placement.pin_pool_id in core.placer:
            engine, version, pool_id, replica = self._series(core, placement.pin_pool_id).labels
            return self._engine(spec.engine), version, pool_id, replica
        return self._engine(spec.engine), ANY_POOL, ANY_POOL, ANY_POOL

    # -- commands -------------------------------------------------------------------------------

    def observe(self, core: Orchestrator, commands: tuple, now: float) -> None:
        for cmd in commands:
            kind = type(cmd)
            if kind is ForwardTokens:
                task = core.tasks.get(cmd.task_id)
                series = self._series(core, task.pool_id if task is not None else None)
                series.tokens_out.inc(cmd.count)
                if cmd.first_index == 0:
                    if task is not None:
                        engine, version, pool_id, _ = series.labels
                        self.child(self.first_token, engine, version, pool_id,
                                   task.spec.priority.value).observe(now - task.submitted_at)
                    pending = self._dispatched_at.pop(cmd.task_id, None)
                    if pending is not None:
                        self.child(self.dispatch_latency, pending[0]).observe(now - pending[1])
            elif kind is Admitted:
                answered = _CORE_ANSWERED.get()
                if answered is not None:
                    answered[0] = True
                task = core.task(cmd.task_id)
                if task is not None:
                    self.child(self.enqueued, *self._queued_labels(core, task.spec), task.spec.priority.value).inc()
                self.child(self.orchd_enqueued, self._pool_label(core, cmd.task_id), "admitted").inc()
            elif kind is Rejected:
                answered = _CORE_ANSWERED.get()
                if answered is not None:
                    answered[0] = True
                engine = self._engine(cmd.engine)
                reason = cmd.code if cmd.code in REJECT_REASONS else OTHER
                self.child(self.rejected, engine, reason).inc()
                pool = self._known_pool(core, cmd.pool_id) if cmd.pool_id else ANY_POOL
                self.child(self.orchd_enqueued, pool, "rejected").inc()
                self.child(self.orchd_rejected, pool, reason).inc()
                if cmd.http_status == 429 and cmd.code != "QUOTA_EXCEEDED":  # a principal's quota is no full queue
                    policy = cmd.policy_label if cmd.policy_label in ("reject", "drop-lru") else "reject"
                    self.child(self.backpressure, engine, policy).inc()
            elif kind is Dispatch:
                self.child(self.dispatched, cmd.pool_id, "sent").inc()
                task = core.task(cmd.task_id)
                placement = task.spec.placement if task is not None else None
                pinned = placement is not None and placement.mode is PlacementMode.PIN
                preferred = placement is not None and placement.prefer_pools and cmd.pool_id not in placement.prefer_pools
                self.child(self.placements, "placed" if cmd.attempt == 1 else "retried", "true" if pinned else "false",
                           "true" if cmd.attempt > 1 or preferred else "false").inc()
                self.candidates.observe(cmd.candidates)
                self._dispatched_at[cmd.task_id] = (cmd.pool_id, now)
                if cmd.attempt == 1 and task is not None:
                    series = self._series(core, cmd.pool_id)
                    self.child(self.started, *series.labels, task.spec.priority.value).inc()
                    series.tokens_in.inc(task.spec.prompt_tokens)
            elif kind is Finish:
                self._dispatched_at.pop(cmd.task_id, None)
                if cmd.pool_id is not None:
                    engine, version, pool_id, replica = self._series(core, cmd.pool_id).labels
                else:
                    engine, version, pool_id, replica = self._engine(cmd.engine), ANY_POOL, ANY_POOL, ANY_POOL
                outcome = cmd.outcome.value
                self.child(self.finished, pool_id, outcome).inc()
                if outcome == "canceled":
                    reason = str(cmd.data.get("reason", "client"))
                    self.child(self.canceled, engine, version, pool_id, replica,
                               reason if reason in CANCEL_REASONS else OTHER).inc()
                elif cmd.kind == "end" and cmd.data.get("decode_ms") is not None:
                    priority = cmd.priority.value if cmd.priority is not None else UNKNOWN
                    self.child(self.decode, engine, version, pool_id, priority).observe(cmd.data["decode_ms"])

    def wire_rejected(self, code: object) -> None:
        """A submission refused before the core saw it (bad JSON, a schema error): its engine is unknown."""
        self.child(self.rejected, UNKNOWN, code if isinstance(code, str) and code in REJECT_REASONS else OTHER).inc()

    # -- scrape ---------------------------------------------------------------------------------

    def render(self, core: Orchestrator) -> bytes:
        """The exposition text, with the gauges read from the core now."""
        placer = core.placer
        depth: dict[tuple[str, str, str, str], int] = {}
        tasks = core.tasks
        for task_id in core.admission.queue:  # O(queue), at scrape time only
            spec = tasks[task_id].spec
            engine, version, pool_id, _ = self._queued_labels(core, spec)
            key = (engine, version, pool_id, spec.priority.value)
            depth[key] = depth.get(key, 0) + 1
        pool_ids = placer.pool_ids()
        for pool_id in pool_ids:  # every engine served has its zeros, so a panel shows 0, not "no data"
            engine = self._series(core, pool_id).labels[0]
            for priority in Priority:
                depth.setdefault((engine, ANY_POOL, ANY_POOL, priority.value), 0)
        for key in self._queue_keys - depth.keys():  # drained since the last scrape
            depth[key] = 0
        self._queue_keys.update(depth)
        for key, n in depth.items():
            self.child(self.queue_depth, *key).set(n)
        self.orchd_queue_depth.labels(pool_id=ANY_POOL).set(core.queue_depth())
        self.queue_capacity.set(core.admission.queue.capacity)
        for pool_id in pool_ids:
            self.child(self.pools_available, pool_id).set(1 if placer.is_usable(pool_id) else 0)
            breaker = core.breakers.get(pool_id)
            self.child(self.breaker_open, pool_id).set(
                1 if breaker is not None and breaker.state is BreakerState.OPEN else 0)
        return generate_latest(self.registry)


# -- refusals before the core ---------------------------------------------------------------------


def _envelope_code(body: bytes | str | None) -> str | None:
    """The ``code`` of our envelope or of OpenAI's (``{"error": {"code": ...}}``); None if neither."""
    if not body:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    code = error.get("code") if isinstance(error, dict) else data.get("code")
    return code if isinstance(code, str) else None


def count_wire_rejections(driver_key: web.AppKey):
    """The middleware that counts in ``tasks_rejected_total`` each submission refused before the
    core saw it (bad JSON, a schema error, a duplicate or unserved task the driver refuses), by
    its envelope's code; ``driver_key`` is the app key of the driver whose ``metrics`` count it.
    Authentication failures are not submissions. The core's own answers are counted by
    ``observe``, which marks the request answered (a context variable: each request is a task)."""

    def count(request: web.Request, body: object) -> None:
        driver = request.app.get(driver_key)
        code = _envelope_code(body if isinstance(body, (bytes, str)) else None)
        if driver is not None and code not in _AUTH_CODES:
            driver.metrics.wire_rejected(code)

    @web.middleware
    async def wire_rejections(request: web.Request, handler):
        if request.method != "POST" or request.path not in SUBMISSION_ROUTES:
            return await handler(request)
        answered = [False]
        token = _CORE_ANSWERED.set(answered)
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            if exc.status >= 400 and exc.status not in _NOT_SUBMISSIONS and not answered[0]:
                count(request, exc.text)
            raise
        finally:
            _CORE_ANSWERED.reset(token)
        if resp.status >= 400 and resp.status not in _NOT_SUBMISSIONS and not answered[0]:
            count(request, resp.body if isinstance(resp, web.Response) else None)
        return resp

    return wire_rejections
