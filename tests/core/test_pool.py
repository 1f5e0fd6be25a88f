"""Pool lifecycle, circuit breaker and backoff: the transition table, then scenarios step by step.

Every step asserts the exact commands returned and the state after it. Time is the ``now``
argument (ms); nothing sleeps.
"""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_orch.core.commands import (
    PoolStateChanged,
    ProbeHealth,
    StartEngine,
    StopEngine,
)
from llama_orch.core.errors import UsageError
from llama_orch.core.events import (
    DrainRequested,
    EngineExited,
    EngineStarted,
    HealthChecked,
    LeasesChanged,
    PoolLost,
    ProvisionFailed,
    ProvisionStarted,
    Tick,
)
from llama_orch.core.fsm import transition
from llama_orch.core.pool import (
    POOL_TRANSITIONS,
    Backoff,
    CircuitBreaker,
    PoolLifecycle,
    PoolPolicy,
    PoolState,
)
from llama_orch.core.types import BreakerState

P = "pool-a"
TRIGGERS = sorted({trigger for (_, trigger) in POOL_TRANSITIONS})
MISSING = [(s, t) for s in PoolState for t in TRIGGERS if (s, t) not in POOL_TRANSITIONS]


def changed(prev: PoolState, new: PoolState, cause=None) -> PoolStateChanged:
    return PoolStateChanged(pool_id=P, state=new.value, previous=prev.value, cause=cause)


def ok(now_unused=None) -> HealthChecked:
    return HealthChecked(pool_id=P, ok=True)


def fail(detail=None, loading=False) -> HealthChecked:
    return HealthChecked(pool_id=P, ok=False, detail=detail, loading=loading)


def make(seed: int = 0, **policy) -> PoolLifecycle:
    return PoolLifecycle(P, policy=PoolPolicy(**policy), rng=random.Random(seed))


def bring_ready(pl: PoolLifecycle, now: float) -> None:
    """provision -> engine started -> first probe -> health ok, all at ``now``."""
    pl.handle(ProvisionStarted(pool_id=P), now)
    pl.handle(EngineStarted(pool_id=P, engine_url="http://e:8080"), now)
    assert pl.handle(Tick(), now) == [ProbeHealth(pool_id=P)]
    assert pl.handle(ok(), now) == [changed(PoolState.STARTING, PoolState.READY)]
    assert pl.state is PoolState.READY


def restart_now(pl: PoolLifecycle, now: float, *, healthy: bool = False) -> list:
    """Tick at the reported restart deadline, then report the new engine (and optionally its health)."""
    due = pl.next_deadline()
    assert due is not None
    out = pl.handle(Tick(), due)
    assert [c for c in out if isinstance(c, StartEngine)], out
    pl.handle(EngineStarted(pool_id=P), due)
    if healthy:
        pl.handle(Tick(), due)
        pl.handle(ok(), due)
        assert pl.state is PoolState.READY
    return out


# -- the transition table ------------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "target"), list(POOL_TRANSITIONS.items()),
                         ids=[f"{s.value}-{t}" for (s, t) in POOL_TRANSITIONS])
def test_every_table_cell_gives_its_target(cell, target):
    state, trigger = cell
    assert transition(POOL_TRANSITIONS, state, trigger, what="pool") is target


@pytest.mark.parametrize(("state", "trigger"), MISSING, ids=[f"{s.value}-{t}" for (s, t) in MISSING])
def test_every_pair_outside_the_table_is_illegal(state, trigger):
    with pytest.raises(UsageError, match=trigger):
        transition(POOL_TRANSITIONS, state, trigger, what="pool")


def test_table_covers_every_state_and_the_missing_pairs_are_not_empty():
    sources = {s for (s, _) in POOL_TRANSITIONS}
    targets = set(POOL_TRANSITIONS.values())
    assert sources | targets == set(PoolState)
    assert len(MISSING) + len(POOL_TRANSITIONS) == len(PoolState) * len(TRIGGERS)
    assert (PoolState.UNKNOWN, "health_ok") in MISSING and (PoolState.DRAINING, "provision") in MISSING


def _reach(state: PoolState) -> PoolLifecycle:
    """A lifecycle driven to ``state`` through legal events only."""
    pl = make(breaker_threshold=1)
    if state is PoolState.UNKNOWN:
        return pl
    pl.handle(ProvisionStarted(pool_id=P), 0)
    if state is PoolState.PROVISIONING:
        return pl
    pl.handle(EngineStarted(pool_id=P), 0)
    if state is PoolState.STARTING:
        return pl
    pl.handle(Tick(), 0)
    pl.handle(ok(), 0)
    if state is PoolState.READY:
        return pl
    if state in (PoolState.DRAINING, PoolState.DRAINED):
        pl.handle(LeasesChanged(pool_id=P, active=1), 0)
        pl.handle(DrainRequested(pool_id=P, deadline_ms=50_000), 1)
        if state is PoolState.DRAINED:
            pl.handle(LeasesChanged(pool_id=P, active=0), 2)
        return pl
    policy_unready = make()  # threshold 5: one crash leaves it unready, not failed
    if state is PoolState.UNREADY:
        bring_ready(policy_unready, 0)
        policy_unready.handle(EngineExited(pool_id=P), 5)
        return policy_unready
    pl.handle(EngineExited(pool_id=P), 5)  # threshold 1: straight to failed
    return pl


