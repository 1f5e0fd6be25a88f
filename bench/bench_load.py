"""A short smoke of ``llama-orch bench load``: every case and the sweep, one round of a fraction of a
second each (``--quick``), through the real command. It checks that the harness works end to end
(processes, pinning, the load generator, the tables and the plots), not the figures: the full run
(``make bench-load``) measures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(600)
def test_bench_load_quick_runs_every_case_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "load"
    done = subprocess.run([sys.executable, "-m", "llama_orch.cli", "bench", "load", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "load.json").read_text())
    assert set(results["cases"]) == {"closed-50", "closed-8", "open-1000", "open-500-paced", "relay-tokens",
                                     "admission", "tracing"}
    for name, case in results["cases"].items():
        assert set(case["targets"]) == set(case["case"]["targets"]), name
        for target, figures in case["targets"].items():
            assert figures["tasks"] > 0 and figures["tasks_per_s"]["median"] > 0, (name, target)
            if target != "engine":  # the server under test is watched from /proc
                assert figures["cpu_us_per_task"] is not None, (name, target)
        if name.startswith("closed") or name == "relay-tokens":
            # a closed loop at this size has no reason to fail a task on any target
            assert {t: f["errors"] for t, f in case["targets"].items() if f["errors"]} == {}, name
    idle = results["cases"]["admission"]["idle"]
    assert idle["queued"] > 0 and idle["bytes_per_queued_task"] is not None
    assert results["cases"]["closed-50"]["gc"]["collections"] >= 0
    assert {p["offered"] for p in results["sweep"]["points"]["orchd-v2"]} == set(results["sweep"]["rates"])
    table = (out / "load.md").read_text()
    assert "## Against the targets" in table and "orchd-v1 / relay tasks/s" in table
    assert "tracing on (every span exported) / off, tasks/s" in table
    for png in ("load_latency_cdf.png", "load_vs_offered.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
