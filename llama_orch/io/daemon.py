"""What every daemon does: logging in one of two formats, uvloop as the event loop, background
tasks; the ``READY`` line and signal wait of processes a parent starts and waits on (the bench's,
the lab's); and what supervisors of daemons read when one fails: the tail of its log.

Logs are human text by default, or JSON lines with ``LOG_FORMAT=json`` (one object per line:
``ts``, ``level``, ``daemon``, ``logger``, ``msg``, and the record's context: ``correlation_id``
(of the request being served, from ``CORRELATION``), and whatever the call site passed in
``extra``: ``task_id``, ``pool_id``, ``replica_id``, ``outcome``, timings in ``*_ms``; with tracing
on, the trace and span ids of the span current where the line is written: a request's server span,
an engine call's ``forward_to_engine``, or the client's own ids while orchestratord admits; a
task's end line names its task's trace). A log aggregator filters on those fields instead of
parsing text.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path

import orjson

#: The correlation id of the request being handled (set by ``http.correlation``), for every log
#: line written while handling it.
CORRELATION: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)
LOG_FORMATS = ("text", "json")
#: The attributes every ``LogRecord`` has: anything else on a record came from ``extra``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
#: Set by ``io.tracing`` when tracing is on: the current (trace id, span id) in hex, or None.
trace_ids: Callable[[], tuple[str, str] | None] = lambda: None


class JsonFormatter(logging.Formatter):
    """One JSON object per record; the context fields of the record, never its arguments raw."""

    def __init__(self, daemon: str) -> None:
        super().__init__()
        self.daemon = daemon

    def format(self, record: logging.LogRecord) -> str:
        line: dict = {"ts": _iso(record.created), "level": record.levelname, "daemon": self.daemon,
                      "logger": record.name, "msg": record.getMessage()}
        correlation = CORRELATION.get()
        if correlation is not None:
            line["correlation_id"] = correlation
        ids = trace_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        for key, value in record.__dict__.items():  # the call site's fields win: it knows its task
            if key not in _RECORD_FIELDS:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def _iso(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def log_format(environ=None) -> str:
    """``LOG_FORMAT``: text (the default) or json; anything else is a ``ValueError`` naming it."""
    value = (os.environ if environ is None else environ).get("LOG_FORMAT", "text").strip().lower() or "text"
    if value not in LOG_FORMATS:
        raise ValueError(f"LOG_FORMAT={value!r}: expected text or json")
    return value


def prepare(prog: str) -> None:
    """Logging and the event loop of a daemon. A bad ``LOG_FORMAT`` exits with status 2, named."""
    try:
        fmt = log_format()
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if fmt == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter(prog))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
    else:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {prog} %(levelname)s %(message)s")
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; without it the default loop still works
        return
    uvloop.install()


def spawn(coro: Coroutine, tasks: set[asyncio.Task], log: logging.Logger) -> asyncio.Task:
    """Run ``coro`` in the background, held in ``tasks`` until it ends. A crash is logged when it
    happens, with its traceback: a dead watcher or timer loop must not go unnoticed until the
    task is garbage-collected (or for ever)."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    task.add_done_callback(lambda t: _report_crash(t, log))
    return task


def _report_crash(task: asyncio.Task, log: logging.Logger) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background task %s crashed", task.get_coro().__qualname__, exc_info=exc)


#: Collector thresholds for a daemon under load. Young collections stay small (a pause is the
#: objects walked: at most 2,000 young and 8,000 middle-aged ones, a few milliseconds); full
#: collections, whose pause grows with the whole heap (hundreds of milliseconds with 100k tasks
#: queued), are never started by allocation: the daemon runs them when idle (``FULL_COLLECTION_IDLE_S``).
GC_THRESHOLDS = (2_000, 4, 1 << 30)
#: A full collection is run once the daemon has had nothing in flight for this long, at most once
#: per ``FULL_COLLECTION_MIN_INTERVAL_S``.
FULL_COLLECTION_IDLE_S = 1.0
FULL_COLLECTION_MIN_INTERVAL_S = 60.0


def settle_gc() -> None:
    """Once started: collect, then move everything alive (modules, the app, its registries) to the
    permanent generation, so no later collection walks it again, and set ``GC_THRESHOLDS``. The hot
    paths make no reference cycles (tested), so garbage left for the idle-time full collections
    comes only from rare paths (errors with tracebacks)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a daemon's log, for the message that says it died."""
    try:
        with path.open("rb") as f:
            return b"".join(deque(f, maxlen=lines)).decode(errors="replace").rstrip()
    except OSError:
        return "(no log)"


async def announce_until_signalled(what: str) -> None:
    """Print ``READY <what>`` (the parent reads it), then wait for SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {what}", flush=True)
    await stop.wait()