@pytest.mark.parametrize("state", list(PoolState), ids=lambda s: s.value)
def test_reach_helper_reaches_each_state(state):
    assert _reach(state).state is state


ILLEGAL_EVENTS = [
    (PoolState.UNKNOWN, EngineExited(pool_id=P)),
    (PoolState.UNKNOWN, DrainRequested(pool_id=P, deadline_ms=10)),
    (PoolState.UNKNOWN, ProvisionFailed(pool_id=P, error="disk full")),
    (PoolState.PROVISIONING, DrainRequested(pool_id=P, deadline_ms=10)),
    (PoolState.PROVISIONING, EngineExited(pool_id=P, detail="boom")),
    (PoolState.STARTING, ProvisionStarted(pool_id=P)),
    (PoolState.READY, ProvisionStarted(pool_id=P)),
    (PoolState.READY, ProvisionFailed(pool_id=P, error="disk full")),
    (PoolState.DRAINING, ProvisionStarted(pool_id=P)),
    (PoolState.DRAINED, ProvisionFailed(pool_id=P, error="disk full")),
    (PoolState.FAILED, ProvisionFailed(pool_id=P, error="disk full")),
]


@pytest.mark.parametrize(("state", "event"), ILLEGAL_EVENTS,
                         ids=[f"{s.value}-{type(e).__name__}" for s, e in ILLEGAL_EVENTS])
def test_illegal_event_raises_and_leaves_the_machine_untouched(state, event):
    pl = _reach(state)
    before = (pl.state, pl.next_deadline(), pl.last_error, pl.engine_url, pl.restarts)
    with pytest.raises(UsageError):
        pl.handle(event, 1_000)
    assert (pl.state, pl.next_deadline(), pl.last_error, pl.engine_url, pl.restarts) == before


def test_event_for_another_pool_and_unknown_events_are_usage_errors():
    pl = make()
    with pytest.raises(UsageError, match="pool-b"):
        pl.handle(ProvisionStarted(pool_id="pool-b"), 0)
    with pytest.raises(UsageError, match="PoolLost"):
        pl.handle(PoolLost(pool_id=P), 0)
    assert pl.state is PoolState.UNKNOWN


# -- scenarios -----------------------------------------------------------------------------------


def test_provision_start_health_ok_becomes_ready():
    pl = make()
    assert pl.next_deadline() is None
    assert pl.handle(ProvisionStarted(pool_id=P), 0) == [changed(PoolState.UNKNOWN, PoolState.PROVISIONING)]
    assert pl.handle(EngineStarted(pool_id=P, engine_url="http://e:1"), 10) == [
        changed(PoolState.PROVISIONING, PoolState.STARTING)]
    assert pl.engine_url == "http://e:1" and not pl.ready
    assert pl.next_deadline() == 10  # first probe due at once
    assert pl.handle(Tick(), 9) == []
    assert pl.handle(Tick(), 10) == [ProbeHealth(pool_id=P)]
    assert pl.next_deadline() == 1010
    assert pl.handle(ok(), 30) == [changed(PoolState.STARTING, PoolState.READY)]
    assert pl.ready and pl.state is PoolState.READY and pl.last_error is None
    assert pl.next_deadline() == 1030  # next probe one interval after the answer
    assert pl.handle(ok(), 40) == []  # ready -> ready emits nothing
    # an EngineStarted without a url keeps the known one
    pl.handle(EngineStarted(pool_id=P), 50)
    assert pl.engine_url == "http://e:1" and pl.state is PoolState.STARTING


def test_loading_503_keeps_starting_and_counts_no_miss():
    pl = make(stale_after_misses=2)
    pl.handle(EngineStarted(pool_id=P), 0)
    for _ in range(10):
        due = pl.next_deadline()
        assert pl.handle(Tick(), due) == [ProbeHealth(pool_id=P)]
        assert pl.handle(fail("Loading model", loading=True), due + 5) == []
        assert pl.next_deadline() == due + 5 + 100  # start_probe_interval_ms while starting
        assert pl.state is PoolState.STARTING
        assert pl.last_error is None
    assert pl.handle(ok(), 20_000) == [changed(PoolState.STARTING, PoolState.READY)]


def test_failed_health_while_starting_stays_starting_and_records_the_error():
    pl = make()
    pl.handle(EngineStarted(pool_id=P), 0)
    assert pl.handle(fail("connection refused"), 5) == []
    assert pl.state is PoolState.STARTING and pl.last_error == "connection refused"
    assert pl.handle(fail(), 6) == []
    assert pl.last_error == "health check failed"
    assert pl.handle(ok(), 7) == [changed(PoolState.STARTING, PoolState.READY)]
    assert pl.last_error is None


