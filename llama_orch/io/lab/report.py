"""The lab's report: the scenario table (Markdown and JSON) and one PNG timeline per scenario.

The table has a row per scenario: submitted, completed, canceled, errored by code, rejected
(429/503), unreachable and cut (the client lost its connection to orchestratord), lost (must be
0), leaked slots (must be 0), time to route away and time to recover. The timeline plots the
client's tasks in flight per pool against time, with the fault and the heal marked.
"""

from __future__ import annotations

from pathlib import Path

import orjson

COLUMNS = ("scenario", "submitted", "completed", "canceled", "errored", "rejected", "unreachable", "cut", "lost",
           "leaked", "route away s", "recover s")


def _cell(row: dict, column: str) -> str:
    if column == "errored":
        return ", ".join(f"{code} {n}" for code, n in sorted(row["errored"].items())) or "0"
    if column == "route away s":
        return "-" if row["route_away_s"] is None else f"{row['route_away_s']:.2f}"
    if column == "recover s":
        return "-" if row["recover_s"] is None else f"{row['recover_s']:.2f}"
    return str(row[column])


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write(out: Path, results: list, *, title: str, notes: list[str] = ()) -> Path:
    """``scenarios.md``, ``scenarios.json`` and ``<scenario>.png`` in ``out``; returns the table's path."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.row for r in results]
    md = [f"# {title}", "", table(rows), ""]
    details = []
    for r in results:
        extra = [f"correlation ids on failed tasks' log lines {r.row['correlation']}"]
        if r.row["proven"]:
            extra += [f"{'fired' if seen else 'DID NOT FIRE'}: {text!r}" for text, seen in r.row["proven"].items()]
        if r.row["restart_knows"]:
            extra.append(r.row["restart_knows"])
        if r.leak_detail:
            extra.append(f"leak: {r.leak_detail}")
        details.append(f"- **{r.scenario.name}**: {r.scenario.title}. " + "; ".join(extra) + ".")
    md += details + [""] + [f"- {n}" for n in notes]
    (out / "scenarios.md").write_text("\n".join(md) + "\n")
    (out / "scenarios.json").write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    for r in results:
        name = r.row["scenario"].replace(" (", "-").rstrip(")")
        timeline(r, out / f"{name}.png")
        # every task as the client saw it, and the fault's times: what a failed check is read from
        (out / f"{name}.tasks.json").write_bytes(orjson.dumps(
            {"fault_at": r.fault_at, "heal_at": r.heal_at, "records": r.records}, option=orjson.OPT_INDENT_2))
    return out / "scenarios.md"


def timeline(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result.timeline
    if not samples:
        return
    t0 = samples[0][0]
    pools = sorted({p for _, counts in samples for p in counts} | {d[1] for r in result.records for d in r["dispatches"]})
    fig, ax = plt.subplots(figsize=(9, 3.6))
    xs = [t - t0 for t, _ in samples]
    for pool in pools:
        ax.step(xs, [counts.get(pool, 0) for _, counts in samples], where="post", label=pool, linewidth=1.2)
    failed = [r["outcome_at"] - t0 for r in result.records
              if r["outcome_at"] and r["outcome"] not in ("end", "canceled")]
    if failed:
        ax.plot(failed, [0] * len(failed), "x", color="black", label="task not completed")
    if result.fault_at is not None:
        ax.axvline(result.fault_at - t0, color="red", linestyle="--", label="fault")
    if result.heal_at is not None and result.heal_at != result.fault_at:
        ax.axvline(result.heal_at - t0, color="green", linestyle="--", label="heal")
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("tasks in flight")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"{result.scenario.name}: {result.scenario.title}", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=min(8, len(pools) + 3), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
