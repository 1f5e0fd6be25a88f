"""Scenario tests for the orchestrator: each step's commands and the state after it."""

import random

import pytest
from support import Ledger, pool, spec

from llama_orch.core.admission import QueuePolicy
from llama_orch.core.commands import (
    Admitted,
    CloseUpstream,
    Dispatch,
    EmitEvent,
    Finish,
    ForwardTokens,
    Rejected,
)
from llama_orch.core.errors import UsageError
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
from llama_orch.core.sessions import BudgetPolicy
from llama_orch.core.task import TaskPhase
from llama_orch.core.types import Outcome, PlacementMode, PlacementRequest, Priority


def make(pools=("pool-a",), slots=1, **cfg):
    core = Orchestrator(OrchestratorConfig(**cfg), rng=random.Random(1))
    run = Ledger(core)
    for i, p in enumerate(pools):
        run(PoolUpdated(snapshot=pool(p, slots_total=slots, slots_free=slots, vram_free_bytes=(10 - i) << 30)), 0.0)
    return core, run


def only(out, kind):
    found = [c for c in out if isinstance(c, kind)]
    assert len(found) == 1, out
    return found[0]


def test_happy_path_emits_admitted_started_dispatch_tokens_end():
    core, run = make()
    out = run(TaskSubmitted(spec=spec("t1")), 10.0)
    assert [type(c) for c in out] == [Admitted, EmitEvent, Dispatch]
    assert out[0] == Admitted(task_id="t1", queue_position=0, predicted_start_ms=0, backoff_ms=0)
    assert out[1].kind == "started" and out[1].data["pool_id"] == "pool-a"
    assert out[2].pool_id == "pool-a" and out[2].attempt == 1 and out[2].engine_url.endswith("pool-a")
    assert core.task("t1").phase is TaskPhase.DISPATCHING
    assert core.placer.leases("pool-a") == 1
    assert run(TokensReceived(task_id="t1", count=2), 20.0) == (ForwardTokens(task_id="t1", first_index=0, count=2),)
    assert core.task("t1").phase is TaskPhase.STREAMING
    assert run(TokensReceived(task_id="t1", count=3), 30.0) == (ForwardTokens(task_id="t1", first_index=2, count=3),)
    end = only(run(StreamEnded(task_id="t1", tokens_out=5), 40.0), Finish)
    assert end.outcome is Outcome.COMPLETED and end.kind == "end"
    assert end.data["tokens_out"] == 5 and end.data["decode_ms"] == 20
    assert core.task("t1") is None and core.placer.leases("pool-a") == 0
    assert core.outcomes["completed"] == 1


def test_second_task_queues_then_dispatches_when_the_slot_frees():
    core, run = make()
    run(TaskSubmitted(spec=spec("t1")), 0.0)
    out = run(TaskSubmitted(spec=spec("t2")), 1.0)
    # the backoff is when t1 should end: the prior 2000 ms less the 1 ms it has run
    assert out == (Admitted(task_id="t2", queue_position=0, predicted_start_ms=2000, backoff_ms=1999),)
    assert core.queue_depth() == 1
    out = run(StreamEnded(task_id="t1"), 500.0)
    assert [type(c) for c in out] == [Finish, EmitEvent, Dispatch]
    assert out[2].task_id == "t2"
    # The measured service time (500 ms) replaces the 2000 ms prior in the next prediction.
    run(TaskSubmitted(spec=spec("t3")), 501.0)
    assert run.answers["t3"].predicted_start_ms == 500


def test_interactive_overtakes_batch_in_the_queue():
    core, run = make()
    run(TaskSubmitted(spec=spec("busy")), 0.0)
    run(TaskSubmitted(spec=spec("b1", priority=Priority.BATCH)), 1.0)
    run(TaskSubmitted(spec=spec("i1")), 2.0)
    assert run.answers["i1"].queue_position == 0 and run.answers["b1"].queue_position == 0
    out = run(StreamEnded(task_id="busy"), 3.0)
    assert only(out, Dispatch).task_id == "i1"


def test_cancel_while_queued_finishes_once_with_canceled_end():
    core, run = make()
    run(TaskSubmitted(spec=spec("t1")), 0.0)
    run(TaskSubmitted(spec=spec("t2")), 0.0)
    out = run(TaskCanceled(task_id="t2"), 1.0)
    fin = only(out, Finish)
    assert fin.outcome is Outcome.CANCELED and fin.data["canceled"] is True and fin.kind == "end"
    assert not [c for c in out if isinstance(c, CloseUpstream)]
    assert core.queue_depth() == 0
    assert run(TaskCanceled(task_id="t2"), 2.0) == ()  # idempotent


def test_cancel_while_streaming_closes_upstream_and_drops_later_tokens():
    core, run = make()
    run(TaskSubmitted(spec=spec("t1")), 0.0)
    run(TokensReceived(task_id="t1", count=1), 5.0)
    out = run(TaskCanceled(task_id="t1", reason="disconnect"), 6.0)
    assert [type(c) for c in out] == [CloseUpstream, Finish]
    assert out[1].data == {"tokens_out": 1, "decode_ms": 1, "decode_time_ms": 1, "canceled": True, "reason": "disconnect"}
    assert core.placer.leases("pool-a") == 0
    # Tokens already in flight from the engine are dropped, not forwarded.
    assert run(TokensReceived(task_id="t1", count=4), 7.0) == ()
    assert run(StreamEnded(task_id="t1"), 8.0) == ()


