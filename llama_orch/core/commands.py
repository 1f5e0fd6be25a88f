"""Outputs of the core: what a driver must do next.

Expected outcomes are commands: a full queue is a ``Rejected``, an unmeetable deadline too, a
pool loss mid-stream a terminal ``Finish`` carrying an ``error`` event. Exactly one ``Admitted``
or ``Rejected`` answers each ``TaskSubmitted``; exactly one ``Finish`` ends each admitted task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .types import Outcome, Priority


class Command:
    __slots__ = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Admitted(Command):
    task_id: str
    queue_position: int
    predicted_start_ms: int
    backoff_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected(Command):
    """The answer to a submission that was not admitted (the HTTP error response)."""

    task_id: str
    http_status: int
    code: str
    message: str
    retriable: bool = False
    retry_after_ms: int | None = None
    policy_label: str | None = None
    pool_id: str | None = None
    engine: str | None = None  # the engine the task asked for (a metric label)


@dataclass(frozen=True, slots=True, kw_only=True)
class Dispatch(Command):
    """Open an upstream stream for the task on the pool (take one slot)."""

    task_id: str
    pool_id: str
    attempt: int
    kv_warmth: bool
    engine_url: str | None = None
    #: Pools placement chose among: those of the task's engine and model that were usable with a
    #: free slot (1 for a pin).
    candidates: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardTokens(Command):
    """Write the tokens just received to the client: indices first_index .. first_index+count-1."""

    task_id: str
    first_index: int
    count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EmitEvent(Command):
    """A non-terminal SSE event for the client (``started``, ``metrics``)."""

    task_id: str
    kind: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Finish(Command):
    """The task's one terminal event (``end`` or ``error``) and its outcome."""

    task_id: str
    outcome: Outcome
    kind: str  # "end" | "error"
    data: Mapping[str, Any] = field(default_factory=dict)
    pool_id: str | None = None
    engine: str | None = None  # the task's engine and priority (metric labels; the task is gone by then)
    priority: Priority | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseUpstream(Command):
    """Close the task's upstream connection; the engine frees the slot when it sees that."""

    task_id: str
    pool_id: str
    reason: str


# -- pool lifecycle (pool-managerd and engine-provisioner) -------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StartEngine(Command):
    pool_id: str
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StopEngine(Command):
    pool_id: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeHealth(Command):
    pool_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStateChanged(Command):
    pool_id: str
    state: str
    previous: str
    cause: str | None = None
