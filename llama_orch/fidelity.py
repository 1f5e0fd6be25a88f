"""Replay fidelity: does the simulator predict what a live cluster does with the same trace?

Owns ``llama-orch bench fidelity TRACE``. It brings up a cluster on this machine
(``io.local_cluster``: provisioner, pool-managerd, orchestratord, engines), then:

1. **calibrates** the simulated engine from the live engines, one request at a time straight to
   one engine: slots and context from ``/props``; first-token time of a short and a long prompt
   (their difference per prompt token is the prefill cost, the rest the fixed overhead); decode
   tokens/s between the first and the last token; prompt tokens per word from the engine's own
   count (``tokens_evaluated``), so prompts of the trace's length can be written;
2. for each **utilisation level**, takes the trace's first requests scaled (``--length``) until
   their calibrated service time fills the level over ``--duration-s``, with the arrival rate
   scaled to that span, and **drives them live** through orchestratord's ``/v2/tasks`` at the
   trace's send times (open loop: a late answer never delays the next send);
3. **replays the same slice** in the simulator with the calibrated settings and the cluster's
   own (pools, slots, context, poll interval, queue capacity, prior service time);
4. compares queue wait (submission to dispatch: orchestratord's ``queued_ms`` live, start minus
   arrival simulated), time to first token and total time (send to the end event) at p50, p90
   and p99, and rejections by reason; writes ``fidelity.json``, ``fidelity.md`` and
   ``fidelity.png`` (CDFs, live against simulated).

A figure is within the aim when the simulated value is within 10% of the live one, or within
``ABS_SLACK_MS`` where both are that small (a queue wait of 1 ms against 0 ms is no miss).
Every task is accounted for: each one sent ends as completed, rejected (the code) or failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .sim.report import percentile
from .sim.simulator import PROMPT_OVER_CONTEXT, SimConfig, Simulation, config_flags
from .sim.traces import TraceRecord, scale_trace

REL_AIM = 0.10
ABS_SLACK_MS = 10.0
QUANTILES = (50, 90, 99)
METRICS = (("queue_wait_ms", "queue wait"), ("ttft_ms", "time to first token"), ("total_ms", "total time"))
WORDS = tuple(f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti") for b in ("n", "r", "s", "l", "m", "x"))

Report = Callable[[str], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """The simulated engine, as measured on a live one."""

    slots: int
    ctx_max: int
    tokens_per_s: float
    prefill_ms_per_token: float
    first_token_ms: float
    tokens_per_word: float
    samples: dict = field(default_factory=dict)  # the raw measurements, for the report


@dataclass(slots=True)
class LiveTask:
    index: int
    outcome: str = "unknown"  # completed | rejected | failed
    reason: str | None = None
    queue_wait_ms: float | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None
    tokens: int = 0
    message: str | None = None  # what the server said, for a task that did not complete


# -- calibration --------------------------------------------------------------------------------


def prompt_of(words: int, rng: random.Random) -> str:
    """``words`` words that share no long prefix with another prompt (no engine cache reuse)."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, words)))


async def _timed_completion(http, engine_url: str, prompt: str, n_predict: int) -> dict:
    """One streamed ``/completion``: first-token and last-token times (s after the send) and the
    engine's prompt token count."""
    from .ext.sse import TokenRelay

    relay = TokenRelay("llamacpp")
    started = time.perf_counter()
    first = last = None
    async with http.post(engine_url.rstrip("/") + "/completion",
                         json={"prompt": prompt, "n_predict": n_predict, "stream": True, "cache_prompt": False}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"engine {engine_url} answered HTTP {resp.status} to a calibration request: "
                               f"{(await resp.read())[:200]!r}")
        async for chunk in resp.content.iter_any():
            _, count, _ = relay.feed(chunk)
            if count:
                last = time.perf_counter() - started
                first = last if first is None else first
    final = relay.final or {}
    if first is None or relay.tokens < 2:
        raise RuntimeError(f"engine {engine_url} streamed {relay.tokens} tokens for a calibration request")
    return {"first_s": first, "last_s": last, "tokens": relay.tokens,
            "prompt_tokens": final.get("tokens_evaluated") or len(prompt.split())}


