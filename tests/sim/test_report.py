"""Tests for llama_orch.sim.report: statistics, text table and the written report."""

from __future__ import annotations

import csv
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from llama_orch.sim import report
from llama_orch.sim.report import (
    REPORT_FILES,
    TASK_CSV_COLUMNS,
    SimResult,
    TaskRecord,
    format_table,
    percentile,
    summarise,
    write_report,
)

REPO = Path(__file__).resolve().parents[2]


def task(tid, prio, arrival, outcome="completed", reason=None, pool=None, start=None, ft=None, end=None, tokens=0):
    return TaskRecord(
        task_id=tid,
        priority=prio,
        arrival_ms=arrival,
        outcome=outcome,
        reason=reason,
        pool_id=pool,
        start_ms=start,
        first_token_ms=ft,
        end_ms=end,
        tokens_out=tokens,
    )


def hand_made() -> SimResult:
    """Ten interactive completions with waits 1..10 ms plus one batch task per other outcome."""
    tasks = []
    for i in range(1, 11):
        arrival = 100.0 * i
        start = arrival + i
        tasks.append(task(f"i{i:02d}", "interactive", arrival, pool="pool-a", start=start, ft=start + 5, end=start + 105, tokens=10))
    tasks += [
        task("b1", "batch", 50.0, "rejected", "ADMISSION_REJECT", end=50.0),
        task("b2", "batch", 60.0, "rejected", "ADMISSION_REJECT", end=60.0),
        task("b3", "batch", 70.0, "rejected", "QUEUE_FULL", end=70.0),
        task("b4", "batch", 200.0, "canceled", "CLIENT_CANCEL", "pool-b", start=220.0, end=230.0),
        task("b5", "batch", 300.0, "failed", None, "pool-b", start=300.0, ft=340.0, end=350.0, tokens=3),
        task("b6", "batch", 400.0, "evicted", "POOL_LOST", "pool-b", start=430.0, ft=450.0, end=500.0, tokens=4),
    ]
    return SimResult(
        trace_name="hand-made",
        seed=42,
        config={"rate": 2.0, "length": 0.5, "policy": "fifo", "pools": {"pool-a": 2, "pool-b": 1}},
        tasks=tuple(reversed(tasks)),  # order must not matter
        queue_depth=((0.0, 0), (50.0, 2), (100.0, 1), (500.0, 3), (1000.0, 0)),
        pool_busy_ms={"pool-a": 1050.0, "pool-b": 120.0},
        pool_slots={"pool-a": 2, "pool-b": 1, "pool-c": 4},
        duration_ms=1500.0,
        faults=("t=700.0ms pool-b lost", "t=900.0ms pool-b back"),
    )


