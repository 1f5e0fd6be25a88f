"""The lab's parts that need no root: topology rules, load plans, the accounting of a scenario."""

from __future__ import annotations

import pytest

from llama_orch.io.lab.agent import LoadPlan
from llama_orch.io.lab.cluster import LabCluster, LabConfig, LabError
from llama_orch.io.lab.scenarios import Result, Scenario, account, check
from llama_orch.io.lab.netns import Topology


def test_the_topology_stays_on_one_private_24():
    topo = Topology(prefix="lt", subnet="10.213.99", workers=3)
    assert [(h.name, h.netns, h.address) for h in topo.hosts] == [
        ("ctrl", "lt-ctrl", "10.213.99.1"), ("gpu1", "lt-gpu1", "10.213.99.11"), ("gpu2", "lt-gpu2", "10.213.99.12"),
        ("gpu3", "lt-gpu3", "10.213.99.13"), ("client", "lt-client", "10.213.99.100")]
    assert topo.exec_argv("gpu2", ["true"]) == ["ip", "netns", "exec", "lt-gpu2", "true"]
    for bad in ("192.168.1", "10.1", "10.300.1"):
        with pytest.raises(ValueError, match="private /24"):
            Topology(subnet=bad)


@pytest.mark.parametrize("body, message", [
    ({"url": "http://x", "rate": 0}, "rate"), ({"url": "http://x", "max_tasks": 10**6}, "max_tasks"),
    ({"url": "http://x", "duration_s": 10**5}, "duration_s"), ({"url": "http://x", "bogus": 1}, "bogus")])
def test_a_load_plan_is_bounded_in_count_and_time(body, message):
    with pytest.raises(ValueError, match=message):
        LoadPlan.parse(body)


def _record(n, outcome, dispatches, *, terminals=1, after=0):
    return {"n": n, "task_id": f"t{n}", "correlation_id": f"c{n}", "sent": 0.0, "admitted": 202,
            "dispatches": dispatches, "first_token": None, "tokens": 3, "tokens_after_terminal": after,
            "terminals": terminals, "outcome": outcome, "outcome_at": 1.0, "detail": "", "cancel_sent": None}


def _lab():
    return LabCluster(LabConfig(prefix="lt", subnet="10.213.99"))


def test_the_accounting_finds_every_broken_promise():
    scenario = Scenario(name="s", title="t", broken=("gpu1-a",), route_away_bound_s=1.0, errors_allowed=False)
    result = Result(scenario=scenario, fault_at=10.0, heal_at=20.0, mid_stream=True, correlation="0/1")
    result.records = [
        _record(0, "end", [[9.0, "gpu1-a", 1]]),
        _record(1, "end", [[12.5, "gpu1-a", 1]]),  # sent to the broken pool 2.5 s into the fault
        _record(2, "lost", [[11.0, "gpu2-a", 1]], terminals=0),
        _record(3, "error:WORKER_RESET", [[13.0, "gpu2-a", 1]], terminals=2, after=4),
        _record(4, "end", [[14.0, "gpu2-a", 1], [14.1, "gpu2-b", 2], [14.2, "gpu1-b", 3], [14.3, "gpu2-a", 4]]),
        _record(5, "end", [[21.5, "gpu1-a", 1]]),  # back 1.5 s after the heal
    ]
    result.row = account(result)
    row = result.row
    assert (row["submitted"], row["completed"], row["lost"], row["duplicated"], row["tokens_after_terminal"],
            row["over_budget"]) == (6, 4, 1, 1, 4, 1)
    assert row["errored"] == {"WORKER_RESET": 1}
    assert (row["route_away_s"], row["recover_s"]) == (2.5, 1.5)
    problems = " | ".join(check(result, _lab()))
    for expected in ("lost = 1", "duplicated = 1", "tokens_after_terminal = 4", "over_budget = 1",
                     "errors where none are allowed", "still went to gpu1-a 2.5 s", "correlation ids"):
        assert expected in problems


def test_a_scenario_that_held_has_nothing_to_report():
    scenario = Scenario(name="s", title="t", broken=("gpu1-a",))
    result = Result(scenario=scenario, fault_at=10.0, heal_at=20.0, mid_stream=True, correlation="1/1")
    result.records = [_record(0, "error:DECODE_TIMEOUT", [[9.5, "gpu1-a", 1]]),
                      _record(1, "end", [[10.2, "gpu1-a", 1]]), _record(2, "end", [[20.4, "gpu1-a", 1]])]
    result.row = account(result)
    assert (result.row["route_away_s"], result.row["recover_s"]) == (0.2, 0.4)
    assert check(result, _lab()) == []


def test_the_lab_never_clears_a_directory_that_is_not_a_labs(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    lab = LabCluster(LabConfig(lab_dir=tmp_path, prefix="lt", subnet="10.213.99"))
    with pytest.raises(LabError, match="refusing to clear it"):
        lab.check_lab_dir()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "lab.json").write_text("{}")  # an earlier lab's: cleared at the next up
    lab.check_lab_dir()
