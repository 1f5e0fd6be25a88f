"""SSE framing and parsing: behaviour of both implementations, a differential test
against a spec-literal reference parser, and chunk-split invariance."""

from __future__ import annotations

import re

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BOM = b"\xef\xbb\xbf"


# -- framing --------------------------------------------------------------------------


def test_frame_event(sse_impl):
    assert sse_impl.frame_event("token", b'{"t":"a"}') == b'event: token\ndata: {"t":"a"}\n\n'
    assert sse_impl.frame_event("end", b"") == b"event: end\ndata: \n\n"
    assert sse_impl.frame_event("ünï", b"x") == "event: ünï\ndata: x\n\n".encode()


@pytest.mark.parametrize(
    ("data", "framed"),
    [
        (b"a\nb", b"event: e\ndata: a\ndata: b\n\n"),
        (b"a\r\nb", b"event: e\ndata: a\ndata: b\n\n"),
        (b"a\rb", b"event: e\ndata: a\ndata: b\n\n"),
        (b"a\n", b"event: e\ndata: a\ndata: \n\n"),
        (b"\n", b"event: e\ndata: \ndata: \n\n"),
        (b"a\n\r\nb", b"event: e\ndata: a\ndata: \ndata: b\n\n"),
    ],
)
def test_frame_event_line_breaks(sse_impl, data, framed):
    assert sse_impl.frame_event("e", data) == framed
    assert sse_impl.frame_events([("e", data)]) == framed


def test_frame_event_errors(sse_impl):
    with pytest.raises(ValueError, match="line break"):
        sse_impl.frame_event("a\nb", b"x")
    with pytest.raises(ValueError, match="line break"):
        sse_impl.frame_event("a\r", b"x")
    with pytest.raises(TypeError):
        sse_impl.frame_event(b"token", b"x")
    with pytest.raises(TypeError):
        sse_impl.frame_event("token", "text")
    with pytest.raises(TypeError):
        sse_impl.frame_event("token", bytearray(b"x"))
    with pytest.raises(TypeError):
        sse_impl.frame_event("token", None)


def test_frame_events(sse_impl):
    events = [("token", orjson.dumps({"t": f"w{i}", "i": i})) for i in range(64)]
    expected = b"".join(sse_impl.frame_event(e, d) for e, d in events)
    assert sse_impl.frame_events(events) == expected
    assert sse_impl.frame_events(iter(events)) == expected
    assert sse_impl.frame_events(tuple(events)) == expected
    assert sse_impl.frame_events([]) == b""
    assert sse_impl.frame_events([("a", b"1"), ("b", b"x\ny"), ("c", b"")]) == (
        b"event: a\ndata: 1\n\nevent: b\ndata: x\ndata: y\n\nevent: c\ndata: \n\n"
    )


def test_frame_events_errors(sse_impl):
    with pytest.raises(ValueError):
        sse_impl.frame_events([("a", b"1"), ("b\n", b"2")])
    with pytest.raises(TypeError):
        sse_impl.frame_events([("a", "str")])
    with pytest.raises(ValueError):
        sse_impl.frame_events([("a", b"1", b"extra")])
    with pytest.raises(TypeError):
        sse_impl.frame_events(None)


def test_many_event_names_do_not_leak(sse_impl):
    for i in range(2000):
        assert sse_impl.frame_event(f"e{i}", b"x") == f"event: e{i}\ndata: x\n\n".encode()


# -- parser ---------------------------------------------------------------------------


def feed_all(parser, chunks):
    out = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    return out


def feed_bytewise(impl, stream, **kw):
    return feed_all(impl.SSEParser(**kw), [stream[i : i + 1] for i in range(len(stream))])


def test_parser_basic(sse_impl):
    p = sse_impl.SSEParser()
    assert p.feed(b"data: hello\n\n") == [("message", b"hello")]
    assert p.feed(b"event: token\ndata: {}\n\n") == [("token", b"{}")]
    assert p.pending == 0


def test_parser_several_events_one_chunk(sse_impl):
    p = sse_impl.SSEParser()
    assert p.feed(b"data: 1\n\ndata: 2\n\nevent: x\ndata: 3\n\ndata: 4") == [
        ("message", b"1"),
        ("message", b"2"),
        ("x", b"3"),
    ]
    assert p.pending == len(b"data: 4")
    assert p.feed(b"\n\n") == [("message", b"4")]