def big(n: int = 20_000, depth_points: int = 60_000) -> SimResult:
    """A report-sized result built arithmetically (no RNG, so it is the same everywhere)."""
    tasks = []
    for i in range(n):
        arrival = i * 180.0
        prio = "batch" if i % 3 == 0 else "interactive"
        if i % 50 == 0:
            tasks.append(task(f"t{i:05d}", prio, arrival, "rejected", "ADMISSION_REJECT", end=arrival))
            continue
        wait = float((i * 7919) % 5000) / (10.0 if prio == "interactive" else 1.0)
        start = arrival + wait
        ft = start + 20 + (i % 13)
        tasks.append(task(f"t{i:05d}", prio, arrival, pool=f"pool-{i % 4}", start=start, ft=ft, end=ft + 400 + (i % 97) * 10, tokens=50 + i % 200))
    depth = tuple((i * 60.0, (i * 37) % 101 + (i // 1000)) for i in range(depth_points))
    return SimResult(
        trace_name="big",
        seed=1,
        config={"rate": 1.0},
        tasks=tuple(tasks),
        queue_depth=depth,
        pool_busy_ms={f"pool-{k}": 1e6 * (k + 1) for k in range(4)},
        pool_slots={f"pool-{k}": 8 for k in range(4)},
        duration_ms=n * 180.0 + 5000.0,
        faults=tuple(f"t={k * 100000.0}ms pool-{k % 4} lost" for k in range(5)),
    )


# --- percentile -----------------------------------------------------------------------


def test_percentile_nearest_rank():
    v = [float(x) for x in range(1, 11)]
    assert [percentile(v, p) for p in (10, 50, 90, 99, 100)] == [1.0, 5.0, 9.0, 10.0, 10.0]
    assert percentile(v, 0.1) == 1.0
    assert percentile(v, 51) == 6.0
    assert percentile([7.0], 50) == 7.0
    assert percentile([], 50) is None
    hundred = list(range(1, 101))
    assert [percentile(hundred, p) for p in (1, 29, 50, 99)] == [1, 29, 50, 99]
    thousand = list(range(1, 1001))
    assert percentile(thousand, 99.9) == 999
    for bad in (0, -1, 100.5):
        with pytest.raises(ValueError, match="pct"):
            percentile(v, bad)


# --- summarise ------------------------------------------------------------------------


def test_summarise_hand_made():
    s = summarise(hand_made())
    assert s["trace"] == "hand-made" and s["seed"] == 42
    assert s["percentile_method"] == "nearest-rank"
    assert s["tasks"] == 16
    assert s["outcomes"] == {"completed": 10, "rejected": 3, "canceled": 1, "failed": 1, "evicted": 1}
    assert s["reasons"] == {
        "rejected": {"ADMISSION_REJECT": 2, "QUEUE_FULL": 1},
        "canceled": {"CLIENT_CANCEL": 1},
        "failed": {"unspecified": 1},
        "evicted": {"POOL_LOST": 1},
    }
    # waits: 1..10 (interactive), 20, 0, 30 (batch) -> sorted 0,1..10,20,30 (n=13)
    assert s["queue_wait_ms"] == {"count": 13, "mean": 8.077, "p50": 6.0, "p90": 20.0, "p99": 30.0, "max": 30.0}
    # TTFT: 6..15 (interactive), 40, 50 (batch); the canceled task has no first token
    assert s["ttft_ms"] == {"count": 12, "mean": 16.25, "p50": 11.0, "p90": 40.0, "p99": 50.0, "max": 50.0}
    # end-to-end: completed only, 106..115
    assert s["e2e_ms"] == {"count": 10, "mean": 110.5, "p50": 110.0, "p90": 114.0, "p99": 115.0, "max": 115.0}
    inter = s["by_priority"]["interactive"]
    assert (inter["tasks"], inter["completed"]) == (10, 10)
    assert inter["queue_wait_ms"]["p50"] == 5.0
    assert inter["queue_wait_ms"]["p90"] == 9.0
    assert inter["queue_wait_ms"]["p99"] == 10.0
    batch = s["by_priority"]["batch"]
    assert (batch["tasks"], batch["completed"]) == (6, 0)
    assert batch["queue_wait_ms"] == {"count": 3, "mean": 16.667, "p50": 20.0, "p90": 30.0, "p99": 30.0, "max": 30.0}
    assert batch["e2e_ms"]["p50"] is None and batch["e2e_ms"]["count"] == 0
    assert s["pools"] == {
        "pool-a": {"slots": 2, "busy_ms": 1050.0, "utilisation": 0.35},
        "pool-b": {"slots": 1, "busy_ms": 120.0, "utilisation": 0.08},
        "pool-c": {"slots": 4, "busy_ms": 0.0, "utilisation": 0.0},
    }
    assert s["throughput_tasks_per_s"] == pytest.approx(10 / 1.5, abs=1e-6)
    assert s["tokens_out"] == 107
    assert s["tokens_out_per_s"] == pytest.approx(107 / 1.5, abs=1e-6)
    assert s["queue_depth"] == {"samples": 5, "max": 3, "time_weighted_mean": 1.333333}
    assert s["faults"] == ["t=700.0ms pool-b lost", "t=900.0ms pool-b back"]
    assert s["config"]["pools"] == {"pool-a": 2, "pool-b": 1}
    json.dumps(s, allow_nan=False)  # JSON-able


def test_summarise_none_where_no_data():
    r = SimResult(
        trace_name="none",
        seed=0,
        config={},
        tasks=(task("a", "interactive", 0.0, "rejected", "ADMISSION_REJECT"),),
        queue_depth=(),
        pool_busy_ms={},
        pool_slots={"p": 2},
        duration_ms=0.0,
    )
    s = summarise(r)
    for key in ("queue_wait_ms", "ttft_ms", "e2e_ms"):
        assert s[key] == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    assert s["throughput_tasks_per_s"] is None
    assert s["pools"]["p"]["utilisation"] is None
    assert s["queue_depth"] == {"samples": 0, "max": None, "time_weighted_mean": None}
    assert set(s["by_priority"]) == {"interactive", "batch"}
    table = format_table(s)
    assert "queue wait" in table and " -" in table


def test_summarise_keeps_unknown_priority_classes():
    r = hand_made()
    extra = task("x1", "bulk", 10.0, pool="pool-a", start=12.0, ft=13.0, end=20.0)
    s = summarise(SimResult(**{**_fields(r), "tasks": r.tasks + (extra,)}))
    assert list(s["by_priority"]) == ["interactive", "batch", "bulk"]
    assert s["by_priority"]["bulk"]["queue_wait_ms"]["max"] == 2.0


def _fields(r: SimResult) -> dict:
    return {f: getattr(r, f) for f in r.__dataclass_fields__}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"tasks": (task("z", "batch", 5.0, "lost"),)}, "unknown outcome 'lost'"),
        ({"tasks": (task("z", "batch", 5.0, pool="p", start=4.0, end=9.0),)}, "before arrival"),
        ({"pool_busy_ms": {"ghost": 1.0}}, "ghost"),
        ({"queue_depth": ((5.0, 1), (4.0, 2))}, "not time-ordered"),
        ({"duration_ms": float("nan")}, "duration_ms"),
    ],
)
def test_summarise_rejects_impossible_results(change, needle):
    r = SimResult(**{**_fields(hand_made()), **change})
    with pytest.raises(ValueError, match=needle):
        summarise(r)


