"""Admission on its own: queue bound, policies, positions, and the drain-rate estimates."""

import pytest
from support import spec

from llama_orch.core.admission import Admission, QueuePolicy, ServiceTimeEstimator
from llama_orch.core.commands import Admitted, Rejected
from llama_orch.core.errors import UsageError
from llama_orch.core.types import Priority


def test_estimator_uses_the_prior_until_it_measures():
    est = ServiceTimeEstimator(alpha=0.5, prior_ms=1000.0)
    assert est.service_ms(Priority.INTERACTIVE) == 1000.0
    est.record(Priority.BATCH, 400.0)
    # No interactive sample yet: the other class's measurement beats the prior.
    assert est.service_ms(Priority.INTERACTIVE) == 400.0
    est.record(Priority.INTERACTIVE, 200.0)
    est.record(Priority.INTERACTIVE, 600.0)
    assert est.service_ms(Priority.INTERACTIVE) == pytest.approx(400.0)  # 200 + 0.5 * (600 - 200)
    assert est.samples == [2, 1]


def test_wait_is_zero_with_a_free_slot_and_grows_with_position():
    est = ServiceTimeEstimator(prior_ms=1000.0)
    assert est.wait_ms(Priority.INTERACTIVE, position=1, free_slots=2, slots=4) == 0
    assert est.wait_ms(Priority.INTERACTIVE, position=0, free_slots=0, slots=4) == 250
    assert est.wait_ms(Priority.INTERACTIVE, position=3, free_slots=0, slots=4) == 1000
    assert est.retry_after_ms(slots=4) == 250
    assert est.retry_after_ms(slots=0) == 1000  # no slot known: one service time


@pytest.mark.parametrize("bad", [dict(alpha=0.0), dict(alpha=1.5), dict(prior_ms=0)])
def test_estimator_rejects_bad_settings(bad):
    with pytest.raises(UsageError):
        ServiceTimeEstimator(**bad)


def test_positions_count_only_work_served_first():
    adm = Admission(capacity=10)
    assert adm.submit(spec("b1", priority=Priority.BATCH), free_slots=0, slots=1).decision.queue_position == 0
    assert adm.submit(spec("i1"), free_slots=0, slots=1).decision.queue_position == 0
    assert adm.submit(spec("b2", priority=Priority.BATCH), free_slots=0, slots=1).decision.queue_position == 2
    assert adm.submit(spec("i2"), free_slots=0, slots=1).decision.queue_position == 1
    assert list(adm.queue) == ["i1", "i2", "b1", "b2"]
    assert adm.depth(Priority.BATCH) == 2 and len(adm) == 4


def test_full_queue_reject_policy_leaves_the_queue_alone():
    adm = Admission(capacity=1)
    adm.submit(spec("a"), free_slots=0, slots=1)
    result = adm.submit(spec("b"), free_slots=0, slots=1)
    assert isinstance(result.decision, Rejected) and result.decision.code == "ADMISSION_REJECT"
    assert result.evicted is None and list(adm.queue) == ["a"]


def test_drop_lru_does_not_evict_for_a_newcomer_that_would_miss_its_deadline():
    adm = Admission(capacity=1, policy=QueuePolicy.DROP_LRU, estimator=ServiceTimeEstimator(prior_ms=1000.0))
    adm.submit(spec("old", priority=Priority.BATCH), free_slots=0, slots=1)
    result = adm.submit(spec("new", deadline_ms=10), free_slots=0, slots=1)
    assert result.decision.code == "DEADLINE_UNMET" and result.evicted is None
    assert list(adm.queue) == ["old"]
    result = adm.submit(spec("new2"), free_slots=0, slots=1)
    assert isinstance(result.decision, Admitted) and result.evicted == "old"


def test_bad_construction_is_misuse():
    with pytest.raises(UsageError):
        Admission(capacity=0)
    with pytest.raises(UsageError):
        Admission(capacity=1, policy="reject")  # type: ignore[arg-type]
    adm = Admission(capacity=2)
    adm.submit(spec("x"), free_slots=0, slots=1)
    with pytest.raises(UsageError):
        adm.submit(spec("x"), free_slots=0, slots=1)