def test_reject_policy_answers_429_with_retry_after_from_the_drain_rate():
    core, run = make(admission_capacity=1)
    run(TaskSubmitted(spec=spec("t1")), 0.0)
    run(TaskSubmitted(spec=spec("t2")), 0.0)
    rej = only(run(TaskSubmitted(spec=spec("t3")), 0.0), Rejected)
    assert (rej.http_status, rej.code, rej.policy_label, rej.retriable) == (429, "ADMISSION_REJECT", "reject", True)
    assert rej.retry_after_ms == 2000  # prior service time over one slot
    assert core.rejections["ADMISSION_REJECT"] == 1


def test_backoff_hints_come_from_the_work_in_flight_not_from_past_short_tasks():
    # After a run of 1-token tasks, a queue full of 15 s tasks once answered 429 with a 4 ms hint.
    core, run = make(slots=2, admission_capacity=4)
    now = 0.0
    for i in range(20):  # short tasks: 2 ms to the first token, 1 token, 3 ms in all
        tid = f"short-{i}"
        run(TaskSubmitted(spec=spec(tid, max_tokens=1)), now)
        run(TokensReceived(task_id=tid, count=1), now + 2)
        run(StreamEnded(task_id=tid, tokens_out=1), now + 3)
        now += 10
    for i in range(20):  # a few tasks decoding at 10 ms per token teach the per-token cost
        tid = f"calib-{i}"
        run(TaskSubmitted(spec=spec(tid, max_tokens=10)), now)
        run(TokensReceived(task_id=tid, count=1), now + 2)
        run(TokensReceived(task_id=tid, count=9), now + 92)
        run(StreamEnded(task_id=tid, tokens_out=10), now + 92)
        now += 100
    assert core.admission.estimator.retry_after_ms(2) < 100  # the old hint: the average of past tasks
    # Two long tasks start (1500 tokens each: 15 s at 10 ms per token); four more fill the queue.
    for i in range(6):
        run(TaskSubmitted(spec=spec(f"long-{i}", max_tokens=1500, deadline_ms=600_000)), now)
    for i in range(2):
        run(TokensReceived(task_id=f"long-{i}", count=1), now + 2)
        run(TokensReceived(task_id=f"long-{i}", count=99), now + 1002)  # 1 s in, 100 tokens out
    now += 1002
    rejected = only(run(TaskSubmitted(spec=spec("late", max_tokens=1500, deadline_ms=600_000)), now), Rejected)
    assert rejected.http_status == 429
    # 1400 tokens left at 10 ms each: about 14 s until a slot frees and the queue moves
    assert 12_000 <= rejected.retry_after_ms <= 16_000, rejected.retry_after_ms
    # and a task admitted behind running work is never promised a start before that
    _, run = make(slots=1, admission_capacity=4, metrics_interval_ms=1000)
    run(TaskSubmitted(spec=spec("calib", max_tokens=10)), 0.0)
    run(TokensReceived(task_id="calib", count=1), 2.0)
    run(TokensReceived(task_id="calib", count=9), 92.0)
    run(StreamEnded(task_id="calib", tokens_out=10), 92.0)
    run(TaskSubmitted(spec=spec("long", max_tokens=1000, deadline_ms=600_000)), 100.0)
    admitted = only(run(TaskSubmitted(spec=spec("next", max_tokens=5, deadline_ms=600_000)), 101.0), Admitted)
    assert admitted.predicted_start_ms >= 9_000 and admitted.backoff_ms >= 9_000, admitted
    # and its metrics events keep telling it the same: to a reader joining now, and a second later
    joined = only(run(TaskWatched(task_id="next", watched=True), 101.0), EmitEvent)
    assert joined.kind == "metrics" and joined.data["predicted_start_ms"] >= 9_000, joined
    progress = [c.data for c in run(Tick(), 1101.0) if isinstance(c, EmitEvent) and c.task_id == "next"]
    assert progress and progress[0]["predicted_start_ms"] >= 8_000, progress


def test_drop_lru_evicts_oldest_batch_and_admits_the_newcomer():
    core, run = make(admission_capacity=2, admission_policy=QueuePolicy.DROP_LRU)
    run(TaskSubmitted(spec=spec("busy")), 0.0)
    run(TaskSubmitted(spec=spec("b-old", priority=Priority.BATCH)), 1.0)
    run(TaskSubmitted(spec=spec("b-new", priority=Priority.BATCH)), 2.0)
    out = run(TaskSubmitted(spec=spec("i1")), 3.0)
    assert isinstance(out[0], Admitted)
    fin = only(out, Finish)
    assert fin.task_id == "b-old" and fin.outcome is Outcome.EVICTED and fin.kind == "error"
    assert fin.data["code"] == "QUEUE_FULL_DROP_LRU" and fin.data["retriable"] is True
    assert list(core.admission.queue) == ["i1", "b-new"]


def test_drop_lru_never_lets_batch_evict_interactive():
    core, run = make(admission_capacity=1, admission_policy=QueuePolicy.DROP_LRU)
    run(TaskSubmitted(spec=spec("busy")), 0.0)
    run(TaskSubmitted(spec=spec("i1")), 1.0)
    rej = only(run(TaskSubmitted(spec=spec("b1", priority=Priority.BATCH)), 2.0), Rejected)
    assert (rej.http_status, rej.code, rej.policy_label) == (429, "QUEUE_FULL_DROP_LRU", "drop-lru")
    out = run(TaskSubmitted(spec=spec("i2")), 3.0)
    assert only(out, Finish).task_id == "i1"


