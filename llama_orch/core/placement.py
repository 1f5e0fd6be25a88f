"""Placement: which pool runs a task. Filter, then score, then pick.

Rules
- A pool is a candidate only if it is ready, live, not draining, not stale, its breaker is not
  open, it has a free slot, and its engine, model and ctx limit fit the task (and its device
  mask, when the task requires one; and it is strict-capable for ``determinism: strict``).
- Scores: ``vram-aware`` (default) most free VRAM, then fewest active leases, then
  ``replica_id``; ``least-loaded`` lowest lease ratio, then most free VRAM, then
  ``replica_id``; ``round-robin`` the next candidate after the last pick in pool-id order;
  ``random`` a candidate drawn from the seeded generator passed in; ``prefix-aware`` the
  candidate whose KV cache holds the longest prefix of the task's prompt (``core.prefix``),
  among those not busier than the least-loaded candidate by more than ``prefix_load_slack``
  (a share of slots), so a popular prefix spreads over pools instead of piling onto one; with
  no prefix held anywhere, as ``least-loaded``.
- ``pin`` never falls back. ``prefer`` picks the best preferred candidate, else (with
  ``allow_fallback``) the best of the rest; ``avoid`` skips avoided pools unless nothing else
  fits and ``allow_fallback`` is true. A session sticks to its last pool while that pool is a
  candidate. ``kv_warmth`` is true only for a pick of the session's own last pool: a new
  session, or one moved elsewhere, finds its cache cold.
- Free slots are counted from the orchestrator's own leases (taken at dispatch, returned at
  the terminal event), so a stale snapshot cannot oversubscribe a pool.

The hot path never scans all pools: each (engine, model) group keeps its available pools in a
list sorted by the strategy's key, updated with bisect when a lease or snapshot changes, and a
pick walks it from the best end until the first pool passes the task's filters (usually the
first). ``explain`` builds the full record (every pool, why it was filtered, its score) on demand.
"""

from __future__ import annotations

import random
import zlib
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass
from enum import Enum
from typing import Iterator

from .errors import InvariantViolation, UsageError
from .prefix import PrefixIndex
from .types import Determinism, PlacementMode, PoolSnapshot, TaskSpec


class Strategy(Enum):
    VRAM_AWARE = "vram-aware"
    LEAST_LOADED = "least-loaded"
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    PREFIX_AWARE = "prefix-aware"


def normalize_model_ref(ref: str) -> str:
    """``/abs/x.gguf`` and ``file:/abs/x.gguf`` name the same model."""
    if ref.startswith("/"):
        return "file:" + ref
    return ref


class _Pool:
    __slots__ = ("snapshot", "leases", "lost", "stale", "breaker_open", "key", "indexed_free", "group", "last_seen")

    def __init__(self, snapshot: PoolSnapshot, now: float) -> None:
        self.snapshot = snapshot
        self.leases = 0
        self.lost = False
        self.stale = False
        self.breaker_open = False
        self.key: tuple | None = None  # the key under which it sits in its group's ranked list
        self.indexed_free = 0
        self.group: tuple[str, str] = (snapshot.engine, normalize_model_ref(snapshot.model_ref))
        self.last_seen = now

    @property
    def usable(self) -> bool:
        s = self.snapshot
        return s.ready and s.live and not s.draining and not self.lost and not self.stale and not self.breaker_open

    @property
    def free(self) -> int:
        return max(0, self.snapshot.slots_total - self.leases)


class _Group:
    __slots__ = ("ranked", "ids", "members", "free", "stats")

    def __init__(self) -> None:
        self.ranked: list[tuple] = []     # (key..., pool_id) of usable pools with a free slot
        self.ids: list[str] = []          # the same pools, sorted by id (round-robin, random)
        self.members: set[str] = set()
        self.free = 0                     # free slots of the pools in ``ranked``
        self.stats: tuple[int, int, int] | None = None  # (usable pools, their slots, max ctx); None: recompute


@dataclass(frozen=True, slots=True, kw_only=True)
class Pick:
    pool_id: str
    kv_warmth: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class NoPick:
    """No pool can take the task now. ``permanent`` means waiting will not help."""

    code: str
    message: str
    http_status: int
    permanent: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class CandidateRecord:
    pool_id: str
    eligible: bool
    reasons: tuple[str, ...]
    score: tuple | None
    prefix_blocks: int = 0  # leading blocks of the task's prefix this pool is taken to hold


