"""``bench fidelity``'s own arithmetic: the engine model fitted from measurements, the slice that
fills a utilisation level, the aim, and the simulated side run with the calibrated settings."""

import random

import pytest

from llama_orch.fidelity import (
    ABS_SLACK_MS, Calibration, LiveTask, compare, fit_calibration, plan_slice, prompt_of, service_ms, sim_config,
    simulated_tasks, within_aim,
)
from llama_orch.sim.traces import TraceRecord

PROPS = {"total_slots": 4, "default_generation_settings": {"n_ctx": 1024}}


def sample(prompt_tokens, *, first_ms, tokens=48, tokens_per_s=100.0):
    first = first_ms / 1000
    return {"first_s": first, "last_s": first + (tokens - 1) / tokens_per_s, "tokens": tokens,
            "prompt_tokens": prompt_tokens}


def test_the_engine_model_is_fitted_from_a_short_and_a_long_prompt():
    # 20 ms fixed + 0.5 ms per prompt token; 100 tokens/s; one outlier round that the median ignores
    short = [sample(8, first_ms=24), sample(8, first_ms=24), sample(8, first_ms=90)]
    long = [sample(400, first_ms=220), sample(400, first_ms=220), sample(400, first_ms=221)]
    calib = fit_calibration(PROPS, short, long, short_words=8, long_words=200)
    assert calib.slots == 4 and calib.ctx_max == 1024
    assert calib.prefill_ms_per_token == pytest.approx(0.5) and calib.first_token_ms == pytest.approx(20)
    assert calib.tokens_per_s == pytest.approx(100) and calib.tokens_per_word == pytest.approx(2.0)
    # with every slot busy the engine decodes each sequence at 60 tokens/s: that is the rate queues see
    busy = [sample(8, first_ms=30, tokens=192, tokens_per_s=60.0) for _ in range(8)]
    loaded = fit_calibration(PROPS, short, long, short_words=8, long_words=200, busy=busy)
    assert loaded.tokens_per_s == pytest.approx(60) and loaded.samples["tokens_per_s_alone"] == pytest.approx(100)


def test_the_slice_fills_the_utilisation_level_over_the_duration():
    calib = Calibration(slots=2, ctx_max=1000, tokens_per_s=100.0, prefill_ms_per_token=0.0, first_token_ms=10.0,
                        tokens_per_word=1.0)
    records = [TraceRecord(arrival_ms=i * 1000.0, context_tokens=10, generated_tokens=11) for i in range(500)]
    assert service_ms(records[0], calib) == pytest.approx(110.0)
    assert service_ms(TraceRecord(arrival_ms=0, context_tokens=1000, generated_tokens=5), calib) == 0.0
    limit, rate = plan_slice(records, calib, slots_total=4, utilisation=0.5, duration_s=10.0)
    # 0.5 * 4 slots * 10 s = 20 s of work at 110 ms a request
    assert limit == 182 and rate == pytest.approx(181 * 1000.0 / 10_000.0)


def test_the_aim_is_relative_with_a_floor_for_small_figures():
    assert within_aim(1000.0, 1099.0) and not within_aim(1000.0, 1101.0)
    assert within_aim(0.0, ABS_SLACK_MS) and not within_aim(0.0, ABS_SLACK_MS + 1)
    assert within_aim(None, 5.0) is None


def test_prompts_share_no_long_prefix():
    rng = random.Random(0)
    prompts = [prompt_of(50, rng) for _ in range(20)]
    assert all(len(p.split()) == 50 for p in prompts)
    assert len({tuple(p.split()[:3]) for p in prompts}) == 20


def test_the_simulated_side_accounts_for_every_request_and_compares_like_with_like():
    calib = Calibration(slots=2, ctx_max=500, tokens_per_s=100.0, prefill_ms_per_token=0.1, first_token_ms=10.0,
                        tokens_per_word=1.0)
    records = [TraceRecord(arrival_ms=i * 50.0, context_tokens=600 if i == 3 else 100, generated_tokens=20)
               for i in range(40)]
    config = sim_config(calib, pools=2, capacity=64, poll_interval_ms=500, deadline_ms=60_000, strategy="vram-aware")
    tasks, info = simulated_tasks(records, config, seed=0)
    assert len(tasks) == 40 and 0 < info["utilisation"] < 1
    assert tasks[3].outcome == "rejected" and "prompt over ctx_max" in tasks[3].reason
    done = [t for t in tasks if t.outcome == "completed"]
    assert len(done) == 39 and all(t.total_ms >= t.ttft_ms >= t.queue_wait_ms >= 0 for t in done)
    same = compare(tasks, tasks)
    assert all(v for m in same["metrics"].values() for v in m["within"].values())
    slower = [LiveTask(index=t.index, outcome=t.outcome, reason=t.reason, queue_wait_ms=t.queue_wait_ms,
                       ttft_ms=t.ttft_ms, total_ms=None if t.total_ms is None else t.total_ms * 2) for t in tasks]
    assert compare(slower, tasks)["metrics"]["total_ms"]["within"]["p50"] is False