def test_parser_multiline_data(sse_impl):
    p = sse_impl.SSEParser()
    assert p.feed(b"data: a\ndata: b\ndata:\ndata:  c\n\n") == [("message", b"a\nb\n\n c")]


def test_parser_comments_and_ignored_fields(sse_impl):
    p = sse_impl.SSEParser()
    stream = b": keepalive\n\n:another\nid: 7\nretry: 100\nfoo: bar\ndata: x\n: mid\n\n"
    assert p.feed(stream) == [("message", b"x")]


def test_parser_no_data_no_dispatch(sse_impl):
    p = sse_impl.SSEParser()
    assert p.feed(b"event: ping\n\n") == []
    # the event type does not leak into the next event
    assert p.feed(b"data: x\n\n") == [("message", b"x")]
    assert p.feed(b"id: 1\n\n\n\n") == []


def test_parser_empty_data_dispatches(sse_impl):
    p = sse_impl.SSEParser()
    assert p.feed(b"data\n\n") == [("message", b"")]
    assert p.feed(b"data:\n\n") == [("message", b"")]
    assert p.feed(b"data:\ndata\n\n") == [("message", b"\n")]


def test_parser_field_syntax(sse_impl):
    p = sse_impl.SSEParser()
    # only one leading space is removed; colons in the value are kept
    assert p.feed(b"data:  two\n\n") == [("message", b" two")]
    assert p.feed(b"data:no-space\n\n") == [("message", b"no-space")]
    assert p.feed(b"data: a: b: c\n\n") == [("message", b"a: b: c")]
    assert p.feed(b"data :x\n\n") == []  # field name is "data "
    assert p.feed(b"DATA: x\n\n") == []  # names are case-sensitive
    assert p.feed(b"event\ndata: x\n\n") == [("message", b"x")]  # empty type -> message
    assert p.feed(b"event: a\nevent: b\ndata: x\n\n") == [("b", b"x")]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_parser_line_endings(sse_impl, eol):
    stream = b"event: e" + eol + b"data: 1" + eol + b"data: 2" + eol + eol + b"data: 3" + eol + eol
    expected = [("e", b"1\n2"), ("message", b"3")]
    assert sse_impl.SSEParser().feed(stream) == expected
    assert feed_bytewise(sse_impl, stream) == expected


def test_parser_crlf_split_across_chunks(sse_impl):
    p = sse_impl.SSEParser()
    assert p.feed(b"data: a\r") == []
    # the LF completes the CRLF begun in the previous chunk: it is not a blank line
    assert p.feed(b"\ndata: b\r") == []
    assert p.feed(b"\n\r") == [("message", b"a\nb")]
    assert p.feed(b"\n") == []
    assert p.feed(b"data: c\r\r") == [("message", b"c")]
    assert p.pending == 0


def test_parser_cr_then_lone_lf_is_a_blank_line_only_when_not_adjacent(sse_impl):
    p = sse_impl.SSEParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"") == []  # an empty chunk does not break the pair
    assert p.feed(b"\n") == []
    assert p.feed(b"\n") == [("message", b"a")]


def test_parser_utf8_split_across_chunks(sse_impl):
    payload = "data: héllo → 世界 🎉\n\n".encode()
    expected = [("message", "héllo → 世界 🎉".encode())]
    for cut in range(1, len(payload)):
        p = sse_impl.SSEParser()
        assert p.feed(payload[:cut]) + p.feed(payload[cut:]) == expected, cut
    assert feed_bytewise(sse_impl, payload) == expected


def test_parser_event_type_decoding(sse_impl):
    p = sse_impl.SSEParser()
    assert p.feed("event: ünï\ndata: x\n\n".encode()) == [("ünï", b"x")]
    assert p.feed(b"event: \xff\ndata: x\n\n") == [("\ufffd", b"x")]


