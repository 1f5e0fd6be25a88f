"""Prefix-aware placement: the per-pool prefix index (against a model), and the strategy: the
longest cached prefix wins within the load slack, new prefixes spread, a shared system prompt
does not pile onto one pool, the cache is forgotten with the engine, and the other rules keep
their meaning."""

from collections import Counter, OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_orch.core.commands import Dispatch
from llama_orch.core.events import PoolUpdated, StreamEnded, TaskSubmitted
from llama_orch.core.orchestrator import Orchestrator, OrchestratorConfig
from llama_orch.core.placement import Pick, Placer, Strategy
from llama_orch.core.prefix import PrefixIndex
from llama_orch.core.types import PlacementMode, PlacementRequest, PoolSnapshot, TaskSpec

MODEL = "file:/models/m.gguf"


def snap(pool_id: str, **kw) -> PoolSnapshot:
    base = dict(pool_id=pool_id, ready=True, slots_total=4, slots_free=4, model_ref=MODEL, ctx_max=4096,
                replica_id=pool_id, engine_version="b1")
    base.update(kw)
    return PoolSnapshot(**base)


def task(chain=(), task_id="t-1", **kw) -> TaskSpec:
    return TaskSpec(task_id=task_id, session_id="s-" + task_id, model_ref=MODEL, ctx=512, prefix=tuple(chain), **kw)


def placer(n=4, slack=0.25, blocks=None) -> Placer:
    p = Placer(Strategy.PREFIX_AWARE, prefix_load_slack=slack, prefix_blocks_per_pool=blocks)
    for i in range(n):
        p.update(snap(f"p{i}"), 0)
    return p


def picked(decision) -> str:
    assert isinstance(decision, Pick), decision
    return decision.pool_id


# -- the index ----------------------------------------------------------------------------------


def test_the_deepest_block_held_is_the_match_and_first_blocks_leave_last():
    index = PrefixIndex()
    index.set_capacity("a", 4)
    index.record("a", (1, 2, 3))
    index.record("b", (1, 9))
    assert index.matches((1, 2, 3, 4)) == {"a": 3, "b": 1}
    index.record("a", (7, 8))  # over capacity: the oldest block goes, which is the old chain's last
    assert index.matches((1, 2, 3)) == {"a": 2, "b": 1}
    index.forget("a")
    assert index.matches((1, 2, 3)) == {"b": 1} and index.blocks("a") == 0
    index.check()


