"""AdmissionQueue: behaviour of both implementations, and a differential test against
a list-based reference model."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

INTERACTIVE, BATCH = 0, 1


@pytest.fixture
def Q(queue_impl):
    return queue_impl.AdmissionQueue


# -- construction ---------------------------------------------------------------------


def test_defaults(Q):
    q = Q(10)
    assert q.capacity == 10
    assert q.num_classes == 2
    assert len(q) == 0
    assert not q
    assert not q.is_full
    assert q.pop() is None
    assert q.peek() is None
    assert list(q) == []


@pytest.mark.parametrize(
    ("args", "exc"),
    [
        ((0,), ValueError),
        ((-1,), ValueError),
        ((1, 0), ValueError),
        ((1, 65), ValueError),
        ((1.5,), TypeError),
        (("3",), TypeError),
        ((2**70,), OverflowError),
    ],
)
def test_bad_construction(Q, args, exc):
    with pytest.raises(exc):
        Q(*args)


def test_read_only_attributes(Q):
    q = Q(3, 3)
    with pytest.raises(AttributeError):
        q.capacity = 5
    with pytest.raises(AttributeError):
        q.num_classes = 1
    with pytest.raises(AttributeError):
        q.is_full = True


# -- ordering and positions -----------------------------------------------------------


def test_fifo_within_class(Q):
    q = Q(100)
    for i in range(10):
        assert q.push(f"t{i}", BATCH) == i
    assert [q.pop() for _ in range(10)] == [f"t{i}" for i in range(10)]
    assert q.pop() is None


def test_interactive_served_before_batch(Q):
    q = Q(100)
    q.push("b0", BATCH)
    q.push("b1", BATCH)
    assert q.push("i0", INTERACTIVE) == 0
    assert q.push("i1", INTERACTIVE) == 1
    assert q.push("b2", BATCH) == 4
    assert list(q) == ["i0", "i1", "b0", "b1", "b2"]
    assert q.peek() == "i0"
    assert [q.pop() for _ in range(5)] == ["i0", "i1", "b0", "b1", "b2"]


def test_positions_count_live_keys_only(Q):
    q = Q(100, num_classes=3)
    q.push("a", 2)
    q.push("b", 1)
    q.push("c", 0)
    q.push("d", 1)
    assert q.remove("b")
    # class 0: c; class 1: d; class 2: a
    assert q.push("e", 1) == 2
    assert q.push("f", 2) == 4
    assert q.push("g", 0) == 1
    assert list(q) == ["c", "g", "d", "e", "a", "f"]


def test_pop_class_and_len_class(Q):
    q = Q(10)
    q.push("i0", INTERACTIVE)
    q.push("b0", BATCH)
    q.push("b1", BATCH)
    assert q.len_class(INTERACTIVE) == 1
    assert q.len_class(BATCH) == 2
    # drop-lru eviction: oldest batch first, then oldest interactive
    assert q.pop_class(BATCH) == "b0"
    assert q.pop_class(BATCH) == "b1"
    assert q.pop_class(BATCH) is None
    assert q.pop_class(INTERACTIVE) == "i0"
    assert q.pop_class(INTERACTIVE) is None
    assert len(q) == 0


def test_head_is_non_mutating(Q):
    q = Q(10)
    for k in "abcde":
        q.push(k, BATCH)
    q.push("x", INTERACTIVE)
    assert q.head(BATCH, 3) == ["a", "b", "c"]
    assert q.head(BATCH, 100) == ["a", "b", "c", "d", "e"]
    assert q.head(BATCH, 0) == []
    assert q.head(INTERACTIVE, 2) == ["x"]
    q.remove("b")
    q.remove("a")
    assert q.head(BATCH, 2) == ["c", "d"]
    assert len(q) == 4
    assert list(q) == ["x", "c", "d", "e"]


def test_head_bad_arguments(Q):
    q = Q(10)
    with pytest.raises(ValueError):
        q.head(BATCH, -1)
    with pytest.raises(ValueError):
        q.head(2, 1)
    with pytest.raises(TypeError):
        q.head(BATCH, 1.5)


# -- cancel ---------------------------------------------------------------------------


def test_remove(Q):
    q = Q(10)
    q.push("a", BATCH)
    q.push("b", BATCH)
    q.push("c", INTERACTIVE)
    assert q.remove("a") is True
    assert q.remove("a") is False
    assert q.remove("zzz") is False
    assert "a" not in q
    assert len(q) == 2
    assert q.len_class(BATCH) == 1
    assert q.priority_of("a") is None
    assert [q.pop(), q.pop(), q.pop()] == ["c", "b", None]


def test_cancel_then_pop_skips(Q):
    q = Q(10)
    for k in "abcd":
        q.push(k, BATCH)
    q.remove("a")
    q.remove("c")
    assert q.peek() == "b"
    assert q.pop() == "b"
    assert q.pop() == "d"
    assert q.pop() is None


def test_readd_after_remove_same_class(Q):
    q = Q(10)
    q.push("z", BATCH)
    q.push("a", BATCH)
    q.push("b", BATCH)
    q.remove("a")
    # "a"'s old slot is now a tombstone ahead of "b", its new one behind it
    assert q.push("a", BATCH) == 2
    assert list(q) == ["z", "b", "a"]
    assert q.head(BATCH, 5) == ["z", "b", "a"]
    assert q.position("a") == 2
    assert q.pop() == "z"
    assert q.pop() == "b"
    assert q.pop() == "a"
    assert q.pop() is None


def test_readd_after_remove_other_class(Q):
    q = Q(10)
    q.push("a", BATCH)
    q.push("b", BATCH)
    q.remove("a")
    q.push("a", INTERACTIVE)
    assert q.priority_of("a") == INTERACTIVE
    assert q.pop_class(BATCH) == "b"
    assert q.pop_class(BATCH) is None
    assert q.pop() == "a"


def test_remove_readd_many_times(Q):
    q = Q(10)
    q.push("z", BATCH)
    for _ in range(5):
        q.push("a", BATCH)
        q.remove("a")
    q.push("a", BATCH)
    assert list(q) == ["z", "a"]
    assert q.head(BATCH, 10) == ["z", "a"]
    assert [q.pop(), q.pop(), q.pop()] == ["z", "a", None]


# -- position -------------------------------------------------------------------------


def test_position_within_own_class(Q):
    q = Q(100)
    q.push("b0", BATCH)
    q.push("i0", INTERACTIVE)
    q.push("b1", BATCH)
    q.push("i1", INTERACTIVE)
    assert [q.position(k) for k in ("i0", "i1", "b0", "b1")] == [0, 1, 0, 1]
    assert q.position("nope") is None
    q.pop()
    assert q.position("i1") == 0
    assert q.position("i0") is None


def test_position_after_removals_head_middle_tail(Q):
    q = Q(100)
    keys = [f"k{i}" for i in range(10)]
    for k in keys:
        q.push(k, BATCH)
    for gone in ("k0", "k4", "k5", "k9", "k1"):  # head, middle, middle, tail, new head
        q.remove(gone)
        keys.remove(gone)
        assert [q.position(k) for k in keys] == list(range(len(keys)))
    assert q.position("k4") is None


def test_position_when_the_live_span_wraps_the_ring(Q):
    q = Q(8, num_classes=1)  # an 8-slot ring
    for i in range(6):
        q.push(i, 0)
    for _ in range(4):
        q.pop()  # head at slot 4
    for i in range(6, 11):
        q.push(i, 0)  # slots 6, 7, then 0, 1, 2
    q.remove(6)
    q.remove(8)  # tombstones on both sides of the wrap
    assert list(q) == [4, 5, 7, 9, 10]
    assert [q.position(k) for k in (4, 5, 7, 9, 10)] == [0, 1, 2, 3, 4]


def test_position_after_compaction_and_growth(Q):
    q = Q(100_000)
    live = []
    for i in range(3000):
        q.push(i, BATCH)
        live.append(i)
        if i % 3:
            victim = live.pop(len(live) // 2)  # from the middle: tombstones, then compactions
            assert q.remove(victim)
    assert list(q) == live
    assert [q.position(k) for k in live] == list(range(len(live)))


def test_position_restarts_after_clear(Q):
    q = Q(10)
    for k in "abcd":
        q.push(k, BATCH)
    q.remove("b")
    q.clear()
    assert q.position("a") is None
    q.push("z", BATCH)
    q.push("y", BATCH)
    assert (q.position("z"), q.position("y")) == (0, 1)


# -- errors ---------------------------------------------------------------------------


def test_duplicate_key(Q):
    q = Q(10)
    q.push("a", BATCH)
    with pytest.raises(KeyError):
        q.push("a", BATCH)
    with pytest.raises(KeyError):
        q.push("a", INTERACTIVE)
    assert len(q) == 1
    q.pop()
    q.push("a", INTERACTIVE)  # no longer live: fine


def test_full(Q):
    q = Q(3)
    q.push("a", BATCH)
    q.push("b", INTERACTIVE)
    q.push("c", BATCH)
    assert q.is_full
    with pytest.raises(OverflowError, match="full"):
        q.push("d", INTERACTIVE)
    assert len(q) == 3
    q.remove("b")
    assert not q.is_full
    assert q.push("d", INTERACTIVE) == 0


def test_bad_priority(Q):
    q = Q(10)
    for bad in (-1, 2, 100):
        with pytest.raises(ValueError, match="priority"):
            q.push("a", bad)
        with pytest.raises(ValueError):
            q.pop_class(bad)
        with pytest.raises(ValueError):
            q.len_class(bad)
    with pytest.raises(TypeError):
        q.push("a", "0")
    with pytest.raises(TypeError):
        q.push("a", 0.0)
    assert len(q) == 0


def test_none_and_unhashable_keys(Q):
    q = Q(10)
    with pytest.raises(TypeError):
        q.push(None, BATCH)
    with pytest.raises(TypeError):
        q.push(["list"], BATCH)
    q.push("a", BATCH)
    with pytest.raises(TypeError):
        q.remove(["list"])
    with pytest.raises(TypeError):
        ["list"] in q  # noqa: B015
    assert len(q) == 1


def test_non_string_keys(Q):
    q = Q(10)
    q.push(1, BATCH)
    q.push((2, "x"), INTERACTIVE)
    assert list(q) == [(2, "x"), 1]
    assert q.remove(1)
    assert 1 not in q


# -- misc -----------------------------------------------------------------------------


def test_contains_priority_of_clear(Q):
    q = Q(10, num_classes=4)
    q.push("a", 3)
    q.push("b", 0)
    assert "a" in q and "b" in q and "c" not in q
    assert q.priority_of("a") == 3
    assert q.priority_of("b") == 0
    assert q.priority_of("c") is None
    q.clear()
    assert len(q) == 0
    assert list(q) == []
    assert q.pop() is None
    assert q.push("a", 1) == 0


def test_iteration_is_a_snapshot(Q):
    q = Q(10)
    for k in "abc":
        q.push(k, BATCH)
    seen = []
    for k in q:
        seen.append(k)
        q.remove(k)
        q.push(k + "'", INTERACTIVE)
    assert seen == ["a", "b", "c"]
    assert list(q) == ["a'", "b'", "c'"]


def test_twin_survives_pickling_with_tombstones():
    import pickle

    from llama_orch.ext import _queue_py

    q = _queue_py.AdmissionQueue(10)
    for k in "abcd":
        q.push(k, BATCH)
    q.remove("b")  # a tombstone: must stay one after the round trip
    copy = pickle.loads(pickle.dumps(q))
    assert list(copy) == ["a", "c", "d"] and copy.position("d") == 2
    assert [copy.pop() for _ in range(4)] == ["a", "c", "d", None]


def test_repr(Q):
    q = Q(5)
    q.push("a", 1)
    assert repr(q) == "<AdmissionQueue 1/5 keys, per class [0, 1]>"


def test_single_class(Q):
    q = Q(2, num_classes=1)
    assert q.push("a", 0) == 0
    assert q.push("b", 0) == 1
    with pytest.raises(ValueError):
        q.push("c", 1)
    assert q.pop() == "a"


def test_growth_beyond_initial_ring(Q):
    q = Q(100_000)
    keys = [f"k{i}" for i in range(5000)]
    for i, k in enumerate(keys):
        assert q.push(k, BATCH) == i
    assert len(q) == 5000
    assert q.head(BATCH, 3) == keys[:3]
    assert list(q) == keys
    assert [q.pop() for _ in keys] == keys
    assert q.pop() is None


def test_compaction_under_cancel_churn(Q):
    """Many cancels while a few keys stay queued: order kept, storage bounded."""
    q = Q(1000)
    q.push("anchor0", BATCH)
    live = ["anchor0"]
    for i in range(20_000):
        key = f"t{i}"
        q.push(key, BATCH)
        if i % 50 == 0:
            live.append(key)  # a few survive
        else:
            assert q.remove(key)
        if i % 3 == 0:
            q.push(f"i{i}", INTERACTIVE)
            q.remove(f"i{i}")
    assert list(q) == live
    assert q.len_class(BATCH) == len(live)
    assert q.len_class(INTERACTIVE) == 0
    assert [q.pop() for _ in live] == live
    assert q.pop() is None


def test_churn_memory_is_bounded(Q):
    """Cancelled keys are not retained: memory after churn is O(live keys)."""
    q = Q(10_000)
    for i in range(64):
        q.push(f"keep{i}", BATCH)

    def churn(n):
        for i in range(n):
            k = f"c{i}"
            q.push(k, BATCH)
            q.remove(k)

    churn(5000)  # reach steady state
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        churn(100_000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown
    assert len(q) == 64
    assert q.head(BATCH, 2) == ["keep0", "keep1"]


def test_drained_burst_releases_storage(Q):
    q = Q(1 << 20)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(50_000):
            q.push(i, BATCH)
        peak = tracemalloc.get_traced_memory()[0] - base
        while q.pop() is not None:
            pass
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert after < peak / 10, (after, peak)


def test_memory_per_key_is_small(Q):
    keys = [f"task-{i:08d}" for i in range(100_000)]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        q = Q(len(keys))
        for i, k in enumerate(keys):
            q.push(k, i & 1)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    # The index dict is ~40 bytes/key at this size, each key's packed sequence number
    # (the int that makes position() O(log n)) 28-32 more, the ring slots ~10.
    assert used / len(keys) < 88, used / len(keys)
    assert len(q) == len(keys)


# -- differential: both implementations against a reference model --------------------


class Model:
    """The obvious O(n) implementation: one list per class."""

    def __init__(self, capacity, num_classes):
        self.capacity = capacity
        self.classes = [[] for _ in range(num_classes)]

    def _check(self, priority):
        if not 0 <= priority < len(self.classes):
            raise ValueError(priority)

    def where(self, key):
        for p, keys in enumerate(self.classes):
            if key in keys:
                return p
        return None

    def push(self, key, priority):
        self._check(priority)
        if self.where(key) is not None:
            raise KeyError(key)
        if len(self) >= self.capacity:
            raise OverflowError
        position = sum(len(c) for c in self.classes[:priority]) + len(self.classes[priority])
        self.classes[priority].append(key)
        return position

    def pop(self):
        for keys in self.classes:
            if keys:
                return keys.pop(0)
        return None

    def pop_class(self, priority):
        self._check(priority)
        keys = self.classes[priority]
        return keys.pop(0) if keys else None

    def peek(self):
        return next((keys[0] for keys in self.classes if keys), None)

    def head(self, priority, limit):
        self._check(priority)
        return self.classes[priority][:limit]

    def remove(self, key):
        p = self.where(key)
        if p is None:
            return False
        self.classes[p].remove(key)
        return True

    def priority_of(self, key):
        return self.where(key)

    def position(self, key):
        p = self.where(key)
        return None if p is None else self.classes[p].index(key)

    def len_class(self, priority):
        self._check(priority)
        return len(self.classes[priority])

    def clear(self):
        for keys in self.classes:
            keys.clear()

    def __len__(self):
        return sum(map(len, self.classes))

    def __contains__(self, key):
        return self.where(key) is not None

    def __iter__(self):
        return iter([k for keys in self.classes for k in keys])

    @property
    def is_full(self):
        return len(self) >= self.capacity


KEY_NAMES = [f"k{i}" for i in range(24)]
KEYS = st.sampled_from(KEY_NAMES)
PRIORITY = st.integers(-1, 3)
OPS = st.one_of(
    st.tuples(st.just("push"), KEYS, PRIORITY),
    st.tuples(st.just("push"), KEYS, st.integers(0, 1)),
    st.tuples(st.just("push"), KEYS, st.integers(0, 1)),
    st.tuples(st.just("remove"), KEYS),
    st.tuples(st.just("remove"), KEYS),
    st.tuples(st.just("pop")),
    st.tuples(st.just("pop_class"), PRIORITY),
    st.tuples(st.just("peek")),
    st.tuples(st.just("head"), PRIORITY, st.integers(0, 30)),
    st.tuples(st.just("priority_of"), KEYS),
    st.tuples(st.just("position"), KEYS),
    st.tuples(st.just("len_class"), PRIORITY),
    st.tuples(st.just("__contains__"), KEYS),
    st.tuples(st.just("__len__")),
    st.tuples(st.just("__iter__")),
    st.tuples(st.just("is_full")),
    st.tuples(st.just("clear")),
)


def _apply(obj, op):
    name, *args = op
    try:
        if name == "is_full":
            return obj.is_full
        result = getattr(obj, name)(*args)
        if name == "__iter__":
            result = list(result)
        return result
    except (KeyError, ValueError, OverflowError) as exc:
        return type(exc)


def _positions(queue):
    return [queue.position(k) for k in KEY_NAMES]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(1, 40), num_classes=st.integers(1, 3), ops=st.lists(OPS, max_size=300))
def test_matches_reference_model(queue_impl, capacity, num_classes, ops):
    q = queue_impl.AdmissionQueue(capacity, num_classes)
    model = Model(capacity, num_classes)
    for op in ops:
        assert _apply(q, op) == _apply(model, op), op
        assert _positions(q) == _positions(model), op
    assert list(q) == list(model)
    assert len(q) == len(model)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(1, 40), ops=st.lists(OPS, max_size=300))
def test_implementations_agree(queue_impls, capacity, ops):
    queues = {name: mod.AdmissionQueue(capacity, 2) for name, mod in queue_impls.items()}
    for op in ops:
        results = {name: _apply(q, op) for name, q in queues.items()}
        assert results["py"] == results["c"], op
        assert _positions(queues["py"]) == _positions(queues["c"]), op
    assert repr(queues["py"]) == repr(queues["c"])


# Churn-heavy: few classes, small rings, mostly push/remove/pop, so that rings wrap,
# fill with tombstones, compact and double many times within one example.
CHURN_OPS = st.one_of(
    st.tuples(st.just("push"), KEYS, st.integers(0, 1)),
    st.tuples(st.just("push"), KEYS, st.integers(0, 1)),
    st.tuples(st.just("push"), KEYS, st.integers(0, 1)),
    st.tuples(st.just("remove"), KEYS),
    st.tuples(st.just("remove"), KEYS),
    st.tuples(st.just("pop")),
    st.tuples(st.just("pop_class"), st.integers(0, 1)),
    st.tuples(st.just("head"), st.integers(0, 1), st.integers(0, 30)),
    st.tuples(st.just("clear")),
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(1, 24), ops=st.lists(CHURN_OPS, min_size=100, max_size=600))
def test_positions_under_churn_match_model(queue_impls, capacity, ops):
    queues = {name: mod.AdmissionQueue(capacity, 2) for name, mod in queue_impls.items()}
    model = Model(capacity, 2)
    for op in ops:
        expected = _apply(model, op)
        for q in queues.values():
            assert _apply(q, op) == expected, op
        positions = _positions(model)
        for q in queues.values():
            assert _positions(q) == positions, op


@pytest.mark.parametrize("seed", range(4))
def test_positions_long_random_run(Q, seed):
    """Thousands of operations over a few hundred keys: many wraps, compactions and
    doublings; every position checked against the model throughout."""
    import random

    rng = random.Random(seed)
    names = [f"t{i}" for i in range(300)]
    q, model = Q(200, 2), Model(200, 2)
    for step in range(6000):
        roll = rng.random()
        key = rng.choice(names)
        if roll < 0.45:
            op = ("push", key, rng.randrange(2))
        elif roll < 0.75:
            op = ("remove", key)
        elif roll < 0.95:
            op = ("pop",) if rng.random() < 0.7 else ("pop_class", rng.randrange(2))
        elif roll < 0.999:
            op = ("head", rng.randrange(2), rng.randrange(40))
        else:
            op = ("clear",)
        assert _apply(q, op) == _apply(model, op), (step, op)
        if step % 7 == 0:
            assert [q.position(k) for k in names] == [model.position(k) for k in names], step
    assert list(q) == list(model)
