"""The same trace through every placement strategy: ``llama-orch replay --compare-strategies``.

Owns running one replay per (KV cache capacity, strategy) with everything else equal, and the
table and plot that compare them: prefix hit rate (prompt tokens found in a pool's KV cache
over prompt tokens of dispatched tasks), prefill tokens saved, p50/p99 time to first token,
the busiest pool's busy time over the mean, and what was refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

from ..core.placement import Strategy
from .report import summarise
from .simulator import SimConfig, Simulation
from .traces import TraceRecord

STRATEGIES = tuple(s.value for s in Strategy)


def compare_strategies(records: Sequence[TraceRecord], config: SimConfig, *, seed: int, trace_name: str,
                       capacities: Sequence[int] = (), progress: Callable[[str], None] = lambda line: None) -> dict:
    """One row per (capacity, strategy); ``capacities`` empty: the config's own only."""
    rows = []
    for capacity in capacities or (config.kv_cache_blocks,):
        for strategy in STRATEGIES:
            progress(f"{strategy}, KV cache {_capacity(capacity)}")
            run = dataclasses.replace(config, placement_strategy=strategy, kv_cache_blocks=capacity)
            summary = summarise(Simulation(records, config=run, seed=seed, trace_name=trace_name).run())
            prefix = summary["prefix"]
            refused = sum(summary["outcomes"][o] for o in ("rejected", "evicted"))
            rows.append({
                "strategy": strategy, "kv_cache_blocks": capacity, "hit_rate": prefix["hit_rate"],
                "cached_tokens": prefix["cached_tokens"], "prompt_tokens": prefix["prompt_tokens"],
                "ttft_p50_ms": summary["ttft_ms"]["p50"], "ttft_p99_ms": summary["ttft_ms"]["p99"],
                "load_imbalance": summary["load_imbalance"], "completed": summary["outcomes"]["completed"],
                "refused": refused, "failed": summary["outcomes"]["failed"],
                "reasons": summary["reasons"]["rejected"],
            })
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("placement_strategy",)}
    return {"trace": trace_name, "seed": seed, "tasks": len(records), "config": settings, "rows": rows}


def _capacity(blocks: int) -> str:
    return "unbounded" if blocks == 0 else f"{blocks} blocks"


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def format_comparison(result: dict) -> str:
    c = result["config"]
    lines = [f"# Placement strategies on {result['trace']} ({result['tasks']} requests, seed {result['seed']})", "",
             f"{c['pools']} pools of {c['slots_per_pool']} slots, ctx {c['ctx_max']}, KV cache model {c['kv_cache']}, "
             f"prefix-aware load slack {c['prefix_load_slack']:g}; prefill {c['prefill_ms_per_token']:g} ms per "
             f"prompt token not found in the cache, {c['tokens_per_s']:g} tokens/s per slot.", "",
             "| KV cache per pool | strategy | prefix hit rate | prefill tokens saved | TTFT p50 ms | TTFT p99 ms "
             "| busiest / mean pool | completed | refused | failed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {_capacity(row['kv_cache_blocks'])} | {row['strategy']} | "
                     f"{_fmt(row['hit_rate'], '{:.1%}')} | {row['cached_tokens']:,} | "
                     f"{_fmt(row['ttft_p50_ms'], '{:,.0f}')} | {_fmt(row['ttft_p99_ms'], '{:,.0f}')} | "
                     f"{_fmt(row['load_imbalance'], '{:.3f}')} | {row['completed']} | {row['refused']} | "
                     f"{row['failed']} |")
    reasons = {}
    for row in result["rows"]:
        for reason, n in row["reasons"].items():
            reasons[reason] = max(reasons.get(reason, 0), n)
    if reasons:
        lines += ["", "Refused, at most per run: " + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))]
    return "\n".join(lines) + "\n"


def plot_comparison(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["rows"]
    capacities = sorted({r["kv_cache_blocks"] for r in rows}, key=lambda b: (b == 0, b))
    panels = (("hit_rate", "prefix hit rate", 100.0, "%"), ("ttft_p99_ms", "TTFT p99", 1.0, "ms"),
              ("load_imbalance", "busiest / mean pool busy time", 1.0, ""))
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(13.0, 4.2), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(panels))
        width = 0.8 / max(1, len(STRATEGIES))
        for ax, (key, title, scale, unit) in zip(axes, panels):
            for i, strategy in enumerate(STRATEGIES):
                values = []
                for capacity in capacities:
                    row = next((r for r in rows if r["strategy"] == strategy and r["kv_cache_blocks"] == capacity),
                               None)
                    values.append(0.0 if row is None or row[key] is None else row[key] * scale)
                xs = [k + (i - (len(STRATEGIES) - 1) / 2) * width for k in range(len(capacities))]
                ax.bar(xs, values, width, label=strategy)
            ax.set_xticks(range(len(capacities)), [_capacity(c) for c in capacities])
            ax.set_title(f"{title}{f' ({unit})' if unit else ''}")
            ax.set_xlabel("KV cache per pool")
            ax.grid(True, axis="y", alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(STRATEGIES), frameon=False)
        fig.suptitle(f"Placement strategies on {result['trace']}")
        fig.savefig(path, dpi=100, metadata={"Software": None})


def write_comparison(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "strategies.md", out / "strategies.json", out / "strategies.png"]
    paths[0].write_text(format_comparison(result))
    paths[1].write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    plot_comparison(result, paths[2])
    return paths
