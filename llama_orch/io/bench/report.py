"""What ``llama-orch bench load`` prints and draws: the headline table against the targets,
one table per case, a latency CDF and throughput / p99 against offered load (PNG).

Ratios are taken round by round (each orchestratord run against its baseline's run of the
same round, the two a few seconds apart) and the median of those is shown, which cancels
most of a noisy machine's drift.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

#: orchestratord's target -> the baseline it is held against (targets are named in ``load``)
BASELINE_OF = {"orchd-v1": "relay", "orchd-v2": "two-step", "orchd-admit": "bare", "orchd-v2-traced": "orchd-v2",
               "orchd-v2-before": "orchd-v2"}


def _med(fig: dict | None) -> float | None:
    return None if fig is None else fig["median"]


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _span(fig: dict | None, digits: int = 0) -> str:
    """``median (min-max)``, or the median alone for one round."""
    if fig is None:
        return "-"
    if fig["min"] == fig["max"]:
        return _fmt(fig["median"], digits)
    return f"{_fmt(fig['median'], digits)} ({_fmt(fig['min'], digits)}-{_fmt(fig['max'], digits)})"


def ratio(case: dict, target: str, baseline: str | None = None) -> float | None:
    """Median over rounds of target tasks/s / baseline tasks/s in the same round."""
    targets = case["targets"]
    baseline = baseline or BASELINE_OF.get(target)
    if target not in targets or baseline not in targets:
        return None
    pairs = [a / b for a, b in zip(targets[target]["per_round_tasks_per_s"], targets[baseline]["per_round_tasks_per_s"])
             if b > 0]
    return statistics.median(pairs) if pairs else None


def _q(fig: dict, key: str, q: str) -> float | None:
    return _med(fig[key].get(q))


def _errors(fig: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(fig["errors"].items())) or "0"


def _overhead(case: dict, target: str, q: str) -> float | None:
    targets = case["targets"]
    if target not in targets or "engine" not in targets:
        return None
    mine, engine = _q(targets[target], "ttft_ms", q), _q(targets["engine"], "ttft_ms", q)
    return None if mine is None or engine is None else mine - engine


def headline(results: dict) -> list[tuple[str, str, str, str]]:
    """(what, measured, target, met) rows: the issue's targets, as this run measured them."""
    cases, rows = results["cases"], []

    def met(ok: bool | None) -> str:
        return "-" if ok is None else ("yes" if ok else "NO")

    for name, tokens, floor in (("closed-50", 50, 1.0), ("closed-8", 8, 0.8)):
        case = cases.get(name)
        if case is None:
            continue
        for target in ("orchd-v1", "orchd-v2"):
            r = ratio(case, target)
            t = case["targets"].get(target)
            base = case["targets"].get(BASELINE_OF[target])
            rows.append((f"closed loop 64, {tokens} tokens: {target} / {BASELINE_OF[target]} tasks/s",
                         f"{_fmt(_med(t and t['tasks_per_s']))} / {_fmt(_med(base and base['tasks_per_s']))} = "
                         f"{_fmt(r, 2)}x", f">= {floor:.1f}x", met(None if r is None else r >= floor)))
        for target in ("orchd-v1", "orchd-v2"):
            t, base = case["targets"].get(target), case["targets"].get(BASELINE_OF[target])
            if t and base:
                rows.append((f"CPU per task, {tokens} tokens: {target} / {BASELINE_OF[target]}",
                             f"{_fmt(_med(t['cpu_us_per_task']))} us / {_fmt(_med(base['cpu_us_per_task']))} us",
                             "", ""))
    case = cases.get("open-1000")
    if case is not None:
        rate = case["case"]["rate"]
        for target in ("orchd-v1", "orchd-v2"):
            t = case["targets"].get(target)
            if t is None:
                continue
            errors = sum(t["errors"].values())
            adm99, over99 = _q(t, "admission_ms", "99"), _overhead(case, target, "99")
            rows.append((f"open loop {rate:g}/s, 50 tokens: {target} errors, admission p99, TTFT overhead p99",
                         f"{errors}, {_fmt(adm99, 1)} ms, {_fmt(over99, 1)} ms", "0, <= 5 ms, <= 10 ms",
                         met(None if adm99 is None or over99 is None else errors == 0 and adm99 <= 5 and over99 <= 10)))
    case = cases.get("admission")
    if case is not None:
        r = ratio(case, "orchd-admit")
        t = case["targets"].get("orchd-admit")
        rows.append(("admission alone: orchd / bare aiohttp tasks/s",
                     f"{_fmt(_med(t and t['tasks_per_s']))} = {_fmt(r, 2)}x (p99 {_fmt(t and _q(t, 'admission_ms', '99'), 1)} ms)",
                     ">= 0.5x", met(None if r is None else r >= 0.5)))
        idle = case.get("idle")
        if idle:
            per = idle.get("bytes_per_queued_task")
            rows.append((f"{idle['queued']:,} queued tasks: memory per task, all in", f"{_fmt(per)} B", "<= 1024 B",
                         met(None if per is None else per <= 1024)))
            rows.append(("idle with the queue full: CPU share", f"{idle['cpu_share'] * 100:.1f}%", "< 5%",
                         met(idle["cpu_share"] < 0.05)))
    case = cases.get("tracing")
    if case is not None:
        r = ratio(case, "orchd-v2-traced")
        rows.append(("tracing on (every span exported) / off, tasks/s", f"{_fmt(r, 3)}x", "", ""))
        before = ratio(case, "orchd-v2-before")  # the checkout before over this one, tracing off
        if before is not None:
            rows.append(("tracing off / the checkout before, tasks/s", f"{_fmt(1 / before, 3)}x", ">= 0.98x",
                         met(1 / before >= 0.98)))
    pauses = [c["gc"] for c in cases.values() if c.get("gc")]
    if pauses:
        over = sum(p.get("over_10ms", 0) for p in pauses)
        worst = max((p.get("max_ms") or 0.0) for p in pauses)
        rows.append(("GC pauses over 10 ms under load (all cases)", f"{over} (longest {worst:.1f} ms)", "0",
                     met(over == 0)))
    case = cases.get("relay-tokens")
    if case is not None:
        for target in ("orchd-v1", "orchd-v2", "relay"):
            t = case["targets"].get(target)
            if t is not None:
                per_core = _med(t["tokens_per_cpu_s"])
                rows.append((f"relayed tokens per CPU second, 50 per read: {target}", f"{_fmt(per_core)}",
                             ">= 200,000" if target != "relay" else "",
                             met(None if per_core is None else per_core >= 200_000) if target != "relay" else ""))
    return rows