def fit_calibration(props: dict, short: list[dict], long: list[dict], *, short_words: int, long_words: int,
                    busy: list[dict] | None = None) -> Calibration:
    """The engine model from the measurements (medians, so one hiccup does not skew it). The
    decode rate is the one with every slot of every engine busy (``busy``) when measured: a queue
    forms only then, and an engine decoding a batch, or engines sharing CPUs, decode each
    sequence slower than one alone."""
    settings = props.get("default_generation_settings") or {}
    slots = int(props.get("total_slots") or 1)
    ctx_max = int(settings.get("n_ctx") or 2048)
    med = statistics.median
    ttft_short, ttft_long = med(s["first_s"] for s in short) * 1000, med(s["first_s"] for s in long) * 1000
    tokens_short, tokens_long = med(s["prompt_tokens"] for s in short), med(s["prompt_tokens"] for s in long)
    prefill = max(0.0, (ttft_long - ttft_short) / max(1.0, tokens_long - tokens_short))
    first = max(0.0, ttft_short - prefill * tokens_short)
    def rates(samples: list[dict]) -> list[float]:
        return [(s["tokens"] - 1) / (s["last_s"] - s["first_s"]) for s in samples if s["last_s"] > s["first_s"]]

    alone, together = rates(short + long), rates(busy or [])
    chosen = together or alone
    return Calibration(slots=slots, ctx_max=ctx_max, tokens_per_s=med(chosen) if chosen else 1000.0,
                       prefill_ms_per_token=prefill, first_token_ms=first,
                       tokens_per_word=max(0.05, tokens_long / long_words),
                       samples={"short_words": short_words, "long_words": long_words, "short": short, "long": long,
                                "busy": busy or [], "tokens_per_s_alone": med(alone) if alone else None})


async def calibrate(engine_urls: Sequence[str], *, rounds: int = 3, n_predict: int = 48, seed: int = 0,
                    report: Report = lambda line: None) -> Calibration:
    """Prompt costs on the first engine, one request at a time; then the decode rate with every
    slot of every engine busy at once."""
    engine_url = engine_urls[0]
    import aiohttp

    rng = random.Random(seed)
    # A connection per request: llama-server closes a streamed response's connection, and a POST
    # on a reused one that the engine already closed fails.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                     connector=aiohttp.TCPConnector(force_close=True)) as http:
        async with http.get(engine_url.rstrip("/") + "/props") as resp:
            props = await resp.json()
        n_ctx = int((props.get("default_generation_settings") or {}).get("n_ctx") or 2048)
        short_words = 8
        short = [await _timed_completion(http, engine_url, prompt_of(short_words, rng), n_predict)]
        # The long prompt fills about a third of a slot's context, in the engine's own tokens.
        per_word = max(0.05, short[0]["prompt_tokens"] / short_words)
        long_words = max(16, min(1024, int((n_ctx - n_predict) / 3 / per_word)))
        long: list[dict] = []
        for r in range(rounds):
            report(f"calibrating on {engine_url}: round {r + 1}/{rounds}")
            if r:
                short.append(await _timed_completion(http, engine_url, prompt_of(short_words, rng), n_predict))
            long.append(await _timed_completion(http, engine_url, prompt_of(long_words, rng), n_predict))
        slots = int(props.get("total_slots") or 1)
        report(f"calibrating: {slots * len(engine_urls)} requests at once, every slot of {len(engine_urls)} engines")
        busy = await asyncio.gather(*(_timed_completion(http, url, prompt_of(short_words, rng), 4 * n_predict)
                                      for url in engine_urls for _ in range(slots)))
    return fit_calibration(props, short, long, short_words=short_words, long_words=long_words, busy=list(busy))


# -- the slice and the simulated side -----------------------------------------------------------


def service_ms(record: TraceRecord, calib: Calibration) -> float:
    """How long a slot is busy with the request (0 for one the engine refuses)."""
    if record.context_tokens >= calib.ctx_max:
        return 0.0
    tokens = max(1, min(record.generated_tokens, calib.ctx_max - record.context_tokens))
    return (calib.first_token_ms + calib.prefill_ms_per_token * record.context_tokens
            + 1000.0 * (tokens - 1) / calib.tokens_per_s)


