"""Request traces for the replay simulator.

Owns turning a public LLM-inference trace file into a list of ``TraceRecord``
(arrival time relative to the first request, prompt tokens, generated tokens)
and rescaling such a list to the engines being simulated (``scale_trace``).

Two layouts are understood, chosen from the first non-blank line:

* CSV with a header naming ``TIMESTAMP,ContextTokens,GeneratedTokens`` (the
  Azure LLM inference trace 2023 layout, see ``bench/traces/README.md``);
  timestamps look like ``2023-11-16 18:17:03.9799600``;
* JSON lines ``{"timestamp": <ms>, "input_length": n, "output_length": n}``, optionally with
  ``"hash_ids": [...]``: the prompt's prefix blocks (the Mooncake traces' layout), where two
  requests whose lists start with the same ids share that many blocks of prefix.

Anything malformed raises ``TraceError`` naming the file, the line and the
problem; only blank lines are skipped.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import operator
import os
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "CSV_COLUMNS",
    "JSONL_KEYS",
    "TraceError",
    "TraceRecord",
    "read_trace",
    "scale_trace",
]

CSV_COLUMNS: tuple[str, str, str] = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
JSONL_KEYS: tuple[str, str, str] = ("timestamp", "input_length", "output_length")

_EXPECTED_FORMATS = (
    "expected a CSV header 'TIMESTAMP,ContextTokens,GeneratedTokens' or JSON lines "
    "with keys 'timestamp', 'input_length', 'output_length'"
)

# Any number of fractional digits is accepted and cut to microseconds: the Azure
# files carry seven, which older datetime.fromisoformat versions reject, and
# sub-microsecond detail is far below anything the simulator resolves.
_TIMESTAMP_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
)
_INT_RE = re.compile(r"[+-]?\d+")


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One request of a trace.

    ``arrival_ms`` is relative to the earliest request of the trace (so the
    first record has 0.0).
    """

    arrival_ms: float
    context_tokens: int
    generated_tokens: int
    hash_ids: tuple[int, ...] = ()  # the prompt's prefix blocks, when the trace says