def test_deadline_checks_at_the_door():
    core, run = make()
    rej = only(run(TaskSubmitted(spec=spec("t0", deadline_ms=0)), 0.0), Rejected)
    assert (rej.http_status, rej.code) == (400, "DEADLINE_UNMET")
    run(TaskSubmitted(spec=spec("t1")), 0.0)
    rej = only(run(TaskSubmitted(spec=spec("t2", deadline_ms=1000)), 0.0), Rejected)
    assert rej.code == "DEADLINE_UNMET" and "predicted start in 2000 ms" in rej.message


def test_queued_task_past_its_deadline_fails_with_deadline_unmet():
    core, run = make(prior_service_ms=100.0)
    run(TaskSubmitted(spec=spec("t1")), 0.0)
    run(TaskSubmitted(spec=spec("t2", deadline_ms=500)), 0.0)
    assert core.next_deadline() == 500.0
    assert run(Tick(), 499.0) == ()
    fin = only(run(Tick(), 500.0), Finish)
    assert fin.task_id == "t2" and fin.data["code"] == "DEADLINE_UNMET" and fin.outcome is Outcome.FAILED
    assert core.queue_depth() == 0


def test_between_token_timeout_fails_the_stream_and_closes_upstream():
    core, run = make(token_timeout_ms=100.0)
    run(TaskSubmitted(spec=spec("t1")), 0.0)
    run(TokensReceived(task_id="t1", count=1), 10.0)
    run(TokensReceived(task_id="t1", count=1), 90.0)
    assert run(Tick(), 110.0) == ()  # the timer re-arms from the last token
    out = run(Tick(), 190.0)
    assert [type(c) for c in out] == [CloseUpstream, Finish]
    assert out[1].data["code"] == "DECODE_TIMEOUT"


def test_retry_before_first_token_goes_to_another_pool():
    core, run = make(pools=("pool-a", "pool-b"))
    out = run(TaskSubmitted(spec=spec("t1")), 0.0)
    first = only(out, Dispatch).pool_id
    out = run(DispatchFailed(task_id="t1", code="WORKER_RESET", message="connection refused"), 5.0)
    again = only(out, Dispatch)
    assert again.pool_id != first and again.attempt == 2 and again.kv_warmth is False
    # the client hears where the task runs now: a `started` of the retry, naming the other pool
    (started,) = [c for c in out if isinstance(c, EmitEvent)]
    assert started.kind == "started" and started.data["pool_id"] == again.pool_id and started.data["attempt"] == 2
    assert core.placer.leases(first) == 0 and core.placer.leases(again.pool_id) == 1


def test_retries_are_bounded_and_end_in_replica_exhausted():
    core, run = make(pools=("pool-a", "pool-b", "pool-c"), max_attempts=2)
    run(TaskSubmitted(spec=spec("t1")), 0.0)
    run(StreamFailed(task_id="t1", message="reset"), 1.0)
    fin = only(run(StreamFailed(task_id="t1", message="reset"), 2.0), Finish)
    assert fin.data["code"] == "REPLICA_EXHAUSTED" and fin.outcome is Outcome.FAILED
    assert all(core.placer.leases(p) == 0 for p in ("pool-a", "pool-b", "pool-c"))


def test_single_pool_failure_before_first_token_requeues_until_the_pool_returns():
    core, run = make()
    run(TaskSubmitted(spec=spec("t1")), 0.0)
    out = run(PoolLost(pool_id="pool-a", reason="poll timeout"), 1.0)
    assert [type(c) for c in out] == [CloseUpstream]
    assert core.task("t1").phase is TaskPhase.QUEUED
    out = run(PoolUpdated(snapshot=pool("pool-a", slots_total=1, slots_free=1)), 2.0)
    assert only(out, Dispatch).attempt == 2


def test_pool_lost_mid_stream_is_a_worker_reset_error():
    core, run = make(pools=("pool-a", "pool-b"))
    run(TaskSubmitted(spec=spec("t1")), 0.0)
    pool_id = only(run.log, Dispatch).pool_id
    run(TokensReceived(task_id="t1", count=3), 1.0)
    fin = only(run(PoolLost(pool_id=pool_id), 2.0), Finish)
    assert fin.kind == "error" and fin.data["code"] == "WORKER_RESET" and "after 3 tokens" in fin.data["message"]


def test_pool_removed_forgets_the_pool():
    core, run = make(pools=("pool-a", "pool-b"))
    run(PoolRemoved(pool_id="pool-b"), 1.0)
    assert core.placer.pool_ids() == ["pool-a"]


def test_first_token_timeout_retries_elsewhere():
    core, run = make(pools=("pool-a", "pool-b"), first_token_timeout_ms=50.0)
    run(TaskSubmitted(spec=spec("t1")), 0.0)
    out = run(Tick(), 50.0)
    assert isinstance(out[0], CloseUpstream) and only(out, Dispatch).attempt == 2


