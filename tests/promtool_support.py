"""promtool for the tests: ``tools/get-promtool`` finds or fetches it (Debian's ``prometheus``
package, extracted into ``~/.cache/llama-orch/promtool``; nothing is installed, no daemon starts).
Where it cannot be had, the tests that need it skip with the script's one line."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GET_PROMTOOL = ROOT / "tools" / "get-promtool"


@functools.cache
def _find() -> tuple[str | None, str]:
    try:
        done = subprocess.run([str(GET_PROMTOOL)], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"tools/get-promtool did not run: {exc}"
    if done.returncode == 0 and done.stdout.strip():
        return done.stdout.strip().splitlines()[-1], ""
    return None, (done.stderr.strip().splitlines() or ["tools/get-promtool found no promtool"])[-1]


def promtool() -> str:
    """The path of a working promtool, or skip the test with the one line saying why there is none."""
    path, why = _find()
    if path is None:
        pytest.skip(f"no promtool: {why}")
    return path


def run(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd)


#: Names the contract fixes that promtool's linter would have spelled otherwise: an ``_ms`` unit, and
#: a gauge named ``pool_slots_total``.
CONTRACT_MS_NAMES = frozenset({"latency_first_token_ms", "latency_decode_ms", "orchd_dispatch_latency_ms",
                               "orchd_pool_health_check_duration_ms", "pool_handoff_processing_duration_ms"})
ABBREVIATED = "metric names should not contain abbreviated units"
CONTRACT_LINT = frozenset({'pool_slots_total non-counter metrics should not have "_total" suffix'})


def lint_problems(text: str) -> list[str]:
    """``promtool check metrics`` on a scrape: its problems other than the contract's ``_ms`` names
    (exit 3 is "lint problems"; anything else but 0 is a scrape promtool cannot parse)."""
    done = run("check", "metrics", stdin=text)
    assert done.returncode in (0, 3), f"promtool could not parse the scrape: {done.stderr or done.stdout}"
    problems = []
    for line in (done.stderr + done.stdout).splitlines():
        name, _, problem = line.partition(" ")
        if problem == ABBREVIATED and re.sub(r"_(created|bucket|count|sum|total)$", "", name) in CONTRACT_MS_NAMES:
            continue
        if line in CONTRACT_LINT:
            continue
        if line.strip():
            problems.append(line)
    return problems