def test_start_timeout_makes_it_unready_and_schedules_a_restart():
    pl = make(start_timeout_ms=5_000, backoff_base_ms=400, backoff_max_ms=10_000)
    pl.handle(EngineStarted(pool_id=P), 0)
    assert pl.handle(Tick(), 0) == [ProbeHealth(pool_id=P)]
    assert pl.handle(Tick(), 4_999) == [ProbeHealth(pool_id=P)]  # probes every interval, unanswered: no miss
    assert pl.state is PoolState.STARTING
    out = pl.handle(Tick(), 5_000)
    assert out == [changed(PoolState.STARTING, PoolState.UNREADY, "engine not healthy within 5000 ms")]
    assert pl.last_error == "engine not healthy within 5000 ms"
    due = pl.next_deadline()
    assert 5_000 + 200 <= due < 5_000 + 400
    assert pl.handle(Tick(), due - 1) == []
    assert pl.handle(Tick(), due) == [StartEngine(pool_id=P, attempt=1)]
    assert pl.next_deadline() is None  # waiting for EngineStarted


def test_start_timeout_is_cancelled_by_health_ok():
    pl = make(start_timeout_ms=5_000)
    pl.handle(EngineStarted(pool_id=P), 0)
    pl.handle(ok(), 100)
    assert pl.handle(Tick(), 5_000) == [ProbeHealth(pool_id=P)]
    assert pl.state is PoolState.READY


def test_crash_waits_backoff_then_restarts_and_clears_error_when_ready():
    pl = make()
    bring_ready(pl, 20)
    out = pl.handle(EngineExited(pool_id=P, detail="signal 11"), 100)
    assert out == [changed(PoolState.READY, PoolState.UNREADY, "signal 11")]
    assert pl.last_error == "signal 11" and pl.restarts == 1
    due = pl.next_deadline()
    assert 100 + 250 <= due < 100 + 500  # base 500, first failure: [250, 500)
    assert pl.handle(Tick(), due - 1) == []
    assert pl.handle(Tick(), due) == [StartEngine(pool_id=P, attempt=1)]
    assert pl.handle(Tick(), due + 1) == []  # exactly one start
    assert pl.handle(EngineStarted(pool_id=P), due + 2) == [changed(PoolState.UNREADY, PoolState.STARTING)]
    assert pl.last_error == "signal 11"  # still starting: the cause stays visible
    assert pl.handle(Tick(), due + 2) == [ProbeHealth(pool_id=P)]
    assert pl.handle(ok(), due + 3) == [changed(PoolState.STARTING, PoolState.READY)]
    assert pl.last_error is None


def test_no_restart_when_policy_says_so():
    pl = make(restart=False)
    bring_ready(pl, 0)
    assert pl.handle(EngineExited(pool_id=P), 10) == [changed(PoolState.READY, PoolState.UNREADY, "exited")]
    assert pl.next_deadline() is None and pl.restarts == 0
    assert pl.handle(Tick(), 1_000_000) == []


def _crash_delays(pl: PoolLifecycle, n: int, start: float = 0) -> list[float]:
    """Crash the engine n times (each right after its restart); return each backoff delay."""
    delays = []
    now = start
    pl.handle(EngineStarted(pool_id=P), now)
    for _ in range(n):
        assert pl.state is PoolState.STARTING
        pl.handle(EngineExited(pool_id=P), now)
        due = pl.next_deadline()
        delays.append(due - now)
        assert pl.handle(Tick(), due) == [StartEngine(pool_id=P, attempt=len(delays))]
        now = due
        pl.handle(EngineStarted(pool_id=P), now)
    return delays


def test_consecutive_crashes_double_the_backoff_up_to_the_max():
    pl = make(seed=3, backoff_base_ms=100, backoff_max_ms=1_600, breaker_threshold=1_000)
    delays = _crash_delays(pl, 9)
    ceilings = [100, 200, 400, 800, 1600, 1600, 1600, 1600, 1600]
    for delay, ceiling in zip(delays, ceilings):
        assert ceiling / 2 <= delay < ceiling, (delays, ceilings)
    assert pl.backoff.failures == 9 and pl.restarts == 9
    assert pl.state is PoolState.STARTING


def test_same_seed_same_delays_and_another_seed_differs():
    a = _crash_delays(make(seed=42, breaker_threshold=1_000), 6)
    b = _crash_delays(make(seed=42, breaker_threshold=1_000), 6)
    c = _crash_delays(make(seed=43, breaker_threshold=1_000), 6)
    assert a == b
    assert a != c


