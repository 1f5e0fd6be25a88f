"""The orchestrator: admission, placement, task and pool bookkeeping behind one interface.

``handle(event, now) -> tuple[Command, ...]`` and ``next_deadline() -> float | None``: the I/O
shell arms one timer for the deadline and calls ``handle(Tick(), now)`` when it fires; the
simulator jumps its virtual clock there. Times are milliseconds on the driver's clock.

Rules (on top of those of admission, placement and the task lifecycle)
- Every ``TaskSubmitted`` gets exactly one ``Admitted`` or ``Rejected``; every admitted task
  gets exactly one ``Finish``. Events for a finished or unknown task produce nothing, which is
  how "no token after a cancel" holds: tokens are forwarded only as ``ForwardTokens``
  commands, and none is issued once the task's ``Finish`` has been.
- A lease (one slot) is taken at ``Dispatch`` and returned when the attempt ends, whatever the
  cause; leases per pool always equal the attempts in flight there.
- Before the first token a failed attempt (engine unreachable, stream broken, pool lost,
  first-token timeout) is retried on another pool, at most ``max_attempts`` attempts in all;
  with none free it waits in the queue, and goes back to a pool it failed on only after a
  newer snapshot of that pool (a pinned task waits for its pool the same way);
  the failed pool's circuit breaker counts the failure, once per incident: the failures of
  tasks dispatched before the pool's last counted failure are the same incident (one engine
  crash fails every task it was running, and counts once). An engine that refuses the request
  itself (``INVALID_PARAMS``, e.g. a prompt over its context) ends the task with that code. After the first token a failure is
  terminal (``error`` event with the upstream's code).
- Deadlines: the task's own (``deadline_ms`` from submission; queued: ``DEADLINE_UNMET``,
  running: ``DECODE_TIMEOUT``), the first-token timeout and the between-token timeout. A pool
  not updated for ``pool_stale_ms`` stops receiving tasks until its next snapshot.
- Session budgets (tokens, time, cost) are checked at admission (``sessions.py``).
- With ``metrics_interval_ms`` set, every watched task gets a ``metrics`` event that often: its
  queue position and predicted start while queued, its rate once streaming, the chance of
  finishing by its deadline, and its session's budget. A task is watched from the driver's
  ``TaskWatched(watched=True)`` (someone reads its progress; a queued task's first ``metrics``
  event follows at once) until ``TaskWatched(watched=False)`` or its end; unwatched tasks cost nothing per interval,
  however deep the queue. A task has at most one metrics timer, whatever the watch toggling.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from dataclasses import dataclass, replace
from typing import Iterable

from .admission import Admission, QueuePolicy, ServiceTimeEstimator
from .commands import (
    CloseUpstream, Command, Dispatch, EmitEvent, Finish, ForwardTokens, Rejected,
)
from .errors import InvariantViolation, UsageError
from .events import (
    DispatchFailed, Event, PoolLost, PoolRemoved, PoolStale, PoolUpdated, StreamEnded, StreamFailed,
    TaskCanceled, TaskSubmitted, TaskWatched, Tick, TokensReceived,
)
from .placement import Explanation, Pick, Placer, Strategy
from .pool import CircuitBreaker
from .sessions import BudgetPolicy, Sessions
from .task import Task, TaskPhase
from .types import BreakerState, Outcome, PlacementMode, Priority, TaskSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class OrchestratorConfig:
    admission_capacity: int = 100
    admission_policy: QueuePolicy = QueuePolicy.REJECT
    placement_strategy: Strategy = Strategy.VRAM_AWARE
    max_attempts: int = 3
    first_token_timeout_ms: float = 60_000.0
    token_timeout_ms: float = 30_000.0
    pool_stale_ms: float = 15_000.0
    prior_service_ms: float = 2_000.0
    service_ewma_alpha: float = 0.2
    breaker_threshold: int = 3
    breaker_window_ms: float = 30_000.0
    breaker_cooldown_ms: float = 10_000.0
    budgets: BudgetPolicy = BudgetPolicy()
    max_sessions: int = 100_000
    dispatch_scan: int = 8
    metrics_interval_ms: float | None = None
    #: ``prefix-aware`` placement: how much busier (a share of slots) than the least-loaded candidate
    #: a pool may be and still win a task for its cached prefix; the block size the I/O shell
    #: hashes prompts in (approximate tokens); blocks each pool's cache is taken to hold (None:
    #: its slots times its context, in blocks).
    prefix_load_slack: float = 0.25
    prefix_block_tokens: int = 64
    prefix_blocks_per_pool: int | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise UsageError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("first_token_timeout_ms", "token_timeout_ms", "pool_stale_ms", "prior_service_ms"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.dispatch_scan < 1:
            raise UsageError("dispatch_scan must be >= 1")
        if self.metrics_interval_ms is not None and not self.metrics_interval_ms > 0:
            raise UsageError(f"metrics_interval_ms must be > 0 when set, got {self.metrics_interval_ms}")


# Timer kinds on the heap.
_DEADLINE, _FIRST_TOKEN, _BETWEEN_TOKENS, _POOL_STALE, _BREAKER, _METRICS = range(6)

# How long a scan of the running tasks for the next free slot is reused (``next_slot_ms``).
_NEXT_SLOT_REUSE_MS = 50.0

# Attempt failures that are the request's fault, not the pool's: no retry, no breaker count.
_REQUEST_ERRORS = frozenset({"INVALID_PARAMS"})


def on_time_probability(needed_ms: float, remaining_ms: float) -> float:
    """A smooth guess at P(done within ``remaining_ms``) when ``needed_ms`` is the point estimate:
    0.5 when they are equal, about 0.94 with twice the time needed, about 0.06 with half."""
    if remaining_ms <= 0:
        return 0.0
    if needed_ms <= 0:
        return 1.0
    return round(1.0 / (1.0 + (needed_ms / remaining_ms) ** 4), 3)


class Orchestrator:
    def __init__(self, config: OrchestratorConfig | None = None, *, rng: random.Random | None = None) -> None:
        self.config = config = config or OrchestratorConfig()
        self.rng = rng if rng is not None else random.Random(0)
        self.admission = Admission(
            capacity=config.admission_capacity, policy=config.admission_policy,
            estimator=ServiceTimeEstimator(alpha=config.service_ewma_alpha, prior_ms=config.prior_service_ms))
        self.placer = Placer(config.placement_strategy, rng=self.rng, prefix_load_slack=config.prefix_load_slack,
                             prefix_block_tokens=config.prefix_block_tokens,
                             prefix_blocks_per_pool=config.prefix_blocks_per_pool)
        self.tasks: dict[str, Task] = {}
        self.sessions = Sessions(config.budgets, max_sessions=config.max_sessions)
        self.in_flight: dict[str, set[str]] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self._failure_counted_at: dict[str, float] = {}  # pool -> when its breaker last counted a failure
        self._opened_on: dict[str, str | None] = {}  # pool -> its engine URL when its breaker opened
        self.outcomes: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self._timers: list[tuple[float, int, int, str]] = []
        self._seq = 0
        self._stale_armed: set[str] = set()  # pools with a staleness timer on the heap
        self._watched: set[str] = set()  # live tasks whose progress someone reads
        self._lease_changes = 0  # leases taken and returned: either invalidates the next-slot estimate
        self._next_slot: tuple[float, int, float | None] | None = None  # (computed at, _lease_changes, soonest ms)
        # Tasks with their one metrics timer on the heap -> when their next metrics event is due
        # (later than the timer after an unwatch and re-watch: the timer then waits till then).
        self._metrics_due: dict[str, float] = {}

    # -- the interface ------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> tuple[Command, ...]:
        out: list[Command] = []
        kind = type(event)
        if kind is TokensReceived:
            self._on_tokens(event, now, out)  # type: ignore[arg-type]
            return tuple(out)
        if kind is TaskWatched:
            self._on_watched(event, now, out)  # type: ignore[arg-type]
            return tuple(out)  # nothing became dispatchable
        if kind is TaskSubmitted:
            self._on_submit(event.spec, now, out)  # type: ignore[attr-defined]
        elif kind is StreamEnded:
            self._on_end(event, now, out)  # type: ignore[arg-type]
        elif kind is TaskCanceled:
            self._on_cancel(event, now, out)  # type: ignore[arg-type]
        elif kind is StreamFailed or kind is DispatchFailed:
            self._on_attempt_failed(event, now, out)  # type: ignore[arg-type]
        elif kind is PoolUpdated:
            self._on_pool_updated(event, now)  # type: ignore[arg-type]
        elif kind is PoolLost:
            self._on_pool_lost(event.pool_id, event.reason, now, out)  # type: ignore[attr-defined]
        elif kind is PoolStale:
            if event.pool_id in self.placer:  # type: ignore[attr-defined]
                self.placer.set_flags(event.pool_id, stale=True)  # type: ignore[attr-defined]
        elif kind is PoolRemoved:
            self._on_pool_lost(event.pool_id, "removed", now, out)  # type: ignore[attr-defined]
            self.placer.remove(event.pool_id)  # type: ignore[attr-defined]
            self._stale_armed.discard(event.pool_id)  # type: ignore[attr-defined]
            self.breakers.pop(event.pool_id, None)  # type: ignore[attr-defined]
            self._failure_counted_at.pop(event.pool_id, None)  # type: ignore[attr-defined]
            self._opened_on.pop(event.pool_id, None)  # type: ignore[attr-defined]
        elif kind is Tick:
            self._on_tick(now, out)
        else:
            raise UsageError(f"the orchestrator does not handle {kind.__name__}")
        self._pump(now, out)
        return tuple(out)

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and not self._timer_live(timers[0]):
            self._drop_timer(heapq.heappop(timers))
        return timers[0][0] if timers else None

    def task(self, task_id: str) -> Task | None:
        return self.tasks.get(task_id)

    def explain(self, spec: TaskSpec) -> Explanation:
        session = self.sessions.get(spec.session_id)
        return self.placer.explain(spec, session.pool_id if session else None)

    def queue_depth(self, priority: Priority | None = None) -> int:
        return len(self.admission) if priority is None else self.admission.depth(priority)

    # -- submission ---------------------------------------------------------------------------

    def _reject(self, out: list[Command], rejected: Rejected) -> None:
        self.rejections[rejected.code] += 1
        self.outcomes[Outcome.REJECTED.value] += 1
        out.append(rejected)

    def _on_submit(self, spec: TaskSpec, now: float, out: list[Command]) -> None:
        task_id = spec.task_id
        if task_id in self.tasks:
            self._reject(out, Rejected(task_id=task_id, http_status=400, code="INVALID_PARAMS", engine=spec.engine,
                                       message=f"task_id {task_id} is already in use"))
            return
        overspend = self.sessions.refusal(spec)
        if overspend is not None:
            self._reject(out, Rejected(task_id=task_id, http_status=400, code="INVALID_PARAMS", message=overspend,
                                       engine=spec.engine))
            return
        placer = self.placer
        refusal = placer.check_submission(spec)
        if refusal is not None:
            retry = self.admission.estimator.retry_after_ms(placer.slots()[1]) if refusal.http_status == 503 else None
            self._reject(out, Rejected(task_id=task_id, http_status=refusal.http_status, code=refusal.code,
                                       message=refusal.message, retriable=refusal.http_status == 503,
                                       retry_after_ms=retry, engine=spec.engine,
                                       pool_id=spec.placement.pin_pool_id if spec.placement.mode is PlacementMode.PIN
                                       else None))  # a pin_pool_id beside another mode names nothing
            return
        free, total = placer.slots(spec)
        busy = free == 0 or self.admission.queue.is_full
        result = self.admission.submit(spec, free_slots=free, slots=total,
                                       next_slot_ms=self.next_slot_ms(now) if busy else None)
        decision = result.decision
        if isinstance(decision, Rejected):
            self._reject(out, replace(decision, engine=spec.engine))  # admission does not know the engine
            return
        task = Task(spec, now, queue_position=decision.queue_position, predicted_start_ms=decision.predicted_start_ms)
        self.tasks[task_id] = task
        self.sessions.reserve(spec)
        self._arm(task.deadline_at, _DEADLINE, task_id)
        out.append(decision)
        if result.evicted is not None:
            victim = self.tasks[result.evicted]
            self._finish(victim, Outcome.EVICTED, now, out, code="QUEUE_FULL_DROP_LRU",
                         message=f"evicted from the full admission queue by task {spec.task_id} (policy drop-lru)",
                         retriable=True, retry_after_ms=self.admission.retry_after_ms(total, self.next_slot_ms(now)))

    def forget_session(self, session_id: str) -> bool:
        return self.sessions.forget(session_id)

    # -- dispatch -----------------------------------------------------------------------------

    def _pump(self, now: float, out: list[Command]) -> None:
        """Dispatch queued tasks while some pool has a free slot for them."""
        queue = self.admission.queue
        placer = self.placer
        tasks = self.tasks
        sessions = self.sessions
        scan = self.config.dispatch_scan
        while len(queue) and placer.free_total > 0:
            dispatched = False
            for rank in (0, 1):
                for task_id in queue.head(rank, scan):
                    task = tasks[task_id]
                    session = sessions.get(task.spec.session_id)
                    exclude = self._suspect_pools(task) if task.attempts else ()
                    decision = placer.pick(task.spec, session.pool_id if session else None, exclude)
                    if isinstance(decision, Pick):
                        queue.remove(task_id)
                        self._dispatch(task, decision, now, out)
                        dispatched = True
                        break
                if dispatched:
                    break
            if not dispatched:
                return

    def _suspect_pools(self, task: Task) -> tuple[str, ...]:
        """Pools a requeued task failed on and has heard nothing new from since: not yet again.

        Without this the task would go straight back to the pool that just failed (it still
        looks ready until its next snapshot) and burn its attempts in milliseconds."""
        failed_at = task.failed_at
        placer = self.placer
        return tuple(p for p in task.tried_pools if p in placer and placer.last_seen(p) <= failed_at)  # type: ignore[operator]

    def _dispatch(self, task: Task, pick: Pick, now: float, out: list[Command]) -> None:
        pool_id = pick.pool_id
        task_id = task.task_id
        placer = self.placer
        task.go("dispatch" if task.phase is TaskPhase.QUEUED else "redispatch")
        task.pool_id = pool_id
        task.attempts += 1
        task.tried_pools += (pool_id,)
        task.dispatched_at = now
        task.kv_warmth = kv_warmth = pick.kv_warmth and task.kv_warmth
        placer.acquire(pool_id)
        if task.spec.prefix:
            placer.record_prefix(pool_id, task.spec.prefix)
        flying = self.in_flight.get(pool_id)
        if flying is None:  # not setdefault: that would build a set on every dispatch
            flying = self.in_flight[pool_id] = set()
        flying.add(task_id)
        self._lease_changes += 1
        self.sessions.touch(task.spec.session_id).pool_id = pool_id
        self._arm(now + self.config.first_token_timeout_ms, _FIRST_TOKEN, task_id)
        if task.first_dispatched_at is None:
            task.first_dispatched_at = now
        # Every dispatch says where the task goes: a retry on another pool (before the first
        # token, the only time there is one) gets a ``started`` of its own naming that pool.
        out.append(EmitEvent(task_id=task_id, kind="started", data={
            "queue_position": task.queue_position, "predicted_start_ms": task.predicted_start_ms,
            "pool_id": pool_id, "kv_warmth": kv_warmth, "attempt": task.attempts,
            "queued_ms": int(now - task.submitted_at)}))
        task.engine_url = engine_url = placer.snapshot(pool_id).engine_url  # type: ignore[union-attr]
        out.append(Dispatch(task_id=task_id, pool_id=pool_id, attempt=task.attempts, kv_warmth=kv_warmth,
                            engine_url=engine_url, candidates=placer.considered))

    def _release(self, task: Task) -> None:
        pool_id = task.pool_id
        if pool_id is None:
            return
        flying = self.in_flight.get(pool_id)
        if flying is not None:
            flying.discard(task.task_id)
        self.placer.release(pool_id)
        task.pool_id = None
        self._lease_changes += 1

    # -- streaming ----------------------------------------------------------------------------

    def _on_tokens(self, event: TokensReceived, now: float, out: list[Command]) -> None:
        task = self.tasks.get(event.task_id)
        count = event.count
        if task is None or count == 0 or (event.attempt is not None and event.attempt != task.attempts):
            return
        phase = task.phase
        if phase is TaskPhase.DISPATCHING:
            task.go("first_token")
            task.first_token_at = now
            self._arm(now + self.config.token_timeout_ms, _BETWEEN_TOKENS, task.task_id)
            breaker = self.breakers.get(task.pool_id)  # type: ignore[arg-type]
            if breaker is not None and breaker.state is not BreakerState.CLOSED:
                breaker.record_success()
                self.placer.set_flags(task.pool_id, breaker_open=False)  # type: ignore[arg-type]
                self._opened_on.pop(task.pool_id, None)  # type: ignore[arg-type]
        elif phase is not TaskPhase.STREAMING:
            return  # a late read from an attempt already given up (the task is queued again)
        task.last_token_at = now
        out.append(ForwardTokens(task_id=task.task_id, first_index=task.tokens_out, count=count))
        task.tokens_out += count

    def _on_end(self, event: StreamEnded, now: float, out: list[Command]) -> None:
        task = self.tasks.get(event.task_id)
        if task is None or task.phase is TaskPhase.QUEUED or (event.attempt is not None and event.attempt != task.attempts):
            return
        if task.dispatched_at is not None:
            first = task.first_token_at - task.dispatched_at if task.first_token_at is not None else None
            self.admission.estimator.record(task.spec.priority, now - task.dispatched_at, tokens_out=task.tokens_out,
                                            target_tokens=task.spec.max_tokens, first_token_ms=first)
        decode_ms = event.decode_ms
        if decode_ms is None:
            decode_ms = now - (task.first_token_at if task.first_token_at is not None else now)
        data = {"tokens_out": task.tokens_out, "decode_ms": int(decode_ms), "decode_time_ms": int(decode_ms),
                "kv_warmth": task.kv_warmth}
        if event.cached_tokens is not None:
            data["cached_tokens"] = event.cached_tokens
        self._finish(task, Outcome.COMPLETED, now, out, data=data)

    def _on_watched(self, event: TaskWatched, now: float, out: list[Command]) -> None:
        interval = self.config.metrics_interval_ms
        task_id = event.task_id
        task = self.tasks.get(task_id)
        if interval is None or task is None:
            return
        if not event.watched:
            self._watched.discard(task_id)  # its timer lapses when it comes due
            return
        if task_id in self._watched:
            return
        self._watched.add(task_id)
        if task.phase is TaskPhase.QUEUED:
            # A reader of a queued task hears where it stands at once; a running task's reader
            # has its frames already, and its next metrics event comes with the interval.
            out.append(EmitEvent(task_id=task_id, kind="metrics", data=self.progress(task, now)))
        due = now + interval
        if task_id not in self._metrics_due:
            self._arm(due, _METRICS, task_id)
        # else the timer of an earlier watch is still on the heap, due no later than this one:
        # it waits until ``due`` when it fires, so toggling never adds timers.
        self._metrics_due[task_id] = due

    def _on_cancel(self, event: TaskCanceled, now: float, out: list[Command]) -> None:
        task = self.tasks.get(event.task_id)
        if task is None:
            return
        if task.phase is TaskPhase.QUEUED:
            self.admission.queue.remove(task.task_id)
        elif task.pool_id is not None:
            out.append(CloseUpstream(task_id=task.task_id, pool_id=task.pool_id, reason=f"canceled: {event.reason}"))
        decode_ms = int(now - task.first_token_at) if task.first_token_at is not None else 0
        self._finish(task, Outcome.CANCELED, now, out, data={
            "tokens_out": task.tokens_out, "decode_ms": decode_ms, "decode_time_ms": decode_ms, "canceled": True,
            "reason": event.reason})

    def _on_attempt_failed(self, event: StreamFailed | DispatchFailed, now: float, out: list[Command]) -> None:
        task = self.tasks.get(event.task_id)
        if task is None or task.phase is TaskPhase.QUEUED or (event.attempt is not None and event.attempt != task.attempts):
            return
        code, message = event.code, event.message
        failed_pool = task.pool_id
        if code in _REQUEST_ERRORS:  # the engine refused the request itself: another pool would too
            self._finish(task, Outcome.FAILED, now, out, code=code,
                         message=message or f"pool {failed_pool} refused the request", retriable=False)
            return
        self._note_pool_failure(task, now)
        if task.phase is TaskPhase.STREAMING:
            self._finish(task, Outcome.FAILED, now, out, code=code or "WORKER_RESET",
                         message=message or f"stream from pool {failed_pool} broke after {task.tokens_out} tokens",
                         retriable=False)
            return
        self._retry(task, code, message, now, out)

    def _retry(self, task: Task, code: str, message: str, now: float, out: list[Command]) -> None:
        """Before the first token: try another pool, else wait in the queue, else give up."""
        failed_pool = task.pool_id
        self._release(task)
        if task.attempts >= self.config.max_attempts:
            self._finish(task, Outcome.FAILED, now, out, code="REPLICA_EXHAUSTED",
                         message=f"{task.attempts} attempts failed before the first token; last on pool "
                                 f"{failed_pool}: {code} {message}".rstrip(), retriable=True,
                         retry_after_ms=self.admission.estimator.retry_after_ms(self.placer.slots()[1]))
            return
        task.kv_warmth = False
        pick = self._pick_elsewhere(task)
        if pick is not None:
            self._dispatch(task, pick, now, out)
            return
        queue = self.admission.queue
        if queue.is_full:
            self._finish(task, Outcome.FAILED, now, out, code="REPLICA_EXHAUSTED",
                         message=f"pool {failed_pool} failed before the first token ({code}) and no other pool "
                                 "is free; the queue is full", retriable=True,
                         retry_after_ms=self.admission.estimator.retry_after_ms(self.placer.slots()[1]))
            return
        task.go("retry")
        task.failed_at = now
        queue.push(task.task_id, task.spec.priority.rank)

    def _pick_elsewhere(self, task: Task) -> Pick | None:
        spec = task.spec
        if spec.placement.mode.value == "pin":
            return None
        decision = self.placer.pick(spec, None, exclude=task.tried_pools)
        return decision if isinstance(decision, Pick) else None

    def _note_pool_failure(self, task: Task, now: float) -> None:
        pool_id, dispatched_at = task.pool_id, task.dispatched_at
        if pool_id is None or pool_id not in self.placer:
            return
        snap = self.placer.snapshot(pool_id)
        if snap is not None and snap.engine_url and task.engine_url and snap.engine_url != task.engine_url:
            return  # the engine it ran on was already replaced: the new one did not fail
        counted = self._failure_counted_at.get(pool_id)
        if counted is not None and dispatched_at is not None and dispatched_at <= counted:
            return  # sent before the failure already counted: the same incident
        self._failure_counted_at[pool_id] = now
        breaker = self.breakers.get(pool_id)
        if breaker is None:
            c = self.config
            breaker = self.breakers[pool_id] = CircuitBreaker(
                threshold=c.breaker_threshold, window_ms=c.breaker_window_ms, cooldown_ms=c.breaker_cooldown_ms)
        if breaker.record_failure(now) is BreakerState.OPEN:
            self._opened_on[pool_id] = snap.engine_url if snap is not None else None
            self.placer.set_flags(pool_id, breaker_open=True)
            self._arm(breaker.half_open_at(), _BREAKER, pool_id)  # type: ignore[arg-type]

    def _finish(self, task: Task, outcome: Outcome, now: float, out: list[Command], *, data: dict | None = None,
                code: str | None = None, message: str = "", retriable: bool = False,
                retry_after_ms: int | None = None) -> None:
        pool_id = task.pool_id
        task_id = task.task_id
        if pool_id is not None and outcome is not Outcome.COMPLETED and outcome is not Outcome.CANCELED:
            out.append(CloseUpstream(task_id=task_id, pool_id=pool_id, reason=code or outcome.value))
        self._release(task)
        task.go("finish")
        task.outcome = outcome
        del self.tasks[task_id]
        self._watched.discard(task_id)
        self.outcomes[outcome.value] += 1
        started = task.first_dispatched_at
        self.sessions.charge(task.spec, tokens_out=task.tokens_out, engine_ms=0.0 if started is None else now - started)
        spec = task.spec
        if code is None:
            out.append(Finish(task_id=task_id, outcome=outcome, kind="end", data=data or {}, pool_id=pool_id,
                              engine=spec.engine, priority=spec.priority))
            return
        err: dict = {"code": code, "message": message, "retriable": retriable}
        if retry_after_ms is not None:
            err["retry_after_ms"] = retry_after_ms
        if pool_id is not None:
            err["pool_id"] = pool_id
        out.append(Finish(task_id=task_id, outcome=outcome, kind="error", data=err, pool_id=pool_id,
                          engine=spec.engine, priority=spec.priority))

    # -- pools --------------------------------------------------------------------------------

    def _on_pool_updated(self, event: PoolUpdated, now: float) -> None:
        snap = event.snapshot
        self.placer.update(snap, now)
        opened_on = self._opened_on.get(snap.pool_id, snap.engine_url)
        if snap.ready and snap.engine_url and snap.engine_url != opened_on:
            # A new engine (another address) answers for the pool: the failures were the old
            # one's. Its breaker closes now instead of after the cooldown (a crash is back in a
            # second; the cooldown is ten).
            del self._opened_on[snap.pool_id]
            self.breakers.pop(snap.pool_id, None)
            self.placer.set_flags(snap.pool_id, breaker_open=False)
        if snap.pool_id not in self._stale_armed:
            self._stale_armed.add(snap.pool_id)
            self._arm(now + self.config.pool_stale_ms, _POOL_STALE, snap.pool_id)

    def _on_pool_lost(self, pool_id: str, reason: str, now: float, out: list[Command]) -> None:
        if pool_id not in self.placer:
            return
        self.placer.set_flags(pool_id, lost=True)
        for task_id in sorted(self.in_flight.get(pool_id, ())):
            task = self.tasks[task_id]
            if task.phase is TaskPhase.STREAMING:
                self._finish(task, Outcome.FAILED, now, out, code="WORKER_RESET",
                             message=f"pool {pool_id} lost mid-stream ({reason}) after {task.tokens_out} tokens")
            else:
                out.append(CloseUpstream(task_id=task_id, pool_id=pool_id, reason=f"pool lost: {reason}"))
                self._retry(task, "WORKER_RESET", f"pool {pool_id} lost ({reason})", now, out)

    # -- timers -------------------------------------------------------------------------------

    def _arm(self, when: float, kind: int, key: str) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, kind, key))

    def _timer_live(self, timer: tuple[float, int, int, str]) -> bool:
        _, _, kind, key = timer
        if kind == _POOL_STALE:
            return key in self.placer and key in self._stale_armed
        if kind == _BREAKER:
            return key in self.breakers
        task = self.tasks.get(key)
        if task is None:
            return False
        if kind == _METRICS:
            return key in self._watched
        if kind == _FIRST_TOKEN:
            return task.phase is TaskPhase.DISPATCHING
        if kind == _BETWEEN_TOKENS:
            return task.phase is TaskPhase.STREAMING
        return True

    def _drop_timer(self, timer: tuple[float, int, int, str]) -> None:
        """Bookkeeping for a dead timer taken off the heap."""
        if timer[2] == _METRICS:
            del self._metrics_due[timer[3]]  # it was the task's one metrics timer

    def _on_tick(self, now: float, out: list[Command]) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)
            if self._timer_live(timer):
                self._fire(timer, now, out)
            else:
                self._drop_timer(timer)

    def _fire(self, timer: tuple[float, int, int, str], now: float, out: list[Command]) -> None:
        _, _, kind, key = timer
        if kind == _POOL_STALE:
            due = self.placer.last_seen(key) + self.config.pool_stale_ms
            if now >= due:  # the same sum as the timer's, so float rounding cannot loop here
                self._stale_armed.discard(key)
                self.placer.set_flags(key, stale=True)
            else:
                self._arm(due, _POOL_STALE, key)
            return
        if kind == _BREAKER:
            breaker = self.breakers[key]
            if breaker.poll(now) is BreakerState.HALF_OPEN:
                self.placer.set_flags(key, breaker_open=False)
            return
        task = self.tasks[key]
        if kind == _METRICS:
            due = self._metrics_due[key]
            if now >= due:  # else re-watched since this timer was armed: on to the new due time
                out.append(EmitEvent(task_id=key, kind="metrics", data=self.progress(task, now)))
                due = self._metrics_due[key] = now + self.config.metrics_interval_ms  # type: ignore[operator]
            self._arm(due, _METRICS, key)
            return
        if kind == _DEADLINE:
            if task.phase is TaskPhase.QUEUED:
                self.admission.queue.remove(key)
                self._finish(task, Outcome.FAILED, now, out, code="DEADLINE_UNMET",
                             message=f"not started within deadline_ms={task.spec.deadline_ms}")
            else:
                self._finish(task, Outcome.FAILED, now, out, code="DECODE_TIMEOUT",
                             message=f"deadline_ms={task.spec.deadline_ms} passed after {task.tokens_out} tokens")
        elif kind == _FIRST_TOKEN:
            due = task.dispatched_at + self.config.first_token_timeout_ms  # type: ignore[operator]
            if now < due:
                self._arm(due, _FIRST_TOKEN, key)  # an older timer of an earlier attempt
                return
            out.append(CloseUpstream(task_id=key, pool_id=task.pool_id, reason="first-token timeout"))  # type: ignore[arg-type]
            self._note_pool_failure(task, now)
            self._retry(task, "DECODE_TIMEOUT", "no first token within "
                        f"{self.config.first_token_timeout_ms:.0f} ms", now, out)
        elif kind == _BETWEEN_TOKENS:
            due = task.last_token_at + self.config.token_timeout_ms  # type: ignore[operator]
            if now < due:
                self._arm(due, _BETWEEN_TOKENS, key)
                return
            self._finish(task, Outcome.FAILED, now, out, code="DECODE_TIMEOUT",
                         message=f"no token for {self.config.token_timeout_ms:.0f} ms after {task.tokens_out} tokens")

    # -- progress -----------------------------------------------------------------------------

    def queue_position(self, task: Task) -> int | None:
        """0-based place in service order (O(log n)), or None when the task is not queued."""
        queue = self.admission.queue
        position = queue.position(task.task_id)
        if position is None:
            return None
        for more_urgent in range(task.spec.priority.rank):
            position += queue.len_class(more_urgent)
        return position

    def next_slot_ms(self, now: float) -> int | None:
        """When the first running task is expected to end and free its slot, from now (None: none runs).

        The scan is over every running task, and a busy cluster asks at every submission: its answer
        is reused for ``_NEXT_SLOT_REUSE_MS``, aged by the time passed, until a lease is taken or
        returned (the soonest task may be the one that ended). Tokens in between only refine a
        running task's pace. A full cluster with nothing ending, where admission asks most, keeps it."""
        cached = self._next_slot
        if cached is not None and cached[1] == self._lease_changes and 0 <= now - cached[0] < _NEXT_SLOT_REUSE_MS:
            soonest = cached[2]
            return None if soonest is None else int(math.ceil(max(1.0, soonest - (now - cached[0]))))
        soonest = self._scan_next_slot(now)
        self._next_slot = (now, self._lease_changes, soonest)
        return None if soonest is None else int(math.ceil(soonest))

    def _scan_next_slot(self, now: float) -> float | None:
        estimator = self.admission.estimator
        soonest: float | None = None
        for task_ids in self.in_flight.values():
            for task_id in task_ids:
                task = self.tasks.get(task_id)
                if task is None or task.dispatched_at is None:
                    continue
                per_token = None
                if task.phase is TaskPhase.STREAMING and task.first_token_at is not None and task.tokens_out > 0:
                    elapsed = now - task.first_token_at
                    if task.tokens_out >= 8 and elapsed > 0:
                        per_token = elapsed / (task.tokens_out - 1)  # this task's own pace
                    else:  # a few tokens (or one burst) say little about the pace: the measured one
                        per_token = estimator.ms_per_token
                if per_token is not None:
                    left = max(1, estimator.tokens_expected(task.spec) - task.tokens_out)
                    remaining = left * per_token
                else:
                    remaining = estimator.expected_service_ms(task.spec) - (now - task.dispatched_at)
                remaining = max(1.0, remaining)
                if soonest is None or remaining < soonest:
                    soonest = remaining
        return soonest

    def progress(self, task: Task, now: float) -> dict:
        """The ``metrics`` event of a live task: where it is, how fast, will it make its deadline."""
        spec = task.spec
        estimator = self.admission.estimator
        remaining_ms = task.deadline_at - now
        data: dict = {"phase": task.phase.value, "queue_depth": len(self.admission.queue)}
        if task.phase is TaskPhase.QUEUED:
            position = self.queue_position(task)
            free, slots = self.placer.slots(spec)
            at = position if position is not None else len(self.admission.queue)
            # the same prediction as at admission, so a reader is never told less than the door said
            wait = self.admission.predicted_wait(spec, at, free, slots, self.next_slot_ms(now) if free == 0 else None)
            data["queue_position"] = position
            data["predicted_start_ms"] = wait
            needed = wait + estimator.service_ms(spec.priority)
        elif task.phase is TaskPhase.DISPATCHING:
            data["pool_id"] = task.pool_id
            needed = max(0.0, estimator.service_ms(spec.priority) - (now - task.dispatched_at))  # type: ignore[operator]
        else:
            streamed_ms = max(1.0, now - task.first_token_at)  # type: ignore[operator]
            rate = task.tokens_out / streamed_ms  # tokens per ms
            target = spec.expected_tokens or spec.max_tokens
            left = max(0, min(target, spec.max_tokens) - task.tokens_out)
            data["pool_id"] = task.pool_id
            data["tokens_out"] = task.tokens_out
            data["tokens_per_s"] = round(rate * 1000.0, 1)
            # how long the engine has been silent: a stalled engine shows here long before the
            # between-token timeout ends the stream
            data["silent_ms"] = int(max(0.0, now - (task.last_token_at or task.first_token_at)))  # type: ignore[operator]
            needed = left / rate if rate > 0 else remaining_ms * 2
        data["on_time_probability"] = on_time_probability(needed, remaining_ms)
        if self.sessions.policy.any:
            view = self.sessions.view(spec.session_id)
            data["budget"] = {k: view[k] for k in ("tokens_remaining", "time_remaining_ms", "cost_remaining")
                              if view[k] is not None}
        return data

    # -- checks -------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise InvariantViolation if the bookkeeping disagrees with itself (tests, simulator)."""
        queued = {t for t, task in self.tasks.items() if task.phase is TaskPhase.QUEUED}
        in_queue = set(self.admission.queue)
        if queued != in_queue:
            raise InvariantViolation(f"queued tasks {sorted(queued ^ in_queue)[:5]} disagree with the queue")
        if len(in_queue) > self.admission.queue.capacity:
            raise InvariantViolation("admission queue above its capacity")
        self.placer.prefix.check()
        for pool_id in self.placer.pool_ids():
            running = {t for t, task in self.tasks.items() if task.pool_id == pool_id}
            if self.placer.leases(pool_id) != len(running) or running != self.in_flight.get(pool_id, set()):
                raise InvariantViolation(f"pool {pool_id}: {self.placer.leases(pool_id)} leases, "
                                         f"{len(running)} tasks running")
        if not self._watched <= self.tasks.keys():
            raise InvariantViolation(f"finished tasks {sorted(self._watched - self.tasks.keys())[:5]} still watched")
        metrics_timers = Counter(key for _, _, kind, key in self._timers if kind == _METRICS)
        if metrics_timers.keys() != self._metrics_due.keys() or any(n > 1 for n in metrics_timers.values()):
            raise InvariantViolation("metrics timers on the heap disagree with their bookkeeping "
                                     "(one per task in _metrics_due)")

    def live_tasks(self) -> Iterable[Task]:
        return self.tasks.values()
