"""orchestratord's Prometheus metrics: the contract's task metrics and the ``orchd_*`` series.

``OrchdMetrics`` owns one registry per app and learns everything from the commands the core
returns (``observe``), so the metrics can never disagree with what the driver did. No label
value is a task id; ``pool_id`` labels of queue-level series are ``any`` (a queued task has no
pool yet). ``render`` sets the gauges from the core's state at scrape time and writes the
exposition format.
"""

from __future__ import annotations

import gc
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ...core.commands import Admitted, Dispatch, Finish, ForwardTokens, Rejected
from ...core.orchestrator import Orchestrator
from ...core.types import Priority

ANY_POOL = "any"  # the pool_id label of queue-level series: a queued task has no pool yet
UNKNOWN_POOL = "unknown"  # a pool id a client named that no pool has: never a label of its own
#: Cancel reasons as labels; a reason outside this set is counted as ``other``.
CANCEL_REASONS = frozenset({"client", "disconnect", "shutdown", "internal"})


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
        self.prefix_cache_hit_tokens = Counter("prefix_cache_hit_tokens", "Prompt tokens an engine found in its KV "
                                               "cache (as the engine reports it)", ["pool_id"], registry=r)
        self.dispatch_latency = Histogram("orchd_dispatch_latency_ms", "Dispatch to the first token from that pool (ms)",
                                          ["pool_id"], registry=r,
                                          buckets=(5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
        self.pools_available = Gauge("orchd_pools_available", "1 when the pool takes work", ["pool_id"], registry=r)
        self._dispatched_at: dict[str, tuple[str, float]] = {}  # task -> (pool, time) until its first token
        self.gc_pause = Histogram("orchd_gc_pause_seconds", "Pauses of the cyclic garbage collector", ["generation"],
                                  registry=r, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))
        self.gc_pause_max = Gauge("orchd_gc_pause_max_seconds", "The longest garbage collector pause so far",
                                  registry=r)
        self._children: dict[tuple, object] = {}  # (metric, label values) -> child: labels() is slow per call
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
                        self.child(self.dispatch_latency, pending[0]).observe(now - pending[1])
            elif kind is Admitted:
                self.enqueued.inc()
                self.child(self.orchd_enqueued, self._pool_label(core, cmd.task_id), "admitted").inc()
            elif kind is Rejected:
                self.rejected.labels(reason=cmd.code).inc()
                pool = self._known_pool(core, cmd.pool_id) if cmd.pool_id else ANY_POOL
                self.orchd_enqueued.labels(pool_id=pool, outcome="rejected").inc()
                self.orchd_rejected.labels(pool_id=pool, reason=cmd.code).inc()
                if cmd.http_status == 429:
                    self.backpressure.labels(policy=cmd.policy_label or "reject").inc()
            elif kind is Dispatch:
                self.child(self.dispatched, cmd.pool_id, "sent").inc()
                task = core.task(cmd.task_id)
                placement = task.spec.placement if task is not None else None
                pinned = placement is not None and placement.mode.value == "pin"
                preferred = placement is not None and placement.prefer_pools and cmd.pool_id not in placement.prefer_pools
                self.child(self.placements, "placed" if cmd.attempt == 1 else "retried", "true" if pinned else "false",
                           "true" if cmd.attempt > 1 or preferred else "false").inc()
                self._dispatched_at[cmd.task_id] = (cmd.pool_id, now)
                if cmd.attempt == 1:
                    self.started.inc()
                    if task is not None:
                        self.tokens_in.inc(task.spec.prompt_tokens)
            elif kind is Finish:
                self._dispatched_at.pop(cmd.task_id, None)
                if cmd.outcome.value == "canceled":
                    reason = str(cmd.data.get("reason", "client"))
                    self.canceled.labels(reason=reason if reason in CANCEL_REASONS else "other").inc()
                elif cmd.kind == "end" and cmd.data.get("decode_ms") is not None:
                    self.decode.observe(cmd.data["decode_ms"])

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
    def render(self, core: Orchestrator) -> bytes:
        """The exposition text, with the gauges read from the core now."""
        for priority in Priority:
            self.queue_depth.labels(priority=priority.value).set(core.queue_depth(priority))
        self.orchd_queue_depth.labels(pool_id=ANY_POOL).set(core.queue_depth())
        for pool_id in core.placer.pool_ids():
            self.pools_available.labels(pool_id=pool_id).set(1 if core.placer.is_usable(pool_id) else 0)
        return generate_latest(self.registry)