def test_breaker_opens_after_threshold_failures_then_allows_one_trial():
    pl = make(backoff_base_ms=100, breaker_threshold=3, breaker_window_ms=60_000, breaker_cooldown_ms=30_000)
    bring_ready(pl, 0)
    assert pl.handle(EngineExited(pool_id=P, detail="oom"), 1_000) == [
        changed(PoolState.READY, PoolState.UNREADY, "oom")]
    restart_now(pl, 1_000)
    pl.handle(EngineExited(pool_id=P, detail="oom"), 2_000)
    assert pl.state is PoolState.UNREADY
    restart_now(pl, 2_000)
    out = pl.handle(EngineExited(pool_id=P, detail="oom"), 3_000)
    assert out == [changed(PoolState.STARTING, PoolState.UNREADY, "oom"),
                   changed(PoolState.UNREADY, PoolState.FAILED, "circuit breaker open after repeated failures: oom")]
    assert pl.state is PoolState.FAILED and pl.breaker.state is BreakerState.OPEN
    assert pl.next_deadline() == 33_000
    for t in (3_001, 10_000, 32_999):
        assert pl.handle(Tick(), t) == []
    assert pl.handle(Tick(), 33_000) == [StartEngine(pool_id=P, attempt=3)]
    assert pl.breaker.state is BreakerState.HALF_OPEN
    # half-open admits exactly one trial, however often the driver ticks before the engine reports
    for t in (33_001, 40_000, 100_000):
        assert pl.handle(Tick(), t) == []
    assert pl.next_deadline() is None
    assert pl.handle(EngineStarted(pool_id=P), 100_000) == [changed(PoolState.FAILED, PoolState.STARTING)]


def test_failures_spread_wider_than_the_window_do_not_open_the_breaker():
    pl = make(backoff_base_ms=100, backoff_max_ms=100, breaker_threshold=3, breaker_window_ms=10_000)
    pl.handle(EngineStarted(pool_id=P), 0)
    now = 0
    for _ in range(6):
        pl.handle(EngineExited(pool_id=P), now)
        assert pl.state is PoolState.UNREADY
        now = pl.next_deadline()
        pl.handle(Tick(), now)
        now += 10_001
        pl.handle(EngineStarted(pool_id=P), now)
    assert pl.breaker.state is BreakerState.CLOSED


def _open_breaker(pl: PoolLifecycle, now: float) -> float:
    """Crash until the breaker opens (threshold failures at ``now``); return the time."""
    pl.handle(EngineStarted(pool_id=P), now)
    while pl.state is not PoolState.FAILED:
        pl.handle(EngineExited(pool_id=P), now)
        if pl.state is PoolState.UNREADY:
            due = pl.next_deadline()
            pl.handle(Tick(), due)
            now = due
            pl.handle(EngineStarted(pool_id=P), now)
    return now


def test_failed_trial_reopens_with_a_doubling_cooldown_capped_at_16x():
    pl = make(backoff_base_ms=10, breaker_threshold=2, breaker_cooldown_ms=1_000)
    now = _open_breaker(pl, 0)
    assert pl.next_deadline() == now + 1_000
    expected = [2_000, 4_000, 8_000, 16_000, 16_000, 16_000]
    for cooldown in expected:
        now = pl.next_deadline()
        assert pl.handle(Tick(), now) == [StartEngine(pool_id=P, attempt=pl._attempt)]
        pl.handle(EngineStarted(pool_id=P), now)
        out = pl.handle(EngineExited(pool_id=P, detail="still broken"), now + 5)
        assert [c.state for c in out] == ["unready", "failed"]
        assert pl.next_deadline() == now + 5 + cooldown


def test_trial_start_timeout_also_reopens_the_breaker():
    pl = make(backoff_base_ms=10, breaker_threshold=1, breaker_cooldown_ms=1_000, start_timeout_ms=500)
    bring_ready(pl, 0)
    pl.handle(EngineExited(pool_id=P), 10)
    assert pl.state is PoolState.FAILED and pl.next_deadline() == 1_010
    assert pl.handle(Tick(), 1_010) == [StartEngine(pool_id=P, attempt=1)]
    pl.handle(EngineStarted(pool_id=P), 1_010)
    out = pl.handle(Tick(), 1_510)
    assert [c.state for c in out if isinstance(c, PoolStateChanged)] == ["unready", "failed"]
    assert pl.next_deadline() == 1_510 + 2_000


def test_healthy_for_recovery_ms_closes_the_breaker_and_resets_backoff():
    pl = make(backoff_base_ms=100, breaker_threshold=2, breaker_cooldown_ms=1_000, recovery_ms=10_000,
              health_interval_ms=1_000)
    now = _open_breaker(pl, 0)
    now = pl.next_deadline()
    pl.handle(Tick(), now)
    assert pl.breaker.state is BreakerState.HALF_OPEN
    pl.handle(EngineStarted(pool_id=P), now)
    pl.handle(Tick(), now)
    healthy_at = now + 1
    assert pl.handle(ok(), healthy_at) == [changed(PoolState.STARTING, PoolState.READY)]
    assert pl.backoff.failures > 0
    # answer every probe; the breaker stays half-open until recovery_ms of health
    while True:
        due = pl.next_deadline()
        if due >= healthy_at + 10_000:
            break
        out = pl.handle(Tick(), due)
        assert out == [ProbeHealth(pool_id=P)]
        pl.handle(ok(), due)
        assert pl.breaker.state is BreakerState.HALF_OPEN
    assert pl.next_deadline() == healthy_at + 10_000
    pl.handle(Tick(), healthy_at + 10_000)
    assert pl.breaker.state is BreakerState.CLOSED and pl.backoff.failures == 0
    assert pl.next_deadline() > healthy_at + 10_000
    # a later crash starts again from the base delay and does not open the breaker at once
    crash_at = healthy_at + 10_500
    assert pl.handle(EngineExited(pool_id=P), crash_at) == [changed(PoolState.READY, PoolState.UNREADY, "exited")]
    assert 50 <= pl.next_deadline() - crash_at < 100


