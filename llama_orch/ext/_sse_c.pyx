# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Server-sent events: compiled build of ``_sse_py`` (the specification).

Same API and behaviour as the twin.  Where the twin splits chunks into line objects
and joins lists of pieces, this module walks the chunk with ``memchr``, creates
Python objects only for the values it hands out, and writes output frames straight
into one preallocated ``bytes``.
"""

import operator

import orjson

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.string cimport memchr, memcmp, memcpy

__all__ = ["DIALECTS", "SSEParser", "TokenRelay", "frame_event", "frame_events"]

DIALECTS = ("llamacpp", "openai")

cdef bytes _BOM = b"\xef\xbb\xbf"
cdef bytes _DATA_SEP = b"\ndata: "
cdef bytes _END = b"\n\n"
cdef bytes _EMPTY = b""
cdef str _MESSAGE = "message"
cdef str _ERROR = "error"
cdef bytes _DONE = b"[DONE]"

cdef object _dumps = orjson.dumps
cdef object _loads = orjson.loads
cdef object _JSONDecodeError = orjson.JSONDecodeError

# ``event: <name>\ndata: `` per event name; bounded for the same reason as the twin.
cdef dict _prefixes = {}
cdef Py_ssize_t _MAX_PREFIXES = 256


cdef bytes _prefix(object event):
    cdef object prefix = _prefixes.get(event)
    if prefix is not None:
        return <bytes>prefix
    if not isinstance(event, str):
        raise TypeError(f"event name must be str, not {type(event).__name__}")
    if "\n" in event or "\r" in event:
        raise ValueError(f"event name must not contain a line break: {event!r}")
    prefix = b"event: " + (<str>event).encode() + b"\ndata: "
    if len(_prefixes) < _MAX_PREFIXES:
        _prefixes[event] = prefix
    return <bytes>prefix


cdef inline int _check_data(object data) except -1:
    if not PyBytes_Check(data):
        raise TypeError(f"event data must be bytes, not {type(data).__name__}")
    return 0


cdef inline bint _has_break(object data) noexcept:
    cdef const char* p = PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    return memchr(p, b'\n', n) != NULL or memchr(p, b'\r', n) != NULL


cdef bytes _frame(bytes prefix, bytes data):
    # The rare multi-line path; see the twin.
    cdef list lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return prefix + _DATA_SEP.join(lines) + _END


def frame_event(event, data):
    """Encode one event as ``event: <event>\\ndata: <data>\\n\\n``; see the twin."""
    cdef bytes prefix = _prefix(event)
    _check_data(data)
    if _has_break(data):
        return _frame(prefix, data)
    cdef Py_ssize_t lp = PyBytes_GET_SIZE(prefix), ld = PyBytes_GET_SIZE(data)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, lp + ld + 2)
    cdef char* w = PyBytes_AS_STRING(out)
    memcpy(w, PyBytes_AS_STRING(prefix), lp)
    memcpy(w + lp, PyBytes_AS_STRING(data), ld)
    w[lp + ld] = b'\n'
    w[lp + ld + 1] = b'\n'
    return out


def frame_events(events):
    """Encode many ``(event, data)`` pairs into one buffer; see the twin."""
    # Pass one validates and sizes, keeping (head, data) pairs alive in ``parts``;
    # pass two copies into a single allocation.  A multi-line event is framed on the
    # slow path and stored whole as its head, with data None.
    cdef list parts = []
    cdef Py_ssize_t total = 0, i, n, size
    cdef object event, data, head
    for event, data in events:
        head = _prefix(event)
        _check_data(data)
        if _has_break(data):
            head = _frame(<bytes>head, <bytes>data)
            data = None
            total += PyBytes_GET_SIZE(head)
        else:
            total += PyBytes_GET_SIZE(head) + PyBytes_GET_SIZE(data) + 2
        parts.append(head)
        parts.append(data)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* w = PyBytes_AS_STRING(out)
    n = PyList_GET_SIZE(parts)
    i = 0
    while i < n:
        head = <object>PyList_GET_ITEM(parts, i)
        data = <object>PyList_GET_ITEM(parts, i + 1)
        size = PyBytes_GET_SIZE(head)
        memcpy(w, PyBytes_AS_STRING(head), size)
        w += size
        if data is not None:
            size = PyBytes_GET_SIZE(data)
            memcpy(w, PyBytes_AS_STRING(data), size)
            w += size
            w[0] = b'\n'
            w[1] = b'\n'
            w += 2
        i += 2
    return out


@cython.final
cdef class SSEParser:
    """Incremental parser of an SSE byte stream (WHATWG rules); see the twin."""

    cdef Py_ssize_t _max
    # the incomplete last line
    cdef bytearray _line
    # bytes of the complete lines of the current block, line ends excluded
    cdef Py_ssize_t _block
    cdef bytes _event
    cdef list _data
    # the last chunk ended in CR: an LF starting the next one belongs to it
    cdef bint _skip_lf
    # bytes held at stream start while they may still be a BOM; None once decided
    cdef object _bom
    # set by a llamacpp TokenRelay: a message event whose data is a plain token frame
    # is handed out as its content literal (bytes) rather than as an (event, data) pair
    cdef bint _llamacpp

    def __init__(self, max_event_bytes=1 << 20):
        max_event_bytes = operator.index(max_event_bytes)
        if max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be >= 1, got {max_event_bytes}")
        self._max = max_event_bytes
        self._reset()
        self._bom = _EMPTY

    cdef int _reset(self) except -1:
        self._line = bytearray()
        self._block = 0
        self._event = _EMPTY
        self._data = []
        self._skip_lf = False
        return 0

    @property
    def pending(self):
        """Buffered bytes not yet part of a dispatched event; see the twin."""
        return (self._block + PyByteArray_GET_SIZE(self._line)
                + (PyBytes_GET_SIZE(self._bom) if self._bom is not None else 0))

    def feed(self, chunk):
        """Parse *chunk*; return the events it completed, in stream order."""
        cdef list out = []
        self._feed_into(chunk, out)
        return out

    cdef object _too_big(self):
        self._reset()
        return ValueError(f"SSE event larger than {self._max} bytes")

    cdef int _append_line(self, const char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t old = PyByteArray_GET_SIZE(self._line)
        if n:
            # Resize over-allocates when growing, so a long line in small chunks
            # stays linear.
            PyByteArray_Resize(self._line, old + n)
            memcpy(PyByteArray_AS_STRING(self._line) + old, p, n)
        return 0

    cdef int _feed_into(self, object chunk, list out) except -1:
        cdef const char* buf
        cdef const char* end
        cdef const char* lf
        cdef const char* cr
        cdef Py_ssize_t n, pos = 0, held
        cdef bytes held_bytes
        if not PyBytes_Check(chunk):
            raise TypeError(f"chunk must be bytes, not {type(chunk).__name__}")
        if not PyBytes_GET_SIZE(chunk):
            return 0
        if self._bom is not None:
            held_bytes = <bytes>self._bom + <bytes>chunk
            if PyBytes_GET_SIZE(held_bytes) < 3 and _BOM.startswith(held_bytes):
                self._bom = held_bytes
                return 0
            self._bom = None
            chunk = held_bytes[3:] if held_bytes.startswith(_BOM) else held_bytes
            if not PyBytes_GET_SIZE(chunk):
                return 0
        buf = PyBytes_AS_STRING(chunk)
        n = PyBytes_GET_SIZE(chunk)
        if self._skip_lf:
            self._skip_lf = False
            if buf[0] == b'\n':
                pos = 1
                if n == 1:
                    return 0

        # ``cr`` is the next CR at or after ``pos``, or NULL when the rest has none;
        # streams without CR pay for one memchr per chunk, not one per line.
        cr = <const char*>memchr(buf + pos, b'\r', n - pos)
        held = PyByteArray_GET_SIZE(self._line)
        while pos < n:
            lf = <const char*>memchr(buf + pos, b'\n', n - pos)
            if cr != NULL and cr < buf + pos:
                cr = <const char*>memchr(buf + pos, b'\r', n - pos)
            end = lf if cr == NULL or (lf != NULL and lf < cr) else cr
            if end == NULL:
                break
            if held:
                # Finish the partial line from the previous chunk(s).
                self._append_line(buf + pos, end - (buf + pos))
                self._line_done(PyByteArray_AS_STRING(self._line), PyByteArray_GET_SIZE(self._line), out)
                PyByteArray_Resize(self._line, 0)
                held = 0
            else:
                self._line_done(buf + pos, end - (buf + pos), out)
            if end[0] == b'\r':
                if end + 1 == buf + n:
                    self._skip_lf = True
                elif end[1] == b'\n':
                    end += 1
            pos = end + 1 - buf
        if pos < n:
            self._append_line(buf + pos, n - pos)
        if self._block + PyByteArray_GET_SIZE(self._line) > self._max:
            raise self._too_big()
        return 0

    cdef int _line_done(self, const char* p, Py_ssize_t n, list out) except -1:
        cdef const char* colon
        cdef const char* value
        cdef Py_ssize_t field_len, value_len, count
        cdef object data, literal
        if n == 0:
            self._block = 0
            count = PyList_GET_SIZE(self._data)
            if count:
                data = <object>PyList_GET_ITEM(self._data, 0) if count == 1 else b"\n".join(self._data)
                if self._llamacpp and not PyBytes_GET_SIZE(self._event):
                    literal = _llamacpp_literal(<bytes>data, None)
                    out.append((_MESSAGE, data) if literal is None else literal)
                elif PyBytes_GET_SIZE(self._event):
                    out.append((self._event.decode("utf-8", "replace"), data))
                else:
                    out.append((_MESSAGE, data))
                self._data = []
            self._event = _EMPTY
            return 0
        self._block += n
        if self._block > self._max:
            raise self._too_big()
        if p[0] == b':':
            return 0
        colon = <const char*>memchr(p, b':', n)
        if colon == NULL:
            field_len = n
            value = p + n
            value_len = 0
        else:
            field_len = colon - p
            value = colon + 1
            value_len = n - field_len - 1
            if value_len and value[0] == b' ':
                value += 1
                value_len -= 1
        if field_len == 4 and memcmp(p, b"data", 4) == 0:
            self._data.append(PyBytes_FromStringAndSize(value, value_len))
        elif field_len == 5 and memcmp(p, b"event", 5) == 0:
            self._event = PyBytes_FromStringAndSize(value, value_len)
        return 0


cdef dict _error(object message, object code=None, object type_=None):
    return {
        "kind": "error",
        "message": message if isinstance(message, str) else "upstream error",
        "code": code,
        "type": type_,
    }


cdef dict _error_from(object value):
    if isinstance(value, dict):
        return _error((<dict>value).get("message"), (<dict>value).get("code"), (<dict>value).get("type"))
    return _error(value)


cdef inline Py_ssize_t _find(const unsigned char* p, Py_ssize_t n, const char* needle, Py_ssize_t k) noexcept:
    """Offset of the first *needle* (which starts with a quote) in p[:n], or -1."""
    cdef Py_ssize_t i = 0
    cdef const unsigned char* q
    while i + k <= n:
        q = <const unsigned char*>memchr(p + i, needle[0], n - i)
        if q == NULL:
            return -1
        i = q - p
        if i + k > n:
            return -1
        if memcmp(p + i, needle, k) == 0:
            return i
        i += 1
    return -1


cdef inline bint _is_hex(unsigned char c) noexcept:
    return (c'0' <= c <= c'9') or (c'a' <= c <= c'f') or (c'A' <= c <= c'F')


cdef Py_ssize_t _llamacpp_scan(const unsigned char* p, Py_ssize_t n, Py_ssize_t* start) noexcept:
    """The end (past the closing quote) of a plain token frame's content literal, or -1.

    The exact rule of the twin's ``_llamacpp_literal``, UTF-8 validity aside; *start*
    gets the offset of the opening quote.
    """
    cdef Py_ssize_t i, j, end
    cdef unsigned char c
    if n >= 12 and memcmp(p, b'{"content":"', 12) == 0:
        i = 11
    elif n >= 9 and memcmp(p, b'{"index":', 9) == 0:
        i = 9
        while i < n and c'0' <= p[i] <= c'9':
            i += 1
        if i == 9 or n - i < 12 or memcmp(p + i, b',"content":"', 12) != 0:
            return -1
        i += 11
    else:
        return -1
    start[0] = i
    i += 1
    while True:
        if i >= n:
            return -1
        c = p[i]
        if c == c'"':
            break
        if c < 0x20:
            return -1
        if c == c'\\':
            if i + 1 >= n:
                return -1
            c = p[i + 1]
            if c == c'"' or c == c'\\' or c == c'/' or c == c'b' or c == c'f' or c == c'n' or c == c'r' or c == c't':
                i += 2
            elif c == c'u':
                if i + 6 > n:
                    return -1
                for j in range(i + 2, i + 6):
                    if not _is_hex(p[j]):
                        return -1
                if (p[i + 2] == c'd' or p[i + 2] == c'D') and (c'8' <= p[i + 3] <= c'9' or c'a' <= p[i + 3] <= c'f' or c'A' <= p[i + 3] <= c'F'):
                    return -1
                i += 6
            else:
                return -1
        else:
            i += 1
    if i == start[0] + 1:
        return -1
    end = i + 1
    # The rest: from the comma after the literal to the closing brace.
    if end >= n or p[end] != c',' or p[n - 1] != c'}':
        return -1
    p += end
    n -= end
    # "stop" exactly once (overlapping occurrences count), as "stop":false.
    j = _find(p, n, b'"stop"', 6)
    if j < 0 or _find(p + j + 1, n - j - 1, b'"stop"', 6) >= 0:
        return -1
    if _find(p, n, b'"stop":false', 12) < 0:
        return -1
    if _find(p, n, b'"error"', 7) >= 0 or _find(p, n, b'"content"', 9) >= 0:
        return -1
    return end


cdef object _llamacpp_literal(bytes data, object otherwise):
    """The twin's ``_llamacpp_literal``, returning *otherwise* instead of None."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data), start = 0, i
    cdef Py_ssize_t end = _llamacpp_scan(p, n, &start)
    if end < 0:
        return otherwise
    for i in range(n):
        if p[i] >= 0x80:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return otherwise
            break
    return PyBytes_FromStringAndSize(<const char*>p + start, end - start)


