"""Benchmarks of ``llama_orch.ext``: each compiled module against its pure-Python twin.

Run with ``python -m pytest bench/bench_ext.py --benchmark-only``.  Every benchmark
is parametrised over ``py`` and ``c`` and grouped by operation, so the table shows
the two side by side; the c/py speedups are printed at the end of the run and
stored in each ``c`` benchmark's ``extra_info`` (both from medians).  Targets (not asserted): compiled
queue >= 2x, batch framing >= 3x.
"""

from __future__ import annotations

import gc
import random
import tracemalloc

import orjson
import pytest

from llama_orch.ext import implementations

IMPLS = ["py", "c"]

LLAMA_TOKEN = (
    b'data: {"index":0,"content":" the","tokens":[],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":1,"tokens_evaluated":5}\n\n'
)
LLAMA_CHUNK = LLAMA_TOKEN * 64
TOKEN_EVENTS = [("token", orjson.dumps({"t": f" tok{i}", "i": i})) for i in range(64)]
KEYS = [f"task-{i:08d}" for i in range(10_000)]


def impl_module(unit: str, impl: str):
    found = implementations(unit)
    if impl not in found:
        pytest.skip(f"llama_orch.ext._{unit}_c is not built (python setup.py build_ext --inplace)")
    return found[impl]


@pytest.fixture
def measure(benchmark, impl_timing):
    """Run *fn* under pytest-benchmark in *group* and feed the speedup summary."""

    def run(group: str, impl: str, fn, *, setup=None, rounds: int = 100):
        benchmark.group = group
        if setup is None:
            benchmark(fn)
        else:
            benchmark.pedantic(fn, setup=setup, rounds=rounds)
        if not benchmark.enabled:  # a smoke run (--benchmark-disable): ran once, nothing to time
            return
        # Medians: a shared machine adds outliers that would dominate a mean ratio.
        median = benchmark.stats.stats.median
        impl_timing(group, impl, median)
        _medians.setdefault(group, {})[impl] = median
        py = _medians[group].get("py")
        if impl == "c" and py:
            benchmark.extra_info["c_speedup"] = round(py / median, 2)

    return run


_medians: dict[str, dict[str, float]] = {}


# -- admission queue ------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_queue_push_pop_10k(measure, impl):
    mod = impl_module("queue", impl)
    q = mod.AdmissionQueue(len(KEYS))
    push, pop = q.push, q.pop
    keys = KEYS

    def push_pop():
        for i, key in enumerate(keys):
            push(key, i & 1)
        for _ in keys:
            pop()

    measure("queue push+pop 10k", impl, push_pop)
    assert len(q) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_queue_remove_10k(measure, impl):
    mod = impl_module("queue", impl)
    order = KEYS[:]
    random.Random(7).shuffle(order)  # cancels arrive in no particular order

    def setup():
        q = mod.AdmissionQueue(len(KEYS))
        for i, key in enumerate(KEYS):
            q.push(key, i & 1)
        return (q,), {}

    def remove_all(q):
        remove = q.remove
        for key in order:
            remove(key)

    measure("queue remove 10k", impl, remove_all, setup=setup, rounds=60)


@pytest.mark.parametrize("impl", IMPLS)
def test_queue_memory_100k(benchmark, impl_timing, impl):
    """Bytes held by a queue of 100k keys (keys themselves excluded), via tracemalloc."""
    mod = impl_module("queue", impl)
    keys = [f"task-{i:08d}" for i in range(100_000)]
    result = {}

    def fill():
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            q = mod.AdmissionQueue(len(keys))
            for i, key in enumerate(keys):
                q.push(key, i & 1)
            result["bytes"] = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        return q

    benchmark.group = "queue memory 100k (timing includes tracemalloc)"
    benchmark.pedantic(fill, rounds=1, iterations=1)
    benchmark.extra_info["bytes"] = result["bytes"]
    benchmark.extra_info["bytes_per_key"] = round(result["bytes"] / len(keys), 1)
    impl_timing("queue memory 100k", impl, note=f"{result['bytes']:,} bytes ({result['bytes'] / len(keys):.1f} per key)")


# -- SSE ------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_sse_frame_events_64(measure, impl):
    mod = impl_module("sse", impl)
    frame_events, events = mod.frame_events, TOKEN_EVENTS
    measure("sse frame_events x64", impl, lambda: frame_events(events))


@pytest.mark.parametrize("impl", IMPLS)
def test_sse_frame_event(measure, impl):
    mod = impl_module("sse", impl)
    frame_event = mod.frame_event
    data = TOKEN_EVENTS[0][1]
    measure("sse frame_event x1", impl, lambda: frame_event("token", data))


@pytest.mark.parametrize("impl", IMPLS)
def test_sse_parser_feed_64(measure, impl):
    mod = impl_module("sse", impl)
    feed = mod.SSEParser().feed  # the chunk ends on an event boundary: state is reusable

    def run():
        assert len(feed(LLAMA_CHUNK)) == 64

    measure("sse SSEParser.feed 64 frames", impl, run)


@pytest.mark.parametrize("impl", IMPLS)
def test_sse_token_relay_feed_64(measure, impl):
    mod = impl_module("sse", impl)
    feed = mod.TokenRelay("llamacpp").feed  # no final frame: the relay stays open

    def run():
        assert feed(LLAMA_CHUNK)[1] == 64

    measure("sse TokenRelay.feed 64 frames", impl, run)
