"""Value types shared by the core's state machines: enums, the task spec, pool snapshots.

All are frozen, slotted, keyword-only dataclasses validated in ``__post_init__``; a bad value
is misuse of the core (``UsageError``). The checks are plain ``if ...: raise`` so an error
message is formatted only when it is raised: a ``TaskSpec`` is built for every request. Parsing client JSON into these types (with 400 errors
that name the field) belongs to the wire layer, which calls these constructors last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .errors import UsageError


class Priority(Enum):
    INTERACTIVE = "interactive"
    BATCH = "batch"

    @property
    def rank(self) -> int:
        """Service order: lower is served first (the admission queue's class number)."""
        return 0 if self is Priority.INTERACTIVE else 1


class Outcome(Enum):
    """The one terminal outcome every task ends in."""

    COMPLETED = "completed"
    CANCELED = "canceled"
    FAILED = "failed"
    REJECTED = "rejected"
    EVICTED = "evicted"


class PlacementMode(Enum):
    AUTO = "auto"
    PIN = "pin"
    PREFER = "prefer"


class Determinism(Enum):
    BEST_EFFORT = "best_effort"
    STRICT = "strict"


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True, kw_only=True)
class PlacementRequest:
    mode: PlacementMode = PlacementMode.AUTO
    pin_pool_id: str | None = None
    prefer_pools: tuple[str, ...] = ()
    avoid_pools: tuple[str, ...] = ()
    require_device_mask: str | None = None
    allow_fallback: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.mode, PlacementMode):
            raise UsageError(f"placement.mode must be a PlacementMode, got {self.mode!r}")
        if self.mode is PlacementMode.PIN and not self.pin_pool_id:
            raise UsageError("placement.pin_pool_id is required when mode is 'pin'")
        if not isinstance(self.prefer_pools, tuple):
            raise UsageError("placement.prefer_pools must be a tuple")
        if not isinstance(self.avoid_pools, tuple):
            raise UsageError("placement.avoid_pools must be a tuple")


DEFAULT_PLACEMENT = PlacementRequest()


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSpec:
    """What a client asked for, already parsed and type-checked by the wire layer."""

    task_id: str
    session_id: str
    model_ref: str
    priority: Priority = Priority.INTERACTIVE
    engine: str = "llamacpp"
    workload: str = "completion"
    ctx: int = 0
    max_tokens: int = 16
    deadline_ms: int = 60_000
    prompt_tokens: int = 0
    expected_tokens: int | None = None
    seed: int | None = None
    determinism: Determinism = Determinism.BEST_EFFORT
    sampler_profile_version: str | None = None
    placement: PlacementRequest = DEFAULT_PLACEMENT
    #: The prompt's prefix as a chain of block hashes (``core.prefix``); empty when not computed.
    prefix: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.task_id, str) and self.task_id != ""):
            raise UsageError("task_id must be a non-empty string")
        if not isinstance(self.session_id, str):
            raise UsageError("session_id must be a string")
        if not (isinstance(self.model_ref, str) and self.model_ref != ""):
            raise UsageError("model_ref must be a non-empty string")
        if not isinstance(self.priority, Priority):
            raise UsageError(f"priority must be a Priority, got {self.priority!r}")
        if not (isinstance(self.ctx, int) and self.ctx >= 0):
            raise UsageError(f"ctx must be an int >= 0, got {self.ctx!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise UsageError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.deadline_ms, int):
            raise UsageError(f"deadline_ms must be an int, got {self.deadline_ms!r}")
        if not (isinstance(self.prompt_tokens, int) and self.prompt_tokens >= 0):
            raise UsageError("prompt_tokens must be an int >= 0")
        if not isinstance(self.determinism, Determinism):
            raise UsageError("determinism must be a Determinism")
        if not isinstance(self.placement, PlacementRequest):
            raise UsageError("placement must be a PlacementRequest")
        if type(self.prefix) is not tuple:
            raise UsageError("prefix must be a tuple of block hashes")


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolSnapshot:
    """One pool as last reported by its pool-managerd (the contract's pool status shape).

    ``slots_free`` is what the pool reported, kept for display. Placement counts free slots as
    ``slots_total`` minus the orchestrator's own leases, which are exact for one orchestrator
    and never stale; sharing a pool between several orchestrators needs leases granted by
    pool-managerd (roadmap), not this snapshot.
    """

    pool_id: str
    ready: bool
    draining: bool = False
    live: bool = True
    slots_total: int = 1
    slots_free: int = 1
    vram_total_bytes: int = 0
    vram_free_bytes: int = 0
    engine: str = "llamacpp"
    engine_version: str | None = None
    model_ref: str = ""
    model_digest: str | None = None
    sampler_profile_version: str | None = None
    ctx_max: int = 0
    device_mask: str = ""
    replica_id: str = ""
    engine_url: str | None = None
    last_error: str | None = None
    manager_url: str | None = None
    extra: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if not (isinstance(self.pool_id, str) and self.pool_id != ""):
            raise UsageError("pool_id must be a non-empty string")
        if not (isinstance(self.slots_total, int) and self.slots_total >= 0):
            raise UsageError(f"pool {self.pool_id}: slots_total must be an int >= 0")
        if not (isinstance(self.slots_free, int) and self.slots_free >= 0):
            raise UsageError(f"pool {self.pool_id}: slots_free must be an int >= 0")
        if not (isinstance(self.ctx_max, int) and self.ctx_max >= 0):
            raise UsageError(f"pool {self.pool_id}: ctx_max must be an int >= 0")
        if not (self.vram_total_bytes >= 0 and self.vram_free_bytes >= 0):
            raise UsageError(f"pool {self.pool_id}: VRAM figures must be >= 0")

    @property
    def strict_capable(self) -> bool:
        """Pinned engine version, model digest and sampler profile on a single slot."""
        return bool(self.engine_version and self.model_digest and self.sampler_profile_version) and self.slots_total == 1