# A token frame is _TOKEN_HEAD + json(text) + _TOKEN_MID + index + _TOKEN_TAIL: the
# same JSON value as the twin's orjson.dumps({"t": text, "i": index}), byte for byte
# the twin's frame.  json(text) is orjson.dumps(text), or for a plain llama.cpp token
# frame its content literal as upstream wrote it (see _llamacpp_literal).
cdef bytes _TOKEN_HEAD = b'event: token\ndata: {"t":'
cdef bytes _TOKEN_MID = b',"i":'
cdef bytes _TOKEN_TAIL = b'}\n\n'


cdef inline Py_ssize_t _digits(unsigned long long v) noexcept:
    cdef Py_ssize_t d = 1
    while v >= 10:
        v //= 10
        d += 1
    return d


@cython.final
cdef class TokenRelay:
    """Turn an upstream completion stream into our ``token`` events; see the twin."""

    cdef bint _openai
    cdef SSEParser _parser
    cdef long long _start
    cdef long long _tokens
    cdef object _final
    cdef object _finish_reason
    cdef object _usage

    def __init__(self, dialect="llamacpp", start_index=0, max_event_bytes=1 << 20):
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; expected one of {', '.join(map(repr, DIALECTS))}")
        start_index = operator.index(start_index)
        if not 0 <= start_index < 1 << 63:
            raise ValueError(f"start_index must be in [0, 2**63), got {start_index}")
        self._openai = dialect == "openai"
        self._parser = SSEParser(max_event_bytes)
        self._parser._llamacpp = not self._openai
        self._start = start_index
        self._tokens = 0
        self._final = None
        self._finish_reason = None
        self._usage = None

    @property
    def dialect(self):
        """``"llamacpp"`` or ``"openai"``."""
        return "openai" if self._openai else "llamacpp"

    @property
    def tokens(self):
        """Tokens relayed so far."""
        return self._tokens

    @property
    def index(self):
        """The ``i`` the next token will get."""
        return self._start + self._tokens

    @property
    def final(self):
        """The end-of-stream description once it has been returned by :meth:`feed`."""
        return self._final

    def feed(self, chunk):
        """Relay one upstream chunk: ``(our frames, tokens in them, final or None)``."""
        if self._final is not None:
            return _EMPTY, 0, None
        cdef list events = []
        cdef list texts = []
        cdef object final = None, end, item
        cdef Py_ssize_t i
        try:
            self._parser._feed_into(chunk, events)
        except ValueError as exc:
            final = _error(str(exc))
        for i in range(PyList_GET_SIZE(events)):
            item = <object>PyList_GET_ITEM(events, i)
            if PyBytes_Check(item):
                # A plain llama.cpp token frame, recognised by the parser.
                texts.append(item)
                continue
            end = self._event(<str>PyTuple_GET_ITEM(item, 0), <bytes>PyTuple_GET_ITEM(item, 1), texts)
            if end is not None:
                final = end
                break
        cdef bytes out = self._frames(texts)
        cdef Py_ssize_t count = PyList_GET_SIZE(texts)
        self._tokens += count
        if final is not None:
            if final["kind"] == "end" and final["tokens_predicted"] is None:
                final["tokens_predicted"] = self._tokens
            self._final = final
        return out, count, final

    cdef bytes _frames(self, list texts):
        cdef Py_ssize_t count = PyList_GET_SIZE(texts), i, total = 0, size, d
        if not count:
            return _EMPTY
        # A bytes text is already a JSON string literal (the llamacpp fast path).
        cdef list payloads = [
            <object>PyList_GET_ITEM(texts, i) if PyBytes_Check(<object>PyList_GET_ITEM(texts, i))
            else _dumps(<object>PyList_GET_ITEM(texts, i))
            for i in range(count)
        ]
        cdef unsigned long long index = self._start + self._tokens
        cdef Py_ssize_t fixed = PyBytes_GET_SIZE(_TOKEN_HEAD) + PyBytes_GET_SIZE(_TOKEN_MID) + PyBytes_GET_SIZE(_TOKEN_TAIL)
        for i in range(count):
            total += fixed + PyBytes_GET_SIZE(<bytes>PyList_GET_ITEM(payloads, i)) + _digits(index + i)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
        cdef char* w = PyBytes_AS_STRING(out)
        cdef object payload
        cdef unsigned long long v
        for i in range(count):
            memcpy(w, PyBytes_AS_STRING(_TOKEN_HEAD), PyBytes_GET_SIZE(_TOKEN_HEAD))
            w += PyBytes_GET_SIZE(_TOKEN_HEAD)
            payload = <object>PyList_GET_ITEM(payloads, i)
            size = PyBytes_GET_SIZE(payload)
            memcpy(w, PyBytes_AS_STRING(payload), size)
            w += size
            memcpy(w, PyBytes_AS_STRING(_TOKEN_MID), PyBytes_GET_SIZE(_TOKEN_MID))
            w += PyBytes_GET_SIZE(_TOKEN_MID)
            v = index + i
            d = _digits(v)
            w += d
            while True:
                w -= 1
                w[0] = <char>(c'0' + v % 10)
                v //= 10
                if not v:
                    break
            w += d
            memcpy(w, PyBytes_AS_STRING(_TOKEN_TAIL), PyBytes_GET_SIZE(_TOKEN_TAIL))
            w += PyBytes_GET_SIZE(_TOKEN_TAIL)
        return out

    cdef object _event(self, str event, bytes data, list texts):
        cdef object obj, payload, text, reason, delta, usage, choice
        if event is not _MESSAGE and event != _MESSAGE:
            if event == _ERROR:
                try:
                    payload = _loads(data)
                except _JSONDecodeError:
                    return _error(data.decode("utf-8", "replace"))
                if isinstance(payload, dict) and "error" in <dict>payload:
                    payload = (<dict>payload)["error"]
                return _error_from(payload)
            return None
        if data == _DONE:
            if self._openai:
                return self._openai_end()
            return self._llamacpp_end({})
        if not self._openai:
            # An explicit "event: message" or a multi-line data the parser passed on.
            obj = _llamacpp_literal(data, None)
            if obj is not None:
                texts.append(obj)
                return None
        try:
            obj = _loads(data)
        except _JSONDecodeError as exc:
            return _error(f"invalid JSON from upstream: {exc}")
        if not isinstance(obj, dict):
            return _error("unexpected JSON from upstream: expected an object")
        cdef dict frame = <dict>obj
        if "error" in frame:
            return _error_from(frame["error"])
        if self._openai:
            if frame.get("object") == "error":
                return _error_from(frame)
            obj = frame.get("choices")
            if isinstance(obj, list):
                for choice in <list>obj:
                    if not isinstance(choice, dict):
                        continue
                    text = (<dict>choice).get("text")
                    if text is None:
                        delta = (<dict>choice).get("delta")
                        if isinstance(delta, dict):
                            text = (<dict>delta).get("content")
                    if isinstance(text, str) and text:
                        texts.append(text)
                    reason = (<dict>choice).get("finish_reason")
                    if reason is not None:
                        self._finish_reason = reason
            usage = frame.get("usage")
            if isinstance(usage, dict):
                self._usage = usage
            return None
        text = frame.get("content")
        if isinstance(text, str) and text:
            texts.append(text)
        if frame.get("stop") is True:
            return self._llamacpp_end(frame)
        return None

    cdef dict _llamacpp_end(self, dict obj):
        cdef object timings = obj.get("timings")
        if not isinstance(timings, dict):
            timings = {}
        return {
            "kind": "end",
            # None is replaced by the count relayed, in feed().
            "tokens_predicted": obj.get("tokens_predicted"),
            "tokens_evaluated": obj.get("tokens_evaluated"),
            "predicted_ms": (<dict>timings).get("predicted_ms"),
            "prompt_ms": (<dict>timings).get("prompt_ms"),
            "stop_type": obj.get("stop_type"),
            "cached_tokens": _llamacpp_cached(obj, <dict>timings),
        }

    cdef dict _openai_end(self):
        cdef object usage = self._usage if isinstance(self._usage, dict) else {}
        cdef object details = (<dict>usage).get("prompt_tokens_details")
        cdef object cached = (<dict>details).get("cached_tokens") if isinstance(details, dict) else None
        return {
            "kind": "end",
            "finish_reason": self._finish_reason,
            "tokens_predicted": (<dict>usage).get("completion_tokens"),
            "tokens_evaluated": (<dict>usage).get("prompt_tokens"),
            "cached_tokens": cached if type(cached) is int and cached >= 0 else None,
        }


cdef object _llamacpp_cached(dict obj, dict timings):
    """Prompt tokens the engine did not evaluate again: ``timings.cache_n`` (llama-server since
    late 2025), else the prompt's tokens minus those evaluated (``timings.prompt_n``)."""
    cdef object cached = timings.get("cache_n")
    if type(cached) is int and cached >= 0:
        return cached
    cdef object evaluated = obj.get("tokens_evaluated")
    cdef object prompt_n = timings.get("prompt_n")
    if type(evaluated) is int and type(prompt_n) is int and evaluated >= prompt_n >= 0:
        return evaluated - prompt_n
    return None