def plan_slice(records: Sequence[TraceRecord], calib: Calibration, *, slots_total: int, utilisation: float,
               duration_s: float) -> tuple[int, float]:
    """``(limit, rate)``: the first ``limit`` records, arrivals sped up by ``rate``, offer about
    ``utilisation`` of the slots' time over ``duration_s``."""
    wanted = utilisation * slots_total * duration_s * 1000.0
    work, limit = 0.0, 0
    for record in records:
        work += service_ms(record, calib)
        limit += 1
        if work >= wanted and limit >= 2:
            break
    span = records[limit - 1].arrival_ms
    if span <= 0:
        raise ValueError("the trace slice has no span (every request at the same time)")
    return limit, span / (duration_s * 1000.0)


def sim_config(calib: Calibration, *, pools: int, capacity: int, poll_interval_ms: float, deadline_ms: int,
               strategy: str) -> SimConfig:
    """The simulated cluster: the calibrated engine, the live cluster's settings, no faults."""
    return SimConfig(pools=pools, slots_per_pool=calib.slots, tokens_per_s=round(calib.tokens_per_s, 3),
                     prefill_ms_per_token=round(calib.prefill_ms_per_token, 5),
                     first_token_ms=round(calib.first_token_ms, 3), ctx_max=calib.ctx_max, batch_fraction=0.0,
                     sessions=0, deadline_ms=deadline_ms, admission_capacity=capacity, placement_strategy=strategy,
                     poll_interval_ms=poll_interval_ms, prior_service_ms=2000.0, pool_losses=0, slow_engines=0,
                     progress_ms=1000.0)


def simulated_tasks(records: Sequence[TraceRecord], config: SimConfig, seed: int) -> tuple[list[LiveTask], dict]:
    result = Simulation(records, config=config, seed=seed, trace_name="fidelity").run()
    out = []
    busy = sum(result.pool_busy_ms.values())
    capacity = sum(result.pool_slots.values()) * max(1.0, result.duration_ms)
    for i, t in enumerate(result.tasks):  # in task id order, which is the record order
        task = LiveTask(index=i, outcome="completed" if t.outcome == "completed" else t.outcome, reason=t.reason,
                        tokens=t.tokens_out)
        if t.start_ms is not None:
            task.queue_wait_ms = t.start_ms - t.arrival_ms
        if t.first_token_ms is not None:
            task.ttft_ms = t.first_token_ms - t.arrival_ms
        if t.outcome == "completed" and t.end_ms is not None:
            task.total_ms = t.end_ms - t.arrival_ms
        out.append(task)
    return out, {"utilisation": busy / capacity}


# -- the live side ------------------------------------------------------------------------------