def test_repeated_failures_open_the_pools_breaker_until_cooldown():
    core, run = make(pools=("pool-a", "pool-b"), breaker_threshold=2, breaker_cooldown_ms=1000.0, max_attempts=1)
    for i in range(2):
        run(TaskSubmitted(spec=spec(f"t{i}", placement=PlacementRequest(mode=PlacementMode.PIN, pin_pool_id="pool-a"))), i)
        run(DispatchFailed(task_id=f"t{i}"), i + 0.5)
    assert not core.placer.is_usable("pool-a")
    rej = only(run(TaskSubmitted(spec=spec("t9", placement=PlacementRequest(mode=PlacementMode.PIN, pin_pool_id="pool-a"))), 10.0), Rejected)
    assert rej.code == "POOL_UNREADY" and "breaker open" in rej.message
    run(Tick(), 1001.5)
    assert core.placer.is_usable("pool-a")


def test_one_engine_crash_is_one_failure_for_the_pools_breaker_however_many_tasks_it_ran():
    core, run = make(pools=("pool-a", "pool-b"), slots=4, breaker_threshold=2)
    pin = PlacementRequest(mode=PlacementMode.PIN, pin_pool_id="pool-a")
    for i in range(3):  # three streams running on pool-a when its engine crashes
        run(TaskSubmitted(spec=spec(f"t{i}", placement=pin)), i)
        run(TokensReceived(task_id=f"t{i}", count=1), i + 0.5)
    for i in range(3):
        run(StreamFailed(task_id=f"t{i}", message="engine gone"), 10.0 + i * 0.01)
    assert core.placer.is_usable("pool-a")  # one incident, below the threshold of two
    # a task sent after that incident failing too is a second incident: the breaker opens
    run(TaskSubmitted(spec=spec("t9", placement=pin)), 11.0)
    run(StreamFailed(task_id="t9", message="engine gone again"), 12.0)
    assert not core.placer.is_usable("pool-a")


def test_a_new_engine_closes_the_breaker_its_crashed_predecessor_opened():
    """The provisioner restarts a crashed engine in about a second, on another port: the pool's
    next ready snapshot naming that new engine closes the breaker at once (seen on the lab: a
    crash kept its pool out for the whole 10 s cooldown). The same engine does not."""
    core, run = make(pools=("pool-a", "pool-b"), breaker_threshold=1, breaker_cooldown_ms=10_000.0, max_attempts=1)
    pin = PlacementRequest(mode=PlacementMode.PIN, pin_pool_id="pool-a")
    run(TaskSubmitted(spec=spec("t1", placement=pin)), 0.0)
    run(StreamFailed(task_id="t1", message="engine gone"), 1.0)
    assert not core.placer.is_usable("pool-a")
    old_url = core.placer.snapshot("pool-a").engine_url
    run(PoolUpdated(snapshot=pool("pool-a", ready=False, engine_url=None)), 1.5)  # restarting
    run(PoolUpdated(snapshot=pool("pool-a", engine_url=old_url)), 2.0)  # the same engine, ready again
    assert not core.placer.is_usable("pool-a")
    run(PoolUpdated(snapshot=pool("pool-a", engine_url="http://10.0.0.1:41001")), 2.5)  # a new one
    assert core.placer.is_usable("pool-a")
    out = run(TaskSubmitted(spec=spec("t2", placement=pin)), 3.0)
    assert only(out, Dispatch).pool_id == "pool-a"


def test_a_failure_on_an_engine_already_replaced_does_not_count_against_the_new_one():
    """A stalled engine is replaced by the provisioner while its streams wait out their timeouts:
    those failures are the old engine's, and must not open the breaker over its healthy successor."""
    core, run = make(pools=("pool-a", "pool-b"), slots=2, breaker_threshold=1, max_attempts=1)
    pin = PlacementRequest(mode=PlacementMode.PIN, pin_pool_id="pool-a")
    run(TaskSubmitted(spec=spec("t1", placement=pin)), 0.0)
    run(PoolUpdated(snapshot=pool("pool-a", engine_url="http://10.0.0.1:41001")), 1.0)  # a new engine
    run(StreamFailed(task_id="t1", message="old engine silent"), 2.0)
    assert core.placer.is_usable("pool-a")
    run(TaskSubmitted(spec=spec("t2", placement=pin)), 3.0)  # on the new engine: its failure counts
    run(StreamFailed(task_id="t2", message="new engine broken too"), 4.0)
    assert not core.placer.is_usable("pool-a")


def test_stale_pool_stops_receiving_tasks_until_the_next_snapshot():
    core, run = make(pool_stale_ms=100.0)
    run(Tick(), 100.0)
    rej = only(run(TaskSubmitted(spec=spec("t1")), 101.0), Rejected)
    assert (rej.http_status, rej.code) == (503, "POOL_UNREADY") and rej.retry_after_ms >= 1
    run(PoolUpdated(snapshot=pool("pool-a", slots_total=1, slots_free=1)), 102.0)
    assert isinstance(run(TaskSubmitted(spec=spec("t2")), 103.0)[0], Admitted)


def test_door_checks_unknown_model_pin_ctx_duplicate_budget():
    core, run = make(budgets=BudgetPolicy(tokens=20))
    assert only(run(TaskSubmitted(spec=spec(model_ref="hf:none/x.gguf")), 0), Rejected).http_status == 503
    pin = PlacementRequest(mode=PlacementMode.PIN, pin_pool_id="nope")
    rej = only(run(TaskSubmitted(spec=spec(placement=pin)), 0), Rejected)
    assert (rej.http_status, rej.code) == (400, "INVALID_PARAMS") and "nope" in rej.message
    rej = only(run(TaskSubmitted(spec=spec(ctx=10_000)), 0), Rejected)
    assert rej.code == "INVALID_PARAMS" and "4096" in rej.message
    run(TaskSubmitted(spec=spec("dup")), 0)
    # A second submission with a live task's id is refused and leaves the first task alone.
    assert only(core.handle(TaskSubmitted(spec=spec("dup")), 0), Rejected).code == "INVALID_PARAMS"
    assert core.task("dup") is not None
    rej = only(run(TaskSubmitted(spec=spec(max_tokens=30, session_id="s-2")), 0), Rejected)
    assert "budget" in rej.message