def test_parser_bom(sse_impl):
    assert sse_impl.SSEParser().feed(BOM + b"data: x\n\n") == [("message", b"x")]
    assert feed_bytewise(sse_impl, BOM + b"data: x\n\n") == [("message", b"x")]
    # only at the very start
    assert sse_impl.SSEParser().feed(b"data: x\n\n" + BOM + b"data: y\n\n") == [("message", b"x")]
    p = sse_impl.SSEParser()
    assert p.feed(BOM[:2]) == []
    assert p.pending == 2
    assert p.feed(b"data: x\n\n") == []  # not a BOM after all: "\xef\xbbdata" is a field name
    assert p.pending == 0


def test_parser_pending(sse_impl):
    p = sse_impl.SSEParser()
    assert p.pending == 0
    p.feed(b"data: ab")
    assert p.pending == 8
    p.feed(b"c\r\n")
    assert p.pending == 9  # line ends are not counted
    p.feed(b": comment\r\n")
    assert p.pending == 18
    assert p.feed(b"\r\n") == [("message", b"abc")]
    assert p.pending == 0


def test_parser_max_event_bytes(sse_impl):
    p = sse_impl.SSEParser(max_event_bytes=16)
    assert p.feed(b"data: 0123456789\n\n") == [("message", b"0123456789")]  # 16 bytes: ok
    with pytest.raises(ValueError, match="SSE event larger than 16 bytes"):
        p.feed(b"data: 0123456789A\n\n")
    # the parser was reset by the error and keeps working
    assert p.pending == 0
    assert p.feed(b"data: ok\n\n") == [("message", b"ok")]


def test_parser_max_event_bytes_counts_lines_of_one_event(sse_impl):
    p = sse_impl.SSEParser(max_event_bytes=20)
    p.feed(b"data: 0123\ndata: 4567\n")  # 20 bytes of lines
    with pytest.raises(ValueError):
        p.feed(b"d")


def test_parser_max_event_bytes_on_a_partial_line(sse_impl):
    p = sse_impl.SSEParser(max_event_bytes=100)
    for _ in range(9):
        p.feed(b"x" * 10)
    with pytest.raises(ValueError):
        p.feed(b"x" * 11)
    assert p.pending == 0


def test_parser_long_line_in_small_chunks(sse_impl):
    p = sse_impl.SSEParser()
    body = b"y" * 200_000
    out = feed_all(p, [b"data: "] + [body[i : i + 100] for i in range(0, len(body), 100)] + [b"\n\n"])
    assert out == [("message", body)]


def test_parser_errors(sse_impl):
    with pytest.raises(ValueError):
        sse_impl.SSEParser(max_event_bytes=0)
    with pytest.raises(TypeError):
        sse_impl.SSEParser(max_event_bytes=1.5)
    p = sse_impl.SSEParser()
    with pytest.raises(TypeError):
        p.feed("data: x\n\n")
    with pytest.raises(TypeError):
        p.feed(bytearray(b"data: x\n\n"))
    assert p.feed(b"") == []


def test_frame_parse_round_trip(sse_impl):
    events = [("token", b"a"), ("x", b"multi\nline\r\nand\rcr"), ("message", b""), ("e", b"\n")]
    parsed = sse_impl.SSEParser().feed(sse_impl.frame_events(events))
    assert parsed == [(e, d.replace(b"\r\n", b"\n").replace(b"\r", b"\n")) for e, d in events]


# -- differential ---------------------------------------------------------------------


def reference_parse(stream: bytes, max_event_bytes: int = 1 << 20):
    """A literal reading of the WHATWG algorithm over a whole stream.

    Returns ``(events, pending, too_big)``; ``too_big`` is True when some event block
    exceeded *max_event_bytes* (then the events are those before it).
    """
    if len(stream) < 3 and BOM.startswith(stream):
        return [], len(stream), False
    if stream.startswith(BOM):
        stream = stream[3:]
    *lines, partial = re.split(rb"\r\n|\r|\n", stream)
    events, data, event_type, block = [], b"", b"", 0
    for line in lines:
        if line == b"":
            block = 0
            if data == b"":
                event_type = b""
                continue
            events.append((event_type.decode("utf-8", "replace") or "message", data[:-1]))
            data, event_type = b"", b""
            continue
        block += len(line)
        if block > max_event_bytes:
            return events, None, True
        if line.startswith(b":"):
            continue
        if b":" in line:
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
        else:
            field, value = line, b""
        if field == b"data":
            data += value + b"\n"
        elif field == b"event":
            event_type = value
    if block + len(partial) > max_event_bytes:
        return events, None, True
    return events, block + len(partial), False