@dataclass(frozen=True, slots=True, kw_only=True)
class Explanation:
    task_id: str
    strategy: str
    candidates: tuple[CandidateRecord, ...]
    picked: str | None
    outcome: str

    def as_dict(self) -> dict:
        return {
            "task_id": self.task_id,
            "strategy": self.strategy,
            "picked": self.picked,
            "outcome": self.outcome,
            "candidates": [
                {"pool_id": c.pool_id, "eligible": c.eligible, "reasons": list(c.reasons),
                 "score": list(c.score) if c.score is not None else None, "prefix_blocks": c.prefix_blocks}
                for c in self.candidates
            ],
        }


class Placer:
    """Pool table plus the strategy; answers ``pick`` in O(log n) for the common case."""

    def __init__(self, strategy: Strategy = Strategy.VRAM_AWARE, *, rng: random.Random | None = None,
                 prefix_load_slack: float = 0.25, prefix_block_tokens: int = 64,
                 prefix_blocks_per_pool: int | None = None) -> None:
        if not isinstance(strategy, Strategy):
            raise UsageError(f"placement strategy must be a Strategy, got {strategy!r}")
        if not prefix_load_slack >= 0 or prefix_block_tokens < 1 or (prefix_blocks_per_pool is not None
                                                                     and prefix_blocks_per_pool < 1):
            raise UsageError("prefix_load_slack must be >= 0, prefix_block_tokens and prefix_blocks_per_pool >= 1")
        self.strategy = strategy
        #: Which prefixes each pool probably holds; kept for ``prefix-aware`` only.
        self.prefix = PrefixIndex()
        self.prefix_load_slack = prefix_load_slack
        self.prefix_block_tokens = prefix_block_tokens
        self.prefix_blocks_per_pool = prefix_blocks_per_pool
        self._rng = rng if rng is not None else random.Random(0)
        self._pools: dict[str, _Pool] = {}
        self._groups: dict[tuple[str, str], _Group] = {}
        self._rr_last: dict[tuple[str, str], str] = {}
        self._picks: dict[tuple[str, bool], Pick] = {}  # see _chose
        self.free_total = 0  # free slots over all usable pools, kept by _index/_unindex
        #: How many pools the last ``pick`` chose among (usable, a free slot, the task's engine and
        #: model; 1 for a pin): what ``Dispatch.candidates`` reports.
        self.considered = 0

    # -- pool table ---------------------------------------------------------------------------

    def __contains__(self, pool_id: str) -> bool:
        return pool_id in self._pools

    def pool_ids(self) -> list[str]:
        return sorted(self._pools)

    def snapshot(self, pool_id: str) -> PoolSnapshot | None:
        p = self._pools.get(pool_id)
        return p.snapshot if p else None

    def leases(self, pool_id: str) -> int:
        return self._pools[pool_id].leases

    def is_usable(self, pool_id: str) -> bool:
        p = self._pools.get(pool_id)
        return p is not None and p.usable

    def last_seen(self, pool_id: str) -> float:
        return self._pools[pool_id].last_seen

    def update(self, snapshot: PoolSnapshot, now: float) -> None:
        p = self._pools.get(snapshot.pool_id)
        if p is None:
            p = _Pool(snapshot, now)
            self._pools[snapshot.pool_id] = p
        else:
            self._unindex(p)
            if _cache_lost(p.snapshot, snapshot):
                self.prefix.forget(snapshot.pool_id)
            old_group = p.group
            p.snapshot = snapshot
            p.group = (snapshot.engine, normalize_model_ref(snapshot.model_ref))
            if old_group != p.group:
                self._groups[old_group].members.discard(snapshot.pool_id)
                self._groups[old_group].stats = None
            p.last_seen = now
            p.lost = False
            p.stale = False
        group = self._group(p.group)
        group.members.add(snapshot.pool_id)
        group.stats = None
        self._index(p)
        if self.strategy is Strategy.PREFIX_AWARE:
            blocks = self.prefix_blocks_per_pool
            if blocks is None:  # the KV cache of every slot's whole context, in blocks
                blocks = snapshot.slots_total * snapshot.ctx_max // self.prefix_block_tokens or 4096
            if self.prefix.capacity(snapshot.pool_id) != blocks:
                self.prefix.set_capacity(snapshot.pool_id, blocks)

    def record_prefix(self, pool_id: str, chain: tuple[int, ...]) -> None:
        """The task dispatched to ``pool_id`` brings this prefix into its cache."""
        if chain and self.strategy is Strategy.PREFIX_AWARE:
            self.prefix.record(pool_id, chain)

    def set_flags(self, pool_id: str, *, lost: bool | None = None, stale: bool | None = None,
                  breaker_open: bool | None = None) -> None:
        p = self._pools[pool_id]
        self._unindex(p)
        if lost is not None:
            p.lost = lost
            if lost:
                self.prefix.forget(pool_id)
        if stale is not None:
            p.stale = stale
        if breaker_open is not None:
            p.breaker_open = breaker_open
        self._groups[p.group].stats = None
        self._index(p)

    def remove(self, pool_id: str) -> None:
        p = self._pools.pop(pool_id, None)
        self.prefix.forget(pool_id)
        if p is None:
            return
        self._unindex(p)
        self._groups[p.group].members.discard(pool_id)
        self._groups[p.group].stats = None

    def acquire(self, pool_id: str) -> None:
        p = self._pools[pool_id]
        if p.key is None:
            raise InvariantViolation(f"lease on pool {pool_id}, which has no free slot or is not usable")
        self._unindex(p)
        p.leases += 1
        self._index(p)

    def release(self, pool_id: str) -> None:
        p = self._pools.get(pool_id)
        if p is None:  # the pool was removed while the task ran; its lease went with it
            return
        if p.leases <= 0:
            raise UsageError(f"release on pool {pool_id} with no lease held")
        self._unindex(p)
        p.leases -= 1
        self._index(p)

    def slots(self, spec: TaskSpec | None = None) -> tuple[int, int]:
        """(free, total) slots of usable pools, for the task's group or over all pools."""
        if spec is not None:
            group = self._groups.get((spec.engine, normalize_model_ref(spec.model_ref)))
            return (group.free, self._stats(group)[1]) if group else (0, 0)
        total = sum(self._stats(g)[1] for g in self._groups.values())
        return self.free_total, total

    def _stats(self, group: _Group) -> tuple[int, int, int]:
        """(usable pools, their slots, their max ctx; 0 = unlimited), cached until a pool changes."""
        stats = group.stats
        if stats is None:
            usable = [self._pools[i] for i in group.members if self._pools[i].usable]
            ctx = [p.snapshot.ctx_max for p in usable]
            max_ctx = 0 if not ctx or 0 in ctx else max(ctx)
            stats = group.stats = (len(usable), sum(p.snapshot.slots_total for p in usable), max_ctx)
        return stats

    # -- the index ----------------------------------------------------------------------------

    def _key(self, p: _Pool) -> tuple:
        s = p.snapshot
        if self.strategy is Strategy.VRAM_AWARE:
            return (-s.vram_free_bytes, p.leases, s.replica_id, s.pool_id)
        if self.strategy is Strategy.LEAST_LOADED or self.strategy is Strategy.PREFIX_AWARE:
            return (p.leases / max(1, s.slots_total), -s.vram_free_bytes, s.replica_id, s.pool_id)
        return (s.pool_id,)

    def _group(self, group_key: tuple[str, str]) -> _Group:
        # get-then-create rather than setdefault, which would build a _Group on every call
        group = self._groups.get(group_key)
        if group is None:
            group = self._groups[group_key] = _Group()
        return group

    def _index(self, p: _Pool) -> None:
        free = p.free
        if free > 0 and p.usable:
            key = self._key(p)
            group = self._groups[p.group]  # update() creates a pool's group before indexing it
            insort(group.ranked, key)
            insort(group.ids, p.snapshot.pool_id)
            p.key = key
            p.indexed_free = free
            self.free_total += free
            group.free += free

    def _unindex(self, p: _Pool) -> None:
        if p.key is None:
            return
        group = self._groups[p.group]
        i = bisect_left(group.ranked, p.key)
        del group.ranked[i]
        j = bisect_left(group.ids, p.snapshot.pool_id)
        del group.ids[j]
        p.key = None
        self.free_total -= p.indexed_free
        group.free -= p.indexed_free
        p.indexed_free = 0

    def _ordered(self, group: _Group) -> Iterator[str]:
        """Available pools of a group, best first for this strategy."""
        if self.strategy in (Strategy.VRAM_AWARE, Strategy.LEAST_LOADED, Strategy.PREFIX_AWARE):
            for key in group.ranked:
                yield key[-1]
            return
        ids = group.ids
        if not ids:
            return
        if self.strategy is Strategy.ROUND_ROBIN:
            start = 0
            last = self._rr_last.get(self._group_of_ids(ids))
            if last is not None:
                start = bisect_right(ids, last) % len(ids)
        else:
            start = self._rng.randrange(len(ids))
        n = len(ids)
        for k in range(n):
            yield ids[(start + k) % n]

    def _group_of_ids(self, ids: list[str]) -> tuple[str, str]:
        return self._pools[ids[0]].group

    # -- filters ------------------------------------------------------------------------------

    def _misfit(self, p: _Pool, spec: TaskSpec) -> str | None:
        """Why the pool can never take this task as it stands (None: it fits)."""
        s = p.snapshot
        if p.group[0] != spec.engine:
            return f"engine {s.engine} != {spec.engine}"
        if p.group[1] != spec.model_ref and p.group[1] != normalize_model_ref(spec.model_ref):
            return f"model {s.model_ref} != {spec.model_ref}"
        if s.ctx_max and spec.ctx > s.ctx_max:
            return f"ctx limit {s.ctx_max} < {spec.ctx}"
        req = spec.placement.require_device_mask
        if req is not None and s.device_mask != req:
            return f"device mask {s.device_mask!r} != {req!r}"
        if spec.determinism is Determinism.STRICT:
            if not s.strict_capable:
                return "not pinned for strict determinism"
            if spec.sampler_profile_version and s.sampler_profile_version != spec.sampler_profile_version:
                return f"sampler profile {s.sampler_profile_version} != {spec.sampler_profile_version}"
        return None

    @staticmethod
    def _unavailable(p: _Pool) -> str | None:
        s = p.snapshot
        if p.lost:
            return "lost"
        if not s.live:
            return "not live"
        if not s.ready:
            return "not ready"
        if s.draining:
            return "draining"
        if p.stale:
            return "stale"
        if p.breaker_open:
            return "breaker open"
        if p.free <= 0:
            return "no free slot"
        return None

    # -- decisions ----------------------------------------------------------------------------

    def check_submission(self, spec: TaskSpec) -> NoPick | None:
        """Reasons to refuse a task at the door, before it is queued (None: queue it)."""
        placement = spec.placement
        if placement.mode is PlacementMode.PIN:
            p = self._pools.get(placement.pin_pool_id or "")
            if p is None:
                return NoPick(code="INVALID_PARAMS", http_status=400, permanent=True,
                              message=f"placement.pin_pool_id: unknown pool {placement.pin_pool_id!r}")
            misfit = self._misfit(p, spec)
            if misfit:
                return NoPick(code="INVALID_PARAMS", http_status=400, permanent=True,
                              message=f"pinned pool {p.snapshot.pool_id} cannot take this task: {misfit}")
            if not p.usable:
                return NoPick(code="POOL_UNREADY", http_status=503, permanent=False,
                              message=f"pinned pool {p.snapshot.pool_id} is not ready ({self._unavailable(p)})")
            return None
        group = self._groups.get((spec.engine, normalize_model_ref(spec.model_ref)))
        if (group is not None and placement.allow_fallback and placement.require_device_mask is None
                and spec.determinism is Determinism.BEST_EFFORT):
            # The common case needs only the group's cached figures, not a scan of its pools.
            usable_count, _, max_ctx = self._stats(group)
            if usable_count and (max_ctx == 0 or spec.ctx <= max_ctx):
                return None
        members = [self._pools[i] for i in sorted(group.members)] if group else []
        if not members:
            return NoPick(code="POOL_UNREADY", http_status=503, permanent=False,
                          message=f"no pool serves model {spec.model_ref!r} on engine {spec.engine!r}")
        usable = [p for p in members if p.usable]
        if not usable:
            return NoPick(code="POOL_UNREADY", http_status=503, permanent=False,
                          message=f"no ready pool for model {spec.model_ref!r} (all {len(members)} unready)")
        ctx_max = max((p.snapshot.ctx_max or 1 << 62) for p in usable)
        if spec.ctx > ctx_max:
            return NoPick(code="INVALID_PARAMS", http_status=400, permanent=True,
                          message=f"ctx {spec.ctx} is above the model's limit {ctx_max}")
        fitting = [p for p in usable if self._misfit(p, spec) is None]
        if not fitting:
            return NoPick(code="POOL_UNAVAILABLE", http_status=503, permanent=False,
                          message=f"no ready pool can take this task ({self._misfit(usable[0], spec)})")
        if not placement.allow_fallback:
            allowed = [p for p in fitting if self._allowed_without_fallback(p.snapshot.pool_id, spec)]
            if not allowed:
                return NoPick(code="POOL_UNAVAILABLE", http_status=503, permanent=False,
                              message="no preferred, non-avoided pool is ready and allow_fallback is false")
        return None

    @staticmethod
    def _allowed_without_fallback(pool_id: str, spec: TaskSpec) -> bool:
        placement = spec.placement
        if pool_id in placement.avoid_pools:
            return False
        if placement.mode is PlacementMode.PREFER and placement.prefer_pools:
            return pool_id in placement.prefer_pools
        return True

    def pick(self, spec: TaskSpec, session_pool: str | None = None, exclude: tuple[str, ...] = ()) -> Pick | NoPick:
        """Choose a pool for the task now, or say why none can take it yet.

        ``exclude`` lists pools that must not be picked (a retry's failed pools).
        """
        placement = spec.placement
        if placement.mode is PlacementMode.PIN:
            self.considered = 1
            p = self._pools.get(placement.pin_pool_id or "")
            if p is None:
                return NoPick(code="POOL_UNAVAILABLE", http_status=503, permanent=True,
                              message=f"pinned pool {placement.pin_pool_id} is gone")
            if p.usable and p.free > 0 and self._misfit(p, spec) is None and p.snapshot.pool_id not in exclude:
                return Pick(pool_id=p.snapshot.pool_id, kv_warmth=session_pool == p.snapshot.pool_id)
            return NoPick(code="POOL_UNREADY", http_status=503, permanent=False,
                          message=f"pinned pool {p.snapshot.pool_id} is {self._unavailable(p) or 'unfit'}")
        group_key = self._group_key(spec)
        group = self._groups.get(group_key)
        if group is None or not group.ranked:
            self.considered = 0
            return NoPick(code="POOL_UNAVAILABLE", http_status=503, permanent=False, message="no free slot")
        self.considered = len(group.ranked)
        avoid = placement.avoid_pools
        if session_pool is not None and session_pool not in avoid and session_pool not in exclude:
            p = self._pools.get(session_pool)
            if p is not None and p.key is not None and p.group == group_key and self._misfit(p, spec) is None:
                if placement.mode is PlacementMode.AUTO or self._allowed_without_fallback(session_pool, spec):
                    return self._chose(session_pool, True)
        prefer = placement.prefer_pools if placement.mode is PlacementMode.PREFER else ()
        if spec.prefix and self.strategy is Strategy.PREFIX_AWARE:
            chosen = self._prefix_pick(spec, group, group_key, exclude, prefer, avoid)
            if chosen is not None:
                return self._chose(chosen, session_pool == chosen)
        fallback: str | None = None     # best fitting pool that is only not preferred
        last_resort: str | None = None  # best fitting avoided pool: used only if nothing else fits
        for pool_id in self._ordered(group):
            p = self._pools[pool_id]
            if self._misfit(p, spec) is not None or pool_id in exclude:
                continue
            if pool_id in avoid:
                if last_resort is None:
                    last_resort = pool_id
                continue
            if prefer and pool_id not in prefer:
                if fallback is None:
                    fallback = pool_id
                continue
            return self._chose(pool_id, session_pool == pool_id)
        if placement.allow_fallback:
            chosen = fallback if fallback is not None else last_resort
            if chosen is not None:
                # falling back onto the session's own pool still finds its KV cache warm
                return self._chose(chosen, session_pool == chosen)
        return NoPick(code="POOL_UNAVAILABLE", http_status=503, permanent=False, message="no fitting pool has a free slot")

    def _prefix_pick(self, spec: TaskSpec, group: _Group, group_key: tuple[str, str], exclude: tuple[str, ...],
                     prefer: tuple[str, ...], avoid: tuple[str, ...]) -> str | None:
        """The candidate holding the longest prefix of the task's, among those within the load
        slack of the least-loaded one; when none holds any of it, one of the least-loaded chosen
        by the prefix. Candidates are the first choices only (fitting, not excluded, not avoided,
        preferred when the task prefers): None when there is none, and the usual walk decides
        (a fallback is never taken for its cache)."""
        def first_choice(p: _Pool, pool_id: str) -> bool:
            return (pool_id not in exclude and pool_id not in avoid and (not prefer or pool_id in prefer)
                    and self._misfit(p, spec) is None)

        ordered = self._ordered(group)
        least: float | None = None
        first: str | None = None
        for pool_id in ordered:
            p = self._pools[pool_id]
            if first_choice(p, pool_id):
                least, first = p.leases / max(1, p.snapshot.slots_total), pool_id
                break
        if least is None or first is None:
            return None
        limit = least + self.prefix_load_slack + 1e-9
        for depth, owners in self.prefix.deepest(spec.prefix):
            best: tuple | None = None
            for pool_id in owners:
                p = self._pools.get(pool_id)
                if p is None or p.key is None or p.group != group_key or not first_choice(p, pool_id):
                    continue
                load = p.leases / max(1, p.snapshot.slots_total)
                if load > limit:
                    continue
                # the least loaded, then an order of its own per prefix (equals spread out)
                key = (load, _spread(pool_id, spec.prefix[depth - 1]), pool_id)
                if best is None or key < best:
                    best = key
            if best is not None:
                return best[2]
        # held nowhere eligible: a new prefix goes to one of the least-loaded, chosen by the prefix
        # itself, so new conversations spread evenly and each one's next turn finds its cache
        ties = [first]
        for pool_id in ordered:  # the walk goes on after the first choice
            p = self._pools[pool_id]
            if not first_choice(p, pool_id):
                continue
            if p.leases / max(1, p.snapshot.slots_total) > least or len(ties) >= PREFIX_SPREAD:
                break
            ties.append(pool_id)
        return min(ties, key=lambda pool_id: (_spread(pool_id, spec.prefix[0]), pool_id))

    def _group_key(self, spec: TaskSpec) -> tuple[str, str]:
        return (spec.engine, normalize_model_ref(spec.model_ref))

    def _chose(self, pool_id: str, kv_warmth: bool) -> Pick:
        if self.strategy is Strategy.ROUND_ROBIN:
            self._rr_last[self._pools[pool_id].group] = pool_id
        # A Pick is an immutable value with few distinct instances (two per pool), so each is
        # built once and handed out again; building one costs more than the lookup.
        pick = self._picks.get((pool_id, kv_warmth))
        if pick is None:
            pick = self._picks[(pool_id, kv_warmth)] = Pick(pool_id=pool_id, kv_warmth=kv_warmth)
        return pick

    def explain(self, spec: TaskSpec, session_pool: str | None = None) -> Explanation:
        """The whole decision as a record: every pool, why it was filtered, its score, the pick.

        Built by a full scan, on demand only. It does not advance round-robin or draw from the
        random generator, so asking for an explanation never changes later decisions.
        """
        records = []
        depths = self.prefix.matches(spec.prefix) if spec.prefix else {}
        for pool_id in sorted(self._pools):
            p = self._pools[pool_id]
            reasons = [r for r in (self._misfit(p, spec), self._unavailable(p)) if r]
            placement = spec.placement
            if placement.mode is PlacementMode.PIN and pool_id != placement.pin_pool_id:
                reasons.append("not the pinned pool")
            if pool_id in placement.avoid_pools:
                reasons.append("avoided")
            if placement.mode is PlacementMode.PREFER and placement.prefer_pools and pool_id not in placement.prefer_pools:
                reasons.append("not preferred")
            hard = [r for r in reasons if r not in ("avoided", "not preferred")]
            records.append(CandidateRecord(pool_id=pool_id, eligible=not hard, reasons=tuple(reasons),
                                           score=self._key(p)[:-1] if not hard else None,
                                           prefix_blocks=depths.get(pool_id, 0)))
        saved_rr = dict(self._rr_last)
        saved_rng = self._rng.getstate()
        try:
            decision = self.pick(spec, session_pool)
        finally:
            self._rr_last = saved_rr
            self._rng.setstate(saved_rng)
        picked = decision.pool_id if isinstance(decision, Pick) else None
        outcome = "picked" if picked else f"{decision.code}: {decision.message}"
        return Explanation(task_id=spec.task_id, strategy=self.strategy.value, candidates=tuple(records),
                           picked=picked, outcome=outcome)


def _cache_lost(old: PoolSnapshot, new: PoolSnapshot) -> bool:
    """Whether the pool's KV cache is gone between two snapshots: its engine went down (not
    ready or not live, a reload included) or was replaced (another version, model, replica or
    address)."""
    if (old.ready and old.live) and not (new.ready and new.live):
        return True
    return (old.engine_version != new.engine_version or old.model_ref != new.model_ref
            or old.replica_id != new.replica_id or old.engine_url != new.engine_url)


#: ``prefix-aware``: how many equally least-loaded pools a new prefix is spread over.
PREFIX_SPREAD = 16


def _spread(pool_id: str, block: int) -> int:
    """A fixed pseudo-random order of pools per block (rendezvous hashing): equal candidates are
    ranked differently for different prefixes, the same way in every process."""
    return zlib.crc32(pool_id.encode(), block & 0xFFFFFFFF)