def test_session_budget_counts_tokens_actually_produced():
    core, run = make(budgets=BudgetPolicy(tokens=10))
    run(TaskSubmitted(spec=spec("t1", max_tokens=8)), 0)
    run(TokensReceived(task_id="t1", count=8), 1)
    run(StreamEnded(task_id="t1"), 2)
    assert only(run(TaskSubmitted(spec=spec("t2", max_tokens=8)), 3), Rejected).code == "INVALID_PARAMS"
    assert isinstance(run(TaskSubmitted(spec=spec("t3", max_tokens=2)), 4)[0], Admitted)


def test_session_affinity_and_kv_warmth_after_failover():
    core, run = make(pools=("pool-a", "pool-b"), slots=2)
    run(TaskSubmitted(spec=spec("t1", session_id="s")), 0)
    first = only(run.log, Dispatch).pool_id
    run(StreamEnded(task_id="t1"), 1)
    out = run(TaskSubmitted(spec=spec("t2", session_id="s")), 2)
    assert only(out, Dispatch).pool_id == first and only(out, Dispatch).kv_warmth is True
    run(StreamEnded(task_id="t2"), 3)
    run(PoolLost(pool_id=first), 4)
    out = run(TaskSubmitted(spec=spec("t3", session_id="s")), 5)
    assert only(out, Dispatch).pool_id != first and only(out, Dispatch).kv_warmth is False


def test_unknown_event_is_misuse():
    core, _ = make()
    with pytest.raises(UsageError):
        core.handle(object(), 0.0)  # type: ignore[arg-type]


def test_round_robin_spreads_tasks():
    core, run = make(pools=("pool-a", "pool-b", "pool-c"), slots=4, placement_strategy=Strategy.ROUND_ROBIN)
    for i in range(6):
        run(TaskSubmitted(spec=spec(f"t{i}", session_id=f"s{i}")), i)
    assert [d.pool_id for d in run.of(Dispatch)] == ["pool-a", "pool-b", "pool-c"] * 2


@pytest.mark.timeout(20)
def test_staleness_timer_fires_once_whatever_the_float_rounding():
    # since + stale_ms - since < stale_ms for these two: the timer must still go off, not re-arm forever.
    since, stale = 495435.087091941, 17613.548957746607
    assert (since + stale) - since < stale
    core, run = make(pool_stale_ms=stale)
    run(PoolUpdated(snapshot=pool("pool-a", slots_total=1, slots_free=1)), since)
    run(Tick(), core.next_deadline())  # the timer armed by the first snapshot re-arms from `since`
    assert core.placer.is_usable("pool-a") and core.next_deadline() == since + stale
    run(Tick(), since + stale)
    assert not core.placer.is_usable("pool-a") and core.next_deadline() is None


def test_concurrent_tasks_of_one_session_cannot_overspend_tokens_together():
    core, run = make(slots=4, budgets=BudgetPolicy(tokens=20))
    assert isinstance(run(TaskSubmitted(spec=spec("t1", max_tokens=12)), 0)[0], Admitted)
    # t1 has produced nothing yet, but its 12 are reserved: 12 + 12 > 20.
    rej = only(run(TaskSubmitted(spec=spec("t2", max_tokens=12)), 1), Rejected)
    assert rej.code == "INVALID_PARAMS" and "reserved" in rej.message
    run(TokensReceived(task_id="t1", count=3), 2)
    run(StreamEnded(task_id="t1"), 3)  # ended early: only 3 charged, the reservation is released
    view = core.sessions.view("s-1")
    assert (view["tokens_used"], view["tokens_remaining"]) == (3, 17)
    assert isinstance(run(TaskSubmitted(spec=spec("t2", max_tokens=12)), 4)[0], Admitted)


def test_time_budget_gates_new_tasks_once_spent():
    core, run = make(budgets=BudgetPolicy(time_ms=100))
    run(TaskSubmitted(spec=spec("t1")), 0)
    run(TokensReceived(task_id="t1", count=1), 50)
    run(StreamEnded(task_id="t1"), 120)  # 120 ms of engine time
    view = core.sessions.view("s-1")
    assert (view["time_used_ms"], view["time_remaining_ms"]) == (120, 0)
    rej = only(run(TaskSubmitted(spec=spec("t2")), 130), Rejected)
    assert rej.code == "INVALID_PARAMS" and "time budget" in rej.message
    assert isinstance(run(TaskSubmitted(spec=spec("t3", session_id="other")), 131)[0], Admitted)


