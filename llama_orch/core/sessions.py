"""Sessions: which pool a session last used, and what it has spent against its budgets.

Rules
- A session is created by its first task and forgotten on request or when the least recently
  used one must make room (``max_sessions``).
- Three budgets per session, each optional: tokens (generated), time (engine time: first
  dispatch to the end of the task, ms) and cost (in the operator's unit: prompt and generated
  tokens priced per thousand).
- Tokens and cost are reserved at admission for the worst case (``max_tokens``), so concurrent
  tasks of one session can never overspend together; the reservation is released and the
  actual use charged when the task ends. Time cannot be known in advance: a session whose
  time is spent gets no new task, and a running one finishes.
- A submission that would overspend is refused at admission (400 ``INVALID_PARAMS`` naming the
  budget), never cut off mid-stream.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .errors import UsageError
from .types import TaskSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetPolicy:
    tokens: int | None = None
    time_ms: int | None = None
    cost: float | None = None
    cost_per_1k_prompt_tokens: float = 0.0
    cost_per_1k_output_tokens: float = 0.0

    def __post_init__(self) -> None:
        for name in ("tokens", "time_ms", "cost"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UsageError(f"budget {name} must be > 0 when set, got {value!r}")
        for name in ("cost_per_1k_prompt_tokens", "cost_per_1k_output_tokens"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def any(self) -> bool:
        return self.tokens is not None or self.time_ms is not None or self.cost is not None

    def cost_of(self, prompt_tokens: int, output_tokens: int) -> float:
        return (prompt_tokens * self.cost_per_1k_prompt_tokens + output_tokens * self.cost_per_1k_output_tokens) / 1000.0


_EVICTION_SCAN = 16


class Session:
    __slots__ = ("pool_id", "tasks", "tokens_used", "time_used_ms", "cost_used", "tokens_reserved", "cost_reserved")

    def __init__(self) -> None:
        self.pool_id: str | None = None
        self.tasks = 0
        self.tokens_used = 0
        self.time_used_ms = 0.0
        self.cost_used = 0.0
        self.tokens_reserved = 0
        self.cost_reserved = 0.0


class Sessions:
    """Sessions by id, least recently used first; budget checks, reservations and charges."""

    __slots__ = ("policy", "max_sessions", "_by_id")

    def __init__(self, policy: BudgetPolicy | None = None, *, max_sessions: int = 100_000) -> None:
        if max_sessions < 1:
            raise UsageError(f"max_sessions must be >= 1, got {max_sessions}")
        self.policy = policy or BudgetPolicy()
        self.max_sessions = max_sessions
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def touch(self, session_id: str) -> Session:
        by_id = self._by_id
        s = by_id.get(session_id)
        if s is None:
            s = by_id[session_id] = Session()
            if len(by_id) > self.max_sessions:
                self._evict_one()
        else:
            by_id.move_to_end(session_id)
        return s

    def _evict_one(self) -> None:
        """Make room: the least recently used session with nothing reserved (a session with
        tasks in flight keeps its reservations), looking a few deep; else the oldest."""
        by_id = self._by_id
        for i, (sid, s) in enumerate(by_id.items()):
            if i >= _EVICTION_SCAN:
                break
            if not s.tokens_reserved and not s.cost_reserved:
                del by_id[sid]
                return
        by_id.popitem(last=False)

    def forget(self, session_id: str) -> bool:
        return self._by_id.pop(session_id, None) is not None

    def refusal(self, spec: TaskSpec) -> str | None:
        """Why ``spec`` would overspend its session's budget, or None."""
        p = self.policy
        if not p.any:
            return None
        s = self._by_id.get(spec.session_id)
        if p.tokens is not None:
            committed = (s.tokens_used + s.tokens_reserved) if s else 0
            if committed + spec.max_tokens > p.tokens:
                return (f"session token budget exceeded: {committed} used or reserved + max_tokens "
                        f"{spec.max_tokens} > budget {p.tokens}")
        if p.time_ms is not None and s is not None and s.time_used_ms >= p.time_ms:
            return f"session time budget spent: {s.time_used_ms:.0f} ms used of {p.time_ms} ms"
        if p.cost is not None:
            committed_cost = (s.cost_used + s.cost_reserved) if s else 0.0
            worst = p.cost_of(spec.prompt_tokens, spec.max_tokens)
            if committed_cost + worst > p.cost:
                return (f"session cost budget exceeded: {committed_cost:.6g} used or reserved + up to {worst:.6g} "
                        f"for this task > budget {p.cost:.6g}")
        return None

    def reserve(self, spec: TaskSpec) -> Session:
        s = self.touch(spec.session_id)
        s.tasks += 1
        if self.policy.any:
            s.tokens_reserved += spec.max_tokens
            s.cost_reserved += self.policy.cost_of(spec.prompt_tokens, spec.max_tokens)
        return s

    def charge(self, spec: TaskSpec, *, tokens_out: int, engine_ms: float) -> None:
        """The task ended: release its reservation, charge what it really used."""
        s = self._by_id.get(spec.session_id)
        if s is None:
            return  # forgotten meanwhile: nothing left to charge
        p = self.policy
        if p.any:
            s.tokens_reserved = max(0, s.tokens_reserved - spec.max_tokens)
            s.cost_reserved = max(0.0, s.cost_reserved - p.cost_of(spec.prompt_tokens, spec.max_tokens))
        s.tokens_used += tokens_out
        s.time_used_ms += engine_ms
        s.cost_used += p.cost_of(spec.prompt_tokens if tokens_out or engine_ms else 0, tokens_out)

    def view(self, session_id: str) -> dict:
        """What ``GET /v2/sessions/{id}``, the ``X-Budget-*`` headers and ``metrics`` frames report."""
        s = self._by_id.get(session_id)
        p = self.policy
        tokens_used = s.tokens_used if s else 0
        time_used = s.time_used_ms if s else 0.0
        cost_used = s.cost_used if s else 0.0
        tokens_reserved = s.tokens_reserved if s else 0
        cost_reserved = s.cost_reserved if s else 0.0
        # "remaining" is what a new task may still ask for: running tasks' reservations are spoken for.
        return {
            "session_id": session_id, "tasks": s.tasks if s else 0, "pool_id": s.pool_id if s else None,
            "tokens_used": tokens_used, "tokens_reserved": tokens_reserved, "token_budget": p.tokens,
            "tokens_remaining": None if p.tokens is None else max(0, p.tokens - tokens_used - tokens_reserved),
            "time_used_ms": int(time_used), "time_budget_ms": p.time_ms,
            "time_remaining_ms": None if p.time_ms is None else max(0, int(p.time_ms - time_used)),
            "cost_used": round(cost_used, 6), "cost_budget": p.cost,
            "cost_remaining": None if p.cost is None else round(max(0.0, p.cost - cost_used - cost_reserved), 6),
        }
