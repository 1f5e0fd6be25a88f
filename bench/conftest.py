"""Benchmark helpers: a summary of compiled-versus-twin speedups at the end of the run.

pytest-benchmark's table lists each implementation on its own row; the ratio is the
figure that matters for ``llama_orch.ext``, so benchmarks report a time (the median)
per implementation through the ``impl_timing`` fixture and the ratios are printed once
per group at the end of the run.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

_times: dict[str, dict[str, float]] = {}
_notes: dict[str, dict[str, str]] = {}


@pytest.fixture
def impl_timing() -> Callable[..., None]:
    """``impl_timing(group, impl, seconds=None, note=None)`` records a result for the summary."""

    def record(group: str, impl: str, seconds: float | None = None, note: str | None = None) -> None:
        if seconds is not None:
            _times.setdefault(group, {})[impl] = seconds
        if note is not None:
            _notes.setdefault(group, {})[impl] = note

    return record


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.2f} {unit}"
    return f"{seconds / 1e-9:.0f} ns"


def pytest_terminal_summary(terminalreporter) -> None:
    if not _times and not _notes:
        return
    tr = terminalreporter
    tr.section("llama_orch.ext: compiled (c) vs pure-Python twin (py)")
    if _times:
        width = max(map(len, _times)) + 2
        tr.write_line(f"{'group':<{width}}{'py median':>12}{'c median':>12}{'c speedup':>12}")
        for group, times in _times.items():
            py, c = times.get("py"), times.get("c")
            ratio = f"{py / c:.2f}x" if py and c else "-"
            tr.write_line(f"{group:<{width}}{_fmt(py):>12}{_fmt(c):>12}{ratio:>12}")
    for group, notes in _notes.items():
        for impl, note in notes.items():
            tr.write_line(f"{group} [{impl}]: {note}")