# --- format_table ---------------------------------------------------------------------


def _block(lines: list[str], title: str) -> list[str]:
    start = next(i for i, ln in enumerate(lines) if ln.startswith(title))
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return lines[start:end]


def test_format_table_content_and_alignment():
    text = format_table(summarise(hand_made()))
    lines = text.splitlines()
    assert text.endswith("\n")
    # config lines, sorted, JSON for non-strings
    config = _block(lines, "config")
    assert config[1:] == [
        "  length  0.5",
        "  policy  fifo",
        '  pools   {"pool-a": 2, "pool-b": 1}',
        "  rate    2.0",
    ]
    assert "  seed            42" in lines
    assert "  simulated span  1500.0 ms" in lines
    # latency table: header, rule, rows all the same width and right-aligned numbers
    lat = _block(lines, "latency (ms)")
    rule = lat[1]
    assert set(rule) <= {"-", " "}
    rows = [ln for ln in lat[2:] if not ln.startswith("  ")]
    assert len(rows) == 9
    assert all(len(r) == len(rule) for r in rows)
    assert rows[0].split() == ["queue", "wait", "13", "8.1", "6.0", "20.0", "30.0", "30.0"]
    assert lat[0].index("p50") + 3 == rows[0].index(" 6.0") + 4
    assert rows[5].split() == ["end-to-end", "[interactive]", "10", "110.5", "110.0", "114.0", "115.0", "115.0"]
    # pools, with utilisation in percent
    pools = _block(lines, "pool ")
    assert [p.split() for p in pools[2:]] == [
        ["pool-a", "2", "1050.0", "35.0"],
        ["pool-b", "1", "120.0", "8.0"],
        ["pool-c", "4", "0.0", "0.0"],
    ]
    assert all(len(p) == len(pools[1]) for p in pools[2:])
    outcomes = _block(lines, "outcome")
    assert "  ADMISSION_REJECT" in outcomes[4]
    assert outcomes[4].split() == ["ADMISSION_REJECT", "2", "12.5"]
    assert "  t=700.0ms pool-b lost" in lines


# --- write_report ---------------------------------------------------------------------


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_write_report_files_valid_and_byte_identical(tmp_path):
    r = hand_made()
    a = write_report(r, tmp_path / "a")
    b = write_report(r, tmp_path / "nested" / "b")  # parents created
    assert [p.name for p in a] == list(REPORT_FILES) == [p.name for p in b]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    assert sorted(os.listdir(tmp_path / "a")) == sorted(REPORT_FILES)  # no temp files left

    files = {p.name: p.read_bytes() for p in a}
    assert _png_size(files["replay.png"]) == (1200, 480)
    assert b"Software" not in files["replay.png"]
    summary = json.loads(files["summary.json"])
    assert summary == json.loads(json.dumps(summarise(r)))
    assert files["summary.json"].decode().startswith('{\n  "by_priority"')  # sorted keys, indent 2
    assert files["report.txt"].decode() == format_table(summarise(r))

    rows = list(csv.reader(files["tasks.csv"].decode().splitlines()))
    assert tuple(rows[0]) == TASK_CSV_COLUMNS
    assert len(rows) == 1 + len(r.tasks)
    assert [row[0] for row in rows[1:4]] == ["b1", "b2", "b3"]
    keys = [(float(row[2]), row[0]) for row in rows[1:]]
    assert keys == sorted(keys)
    b4 = next(row for row in rows if row[0] == "b4")
    assert dict(zip(TASK_CSV_COLUMNS, b4)) == {
        "task_id": "b4",
        "priority": "batch",
        "arrival_ms": "200.000",
        "outcome": "canceled",
        "reason": "CLIENT_CANCEL",
        "pool_id": "pool-b",
        "start_ms": "220.000",
        "first_token_ms": "",
        "end_ms": "230.000",
        "tokens_out": "0",
        "queue_wait_ms": "20.000",
        "ttft_ms": "",
        "e2e_ms": "30.000",
        "prompt_tokens": "0",
        "cached_tokens": "0",
    }