def test_a_failed_probe_restarts_the_recovery_clock():
    pl = make(stale_after_misses=5, recovery_ms=10_000)
    bring_ready(pl, 0)
    pl.handle(EngineExited(pool_id=P), 10)
    restart_now(pl, 10)
    start = pl.next_deadline()  # probe due at once
    pl.handle(Tick(), start)
    pl.handle(ok(), start)
    assert pl.next_deadline() == start + 1_000
    pl.handle(fail("slow"), start + 5_000)
    assert pl.state is PoolState.READY
    pl.handle(ok(), start + 6_000)
    pl.handle(Tick(), start + 10_000)
    assert pl.backoff.failures == 1  # not yet: healthy only since start+6000
    pl.handle(ok(), start + 15_999)
    pl.handle(Tick(), start + 15_999)
    assert pl.backoff.failures == 1
    pl.handle(Tick(), start + 16_000)
    assert pl.backoff.failures == 0 and pl.breaker.state is BreakerState.CLOSED


def test_stale_after_failed_probes():
    pl = make(stale_after_misses=3)
    bring_ready(pl, 20)
    assert pl.handle(fail("timeout"), 1_020) == []
    assert pl.handle(fail("timeout"), 2_020) == []
    assert pl.state is PoolState.READY
    out = pl.handle(fail("timeout"), 3_020)
    assert out == [changed(PoolState.READY, PoolState.UNREADY, "timeout")]
    assert pl.last_error == "timeout"
    due = pl.next_deadline()
    assert 3_020 + 250 <= due < 3_020 + 500
    assert pl.handle(Tick(), due) == [StartEngine(pool_id=P, attempt=1)]  # no more probes: restart only


def test_stale_detail_defaults_to_the_miss_count_and_a_success_resets_misses():
    pl = make(stale_after_misses=3)
    bring_ready(pl, 0)
    for t in (1, 2):
        pl.handle(fail(), t)
    pl.handle(ok(), 3)
    for t in (4, 5):
        assert pl.handle(fail(), t) == []
    assert pl.state is PoolState.READY
    assert pl.handle(fail(), 6) == [changed(PoolState.READY, PoolState.UNREADY, "3 health checks failed")]


def test_stale_after_unanswered_probes():
    pl = make(stale_after_misses=3, health_interval_ms=1_000)
    bring_ready(pl, 20)
    assert pl.next_deadline() == 1_020
    assert pl.handle(Tick(), 1_020) == [ProbeHealth(pool_id=P)]  # sent; not a miss yet
    assert pl.handle(Tick(), 2_020) == [ProbeHealth(pool_id=P)]  # miss 1
    assert pl.handle(Tick(), 3_020) == [ProbeHealth(pool_id=P)]  # miss 2
    assert pl.state is PoolState.READY
    out = pl.handle(Tick(), 4_020)  # miss 3: stale, and no further probe
    assert out == [changed(PoolState.READY, PoolState.UNREADY, "3 health checks unanswered")]
    assert pl.last_error == "3 health checks unanswered"
    assert 4_020 + 250 <= pl.next_deadline() < 4_020 + 500


def test_an_answer_between_probes_resets_the_unanswered_count():
    pl = make(stale_after_misses=2, health_interval_ms=1_000)
    bring_ready(pl, 0)
    for _ in range(10):
        due = pl.next_deadline()
        assert pl.handle(Tick(), due) == [ProbeHealth(pool_id=P)]
        pl.handle(ok(), due + 999)
    assert pl.state is PoolState.READY


def test_stale_pool_that_answers_again_is_ready_and_its_restart_is_cancelled():
    pl = make(stale_after_misses=1)
    bring_ready(pl, 0)
    pl.handle(fail("slow"), 1_000)
    assert pl.state is PoolState.UNREADY
    restart_due = pl.next_deadline()
    # a late answer from the same engine arrives before the restart was issued
    assert pl.handle(ok(), 1_100) == [changed(PoolState.UNREADY, PoolState.READY)]
    assert pl.last_error is None
    # the ready engine must not be restarted behind its back
    out = pl.handle(Tick(), restart_due)
    assert not [c for c in out if isinstance(c, StartEngine)]
    out = pl.handle(Tick(), 10_000)
    assert not [c for c in out if isinstance(c, StartEngine)]
    assert pl.state is PoolState.READY


def test_health_answer_after_the_restart_was_issued_is_ignored():
    pl = make()
    bring_ready(pl, 0)
    pl.handle(EngineExited(pool_id=P), 10)
    due = pl.next_deadline()
    pl.handle(Tick(), due)
    assert pl.handle(ok(), due + 1) == []
    assert pl.state is PoolState.UNREADY


