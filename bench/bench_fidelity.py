"""A short smoke of ``llama-orch bench fidelity``: a local cluster of mock engines, the calibration,
one utilisation level for a few seconds live and the same slice simulated, through the real
command. It checks the harness end to end and the accounting (every request sent ends once, on
both sides), not the figures: the full run (README) measures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(600)
def test_bench_fidelity_quick_drives_live_and_simulated_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "fidelity"
    done = subprocess.run([sys.executable, "-m", "llama_orch.cli", "bench", "fidelity", "conv", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "fidelity.json").read_text())
    calib = result["calibration"]
    # the mock engines run at the configured 100 tokens/s, 0.1 ms per prompt token, 20 ms first token
    assert 80 < calib["tokens_per_s"] < 110 and calib["slots"] == 4 and calib["tokens_per_word"] == 1.0
    (level,) = result["levels"]
    for side in ("live", "sim"):
        assert sum(level["outcomes"][side].values()) == level["requests"], side
        assert level["outcomes"][side].get("completed", 0) > 0, side
        assert not [k for k in level["outcomes"][side] if k.startswith(("failed", "unknown"))], level["outcomes"]
    assert level["metrics"]["total_ms"]["live"]["n"] == level["outcomes"]["live"]["completed"]
    report = (out / "fidelity.md").read_text()
    assert "| total time |" in report and "llama-orch replay conv" in report
    assert (out / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