def test_cost_budget_prices_prompt_and_output_tokens():
    policy = BudgetPolicy(cost=1.0, cost_per_1k_prompt_tokens=100.0, cost_per_1k_output_tokens=200.0)
    core, run = make(budgets=policy)
    # worst case: 2 prompt tokens (0.2) + 4 output tokens (0.8) = 1.0: exactly affordable
    assert isinstance(run(TaskSubmitted(spec=spec("t1", prompt_tokens=2, max_tokens=4)), 0)[0], Admitted)
    run(TokensReceived(task_id="t1", count=1), 1)
    run(StreamEnded(task_id="t1"), 2)
    view = core.sessions.view("s-1")
    assert view["cost_used"] == pytest.approx(0.4) and view["cost_remaining"] == pytest.approx(0.6)
    rej = only(run(TaskSubmitted(spec=spec("t2", prompt_tokens=2, max_tokens=4)), 3), Rejected)
    assert "cost budget" in rej.message
    assert isinstance(run(TaskSubmitted(spec=spec("t3", prompt_tokens=2, max_tokens=2)), 4)[0], Admitted)


def test_canceled_queued_task_costs_nothing():
    core, run = make(slots=1, budgets=BudgetPolicy(tokens=10, cost=1.0, cost_per_1k_prompt_tokens=100.0))
    run(TaskSubmitted(spec=spec("busy", session_id="x", max_tokens=1)), 0)
    run(TaskSubmitted(spec=spec("t1", prompt_tokens=5, max_tokens=8)), 0)
    assert core.task("t1").phase is TaskPhase.QUEUED
    run(TaskCanceled(task_id="t1", reason="client"), 1)
    view = core.sessions.view("s-1")
    assert (view["tokens_used"], view["cost_used"], view["time_used_ms"]) == (0, 0.0, 0)
    assert core.sessions.refusal(spec("t2", prompt_tokens=5, max_tokens=8)) is None


def test_metrics_events_report_position_rate_and_on_time_probability():
    core, run = make(slots=1, metrics_interval_ms=1000, budgets=BudgetPolicy(tokens=1000),
                     prior_service_ms=2000)
    run(TaskSubmitted(spec=spec("a", max_tokens=100, deadline_ms=60_000)), 0)
    run(TaskSubmitted(spec=spec("b", max_tokens=100, deadline_ms=60_000)), 0)
    run(TaskSubmitted(spec=spec("c", max_tokens=100, deadline_ms=5_000)), 0)
    assert run(TaskWatched(task_id="a", watched=True), 0) == ()  # running: its frames say enough until the tick
    for task_id in "bc":  # queued: where it stands, at once
        joined = only(run(TaskWatched(task_id=task_id, watched=True), 0), EmitEvent)
        assert joined.kind == "metrics" and joined.task_id == task_id
    run(TokensReceived(task_id="a", count=10), 400)
    assert core.next_deadline() == 1000
    out = run(Tick(), 1000)
    frames = {c.task_id: c.data for c in out if isinstance(c, EmitEvent) and c.kind == "metrics"}
    assert set(frames) == {"a", "b", "c"}
    a, b, c = frames["a"], frames["b"], frames["c"]
    assert a["phase"] == "streaming" and a["tokens_out"] == 10 and a["tokens_per_s"] == pytest.approx(16.7, abs=0.1)
    assert a["silent_ms"] == 600  # the last token came at 400 ms: the engine has been silent since
    assert a["budget"] == {"tokens_remaining": 700}  # 3 tasks x 100 reserved
    assert (b["phase"], b["queue_position"], c["queue_position"]) == ("queued", 0, 1)
    assert b["predicted_start_ms"] < c["predicted_start_ms"]
    # c needs about 3 service times of 2 s (two waits and its own) with 4 s left; b has a minute.
    assert c["on_time_probability"] < 0.5 < 0.9 < b["on_time_probability"]
    run(StreamEnded(task_id="a"), 1500)
    assert core.next_deadline() == 2000  # re-armed for the live ones only
    out = run(Tick(), 2000)
    assert {c.task_id for c in out if isinstance(c, EmitEvent) and c.kind == "metrics"} == {"b", "c"}


def test_no_metrics_events_unless_configured():
    core, run = make(slots=1)
    run(TaskSubmitted(spec=spec("a")), 0)
    assert run(TaskWatched(task_id="a", watched=True), 0) == ()
    deadline = core.next_deadline()
    assert deadline is not None and deadline > 1000  # only the first-token timer and the task deadline


def metrics_of(out, task_id=None):
    return [c.data for c in out if isinstance(c, EmitEvent) and c.kind == "metrics"
            and (task_id is None or c.task_id == task_id)]


def metrics_timers(core, task_id=None):
    return [t for t in core._timers if t[2] == 5 and (task_id is None or t[3] == task_id)]  # 5: _METRICS


def queued_behind_a_busy_slot(n, **cfg):
    core, run = make(slots=1, metrics_interval_ms=1000, admission_capacity=n + 10, **cfg)
    run(TaskSubmitted(spec=spec("busy", max_tokens=100, deadline_ms=10_000_000)), 0)
    for i in range(n):
        run(TaskSubmitted(spec=spec(f"q{i}", max_tokens=10, deadline_ms=10_000_000)), 0)
    return core, run


def test_unwatched_queued_tasks_get_no_metrics_and_no_timers():
    core, run = queued_behind_a_busy_slot(50)
    assert metrics_timers(core) == []
    assert core.next_deadline() == 15_000  # the pool's staleness check, not 50 tasks' metrics
    for now in range(1000, 50_001, 1000):
        assert metrics_of(run(Tick(), now)) == []
    assert metrics_of(run.log) == []


