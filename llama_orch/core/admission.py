"""Admission: the bounded queue in front of the pools, and what clients are told about waiting.

Rules
- One FIFO per priority class; ``interactive`` is always served before ``batch``. The bound
  (``capacity``) counts queued tasks of all classes together.
- Checked before enqueue, in this order: ``deadline_ms <= 0`` (400 ``DEADLINE_UNMET``), then a
  full queue, then the predicted start against the deadline (400 ``DEADLINE_UNMET``).
- Full queue, policy ``reject``: 429 ``ADMISSION_REJECT``. Policy ``drop-lru``: evict the oldest
  batch task, else (only for an interactive newcomer) the oldest interactive; the evicted task
  ends with a terminal ``QUEUE_FULL_DROP_LRU`` error. A batch newcomer never evicts interactive
  work: it gets 429 ``QUEUE_FULL_DROP_LRU``.
- ``predicted_start_ms`` and ``retry_after_ms`` come from the measured drain rate: an EWMA of
  service times per class (dispatch to completion), divided over the ready slots. Service
  times, not completion counts, so an idle hour does not make the estimate collapse; before
  the first completion a configured prior stands in.
- When no slot is free, the hints also look at the work in flight now: the orchestrator passes
  ``next_slot_ms``, when the first running task is expected to end (its tokens left times the
  measured time per token). A full queue's ``retry_after_ms`` is that moment (a place frees
  when the head of the queue starts), and no predicted start comes before it, so long tasks
  after a run of short ones are not hinted with the short ones' times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from ..ext.queue import AdmissionQueue
from .commands import Admitted, Rejected
from .errors import UsageError
from .types import Priority, TaskSpec


class QueuePolicy(Enum):
    REJECT = "reject"
    DROP_LRU = "drop-lru"


class ServiceTimeEstimator:
    """EWMA of service time per priority class; turns queue positions into waiting times."""

    __slots__ = ("alpha", "prior_ms", "_ewma", "samples", "ms_per_token", "overhead_ms", "fill")

    def __init__(self, *, alpha: float = 0.2, prior_ms: float = 2000.0) -> None:
        if not 0.0 < alpha <= 1.0:
            raise UsageError(f"alpha must be in (0, 1], got {alpha!r}")
        if not prior_ms > 0:
            raise UsageError(f"prior service time must be > 0 ms, got {prior_ms!r}")
        self.alpha = alpha
        self.prior_ms = float(prior_ms)
        self._ewma: list[float | None] = [None, None]
        self.samples = [0, 0]
        self.ms_per_token: float | None = None  # decode time per token, first token to the end
        self.overhead_ms: float | None = None  # dispatch to the first token (prompt evaluation, the hop)
        self.fill = 1.0  # tokens produced / tokens asked for: tasks that stop early are not counted long

    def record(self, priority: Priority, service_ms: float, *, tokens_out: int = 0, target_tokens: int = 0,
               first_token_ms: float | None = None) -> None:
        rank = priority.rank
        old = self._ewma[rank]
        service_ms = max(0.0, float(service_ms))
        self._ewma[rank] = service_ms if old is None else old + self.alpha * (service_ms - old)
        self.samples[rank] += 1
        if first_token_ms is None or tokens_out < 1:
            return
        self.overhead_ms = self._mix(self.overhead_ms, max(0.0, float(first_token_ms)))
        if tokens_out > 1:
            self.ms_per_token = self._mix(self.ms_per_token, max(0.0, service_ms - first_token_ms) / (tokens_out - 1))
        if target_tokens > 0:
            self.fill = self._mix(self.fill, min(1.0, max(0.05, tokens_out / target_tokens)))

    def _mix(self, old: float | None, sample: float) -> float:
        return sample if old is None else old + self.alpha * (sample - old)

    def tokens_expected(self, spec: TaskSpec) -> int:
        """How many tokens the task will likely produce: its own ``expected_tokens``, else its
        ``max_tokens`` scaled by how full past tasks ran."""
        if spec.expected_tokens:
            return min(spec.expected_tokens, spec.max_tokens)
        return max(1, int(math.ceil(spec.max_tokens * self.fill)))

    def expected_service_ms(self, spec: TaskSpec) -> float:
        """Dispatch to the end for this task: from the measured cost per token once known."""
        if self.ms_per_token is None:
            return self.service_ms(spec.priority)
        return (self.overhead_ms or 0.0) + self.tokens_expected(spec) * self.ms_per_token

    def service_ms(self, priority: Priority) -> float:
        own = self._ewma[priority.rank]
        if own is not None:
            return own
        other = self._ewma[1 - priority.rank]
        return other if other is not None else self.prior_ms

    def overall_ms(self) -> float:
        known = [v for v in self._ewma if v is not None]
        return sum(known) / len(known) if known else self.prior_ms

    def wait_ms(self, priority: Priority, position: int, free_slots: int, slots: int) -> int:
        """Predicted wait for the task at ``position`` (0-based, service order)."""
        if position < free_slots:
            return 0
        per_slot = self.service_ms(priority) / max(1, slots)
        return int(math.ceil((position - free_slots + 1) * per_slot))

    def retry_after_ms(self, slots: int) -> int:
        """How long until one slot should free up: the useful moment to try again."""
        return max(1, int(math.ceil(self.overall_ms() / max(1, slots))))


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionResult:
    decision: Admitted | Rejected
    evicted: str | None = None


class Admission:
    """The bounded, prioritised queue and the decisions at its door."""

    __slots__ = ("queue", "policy", "estimator")

    def __init__(self, *, capacity: int, policy: QueuePolicy = QueuePolicy.REJECT,
                 estimator: ServiceTimeEstimator | None = None) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise UsageError(f"admission capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(policy, QueuePolicy):
            raise UsageError(f"admission policy must be a QueuePolicy, got {policy!r}")
        self.queue = AdmissionQueue(capacity, 2)
        self.policy = policy
        self.estimator = estimator or ServiceTimeEstimator()

    def __len__(self) -> int:
        return len(self.queue)

    def depth(self, priority: Priority) -> int:
        return self.queue.len_class(priority.rank)

    def position_if_enqueued(self, priority: Priority) -> int:
        if priority is Priority.INTERACTIVE:
            return self.queue.len_class(0)
        return len(self.queue)

    def submit(self, spec: TaskSpec, *, free_slots: int, slots: int, next_slot_ms: int | None = None) -> AdmissionResult:
        """Admit ``spec`` into the queue or say why not. Pure decision plus the enqueue.
        ``next_slot_ms``: when a running task is expected to free its slot (None: unknown)."""
        if spec.deadline_ms <= 0:
            return AdmissionResult(decision=Rejected(
                task_id=spec.task_id, http_status=400, code="DEADLINE_UNMET",
                message=f"deadline_ms must be > 0, got {spec.deadline_ms}"))
        if spec.task_id in self.queue:
            raise UsageError(f"task {spec.task_id} is already queued")
        evicted: str | None = None
        if self.queue.is_full:
            retry = self.retry_after_ms(slots, next_slot_ms)
            if self.policy is QueuePolicy.REJECT:
                return AdmissionResult(decision=Rejected(
                    task_id=spec.task_id, http_status=429, code="ADMISSION_REJECT",
                    message=f"admission queue full ({self.queue.capacity} tasks)", retriable=True,
                    retry_after_ms=retry, policy_label="reject"))
            victim_class = 1 if self.queue.len_class(1) else (0 if spec.priority is Priority.INTERACTIVE else None)
            if victim_class is None:
                return AdmissionResult(decision=Rejected(
                    task_id=spec.task_id, http_status=429, code="QUEUE_FULL_DROP_LRU",
                    message="admission queue full of interactive tasks; a batch task may not evict them",
                    retriable=True, retry_after_ms=retry, policy_label="drop-lru"))
            # Peek first: a newcomer that would miss its deadline anyway must not evict anyone.
            victim = self.queue.head(victim_class, 1)[0]
            position = self._position_after_evicting(spec.priority, victim_class)
            wait = self.predicted_wait(spec, position, free_slots, slots, next_slot_ms)
            if wait > spec.deadline_ms:
                return self._deadline_unmet(spec, wait)
            self.queue.remove(victim)
            evicted = victim
        position = self.position_if_enqueued(spec.priority)
        wait = self.predicted_wait(spec, position, free_slots, slots, next_slot_ms)
        if wait > spec.deadline_ms:
            return self._deadline_unmet(spec, wait)
        self.queue.push(spec.task_id, spec.priority.rank)
        backoff = 0 if wait == 0 else min(wait, self.retry_after_ms(slots, next_slot_ms))
        return AdmissionResult(
            decision=Admitted(task_id=spec.task_id, queue_position=position, predicted_start_ms=wait, backoff_ms=backoff),
            evicted=evicted)

    def retry_after_ms(self, slots: int, next_slot_ms: int | None) -> int:
        """When trying again is useful: when a running task should end, else the drain rate's guess."""
        return next_slot_ms if next_slot_ms is not None else self.estimator.retry_after_ms(slots)

    def predicted_wait(self, spec: TaskSpec, position: int, free_slots: int, slots: int,
                       next_slot_ms: int | None) -> int:
        """The wait of the task at ``position``: at admission and in every later ``metrics`` event."""
        wait = self.estimator.wait_ms(spec.priority, position, free_slots, slots)
        if position >= free_slots and next_slot_ms is not None:
            # nothing starts before a running task ends, and the ones ahead start first
            ahead = (position - free_slots) * self.estimator.service_ms(spec.priority) / max(1, slots)
            wait = max(wait, next_slot_ms + int(math.ceil(ahead)))
        return wait

    def _position_after_evicting(self, priority: Priority, victim_class: int) -> int:
        position = self.position_if_enqueued(priority)
        # The victim is the head of its class, hence ahead of the newcomer when counted.
        if priority is Priority.BATCH or victim_class == 0:
            position -= 1
        return position

    @staticmethod
    def _deadline_unmet(spec: TaskSpec, wait: int) -> AdmissionResult:
        return AdmissionResult(decision=Rejected(
            task_id=spec.task_id, http_status=400, code="DEADLINE_UNMET",
            message=f"predicted start in {wait} ms is past deadline_ms={spec.deadline_ms}",
            retriable=False))
