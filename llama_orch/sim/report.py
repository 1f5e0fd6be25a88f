"""Replay results and the report written from them.

Owns the result types the simulator fills in (``TaskRecord``, ``SimResult``),
the statistics derived from them (``summarise``), their text rendering
(``format_table``) and the report directory (``write_report``): ``report.txt``,
``summary.json``, ``tasks.csv`` and ``replay.png``. The same result always gives
byte-identical files, so reports can be diffed between runs and commits.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import secrets
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "OUTCOMES",
    "PERCENTILE_METHOD",
    "PRIORITIES",
    "REPORT_FILES",
    "TASK_CSV_COLUMNS",
    "SimResult",
    "TaskRecord",
    "format_table",
    "percentile",
    "summarise",
    "write_report",
]

OUTCOMES: tuple[str, ...] = ("completed", "rejected", "canceled", "failed", "evicted")
PRIORITIES: tuple[str, ...] = ("interactive", "batch")
PERCENTILE_METHOD = "nearest-rank"
REPORT_FILES: tuple[str, ...] = ("report.txt", "summary.json", "tasks.csv", "replay.png")
TASK_CSV_COLUMNS: tuple[str, ...] = (
    "task_id",
    "priority",
    "arrival_ms",
    "outcome",
    "reason",
    "pool_id",
    "start_ms",
    "first_token_ms",
    "end_ms",
    "tokens_out",
    "queue_wait_ms",
    "ttft_ms",
    "e2e_ms",
    "prompt_tokens",
    "cached_tokens",
)

_PCTS = (50, 90, 99)
# Past this many queue-depth samples the plot is min/max decimated: Agg slows
# down badly on very long paths and nobody can see 100k steps in 7 inches.
_MAX_PLOT_POINTS = 20_000
_MAX_CDF_POINTS = 5_000
_MAX_FAULT_MARKERS = 200
_FIG_SIZE = (12.0, 4.8)
_FIG_DPI = 100
_PRIORITY_COLOURS = {"interactive": "tab:blue", "batch": "tab:orange"}
_OTHER_COLOURS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
_FAULT_TIME_RE = re.compile(r"t=\s*([0-9]+(?:\.[0-9]*)?)\s*ms")


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRecord:
    """What happened to one request in a replay."""

    task_id: str
    priority: str  # "interactive" | "batch"
    arrival_ms: float
    outcome: str  # "completed" | "rejected" | "canceled" | "failed" | "evicted"
    reason: str | None  # error code for non-completed outcomes, e.g. "ADMISSION_REJECT"
    pool_id: str | None
    start_ms: float | None  # dispatch time
    first_token_ms: float | None
    end_ms: float | None
    tokens_out: int
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in the pool's KV cache (not computed again)


@dataclass(frozen=True, slots=True, kw_only=True)
class SimResult:
    """Everything a replay run produced; the input of ``summarise``/``write_report``."""

    trace_name: str
    seed: int
    config: dict  # simulation parameters (JSON-able), printed in the report
    tasks: tuple[TaskRecord, ...]
    queue_depth: tuple[tuple[float, int], ...]  # (time_ms, depth) samples, time-ordered
    pool_busy_ms: dict[str, float]  # slot-milliseconds busy per pool
    pool_slots: dict[str, int]  # slots per pool
    duration_ms: float  # simulated span
    faults: tuple[str, ...] = ()  # human-readable fault log lines, e.g. "t=1200.0ms pool-1 lost"
    rerun: str = ""  # the command line that produces this run again (trace, scaling, seed, settings)


# --- statistics ---------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None when there are none.

    The value at rank ceil(pct/100 * n) (1-based): always an observed value,
    no interpolation, so results are exact and reproducible.
    """
    if not 0 < pct <= 100:
        raise ValueError(f"pct must be in (0, 100], got {pct!r}")
    n = len(sorted_values)
    if n == 0:
        return None
    if isinstance(pct, int):
        rank = -(-pct * n // 100)  # integer ceil: float ceil can land one rank off
    else:
        rank = math.ceil(pct * n / 100)
    return sorted_values[max(rank, 1) - 1]


def summarise(result: SimResult) -> dict[str, Any]:
    """Reduce a replay to the numbers a report shows (JSON-able, deterministic).

    * ``outcomes``: tasks per outcome; ``reasons``: per non-completed outcome,
      tasks per reason (``"unspecified"`` where the simulator gave none);
    * ``queue_wait_ms`` (start - arrival, dispatched tasks), ``ttft_ms``
      (first token - arrival, tasks that produced one) and ``e2e_ms``
      (end - arrival, completed tasks): count, mean, p50, p90, p99, max by the
      nearest-rank method; None where there is no data. ``by_priority`` repeats
      them per priority class;
    * ``pools``: slots, busy slot-ms and utilisation = busy / (slots * duration);
    * ``throughput_tasks_per_s``: completed tasks per simulated second;
    * ``prefix``: over dispatched tasks, prompt tokens, those found in a pool's KV cache and the
      hit rate (found / prompt); ``load_imbalance``: the busiest pool's busy time over the mean.

    Times are rounded to 0.001 ms and ratios to 1e-6 so that the JSON and the
    table agree and do not churn on float noise. Raises ValueError for results
    no simulator should produce (unknown outcome, time running backwards).
    """
    duration = float(result.duration_ms)
    if not (math.isfinite(duration) and duration >= 0.0):
        raise ValueError(f"duration_ms must be finite and >= 0, got {result.duration_ms!r}")

    outcomes: Counter[str] = Counter()
    reasons: dict[str, Counter[str]] = {o: Counter() for o in OUTCOMES if o != "completed"}
    waits: dict[str, list[float]] = {}
    ttfts: dict[str, list[float]] = {}
    e2es: dict[str, list[float]] = {}
    per_prio_tasks: Counter[str] = Counter()
    per_prio_done: Counter[str] = Counter()
    tokens_out = 0
    prompt_total = cached_total = 0
    for t in result.tasks:
        if t.outcome not in OUTCOMES:
            raise ValueError(f"task {t.task_id!r}: unknown outcome {t.outcome!r} (expected one of {OUTCOMES})")
        outcomes[t.outcome] += 1
        per_prio_tasks[t.priority] += 1
        tokens_out += t.tokens_out
        if t.start_ms is not None:
            prompt_total += t.prompt_tokens
            cached_total += t.cached_tokens
        if t.outcome == "completed":
            per_prio_done[t.priority] += 1
        else:
            reasons[t.outcome][t.reason if t.reason is not None else "unspecified"] += 1
        wait, ttft, e2e = _intervals(t)
        if wait is not None:
            waits.setdefault(t.priority, []).append(wait)
        if ttft is not None:
            ttfts.setdefault(t.priority, []).append(ttft)
        if e2e is not None and t.outcome == "completed":
            e2es.setdefault(t.priority, []).append(e2e)

    priorities = _priority_order(per_prio_tasks)
    by_priority = {
        p: {
            "tasks": per_prio_tasks[p],
            "completed": per_prio_done[p],
            "queue_wait_ms": _stats(waits.get(p, ())),
            "ttft_ms": _stats(ttfts.get(p, ())),
            "e2e_ms": _stats(e2es.get(p, ())),
        }
        for p in priorities
    }

    unknown_pools = sorted(set(result.pool_busy_ms) - set(result.pool_slots))
    if unknown_pools:
        raise ValueError(f"pool_busy_ms names pools missing from pool_slots: {unknown_pools}")
    pools = {}
    for pool in sorted(result.pool_slots):
        slots = int(result.pool_slots[pool])
        busy = float(result.pool_busy_ms.get(pool, 0.0))
        capacity = slots * duration
        pools[pool] = {
            "slots": slots,
            "busy_ms": _ms(busy),
            "utilisation": _ratio(busy / capacity) if capacity > 0 else None,
        }

    busy_all = [float(result.pool_busy_ms.get(pool, 0.0)) for pool in result.pool_slots]
    mean_busy = sum(busy_all) / len(busy_all) if busy_all else 0.0
    seconds = duration / 1000.0
    return {
        "trace": result.trace_name,
        "seed": result.seed,
        "rerun": result.rerun,
        "config": dict(result.config),
        "duration_ms": _ms(duration),
        "percentile_method": PERCENTILE_METHOD,
        "tasks": len(result.tasks),
        "outcomes": {o: outcomes[o] for o in OUTCOMES},
        "reasons": {o: dict(sorted(c.items())) for o, c in reasons.items()},
        "queue_wait_ms": _stats(_chain(waits)),
        "ttft_ms": _stats(_chain(ttfts)),
        "e2e_ms": _stats(_chain(e2es)),
        "by_priority": by_priority,
        "queue_depth": _depth_stats(result.queue_depth, duration),
        "pools": pools,
        "throughput_tasks_per_s": _ratio(outcomes["completed"] / seconds) if seconds > 0 else None,
        "tokens_out": tokens_out,
        "tokens_out_per_s": _ratio(tokens_out / seconds) if seconds > 0 else None,
        "prefix": {"prompt_tokens": prompt_total, "cached_tokens": cached_total,
                   "hit_rate": _ratio(cached_total / prompt_total) if prompt_total else None},
        "load_imbalance": _ratio(max(busy_all) / mean_busy) if mean_busy > 0 else None,
        "faults": list(result.faults),
    }


def _intervals(t: TaskRecord) -> tuple[float | None, float | None, float | None]:
    out = []
    for name, when in (("start_ms", t.start_ms), ("first_token_ms", t.first_token_ms), ("end_ms", t.end_ms)):
        if when is None:
            out.append(None)
            continue
        delta = when - t.arrival_ms
        if not delta >= 0:  # also catches NaN
            raise ValueError(
                f"task {t.task_id!r}: {name}={when!r} is before arrival_ms={t.arrival_ms!r}"
            )
        out.append(delta)
    return out[0], out[1], out[2]


def _priority_order(seen: Iterable[str]) -> list[str]:
    # Known classes always appear (stable report shape); unknown ones follow sorted.
    return list(PRIORITIES) + sorted(set(seen) - set(PRIORITIES))


def _chain(groups: Mapping[str, list[float]]) -> list[float]:
    return [v for k in sorted(groups) for v in groups[k]]


def _stats(values: Iterable[float]) -> dict[str, Any]:
    v = sorted(values)
    stats: dict[str, Any] = {"count": len(v)}
    stats["mean"] = _ms(math.fsum(v) / len(v)) if v else None
    for p in _PCTS:
        stats[f"p{p}"] = _ms(percentile(v, p))
    stats["max"] = _ms(v[-1]) if v else None
    return stats


def _depth_stats(samples: Sequence[tuple[float, int]], duration: float) -> dict[str, Any]:
    prev = -math.inf
    for t, _ in samples:
        if t < prev:
            raise ValueError(f"queue_depth samples are not time-ordered at t={t!r}ms")
        prev = t
    if not samples:
        return {"samples": 0, "max": None, "time_weighted_mean": None}
    # Depth holds from one sample to the next; the last holds to the end of the run.
    end = max(duration, samples[-1][0])
    area = math.fsum(
        d * ((samples[i + 1][0] if i + 1 < len(samples) else end) - t) for i, (t, d) in enumerate(samples)
    )
    span = end - samples[0][0]
    return {
        "samples": len(samples),
        "max": max(d for _, d in samples),
        "time_weighted_mean": _ratio(area / span) if span > 0 else None,
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(float(x), 3) + 0.0  # + 0.0 turns -0.0 into 0.0


def _ratio(x: float) -> float:
    return round(x, 6) + 0.0


# --- text table ---------------------------------------------------------------------


def format_table(summary: Mapping[str, Any]) -> str:
    """Render a ``summarise`` dict as a fixed-width text report (ms with 1 decimal)."""
    out: list[str] = []
    out.append(f"Replay report: {summary['trace']}")
    out.append("")
    out += _kv(
        "run",
        [
            ["trace", str(summary["trace"])],
            ["seed", str(summary["seed"])],
            ["simulated span", f"{_fmt_ms(summary['duration_ms'])} ms"],
            ["percentiles", str(summary["percentile_method"])],
            *([["rerun", summary["rerun"]]] if summary.get("rerun") else []),
        ],
        "ll",
    )
    out.append("")
    config = summary.get("config") or {}
    out += _kv(
        "config",
        [[str(k), _fmt_config(v)] for k, v in sorted(config.items(), key=lambda kv: str(kv[0]))]
        or [["(none)", ""]],
        "ll",
    )
    out.append("")

    total = summary["tasks"]
    rows = []
    for outcome, count in summary["outcomes"].items():
        rows.append([outcome, str(count), _fmt_pct(count, total)])
        for reason, n in summary["reasons"].get(outcome, {}).items():
            rows.append([f"  {reason}", str(n), _fmt_pct(n, total)])
    rows.append(["total", str(total), _fmt_pct(total, total)])
    out += _table(["outcome", "tasks", "%"], rows, "lrr")
    out.append("")

    lat_rows = []
    for label, key in (("queue wait", "queue_wait_ms"), ("TTFT", "ttft_ms"), ("end-to-end", "e2e_ms")):
        lat_rows.append(_lat_row(label, summary[key]))
    for prio, block in summary["by_priority"].items():
        for label, key in (("queue wait", "queue_wait_ms"), ("TTFT", "ttft_ms"), ("end-to-end", "e2e_ms")):
            lat_rows.append(_lat_row(f"{label} [{prio}]", block[key]))
    out += _table(["latency (ms)", "n", "mean", "p50", "p90", "p99", "max"], lat_rows, "lrrrrrr")
    out.append("  queue wait = start - arrival (dispatched tasks); TTFT = first token - arrival;")
    out.append("  end-to-end = end - arrival (completed tasks only)")
    out.append("")

    pool_rows = [
        [
            pool,
            str(p["slots"]),
            _fmt_ms(p["busy_ms"]),
            "-" if p["utilisation"] is None else f"{100.0 * p['utilisation']:.1f}",
        ]
        for pool, p in summary["pools"].items()
    ] or [["(none)", "", "", ""]]
    out += _table(["pool", "slots", "busy slot-ms", "util %"], pool_rows, "lrrr")
    out.append("")

    depth = summary["queue_depth"]
    thr = summary["throughput_tasks_per_s"]
    tok = summary["tokens_out_per_s"]
    out += _kv(
        "throughput and queue",
        [
            ["completed tasks/s", "-" if thr is None else f"{thr:.3f}"],
            ["tokens out", str(summary["tokens_out"])],
            ["tokens out/s", "-" if tok is None else f"{tok:.1f}"],
            *_prefix_rows(summary),
            ["max queue depth", "-" if depth["max"] is None else str(depth["max"])],
            [
                "mean queue depth (time-weighted)",
                "-" if depth["time_weighted_mean"] is None else f"{depth['time_weighted_mean']:.2f}",
            ],
        ],
        "lr",
    )
    out.append("")

    faults = summary.get("faults") or []
    out.append(f"faults ({len(faults)})")
    out += [f"  {line}" for line in faults] or ["  (none)"]
    return "\n".join(out) + "\n"


def _prefix_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    prefix = summary.get("prefix") or {}
    rows = []
    if prefix.get("prompt_tokens"):
        rate = prefix["hit_rate"]
        rows.append(["prompt tokens found in a KV cache", f"{prefix['cached_tokens']} of {prefix['prompt_tokens']} "
                                                          f"({'-' if rate is None else f'{100 * rate:.1f}%'})"])
    if summary.get("load_imbalance") is not None:
        rows.append(["busiest pool / mean pool (busy time)", f"{summary['load_imbalance']:.3f}"])
    return rows


def _kv(title: str, rows: list[list[str]], align: str) -> list[str]:
    """A titled block of aligned key/value lines, indented under the title."""
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [title]
    for key, value in rows:
        v = value.ljust(widths[1]) if align[1] == "l" else value.rjust(widths[1])
        lines.append(f"  {key.ljust(widths[0])}  {v}".rstrip())
    return lines


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)]
        return "  ".join(parts).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _lat_row(label: str, s: Mapping[str, Any]) -> list[str]:
    return [label, str(s["count"])] + [_fmt_ms(s[k]) for k in ("mean", "p50", "p90", "p99", "max")]


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _fmt_pct(n: int, total: int) -> str:
    return "-" if total == 0 else f"{100.0 * n / total:.1f}"


