"""The core end to end: one task's whole life, admission under churn, memory of a deep queue.

Each figure is taken with the compiled admission queue and with its pure twin (the core's
queue class is swapped for the run), so the summary at the end shows what the Cython hot
path buys at the level that matters: tasks through the orchestrator per second.
"""

from __future__ import annotations

import random
import tracemalloc

import pytest

import llama_orch.core.admission as admission_module
from llama_orch.core.admission import QueuePolicy
from llama_orch.core.events import PoolUpdated, StreamEnded, TaskCanceled, TaskSubmitted, TokensReceived
from llama_orch.core.orchestrator import Orchestrator, OrchestratorConfig
from llama_orch.core.types import PoolSnapshot, Priority, TaskSpec
from llama_orch.ext import implementations

IMPLS = ["py", "c"]
MODEL = "file:/models/bench.gguf"


@pytest.fixture
def queue_impl(request, monkeypatch):
    found = implementations("queue")
    impl = request.param
    if impl not in found:
        pytest.skip("llama_orch.ext._queue_c is not built")
    monkeypatch.setattr(admission_module, "AdmissionQueue", found[impl].AdmissionQueue)
    return impl


def make_core(pools: int, slots: int, capacity: int = 1024) -> Orchestrator:
    core = Orchestrator(OrchestratorConfig(admission_capacity=capacity, admission_policy=QueuePolicy.DROP_LRU),
                        rng=random.Random(0))
    for i in range(pools):
        core.handle(PoolUpdated(snapshot=PoolSnapshot(
            pool_id=f"pool-{i:03d}", ready=True, slots_total=slots, slots_free=slots, model_ref=MODEL,
            vram_total_bytes=24 << 30, vram_free_bytes=(8 + i % 7) << 30, ctx_max=8192, replica_id=f"r{i}")), 0.0)
    return core


def specs(n: int, prefix: str, deadline_ms: int = 600_000) -> list[TaskSpec]:
    return [TaskSpec(task_id=f"{prefix}{i}", session_id=f"s{i % 50}", model_ref=MODEL,
                     priority=Priority.BATCH if i % 3 == 0 else Priority.INTERACTIVE, ctx=1024, max_tokens=64,
                     deadline_ms=deadline_ms) for i in range(n)]


@pytest.mark.parametrize("queue_impl", IMPLS, indirect=True)
def test_task_lifecycle_through_the_core(benchmark, impl_timing, queue_impl):
    """submit -> dispatch -> first token -> more tokens -> end, 1000 tasks over 64 pools x 4 slots."""
    batch = 1000

    def setup():
        return (make_core(64, 4), specs(batch, "t")), {}

    def run(core, tasks):
        handle = core.handle
        now = 0.0
        for spec in tasks:
            now += 0.1
            handle(TaskSubmitted(spec=spec), now)
            handle(TokensReceived(task_id=spec.task_id, count=1), now)
            handle(TokensReceived(task_id=spec.task_id, count=31), now)
            handle(StreamEnded(task_id=spec.task_id), now)
        assert core.outcomes["completed"] == batch

    benchmark.group = "core: task lifecycle x1000"
    benchmark.pedantic(run, setup=setup, rounds=15)
    if benchmark.enabled:
        per_task = benchmark.stats.stats.median / batch
        benchmark.extra_info["tasks_per_s"] = round(1 / per_task)
        impl_timing("core: task lifecycle x1000", queue_impl, benchmark.stats.stats.median)


@pytest.mark.parametrize("queue_impl", IMPLS, indirect=True)
def test_admission_churn_through_the_core(benchmark, impl_timing, queue_impl):
    """A saturated cluster: 2000 submissions into a 1024-deep queue (drop-lru), then cancel all."""

    def setup():
        core = make_core(8, 1)
        for spec in specs(8, "busy"):
            core.handle(TaskSubmitted(spec=spec), 0.0)
        return (core, specs(2000, "q")), {}

    def run(core, tasks):
        handle = core.handle
        for spec in tasks:
            handle(TaskSubmitted(spec=spec), 1.0)
        for spec in tasks:
            handle(TaskCanceled(task_id=spec.task_id), 2.0)
        assert len(core.admission) == 0

    benchmark.group = "core: enqueue+cancel x2000"
    benchmark.pedantic(run, setup=setup, rounds=15)
    if benchmark.enabled:
        impl_timing("core: enqueue+cancel x2000", queue_impl, benchmark.stats.stats.median)


@pytest.mark.parametrize("queue_impl", IMPLS, indirect=True)
def test_memory_of_100k_queued_tasks(benchmark, impl_timing, queue_impl):
    """100k tasks queued in the orchestrator (records, specs, queue, timers): aim under 200 MB."""
    n = 100_000

    def run():
        tracemalloc.start()
        core = make_core(1, 1, capacity=n + 1)
        for spec in specs(n + 1, "m", deadline_ms=10**12):
            core.handle(TaskSubmitted(spec=spec), 0.0)
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(core.admission) == n
        return current

    size = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["bytes"] = size
    benchmark.extra_info["bytes_per_task"] = round(size / n)
    impl_timing("core: 100k queued tasks", queue_impl, note=f"{size / 1e6:.1f} MB traced ({size / n:.0f} B/task)")
