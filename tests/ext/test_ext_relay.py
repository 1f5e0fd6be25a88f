"""TokenRelay: both dialects with frames as real servers send them, errors, and
differential tests over random streams and chunk splits."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Captured from llama.cpp server /completion with "stream": true.
LLAMA_TOKEN = (
    b'data: {"index":0,"content":" the","tokens":[],"stop":false,"id_slot":-1,'
    b'"tokens_predicted":1,"tokens_evaluated":5}\n\n'
)
LLAMA_FINAL = (
    b'data: {"index":0,"content":"","tokens":[],"id_slot":0,"stop":true,"model":"tiny",'
    b'"tokens_predicted":8,"tokens_evaluated":5,"generation_settings":{},"prompt":"hi",'
    b'"has_new_line":false,"truncated":false,"stop_type":"limit","stopping_word":"",'
    b'"tokens_cached":12,"timings":{"prompt_n":5,"prompt_ms":1.2,"predicted_n":8,"predicted_ms":20.5}}\n\n'
)
LLAMA_END = {
    "kind": "end",
    "tokens_predicted": 8,
    "tokens_evaluated": 5,
    "predicted_ms": 20.5,
    "prompt_ms": 1.2,
    "stop_type": "limit",
    "cached_tokens": 0,  # tokens_evaluated - timings.prompt_n: nothing was found in the cache
}
LLAMA_ERROR = b'data: {"error":{"code":500,"message":"slot unavailable","type":"server_error"}}\n\n'


def llama_token(text: str) -> bytes:
    return b"data: " + orjson.dumps({"index": 0, "content": text, "tokens": [], "stop": False}) + b"\n\n"


def openai_chat(content: str | None, finish=None, **extra) -> bytes:
    delta = {} if content is None else {"content": content}
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def openai_text(text: str, finish=None) -> bytes:
    obj = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}],
        "usage": None,
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def frames(texts, start=0) -> bytes:
    return b"".join(
        b"event: token\ndata: " + orjson.dumps({"t": t, "i": start + n}) + b"\n\n" for n, t in enumerate(texts)
    )


# -- construction ---------------------------------------------------------------------


def test_construction(sse_impl):
    r = sse_impl.TokenRelay()
    assert r.dialect == "llamacpp"
    assert (r.tokens, r.index, r.final) == (0, 0, None)
    r = sse_impl.TokenRelay("openai", start_index=41)
    assert r.dialect == "openai"
    assert (r.tokens, r.index) == (0, 41)
    assert sse_impl.DIALECTS == ("llamacpp", "openai")


def test_bad_construction(sse_impl):
    with pytest.raises(ValueError, match="'llamacpp', 'openai'"):
        sse_impl.TokenRelay("vllm")
    with pytest.raises(ValueError):
        sse_impl.TokenRelay(start_index=-1)
    with pytest.raises(ValueError):
        sse_impl.TokenRelay(start_index=2**63)
    with pytest.raises(TypeError):
        sse_impl.TokenRelay(start_index=1.0)
    with pytest.raises(ValueError):
        sse_impl.TokenRelay(max_event_bytes=0)


# -- llama.cpp ------------------------------------------------------------------------


def test_llamacpp_stream(sse_impl):
    r = sse_impl.TokenRelay("llamacpp")
    out, n, final = r.feed(LLAMA_TOKEN)
    assert out == b'event: token\ndata: {"t":" the","i":0}\n\n'
    assert (n, final) == (1, None)
    out, n, final = r.feed(llama_token(" cat") + llama_token("") + llama_token(" sat"))
    assert out == frames([" cat", " sat"], start=1)
    assert (n, final) == (2, None)
    assert (r.tokens, r.index) == (3, 3)
    out, n, final = r.feed(LLAMA_FINAL)
    assert (out, n) == (b"", 0)
    assert final == LLAMA_END
    assert r.final == LLAMA_END
    # after the end everything is ignored and the end is not reported again
    assert r.feed(LLAMA_TOKEN) == (b"", 0, None)
    assert r.tokens == 3


def test_llamacpp_whole_stream_in_one_chunk(sse_impl):
    r = sse_impl.TokenRelay(start_index=10)
    out, n, final = r.feed(LLAMA_TOKEN * 64 + LLAMA_FINAL + LLAMA_TOKEN)
    assert out == frames([" the"] * 64, start=10)
    assert n == 64
    assert final == LLAMA_END
    assert r.index == 74


def test_llamacpp_final_frame_with_content(sse_impl):
    r = sse_impl.TokenRelay()
    final_frame = b'data: {"content":"!","stop":true,"stop_type":"eos","tokens_predicted":1}\n\n'
    out, n, final = r.feed(final_frame)
    assert out == frames(["!"])
    assert n == 1
    assert final == {
        "kind": "end",
        "tokens_predicted": 1,
        "tokens_evaluated": None,
        "predicted_ms": None,
        "prompt_ms": None,
        "stop_type": "eos",
        "cached_tokens": None,
    }


def test_llamacpp_missing_counts_fall_back_to_relayed(sse_impl):
    r = sse_impl.TokenRelay()
    r.feed(LLAMA_TOKEN * 3)
    _, _, final = r.feed(b'data: {"content":"","stop":true}\n\n')
    assert final["tokens_predicted"] == 3


def test_llamacpp_tolerates_done(sse_impl):
    r = sse_impl.TokenRelay()
    out, n, final = r.feed(LLAMA_TOKEN + DONE)
    assert n == 1
    assert final == {
        "kind": "end",
        "tokens_predicted": 1,
        "tokens_evaluated": None,
        "predicted_ms": None,
        "prompt_ms": None,
        "stop_type": None,
        "cached_tokens": None,
    }


def test_llamacpp_error_frame(sse_impl):
    r = sse_impl.TokenRelay()
    out, n, final = r.feed(LLAMA_TOKEN + LLAMA_ERROR + LLAMA_TOKEN)
    assert (out, n) == (frames([" the"]), 1)
    assert final == {"kind": "error", "message": "slot unavailable", "code": 500, "type": "server_error"}
    assert r.feed(LLAMA_TOKEN) == (b"", 0, None)


@pytest.mark.parametrize(
    ("payload", "final"),
    [
        (b'{"message":"boom","code":503}', {"kind": "error", "message": "boom", "code": 503, "type": None}),
        (b'{"error":{"message":"x","type":"t"}}', {"kind": "error", "message": "x", "code": None, "type": "t"}),
        (b"plain text", {"kind": "error", "message": "plain text", "code": None, "type": None}),
        (b'"quoted"', {"kind": "error", "message": "quoted", "code": None, "type": None}),
        (b"42", {"kind": "error", "message": "upstream error", "code": None, "type": None}),
    ],
)
def test_error_event(sse_impl, payload, final):
    r = sse_impl.TokenRelay()
    assert r.feed(b"event: error\ndata: " + payload + b"\n\n") == (b"", 0, final)


def test_error_member_as_string(sse_impl):
    r = sse_impl.TokenRelay()
    _, _, final = r.feed(b'data: {"error":"overloaded"}\n\n')
    assert final == {"kind": "error", "message": "overloaded", "code": None, "type": None}


def test_invalid_json(sse_impl):
    r = sse_impl.TokenRelay()
    out, n, final = r.feed(LLAMA_TOKEN + b"data: {not json\n\n")
    assert n == 1
    assert final["kind"] == "error"
    assert final["message"].startswith("invalid JSON from upstream: ")
    assert final["code"] is None


def test_non_object_json(sse_impl):
    r = sse_impl.TokenRelay()
    _, _, final = r.feed(b"data: [1, 2]\n\n")
    assert final == {
        "kind": "error",
        "message": "unexpected JSON from upstream: expected an object",
        "code": None,
        "type": None,
    }


def test_other_events_and_comments_are_ignored(sse_impl):
    r = sse_impl.TokenRelay()
    out, n, final = r.feed(b": ping\n\nevent: progress\ndata: {}\n\n" + LLAMA_TOKEN)
    assert (n, final) == (1, None)


def test_oversized_event_ends_the_stream(sse_impl):
    r = sse_impl.TokenRelay(max_event_bytes=200)
    out, n, final = r.feed(LLAMA_TOKEN + b"data: " + b"x" * 300)
    assert (out, n) == (frames([" the"]), 1)
    assert final == {"kind": "error", "message": "SSE event larger than 200 bytes", "code": None, "type": None}


def test_unicode_and_escapes_in_tokens(sse_impl):
    texts = ['"quoted"', "back\\slash", "new\nline", "tab\t", "\x00\x1f\x7f", "é", "世界", "🎉", "\u2028"]
    r = sse_impl.TokenRelay(start_index=9)
    out, n, _ = r.feed(b"".join(llama_token(t) for t in texts))
    assert out == frames(texts, start=9)
    assert n == len(texts)
    parsed = sse_impl.SSEParser().feed(out)
    assert [orjson.loads(d)["t"] for _, d in parsed] == texts


def test_feed_rejects_str(sse_impl):
    with pytest.raises(TypeError):
        sse_impl.TokenRelay().feed("data: x\n\n")


def test_large_indices(sse_impl):
    r = sse_impl.TokenRelay(start_index=2**63 - 2)
    out, n, _ = r.feed(LLAMA_TOKEN * 2)
    assert out == frames([" the"] * 2, start=2**63 - 2)


# -- OpenAI-compatible ----------------------------------------------------------------


def test_openai_chat_stream(sse_impl):
    r = sse_impl.TokenRelay("openai")
    out, n, final = r.feed(openai_chat("", role="assistant"))  # role-only opening chunk
    assert (out, n, final) == (b"", 0, None)
    out, n, final = r.feed(openai_chat("Hel") + openai_chat("lo"))
    assert out == frames(["Hel", "lo"])
    assert n == 2
    out, n, final = r.feed(openai_chat(None, finish="length"))
    assert (n, final) == (0, None)
    usage = {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    out, n, final = r.feed(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n" + DONE)
    assert final == {"kind": "end", "finish_reason": "length", "tokens_predicted": 8, "tokens_evaluated": 5, "cached_tokens": None}
    assert r.feed(openai_chat("more")) == (b"", 0, None)


def test_openai_completions_stream_without_usage(sse_impl):
    r = sse_impl.TokenRelay("openai", start_index=3)
    out, n, final = r.feed(openai_text(" a") + openai_text(" b", finish="stop") + DONE)
    assert out == frames([" a", " b"], start=3)
    assert n == 2
    assert final == {"kind": "end", "finish_reason": "stop", "tokens_predicted": 2, "tokens_evaluated": None, "cached_tokens": None}


def test_openai_llamacpp_server_final_chunk(sse_impl):
    # llama.cpp's /v1/chat/completions puts usage and timings on the finishing chunk
    r = sse_impl.TokenRelay("openai")
    last = openai_chat(None, finish="stop", usage={"completion_tokens": 2, "prompt_tokens": 4}, timings={})
    _, _, final = r.feed(openai_chat("x") + last + DONE)
    assert final == {"kind": "end", "finish_reason": "stop", "tokens_predicted": 2, "tokens_evaluated": 4, "cached_tokens": None}


def test_openai_errors(sse_impl):
    r = sse_impl.TokenRelay("openai")
    err = b'data: {"error":{"message":"bad","type":"BadRequestError","code":400}}\n\n'
    assert r.feed(err) == (b"", 0, {"kind": "error", "message": "bad", "code": 400, "type": "BadRequestError"})
    r = sse_impl.TokenRelay("openai")
    err = b'data: {"object":"error","message":"oom","type":"InternalServerError","code":500}\n\n'
    assert r.feed(err)[2] == {"kind": "error", "message": "oom", "code": 500, "type": "InternalServerError"}


def test_openai_odd_choices_are_skipped(sse_impl):
    r = sse_impl.TokenRelay("openai")
    odd = b'data: {"choices": [1, null, {"delta": "x"}, {"text": 5}, {"delta": {"content": null}}]}\n\n'
    assert r.feed(odd + b'data: {"choices": "nope"}\n\n' + openai_text("ok")) == (frames(["ok"]), 1, None)


def test_openai_multiple_choices(sse_impl):
    r = sse_impl.TokenRelay("openai")
    obj = {"choices": [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}]}
    out, n, _ = r.feed(b"data: " + orjson.dumps(obj) + b"\n\n")
    assert (out, n) == (frames(["a", "b"]), 2)


# -- differential ---------------------------------------------------------------------

TEXTS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)


def llama_ending(end):
    """How a drawn llama.cpp stream ends, and a token after that end (which must be ignored)."""
    return {"final": LLAMA_FINAL, "error": LLAMA_ERROR, "garbage": b"data: {oops\n\n"}.get(end, b"") + LLAMA_TOKEN


def llama_stream(texts, end):
    return b"".join(llama_token(t) for t in texts) + llama_ending(end)


def openai_stream(texts, end):
    body = b"".join((openai_chat if i % 2 else openai_text)(t) for i, t in enumerate(texts))
    if end == "final":
        body += openai_chat(None, finish="stop", usage={"completion_tokens": 99}) + DONE
    elif end == "error":
        body += b'data: {"error":{"message":"m"}}\n\n'
    elif end == "garbage":
        body += b"data: nope\n\n"
    return body + openai_chat("after")


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]


def relay_all(relay, chunks):
    out, total, finals = [], 0, []
    for chunk in chunks:
        frames_, n, final = relay.feed(chunk)
        out.append(frames_)
        total += n
        if final is not None:
            finals.append(final)
    return b"".join(out), total, finals


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    dialect=st.sampled_from(["llamacpp", "openai"]),
    texts=st.lists(TEXTS, max_size=20),
    end=st.sampled_from(["final", "error", "garbage", None]),
    start=st.integers(0, 2**40),
    cuts=st.lists(st.integers(0, 100_000), max_size=15),
)
def test_relay_split_invariance(sse_impl, dialect, texts, end, start, cuts):
    stream = (llama_stream if dialect == "llamacpp" else openai_stream)(texts, end)
    whole = relay_all(sse_impl.TokenRelay(dialect, start), [stream])
    pieces = relay_all(sse_impl.TokenRelay(dialect, start), split(stream, cuts))
    assert pieces == whole
    expected_texts = [t for t in texts if t]
    if end is None and dialect == "llamacpp":
        expected_texts.append(" the")
    if end is None and dialect == "openai":
        expected_texts.append("after")
    assert whole[0] == frames(expected_texts, start)
    assert whole[1] == len(expected_texts)
    assert len(whole[2]) == (0 if end is None else 1)


RELAY_PIECES = st.sampled_from(
    [
        LLAMA_TOKEN,
        LLAMA_FINAL,
        LLAMA_ERROR,
        DONE,
        openai_chat("x"),
        openai_text("y", finish="stop"),
        b"data: {bad\n\n",
        b"data: 7\n\n",
        b"event: error\ndata: e\n\n",
        b": c\n\n",
        b"data: x",
        b"\r\n",
        b"\r",
        b"\n",
        b'data: {"content":"\xc3\xa9","stop":false}\n\n',
        b'data: {"choices":[{"delta":{"content":"\\u00e9"}}],"usage":{"completion_tokens":3}}\n\n',
    ]
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    dialect=st.sampled_from(["llamacpp", "openai"]),
    pieces=st.lists(RELAY_PIECES, max_size=20),
    cuts=st.lists(st.integers(0, 100_000), max_size=15),
    limit=st.sampled_from([64, 1 << 20]),
)
def test_relays_agree_chunk_by_chunk(sse_impls, dialect, pieces, cuts, limit):
    stream = b"".join(pieces)
    relays = {name: mod.TokenRelay(dialect, 5, limit) for name, mod in sse_impls.items()}
    for chunk in split(stream, cuts):
        results = {name: (r.feed(chunk), r.tokens, r.index, r.final) for name, r in relays.items()}
        assert results["py"] == results["c"]
    whole = sse_impls["c"].TokenRelay(dialect, 5, limit)
    assert relay_all(whole, [stream]) == relay_all(sse_impls["py"].TokenRelay(dialect, 5, limit), split(stream, cuts))


# -- llamacpp fast path: the content literal spliced as upstream wrote it ---------------


def llama_token_old(text: str) -> bytes:
    """The older llama.cpp server shape: content first, index last."""
    return b"data: " + orjson.dumps({"content": text, "stop": False, "id_slot": 0, "multimodal": False, "index": 0}) + b"\n\n"


def literal_frame(literal: bytes, shape: str = "new") -> bytes:
    """A token frame around a hand-written ``content`` literal (quotes included)."""
    if shape == "new":
        return b'data: {"index":0,"content":' + literal + b',"tokens":[],"stop":false,"id_slot":0,"tokens_predicted":1,"tokens_evaluated":5}\n\n'
    return b'data: {"content":' + literal + b',"stop":false,"id_slot":0,"multimodal":false,"index":0}\n\n'


def escaped_literal(text: str) -> bytes:
    """*text* as a JSON literal the way other encoders write it: ``\\uXXXX`` for every
    non-ASCII character (surrogate pairs for astral ones) and ``\\/`` for ``/``."""
    import json

    return json.dumps(text, ensure_ascii=True).replace("/", "\\/").encode()


def token_frame_data(out: bytes) -> list[dict]:
    """The decoded data of each of our token frames in *out*, checking the framing."""
    chunks = out.split(b"\n\n")
    assert chunks[-1] == b""
    decoded = []
    for chunk in chunks[:-1]:
        head, _, data = chunk.partition(b"\ndata: ")
        assert head == b"event: token"
        assert b"\n" not in data and b"\r" not in data
        decoded.append(orjson.loads(data))
    return decoded


def test_fast_path_keeps_upstream_escapes(sse_impl):
    r = sse_impl.TokenRelay(start_index=3)
    stream = literal_frame(b'"caf\\u00e9 a\\/b"') + literal_frame(b'"\\"q\\" \\\\ \\n\\t"', "old") + LLAMA_TOKEN
    out, n, final = r.feed(stream)
    assert out == (
        b'event: token\ndata: {"t":"caf\\u00e9 a\\/b","i":3}\n\n'
        b'event: token\ndata: {"t":"\\"q\\" \\\\ \\n\\t","i":4}\n\n'
        b'event: token\ndata: {"t":" the","i":5}\n\n'
    )
    assert (n, final) == (3, None)
    assert token_frame_data(out) == [{"t": "café a/b", "i": 3}, {"t": '"q" \\ \n\t', "i": 4}, {"t": " the", "i": 5}]


def test_fast_path_index_digits_and_old_shape(sse_impl):
    r = sse_impl.TokenRelay()
    out, n, _ = r.feed(
        b'data: {"index":12,"content":"\\u00e9","stop":false}\n\n'
        b'data: {"content":"\\u00e9","stop":false,"index":0}\n\n'
    )
    assert out == frames([], 0) + b'event: token\ndata: {"t":"\\u00e9","i":0}\n\nevent: token\ndata: {"t":"\\u00e9","i":1}\n\n'
    assert n == 2


# Frames that are not of the recognised shape: each must give what the parse gives.
# The content uses \u00e9 so the output shows which path ran: the parse re-encodes it
# as raw UTF-8 (orjson), the fast path would have kept the escape.
SLOW_PATH_FRAMES = [
    # key order
    (b'{"stop":false,"content":"\\u00e9"}', ["é"], None),
    (b'{"index":0,"tokens":[],"content":"\\u00e9","stop":false}', ["é"], None),
    # leading space, negative or empty index, spaced colon
    (b' {"content":"\\u00e9","stop":false}', ["é"], None),
    (b'{"index":-1,"content":"\\u00e9","stop":false}', ["é"], None),
    (b'{"index":,"content":"\\u00e9","stop":false}', [], "error"),
    (b'{"content": "\\u00e9","stop":false}', ["é"], None),
    # no stop, stop true, stop twice, stop spaced
    (b'{"content":"\\u00e9"}', ["é"], None),
    (b'{"content":"\\u00e9","stop":true}', ["é"], "end"),
    (b'{"content":"\\u00e9","stop":false,"stop":true}', ["é"], "end"),
    (b'{"content":"\\u00e9","stop": true,"x":"stop\\":false"}', ["é"], "end"),
    (b'{"content":"\\u00e9","timings":{"stop":false},"stop":true}', ["é"], "end"),
    # an error member, a duplicate content
    (b'{"content":"\\u00e9","stop":false,"error":"boom"}', [], "error"),
    (b'{"content":"\\u00e9","stop":false,"content":"b"}', ["b"], None),
    # empty content: no token
    (b'{"index":0,"content":"","stop":false}', [], None),
    # surrogate escapes: a valid pair, a lone one
    (b'{"content":"\\ud83c\\udf89\\u00e9","stop":false}', ["🎉é"], None),
    (b'{"content":"\\ud800","stop":false}', [], "error"),
    # bad literals: raw control byte, bad escapes, truncated, invalid UTF-8
    (b'{"content":"a\x01\\u00e9","stop":false}', [], "error"),
    (b'{"content":"a\\x\\u00e9","stop":false}', [], "error"),
    (b'{"content":"a\\u00g9","stop":false}', [], "error"),
    (b'{"content":"a\\u00e', [], "error"),
    (b'{"content":"a\\', [], "error"),
    (b'{"content":"\\u00e9\xff","stop":false}', [], "error"),
    (b'{"content":"\\u00e9","stop":false,"x":"\xed\xa0\x80"}', [], "error"),
    # what follows the literal
    (b'{"content":"\\u00e9"}x', [], "error"),
    (b'{"content":"\\u00e9","stop":false}x', [], "error"),
    (b'{"content":"\\u00e9"x,"stop":false}', [], "error"),
]


@pytest.mark.parametrize(("data", "texts", "end"), SLOW_PATH_FRAMES)
def test_unexpected_shapes_take_the_parse(sse_impl, data, texts, end):
    r = sse_impl.TokenRelay()
    out, n, final = r.feed(b"data: " + data + b"\n\n")
    assert out == frames(texts)
    assert n == len(texts)
    assert (final and final["kind"]) == end


def test_fast_path_after_explicit_message_event_and_multiline_data(sse_impls):
    stream = (
        b'event: message\ndata: {"content":"\\u00e9","stop":false}\n\n'
        b'data: {"content":"\\u00e9",\ndata: "stop":false}\n\n'
    )
    outs = {name: mod.TokenRelay().feed(stream) for name, mod in sse_impls.items()}
    assert outs["c"] == outs["py"]
    assert outs["py"][0] == b'event: token\ndata: {"t":"\\u00e9","i":0}\n\nevent: token\ndata: {"t":"\\u00e9","i":1}\n\n'


ANY_TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.lists(
        st.sampled_from(['"', "\\", "/", "\x00", "\x1f", "\n", "é", "🎉", "\u2028", '"stop":true', '"error"', "\\u00e9", "}", ",", "stop"]),
        max_size=6,
    ).map("".join),
)
ENCODINGS = st.sampled_from(["new", "old", "escaped-new", "escaped-old"])


def encode_token(text: str, how: str) -> bytes:
    if how == "new":
        return llama_token(text)
    if how == "old":
        return llama_token_old(text)
    return literal_frame(escaped_literal(text), how.removeprefix("escaped-"))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.lists(st.tuples(ANY_TEXT, ENCODINGS), max_size=15),
    end=st.sampled_from(["final", "error", "garbage", None]),
    start=st.integers(0, 2**40),
    cuts=st.lists(st.integers(0, 100_000), max_size=15),
)
def test_fast_path_differential(sse_impls, tokens, end, start, cuts):
    from llama_orch.ext import _sse_py

    stream = b"".join(encode_token(t, how) for t, how in tokens) + llama_ending(end)
    # C and Python agree byte for byte, chunk by chunk.
    relays = {name: mod.TokenRelay("llamacpp", start) for name, mod in sse_impls.items()}
    chunks = split(stream, cuts)
    for chunk in chunks:
        results = {name: (r.feed(chunk), r.tokens, r.index, r.final) for name, r in relays.items()}
        assert results["py"] == results["c"]
    out, count, finals = relay_all(sse_impls["c"].TokenRelay("llamacpp", start), chunks)
    # Every frame decodes to the upstream text with its index.
    expected = [t for t, _ in tokens if t]
    if end is None:
        expected.append(" the")
    assert token_frame_data(out) == [{"t": t, "i": start + n} for n, t in enumerate(expected)]
    assert count == len(expected)
    # Counts and the final are those of the parse alone.
    orig = _sse_py._llamacpp_literal
    _sse_py._llamacpp_literal = lambda data: None
    try:
        slow = relay_all(_sse_py.TokenRelay("llamacpp", start), [stream])
    finally:
        _sse_py._llamacpp_literal = orig
    assert token_frame_data(slow[0]) == token_frame_data(out)
    assert (slow[1], slow[2]) == (count, finals)
    # Where upstream wrote the literal as orjson does, the bytes are unchanged too.
    if all(how in ("new", "old") for _, how in tokens):
        assert out == slow[0]


def test_slow_path_oracle_differs_only_in_bytes(sse_impl, monkeypatch):
    from llama_orch.ext import _sse_py

    frame = literal_frame(b'"caf\\u00e9"')
    fast = sse_impl.TokenRelay().feed(frame)
    # The twin with the fast path switched off: what the parse alone gives.
    monkeypatch.setattr(_sse_py, "_llamacpp_literal", lambda data: None)
    slow = _sse_py.TokenRelay().feed(frame)
    assert slow[0] == frames(["café"]) != fast[0]
    assert token_frame_data(slow[0]) == token_frame_data(fast[0])
    assert slow[1:] == fast[1:]


@pytest.mark.parametrize("timings, cached", [
    ({"cache_n": 71, "prompt_n": 1}, 71),      # llama-server reports what it found in its KV cache
    ({"prompt_n": 2}, 70),                     # an older one: the prompt's tokens minus those evaluated
    ({"cache_n": -1, "prompt_n": 80}, None),   # nonsense is not a count
    ({}, None),
])
def test_the_prompt_tokens_found_in_the_engines_cache(sse_impl, timings, cached):
    final = orjson.dumps({"content": "", "stop": True, "tokens_evaluated": 72, "timings": timings})
    _, _, end = sse_impl.TokenRelay().feed(b"data: " + final + b"\n\n")
    assert end["cached_tokens"] == cached


def test_openai_cached_tokens_from_prompt_tokens_details(sse_impl):
    r = sse_impl.TokenRelay("openai")
    usage = {"prompt_tokens": 40, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 32}}
    _, _, final = r.feed(openai_chat("x", finish="stop") + b"data: " + orjson.dumps(
        {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage}) + b"\n\n" + DONE)
    assert final["cached_tokens"] == 32