async def drive_live(url: str, records: Sequence[TraceRecord], *, model_ref: str, engine: str, calib: Calibration,
                     deadline_ms: int, seed: int, report: Report = lambda line: None) -> list[LiveTask]:
    """Every record sent at its time (open loop), its events read to the end."""
    import aiohttp
    import orjson

    from .ext.sse import SSEParser

    rng = random.Random(seed)
    prompts = [prompt_of(round(r.context_tokens / calib.tokens_per_word), rng) for r in records]
    results = [LiveTask(index=i) for i in range(len(records))]

    async def one(i: int, record: TraceRecord, due: float, http: aiohttp.ClientSession) -> None:
        task = results[i]
        wanted = record.context_tokens + max(1, record.generated_tokens)
        body = {"task_id": str(uuid.uuid4()), "session_id": str(uuid.uuid4()), "workload": "completion",
                "model_ref": model_ref, "engine": engine, "priority": "interactive",
                "max_tokens": max(1, record.generated_tokens), "deadline_ms": deadline_ms, "prompt": prompts[i],
                "ctx": wanted if record.context_tokens >= calib.ctx_max else min(wanted, calib.ctx_max)}
        try:
            async with http.post(f"{url}/v2/tasks", data=orjson.dumps(body),
                                 headers={"Content-Type": "application/json"}) as resp:
                raw = await resp.read()
                if resp.status != 202:
                    task.outcome, (task.reason, task.message) = "rejected", _code(raw, resp.status)
                    if task.reason == "INVALID_PARAMS" and record.context_tokens >= calib.ctx_max:
                        task.reason = PROMPT_OVER_CONTEXT  # named as the simulator names it
                    return
            parser = SSEParser()
            async with http.get(f"{url}/v2/tasks/{body['task_id']}/events") as resp:
                if resp.status != 200:
                    task.outcome, task.reason = "failed", f"HTTP {resp.status} on events"
                    return
                async for chunk in resp.content.iter_any():
                    for kind, data in parser.feed(chunk):
                        if kind == "token":
                            task.tokens += 1
                            if task.ttft_ms is None:
                                task.ttft_ms = (time.perf_counter() - due) * 1000
                        elif kind == "started" and task.queue_wait_ms is None:
                            task.queue_wait_ms = float(orjson.loads(data).get("queued_ms", 0))
                        elif kind == "end":
                            final = orjson.loads(data)
                            if final.get("canceled"):
                                task.outcome, task.reason = "failed", "canceled"
                            else:
                                task.outcome, task.total_ms = "completed", (time.perf_counter() - due) * 1000
                        elif kind == "error":
                            error = orjson.loads(data)
                            task.outcome, task.reason, task.message = "failed", str(error.get("code")), error.get("message")
            if task.outcome == "unknown":
                task.outcome, task.reason = "failed", "stream ended without a terminal event"
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            task.outcome, task.reason = "failed", f"{type(exc).__name__}"

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=deadline_ms / 1000 + 60)) as http:
        start = time.perf_counter() + 0.2
        pending = []
        shown = 0.0
        for i, record in enumerate(records):
            due = start + record.arrival_ms / 1000.0
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            pending.append(asyncio.create_task(one(i, record, due, http)))
            if time.perf_counter() - shown > 5:
                shown = time.perf_counter()
                report(f"  live: sent {i + 1}/{len(records)}")
        await asyncio.gather(*pending)
    return results


def _code(raw: bytes, status: int) -> tuple[str, str | None]:
    try:
        envelope = json.loads(raw)
        return str(envelope.get("code") or f"HTTP {status}"), envelope.get("message")
    except (ValueError, AttributeError):
        return f"HTTP {status}", raw[:200].decode(errors="replace")


# -- comparison ---------------------------------------------------------------------------------


def quantiles(tasks: Sequence[LiveTask], metric: str) -> dict[str, float | None]:
    values = sorted(v for v in (getattr(t, metric) for t in tasks) if v is not None)
    return {f"p{q}": percentile(values, q) for q in QUANTILES} | {"n": len(values)}


def within_aim(live: float | None, simulated: float | None) -> bool | None:
    if live is None or simulated is None:
        return None
    return abs(simulated - live) <= max(REL_AIM * live, ABS_SLACK_MS)