class TraceError(ValueError):
    """A trace file could not be read; ``str()`` names file, line and problem."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"trace {self.path}" if line is None else f"trace {self.path}, line {line}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        # The default pickling would call __init__ with the single message.
        return (type(self), (self.path, self.line, self.problem))


def read_trace(path: str | os.PathLike[str]) -> list[TraceRecord]:
    """Read a CSV or JSONL trace; records come back sorted by arrival (stable)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise TraceError(p, None, "file not found") from None
    except IsADirectoryError:
        raise TraceError(p, None, "is a directory, not a trace file") from None
    except OSError as exc:
        raise TraceError(p, None, f"cannot read file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise TraceError(p, line, "not UTF-8 text") from None

    # Split on "\n" only: str.splitlines also breaks on form feeds and other
    # separators, which would make the reported line numbers disagree with editors.
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if first is None:
        raise TraceError(p, None, "empty trace: the file has no records")

    head = lines[first].strip()
    if head.startswith("{"):
        stamped = _parse_jsonl(p, lines, first)
    else:
        stamped = _parse_csv(p, lines, first)
    if not stamped:
        raise TraceError(p, None, f"empty trace: header on line {first + 1} but no records")

    base = min(s[0] for s in stamped)
    # list.sort is stable, so requests with equal timestamps keep file order.
    stamped.sort(key=operator.itemgetter(0))
    return [
        TraceRecord(arrival_ms=_to_ms(ts - base, scale), context_tokens=ctx, generated_tokens=gen, hash_ids=ids)
        for ts, ctx, gen, scale, ids in stamped
    ]


def scale_trace(
    records: Sequence[TraceRecord],
    *,
    rate: float = 1.0,
    length: float = 1.0,
    limit: int | None = None,
) -> list[TraceRecord]:
    """Rescale a trace to the simulated engines.

    ``rate`` multiplies the arrival rate (arrival times are divided by it),
    ``length`` multiplies token counts (rounded half up; context at least 0,
    generated at least 1 so every request still produces a token), and
    ``limit`` keeps only the first N records. Invalid parameters raise
    ``ValueError`` naming the parameter.
    """
    rate_f = _positive_finite("rate", rate)
    length_f = _positive_finite("length", length)
    count = len(records)
    if limit is not None:
        if isinstance(limit, bool):
            raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
        try:
            n = operator.index(limit)
        except TypeError:
            raise ValueError(
                f"limit must be a non-negative integer or None, got {limit!r}"
            ) from None
        if n < 0:
            raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
        count = min(count, n)

    out: list[TraceRecord] = []
    for rec in records[:count]:
        if length_f == 1.0:
            ctx, gen = rec.context_tokens, rec.generated_tokens
        else:
            ctx = _round_half_up(rec.context_tokens * length_f)
            gen = _round_half_up(rec.generated_tokens * length_f)
        out.append(
            TraceRecord(
                arrival_ms=rec.arrival_ms / rate_f,
                context_tokens=max(0, ctx),
                generated_tokens=max(1, gen),
                hash_ids=rec.hash_ids,  # blocks are a share of the prompt, whatever its scale
            )
        )
    return out


# --- parsing helpers -------------------------------------------------------------


def _to_ms(delta: int | float, scale: int) -> float:
    # CSV deltas are exact integer microseconds; true division of ints rounds
    # correctly, so the result does not depend on how the sum was reached.
    return delta / scale if scale != 1 else float(delta)


def _parse_csv(p: Path, lines: list[str], first: int) -> list[tuple[int, int, int, int, tuple]]:
    header = _split_csv(p, first + 1, lines[first])
    names = [h.strip().lower() for h in header]
    wanted = [c.lower() for c in CSV_COLUMNS]
    if not any(w in names for w in wanted):
        shown = lines[first].strip()
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise TraceError(p, first + 1, f"unknown trace format ({_EXPECTED_FORMATS}); found {shown!r}")
    missing = [c for c, w in zip(CSV_COLUMNS, wanted) if w not in names]
    if missing:
        raise TraceError(
            p,
            first + 1,
            f"missing column {', '.join(repr(m) for m in missing)} in CSV header "
            f"(found {', '.join(repr(h.strip()) for h in header)})",
        )
    i_ts, i_ctx, i_gen = (names.index(w) for w in wanted)
    width = len(header)

    day_cache: dict[str, int] = {}
    out: list[tuple[int, int, int, int, tuple]] = []
    for idx in range(first + 1, len(lines)):
        line = lines[idx]
        if not line.strip():
            continue
        lineno = idx + 1
        fields = _split_csv(p, lineno, line)
        if len(fields) != width:
            raise TraceError(p, lineno, f"expected {width} comma-separated fields, found {len(fields)}")
        us = _parse_timestamp_us(p, lineno, fields[i_ts], day_cache)
        ctx = _parse_count(p, lineno, CSV_COLUMNS[1], fields[i_ctx])
        gen = _parse_count(p, lineno, CSV_COLUMNS[2], fields[i_gen])
        out.append((us, ctx, gen, 1000, ()))
    return out


def _split_csv(p: Path, lineno: int, line: str) -> list[str]:
    if '"' not in line:
        return line.split(",")
    try:
        return next(csv.reader([line], strict=True))
    except csv.Error as exc:
        raise TraceError(p, lineno, f"malformed CSV: {exc}") from None


def _parse_timestamp_us(p: Path, lineno: int, text: str, day_cache: dict[str, int]) -> int:
    m = _TIMESTAMP_RE.fullmatch(text.strip())
    if m is None:
        raise TraceError(
            p, lineno, f"TIMESTAMP is not a date-time like '2023-11-16 18:17:03.9799600': {text!r}"
        )
    day_text, hh, mm, ss, frac = m.groups()
    day = day_cache.get(day_text)
    if day is None:
        try:
            day = date.fromisoformat(day_text).toordinal()
        except ValueError:
            raise TraceError(p, lineno, f"TIMESTAMP has an invalid date: {text!r}") from None
        day_cache[day_text] = day
    h, mi, s = int(hh), int(mm), int(ss)
    if h > 23 or mi > 59 or s > 59:
        raise TraceError(p, lineno, f"TIMESTAMP has an invalid time of day: {text!r}")
    micros = int(frac[:6].ljust(6, "0")) if frac else 0
    return ((day * 86_400 + h * 3_600 + mi * 60 + s) * 1_000_000) + micros


def _parse_count(p: Path, lineno: int, name: str, text: str) -> int:
    t = text.strip()
    if _INT_RE.fullmatch(t):
        value = int(t)
    else:
        try:
            f = float(t)
        except ValueError:
            raise TraceError(p, lineno, f"{name} is not a number: {text!r}") from None
        if not f.is_integer():
            raise TraceError(p, lineno, f"{name} is not a whole number: {text!r}")
        value = int(f)
    if value < 0:
        raise TraceError(p, lineno, f"{name} is negative: {value}")
    return value


def _parse_jsonl(p: Path, lines: list[str], first: int) -> list[tuple[Any, int, int, int, tuple]]:
    out: list[tuple[Any, int, int, int, tuple]] = []
    for idx in range(first, len(lines)):
        line = lines[idx]
        if not line.strip():
            continue
        lineno = idx + 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(p, lineno, f"invalid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(obj, dict):
            raise TraceError(p, lineno, f"expected a JSON object, found {type(obj).__name__}")
        missing = [k for k in JSONL_KEYS if k not in obj]
        if missing:
            raise TraceError(p, lineno, f"missing key {', '.join(repr(k) for k in missing)}")
        ts = obj["timestamp"]
        if isinstance(ts, bool) or not isinstance(ts, (int, float)):
            raise TraceError(p, lineno, f"'timestamp' is not a number: {ts!r}")
        if isinstance(ts, float) and not math.isfinite(ts):
            raise TraceError(p, lineno, f"'timestamp' is not finite: {ts!r}")
        ctx = _json_count(p, lineno, "input_length", obj["input_length"])
        gen = _json_count(p, lineno, "output_length", obj["output_length"])
        ids = obj.get("hash_ids", ())
        if not isinstance(ids, (list, tuple)) or not all(type(i) is int for i in ids):
            raise TraceError(p, lineno, f"'hash_ids' must be a list of integers, got {str(ids)[:60]}")
        out.append((ts, ctx, gen, 1, tuple(ids)))
    return out


def _json_count(p: Path, lineno: int, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TraceError(p, lineno, f"{key!r} is not a number: {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise TraceError(p, lineno, f"{key!r} is not a whole number: {value!r}")
        value = int(value)
    if value < 0:
        raise TraceError(p, lineno, f"{key!r} is negative: {value}")
    return value


def _positive_finite(name: str, value: Any) -> float:
    # bool is an int and "2" converts with float(); both are caller mistakes here.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    f = float(value)
    if not (math.isfinite(f) and f > 0.0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return f


def _round_half_up(x: float) -> int:
    # round() rounds halves to even (round(2.5) == 2), which surprises people
    # checking scaled token counts by hand.
    return math.floor(x + 0.5)
