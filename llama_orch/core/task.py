"""Task lifecycle: queued, dispatching, streaming, then exactly one terminal outcome.

Rules
- ``queued -> dispatching`` when placed; ``dispatching -> streaming`` on the first token;
  ``dispatching -> queued`` only for a retry before the first token (bounded by the
  orchestrator's ``max_attempts``); every live state may finish (completed, failed, canceled,
  evicted) exactly once, after which the record is frozen: later events for it are ignored by
  the orchestrator and never reach this table, so no token follows a terminal event.
"""

from __future__ import annotations

from enum import Enum

from .fsm import transition
from .types import Outcome, TaskSpec


class TaskPhase(Enum):
    QUEUED = "queued"
    DISPATCHING = "dispatching"
    STREAMING = "streaming"
    DONE = "done"

    # Members are singletons compared by identity, so the identity hash is consistent with
    # equality; it spares the Python-level Enum.__hash__ on every transition-table lookup.
    __hash__ = object.__hash__


P = TaskPhase
TASK_TRANSITIONS: dict[tuple[TaskPhase, str], TaskPhase] = {
    (P.QUEUED, "dispatch"): P.DISPATCHING,
    (P.DISPATCHING, "first_token"): P.STREAMING,
    (P.STREAMING, "token"): P.STREAMING,
    (P.DISPATCHING, "retry"): P.QUEUED,
    (P.DISPATCHING, "redispatch"): P.DISPATCHING,
    (P.QUEUED, "finish"): P.DONE,
    (P.DISPATCHING, "finish"): P.DONE,
    (P.STREAMING, "finish"): P.DONE,
}
del P


class Task:
    """The orchestrator's mutable record of one admitted task."""

    __slots__ = (
        "spec", "task_id", "phase", "outcome", "submitted_at", "deadline_at", "pool_id", "attempts",
        "tokens_out", "dispatched_at", "first_token_at", "last_token_at", "tried_pools",
        "queue_position", "predicted_start_ms", "kv_warmth", "first_dispatched_at", "failed_at", "engine_url",
    )

    def __init__(self, spec: TaskSpec, now: float, *, queue_position: int, predicted_start_ms: int) -> None:
        self.spec = spec
        self.task_id = spec.task_id  # a plain attribute: read on every event for the task
        self.phase = TaskPhase.QUEUED
        self.outcome: Outcome | None = None
        self.submitted_at = now
        self.deadline_at = now + spec.deadline_ms
        self.pool_id: str | None = None
        self.attempts = 0
        self.tokens_out = 0
        self.dispatched_at: float | None = None
        self.engine_url: str | None = None  # the engine of the attempt in flight
        self.first_dispatched_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.tried_pools: tuple[str, ...] = ()
        self.queue_position = queue_position
        self.predicted_start_ms = predicted_start_ms
        self.kv_warmth = True
        self.failed_at: float | None = None  # when its last attempt failed (it waits for news of that pool)

    def go(self, trigger: str) -> None:
        # A direct lookup in the table; fsm.transition, on the same table, raises for a missing
        # cell. This keeps the error message from being formatted on every legal transition.
        target = TASK_TRANSITIONS.get((self.phase, trigger))
        if target is None:
            target = transition(TASK_TRANSITIONS, self.phase, trigger, what=f"task {self.task_id}")
        self.phase = target