OPS = st.lists(st.tuples(st.sampled_from(["record", "forget", "capacity"]), st.sampled_from("abc"),
                         st.lists(st.integers(0, 12), max_size=6, unique=True), st.integers(1, 8)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=OPS, query=st.lists(st.integers(0, 12), max_size=6, unique=True))
def test_the_index_agrees_with_a_model_of_one_lru_per_pool(ops, query):
    index, model, caps = PrefixIndex(), {}, {}
    for op, pool, chain, cap in ops:
        if op == "record":
            lru = model.setdefault(pool, OrderedDict())
            for block in reversed(chain):
                lru.pop(block, None)
                lru[block] = None
            index.record(pool, tuple(chain))
        elif op == "forget":
            model.pop(pool, None)
            index.forget(pool)
        else:
            caps[pool] = cap
            index.set_capacity(pool, cap)
        for p, lru in model.items():
            while p in caps and len(lru) > caps[p]:
                lru.popitem(last=False)
        index.check()
    expected = {}
    for pool, lru in model.items():
        depth = max((k + 1 for k, block in enumerate(query) if block in lru), default=0)
        if depth:
            expected[pool] = depth
    assert index.matches(tuple(query)) == expected


# -- the strategy -------------------------------------------------------------------------------


def test_the_pool_holding_the_longest_prefix_wins():
    p = placer()
    p.record_prefix("p2", (10, 11, 12))
    p.record_prefix("p3", (10, 11))
    assert picked(p.pick(task((10, 11, 12, 13)))) == "p2"
    assert picked(p.pick(task((10, 11, 99)))) in ("p2", "p3")  # two blocks on both: either
    explanation = {c.pool_id: c.prefix_blocks for c in p.explain(task((10, 11, 12))).candidates}
    assert explanation == {"p0": 0, "p1": 0, "p2": 3, "p3": 2}


def test_a_busier_pool_wins_for_its_prefix_only_within_the_slack():
    p = placer(slack=0.25)  # one more lease of four
    p.record_prefix("p1", (5, 6))
    p.acquire("p1")
    assert picked(p.pick(task((5, 6)))) == "p1"
    p.acquire("p1")  # two leases ahead of the idle pools: too busy for its cache
    assert picked(p.pick(task((5, 6)))) != "p1"


def test_a_new_prefix_goes_to_a_least_loaded_pool_chosen_by_the_prefix():
    p = placer(n=8)
    p.acquire("p0")
    chosen = Counter(picked(p.pick(task((1000 + i,)))) for i in range(400))
    assert "p0" not in chosen and len(chosen) == 7 and min(chosen.values()) > 25  # spread, not first-in-order
    again = placer(n=8)
    again.acquire("p0")
    assert [picked(again.pick(task((1000 + i,)))) for i in range(20)] == \
           [picked(p.pick(task((1000 + i,)))) for i in range(20)]  # the same in every process


def test_one_shared_system_prompt_block_does_not_pile_onto_one_pool():
    core = Orchestrator(OrchestratorConfig(placement_strategy=Strategy.PREFIX_AWARE, admission_capacity=1000))
    for i in range(4):
        core.handle(PoolUpdated(snapshot=snap(f"p{i}")), 0.0)
    placed: Counter = Counter()
    running = []
    for i in range(200):  # every prompt: the same first block (a system prompt), then its own
        now = float(i + 1)
        for cmd in core.handle(TaskSubmitted(spec=task((7, 100 + i), task_id=f"t{i}", max_tokens=4)), now):
            if isinstance(cmd, Dispatch):
                placed[cmd.pool_id] += 1
                running.append((cmd.task_id, cmd.attempt))
        if len(running) >= 8:  # tasks end in arrival order, half the slots busy on average
            task_id, attempt = running.pop(0)
            core.handle(StreamEnded(task_id=task_id, tokens_out=0, attempt=attempt), now)
    assert set(placed) == {"p0", "p1", "p2", "p3"}
    assert max(placed.values()) <= 1.15 * sum(placed.values()) / 4, placed
    core.check_invariants()


def test_a_pool_forgets_its_cache_when_its_engine_goes_down_or_is_replaced():
    p = placer()
    p.record_prefix("p1", (1, 2))
    p.update(snap("p1", engine_version="b2"), 1)  # another engine build: a fresh cache
    assert p.prefix.matches((1, 2)) == {}
    p.record_prefix("p1", (1, 2))
    p.update(snap("p1", engine_version="b2", ready=False), 2)  # reload or restart
    assert p.prefix.matches((1, 2)) == {}
    p.record_prefix("p2", (1, 2))
    p.set_flags("p2", lost=True)
    assert p.prefix.matches((1, 2)) == {}


def test_session_stickiness_and_avoid_keep_their_meaning():
    p = placer()
    p.record_prefix("p3", (1, 2, 3))
    assert picked(p.pick(task((1, 2, 3)), session_pool="p0")) == "p0"  # the session's pool first
    avoid = PlacementRequest(mode=PlacementMode.AUTO, avoid_pools=("p3",))
    assert picked(p.pick(task((1, 2, 3), placement=avoid))) != "p3"
    pin = PlacementRequest(mode=PlacementMode.PIN, pin_pool_id="p1")
    assert picked(p.pick(task((1, 2, 3), placement=pin))) == "p1"


def test_the_index_is_bounded_by_the_pools_cache_in_blocks():
    p = placer(n=1)
    assert p.prefix.capacity("p0") == 4 * 4096 // 64  # slots x context, in blocks of 64 tokens
    small = placer(n=1, blocks=3)
    small.record_prefix("p0", tuple(range(10)))
    assert small.prefix.blocks("p0") == 3 and small.prefix.matches((0, 1, 2)) == {"p0": 3}


def test_other_strategies_keep_no_index():
    p = Placer(Strategy.LEAST_LOADED)
    p.update(snap("p0"), 0)
    p.record_prefix("p0", (1, 2))
    assert p.prefix.matches((1, 2)) == {}


@pytest.mark.parametrize("chain", [[1, 2], "12"])
def test_a_prefix_must_be_a_tuple(chain):
    from llama_orch.core.errors import UsageError

    with pytest.raises(UsageError, match="prefix"):
        TaskSpec(task_id="t", session_id="s", model_ref=MODEL, prefix=chain)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_the_pick_is_the_longest_held_prefix_among_first_choices_within_the_slack(data):
    """Against a brute-force reference over random pools, leases, cached prefixes and avoids."""
    n = data.draw(st.integers(1, 6))
    slack = data.draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    p = placer(n=n, slack=slack)
    chain = (1, 2, 3, 4)
    held = {}
    for i in range(n):
        pool_id = f"p{i}"
        depth = data.draw(st.integers(0, 4))
        if depth:
            p.record_prefix(pool_id, chain[:depth])
            held[pool_id] = depth
        for _ in range(data.draw(st.integers(0, 4))):
            if p.leases(pool_id) < 4:
                p.acquire(pool_id)
    avoid = tuple(data.draw(st.lists(st.sampled_from([f"p{i}" for i in range(n)]), max_size=2, unique=True)))
    spec = task(chain, placement=PlacementRequest(mode=PlacementMode.AUTO, avoid_pools=avoid))
    decision = p.pick(spec)
    free = {f"p{i}": 4 - p.leases(f"p{i}") for i in range(n)}
    first = [pid for pid in free if free[pid] > 0 and pid not in avoid]
    if not first:  # only an avoided pool (a fallback) or none at all: never chosen for its cache
        assert not isinstance(decision, Pick) or decision.pool_id in avoid
        return
    load = {pid: p.leases(pid) / 4 for pid in first}
    least = min(load.values())
    within = [pid for pid in first if load[pid] <= least + slack + 1e-9]
    best_depth = max((held.get(pid, 0) for pid in within), default=0)
    chosen = picked(decision)
    assert chosen in first and load[chosen] <= least + slack + 1e-9
    assert held.get(chosen, 0) == best_depth
    if best_depth == 0:
        assert load[chosen] == least  # a new prefix goes to a least-loaded pool