def outcomes(tasks: Sequence[LiveTask]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in tasks:
        key = t.outcome if t.reason is None else f"{t.outcome}: {t.reason}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def compare(live: Sequence[LiveTask], simulated: Sequence[LiveTask]) -> dict:
    figures = {}
    for metric, _ in METRICS:
        a, b = quantiles(live, metric), quantiles(simulated, metric)
        figures[metric] = {"live": a, "sim": b, "within": {f"p{q}": within_aim(a[f"p{q}"], b[f"p{q}"])
                                                          for q in QUANTILES}}
    examples: dict[str, str] = {}  # the first message heard per live outcome that is not a completion
    for t in live:
        key = f"{t.outcome}: {t.reason}"
        if t.reason is not None and t.message and key not in examples:
            examples[key] = t.message
    return {"metrics": figures, "outcomes": {"live": outcomes(live), "sim": outcomes(simulated)},
            "live_messages": examples}


# -- the whole run ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FidelityConfig:
    trace: str
    out: Path
    engine: str = "mock"
    levels: tuple[float, ...] = (0.5, 0.75, 0.9)
    duration_s: float = 60.0
    length: float = 0.25
    pools: int = 2
    slots: int = 4
    ctx: int = 4096
    capacity: int = 256
    deadline_ms: int = 300_000
    poll_interval_ms: int = 500
    strategy: str = "vram-aware"
    mock_tokens_per_s: float = 100.0
    mock_prefill_ms_per_token: float = 0.1
    mock_first_token_ms: float = 20.0
    seed: int = 0


async def run_fidelity(config: FidelityConfig, records: Sequence[TraceRecord], report: Report) -> dict:
    from .io.local_cluster import ClusterConfig, LocalCluster

    c = config
    engine_args: tuple[str, ...] = ()
    if c.engine == "mock":
        engine_args = ("--tokens-per-s", f"{c.mock_tokens_per_s:g}", "--prefill-ms-per-token",
                       f"{c.mock_prefill_ms_per_token:g}", "--first-token-ms", f"{c.mock_first_token_ms:g}")
    cluster = LocalCluster(ClusterConfig(
        pools=c.pools, engine="mock" if c.engine == "mock" else "llama-server", slots=c.slots, ctx=c.ctx, port=0,
        pool_managerd_port=0, provisioner_port=0, state_dir=c.out / "cluster", poll_interval_ms=c.poll_interval_ms,
        engine_args=engine_args, orchd_env=(("ORCHD_ADMISSION_CAPACITY", str(c.capacity)),
                                            ("ORCHD_PLACEMENT_STRATEGY", c.strategy))), report=report)
    levels = []
    try:
        await cluster.prepare()
        cluster.start()
        await cluster.wait_ready()
        pools = cluster.pools
        calib = await calibrate([p["engine_url"] for p in pools], seed=c.seed, report=report)
        report(f"calibrated: {calib.slots} slots, ctx {calib.ctx_max}, {calib.tokens_per_s:.1f} tokens/s with every "
               f"slot busy ({calib.samples['tokens_per_s_alone']:.1f} alone), "
               f"prefill {calib.prefill_ms_per_token:.4f} ms/token, first token {calib.first_token_ms:.1f} ms, "
               f"{calib.tokens_per_word:.2f} tokens/word")
        scaled = scale_trace(records, length=c.length)
        for level in c.levels:
            limit, rate = plan_slice(scaled, calib, slots_total=calib.slots * len(pools), utilisation=level,
                                     duration_s=c.duration_s)
            piece = scale_trace(records, rate=rate, length=c.length, limit=limit)
            report(f"level {level:.0%}: {limit} requests, arrivals x{rate:.3f}, about {c.duration_s:g} s live")
            started = time.perf_counter()
            live = await drive_live(cluster.orchestratord_url, piece, model_ref=pools[0]["model_ref"],
                                    engine=pools[0].get("engine") or "llamacpp", calib=calib,
                                    deadline_ms=c.deadline_ms, seed=c.seed + limit, report=report)
            wall = time.perf_counter() - started
            settings = sim_config(calib, pools=len(pools), capacity=c.capacity, poll_interval_ms=c.poll_interval_ms,
                                  deadline_ms=c.deadline_ms, strategy=c.strategy)
            simulated, sim_info = simulated_tasks(piece, settings, c.seed)
            compared = compare(live, simulated)
            offered = sum(service_ms(r, calib) for r in piece) / (calib.slots * len(pools) * piece[-1].arrival_ms)
            levels.append({"utilisation_target": level, "utilisation_offered": round(offered, 4),
                           "utilisation_sim": round(sim_info["utilisation"], 4),
                           "requests": limit, "rate": rate, "live_wall_s": round(wall, 2),
                           "rerun_sim": " ".join(["llama-orch replay", c.trace, f"--rate={rate:.6g}",
                                                  f"--length={c.length:g}", f"--limit={limit}", f"--seed={c.seed}",
                                                  *config_flags(settings)]),
                           **compared, "cdf": {"live": _values_by_metric(live), "sim": _values_by_metric(simulated)}})
            report(f"level {level:.0%}: " + _one_line(compared))
    finally:
        await cluster.stop()
    return {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(c).items()},
            "calibration": dataclasses.asdict(calib) if levels else None, "levels": levels}


def _values_by_metric(tasks: Sequence[LiveTask]) -> dict[str, list[float]]:
    return {metric: sorted(round(v, 3) for v in (getattr(t, metric) for t in tasks) if v is not None)
            for metric, _ in METRICS}


