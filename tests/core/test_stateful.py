"""A hypothesis state machine over the orchestrator: random event sequences, invariants after each.

Invariants: each submission gets one answer; each admitted task at most one terminal event (and
exactly one once everything is canceled at the end); no token after the terminal event; token
indices contiguous; leases equal running attempts; the queue never exceeds its bound; ``metrics``
events only for watched tasks, with at most one metrics timer per task.
"""

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from support import Ledger, pool, spec

from llama_orch.core.admission import QueuePolicy
from llama_orch.core.commands import Admitted, EmitEvent
from llama_orch.core.events import (
    DispatchFailed,
    PoolLost,
    PoolRemoved,
    PoolUpdated,
    StreamEnded,
    StreamFailed,
    TaskCanceled,
    TaskSubmitted,
    TaskWatched,
    Tick,
    TokensReceived,
)
from llama_orch.core.orchestrator import Orchestrator, OrchestratorConfig
from llama_orch.core.placement import Strategy
from llama_orch.core.task import TaskPhase
from llama_orch.core.types import PlacementMode, PlacementRequest, Priority

POOLS = ("pool-0", "pool-1", "pool-2")


class OrchestratorMachine(RuleBasedStateMachine):
    @initialize(policy=st.sampled_from(list(QueuePolicy)), strategy=st.sampled_from(list(Strategy)),
                capacity=st.integers(1, 6), attempts=st.integers(1, 3), seed=st.integers(0, 2**16),
                metrics=st.sampled_from([None, 100.0, 333.3]))
    def setup(self, policy, strategy, capacity, attempts, seed, metrics):
        self.core = Orchestrator(OrchestratorConfig(
            admission_capacity=capacity, admission_policy=policy, placement_strategy=strategy,
            max_attempts=attempts, first_token_timeout_ms=300.0, token_timeout_ms=200.0, pool_stale_ms=1_999.7,
            breaker_threshold=2, breaker_cooldown_ms=500.0, prior_service_ms=100.0, metrics_interval_ms=metrics),
            rng=random.Random(seed))
        self.run = Ledger(self.core)
        self.now = 0.0
        self.n = 0
        self.watched: set[str] = set()  # the model: live tasks someone reads
        self.checked = 0  # how much of the ledger's log the metrics check has seen
        for name in POOLS:
            self.run(PoolUpdated(snapshot=pool(name, slots_total=2, slots_free=2)), 0.0)

    def _running(self):
        return sorted(t for t, task in self.core.tasks.items() if task.phase is not TaskPhase.QUEUED)

    @rule(name=st.sampled_from(POOLS), what=st.sampled_from(["ready", "ready", "ready", "unready", "draining",
                                                            "lost", "removed"]), slots=st.integers(0, 3),
          vram=st.integers(0, 8))
    def pool_event(self, name, what, slots, vram):
        if what == "lost":
            self.run(PoolLost(pool_id=name), self.now)
        elif what == "removed":
            self.run(PoolRemoved(pool_id=name), self.now)
        else:
            self.run(PoolUpdated(snapshot=pool(name, ready=what != "unready", draining=what == "draining",
                                               slots_total=slots, slots_free=slots, vram_free_bytes=vram << 30)),
                     self.now)

    @rule(priority=st.sampled_from(list(Priority)), deadline=st.sampled_from([0, 400, 5_000, 60_000, 60_000]),
          pin=st.sampled_from([None, None, None, *POOLS]), session=st.integers(0, 3), count=st.integers(1, 3))
    def submit(self, priority, deadline, pin, session, count):
        placement = PlacementRequest(mode=PlacementMode.PIN, pin_pool_id=pin) if pin else PlacementRequest()
        for _ in range(count):
            self.n += 1
            self.run(TaskSubmitted(spec=spec(f"t{self.n}", priority=priority, deadline_ms=deadline,
                                             session_id=f"s{session}", placement=placement)), self.now)

    @precondition(lambda self: self.n > 0)
    @rule(data=st.data(), live=st.booleans())
    def cancel(self, data, live):
        if live and self.core.tasks:
            task_id = data.draw(st.sampled_from(sorted(self.core.tasks)))
        else:
            task_id = f"t{data.draw(st.integers(1, self.n))}"
        self.run(TaskCanceled(task_id=task_id), self.now)

    @precondition(lambda self: self.n > 0)
    @rule(data=st.data(), live=st.booleans(), watched=st.booleans())
    def watch(self, data, live, watched):
        if live and self.core.tasks:
            task_id = data.draw(st.sampled_from(sorted(self.core.tasks)))
        else:
            task_id = f"t{data.draw(st.integers(1, self.n))}"
        self.run(TaskWatched(task_id=task_id, watched=watched), self.now)
        if watched and task_id in self.core.tasks:
            self.watched.add(task_id)
        else:
            self.watched.discard(task_id)

    @precondition(lambda self: any(t.phase is not TaskPhase.QUEUED for t in self.core.tasks.values()))
    @rule(data=st.data(), count=st.integers(0, 3), stale=st.sampled_from([False, False, False, True]))
    def tokens(self, data, count, stale):
        task_id = data.draw(st.sampled_from(self._running()))
        attempt = self.core.task(task_id).attempts - (1 if stale else 0)
        self.run(TokensReceived(task_id=task_id, count=count, attempt=attempt), self.now)

    @precondition(lambda self: any(t.phase is not TaskPhase.QUEUED for t in self.core.tasks.values()))
    @rule(data=st.data(), how=st.sampled_from(["end", "stream_failed", "dispatch_failed"]))
    def finish_attempt(self, data, how):
        task_id = data.draw(st.sampled_from(self._running()))
        attempt = self.core.task(task_id).attempts
        event = {"end": StreamEnded, "stream_failed": StreamFailed, "dispatch_failed": DispatchFailed}[how]
        self.run(event(task_id=task_id, attempt=attempt), self.now)

    @rule(dt=st.one_of(st.sampled_from([1.0, 60.0, 250.0, 1_000.0]), st.floats(0.001, 1_500.0)))
    def advance(self, dt):
        self.now += dt
        deadline = self.core.next_deadline()
        while deadline is not None and deadline <= self.now:
            self.run(Tick(), deadline)
            deadline = self.core.next_deadline()
        self.run(Tick(), self.now)

    @invariant()
    def bounded_queue(self):
        if hasattr(self, "core"):
            assert len(self.core.admission.queue) <= self.core.admission.queue.capacity

    @invariant()
    def metrics_only_for_watched_tasks(self):
        if not hasattr(self, "core"):
            return
        log = self.run.log
        for cmd in log[self.checked:]:
            if isinstance(cmd, EmitEvent) and cmd.kind == "metrics":
                assert cmd.task_id in self.watched, f"metrics for unwatched {cmd.task_id}"
        self.checked = len(log)
        self.watched &= self.core.tasks.keys()  # an ended task is nobody's to read

    def teardown(self):
        if not hasattr(self, "core"):
            return
        for task_id in sorted(self.core.tasks):
            self.run(TaskCanceled(task_id=task_id, reason="shutdown"), self.now)
        admitted = {t for t, a in self.run.answers.items() if isinstance(a, Admitted)}
        assert admitted == set(self.run.finishes), "every admitted task ends in exactly one terminal event"
        assert not self.core.tasks and len(self.core.admission.queue) == 0
        for pool_id in self.core.placer.pool_ids():
            assert self.core.placer.leases(pool_id) == 0, f"slot leaked on {pool_id}"
        assert self.core.placer.free_total == sum(
            self.core.placer.snapshot(p).slots_total for p in self.core.placer.pool_ids() if self.core.placer.is_usable(p))


OrchestratorMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestOrchestratorMachine = OrchestratorMachine.TestCase