def test_watching_gives_metrics_at_once_then_every_interval_until_unwatched():
    core, run = queued_behind_a_busy_slot(5)
    joined = metrics_of(run(TaskWatched(task_id="q3", watched=True), 250), "q3")
    assert len(joined) == 1 and joined[0]["phase"] == "queued" and joined[0]["queue_position"] == 3
    assert core.next_deadline() == 1250
    assert metrics_of(run(Tick(), 1249)) == []
    assert [m["queue_position"] for m in metrics_of(run(Tick(), 1250))] == [3]
    run(TaskCanceled(task_id="q0"), 1300)  # a task ahead leaves from the middle of the queue
    assert [m["queue_position"] for m in metrics_of(run(Tick(), 2250))] == [2]
    assert run(TaskWatched(task_id="q3", watched=True), 2300) == ()  # a second reader: nothing new
    assert len(metrics_timers(core, "q3")) == 1
    assert run(TaskWatched(task_id="q3", watched=False), 2400) == ()
    assert metrics_of(run(Tick(), 3250)) == []  # lapsed, not re-armed
    assert metrics_timers(core) == [] and core.next_deadline() == 15_000  # the pool's staleness check
    # the busy task ends: q1 (now first) starts, and a reader of q3 sees it one place closer
    run(StreamEnded(task_id="busy"), 3500)
    assert [m["queue_position"] for m in metrics_of(run(TaskWatched(task_id="q3", watched=True), 3600))] == [1]


def test_watch_for_unknown_or_finished_tasks_is_ignored():
    core, run = queued_behind_a_busy_slot(2)
    assert run(TaskWatched(task_id="nope", watched=True), 10) == ()
    run(TaskWatched(task_id="q1", watched=True), 10)
    run(TaskCanceled(task_id="q1"), 20)
    assert run(TaskWatched(task_id="q1", watched=True), 30) == ()
    assert run(TaskWatched(task_id="q1", watched=False), 40) == ()
    assert metrics_of(run(Tick(), 5000)) == []
    assert core._watched == set() and core._metrics_due == {} and metrics_timers(core) == []


def test_watched_task_gets_metrics_through_its_phases_and_none_after_the_end():
    core, run = make(slots=1, metrics_interval_ms=1000)
    run(TaskSubmitted(spec=spec("t", max_tokens=100, deadline_ms=600_000)), 0)
    assert metrics_of(run(TaskWatched(task_id="t", watched=True), 0)) == []  # running: none at once
    assert [m["phase"] for m in metrics_of(run(Tick(), 1000))] == ["dispatching"]
    run(TokensReceived(task_id="t", count=5), 1500)
    assert [m["phase"] for m in metrics_of(run(Tick(), 2000))] == ["streaming"]
    run(StreamEnded(task_id="t"), 2500)
    assert metrics_of(run(Tick(), 3000)) == [] and metrics_timers(core) == []


def test_toggling_watch_keeps_one_metrics_timer_and_the_interval():
    core, run = queued_behind_a_busy_slot(3)
    now = 0.0
    heap_sizes = set()
    for i in range(1000):  # across several intervals, so timers fire, lapse and re-arm in between
        now += 7
        run(TaskWatched(task_id="q2", watched=True), now)
        run(Tick(), now)
        run(TaskWatched(task_id="q2", watched=False), now + i % 3)
        run(Tick(), now + i % 3)
        assert len(metrics_timers(core)) <= 1
        heap_sizes.add(len(core._timers))
    # the tasks' deadlines (4), busy's first-token timeout, the pool's staleness check, one metrics timer
    assert max(heap_sizes) <= 4 + 1 + 1 + 1, heap_sizes
    now += 3
    # watched again: one event now, the next a full interval later, though the old timer is due sooner
    assert len(metrics_of(run(TaskWatched(task_id="q2", watched=True), now))) == 1
    assert metrics_of(run(Tick(), now + 999)) == []
    assert len(metrics_timers(core, "q2")) == 1
    assert len(metrics_of(run(Tick(), now + 1000))) == 1
    assert len(metrics_timers(core, "q2")) == 1


def test_a_reused_task_id_inherits_no_watch_and_at_most_one_metrics_timer():
    core, run = queued_behind_a_busy_slot(2)
    run(TaskWatched(task_id="q1", watched=True), 100)  # its timer is due at 1100
    run(TaskCanceled(task_id="q1"), 200)

    def handle(event, now):  # not the ledger: it rightly refuses a second answer for an id
        out = core.handle(event, now)
        core.check_invariants()
        return out

    handle(TaskSubmitted(spec=spec("q1", max_tokens=10, deadline_ms=10_000_000)), 300)
    assert metrics_of(handle(Tick(), 1100)) == []  # the new q1 is nobody's to read yet
    assert len(metrics_of(handle(TaskWatched(task_id="q1", watched=True), 1200))) == 1
    assert len(metrics_timers(core, "q1")) == 1  # due at 2200
    # ended and resubmitted again, now watched before the old timer comes off the heap
    handle(TaskCanceled(task_id="q1"), 1300)
    handle(TaskSubmitted(spec=spec("q1", max_tokens=10, deadline_ms=10_000_000)), 1350)
    assert [m["queue_position"] for m in metrics_of(handle(TaskWatched(task_id="q1", watched=True), 1400))] == [1]
    assert len(metrics_timers(core, "q1")) == 1
    assert metrics_of(handle(Tick(), 2200)) == []  # a full interval after the watch, not the old time
    assert [m["queue_position"] for m in metrics_of(handle(Tick(), 2400))] == [1]
    assert len(metrics_timers(core, "q1")) == 1


