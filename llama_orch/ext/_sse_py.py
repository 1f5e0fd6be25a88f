"""Server-sent events: the pure-Python twin and specification of ``_sse_c``.

Owns the SSE wire format on both sides of the orchestrator: framing the events we
send to clients (:func:`frame_event`, :func:`frame_events`), parsing the stream an
upstream inference server sends us (:class:`SSEParser`, WHATWG rules), and the
per-token relay that turns upstream completion frames into our ``token`` events
(:class:`TokenRelay`).  Payloads stay ``bytes`` end to end; only event names are
``str``.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable

import orjson

__all__ = ["DIALECTS", "SSEParser", "TokenRelay", "frame_event", "frame_events"]

#: Upstream stream formats :class:`TokenRelay` understands.
DIALECTS = ("llamacpp", "openai")

_BOM = b"\xef\xbb\xbf"
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_DATA_SEP = b"\ndata: "
_END = b"\n\n"
_MESSAGE = "message"

#: ``event: <name>\ndata: `` per event name.  Names come from our own code, so the
#: cache stays tiny; the bound only keeps a caller that varies names from leaking.
_prefixes: dict[str, bytes] = {}
_MAX_PREFIXES = 256


def _prefix(event: str) -> bytes:
    prefix = _prefixes.get(event)
    if prefix is None:
        if not isinstance(event, str):
            raise TypeError(f"event name must be str, not {type(event).__name__}")
        if "\n" in event or "\r" in event:
            raise ValueError(f"event name must not contain a line break: {event!r}")
        prefix = b"event: " + event.encode() + b"\ndata: "
        if len(_prefixes) < _MAX_PREFIXES:
            _prefixes[event] = prefix
    return prefix


def _frame(prefix: bytes, data: bytes) -> bytes:
    """The rare path of :func:`frame_event`: *data* holds a line break."""
    # SSE reads CR, LF and CRLF alike as line ends, so each becomes its own data
    # line; the parser hands back the payload with every break as LF.
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return prefix + _DATA_SEP.join(lines) + _END


def frame_event(event: str, data: bytes) -> bytes:
    """Encode one event as ``event: <event>\\ndata: <data>\\n\\n``.

    A line break in *data* (CR, LF or CRLF) splits it over several ``data:`` lines,
    which a conforming parser joins back with LF.  *event* must not contain a line
    break (ValueError).  ``event: message`` is written out even though it is the
    default: the frame format stays uniform.
    """
    prefix = _prefix(event)
    if not isinstance(data, bytes):
        raise TypeError(f"event data must be bytes, not {type(data).__name__}")
    if b"\n" in data or b"\r" in data:
        return _frame(prefix, data)
    return prefix + data + _END


def frame_events(events: Iterable[tuple[str, bytes]]) -> bytes:
    """Encode many ``(event, data)`` pairs into one buffer, as :func:`frame_event` would.

    One allocation for the whole batch: this is the per-tick flush to a client.
    """
    parts: list[bytes] = []
    append = parts.append
    for event, data in events:
        prefix = _prefix(event)
        if not isinstance(data, bytes):
            raise TypeError(f"event data must be bytes, not {type(data).__name__}")
        if b"\n" in data or b"\r" in data:
            append(_frame(prefix, data))
        else:
            append(prefix)
            append(data)
            append(_END)
    return b"".join(parts)


class SSEParser:
    """Incremental parser of an SSE byte stream (WHATWG "event stream interpretation").

    :meth:`feed` accepts chunks split at any byte, including inside a CRLF pair or a
    multi-byte UTF-8 character, and returns the events completed so far as
    ``(event_type, data)`` pairs: the type defaults to ``"message"``, several
    ``data`` lines are joined with LF, and a block with no ``data`` line is not an
    event.  Comments and the ``id`` and ``retry`` fields are ignored.  A leading
    UTF-8 BOM is skipped.

    The event being assembled may not exceed *max_event_bytes*, counting the bytes
    of its lines without their line ends (see :attr:`pending`); a longer one raises
    ValueError and resets the parser, so a misbehaving upstream cannot make it
    buffer without bound.
    """

    __slots__ = ("_max", "_line", "_block", "_event", "_data", "_skip_lf", "_bom")

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        max_event_bytes = operator.index(max_event_bytes)
        if max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be >= 1, got {max_event_bytes}")
        self._max = max_event_bytes
        self._reset()
        #: Bytes held at stream start while they may still be a BOM; None once decided.
        self._bom: bytes | None = b""

    def _reset(self) -> None:
        #: The incomplete last line.
        self._line = bytearray()
        #: Bytes of the complete lines of the current block, line ends excluded.
        self._block = 0
        self._event = b""
        self._data: list[bytes] = []
        #: The last chunk ended in CR: an LF starting the next one belongs to it.
        self._skip_lf = False

    @property
    def pending(self) -> int:
        """Buffered bytes not yet part of a dispatched event.

        That is the block being assembled: its complete lines (line ends not counted;
        a blank line ends the block whether or not it dispatches) and the incomplete
        line after them.
        """
        return self._block + len(self._line) + (len(self._bom) if self._bom else 0)

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        """Parse *chunk*; return the events it completed, in stream order."""
        out: list[tuple[str, bytes]] = []
        self._feed_into(chunk, out)
        return out

    def _too_big(self) -> ValueError:
        self._reset()
        return ValueError(f"SSE event larger than {self._max} bytes")

    def _feed_into(self, chunk: bytes, out: list[tuple[str, bytes]]) -> None:
        # Events are appended to *out* as they complete, so a caller that catches the
        # size error still has the events that preceded it (TokenRelay relies on it).
        if not isinstance(chunk, bytes):
            raise TypeError(f"chunk must be bytes, not {type(chunk).__name__}")
        if not chunk:
            return
        if self._bom is not None:
            held = self._bom + chunk
            if len(held) < len(_BOM) and _BOM.startswith(held):
                self._bom = held
                return
            self._bom = None
            chunk = held[len(_BOM) :] if held.startswith(_BOM) else held
            if not chunk:
                return
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
                if not chunk:
                    return

        line = self._line
        if line:
            # Finish the partial line first; appending a chunk with no line end keeps
            # a long line arriving in small pieces linear rather than quadratic.
            lf = chunk.find(b"\n")
            cr = chunk.find(b"\r")
            end = lf if cr < 0 or 0 <= lf < cr else cr
            if end < 0:
                line += chunk
                if self._block + len(line) > self._max:
                    raise self._too_big()
                return
            line += chunk[:end]
            if chunk[end] == 0x0D:
                if end + 1 == len(chunk):
                    self._skip_lf = True
                elif chunk[end + 1] == 0x0A:
                    end += 1
            complete = bytes(line)
            line.clear()
            self._line_done(complete, out)
            chunk = chunk[end + 1 :]

        if b"\r" in chunk:
            lines = _LINE_BREAK.split(chunk)
            if chunk[-1] == 0x0D:
                self._skip_lf = True
        else:
            lines = chunk.split(b"\n")
        for i in range(len(lines) - 1):
            self._line_done(lines[i], out)
        line += lines[-1]
        if self._block + len(line) > self._max:
            raise self._too_big()

    def _line_done(self, line: bytes, out: list[tuple[str, bytes]]) -> None:
        if not line:
            self._block = 0
            if self._data:
                data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
                event = self._event.decode("utf-8", "replace") if self._event else _MESSAGE
                out.append((event, data))
                self._data = []
            self._event = b""
            return
        self._block += len(line)
        if self._block > self._max:
            raise self._too_big()
        if line[0] == 0x3A:  # ":" starts a comment
            return
        field, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._event = value
        # "id", "retry" and unknown fields do not matter to a relay.


def _error(message: object, code: object = None, type_: object = None) -> dict:
    return {
        "kind": "error",
        "message": message if isinstance(message, str) else "upstream error",
        "code": code,
        "type": type_,
    }


def _error_from(value: object) -> dict:
    """The final dict for an upstream ``error`` member or ``event: error`` payload."""
    if isinstance(value, dict):
        return _error(value.get("message"), value.get("code"), value.get("type"))
    return _error(value)


#: A llama.cpp token frame up to the end of its ``content`` literal (``index``
#: optional, any digits), the literal captured with its quotes: JSON string characters
#: with no raw control byte and no surrogate ``\\u`` escape (a lone one is invalid JSON,
#: and pairs are rare enough not to matter); a comma must follow it.
_LLAMACPP_TOKEN = re.compile(
    rb'\{(?:"index":[0-9]+,)?"content":'
    rb'("(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u(?![dD][89a-fA-F])[0-9a-fA-F]{4})+")(?=,)'
)
#: Every occurrence (overlapping ones too) of ``"stop"``, ``"error"``, ``"content"``.
_LLAMACPP_KEYS = re.compile(rb'"(?=(stop|error|content)")')
_ONLY_STOP = [b"stop"]


def _llamacpp_literal(data: bytes) -> bytes | None:
    """The ``content`` JSON string literal (quotes included) of a plain token frame.

    The fast path of the llamacpp dialect: a frame this recognises relays its text
    without being parsed, the literal spliced into our frame as it is.  Recognised
    strictly, so that the result is what the parse would give (one token, no end, no
    error): the data starts ``{"content":"`` or ``{"index":<digits>,"content":"``, the
    literal is non-empty and well formed as above, and the rest after it starts with
    ``,``, ends with ``}``, holds ``"stop"`` exactly once, as ``"stop":false``, and
    neither ``"error"`` nor ``"content"``; the data is valid UTF-8.  Anything else
    returns None and takes the parse.  What is not checked is that the rest is
    well-formed JSON.
    """
    m = _LLAMACPP_TOKEN.match(data)
    if m is None:
        return None
    rest = m.end()
    if (
        data[-1] != 0x7D  # "}"
        or _LLAMACPP_KEYS.findall(data, rest) != _ONLY_STOP
        or data.find(b'"stop":false', rest) < 0
    ):
        return None
    if not data.isascii():
        try:
            data.decode()
        except UnicodeDecodeError:
            return None
    return m.group(1)


def _token_frame(text: str | bytes, index: int) -> bytes:
    """Our token frame; *text* is a ``str``, or bytes: a JSON string literal to splice."""
    if isinstance(text, bytes):
        return b'event: token\ndata: {"t":' + text + b',"i":%d}\n\n' % index
    return b"event: token\ndata: " + orjson.dumps({"t": text, "i": index}) + _END


class TokenRelay:
    """Turn an upstream completion stream into our ``token`` events, chunk by chunk.

    Every token of a chunk becomes ``event: token\\ndata: {"t":<text>,"i":<n>}\\n\\n``
    in one output buffer, ``n`` counting up from *start_index*.  The data is the JSON
    value ``{"t": text, "i": n}``, written compact: ``<text>`` is ``orjson.dumps(text)``,
    except for a llama.cpp token frame of the plain shape (see
    :func:`_llamacpp_literal`), whose ``content`` string literal is copied as
    upstream wrote it (so escapes such as ``\\u00e9`` or ``\\/`` are kept: the bytes
    may differ from ``orjson.dumps``, the decoded text does not).  *dialect* names
    the upstream format:

    ``"llamacpp"``
        llama.cpp server ``/completion`` with ``stream: true``: ``data:`` frames
        with ``content`` (one token when non-empty) and ``stop``; the ``stop: true``
        frame, which may carry a last token, ends the stream.
    ``"openai"``
        OpenAI-compatible ``/v1/completions`` or ``/v1/chat/completions`` (vLLM,
        TGI, llama.cpp): ``choices[i].text`` or ``choices[i].delta.content`` is one
        token when non-empty; ``data: [DONE]`` ends the stream.

    Only ``message`` events (the default type) carry frames; ``event: error`` ends
    the stream and other event types and comments are skipped.  ``data: [DONE]`` is
    tolerated by the llama.cpp dialect too.

    The end of the stream is reported once, as the third item of :meth:`feed`'s
    result, and later chunks are ignored.  Every key is always present, None when
    upstream did not say:

    * llamacpp end: ``{"kind": "end", "tokens_predicted", "tokens_evaluated",
      "predicted_ms", "prompt_ms", "stop_type", "cached_tokens"}`` (the two ``_ms``
      from ``timings``; ``cached_tokens``, the prompt tokens the engine found in its
      KV cache: ``timings.cache_n``, else ``tokens_evaluated - timings.prompt_n``);
    * openai end: ``{"kind": "end", "finish_reason", "tokens_predicted",
      "tokens_evaluated", "cached_tokens"}`` (the last ``finish_reason`` seen; the
      counts from the last ``usage`` seen, ``cached_tokens`` from its
      ``prompt_tokens_details``);
    * error: ``{"kind": "error", "message": str, "code", "type"}`` for an upstream
      ``{"error": ...}`` frame (or, openai, ``{"object": "error", ...}``), an
      ``event: error``, invalid JSON, a frame that is not a JSON object, or an
      event over *max_event_bytes*.

    An end's ``tokens_predicted`` falls back to the number of tokens relayed.
    """

    __slots__ = ("_openai", "_parser", "_start", "_tokens", "_final", "_finish_reason", "_usage")

    def __init__(self, dialect: str = "llamacpp", start_index: int = 0, max_event_bytes: int = 1 << 20) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; expected one of {', '.join(map(repr, DIALECTS))}")
        start_index = operator.index(start_index)
        if not 0 <= start_index < 1 << 63:
            raise ValueError(f"start_index must be in [0, 2**63), got {start_index}")
        self._openai = dialect == "openai"
        self._parser = SSEParser(max_event_bytes)
        self._start = start_index
        self._tokens = 0
        self._final: dict | None = None
        self._finish_reason: object = None
        self._usage: object = None

    @property
    def dialect(self) -> str:
        """``"llamacpp"`` or ``"openai"``."""
        return "openai" if self._openai else "llamacpp"

    @property
    def tokens(self) -> int:
        """Tokens relayed so far."""
        return self._tokens

    @property
    def index(self) -> int:
        """The ``i`` the next token will get."""
        return self._start + self._tokens

    @property
    def final(self) -> dict | None:
        """The end-of-stream description once it has been returned by :meth:`feed`."""
        return self._final

    def feed(self, chunk: bytes) -> tuple[bytes, int, dict | None]:
        """Relay one upstream chunk: ``(our frames, tokens in them, final or None)``."""
        if self._final is not None:
            return b"", 0, None
        events: list[tuple[str, bytes]] = []
        final = None
        try:
            self._parser._feed_into(chunk, events)
        except ValueError as exc:
            final = _error(str(exc))
        texts: list[str | bytes] = []
        for event, data in events:
            end = self._event(event, data, texts)
            if end is not None:
                # Whatever follows the end in this chunk is not part of the stream.
                final = end
                break
        index = self._start + self._tokens
        out = b"".join([_token_frame(text, index + n) for n, text in enumerate(texts)])
        self._tokens += len(texts)
        if final is not None:
            if final["kind"] == "end" and final["tokens_predicted"] is None:
                final["tokens_predicted"] = self._tokens
            self._final = final
        return out, len(texts), final

    def _event(self, event: str, data: bytes, texts: list[str | bytes]) -> dict | None:
        """Collect the tokens of one upstream event into *texts*; return a final or None.

        A token is a ``str``, or the ``bytes`` of a JSON string literal to splice.
        """
        if event == "error":
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                return _error(data.decode("utf-8", "replace"))
            if isinstance(payload, dict) and "error" in payload:
                payload = payload["error"]
            return _error_from(payload)
        if event != _MESSAGE:
            return None
        if data == b"[DONE]":
            if self._openai:
                return self._openai_end()
            return self._llamacpp_end({})
        if not self._openai:
            literal = _llamacpp_literal(data)
            if literal is not None:
                texts.append(literal)
                return None
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return _error(f"invalid JSON from upstream: {exc}")
        if not isinstance(obj, dict):
            return _error("unexpected JSON from upstream: expected an object")
        if "error" in obj:
            return _error_from(obj["error"])
        if self._openai:
            if obj.get("object") == "error":
                return _error_from(obj)
            choices = obj.get("choices")
            if isinstance(choices, list):
                for choice in choices:
                    if not isinstance(choice, dict):
                        continue
                    text = choice.get("text")
                    if text is None:
                        delta = choice.get("delta")
                        if isinstance(delta, dict):
                            text = delta.get("content")
                    if isinstance(text, str) and text:
                        texts.append(text)
                    reason = choice.get("finish_reason")
                    if reason is not None:
                        self._finish_reason = reason
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self._usage = usage
            return None
        content = obj.get("content")
        if isinstance(content, str) and content:
            texts.append(content)
        if obj.get("stop") is True:
            return self._llamacpp_end(obj)
        return None

    def _llamacpp_end(self, obj: dict) -> dict:
        timings = obj.get("timings")
        if not isinstance(timings, dict):
            timings = {}
        return {
            "kind": "end",
            # None is replaced by the count relayed, in feed().
            "tokens_predicted": obj.get("tokens_predicted"),
            "tokens_evaluated": obj.get("tokens_evaluated"),
            "predicted_ms": timings.get("predicted_ms"),
            "prompt_ms": timings.get("prompt_ms"),
            "stop_type": obj.get("stop_type"),
            "cached_tokens": _llamacpp_cached(obj, timings),
        }

    def _openai_end(self) -> dict:
        usage = self._usage if isinstance(self._usage, dict) else {}
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return {
            "kind": "end",
            "finish_reason": self._finish_reason,
            "tokens_predicted": usage.get("completion_tokens"),
            "tokens_evaluated": usage.get("prompt_tokens"),
            "cached_tokens": cached if type(cached) is int and cached >= 0 else None,
        }


def _llamacpp_cached(obj: dict, timings: dict) -> int | None:
    """Prompt tokens the engine did not evaluate again: ``timings.cache_n`` (llama-server since
    late 2025), else the prompt's tokens minus those evaluated (``timings.prompt_n``)."""
    cached = timings.get("cache_n")
    if type(cached) is int and cached >= 0:
        return cached
    evaluated, prompt_n = obj.get("tokens_evaluated"), timings.get("prompt_n")
    if type(evaluated) is int and type(prompt_n) is int and evaluated >= prompt_n >= 0:
        return evaluated - prompt_n
    return None
