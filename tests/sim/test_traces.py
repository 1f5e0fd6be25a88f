"""Tests for llama_orch.sim.traces: trace parsing, error reporting and rescaling."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama_orch.sim.traces import TraceError, TraceRecord, read_trace, scale_trace

TRACES = Path(__file__).resolve().parents[2] / "bench" / "traces"
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def error_of(path: Path) -> TraceError:
    with pytest.raises(TraceError) as info:
        read_trace(path)
    return info.value


# --- shipped traces -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rows", "first", "second", "last"),
    [
        # The data files have no trailing newline, so `wc -l` shows header + rows - 1.
        ("azure2023_code.csv", 8819, (0.0, 4808, 10), (52.0, 3180, 8), (3435948.056, 549, 173)),
        ("azure2023_conv.csv", 19366, (0.0, 374, 44), (4314.579, 396, 109), (3501721.937, 197, 183)),
    ],
)
def test_shipped_traces(name, rows, first, second, last):
    recs = read_trace(TRACES / name)
    assert len(recs) == rows
    assert all(isinstance(r, TraceRecord) for r in recs)
    for rec, (arrival, ctx, gen) in ((recs[0], first), (recs[1], second), (recs[-1], last)):
        assert rec.arrival_ms == pytest.approx(arrival, abs=1e-9)
        assert (rec.context_tokens, rec.generated_tokens) == (ctx, gen)
    assert recs[0].arrival_ms == 0.0
    arrivals = [r.arrival_ms for r in recs]
    assert arrivals == sorted(arrivals)
    assert all(r.context_tokens >= 0 and r.generated_tokens >= 1 for r in recs)


def test_shipped_traces_are_deterministic():
    path = TRACES / "azure2023_conv.csv"
    assert read_trace(path) == read_trace(str(path))


def test_shipped_readme_keeps_attribution():
    text = (TRACES / "README.md").read_text(encoding="utf-8")
    for needle in (
        "Microsoft Azure Public Dataset",
        "Azure LLM inference trace 2023",
        "Splitwise",
        "ISCA 2024",
        "Creative Commons Attribution 4.0 International",
        "CC-BY 4.0",
        "8,819",
        "19,366",
    ):
        assert needle in text


# --- CSV ------------------------------------------------------------------------------


def test_csv_timestamp_fractions(tmp_path):
    p = write(
        tmp_path,
        "t.csv",
        HEADER
        + "2023-11-16 18:17:03.9799600,10,1\n"  # seven digits: the Azure layout
        + "2023-11-16 18:17:04.0319609,10,1\n"  # 7th digit is cut, not rounded
        + "2023-11-16 18:17:05,10,1\n"  # no fraction
        + "2023-11-16 18:17:05.5,10,1\n"  # one digit
        + "2023-11-16T18:17:06.123456,10,1\n"  # ISO 'T', six digits
        + "2023-11-16 18:17:07.123456789,10,1\n",  # nine digits
    )
    got = [r.arrival_ms for r in read_trace(p)]
    assert got == [0.0, 52.0, 1020.04, 1520.04, 2143.496, 3143.496]


def test_csv_day_rollover_and_exact_arithmetic(tmp_path):
    p = write(
        tmp_path,
        "t.csv",
        HEADER + "2023-12-31 23:59:59.9999999,1,1\n2024-01-01 00:00:00.0000010,1,1\n2024-01-01 00:00:01.0000010,1,1\n",
    )
    got = [r.arrival_ms for r in read_trace(p)]
    # 23:59:59.999999 (cut) -> 00:00:00.000001 is 2 us.
    assert got == [0.0, 0.002, 1000.002]


def test_csv_sorted_stably_and_relative_to_earliest(tmp_path):
    p = write(
        tmp_path,
        "t.csv",
        HEADER
        + "2023-11-16 10:00:02.0,3,3\n"
        + "2023-11-16 10:00:01.0,2,2\n"
        + "2023-11-16 10:00:02.0,1,1\n"
        + "2023-11-16 10:00:00.5,4,4\n",
    )
    got = [(r.arrival_ms, r.context_tokens) for r in read_trace(p)]
    # equal timestamps keep file order (3 before 1), whatever their token counts
    assert got == [(0.0, 4), (500.0, 2), (1500.0, 3), (1500.0, 1)]


def test_csv_header_order_extra_columns_crlf_bom_blank_lines(tmp_path):
    text = (
        "\ufeffGeneratedTokens,Other,TIMESTAMP,ContextTokens\r\n"
        "\r\n"
        '7,"x, y",2023-11-16 18:00:00.0000000,100\r\n'
        "   \r\n"
        "8,z,2023-11-16 18:00:00.2500000,200\r\n"
    )
    p = write(tmp_path, "t.csv", text)
    assert read_trace(p) == [TraceRecord(0.0, 100, 7), TraceRecord(250.0, 200, 8)]


def test_csv_accepts_integral_float_counts(tmp_path):
    p = write(tmp_path, "t.csv", HEADER + "2023-11-16 18:00:00,12.0,+3\n")
    assert read_trace(p) == [TraceRecord(0.0, 12, 3)]


# --- JSONL ----------------------------------------------------------------------------


def test_jsonl_extra_keys_blank_lines_and_rebase(tmp_path):
    p = write(
        tmp_path,
        "t.jsonl",
        "\n"
        '{"timestamp": 1700000001000, "input_length": 5, "output_length": 6, "model": "x", "id": 1}\n'
        "\n"
        '{"timestamp": 1700000000500, "input_length": 7, "output_length": 8}\n'
        '{"timestamp": 1700000001000.25, "input_length": 9.0, "output_length": 1, "extra": {"a": [1]}}\n'
        "   \n",
    )
    assert read_trace(p) == [
        TraceRecord(0.0, 7, 8),
        TraceRecord(500.0, 5, 6),
        TraceRecord(500.25, 9, 1),
    ]


# --- errors ---------------------------------------------------------------------------


def test_trace_error_is_value_error_and_pickles(tmp_path):
    err = error_of(tmp_path / "nope.csv")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.line == err.line and again.path == err.path


@pytest.mark.parametrize(
    ("name", "text", "line", "needle"),
    [
        ("missing_col.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:00:00,1\n", 1, "missing column 'GeneratedTokens'"),
        ("nan_ctx.csv", HEADER + "2023-11-16 18:00:00,1,1\n\n2023-11-16 18:00:01,abc,1\n", 4, "ContextTokens is not a number: 'abc'"),
        ("frac.csv", HEADER + "2023-11-16 18:00:00,1,1.5\n", 2, "GeneratedTokens is not a whole number"),
        ("neg.csv", HEADER + "2023-11-16 18:00:00,1,1\n2023-11-16 18:00:01,-4,1\n", 3, "ContextTokens is negative: -4"),
        ("neg_gen.csv", HEADER + "2023-11-16 18:00:00,1,-1\n", 2, "GeneratedTokens is negative"),
        ("bad_ts.csv", HEADER + "16/11/2023 18:00:00,1,1\n", 2, "TIMESTAMP is not a date-time"),
        ("bad_date.csv", HEADER + "2023-02-30 18:00:00,1,1\n", 2, "invalid date"),
        ("bad_time.csv", HEADER + "2023-02-03 24:00:00,1,1\n", 2, "invalid time of day"),
        ("fields.csv", HEADER + "2023-11-16 18:00:00,1\n", 2, "expected 3 comma-separated fields, found 2"),
        ("many.csv", HEADER + "2023-11-16 18:00:00,1,2,3\n", 2, "expected 3 comma-separated fields, found 4"),
        ("noheader.csv", "2023-11-16 18:17:03.9799600,4808,10\n", 1, "unknown trace format"),
        ("json_bad.jsonl", '{"timestamp": 1, "input_length": 1, "output_length": 1}\n{"timestamp": 2,\n', 2, "invalid JSON"),
        ("json_key.jsonl", '\n{"timestamp": 1, "input_length": 1}\n', 2, "missing key 'output_length'"),
        ("json_type.jsonl", '{"timestamp": "soon", "input_length": 1, "output_length": 1}\n', 1, "'timestamp' is not a number"),
        ("json_bool.jsonl", '{"timestamp": 1, "input_length": true, "output_length": 1}\n', 1, "'input_length' is not a number"),
        ("json_neg.jsonl", '{"timestamp": 1, "input_length": 1, "output_length": -2}\n', 1, "'output_length' is negative"),
        ("json_list.jsonl", '{"timestamp": 1, "input_length": 1, "output_length": 1}\n[1, 2]\n', 2, "expected a JSON object"),
        ("json_inf.jsonl", '{"timestamp": Infinity, "input_length": 1, "output_length": 1}\n', 1, "not finite"),
        ("latin1.csv", HEADER.encode() + b"2023-11-16 18:00:00,1,1\n\xe9,1,1\n", 3, "not UTF-8"),
    ],
)
def test_errors_name_file_and_line(tmp_path, name, text, line, needle):
    p = write(tmp_path, name, text)
    err = error_of(p)
    msg = str(err)
    assert str(p) in msg
    assert f"line {line}:" in msg
    assert needle in msg
    assert err.line == line
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("empty.csv", "", "empty trace"),
        ("blank.csv", "\n  \n\n", "empty trace"),
        ("header_only.csv", HEADER + "\n", "empty trace"),
    ],
)
def test_empty_traces(tmp_path, name, text, needle):
    p = write(tmp_path, name, text)
    msg = str(error_of(p))
    assert str(p) in msg and needle in msg


def test_file_not_found_and_directory(tmp_path):
    missing = tmp_path / "missing.csv"
    msg = str(error_of(missing))
    assert str(missing) in msg and "file not found" in msg
    assert "is a directory" in str(error_of(tmp_path))


# --- scale_trace ----------------------------------------------------------------------


RECS = [TraceRecord(0.0, 10, 3), TraceRecord(100.0, 5, 1), TraceRecord(250.0, 0, 2), TraceRecord(1000.0, 3, 5)]


def test_scale_identity_returns_equal_copy():
    out = scale_trace(RECS)
    assert out == RECS and out is not RECS


def test_scale_rate_divides_arrivals():
    assert [r.arrival_ms for r in scale_trace(RECS, rate=2.0)] == [0.0, 50.0, 125.0, 500.0]
    assert [r.arrival_ms for r in scale_trace(RECS, rate=0.5)] == [0.0, 200.0, 500.0, 2000.0]


def test_scale_length_rounds_half_up_with_floors():
    out = scale_trace(RECS, length=0.5)
    # 10*.5=5, 3*.5=1.5->2; 5*.5=2.5->3, 1*.5=0.5->1; 0->0, 2*.5=1; 3*.5=1.5->2, 5*.5=2.5->3
    assert [(r.context_tokens, r.generated_tokens) for r in out] == [(5, 2), (3, 1), (0, 1), (2, 3)]
    tiny = scale_trace(RECS, length=0.01)
    assert [(r.context_tokens, r.generated_tokens) for r in tiny] == [(0, 1), (0, 1), (0, 1), (0, 1)]
    assert [r.context_tokens for r in scale_trace(RECS, length=3)] == [30, 15, 0, 9]


def test_scale_limit():
    assert scale_trace(RECS, limit=2, rate=4.0) == [TraceRecord(0.0, 10, 3), TraceRecord(25.0, 5, 1)]
    assert scale_trace(RECS, limit=0) == []
    assert scale_trace(RECS, limit=100) == RECS


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"rate": 0}, "rate"),
        ({"rate": -1.0}, "rate"),
        ({"rate": math.nan}, "rate"),
        ({"rate": math.inf}, "rate"),
        ({"rate": "2"}, "rate"),
        ({"rate": True}, "rate"),
        ({"length": 0.0}, "length"),
        ({"length": -0.5}, "length"),
        ({"length": None}, "length"),
        ({"limit": -1}, "limit"),
        ({"limit": 1.5}, "limit"),
        ({"limit": True}, "limit"),
        ({"limit": "3"}, "limit"),
    ],
)
def test_scale_validation_names_parameter(kwargs, param):
    with pytest.raises(ValueError, match=rf"^{param} must be"):
        scale_trace(RECS, **kwargs)


@given(
    arrivals=st.lists(st.floats(0, 1e7, allow_nan=False), min_size=1, max_size=50),
    rate=st.floats(1e-3, 1e3),
    length=st.floats(1e-3, 1e2),
)
def test_scale_properties(arrivals, rate, length):
    recs = [TraceRecord(a, i, i + 1) for i, a in enumerate(sorted(arrivals))]
    out = scale_trace(recs, rate=rate, length=length)
    assert len(out) == len(recs)
    got = [r.arrival_ms for r in out]
    assert got == sorted(got)
    assert all(r.generated_tokens >= 1 and r.context_tokens >= 0 for r in out)
    for src, dst in zip(recs, out):
        assert dst.arrival_ms == src.arrival_ms / rate
        assert abs(dst.context_tokens - src.context_tokens * length) <= 0.5 + 1e-9
