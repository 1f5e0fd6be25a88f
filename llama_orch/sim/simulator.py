"""The replay simulator: the production core driven by a virtual clock and simulated engines.

It owns the event heap ``(time, seq, kind, payload)`` (FIFO among equal times), the simulated
pools (slots, decode rate, prefill cost per context token), seeded faults (pool loss with
recovery, slow engines), and the ledger that checks every task's life: one admission answer,
at most one ``Finish``, no token after it. It drives ``llama_orch.core.Orchestrator`` exactly
as the daemons do, jumping the clock to the core's next deadline instead of sleeping.

Decode is modelled per task, not per token: an attempt produces its first token after
``first_token_ms + prefill_ms_per_token * context`` and the rest in one batch when the task
ends, so the cost of a replay grows with tasks, not tokens. Same trace, config and seed, same
result, byte for byte.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Sequence

from ..core.admission import QueuePolicy
from ..core.commands import Admitted, CloseUpstream, Dispatch, Finish, ForwardTokens, Rejected
from ..core.errors import InvariantViolation, UsageError
from ..core.events import (
    PoolLost, PoolUpdated, StreamEnded, TaskSubmitted, Tick, TokensReceived,
)
from ..core.orchestrator import Orchestrator, OrchestratorConfig
from ..core.placement import Strategy
from ..core.types import PoolSnapshot, Priority, TaskSpec
from .kvcache import KV_CACHE_MODELS, BlockLRU, SlotCaches
from .report import SimResult, TaskRecord
from .traces import TraceRecord

MODEL_REF = "file:/models/sim.gguf"
#: The reason counted for a task whose prompt alone fills the context (refused at the door).
PROMPT_OVER_CONTEXT = "INVALID_PARAMS: prompt over ctx_max"


def _setting(default, help: str, flag: str | None = None):
    """A simulation setting: its default, and its command-line flag and help (``cli_flags``)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """Everything a replay depends on besides the trace, its scaling and the seed; each setting
    is a flag of ``llama-orch replay`` (``cli_flags``), and the report prints them all."""

    pools: int = _setting(8, "number of simulated pools")
    slots_per_pool: int = _setting(4, "slots (concurrent generations) per pool", "--slots")
    tokens_per_s: float = _setting(50.0, "decode rate of one slot, tokens/s")
    prefill_ms_per_token: float = _setting(0.05, "prompt processing per prompt token, ms")
    first_token_ms: float = _setting(20.0, "fixed time from dispatch to the first token besides the prefill, ms")
    ctx_max: int = _setting(16_384, "context tokens per slot: a longer prompt is refused, as the engine would")
    vram_total_gb: float = _setting(24.0, "VRAM of every pool, GB (the same on each)", "--vram-gb")
    batch_fraction: float = _setting(0.3, "share of tasks submitted with priority batch")
    sessions: int = _setting(200, "distinct sessions the tasks are spread over (0: each task its own, as from "
                                  "clients that name none)")
    deadline_ms: int = _setting(300_000, "each task's deadline, ms")
    admission_capacity: int = _setting(256, "admission queue capacity", "--capacity")
    admission_policy: str = _setting("reject", "full-queue policy: reject | drop-lru", "--policy")
    placement_strategy: str = _setting("vram-aware", "placement: vram-aware | least-loaded | round-robin | random",
                                       "--strategy")
    poll_interval_ms: float = _setting(5_000.0, "how often each pool's status reaches the core, ms")
    kv_cache: str = _setting("block-lru", "each pool's KV cache of prefix blocks (a trace's hash_ids): block-lru "
                                          "(vLLM) | llamacpp-slots (llama.cpp: a kept prompt per slot) | none")
    kv_cache_blocks: int = _setting(1024, "block-lru capacity per pool, blocks (0: never forgets)")
    prefix_load_slack: float = _setting(0.25, "prefix-aware placement: how much busier than the least-loaded "
                                              "pool (a share of slots) a pool may be and still win for its prefix")
    prior_service_ms: float = _setting(4_000.0, "service time the core assumes before it has measured any, ms "
                                               "(orchestratord's is 2000)")
    pool_losses: int = _setting(1, "seeded pool-loss faults over the trace span")
    pool_recovery_ms: float = _setting(30_000.0, "how long a lost pool stays down, ms")
    slow_engines: int = _setting(1, "seeded slow-engine windows")
    slow_factor: float = _setting(4.0, "how much slower a slow engine is")
    slow_window_ms: float = _setting(120_000.0, "how long a slow-engine window lasts, ms")
    check_every: int = _setting(5_000, "a full invariant check every N simulated events")
    progress_ms: float = _setting(5_000.0, "decoded tokens are delivered in batches this far apart, ms")

    def __post_init__(self) -> None:
        checks = {
            "pools": (self.pools >= 1, ">= 1"), "slots_per_pool": (self.slots_per_pool >= 1, ">= 1"),
            "tokens_per_s": (self.tokens_per_s > 0, "> 0"),
            "prefill_ms_per_token": (self.prefill_ms_per_token >= 0, ">= 0"),
            "first_token_ms": (self.first_token_ms >= 0, ">= 0"),
            "batch_fraction": (0.0 <= self.batch_fraction <= 1.0, "between 0 and 1"),
            "sessions": (self.sessions >= 0, ">= 0"), "deadline_ms": (self.deadline_ms >= 1, ">= 1"),
            "admission_capacity": (self.admission_capacity >= 1, ">= 1"),
            "poll_interval_ms": (self.poll_interval_ms > 0, "> 0"), "pool_losses": (self.pool_losses >= 0, ">= 0"),
            "pool_recovery_ms": (self.pool_recovery_ms > 0, "> 0"), "slow_engines": (self.slow_engines >= 0, ">= 0"),
            "slow_factor": (self.slow_factor >= 1.0, ">= 1"), "slow_window_ms": (self.slow_window_ms > 0, "> 0"),
            "check_every": (self.check_every >= 1, ">= 1"), "progress_ms": (self.progress_ms > 0, "> 0"),
            "ctx_max": (self.ctx_max >= 1, ">= 1"), "vram_total_gb": (self.vram_total_gb > 0, "> 0"),
            "prior_service_ms": (self.prior_service_ms > 0, "> 0"),
            "kv_cache_blocks": (self.kv_cache_blocks >= 0, ">= 0"),
            "prefix_load_slack": (self.prefix_load_slack >= 0, ">= 0"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise UsageError(f"simulation setting {name}={getattr(self, name)!r} is out of range: expected {expected}")
        if self.kv_cache not in KV_CACHE_MODELS:
            raise UsageError(f"kv_cache must be one of {list(KV_CACHE_MODELS)}, got {self.kv_cache!r}")
        try:
            QueuePolicy(self.admission_policy)
        except ValueError:
            raise UsageError(f"admission_policy must be one of {[p.value for p in QueuePolicy]}, "
                             f"got {self.admission_policy!r}") from None
        try:
            Strategy(self.placement_strategy)
        except ValueError:
            raise UsageError(f"placement_strategy must be one of {[s.value for s in Strategy]}, "
                             f"got {self.placement_strategy!r}") from None


def cli_flags() -> list[tuple[str, str, type, object, str]]:
    """``(flag, setting, type, default, help)`` for each ``SimConfig`` setting, in order."""
    out = []
    for f in fields(SimConfig):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        out.append((flag, f.name, type(f.default), f.default, f.metadata["help"]))
    return out


def config_flags(config: SimConfig) -> list[str]:
    """The flags that rebuild ``config`` (those that differ from the defaults)."""
    return [f"{flag}={getattr(config, name)!r}".replace("'", "") for flag, name, _, default, _ in cli_flags()
            if getattr(config, name) != default]


# Heap item kinds, in tie-break order irrelevant (seq breaks ties FIFO); each number is also the
# index of the kind's handler in _drive.
_ARRIVAL, _FIRST, _END, _POLL, _LOSS, _RECOVER, _SLOW_ON, _SLOW_OFF = range(8)


@dataclass(slots=True)
class _Ledger:
    """What happened to one task, as seen from outside the core."""

    record: TraceRecord
    priority: Priority
    answered: int = 0
    finished: int = 0
    outcome: str | None = None
    reason: str | None = None
    pool_id: str | None = None
    start_ms: float | None = None
    first_token_ms: float | None = None
    end_ms: float | None = None
    tokens_out: int = 0
    attempt: int = 0            # the attempt whose engine events are still valid
    busy_since: float | None = None
    tokens_planned: int = 0
    tokens_sent: int = 0
    core_attempt: int = 0       # Dispatch.attempt of the current attempt, echoed on engine events
    decode_from: float = 0.0
    ms_per_token: float = 1.0
    cached_tokens: int = 0      # prompt tokens the attempt found in its pool's KV cache
    slot: int = -1              # the slot the attempt holds, for a per-slot cache model


@dataclass(slots=True)
class _Pool:
    pool_id: str
    vram_total: int
    cache: BlockLRU | SlotCaches | None = None
    up: bool = True
    slow: float = 1.0
    busy_ms: float = 0.0
    running: set = field(default_factory=set)


class Simulation:
    def __init__(self, records: Sequence[TraceRecord], *, config: SimConfig | None = None, seed: int = 0,
                 trace_name: str = "trace", progress: Callable[[int, int], None] | None = None) -> None:
        if not records:
            raise UsageError("the trace has no records to replay")
        self.records = list(records)
        self.config = config or SimConfig()
        self.seed = seed
        self.trace_name = trace_name
        self.progress = progress
        c = self.config
        self.rng = random.Random(seed)
        self.core = Orchestrator(OrchestratorConfig(
            admission_capacity=c.admission_capacity, admission_policy=QueuePolicy(c.admission_policy),
            placement_strategy=Strategy(c.placement_strategy), pool_stale_ms=c.poll_interval_ms * 3,
            prior_service_ms=c.prior_service_ms, prefix_load_slack=c.prefix_load_slack,
            # the router's estimate of each cache is as large as the simulated cache itself
            prefix_blocks_per_pool=c.kv_cache_blocks or 1 << 40,
        ), rng=random.Random(seed ^ 0x5EED))
        gb = 1 << 30
        self.pools = {
            f"pool-{i}": _Pool(pool_id=f"pool-{i}", vram_total=int(c.vram_total_gb * gb), cache=self._new_cache())
            for i in range(c.pools)
        }
        self.now = 0.0
        self._heap: list[tuple[float, int, int, object]] = []
        self._arrivals: list[tuple[float, int, int, int]] = []  # (time, seq, _ARRIVAL, index), in heap order
        self._seq = 0
        self._tasks: dict[str, _Ledger] = {}
        self._depth: list[tuple[float, int]] = [(0.0, 0)]
        self._faults: list[str] = []
        self._events = 0
        self._span = 0.0
        self._snapshots: dict[tuple[str, bool, int], PoolSnapshot] = {}
        self._session_ids = [f"s{session:04d}" for session in range(self.config.sessions)]

    def _new_cache(self) -> BlockLRU | SlotCaches | None:
        c = self.config
        if c.kv_cache == "block-lru":
            return BlockLRU(c.kv_cache_blocks or None)
        if c.kv_cache == "llamacpp-slots":
            return SlotCaches(c.slots_per_pool)
        return None

    # -- plumbing -----------------------------------------------------------------------------

    def _push(self, when: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, payload))

    def _snapshot(self, pool: _Pool) -> PoolSnapshot:
        """The pool as its pool-managerd would report it now.

        A snapshot is an immutable value and a pool has few distinct states (up or not, free
        slots), so each is built once and handed out again by later polls.
        """
        c = self.config
        slots_free = max(0, c.slots_per_pool - len(pool.running))
        key = (pool.pool_id, pool.up, slots_free)
        snapshot = self._snapshots.get(key)
        if snapshot is None:
            snapshot = self._snapshots[key] = PoolSnapshot(
                pool_id=pool.pool_id, ready=pool.up, live=pool.up, slots_total=c.slots_per_pool,
                slots_free=slots_free, vram_total_bytes=pool.vram_total,
                vram_free_bytes=pool.vram_total // 2, engine="llamacpp", engine_version="sim",
                model_ref=MODEL_REF, ctx_max=c.ctx_max, device_mask=pool.pool_id.split("-")[1],
                replica_id=pool.pool_id, engine_url=f"sim://{pool.pool_id}")
        return snapshot

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> SimResult:
        c = self.config
        span = self._span = self.records[-1].arrival_ms
        for pool in self.pools.values():
            self._push(0.0, _POLL, pool.pool_id)
        # Arrivals are known up front, but only the next one waits on the heap (each arrival
        # pushes its successor), so that heap operations do not pay for thousands of pending
        # arrivals. Each keeps the sequence number it would have had if all were pushed here,
        # so ties break the same way.
        first = self._seq + 1
        self._arrivals = sorted((record.arrival_ms, first + index, _ARRIVAL, index)
                                for index, record in enumerate(self.records))
        self._seq += len(self.records)
        heapq.heappush(self._heap, self._arrivals[0])
        fault_rng = random.Random(self.seed * 7919 + 1)
        names = sorted(self.pools)
        for _ in range(c.pool_losses):
            self._push(fault_rng.uniform(0.1, 0.9) * span, _LOSS, fault_rng.choice(names))
        for _ in range(c.slow_engines):
            self._push(fault_rng.uniform(0.0, 0.8) * span, _SLOW_ON, fault_rng.choice(names))
        self._drive()
        self._final_checks()
        return self._result(span)

    def _drive(self) -> None:
        core = self.core
        heap = self._heap
        total = len(self.records)
        arrivals = 0
        report_every = max(1, total // 20)
        check_every = self.config.check_every
        pending = self._arrivals
        events = self._events
        handlers = (self._arrive, self._on_first_token, self._on_decode, self._on_poll, self._on_loss,
                    self._on_recover, self._on_slow_on, self._on_slow_off)  # indexed by kind
        while True:
            deadline = core.next_deadline()
            if heap and (deadline is None or heap[0][0] < deadline):
                when, _, kind, payload = heapq.heappop(heap)
                self.now = when
                if kind == _ARRIVAL:
                    arrivals += 1
                    if arrivals < total:
                        heapq.heappush(heap, pending[arrivals])  # the next arrival takes its place
                    if self.progress and arrivals % report_every == 0:
                        self.progress(arrivals, total)
                handlers[kind](payload)
            elif deadline is not None:
                self.now = max(self.now, deadline)
                self._apply(core.handle(Tick(), self.now))
            else:
                break
            events += 1
            if events % check_every == 0:
                core.check_invariants()
        self._events = events
        if self.progress:
            self.progress(total, total)

    # One handler per heap item kind, indexed by the kind's number (see _drive).

    def _on_first_token(self, payload: tuple[str, int]) -> None:
        task_id, attempt = payload
        ledger = self._tasks[task_id]
        if ledger.attempt == attempt:
            ledger.tokens_sent = 1
            event = TokensReceived(task_id=task_id, count=1, attempt=ledger.core_attempt)
            self._apply(self.core.handle(event, self.now))

    def _on_decode(self, payload: tuple[str, int]) -> None:
        task_id, attempt = payload
        ledger = self._tasks[task_id]
        if ledger.attempt == attempt:
            self._decode_progress(task_id, ledger, attempt)

    def _on_poll(self, pool_id: str) -> None:
        now = self.now
        pool = self.pools[pool_id]
        if pool.up:
            self._apply(self.core.handle(PoolUpdated(snapshot=self._snapshot(pool)), now))
        if now < self._span or self.core.tasks:
            self._push(now + self.config.poll_interval_ms, _POLL, pool.pool_id)

    def _on_loss(self, pool_id: str) -> None:
        now = self.now
        pool = self.pools[pool_id]
        if pool.up:
            pool.up = False
            self._faults.append(f"t={now:.1f}ms {pool.pool_id} lost ({len(pool.running)} tasks running)")
            for task_id in sorted(pool.running):
                self._stop_attempt(task_id)
            if pool.cache is not None:
                pool.cache.clear()  # the engine restarts with an empty KV cache
            self._apply(self.core.handle(PoolLost(pool_id=pool.pool_id, reason="simulated loss"), now))
            self._push(now + self.config.pool_recovery_ms, _RECOVER, pool.pool_id)

    def _on_recover(self, pool_id: str) -> None:
        now = self.now
        pool = self.pools[pool_id]
        pool.up = True
        self._faults.append(f"t={now:.1f}ms {pool.pool_id} recovered")
        self._apply(self.core.handle(PoolUpdated(snapshot=self._snapshot(pool)), now))

    def _on_slow_on(self, pool_id: str) -> None:
        now = self.now
        pool = self.pools[pool_id]
        pool.slow = self.config.slow_factor
        self._faults.append(f"t={now:.1f}ms {pool.pool_id} slow (x{self.config.slow_factor:g})")
        self._push(now + self.config.slow_window_ms, _SLOW_OFF, pool.pool_id)

    def _on_slow_off(self, pool_id: str) -> None:
        pool = self.pools[pool_id]
        pool.slow = 1.0
        self._faults.append(f"t={self.now:.1f}ms {pool.pool_id} back to speed")

    def _decode_progress(self, task_id: str, ledger: _Ledger, attempt: int) -> None:
        """Deliver the tokens decoded since the last delivery; end the stream when all are out.

        Tokens arrive in one batch per ``progress_ms`` of decode rather than one event each:
        the core sees a live stream (no between-token timeout) at a cost per task, not per token.
        """
        now = self.now
        planned = ledger.tokens_planned
        done = min(planned, 1 + int((now - ledger.decode_from) / ledger.ms_per_token + 1e-9))
        if done > ledger.tokens_sent:
            count = done - ledger.tokens_sent
            ledger.tokens_sent = done
            self._apply(self.core.handle(TokensReceived(task_id=task_id, count=count, attempt=ledger.core_attempt), now))
        if ledger.attempt != attempt:
            return
        if done >= planned:
            self._apply(self.core.handle(StreamEnded(task_id=task_id, tokens_out=planned, attempt=ledger.core_attempt), now))
        else:
            end = ledger.decode_from + (planned - 1) * ledger.ms_per_token
            self._push(min(end, now + self.config.progress_ms), _END, (task_id, attempt))

    def _arrive(self, index: int) -> None:
        record = self.records[index]
        c = self.config
        priority = Priority.BATCH if self.rng.random() < c.batch_fraction else Priority.INTERACTIVE
        session_id = self._session_ids[self.rng.randrange(c.sessions)] if c.sessions else f"s-{index:06d}"
        task_id = f"t{index:06d}"
        self._tasks[task_id] = _Ledger(record=record, priority=priority)
        # As the front doors ask: the prompt and what it may generate. The engine stops generating
        # at its context, so a task whose prompt fits asks for no more than that; one whose prompt
        # does not fit asks for more, and is refused at the door (the engine would refuse it too).
        wanted = record.context_tokens + max(1, record.generated_tokens)
        spec = TaskSpec(task_id=task_id, session_id=session_id, model_ref=MODEL_REF, priority=priority,
                        ctx=wanted if record.context_tokens >= c.ctx_max else min(wanted, c.ctx_max),
                        prompt_tokens=record.context_tokens, max_tokens=max(1, record.generated_tokens),
                        deadline_ms=c.deadline_ms, prefix=record.hash_ids)
        self._apply(self.core.handle(TaskSubmitted(spec=spec), self.now))

    def _stop_attempt(self, task_id: str) -> None:
        """The engine stops working on the task's current attempt (close, loss, retry)."""
        ledger = self._tasks[task_id]
        ledger.attempt += 1  # invalidates the attempt's pending engine events
        if ledger.busy_since is not None and ledger.pool_id is not None:
            pool = self.pools[ledger.pool_id]
            pool.busy_ms += self.now - ledger.busy_since
            pool.running.discard(task_id)
            if ledger.slot >= 0 and pool.cache is not None:
                pool.cache.release(ledger.slot)
                ledger.slot = -1
        ledger.busy_since = None

    # -- commands -----------------------------------------------------------------------------

    def _apply(self, commands: tuple) -> None:
        now = self.now
        depth_changed = False
        for cmd in commands:
            kind = type(cmd)
            if kind is ForwardTokens:
                ledger = self._tasks[cmd.task_id]
                if ledger.finished:
                    raise InvariantViolation(f"token for task {cmd.task_id} after its terminal event")
                if cmd.first_index != ledger.tokens_out:
                    raise InvariantViolation(f"task {cmd.task_id}: token index {cmd.first_index}, "
                                             f"expected {ledger.tokens_out}")
                if ledger.first_token_ms is None:
                    ledger.first_token_ms = now
                ledger.tokens_out += cmd.count
            elif kind is Dispatch:
                self._dispatch(cmd)
                depth_changed = True
            elif kind is Admitted:
                self._tasks[cmd.task_id].answered += 1
                depth_changed = True
            elif kind is Finish:
                ledger = self._tasks[cmd.task_id]
                self._stop_attempt(cmd.task_id)
                ledger.finished += 1
                if ledger.finished > 1:
                    raise InvariantViolation(f"task {cmd.task_id} finished twice")
                ledger.outcome = cmd.outcome.value
                ledger.reason = cmd.data.get("code") if cmd.kind == "error" else None
                ledger.end_ms = now
                depth_changed = True
            elif kind is CloseUpstream:
                self._stop_attempt(cmd.task_id)
            elif kind is Rejected:
                ledger = self._tasks[cmd.task_id]
                ledger.answered += 1
                ledger.outcome = "rejected"
                ledger.reason = cmd.code
                if cmd.code == "INVALID_PARAMS" and ledger.record.context_tokens >= self.config.ctx_max:
                    ledger.reason = PROMPT_OVER_CONTEXT
                ledger.end_ms = now
            # EmitEvent ("started") carries nothing the ledger does not already have
        if depth_changed:
            depth = len(self.core.admission)
            if depth != self._depth[-1][1]:
                if self._depth[-1][0] == now:
                    self._depth[-1] = (now, depth)
                else:
                    self._depth.append((now, depth))

    def _dispatch(self, cmd: Dispatch) -> None:
        ledger = self._tasks[cmd.task_id]
        if ledger.busy_since is not None:
            self._stop_attempt(cmd.task_id)
        pool = self.pools[cmd.pool_id]
        c = self.config
        now = self.now
        if ledger.start_ms is None:
            ledger.start_ms = now
        ledger.pool_id = cmd.pool_id
        ledger.busy_since = now
        pool.running.add(cmd.task_id)
        record = ledger.record
        ledger.tokens_planned = max(1, min(record.generated_tokens, c.ctx_max - record.context_tokens))
        ledger.cached_tokens = 0
        chain = record.hash_ids
        if chain and pool.cache is not None:
            ledger.slot, hit = pool.cache.admit(chain)
            # blocks are a share of the prompt (the last one partial): the share found is not computed again
            ledger.cached_tokens = min(record.context_tokens, record.context_tokens * hit // len(chain))
        prefill = c.prefill_ms_per_token * (record.context_tokens - ledger.cached_tokens)
        first = now + (c.first_token_ms + prefill) * pool.slow
        ledger.core_attempt = cmd.attempt
        ledger.tokens_sent = 0
        ledger.decode_from = first
        ledger.ms_per_token = 1000.0 / c.tokens_per_s * pool.slow
        self._push(first, _FIRST, (cmd.task_id, ledger.attempt))
        self._push(min(first + (ledger.tokens_planned - 1) * ledger.ms_per_token, first + c.progress_ms),
                   _END, (cmd.task_id, ledger.attempt))

    # -- results ------------------------------------------------------------------------------

    def _final_checks(self) -> None:
        self.core.check_invariants()
        if self.core.tasks:
            raise InvariantViolation(f"{len(self.core.tasks)} tasks never finished")
        for task_id, ledger in self._tasks.items():
            if ledger.answered != 1:
                raise InvariantViolation(f"task {task_id} got {ledger.answered} admission answers")
            if ledger.outcome != "rejected" and ledger.finished != 1:
                raise InvariantViolation(f"admitted task {task_id} finished {ledger.finished} times")
        for pool in self.pools.values():
            if pool.running:
                raise InvariantViolation(f"{pool.pool_id} still runs {sorted(pool.running)[:3]}")

    def _result(self, span: float) -> SimResult:
        tasks = []
        for task_id in sorted(self._tasks):
            ledger = self._tasks[task_id]
            tasks.append(TaskRecord(
                task_id=task_id, priority=ledger.priority.value, arrival_ms=ledger.record.arrival_ms,
                outcome=ledger.outcome or "unknown", reason=ledger.reason, pool_id=ledger.pool_id,
                start_ms=ledger.start_ms, first_token_ms=ledger.first_token_ms, end_ms=ledger.end_ms,
                tokens_out=ledger.tokens_out, prompt_tokens=ledger.record.context_tokens,
                cached_tokens=ledger.cached_tokens))
        config = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self.config).items()}
        return SimResult(
            trace_name=self.trace_name, seed=self.seed, config=config, tasks=tuple(tasks),
            queue_depth=tuple(self._depth), pool_busy_ms={p: round(v.busy_ms, 3) for p, v in sorted(self.pools.items())},
            pool_slots={p: self.config.slots_per_pool for p in sorted(self.pools)},
            duration_ms=max(self.now, span), faults=tuple(self._faults))
