"""The replay simulator drives the real core: determinism, accounting, faults, policies, CLI."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llama_orch.core.errors import UsageError
from llama_orch.sim.report import write_report
from llama_orch.sim.simulator import PROMPT_OVER_CONTEXT, SimConfig, Simulation, cli_flags
from llama_orch.sim.traces import TraceRecord, read_trace, scale_trace

ROOT = Path(__file__).resolve().parents[2]
CONV = ROOT / "bench" / "traces" / "azure2023_conv.csv"


@pytest.fixture(scope="module")
def conv():
    return scale_trace(read_trace(CONV), limit=1500)


def digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def test_same_trace_and_seed_give_byte_identical_files(conv, tmp_path):
    write_report(Simulation(conv, seed=7).run(), tmp_path / "a")
    write_report(Simulation(conv, seed=7).run(), tmp_path / "b")
    write_report(Simulation(conv, seed=8).run(), tmp_path / "c")
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert set(a) == {"report.txt", "summary.json", "tasks.csv", "replay.png"}
    assert a == b
    assert a["tasks.csv"] != c["tasks.csv"]  # the seed matters (priorities, sessions, faults)


def test_every_task_is_accounted_for_exactly_once(conv):
    result = Simulation(conv, config=SimConfig(pools=2, slots_per_pool=2, admission_capacity=32), seed=1).run()
    assert len(result.tasks) == len(conv)
    outcomes = {t.outcome for t in result.tasks}
    assert outcomes <= {"completed", "rejected", "failed", "evicted", "canceled"}
    # An overloaded cluster must turn work away honestly, and still finish what it admitted.
    assert sum(t.outcome == "rejected" for t in result.tasks) > 0
    assert sum(t.outcome == "completed" for t in result.tasks) > 0
    for t in result.tasks:
        if t.outcome == "completed":
            assert t.start_ms is not None and t.first_token_ms is not None and t.end_ms >= t.first_token_ms
            record = conv[int(t.task_id[1:])]
            assert t.tokens_out == max(1, min(record.generated_tokens, SimConfig().ctx_max - record.context_tokens))
        if t.outcome == "rejected":
            assert t.reason in {"ADMISSION_REJECT", "DEADLINE_UNMET", "POOL_UNREADY"} and t.start_ms is None


def test_drop_lru_evicts_batch_work_under_overload(conv):
    config = SimConfig(pools=2, slots_per_pool=2, admission_capacity=32, admission_policy="drop-lru",
                       batch_fraction=0.5)
    result = Simulation(conv, config=config, seed=1).run()
    evicted = [t for t in result.tasks if t.outcome == "evicted"]
    assert evicted and all(t.reason == "QUEUE_FULL_DROP_LRU" and t.start_ms is None for t in evicted)
    turned_away = [t for t in result.tasks if t.reason == "QUEUE_FULL_DROP_LRU" and t.outcome == "rejected"]
    # Only a batch newcomer is refused outright: it may not evict interactive work.
    assert turned_away and all(t.priority == "batch" for t in turned_away)
    assert not [t for t in result.tasks if t.outcome == "rejected" and t.reason == "ADMISSION_REJECT"]


def test_pool_loss_fails_streams_and_retries_the_rest():
    # Long tasks on one pool of two: the loss hits streams in flight.
    records = [TraceRecord(arrival_ms=i * 100.0, context_tokens=100, generated_tokens=500) for i in range(40)]
    config = SimConfig(pools=2, slots_per_pool=4, pool_losses=3, pool_recovery_ms=1_000.0, slow_engines=0)
    result = Simulation(records, config=config, seed=3).run()
    failed = [t for t in result.tasks if t.outcome == "failed"]
    assert any("lost" in f for f in result.faults)
    assert failed and {t.reason for t in failed} <= {"WORKER_RESET", "REPLICA_EXHAUSTED"}
    assert sum(t.outcome == "completed" for t in result.tasks) + len(failed) + sum(
        t.outcome == "rejected" for t in result.tasks) == len(records)


def test_slow_engine_stretches_decode():
    # One pool; the slow window opens somewhere in the first 80% of the span (seeded) and lasts
    # 120 s, so the task arriving at the end of the span decodes slow and the first one did not.
    records = [TraceRecord(arrival_ms=0.0, context_tokens=0, generated_tokens=101),
               TraceRecord(arrival_ms=5_000.0, context_tokens=0, generated_tokens=101)]
    config = SimConfig(pools=1, pool_losses=0, slow_engines=1, slow_factor=4.0)
    result = Simulation(records, config=config, seed=0).run()
    assert any("slow (x4)" in f for f in result.faults)
    first, second = result.tasks
    normal = 100 * 1000 / 50
    assert first.end_ms - first.first_token_ms == pytest.approx(normal)
    assert second.end_ms - second.first_token_ms == pytest.approx(4 * normal)
    plain = Simulation(records, config=SimConfig(pools=1, pool_losses=0, slow_engines=0), seed=0).run()
    assert plain.tasks[1].end_ms - plain.tasks[1].first_token_ms == pytest.approx(normal)


def test_a_prompt_over_the_context_is_refused_and_counted_and_generation_stops_at_the_context():
    records = [TraceRecord(arrival_ms=0.0, context_tokens=1000, generated_tokens=10),   # fills the context
               TraceRecord(arrival_ms=1.0, context_tokens=900, generated_tokens=500),   # room for 100 tokens
               TraceRecord(arrival_ms=2.0, context_tokens=100, generated_tokens=50)]
    config = SimConfig(pools=2, ctx_max=1000, pool_losses=0, slow_engines=0)
    over, long, fits = Simulation(records, config=config, seed=0).run().tasks
    assert over.outcome == "rejected" and over.reason == PROMPT_OVER_CONTEXT and over.start_ms is None
    assert long.outcome == "completed" and long.tokens_out == 100
    assert fits.outcome == "completed" and fits.tokens_out == 50


def test_every_pool_has_the_configured_vram():
    sim = Simulation([TraceRecord(arrival_ms=0.0, context_tokens=1, generated_tokens=1)],
                     config=SimConfig(pools=4, vram_total_gb=80.0))
    assert {pool.vram_total for pool in sim.pools.values()} == {80 << 30}


def test_bad_settings_are_named():
    with pytest.raises(UsageError, match="admission_policy"):
        SimConfig(admission_policy="fifo")
    with pytest.raises(UsageError, match="slots_per_pool"):
        SimConfig(slots_per_pool=0)
    with pytest.raises(UsageError, match="no records"):
        Simulation([])


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "llama_orch.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_replays_a_jsonl_trace_and_writes_the_report(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": i * 200, "input_length": 50, "output_length": 20, "x": 1})
                               for i in range(50)))
    out = tmp_path / "out"
    run = cli("replay", str(trace), "--seed", "3", "--out", str(out), "--pools", "2", "--pool-losses", "0")
    assert run.returncode == 0, run.stderr
    assert "completed" in run.stdout and "queue wait" in run.stdout and "pool-1" in run.stdout
    assert "tasks/s" in run.stderr  # wall-clock figures go to the terminal, not the files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == 50 and summary["outcomes"]["completed"] == 50
    assert (out / "replay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_setting_is_a_flag_and_the_report_names_the_command_that_reruns_it(tmp_path):
    from llama_orch.cli import build_parser

    assert [name for _, name, _, _, _ in cli_flags()] == list(SimConfig.__dataclass_fields__)
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": i * 50, "input_length": 20, "output_length": 5})
                               for i in range(30)))
    run = cli("replay", str(trace), "--seed", "4", "--rate", "2", "--limit", "20", "--slots", "3", "--ctx-max", "4096",
              "--policy", "drop-lru", "--first-token-ms", "7.5", "--out", str(tmp_path / "a"), "--quiet")
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["config"]["slots_per_pool"] == 3 and summary["config"]["first_token_ms"] == 7.5
    rerun = summary["rerun"].split()
    assert rerun[:2] == ["llama-orch", "replay"] and "--limit=20" in rerun and "--rate=2" in rerun
    assert summary["rerun"] in (tmp_path / "a" / "report.txt").read_text()
    again = cli(*rerun[1:], "--out", str(tmp_path / "b"), "--quiet")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "b" / "tasks.csv").read_bytes() == (tmp_path / "a" / "tasks.csv").read_bytes()
    args = build_parser().parse_args(rerun[1:])
    assert SimConfig(**{name: getattr(args, name) for _, name, _, _, _ in cli_flags()}) == SimConfig(
        **{k: v for k, v in summary["config"].items()})


@pytest.mark.parametrize("args, expected", [
    (["replay", "/nonexistent.csv"], "/nonexistent.csv"),
    (["replay", "conv", "--policy", "fifo"], "admission_policy"),
    (["replay", "conv", "--pools", "0"], "pools"),
    (["replay", "conv", "--rate", "-1"], "--rate"),
])
def test_cli_bad_input_gets_one_clear_line(args, expected, tmp_path):
    run = cli(*args, "--out", str(tmp_path / "o"))
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert any(expected in line for line in lines), run.stderr
    assert "Traceback" not in run.stderr and len(lines) <= 2
    assert not (tmp_path / "o").exists()


# -- KV cache of prefix blocks ------------------------------------------------------------------


def test_block_lru_and_llamacpp_slot_models():
    from llama_orch.sim.kvcache import BlockLRU, SlotCaches

    lru = BlockLRU(capacity=4)
    assert lru.admit((1, 2, 3)) == (-1, 0)
    assert lru.admit((1, 2, 9)) == (-1, 2)
    lru.admit((5, 6))  # 5 blocks wanted, 4 kept: the oldest goes (the first chain's last block)
    assert lru.admit((1, 2, 3)) == (-1, 2)
    assert BlockLRU(capacity=None).admit(()) == (-1, 0)
    slots = SlotCaches(2)
    assert slots.admit((1, 2, 3)) == (0, 0)
    assert slots.admit((1, 2)) == (1, 0)  # slot 0 is busy: its kept prompt cannot be used
    slots.release(0)
    slots.release(1)
    assert slots.admit((1, 2, 3, 4)) == (0, 3)  # the slot sharing the longest prefix
    with pytest.raises(ValueError, match="no free slot"):
        slots.admit((9,)) and slots.admit((9,))


def conversation_trace(turns=6, conversations=23, gap_ms=400.0):
    """Conversations that resend their growing history; each turn one block longer. (23: not a
    multiple of the pools, or round-robin would send each conversation to one pool by chance.)"""
    records = []
    for c in range(conversations):
        for t in range(turns):
            chain = tuple(c * 100 + k for k in range(t + 2))
            records.append(TraceRecord(arrival_ms=(t * conversations + c) * gap_ms, context_tokens=512 * len(chain),
                                       generated_tokens=20, hash_ids=chain))
    return sorted(records, key=lambda r: r.arrival_ms)


@pytest.mark.parametrize("kv_cache", ["block-lru", "llamacpp-slots"])
def test_a_cached_prefix_is_not_prefilled_again_and_prefix_aware_placement_finds_it(kv_cache):
    records = conversation_trace()
    base = dict(pools=4, slots_per_pool=2, pool_losses=0, slow_engines=0, sessions=0, kv_cache=kv_cache,
                prefill_ms_per_token=0.5)
    runs = {s: Simulation(records, config=SimConfig(**base, placement_strategy=s), seed=0).run()
            for s in ("round-robin", "prefix-aware")}
    from llama_orch.sim.report import summarise

    hit = {s: summarise(r)["prefix"]["hit_rate"] for s, r in runs.items()}
    assert hit["prefix-aware"] > 2 * hit["round-robin"], hit
    for t in runs["prefix-aware"].tasks:  # the first turn of each conversation finds nothing
        assert 0 <= t.cached_tokens <= t.prompt_tokens
    first_turns = [t for t in runs["prefix-aware"].tasks if t.arrival_ms < 23 * 400.0]
    assert all(t.cached_tokens == 0 for t in first_turns)
    # a hit makes the first token sooner: prefill is charged for the blocks not found only
    none = Simulation(records, config=SimConfig(**{**base, "kv_cache": "none"}, placement_strategy="prefix-aware"),
                      seed=0).run()
    ttft = lambda r: sum(t.first_token_ms - t.arrival_ms for t in r.tasks)  # noqa: E731
    assert ttft(runs["prefix-aware"]) < ttft(none)


def test_compare_strategies_writes_one_row_per_strategy_and_capacity(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": r.arrival_ms, "input_length": r.context_tokens,
                                           "output_length": r.generated_tokens, "hash_ids": list(r.hash_ids)})
                               for r in conversation_trace(turns=3, conversations=10)))
    run = cli("replay", str(trace), "--compare-strategies", "--capacities", "4,0", "--sessions", "0",
              "--pool-losses", "0", "--out", str(tmp_path / "cmp"), "--quiet")
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "cmp" / "strategies.json").read_text())
    assert [(r["kv_cache_blocks"], r["strategy"]) for r in result["rows"]] == [
        (c, s) for c in (4, 0) for s in ("vram-aware", "least-loaded", "round-robin", "random", "prefix-aware")]
    assert all(r["completed"] == 30 for r in result["rows"])
    assert "| unbounded | prefix-aware |" in (tmp_path / "cmp" / "strategies.md").read_text()
    assert (tmp_path / "cmp" / "strategies.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--compare-strategies" in result["rerun"]
    bad = cli("replay", str(trace), "--capacities", "4", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--compare-strategies" in bad.stderr


def test_the_mooncake_trace_ships_with_its_prefix_blocks():
    records = read_trace(ROOT / "bench" / "traces" / "mooncake_synthetic.jsonl")
    assert len(records) == 3993 and all(r.hash_ids for r in records)
    assert len(records[0].hash_ids) == -(-records[0].context_tokens // 512)  # blocks of 512 tokens
