"""Pool lifecycle: one engine-backed pool from provisioning to ready, through crashes and drains.

Rules
- States: unknown, provisioning, starting, ready, draining, drained, unready, failed. The
  table ``POOL_TRANSITIONS`` lists every legal (state, trigger) pair; anything else is misuse.
- A pool is ready only after its engine answered health. While ready, a health probe is due
  every ``health_interval_ms``; ``stale_after_misses`` failed or missing probes in a row make it
  unready (``stale``), as does the engine exiting.
- An unready pool is restarted after an exponential backoff (``backoff_base_ms`` doubling per
  consecutive failure up to ``backoff_max_ms``, with seeded jitter), behind a circuit breaker:
  ``breaker_threshold`` failures within ``breaker_window_ms`` open it, which puts the pool in
  ``failed`` for ``breaker_cooldown_ms``; then one trial start is allowed (half-open). Healthy for
  ``recovery_ms`` closes the breaker and resets the backoff. This is what stops restart storms.
- Drain: no new leases; the pool becomes drained when its active leases reach zero or the drain
  deadline passes, and the engine is stopped.
- The machine reports its next deadline; the driver calls ``handle(Tick(), now)`` then.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from .commands import Command, PoolStateChanged, ProbeHealth, StartEngine, StopEngine
from .errors import UsageError
from .events import (
    DrainRequested, EngineExited, EngineStarted, Event, HealthChecked, LeasesChanged,
    ProvisionFailed, ProvisionStarted, Tick,
)
from .fsm import transition
from .types import BreakerState


class PoolState(Enum):
    UNKNOWN = "unknown"
    PROVISIONING = "provisioning"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    DRAINED = "drained"
    UNREADY = "unready"
    FAILED = "failed"


S = PoolState
POOL_TRANSITIONS: dict[tuple[PoolState, str], PoolState] = {
    (S.UNKNOWN, "provision"): S.PROVISIONING,
    (S.FAILED, "provision"): S.PROVISIONING,
    (S.DRAINED, "provision"): S.PROVISIONING,
    (S.UNREADY, "provision"): S.PROVISIONING,
    (S.PROVISIONING, "provision_failed"): S.FAILED,
    (S.STARTING, "provision_failed"): S.FAILED,
    (S.UNREADY, "provision_failed"): S.UNREADY,
    (S.UNKNOWN, "engine_started"): S.STARTING,
    (S.PROVISIONING, "engine_started"): S.STARTING,
    (S.UNREADY, "engine_started"): S.STARTING,
    (S.FAILED, "engine_started"): S.STARTING,
    (S.STARTING, "engine_started"): S.STARTING,
    (S.READY, "engine_started"): S.STARTING,
    (S.DRAINED, "engine_started"): S.STARTING,
    (S.DRAINING, "engine_started"): S.DRAINING,  # replaced while draining (a reload landing): the drain goes on
    (S.STARTING, "health_ok"): S.READY,
    (S.READY, "health_ok"): S.READY,
    (S.UNREADY, "health_ok"): S.READY,
    (S.DRAINING, "health_ok"): S.DRAINING,
    (S.STARTING, "health_failed"): S.STARTING,
    (S.READY, "stale"): S.UNREADY,
    (S.STARTING, "stale"): S.UNREADY,
    (S.READY, "engine_exited"): S.UNREADY,
    (S.STARTING, "engine_exited"): S.UNREADY,
    (S.UNREADY, "engine_exited"): S.UNREADY,
    (S.DRAINING, "engine_exited"): S.DRAINED,
    (S.DRAINED, "engine_exited"): S.DRAINED,
    (S.FAILED, "engine_exited"): S.FAILED,
    (S.UNREADY, "breaker_open"): S.FAILED,
    (S.READY, "drain"): S.DRAINING,
    (S.STARTING, "drain"): S.DRAINING,
    (S.UNREADY, "drain"): S.DRAINED,
    (S.FAILED, "drain"): S.DRAINED,
    (S.DRAINING, "drain"): S.DRAINING,
    (S.DRAINED, "drain"): S.DRAINED,
    (S.DRAINING, "drained"): S.DRAINED,
}
del S


class Backoff:
    """Exponential backoff with seeded jitter (full jitter on the upper half)."""

    __slots__ = ("base_ms", "max_ms", "failures", "_rng")

    def __init__(self, *, base_ms: float, max_ms: float, rng: random.Random) -> None:
        if base_ms <= 0 or max_ms < base_ms:
            raise UsageError(f"backoff needs 0 < base_ms <= max_ms, got {base_ms}, {max_ms}")
        self.base_ms = base_ms
        self.max_ms = max_ms
        self.failures = 0
        self._rng = rng

    def next_delay_ms(self) -> float:
        self.failures += 1
        # cap the exponent: base_ms * 2**1024 overflows a float (a crash loop of ~1000 restarts)
        ceiling = min(self.max_ms, self.base_ms * (2 ** min(self.failures - 1, 64)))
        return ceiling / 2 + self._rng.random() * ceiling / 2

    def reset(self) -> None:
        self.failures = 0


class CircuitBreaker:
    """closed -> open after ``threshold`` failures within ``window_ms``; half-open after cooldown."""

    __slots__ = ("threshold", "window_ms", "cooldown_ms", "state", "opened_at", "_failures", "_cooldown")

    def __init__(self, *, threshold: int = 5, window_ms: float = 60_000, cooldown_ms: float = 30_000) -> None:
        if threshold < 1 or window_ms <= 0 or cooldown_ms <= 0:
            raise UsageError("circuit breaker needs threshold >= 1, window_ms > 0, cooldown_ms > 0")
        self.threshold = threshold
        self.window_ms = window_ms
        self.cooldown_ms = cooldown_ms
        self.state = BreakerState.CLOSED
        self.opened_at: float | None = None
        self._failures: list[float] = []
        self._cooldown = cooldown_ms

    def record_failure(self, now: float) -> BreakerState:
        if self.state is BreakerState.HALF_OPEN:
            # The trial failed: open again, for longer, so a broken engine costs less and less.
            self._cooldown = min(self._cooldown * 2, self.cooldown_ms * 16)
            return self._open(now)
        if self.state is BreakerState.OPEN:
            # A failure while open (an engine started outside the trial): the cooldown starts over,
            # else half_open_at() lies in the past and the next Tick skips the cooldown.
            return self._open(now)
        self._failures = [t for t in self._failures if now - t < self.window_ms]
        self._failures.append(now)
        if len(self._failures) >= self.threshold:
            return self._open(now)
        return self.state

    def _open(self, now: float) -> BreakerState:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self._failures.clear()
        return self.state

    def record_success(self) -> None:
        self.state = BreakerState.CLOSED
        self.opened_at = None
        self._failures.clear()
        self._cooldown = self.cooldown_ms

    def half_open_at(self) -> float | None:
        return None if self.opened_at is None or self.state is not BreakerState.OPEN else self.opened_at + self._cooldown

    def poll(self, now: float) -> BreakerState:
        at = self.half_open_at()
        if at is not None and now >= at:
            self.state = BreakerState.HALF_OPEN
        return self.state


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolPolicy:
    health_interval_ms: float = 1000.0
    start_probe_interval_ms: float = 100.0
    stale_after_misses: int = 3
    start_timeout_ms: float = 120_000.0
    backoff_base_ms: float = 500.0
    backoff_max_ms: float = 30_000.0
    breaker_threshold: int = 5
    breaker_window_ms: float = 60_000.0
    breaker_cooldown_ms: float = 30_000.0
    recovery_ms: float = 10_000.0
    restart: bool = True  # False for an observer (pool-managerd): probe on instead of restarting


class PoolLifecycle:
    """One pool's state machine. ``handle(event, now) -> commands``; ``next_deadline()``."""

    def __init__(self, pool_id: str, *, policy: PoolPolicy | None = None, rng: random.Random | None = None) -> None:
        self.pool_id = pool_id
        self.policy = policy or PoolPolicy()
        self.state = PoolState.UNKNOWN
        self.breaker = CircuitBreaker(threshold=self.policy.breaker_threshold,
                                      window_ms=self.policy.breaker_window_ms,
                                      cooldown_ms=self.policy.breaker_cooldown_ms)
        self.backoff = Backoff(base_ms=self.policy.backoff_base_ms, max_ms=self.policy.backoff_max_ms,
                               rng=rng if rng is not None else random.Random(0))
        self.last_error: str | None = None
        self.engine_url: str | None = None
        self.active_leases = 0
        self.restarts = 0
        self._misses = 0
        self._probe_at: float | None = None
        self._restart_at: float | None = None
        self._start_deadline: float | None = None
        self._drain_deadline: float | None = None
        self._healthy_since: float | None = None
        self._attempt = 0
        self._probe_outstanding = False
        self._exited = False  # the engine process is known to be gone (until EngineStarted)

    @property
    def ready(self) -> bool:
        return self.state is PoolState.READY

    @property
    def draining(self) -> bool:
        return self.state is PoolState.DRAINING

    def next_deadline(self) -> float | None:
        half_open_at = self.breaker.half_open_at() if self.state is PoolState.FAILED else None
        times = [t for t in (self._probe_at, self._restart_at, self._start_deadline, self._drain_deadline,
                             half_open_at, self._recovery_at()) if t is not None]
        return min(times) if times else None

    def _recovery_at(self) -> float | None:
        if self._healthy_since is None or self.breaker.state is BreakerState.CLOSED and self.backoff.failures == 0:
            return None
        if self.state is not PoolState.READY:
            return None  # recovery counts only while ready; else the deadline would sit in the past
        return self._healthy_since + self.policy.recovery_ms

    def _go(self, trigger: str, now: float, cause: str | None = None) -> list[Command]:
        old = self.state
        self.state = transition(POOL_TRANSITIONS, old, trigger, what=f"pool {self.pool_id}")
        if self.state is old:
            return []
        return [PoolStateChanged(pool_id=self.pool_id, state=self.state.value, previous=old.value, cause=cause)]

    def handle(self, event: Event, now: float) -> list[Command]:
        if isinstance(event, Tick):
            return self._tick(now)
        if getattr(event, "pool_id", self.pool_id) != self.pool_id:
            raise UsageError(f"event for pool {event.pool_id} sent to pool {self.pool_id}")  # type: ignore[attr-defined]
        if isinstance(event, ProvisionStarted):
            out = self._go("provision", now)
            self._restart_at = None  # provisioning replaces any restart that was pending
            return out
        if isinstance(event, ProvisionFailed):
            out = self._go("provision_failed", now, event.error)
            self.last_error = event.error
            if self.state is PoolState.FAILED:
                self._probe_at = None
                self._start_deadline = None
            return out + self._schedule_restart(now) if self.state is PoolState.UNREADY else out
        if isinstance(event, EngineStarted):
            out = self._go("engine_started", now)
            self.engine_url = event.engine_url or self.engine_url
            self._restart_at = None
            self._exited = False
            self._misses = 0
            self._healthy_since = None
            self._start_deadline = now + self.policy.start_timeout_ms
            self._probe_at = now
            return out
        if isinstance(event, HealthChecked):
            return self._health(event, now)
        if isinstance(event, EngineExited):
            if self.state is PoolState.UNREADY and self._exited:
                self.last_error = event.detail  # the same loss reported twice: count it once
                return []
            out = self._lost(event.detail, now, "engine_exited")
            self._exited = True
            return out
        if isinstance(event, DrainRequested):
            if event.deadline_ms < 0:
                raise UsageError(f"drain deadline_ms must be >= 0, got {event.deadline_ms}")
            out = self._go("drain", now, "drain requested")
            self._restart_at = None
            if self.state is PoolState.DRAINING:
                self._drain_deadline = now + event.deadline_ms
                return out + self._maybe_drained(now)
            return out + [StopEngine(pool_id=self.pool_id, reason="drain")]
        if isinstance(event, LeasesChanged):
            self.active_leases = event.active
            return self._maybe_drained(now)
        raise UsageError(f"pool lifecycle does not handle {type(event).__name__}")

    def _health(self, event: HealthChecked, now: float) -> list[Command]:
        if self.state in (PoolState.UNKNOWN, PoolState.PROVISIONING, PoolState.FAILED, PoolState.DRAINED):
            return []  # a late probe answer for an engine this machine no longer tracks
        # While an engine starts, probe more often: readiness should not wait a full interval.
        interval = self.policy.health_interval_ms
        if self.state is PoolState.STARTING and not event.ok:
            interval = min(interval, self.policy.start_probe_interval_ms)
        self._probe_at = now + interval
        self._probe_outstanding = False
        if event.ok:
            self._misses = 0
            self._start_deadline = None
            if self._healthy_since is None:
                self._healthy_since = now
            if self.state is PoolState.UNREADY and (self._exited or (self._restart_at is None and self.policy.restart)):
                return []  # a late answer from an engine that exited: wait for EngineStarted
            was_ready = self.state is PoolState.READY
            out = self._go("health_ok", now)
            if not was_ready and self.state is PoolState.READY:
                self.last_error = None
                self._restart_at = None  # back from stale: do not restart a healthy engine
            return out
        self._healthy_since = None
        if event.loading and self.state is PoolState.STARTING:
            return []  # still loading the model: the start deadline bounds this
        self._misses += 1
        if self.state is PoolState.STARTING:
            self.last_error = event.detail or "health check failed"
            return self._go("health_failed", now)
        if self.state is PoolState.READY and self._misses >= self.policy.stale_after_misses:
            return self._lost(event.detail or f"{self._misses} health checks failed", now, "stale")
        return []

    def _lost(self, detail: str, now: float, trigger: str) -> list[Command]:
        out = self._go(trigger, now, detail)
        self.last_error = detail
        self._probe_at = None
        self._start_deadline = None
        self._healthy_since = None
        if self.state is PoolState.DRAINED:
            self._drain_deadline = None
            return out
        if self.state is PoolState.UNREADY:
            if not self.policy.restart and trigger == "stale":
                # An observer that cannot restart the engine (pool-managerd) keeps probing:
                # a hung engine that answers again is ready again.
                self._probe_at = now + self.policy.health_interval_ms
            out += self._schedule_restart(now)
        return out

    def _schedule_restart(self, now: float) -> list[Command]:
        if not self.policy.restart:
            return []
        self.restarts += 1
        if self.breaker.record_failure(now) is BreakerState.OPEN:
            self._restart_at = None
            return self._go("breaker_open", now, f"circuit breaker open after repeated failures: {self.last_error}")
        self._restart_at = now + self.backoff.next_delay_ms()
        return []

    def _maybe_drained(self, now: float) -> list[Command]:
        if self.state is PoolState.DRAINING and (self.active_leases == 0 or
                                                 (self._drain_deadline is not None and now >= self._drain_deadline)):
            self._drain_deadline = None
            self._probe_at = None
            return self._go("drained", now, "drained") + [StopEngine(pool_id=self.pool_id, reason="drained")]
        return []

    def _tick(self, now: float) -> list[Command]:
        out: list[Command] = []
        if self._drain_deadline is not None and now >= self._drain_deadline:
            out += self._maybe_drained(now)
        if (self.state is PoolState.FAILED and self.breaker.state is BreakerState.OPEN
                and self.breaker.poll(now) is BreakerState.HALF_OPEN):
            self._restart_at = now
        if self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            self._attempt += 1
            out.append(StartEngine(pool_id=self.pool_id, attempt=self._attempt))
        if self._start_deadline is not None and now >= self._start_deadline:
            self._start_deadline = None
            if self.state is PoolState.STARTING:
                out += self._lost(f"engine not healthy within {self.policy.start_timeout_ms:.0f} ms", now, "stale")
        recovery_at = self._recovery_at()
        if recovery_at is not None and now >= recovery_at and self.state is PoolState.READY:
            self.breaker.record_success()
            self.backoff.reset()
            self._healthy_since = None
        if self._probe_at is not None and now >= self._probe_at:
            if self._probe_outstanding and self.state is PoolState.READY:
                # The previous probe never answered within an interval: that is a miss too.
                self._misses += 1
                if self._misses >= self.policy.stale_after_misses:
                    return out + self._lost(f"{self._misses} health checks unanswered", now, "stale")
            self._probe_at = now + self.policy.health_interval_ms
            self._probe_outstanding = True
            out.append(ProbeHealth(pool_id=self.pool_id))
        return out
