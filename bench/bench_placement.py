"""Benchmarks of placement: one decision is ``pick`` + ``acquire`` + ``release`` (a task placed,
dispatched and finished), over 8, 64 and 256 ready pools, for each strategy; plus ``explain``
(a full scan, on demand) over 256 pools.

Run with ``python -m pytest bench/bench_placement.py --benchmark-only``. The table's times are
per decision. Target (not asserted): under 20 us per decision at 256 pools for ``vram-aware``.
"""

from __future__ import annotations

import random

import pytest

from llama_orch.core.placement import Pick, Placer, Strategy
from llama_orch.core.types import PlacementMode, PlacementRequest, PoolSnapshot, TaskSpec

MODEL = "file:/models/llama-3-8b-q4.gguf"
GB = 1 << 30
SIZES = [8, 64, 256]


def cluster(strategy: Strategy, n: int) -> Placer:
    """n ready pools of one model, varied VRAM and slots, about a third of the slots leased."""
    r = random.Random(n)
    placer = Placer(strategy, rng=random.Random(1))
    for i in range(n):
        slots = r.choice([2, 4, 8])
        placer.update(PoolSnapshot(
            pool_id=f"pool-{i:04d}", ready=True, slots_total=slots, slots_free=slots,
            vram_total_bytes=80 * GB, vram_free_bytes=r.randrange(1, 64) * GB, model_ref=MODEL,
            ctx_max=8192, device_mask=str(i % 8), replica_id=f"r-{i % 16:02d}",
            engine_url=f"http://10.0.{i // 250}.{i % 250}:8080"), 0)
        for _ in range(slots // 3):
            placer.acquire(f"pool-{i:04d}")
    # a few pools that must be skipped: unready, draining, another model
    for i in range(max(1, n // 16)):
        placer.update(PoolSnapshot(pool_id=f"zz-unready-{i}", ready=False, vram_free_bytes=70 * GB,
                                   model_ref=MODEL), 0)
        placer.update(PoolSnapshot(pool_id=f"zz-other-{i}", ready=True, vram_free_bytes=70 * GB,
                                   model_ref="hf:other/model"), 0)
    return placer


def spec(**kw) -> TaskSpec:
    return TaskSpec(task_id="t-1", session_id="s-1", model_ref=MODEL, ctx=2048, **kw)


def _decision(placer: Placer, task: TaskSpec, session_pool: str | None = None):
    def cycle() -> None:
        d = placer.pick(task, session_pool)
        placer.acquire(d.pool_id)  # type: ignore[union-attr]
        placer.release(d.pool_id)  # type: ignore[union-attr]
    return cycle


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("strategy", list(Strategy), ids=lambda s: s.value)
def test_pick_acquire_release(benchmark, strategy, n):
    placer = cluster(strategy, n)
    task = spec()
    assert isinstance(placer.pick(task), Pick)
    free_before = placer.free_total
    benchmark.group = f"decision: {strategy.value}"
    benchmark(_decision(placer, task))
    assert placer.free_total == free_before  # every lease was returned
    if benchmark.enabled:
        benchmark.extra_info["us_per_decision"] = round(benchmark.stats.stats.median * 1e6, 2)


@pytest.mark.parametrize("n", SIZES)
def test_vram_aware_with_session_and_avoid(benchmark, n):
    """The default strategy on the common non-trivial paths: session affinity and a soft avoid."""
    placer = cluster(Strategy.VRAM_AWARE, n)
    best = placer.pick(spec()).pool_id  # type: ignore[union-attr]
    task = spec(placement=PlacementRequest(avoid_pools=(best,)))
    benchmark.group = "decision: vram-aware, session + avoid"
    benchmark(_decision(placer, task, session_pool="pool-0003"))
    if benchmark.enabled:
        benchmark.extra_info["us_per_decision"] = round(benchmark.stats.stats.median * 1e6, 2)


def test_pin_256(benchmark):
    placer = cluster(Strategy.VRAM_AWARE, 256)
    task = spec(placement=PlacementRequest(mode=PlacementMode.PIN, pin_pool_id="pool-0100"))
    benchmark.group = "decision: pin"
    benchmark(_decision(placer, task))


@pytest.mark.parametrize("strategy", [Strategy.VRAM_AWARE, Strategy.ROUND_ROBIN], ids=lambda s: s.value)
def test_explain_256(benchmark, strategy):
    placer = cluster(strategy, 256)
    task = spec()
    benchmark.group = "explain (256 pools)"
    ex = benchmark(placer.explain, task)
    assert len(ex.candidates) == 256 + 2 * 16 and ex.picked is not None


@pytest.mark.parametrize("n", SIZES)
def test_prefix_aware_with_a_64_block_chain(benchmark, n):
    """``prefix-aware`` with a 64-block prompt prefix (4k tokens in blocks of 64), a quarter of the
    pools holding part of it (up to the whole) and every pool's index full of other prefixes.
    Aim: within 2x of ``least-loaded`` at the same size (the same walk, plus the prefix match)."""
    placer = cluster(Strategy.PREFIX_AWARE, n)
    r = random.Random(7)
    chain = tuple(r.getrandbits(64) for _ in range(64))
    for i in range(n):
        pool_id = f"pool-{i:04d}"
        for _ in range(16):  # other conversations' prefixes
            placer.record_prefix(pool_id, tuple(r.getrandbits(64) for _ in range(64)))
        if i % 4 == 0:
            placer.record_prefix(pool_id, chain[:r.randrange(1, 65)])
    task = spec(prefix=chain)
    assert isinstance(placer.pick(task), Pick)
    benchmark.group = "decision: prefix-aware, 64-block chain"
    benchmark(_decision(placer, task))
    if benchmark.enabled:
        benchmark.extra_info["us_per_decision"] = round(benchmark.stats.stats.median * 1e6, 2)
