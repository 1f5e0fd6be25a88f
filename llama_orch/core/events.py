"""Inputs of the core: what happened, as reported by a driver.

Each is a frozen, slotted, keyword-only dataclass. Time is never a field: it arrives as the
``now`` argument of ``handle(event, now)`` so that one event type serves every driver.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError
from .types import PoolSnapshot, TaskSpec


class Event:
    __slots__ = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSubmitted(Event):
    spec: TaskSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskCanceled(Event):
    task_id: str
    reason: str = "client"  # "client" | "disconnect" | "shutdown"


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskWatched(Event):
    """A task's progress gained its first reader (``watched``) or lost its last one.

    Only watched tasks get periodic ``metrics`` events, so a deep queue nobody reads
    costs nothing per tick."""

    task_id: str
    watched: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolUpdated(Event):
    snapshot: PoolSnapshot


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolLost(Event):
    """A pool stopped answering (poll timeout, pool-managerd gone, engine crash reported)."""

    pool_id: str
    reason: str = "lost"


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStale(Event):
    """Nothing vouches for the pool now (its manager is judged gone): no new tasks go there until
    its next snapshot, and what runs on it goes on while its engine answers."""

    pool_id: str
    reason: str = "stale"


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolRemoved(Event):
    """The pool is gone for good (its manager no longer lists it)."""

    pool_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatchFailed(Event):
    """The engine could not be reached or refused the task before any token was produced."""

    task_id: str
    attempt: int | None = None  # the Dispatch.attempt it belongs to; stale attempts are ignored
    code: str = "WORKER_RESET"
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TokensReceived(Event):
    """``count`` tokens arrived from upstream for a task (one upstream read)."""

    task_id: str
    attempt: int | None = None  # the Dispatch.attempt it belongs to; stale attempts are ignored
    count: int

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or self.count < 0:
            raise UsageError(f"TokensReceived.count must be an int >= 0, got {self.count!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEnded(Event):
    """The engine finished the task normally."""

    task_id: str
    attempt: int | None = None  # the Dispatch.attempt it belongs to; stale attempts are ignored
    tokens_out: int | None = None
    decode_ms: float | None = None
    cached_tokens: int | None = None  # prompt tokens the engine found in its KV cache, when it says


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamFailed(Event):
    """The upstream stream broke. Before the first token the core may retry elsewhere."""

    task_id: str
    attempt: int | None = None  # the Dispatch.attempt it belongs to; stale attempts are ignored
    code: str = "WORKER_RESET"
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick(Event):
    """The deadline the core reported has come (or the driver just wants timers checked)."""


# -- pool lifecycle (pool-managerd for engines, orchestratord for pools) -----------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProvisionStarted(Event):
    pool_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ProvisionFailed(Event):
    pool_id: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineStarted(Event):
    """An engine process is up (spawned, or adopted from a handoff file); health not yet known."""

    pool_id: str
    engine_url: str | None = None
    pid: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthChecked(Event):
    pool_id: str
    ok: bool
    loading: bool = False  # llama-server answers 503 "Loading model" while it loads
    detail: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineExited(Event):
    pool_id: str
    detail: str = "exited"


@dataclass(frozen=True, slots=True, kw_only=True)
class DrainRequested(Event):
    pool_id: str
    deadline_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LeasesChanged(Event):
    pool_id: str
    active: int