def _one_line(compared: dict) -> str:
    parts = []
    for metric, label in METRICS:
        fig = compared["metrics"][metric]
        parts.append(f"{label} p50 {_ms(fig['live']['p50'])}/{_ms(fig['sim']['p50'])}, "
                     f"p99 {_ms(fig['live']['p99'])}/{_ms(fig['sim']['p99'])} ms")
    return "; ".join(parts) + " (live/sim)"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _err(live: float | None, sim: float | None) -> str:
    if live is None or sim is None:
        return "-"
    if live == 0:
        return f"{sim - live:+.0f} ms"
    return f"{100 * (sim - live) / live:+.1f}%"


def format_report(result: dict) -> str:
    c, calib = result["config"], result["calibration"]
    lines = [f"# Replay fidelity: {c['trace']}", ""]
    lines.append(f"Cluster: {c['pools']} pools of the {c['engine']} engine, {c['slots']} slots of {c['ctx']} tokens "
                 f"each; queue capacity {c['capacity']}, placement {c['strategy']}, pool poll every "
                 f"{c['poll_interval_ms']} ms, deadline {c['deadline_ms']} ms.")
    if c["engine"] == "mock":
        lines.append(f"Mock engine as configured: {c['mock_tokens_per_s']:g} tokens/s, prefill "
                     f"{c['mock_prefill_ms_per_token']:g} ms/token, first token {c['mock_first_token_ms']:g} ms.")
    if calib:
        lines.append(f"Calibrated from the live engines: {calib['tokens_per_s']:.1f} tokens/s per slot with every slot "
                     f"busy ({calib['samples']['tokens_per_s_alone']:.1f} for one request alone), prefill "
                     f"{calib['prefill_ms_per_token']:.4f} ms/token, first token {calib['first_token_ms']:.1f} ms, "
                     f"{calib['slots']} slots, ctx {calib['ctx_max']}, {calib['tokens_per_word']:.2f} tokens/word.")
    lines.append(f"Trace scaling: token counts x{c['length']:g}; per level, the first N requests with arrivals "
                 f"sped up to fill the level over about {c['duration_s']:g} s. No faults injected.")
    lines.append(f"Aim: simulated within {REL_AIM:.0%} of live (or {ABS_SLACK_MS:g} ms where both are that small).")
    lines.append("")
    for level in result["levels"]:
        lines.append(f"## Utilisation {level['utilisation_target']:.0%} (offered over the arrivals' span: "
                     f"{level['utilisation_offered']:.0%}; busy over the whole run, simulated: "
                     f"{level['utilisation_sim']:.0%}), {level['requests']} requests, arrivals x{level['rate']:.3f}")
        lines.append("")
        lines.append("| ms | live p50 | sim p50 | err | live p90 | sim p90 | err | live p99 | sim p99 | err | "
                     "within aim (p50, p99) |")
        lines.append("|---|" + "---:|" * 9 + "---|")
        for metric, label in METRICS:
            fig = level["metrics"][metric]
            row = [label]
            for q in QUANTILES:
                a, b = fig["live"][f"p{q}"], fig["sim"][f"p{q}"]
                row += [_ms(a), _ms(b), _err(a, b)]
            ok = [fig["within"]["p50"], fig["within"]["p99"]]
            row.append(", ".join("-" if v is None else ("yes" if v else "no") for v in ok))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        outcomes_live, outcomes_sim = level["outcomes"]["live"], level["outcomes"]["sim"]
        keys = sorted(set(outcomes_live) | set(outcomes_sim))
        lines.append("| outcome | live | sim |")
        lines.append("|---|---:|---:|")
        lines += [f"| {k} | {outcomes_live.get(k, 0)} | {outcomes_sim.get(k, 0)} |" for k in keys]
        lines.append("")
        for key, message in sorted(level.get("live_messages", {}).items()):
            lines.append(f"- live {key}, e.g.: {message}")
        if level.get("live_messages"):
            lines.append("")
        lines.append(f"Rerun the simulated side: `{level['rerun_sim']}`")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    levels = result["levels"]
    fig = Figure(figsize=(4.2 * len(METRICS), 3.2 * max(1, len(levels))), layout="constrained")
    axes = fig.subplots(max(1, len(levels)), len(METRICS), squeeze=False)
    for row, level in enumerate(levels):
        for col, (metric, label) in enumerate(METRICS):
            ax = axes[row][col]
            for side, style in (("live", "-"), ("sim", "--")):
                values = level["cdf"][side][metric]
                if values:
                    ys = [(i + 1) / len(values) for i in range(len(values))]
                    ax.step(values, ys, style, where="post", label=side)
            ax.set_title(f"{label}, {level['utilisation_target']:.0%} utilisation", fontsize=9)
            ax.set_xlabel("ms")
            ax.set_ylim(0, 1.01)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.set_ylabel("fraction of tasks")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=2)
    fig.suptitle(f"Replay fidelity: {result['config']['trace']} (live solid, simulated dashed)")
    fig.savefig(path, dpi=110)


