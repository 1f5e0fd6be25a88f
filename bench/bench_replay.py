"""Replay throughput: simulated tasks per wall-clock second, through the real core.

Aim: at least 50k simulated tasks/s (decode modelled per task, not per token). The figure is
recorded in ``extra_info`` as tasks_per_s; compare compiled and pure runs from one session.
"""

import pathlib

import pytest

from llama_orch.ext import queue as queue_selector
from llama_orch.sim.simulator import SimConfig, Simulation
from llama_orch.sim.traces import read_trace, scale_trace

TRACE = pathlib.Path(__file__).parent / "traces" / "azure2023_conv.csv"


@pytest.fixture(scope="module")
def records():
    return scale_trace(read_trace(TRACE), limit=5_000)


def test_replay_tasks_per_second(benchmark, records):
    config = SimConfig(pools=8, slots_per_pool=4, pool_losses=1, slow_engines=1)

    def run():
        return Simulation(records, config=config, seed=1).run()

    result = benchmark.pedantic(run, rounds=3, iterations=1)
    assert len(result.tasks) == len(records)
    if benchmark.enabled:
        benchmark.extra_info["tasks_per_s"] = round(len(records) / benchmark.stats.stats.min)
        benchmark.extra_info["queue_impl"] = queue_selector.IMPLEMENTATION
