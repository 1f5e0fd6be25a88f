"""Replay throughput: simulated tasks per wall-clock second, through the real core.

Aim: at least 50k simulated tasks/s (decode modelled per task, not per token). The figure is
recorded in ``extra_info`` as tasks_per_s, for the compiled admission queue and its twin.
"""

import pathlib

import pytest

import llama_orch.core.admission as admission_module
from llama_orch.ext import implementations
from llama_orch.sim.simulator import SimConfig, Simulation
from llama_orch.sim.traces import read_trace, scale_trace

TRACE = pathlib.Path(__file__).parent / "traces" / "azure2023_conv.csv"


@pytest.fixture(scope="module")
def records():
    return scale_trace(read_trace(TRACE), limit=5_000)


@pytest.mark.parametrize("impl", ["py", "c"])
def test_replay_tasks_per_second(benchmark, impl_timing, monkeypatch, records, impl):
    found = implementations("queue")
    if impl not in found:
        pytest.skip("llama_orch.ext._queue_c is not built")
    monkeypatch.setattr(admission_module, "AdmissionQueue", found[impl].AdmissionQueue)
    config = SimConfig(pools=8, slots_per_pool=4, pool_losses=1, slow_engines=1)

    def run():
        return Simulation(records, config=config, seed=1).run()

    benchmark.group = "replay: 5000 tasks of azure2023_conv"
    result = benchmark.pedantic(run, rounds=5, iterations=1)
    assert len(result.tasks) == len(records)
    if benchmark.enabled:
        median = benchmark.stats.stats.median
        benchmark.extra_info["tasks_per_s"] = round(len(records) / median)
        impl_timing("replay: 5000 tasks", impl, median,
                    note=f"{len(records) / median:,.0f} simulated tasks/s")
