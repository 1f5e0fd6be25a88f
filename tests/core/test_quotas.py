"""Quotas per principal: concurrent slots, the tasks-per-minute bucket, exact releases, bounded memory."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_orch.core.errors import UsageError
from llama_orch.core.quotas import CONCURRENT_TASKS, MINUTE_MS, TASKS_PER_MINUTE, QuotaPolicy, Quotas


def test_no_policy_tracks_nothing():
    q = Quotas()
    for i in range(1000):
        assert q.acquire("p", f"t{i}", 0.0) is None
    assert len(q) == 0 and q.running("p") == 0 and not q.release("t0", 0.0)


def test_concurrent_slots_are_per_principal_and_released_once():
    q = Quotas(QuotaPolicy(concurrent_tasks=2))
    assert q.acquire("alice", "a1", 0.0) is None and q.acquire("alice", "a2", 0.0) is None
    refused = q.acquire("alice", "a3", 0.0)
    assert refused is not None and refused.quota == CONCURRENT_TASKS and refused.limit == 2
    assert "concurrent tasks quota (2) reached" in refused.message and refused.retry_after_ms == 1000
    assert q.acquire("bob", "b1", 0.0) is None  # another principal's slots are its own
    assert q.running("alice") == 2 and not q.holds("a3")
    assert q.release("a1", 5.0) and not q.release("a1", 5.0)  # the second release of one task changes nothing
    assert q.running("alice") == 1
    assert q.acquire("alice", "a3", 5.0) is None
    q.check_invariants()


def test_a_task_id_holds_one_slot_at_most():
    q = Quotas(QuotaPolicy(concurrent_tasks=3))
    q.acquire("alice", "a1", 0.0)
    with pytest.raises(UsageError):
        q.acquire("alice", "a1", 0.0)


def test_the_bucket_allows_a_burst_then_one_per_interval():
    q = Quotas(QuotaPolicy(tasks_per_minute=3))  # a token every 20 s
    for i in range(3):
        assert q.acquire("p", f"t{i}", 0.0) is None
        q.release(f"t{i}", 0.0)
    refused = q.acquire("p", "t3", 0.0)
    assert refused.quota == TASKS_PER_MINUTE and refused.limit == 3 and refused.retry_after_ms == 20_000
    assert "tasks per minute quota (3) reached" in refused.message
    assert q.acquire("p", "t3", 19_999.0).retry_after_ms == 1
    assert q.acquire("p", "t3", 20_000.0) is None


def test_seven_per_minute_fit_a_minute_despite_float_intervals():
    q = Quotas(QuotaPolicy(tasks_per_minute=7))
    assert all(q.acquire("p", f"t{i}", 1000.0) is None for i in range(7))
    assert q.acquire("p", "t7", 1000.0) is not None


def test_a_refused_admission_refunds_its_token_and_a_concurrency_refusal_spends_none():
    q = Quotas(QuotaPolicy(concurrent_tasks=1, tasks_per_minute=2))
    assert q.acquire("p", "a", 0.0) is None
    assert q.acquire("p", "b", 0.0).quota == CONCURRENT_TASKS  # checked first: no token spent
    q.release("a", 0.0, refund=True)  # admission refused "a": its token comes back
    assert q.acquire("p", "c", 0.0) is None
    q.release("c", 0.0)
    assert q.acquire("p", "d", 0.0) is None
    q.release("d", 0.0)
    assert q.acquire("p", "e", 0.0).quota == TASKS_PER_MINUTE  # c and d spent both tokens


def test_idle_principals_are_forgotten():
    q = Quotas(QuotaPolicy(concurrent_tasks=1))
    q.acquire("p", "t", 0.0)
    assert len(q) == 1
    q.release("t", 0.0)
    assert len(q) == 0  # no slot held and no bucket: a fresh record is the same
    r = Quotas(QuotaPolicy(tasks_per_minute=60))
    for i in range(500):  # a crowd of OIDC subjects, one task each
        r.acquire(f"sub-{i}", f"t{i}", i * 1000.0)
        r.release(f"t{i}", i * 1000.0)
    assert len(r) <= 3  # each bucket is full again a second after its one task


def test_records_stay_within_max_principals_even_with_a_long_running_task_first():
    q = Quotas(QuotaPolicy(tasks_per_minute=10, max_principals=50))
    q.acquire("long", "long-task", 0.0)  # holds its slot throughout: must not block the sweep
    for i in range(2000):
        q.acquire(f"sub-{i}", f"t{i}", 0.0)
        q.release(f"t{i}", 0.0)
    assert len(q) <= 51 and q.running("long") == 1
    q.check_invariants()


@settings(max_examples=150, deadline=None)
@given(concurrent=st.one_of(st.none(), st.integers(1, 4)), per_minute=st.one_of(st.none(), st.integers(1, 6)),
       cap=st.sampled_from([2, 100]),
       ops=st.lists(st.tuples(st.sampled_from(["acquire", "release", "refund", "wait"]), st.integers(0, 2),
                              st.integers(0, 30_000)), max_size=80))
def test_quotas_hold_under_any_sequence(concurrent, per_minute, cap, ops):
    if concurrent is None and per_minute is None:
        concurrent = 2  # no policy tracks nothing (tested above)
    q = Quotas(QuotaPolicy(concurrent_tasks=concurrent, tasks_per_minute=per_minute, max_principals=cap))
    now = 0.0
    held: dict[str, str] = {}  # the model: task -> principal
    kept: dict[str, list[float]] = {}  # principal -> times of the tokens kept (not refunded)
    n = 0
    for op, who, amount in ops:
        principal = f"p{who}"
        if op == "wait":
            now += amount
        elif op == "acquire":
            n += 1
            task = f"t{n}"
            running = sum(1 for p in held.values() if p == principal)
            refused = q.acquire(principal, task, now)
            if refused is None:
                assert concurrent is None or running < concurrent
                held[task] = principal
                kept.setdefault(principal, []).append(now)
            else:
                assert refused.retry_after_ms >= 1
                assert refused.quota == (CONCURRENT_TASKS if concurrent is not None and running >= concurrent
                                         else TASKS_PER_MINUTE)
        else:
            mine = [t for t, p in held.items() if p == principal]
            if mine:
                task = mine[-1]
                assert q.release(task, now, refund=op == "refund")
                assert not q.release(task, now)  # exactly once
                del held[task]
                if op == "refund":
                    kept[principal].pop()
        q.check_invariants()
        for p in (f"p{i}" for i in range(3)):
            assert q.running(p) == sum(1 for x in held.values() if x == p)
        holders = len(set(held.values()))
        assert len(q) <= cap + 2 * holders + 2  # bounded: the cap, plus principals with work in flight
    if per_minute is not None and cap == 100:  # (past the cap a forgotten bucket starts full again: lenient)
        # GCRA: the tokens kept never outnumber the burst plus what refilled between the first and the last
        for times in kept.values():
            if times:
                assert len(times) <= per_minute + (max(times) - min(times)) * per_minute / MINUTE_MS + 1e-9


def test_a_refusal_says_when_to_come_back_and_then_it_is_granted():
    q = Quotas(QuotaPolicy(tasks_per_minute=4))
    now = 0.0
    for i in range(50):
        refused = q.acquire("p", f"t{i}", now)
        if refused is not None:
            now += refused.retry_after_ms
            assert q.acquire("p", f"t{i}", now) is None
        q.release(f"t{i}", now)
    assert now >= (50 - 4) * MINUTE_MS / 4 - 1  # 4 at once, then one every 15 s


@pytest.mark.parametrize("bad", [dict(concurrent_tasks=0), dict(tasks_per_minute=-1), dict(max_principals=0),
                                 dict(concurrent_retry_after_ms=0), dict(tasks_per_minute=1.5)])
def test_bad_policies_are_misuse(bad):
    with pytest.raises(UsageError):
        QuotaPolicy(**bad)