def test_drain_with_active_leases_waits_for_zero_leases():
    pl = make()
    bring_ready(pl, 0)
    assert pl.handle(LeasesChanged(pool_id=P, active=2), 10) == []
    assert pl.handle(DrainRequested(pool_id=P, deadline_ms=60_000), 100) == [
        changed(PoolState.READY, PoolState.DRAINING, "drain requested")]
    assert pl.draining and not pl.ready
    assert pl.handle(LeasesChanged(pool_id=P, active=1), 200) == []
    assert pl.handle(ok(), 250) == []  # probes still answered, still draining
    assert pl.state is PoolState.DRAINING
    assert pl.handle(LeasesChanged(pool_id=P, active=0), 300) == [
        changed(PoolState.DRAINING, PoolState.DRAINED, "drained"), StopEngine(pool_id=P, reason="drained")]
    assert pl.next_deadline() is None
    assert pl.handle(Tick(), 1_000_000) == []


def test_drain_deadline_stops_the_engine_with_leases_left():
    pl = make(health_interval_ms=1_000)
    bring_ready(pl, 0)
    pl.handle(LeasesChanged(pool_id=P, active=3), 0)
    pl.handle(DrainRequested(pool_id=P, deadline_ms=2_500), 100)
    seen = []
    while True:
        due = pl.next_deadline()
        assert due is not None and due <= 2_600
        out = pl.handle(Tick(), due)
        pl.handle(ok(), due)
        seen.append((due, out))
        if pl.state is PoolState.DRAINED:
            break
    assert seen[-1] == (2_600, [changed(PoolState.DRAINING, PoolState.DRAINED, "drained"),
                                StopEngine(pool_id=P, reason="drained")])
    assert all(out == [ProbeHealth(pool_id=P)] for _, out in seen[:-1])
    assert pl.next_deadline() is None


def test_drain_without_leases_is_immediate():
    pl = make()
    bring_ready(pl, 0)
    assert pl.handle(DrainRequested(pool_id=P, deadline_ms=10_000), 5) == [
        changed(PoolState.READY, PoolState.DRAINING, "drain requested"),
        changed(PoolState.DRAINING, PoolState.DRAINED, "drained"),
        StopEngine(pool_id=P, reason="drained")]


def test_drain_of_an_unready_pool_cancels_its_restart():
    pl = make()
    bring_ready(pl, 0)
    pl.handle(EngineExited(pool_id=P), 10)
    due = pl.next_deadline()
    assert pl.handle(DrainRequested(pool_id=P, deadline_ms=0), 20) == [
        changed(PoolState.UNREADY, PoolState.DRAINED, "drain requested"), StopEngine(pool_id=P, reason="drain")]
    assert pl.next_deadline() is None
    assert pl.handle(Tick(), due) == []


def test_engine_exit_while_draining_ends_the_drain():
    pl = make()
    bring_ready(pl, 0)
    pl.handle(LeasesChanged(pool_id=P, active=1), 0)
    pl.handle(DrainRequested(pool_id=P, deadline_ms=10_000), 0)
    assert pl.handle(EngineExited(pool_id=P, detail="killed"), 50) == [
        changed(PoolState.DRAINING, PoolState.DRAINED, "killed")]
    assert pl.next_deadline() is None
    assert pl.handle(Tick(), 10_000) == []


def test_negative_drain_deadline_is_a_usage_error():
    pl = make()
    bring_ready(pl, 0)
    with pytest.raises(UsageError):
        pl.handle(DrainRequested(pool_id=P, deadline_ms=-1), 0)
    assert pl.state is PoolState.READY


def test_drain_while_starting_with_leases_survives_the_start_deadline():
    pl = make(start_timeout_ms=1_000)
    pl.handle(LeasesChanged(pool_id=P, active=1), 0)
    pl.handle(EngineStarted(pool_id=P), 0)
    pl.handle(DrainRequested(pool_id=P, deadline_ms=5_000), 10)
    assert pl.state is PoolState.DRAINING
    pl.handle(Tick(), 1_000)  # the start deadline passes while draining: no illegal 'stale'
    assert pl.state is PoolState.DRAINING
    out = pl.handle(Tick(), 5_010)
    assert StopEngine(pool_id=P, reason="drained") in out and pl.state is PoolState.DRAINED


def test_an_engine_replaced_while_draining_keeps_the_drain_and_is_stopped_with_it():
    # pool-managerd cannot refuse a handoff: a reload that lands mid-drain must not end the drain
    pl = _reach(PoolState.READY)
    pl.handle(LeasesChanged(pool_id=P, active=1), 10)
    pl.handle(DrainRequested(pool_id=P, deadline_ms=5_000), 10)
    assert pl.handle(EngineStarted(pool_id=P, engine_url="http://new"), 20) == []
    assert pl.state is PoolState.DRAINING and pl.engine_url == "http://new"
    assert pl.handle(LeasesChanged(pool_id=P, active=0), 30) == [
        changed(PoolState.DRAINING, PoolState.DRAINED, "drained"), StopEngine(pool_id=P, reason="drained")]