def _fmt_config(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


# --- files ----------------------------------------------------------------------------


def write_report(result: SimResult, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write report.txt, summary.json, tasks.csv and replay.png into ``out_dir``.

    Everything is rendered in memory first and each file is then replaced
    atomically, so a failure leaves either the old file or the new one, never a
    partial one. The same result gives byte-identical files. Returns the paths
    in ``REPORT_FILES`` order.
    """
    summary = summarise(result)
    contents = {
        "report.txt": format_table(summary).encode("utf-8"),
        "summary.json": (
            json.dumps(summary, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
        ).encode("utf-8"),
        "tasks.csv": _tasks_csv(result.tasks).encode("utf-8"),
        "replay.png": _render_png(result),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in REPORT_FILES:
        path = out / name
        _write_atomic(path, contents[name])
        paths.append(path)
    return paths


def _tasks_csv(tasks: Iterable[TaskRecord]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(TASK_CSV_COLUMNS)
    for t in sorted(tasks, key=lambda t: (t.arrival_ms, t.task_id)):
        wait, ttft, e2e = _intervals(t)
        w.writerow(
            [
                t.task_id,
                t.priority,
                _csv_ms(t.arrival_ms),
                t.outcome,
                t.reason or "",
                t.pool_id or "",
                _csv_ms(t.start_ms),
                _csv_ms(t.first_token_ms),
                _csv_ms(t.end_ms),
                t.tokens_out,
                _csv_ms(wait),
                _csv_ms(ttft),
                _csv_ms(e2e),
                t.prompt_tokens,
                t.cached_tokens,
            ]
        )
    return buf.getvalue()


def _csv_ms(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def _write_atomic(path: Path, data: bytes) -> None:
    # Created with O_EXCL and mode 0o666 so the umask applies as for any new
    # file (mkstemp would leave the report readable by its owner only).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- figure ---------------------------------------------------------------------------


def _render_png(result: SimResult) -> bytes:
    # Imported here so summarise/format_table users do not pay for matplotlib.
    import matplotlib
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The "default" style shields the bytes from the user's matplotlibrc and from
    # rcParams other code changed; rc_context restores them afterwards.
    with matplotlib.style.context("default"), matplotlib.rc_context(
        {"svg.hashsalt": "llama-orch-replay", "path.simplify": True}
    ):
        fig = Figure(figsize=_FIG_SIZE, dpi=_FIG_DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax_depth, ax_cdf = fig.subplots(1, 2)
        fig.suptitle(f"Replay of {result.trace_name} (seed {result.seed})")
        _plot_depth(ax_depth, result)
        _plot_cdfs(ax_cdf, result)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=_FIG_DPI, metadata={"Software": None})
    return buf.getvalue()


def _plot_depth(ax: Any, result: SimResult) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title("Queue depth over time")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("queued tasks")
    pts = _decimate(result.queue_depth, _MAX_PLOT_POINTS)
    if pts:
        xs = [t / 1000.0 for t, _ in pts]
        ys = [d for _, d in pts]
        end = result.duration_ms / 1000.0
        if end > xs[-1]:
            xs.append(end)
            ys.append(ys[-1])
        ax.step(xs, ys, where="post", color="tab:blue", linewidth=0.8, label="queue depth")
        ax.set_ylim(0, max(1, max(ys)) * 1.05)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.text(0.5, 0.5, "no queue samples", transform=ax.transAxes, ha="center", va="center")
    drawn: set[str] = set()
    for line in result.faults[:_MAX_FAULT_MARKERS]:
        m = _FAULT_TIME_RE.search(line)
        if not m:
            continue
        kind = fault_kind(line)
        colour, style = _FAULT_STYLES[kind]
        ax.axvline(float(m.group(1)) / 1000.0, color=colour, linestyle=style, linewidth=1.0,
                   label=kind if kind not in drawn else None)
        drawn.add(kind)
    ax.grid(True, alpha=0.3)
    if pts or drawn:
        # Below the axes, never over the curve (which often sits at the admission cap).
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=3, fontsize="small", frameon=False)


#: Fault kind -> (colour, line style) of its marker: each kind tells apart at a glance.
_FAULT_STYLES = {
    "pool lost": ("tab:red", "-"), "pool recovered": ("tab:green", "--"),
    "engine slow": ("tab:orange", "-."), "engine back to speed": ("tab:purple", ":"), "fault": ("tab:gray", ":"),
}


def fault_kind(line: str) -> str:
    """The kind of a fault log line (``Simulation``'s wording)."""
    if " lost" in line:
        return "pool lost"
    if " recovered" in line:
        return "pool recovered"
    if " slow (" in line:
        return "engine slow"
    if "back to speed" in line:
        return "engine back to speed"
    return "fault"


def _plot_cdfs(ax: Any, result: SimResult) -> None:
    ax.set_title("Queue wait and TTFT by priority (CDF)")
    ax.set_xlabel("time since arrival (ms, symlog scale)")
    ax.set_ylabel("fraction of tasks")
    waits: dict[str, list[float]] = {}
    ttfts: dict[str, list[float]] = {}
    for t in result.tasks:
        wait, ttft, _ = _intervals(t)
        if wait is not None:
            waits.setdefault(t.priority, []).append(wait)
        if ttft is not None:
            ttfts.setdefault(t.priority, []).append(ttft)
    seen = set(waits) | set(ttfts)
    prios = [p for p in _priority_order(seen) if p in seen]
    unknown = [p for p in prios if p not in _PRIORITY_COLOURS]
    colours = dict(_PRIORITY_COLOURS)
    colours.update({p: _OTHER_COLOURS[i % len(_OTHER_COLOURS)] for i, p in enumerate(unknown)})
    drew = False
    for p in prios:
        for values, style, what in ((waits.get(p), "-", "queue wait"), (ttfts.get(p), "--", "TTFT")):
            if not values:
                continue
            xs, ys = _cdf_points(sorted(values))
            ax.step(xs, ys, where="post", color=colours[p], linestyle=style, linewidth=1.2,
                    label=f"{p} {what} (n={len(values)})")
            drew = True
    if drew:
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_ylim(0.0, 1.02)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, fontsize="small", frameon=False)
    else:
        ax.text(0.5, 0.5, "no dispatched tasks", transform=ax.transAxes, ha="center", va="center")
    ax.grid(True, alpha=0.3)


def _cdf_points(v: list[float]) -> tuple[list[float], list[float]]:
    n = len(v)
    if n <= _MAX_CDF_POINTS:
        idx = range(n)
    else:
        m = _MAX_CDF_POINTS
        idx = sorted({(k * (n - 1)) // (m - 1) for k in range(m)})
    xs = [v[0]] + [v[i] for i in idx]
    ys = [0.0] + [(i + 1) / n for i in idx]
    return xs, ys


def _decimate(points: Sequence[tuple[float, int]], max_points: int) -> list[tuple[float, int]]:
    """Keep at most ``max_points`` samples: per bucket the first min and max, in time order.

    Min/max per bucket keeps the peaks a plain stride would skip; buckets are by
    index, so the result only depends on the input.
    """
    n = len(points)
    if n <= max_points:
        return list(points)
    per_bucket_pairs = max(1, (max_points - 2) // 2)
    size = -(-n // per_bucket_pairs)
    keep = {0, n - 1}
    for start in range(0, n, size):
        stop = min(start + size, n)
        lo = hi = start
        for i in range(start + 1, stop):
            d = points[i][1]
            if d < points[lo][1]:
                lo = i
            if d > points[hi][1]:
                hi = i
        keep.add(lo)
        keep.add(hi)
    return [points[i] for i in sorted(keep)]
