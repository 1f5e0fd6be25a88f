"""What every daemon does: logging in one format, uvloop as the event loop, background tasks;
the ``READY`` line and signal wait of processes a parent starts and waits on (the bench's, the
lab's); and what supervisors of daemons read when one fails: the tail of its log.

JSON logs with correlation ids (roadmap) will replace the format here, in one place.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections import deque
from collections.abc import Coroutine
from pathlib import Path


def prepare(prog: str) -> None:
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