def table(results: dict) -> str:
    lines = [f"# llama-orch bench load ({'quick' if results['quick'] else 'full'}; {results['cpus']} CPUs, "
             f"{'server pinned to one CPU' if results['pinned'] else 'not pinned'}; Python {results['python']}; "
             f"{results['started']})", "", "## Against the targets", "",
             "| what | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in headline(results)]
    for name, case in results["cases"].items():
        spec = case["case"]
        lines += ["", f"## {name}: {spec['title']} ({spec['rounds']} rounds of {spec['duration_s']:g} s; "
                      "median (range))", "",
                  "| target | tasks/s | vs baseline | admission p50 / p99 / p99.9 ms | TTFT p50 / p99 ms | "
                  "TTFT overhead p99 | server CPU us/task | us/token | RSS MB | errors |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for target, fig in case["targets"].items():
            adm = " / ".join(_fmt(_q(fig, "admission_ms", q), 1) for q in ("50", "99", "99.9"))
            ttft = " / ".join(_fmt(_q(fig, "ttft_ms", q), 1) for q in ("50", "99"))
            rss = _med(fig["rss_bytes"])
            lines.append(f"| {target} | {_span(fig['tasks_per_s'])} | {_fmt(ratio(case, target), 2)}"
                         f"{'x' if ratio(case, target) is not None else ''} | {adm} | {ttft} | "
                         f"{_fmt(_overhead(case, target, '99'), 1)} | {_span(fig['cpu_us_per_task'])} | "
                         f"{_fmt(_med(fig['cpu_us_per_token']), 1)} | {_fmt(rss and rss / 2**20)} | {_errors(fig)} |")
        if case.get("idle"):
            idle = case["idle"]
            lines.append(f"\nIdle with {idle['queued']:,} tasks queued: {idle['cpu_share'] * 100:.2f}% of a CPU, RSS "
                         f"{idle['rss_bytes'] / 2**20:.0f} MB ({_fmt(idle.get('bytes_per_queued_task'))} B per task "
                         "over the RSS at start-up).")
        if case.get("gc"):
            gc = case["gc"]
            lines.append(f"\norchestratord's GC: {gc.get('collections', 0)} collections, {gc.get('over_10ms', 0)} "
                         f"over 10 ms, longest {_fmt(gc.get('max_ms'), 1)} ms.")
    sweep = results.get("sweep")
    if sweep:
        lines += ["", "## Offered load sweep (open loop, 50 tokens burst)", "",
                  "| offered tasks/s | " + " | ".join(f"{t} tasks/s, TTFT p99 ms, errors" for t in sweep["points"]) + " |",
                  "|---|" + "---|" * len(sweep["points"])]
        for i, rate in enumerate(sweep["rates"]):
            cells = []
            for points in sweep["points"].values():
                p = points[i]
                cells.append(f"{p['tasks_per_s']:,.0f}, {_fmt(p['ttft_ms']['99'], 1)}, "
                             f"{sum(p['errors'].values())}")
            lines.append(f"| {rate:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(results: dict, records: list[dict], out: Path) -> list[Path]:
    """``load_latency_cdf.png`` and, with a sweep, ``load_vs_offered.png``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    written = []
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    panels = [("open-1000", "ttft", "TTFT from the scheduled send (ms)"),
              ("admission", "admitted", "admission from the scheduled send (ms)"),
              ("closed-50", "ttft", "TTFT, closed loop 64, 50 tokens (ms)")]
    axes = fig.subplots(1, len(panels))
    for ax, (case, field, label) in zip(axes, panels):
        by_target: dict[str, list[float]] = {}
        for rec in records:
            if rec["case"] != case:
                continue
            r = rec["record"]
            for i, outcome in enumerate(r["outcome"]):
                if outcome != "ok":
                    continue
                end = r["first"][i] if field == "ttft" else r["admitted"][i]
                if end is not None and not math.isnan(end):  # NaN in process, null once through JSON
                    by_target.setdefault(rec["target"], []).append(end - r["scheduled"][i])
        for target, values in sorted(by_target.items()):
            values.sort()
            n = len(values)
            ax.plot(values, [(i + 1) / n for i in range(n)], label=f"{target} (n={n:,})")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of tasks")
        ax.set_title(case)
        ax.grid(True, which="both", alpha=0.3)
        if by_target:
            ax.legend(fontsize=7, loc="lower right")
    path = out / "load_latency_cdf.png"
    fig.savefig(path, dpi=110)
    written.append(path)
    sweep = results.get("sweep")
    if sweep:
        fig = Figure(figsize=(11, 4.5), layout="constrained")
        left, right = fig.subplots(1, 2)
        for target, points in sweep["points"].items():
            offered = [p["offered"] for p in points]
            left.plot(offered, [p["tasks_per_s"] for p in points], marker="o", label=target)
            right.plot(offered, [p["ttft_ms"]["99"] or float("nan") for p in points], marker="o", label=target)
        left.plot(sweep["rates"], sweep["rates"], linestyle=":", color="grey", label="offered")
        left.set_xlabel("offered tasks/s")
        left.set_ylabel("completed tasks/s")
        right.set_xlabel("offered tasks/s")
        right.set_ylabel("TTFT p99 from the scheduled send (ms)")
        right.set_yscale("log")
        for ax in (left, right):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="upper left")
        path = out / "load_vs_offered.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written