def test_positions_come_from_the_queue_in_service_order():
    core, run = make(slots=1, metrics_interval_ms=1000, admission_capacity=5000)
    run(TaskSubmitted(spec=spec("busy", max_tokens=100, deadline_ms=10_000_000)), 0)
    for i in range(3000):  # deeper than the old 1024-task scan
        priority = Priority.BATCH if i % 3 else Priority.INTERACTIVE
        run.core.handle(TaskSubmitted(spec=spec(f"q{i}", priority=priority, max_tokens=10,
                                                deadline_ms=10_000_000)), 0)
    for i in range(0, 3000, 7):  # cancels from the middle of both classes
        core.handle(TaskCanceled(task_id=f"q{i}"), 1)
    expected = list(core.admission.queue)  # service order: interactive, then batch
    for task_id in (expected[0], expected[1], expected[500], expected[-2], expected[-1]):
        data = metrics_of(core.handle(TaskWatched(task_id=task_id, watched=True), 2))
        assert data[0]["queue_position"] == expected.index(task_id), task_id


def test_an_engine_refusing_the_request_ends_the_task_without_retry_or_breaker():
    core, run = make(pools=("pool-a", "pool-b"), breaker_threshold=1)
    run(TaskSubmitted(spec=spec("t1")), 0)
    pool_id = only(run.log, Dispatch).pool_id
    out = run(DispatchFailed(task_id="t1", attempt=1, code="INVALID_PARAMS", message="prompt exceeds the context"), 1)
    fin = only(out, Finish)
    assert fin.kind == "error" and fin.data["code"] == "INVALID_PARAMS" and fin.data["retriable"] is False
    assert not any(isinstance(c, Dispatch) for c in out)  # not retried on the other pool
    assert core.placer.is_usable(pool_id) and core.placer.leases(pool_id) == 0  # its breaker did not open


def test_a_requeued_task_waits_for_news_of_the_pool_it_failed_on():
    core, run = make(pools=("pool-a", "pool-b"))
    run(TaskSubmitted(spec=spec("busy", placement=PlacementRequest(mode=PlacementMode.PIN, pin_pool_id="pool-b"))), 0)
    run(TaskSubmitted(spec=spec("t1")), 0)
    assert core.task("t1").pool_id == "pool-a"
    out = run(DispatchFailed(task_id="t1", attempt=1, code="WORKER_RESET", message="connect refused"), 5)
    # pool-a still looks ready, but t1 must not go straight back to it: it waits in the queue.
    assert not any(isinstance(c, Dispatch) for c in out) and core.task("t1").phase is TaskPhase.QUEUED
    assert not any(isinstance(c, Dispatch) for c in run(Tick(), 6))
    # the other pool frees up: t1 goes there
    out = run(StreamEnded(task_id="busy"), 10)
    assert only(out, Dispatch).pool_id == "pool-b" and only(out, Dispatch).attempt == 2


def test_a_pinned_task_retries_its_pool_after_a_newer_snapshot():
    core, run = make(pools=("pool-a",))
    pin = PlacementRequest(mode=PlacementMode.PIN, pin_pool_id="pool-a")
    run(TaskSubmitted(spec=spec("t1", placement=pin)), 0)
    out = run(DispatchFailed(task_id="t1", attempt=1, code="WORKER_RESET", message="engine restarting"), 5)
    assert not any(isinstance(c, Dispatch) for c in out) and core.task("t1").phase is TaskPhase.QUEUED
    out = run(PoolUpdated(snapshot=pool("pool-a", slots_total=1, slots_free=1)), 50)  # the engine is back
    assert only(out, Dispatch).attempt == 2


def test_session_eviction_spares_sessions_with_tasks_in_flight():
    core, run = make(slots=4, max_sessions=2, budgets=BudgetPolicy(tokens=10))
    run(TaskSubmitted(spec=spec("t1", session_id="busy", max_tokens=10)), 0)  # reserves the whole budget
    run(TaskSubmitted(spec=spec("t2", session_id="idle", max_tokens=1)), 1)
    run(TokensReceived(task_id="t2", count=1), 2)
    run(StreamEnded(task_id="t2"), 3)
    run(TaskSubmitted(spec=spec("t3", session_id="new", max_tokens=1)), 4)  # one session must go
    assert "busy" in core.sessions and "idle" not in core.sessions
    assert core.sessions.refusal(spec("t4", session_id="busy", max_tokens=1)) is not None  # still reserved


def test_next_slot_estimate_is_reused_briefly_and_dropped_when_a_lease_changes():
    """The scan over every running task is reused for a moment, aged by the time passed, and
    redone as soon as a lease is taken or returned (the soonest task may have just ended)."""
    core, run = make(slots=2, admission_capacity=8)
    run(TaskSubmitted(spec=spec("slow", max_tokens=1000)), 0.0)
    run(TaskSubmitted(spec=spec("quick", max_tokens=1000)), 0.0)
    first = core.next_slot_ms(10.0)
    assert first is not None and first > 20
    core.admission.estimator.prior_ms = 500.0  # what a rescan would see: an estimate that moved meanwhile
    assert core.next_slot_ms(30.0) == first - 20  # reused, aged by the 20 ms since
    rescanned = core.next_slot_ms(10.0 + 60.0)  # past the reuse window: scanned again
    assert rescanned is not None and rescanned < first - 60
    run(StreamEnded(task_id="quick", tokens_out=1), 71.0)  # a lease returned: no reuse
    assert core.next_slot_ms(72.0) == core._scan_next_slot(72.0).__ceil__()