def write(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "fidelity.json", out / "fidelity.md", out / "fidelity.png"]
    paths[0].write_text(json.dumps(result, indent=1, sort_keys=True))
    paths[1].write_text(format_report(result) + "\n")
    plot(result, paths[2])
    return paths


def add_arguments(parser) -> None:
    d = FidelityConfig(trace="", out=Path("out/fidelity"))
    parser.add_argument("trace", help="CSV or JSONL trace, or a shipped name (conv, code)")
    parser.add_argument("--out", default=str(d.out), help="directory for fidelity.json, .md, .png and cluster/ logs")
    parser.add_argument("--engine", choices=("mock", "llama-server"), default=d.engine)
    parser.add_argument("--levels", default=",".join(f"{x:g}" for x in d.levels),
                        help="comma-separated utilisation levels to drive, each in (0, 1.5]")
    parser.add_argument("--duration-s", type=float, default=d.duration_s, help="live time per level (about)")
    parser.add_argument("--length", type=float, default=d.length, help="token-count multiplier for the trace")
    parser.add_argument("--pools", type=int, default=d.pools)
    parser.add_argument("--slots", type=int, default=d.slots, help="slots per pool")
    parser.add_argument("--ctx", type=int, default=d.ctx, help="context tokens per slot")
    parser.add_argument("--capacity", type=int, default=d.capacity, help="admission queue capacity (both sides)")
    parser.add_argument("--strategy", default=d.strategy, help="placement strategy (both sides)")
    parser.add_argument("--mock-tokens-per-s", type=float, default=d.mock_tokens_per_s)
    parser.add_argument("--mock-prefill-ms-per-token", type=float, default=d.mock_prefill_ms_per_token)
    parser.add_argument("--mock-first-token-ms", type=float, default=d.mock_first_token_ms)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--quick", action="store_true", help="a short smoke: one level, 8 s; the figures mean little")


def run_from_args(args, trace_path: Path) -> int:
    from .core.errors import UsageError
    from .sim.traces import TraceError, read_trace

    try:
        levels = tuple(float(x) for x in args.levels.split(",") if x.strip())
    except ValueError:
        print(f"llama-orch: error: --levels: expected numbers, got {args.levels!r}", file=sys.stderr)
        return 2
    if args.quick:
        levels, duration = (0.6,), 8.0
    else:
        duration = args.duration_s
    if not levels or not all(0 < x <= 1.5 for x in levels) or not duration > 0 or not args.length > 0:
        print("llama-orch: error: --levels must be in (0, 1.5], --duration-s and --length > 0", file=sys.stderr)
        return 2
    try:
        records = read_trace(trace_path)
        config = FidelityConfig(trace=args.trace, out=Path(args.out), engine=args.engine, levels=levels,
                                duration_s=duration, length=args.length, pools=args.pools, slots=args.slots,
                                ctx=args.ctx, capacity=args.capacity, strategy=args.strategy,
                                mock_tokens_per_s=args.mock_tokens_per_s,
                                mock_prefill_ms_per_token=args.mock_prefill_ms_per_token,
                                mock_first_token_ms=args.mock_first_token_ms, seed=args.seed)
    except (TraceError, ValueError, UsageError) as exc:
        print(f"llama-orch: error: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()

    def report(line: str) -> None:
        print(f"[{time.monotonic() - started:7.1f} s] {line}", file=sys.stderr, flush=True)

    result = asyncio.run(run_fidelity(config, records, report))
    paths = write(result, config.out)
    print(format_report(result))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0 if result["levels"] else 1