SSE_VALUES = st.lists(
    st.sampled_from([b"x", b"y", b" ", b":", b"\xc3\xa9", b"\xe4\xb8\x96", b"\xf0\x9f\x8e\x89", b"[DONE]", b"{}"]),
    max_size=6,
).map(b"".join)
SSE_LINES = st.one_of(
    st.tuples(st.sampled_from([b"data", b"event", b"id", b"retry", b"foo", b"", b"data "]), SSE_VALUES).map(
        lambda fv: fv[0] + b":" + fv[1]
    ),
    st.tuples(st.sampled_from([b"data", b"event", b"data: ", b"event: "]), SSE_VALUES).map(b"".join),
    SSE_VALUES.map(lambda v: b":" + v),
    st.just(b""),
    st.just(b""),
)
EOL = st.sampled_from([b"\n", b"\r\n", b"\r"])
SSE_STREAMS = st.tuples(
    st.booleans(),
    st.lists(st.tuples(SSE_LINES, EOL).map(b"".join), max_size=25),
    SSE_VALUES,
).map(lambda s: (BOM if s[0] else b"") + b"".join(s[1]) + s[2])
RAW_STREAMS = st.lists(
    st.sampled_from([b"data:", b"event:", b" ", b"\r", b"\n", b"\r\n", b":", b"x", b"\xef", b"\xbb", b"\xbf", b"\xc3"]),
    max_size=60,
).map(b"".join)


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(stream=st.one_of(SSE_STREAMS, RAW_STREAMS), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_parser_matches_reference_for_any_split(sse_impl, stream, cuts):
    events, pending, _ = reference_parse(stream)
    assert sse_impl.SSEParser().feed(stream) == events
    p = sse_impl.SSEParser()
    assert feed_all(p, split(stream, cuts)) == events
    assert p.pending == pending
    assert feed_bytewise(sse_impl, stream) == events


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.one_of(SSE_STREAMS, RAW_STREAMS),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    limit=st.integers(1, 30),
)
def test_parser_size_limit_is_split_independent(sse_impl, stream, cuts, limit):
    events, _, too_big = reference_parse(stream, limit)
    p = sse_impl.SSEParser(max_event_bytes=limit)
    got = []
    raised = False
    for chunk in split(stream, cuts):
        try:
            got.extend(p.feed(chunk))
        except ValueError:
            raised = True
            break
    assert raised == too_big
    if too_big:
        # feed() loses the events of the chunk that raised, so only a prefix matches
        assert got == events[: len(got)]
    else:
        assert got == events


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.one_of(SSE_STREAMS, RAW_STREAMS),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    limit=st.sampled_from([8, 20, 1 << 20]),
)
def test_parsers_agree_chunk_by_chunk(sse_impls, stream, cuts, limit):
    parsers = {name: mod.SSEParser(max_event_bytes=limit) for name, mod in sse_impls.items()}
    for chunk in split(stream, cuts):
        results = {}
        for name, p in parsers.items():
            try:
                results[name] = (p.feed(chunk), p.pending)
            except ValueError as exc:
                results[name] = (str(exc), p.pending)
        assert results["py"] == results["c"]


EVENT_NAMES = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=8)
EVENT_DATA = st.lists(st.sampled_from([b"a", b"\n", b"\r", b"\r\n", b" ", b":", b"\xc3\xa9", b"\x00"]), max_size=8).map(
    b"".join
)


@settings(max_examples=300)
@given(events=st.lists(st.tuples(EVENT_NAMES, EVENT_DATA), max_size=20))
def test_framing_agrees_and_round_trips(sse_impls, events):
    py, c = sse_impls["py"], sse_impls["c"]
    framed = py.frame_events(events)
    assert c.frame_events(events) == framed
    assert b"".join(c.frame_event(e, d) for e, d in events) == framed
    assert b"".join(py.frame_event(e, d) for e, d in events) == framed
    normalised = [(e or "message", d.replace(b"\r\n", b"\n").replace(b"\r", b"\n")) for e, d in events]
    assert c.SSEParser().feed(framed) == normalised