def test_tasks_csv_ties_sorted_by_task_id(tmp_path):
    r = SimResult(
        **{
            **_fields(hand_made()),
            "tasks": (task("b", "batch", 5.0, "rejected", "X"), task("a", "batch", 5.0, "rejected", "X"), task("c", "batch", 1.0, "rejected", "X")),
        }
    )
    paths = write_report(r, tmp_path)
    ids = [line.split(",")[0] for line in paths[2].read_text().splitlines()[1:]]
    assert ids == ["c", "a", "b"]


def test_png_ignores_global_rcparams(tmp_path):
    import matplotlib

    r = hand_made()
    ref = write_report(r, tmp_path / "ref")[3].read_bytes()
    with matplotlib.rc_context({"lines.linewidth": 7.0, "axes.facecolor": "black", "font.size": 20}):
        got = write_report(r, tmp_path / "styled")[3].read_bytes()
    assert got == ref
    assert matplotlib.rcParams["lines.linewidth"] != 7.0  # and nothing leaked out


def test_byte_identical_across_processes(tmp_path):
    r = big(3_000, 5_000)
    blob = tmp_path / "result.pickle"
    blob.write_bytes(pickle.dumps(r))
    here = write_report(r, tmp_path / "here")
    code = (
        "import pickle, sys; from llama_orch.sim.report import write_report; "
        "write_report(pickle.loads(open(sys.argv[1], 'rb').read()), sys.argv[2])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(blob), str(tmp_path / "there")], check=True, cwd=REPO, env=env)
    for p in here:
        assert p.read_bytes() == (tmp_path / "there" / p.name).read_bytes(), p.name


def test_rewrite_overwrites_and_failures_leave_old_files(tmp_path, monkeypatch):
    r = hand_made()
    write_report(r, tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in REPORT_FILES}
    changed = SimResult(**{**_fields(r), "seed": 7})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_report(changed, tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(REPORT_FILES)  # temp file cleaned up
    assert {n: (tmp_path / n).read_bytes() for n in REPORT_FILES} == before

    monkeypatch.setattr(report, "_render_png", lambda result: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_report(changed, tmp_path)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in REPORT_FILES} == before  # nothing half-done

    write_report(changed, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["seed"] == 7


def test_decimate_keeps_envelope_and_is_deterministic():
    pts = [(float(i), (i * 7919) % 1009) for i in range(100_000)]
    pts[54_321] = (54_321.0, 5000)  # a lone spike a stride would miss
    out = report._decimate(pts, 20_000)
    assert len(out) <= 20_000
    assert out == report._decimate(pts, 20_000)
    assert out[0] == pts[0] and out[-1] == pts[-1]
    assert (54_321.0, 5000) in out
    assert min(d for _, d in out) == min(d for _, d in pts)
    assert [t for t, _ in out] == sorted({t for t, _ in out})
    assert report._decimate(pts[:10], 20_000) == pts[:10]


def test_big_report(tmp_path):
    r = big()
    paths = write_report(r, tmp_path)
    s = json.loads(paths[1].read_text())
    assert s["tasks"] == 20_000
    assert s["outcomes"]["rejected"] == 400
    assert _png_size(paths[3].read_bytes()) == (1200, 480)
    assert len(paths[2].read_text().splitlines()) == 20_001


def test_each_fault_kind_has_a_marker_of_its_own():
    from llama_orch.sim.report import _FAULT_STYLES, fault_kind

    lines = ["t=10.0ms pool-1 lost (2 tasks running)", "t=20.0ms pool-1 recovered", "t=30.0ms pool-2 slow (x4)",
             "t=40.0ms pool-2 back to speed"]
    kinds = [fault_kind(line) for line in lines]
    assert kinds == ["pool lost", "pool recovered", "engine slow", "engine back to speed"]
    assert len({_FAULT_STYLES[k] for k in kinds}) == 4