def test_provision_failure_while_starting_cancels_the_start_deadline():
    pl = make(start_timeout_ms=1_000)
    pl.handle(ProvisionStarted(pool_id=P), 0)
    pl.handle(EngineStarted(pool_id=P), 0)
    assert pl.handle(ProvisionFailed(pool_id=P, error="model checksum mismatch"), 10) == [
        changed(PoolState.STARTING, PoolState.FAILED, "model checksum mismatch")]
    assert pl.last_error == "model checksum mismatch"
    pl.handle(Tick(), 1_000)
    assert pl.state is PoolState.FAILED


def test_provision_failure_when_unready_schedules_a_restart():
    pl = make()
    bring_ready(pl, 0)
    pl.handle(EngineExited(pool_id=P), 10)
    pl.handle(Tick(), pl.next_deadline())
    assert pl.handle(ProvisionFailed(pool_id=P, error="spawn failed"), 1_000) == []
    assert pl.state is PoolState.UNREADY and pl.last_error == "spawn failed"
    due = pl.next_deadline()
    assert 1_000 + 500 <= due < 1_000 + 1_000  # second failure: ceiling 1000
    assert pl.handle(Tick(), due) == [StartEngine(pool_id=P, attempt=2)]


def test_drained_pool_can_be_provisioned_again():
    pl = _reach(PoolState.DRAINED)
    assert pl.handle(ProvisionStarted(pool_id=P), 100) == [changed(PoolState.DRAINED, PoolState.PROVISIONING)]


# -- Backoff and CircuitBreaker on their own ---------------------------------------------------


def test_backoff_delays_lie_in_the_upper_half_of_a_doubling_ceiling():
    b = Backoff(base_ms=100, max_ms=1_000, rng=random.Random(1))
    ceilings = [100, 200, 400, 800, 1_000, 1_000, 1_000]
    delays = [b.next_delay_ms() for _ in ceilings]
    for d, c in zip(delays, ceilings):
        assert c / 2 <= d < c
    assert b.failures == len(ceilings)
    b.reset()
    assert b.failures == 0
    assert 50 <= b.next_delay_ms() < 100


def test_backoff_does_not_overflow_after_many_failures():
    b = Backoff(base_ms=500.0, max_ms=30_000.0, rng=random.Random(0))
    for _ in range(3_000):
        d = b.next_delay_ms()
    assert 15_000 <= d < 30_000


@pytest.mark.parametrize(("base", "maximum"), [(0, 10), (-1, 10), (10, 5)])
def test_backoff_rejects_bad_parameters(base, maximum):
    with pytest.raises(UsageError):
        Backoff(base_ms=base, max_ms=maximum, rng=random.Random(0))


def test_backoff_is_deterministic_per_seed():
    a = Backoff(base_ms=100, max_ms=10_000, rng=random.Random(9))
    b = Backoff(base_ms=100, max_ms=10_000, rng=random.Random(9))
    assert [a.next_delay_ms() for _ in range(8)] == [b.next_delay_ms() for _ in range(8)]


def test_breaker_counts_only_failures_inside_the_window():
    cb = CircuitBreaker(threshold=3, window_ms=1_000, cooldown_ms=500)
    assert cb.record_failure(0) is BreakerState.CLOSED
    assert cb.record_failure(600) is BreakerState.CLOSED
    assert cb.record_failure(1_000) is BreakerState.CLOSED  # the one at 0 is out of the window
    assert cb.half_open_at() is None
    assert cb.record_failure(1_100) is BreakerState.OPEN  # 600, 1000, 1100
    assert cb.opened_at == 1_100 and cb.half_open_at() == 1_600
    assert cb.poll(1_599) is BreakerState.OPEN
    assert cb.poll(1_600) is BreakerState.HALF_OPEN
    assert cb.half_open_at() is None
    assert cb.record_failure(1_700) is BreakerState.OPEN
    assert cb.half_open_at() == 1_700 + 1_000
    cb.record_success()
    assert cb.state is BreakerState.CLOSED and cb.opened_at is None and cb.half_open_at() is None
    # success resets the cooldown and the failure count
    assert cb.record_failure(5_000) is BreakerState.CLOSED
    assert cb.record_failure(5_001) is BreakerState.CLOSED
    assert cb.record_failure(5_002) is BreakerState.OPEN and cb.half_open_at() == 5_502


def test_breaker_failure_while_open_restarts_the_cooldown():
    cb = CircuitBreaker(threshold=1, window_ms=1_000, cooldown_ms=500)
    assert cb.record_failure(0) is BreakerState.OPEN and cb.half_open_at() == 500
    assert cb.record_failure(800) is BreakerState.OPEN
    assert cb.half_open_at() == 1_300
    assert cb.poll(1_299) is BreakerState.OPEN


def test_engine_started_outside_the_trial_and_failing_waits_a_fresh_cooldown():
    pl = make(breaker_threshold=1, breaker_cooldown_ms=5_000, start_timeout_ms=8_000)
    bring_ready(pl, 0)
    pl.handle(EngineExited(pool_id=P), 0)
    assert pl.state is PoolState.FAILED and pl.next_deadline() == 5_000
    pl.handle(EngineStarted(pool_id=P), 100)  # started by an operator, not by a half-open trial
    out = pl.handle(EngineExited(pool_id=P), 6_000)
    assert [c.state for c in out] == ["unready", "failed"]
    assert pl.next_deadline() == 11_000
    assert pl.handle(Tick(), 6_000) == []


