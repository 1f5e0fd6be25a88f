"""Quotas per principal: how many tasks a principal may have unfinished, and start per minute.

Rules
- A principal is an opaque string chosen by the I/O shell (an API key's name, an OIDC subject).
- Concurrent tasks: an admitted task holds one of its principal's slots from its admission to its
  one terminal event, queued or running; a submission past the limit is refused before it can
  take a queue slot. Slots are held by task id, so a release is counted exactly once.
- Tasks per minute: a token bucket (GCRA) of ``tasks_per_minute`` tokens refilled at that rate:
  a burst of up to N tasks, then one every 60/N s. A submission that admission refuses
  afterwards gets its token back (``release(..., refund=True)``): only admitted tasks count.
- Concurrency is checked first, so a submission refused for it spends no token.
- A refusal says which quota, its limit and when to come back (``retry_after_ms``): for the
  rate, when the next token is due; for concurrency, the policy's hint (the core cannot know
  when a task of that principal ends).
- Time is ``now`` in ms, given by the caller; nothing here reads a clock.
- Memory: principals are unbounded (OIDC subjects), so a record is dropped once it holds no slot
  and its bucket is full again (a fresh record behaves the same, so nothing is lost). Records are
  kept least recently used first and swept a few at a time; past ``max_principals`` the least
  recently used records that hold no slot are dropped even with a partly spent bucket (lenient:
  that principal's rate history is forgotten, never made stricter). Records that hold slots are
  bounded by the tasks in flight.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from .errors import InvariantViolation, UsageError

MINUTE_MS = 60_000.0
#: Tolerance on the bucket's float arithmetic (N tokens of 60000/N ms each must fit in a minute).
_EPSILON_MS = 1e-6
#: Records looked at per operation by the idle sweep (amortised: each operation adds at most one).
_SWEEP = 2

CONCURRENT_TASKS = "concurrent_tasks"
TASKS_PER_MINUTE = "tasks_per_minute"


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaPolicy:
    """Limits per principal; None is unlimited."""

    concurrent_tasks: int | None = None
    tasks_per_minute: int | None = None
    #: ``retry_after_ms`` of a refusal for concurrency: when the client should look again.
    concurrent_retry_after_ms: int = 1000
    max_principals: int = 100_000

    def __post_init__(self) -> None:
        for name in ("concurrent_tasks", "tasks_per_minute"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise UsageError(f"quota {name} must be an integer >= 1 when set, got {value!r}")
        if self.concurrent_retry_after_ms < 1:
            raise UsageError(f"concurrent_retry_after_ms must be >= 1, got {self.concurrent_retry_after_ms!r}")
        if self.max_principals < 1:
            raise UsageError(f"max_principals must be >= 1, got {self.max_principals!r}")

    @property
    def any(self) -> bool:
        return self.concurrent_tasks is not None or self.tasks_per_minute is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaExceeded:
    """Why a submission was refused, for a 429: the quota, its limit, and when to retry."""

    quota: str  # CONCURRENT_TASKS | TASKS_PER_MINUTE
    limit: int
    retry_after_ms: int
    message: str


class _Record:
    __slots__ = ("running", "tat")

    def __init__(self, now: float) -> None:
        self.running = 0
        self.tat = now  # the bucket's theoretical arrival time: full again once it is <= now


class Quotas:
    """Slots and buckets of every principal with work in flight or tokens recently spent."""

    __slots__ = ("policy", "_records", "_holders", "_interval_ms")

    def __init__(self, policy: QuotaPolicy | None = None) -> None:
        self.policy = policy or QuotaPolicy()
        self._records: OrderedDict[str, _Record] = OrderedDict()  # least recently used first
        self._holders: dict[str, str] = {}  # task id -> principal, for the tasks holding a slot
        n = self.policy.tasks_per_minute
        self._interval_ms = MINUTE_MS / n if n is not None else 0.0

    def __len__(self) -> int:
        """Principals remembered."""
        return len(self._records)

    def running(self, principal: str) -> int:
        record = self._records.get(principal)
        return record.running if record is not None else 0

    def holds(self, task_id: str) -> bool:
        return task_id in self._holders

    def acquire(self, principal: str, task_id: str, now: float) -> QuotaExceeded | None:
        """Take a slot (and a token) for ``task_id``, or say which quota refuses it (nothing taken)."""
        p = self.policy
        if not p.any:
            return None
        if task_id in self._holders:
            raise UsageError(f"task {task_id} already holds a quota slot")
        records = self._records
        record = records.get(principal)
        if record is None:
            record = records[principal] = _Record(now)
        else:
            records.move_to_end(principal)
        refusal: QuotaExceeded | None = None
        limit = p.concurrent_tasks
        if limit is not None and record.running >= limit:
            refusal = QuotaExceeded(quota=CONCURRENT_TASKS, limit=limit, retry_after_ms=p.concurrent_retry_after_ms,
                                    message=f"concurrent tasks quota ({limit}) reached: {record.running} of your "
                                            "tasks are queued or running; retry when one ends")
        elif p.tasks_per_minute is not None:
            tat = max(record.tat, now) + self._interval_ms
            over = tat - now - MINUTE_MS
            if over > _EPSILON_MS:
                refusal = QuotaExceeded(quota=TASKS_PER_MINUTE, limit=p.tasks_per_minute,
                                        retry_after_ms=max(1, math.ceil(over)),
                                        message=f"tasks per minute quota ({p.tasks_per_minute}) reached; the next "
                                                f"task may start in {max(1, math.ceil(over))} ms")
            else:
                record.tat = tat
        if refusal is None:
            record.running += 1
            self._holders[task_id] = principal
        self._sweep(now)
        return refusal

    def release(self, task_id: str, now: float, *, refund: bool = False) -> bool:
        """``task_id`` ended (or was not admitted, with ``refund``: its token comes back too).
        False if it held no slot: a second release of one task changes nothing."""
        principal = self._holders.pop(task_id, None)
        if principal is None:
            return False
        record = self._records.get(principal)
        if record is None:
            raise InvariantViolation(f"task {task_id} held a slot of {principal}, who has no record")
        record.running -= 1
        if refund and self.policy.tasks_per_minute is not None:
            record.tat -= self._interval_ms
        if record.running == 0 and record.tat <= now:
            del self._records[principal]  # a fresh record would behave the same
        self._sweep(now)
        return True

    def _sweep(self, now: float) -> None:
        """Drop the least recently used records that a fresh one would replace (or, past
        ``max_principals``, that hold no slot); a record holding slots is moved out of the way."""
        records = self._records
        for _ in range(_SWEEP):
            if not records:
                return
            principal, record = next(iter(records.items()))
            if record.running:
                records.move_to_end(principal)  # in use: not a candidate, and it must not block the sweep
            elif record.tat <= now or len(records) > self.policy.max_principals:
                del records[principal]
            else:
                return  # its bucket refills within a minute; the sweep goes on after that

    def check_invariants(self) -> None:
        counts: dict[str, int] = {}
        for principal in self._holders.values():
            counts[principal] = counts.get(principal, 0) + 1
        for principal, record in self._records.items():
            if record.running != counts.get(principal, 0):
                raise InvariantViolation(f"{principal}: {record.running} slots counted, "
                                         f"{counts.get(principal, 0)} held")
        missing = set(counts) - set(self._records)
        if missing:
            raise InvariantViolation(f"slots held by principals without a record: {sorted(missing)}")
        limit = self.policy.concurrent_tasks
        if limit is not None and any(n > limit for n in counts.values()):
            raise InvariantViolation(f"a principal holds more than {limit} slots")