@pytest.mark.parametrize("kw", [dict(threshold=0), dict(window_ms=0), dict(cooldown_ms=0)])
def test_breaker_rejects_bad_parameters(kw):
    with pytest.raises(UsageError):
        CircuitBreaker(**kw)


# -- a driver's view: random event sequences -------------------------------------------------


EVENTS = st.one_of(
    st.just(ProvisionStarted(pool_id=P)),
    st.builds(ProvisionFailed, pool_id=st.just(P), error=st.sampled_from(["e1", "e2"])),
    st.just(EngineStarted(pool_id=P)),
    st.builds(HealthChecked, pool_id=st.just(P), ok=st.booleans(), loading=st.booleans()),
    st.just(EngineExited(pool_id=P)),
    st.builds(DrainRequested, pool_id=st.just(P), deadline_ms=st.integers(0, 20_000)),
    st.builds(LeasesChanged, pool_id=st.just(P), active=st.integers(0, 3)),
    st.just(Tick()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.integers(0, 40_000), EVENTS), max_size=60),
       threshold=st.integers(1, 4), seed=st.integers(0, 3))
def test_random_event_sequences_keep_the_machine_consistent(steps, threshold, seed):
    """A driver that ticks at every reported deadline never sees a deadline in the past, a Tick
    never raises, every state change is an edge of the table, and an illegal event changes nothing."""
    pl = PoolLifecycle(P, policy=PoolPolicy(breaker_threshold=threshold, breaker_window_ms=30_000,
                                            breaker_cooldown_ms=5_000, start_timeout_ms=8_000,
                                            recovery_ms=6_000, backoff_base_ms=200, backoff_max_ms=4_000),
                       rng=random.Random(seed))
    edges = {(s.value, t.value) for (s, _), t in POOL_TRANSITIONS.items()}
    now = 0

    def check(out, before):
        prev = before
        for cmd in out:
            if isinstance(cmd, PoolStateChanged):
                assert cmd.previous == prev.value
                assert (cmd.previous, cmd.state) in edges
                prev = PoolState(cmd.state)
        assert prev is pl.state

    for dt, event in steps:
        target = now + dt
        # the driver ticks at every deadline up to the next event
        for _ in range(1_000):
            due = pl.next_deadline()
            if due is None or due > target:
                break
            now = max(now, due)  # a deadline in the past (set before the last event) is due at once
            before = pl.state
            out = pl.handle(Tick(), now)
            check(out, before)
            after = pl.next_deadline()
            assert after is None or after > now, (pl.state, after, now)
        else:
            pytest.fail("deadline loop did not settle")
        now = target
        before_state, before_deadline = pl.state, pl.next_deadline()
        try:
            out = pl.handle(event, now)
        except UsageError:
            assert not isinstance(event, Tick)
            assert (pl.state, pl.next_deadline()) == (before_state, before_deadline)
            continue
        check(out, before_state)


def test_a_crash_reported_twice_counts_once():
    pl = make()
    bring_ready(pl, 0.0)
    pl.handle(EngineExited(pool_id=pl.pool_id, detail="exit 137"), 10.0)
    first_restart = pl.next_deadline()
    assert pl.handle(EngineExited(pool_id=pl.pool_id, detail="exit 137 (again)"), 11.0) == []
    assert pl.restarts == 1 and pl.backoff.failures == 1 and pl.next_deadline() == first_restart
    assert pl.last_error == "exit 137 (again)"


def test_a_late_health_answer_from_an_exited_engine_does_not_make_it_ready():
    pl = make()
    bring_ready(pl, 0.0)
    pl.handle(EngineExited(pool_id=pl.pool_id), 10.0)
    assert pl.handle(ok(), 11.0) == [] and pl.state is PoolState.UNREADY


def test_provisioning_cancels_a_pending_restart_and_a_failed_provision_stops_probing():
    pl = make()
    bring_ready(pl, 0.0)
    pl.handle(EngineExited(pool_id=pl.pool_id), 10.0)
    pl.handle(ProvisionStarted(pool_id=pl.pool_id), 11.0)
    assert pl.state is PoolState.PROVISIONING and pl.next_deadline() is None
    pl.handle(ProvisionFailed(pool_id=pl.pool_id, error="model missing"), 12.0)
    assert pl.state is PoolState.FAILED and pl.last_error == "model missing" and pl.next_deadline() is None


def test_an_observer_without_restart_keeps_probing_and_recovers():
    pl = make(restart=False, stale_after_misses=2)
    bring_ready(pl, 0.0)
    for t in (1000.0, 2000.0):
        assert pl.handle(Tick(), t) == [ProbeHealth(pool_id=P)]
        out = pl.handle(fail("timeout"), t)
    assert pl.state is PoolState.UNREADY and out == [changed(PoolState.READY, PoolState.UNREADY, "timeout")]
    assert not [c for c in pl.handle(Tick(), 3000.0) if isinstance(c, StartEngine)]
    assert pl.handle(ok(), 3000.0) == [changed(PoolState.UNREADY, PoolState.READY)]
