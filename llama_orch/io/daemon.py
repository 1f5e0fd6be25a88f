"""What every daemon does: logging in one format, uvloop as the event loop, background tasks.

JSON logs with correlation ids (roadmap) will replace the format here, in one place.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Coroutine


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


#: Collector thresholds for a daemon under load: young collections less often (each is cheap
#: with few survivors), and the full collection, whose pause grows with the whole heap, rarer still.
GC_THRESHOLDS = (50_000, 20, 100)


def settle_gc() -> None:
    """Once started: collect, then move everything alive (modules, the app, its registries) to the
    permanent generation, so no later collection walks it again, and raise the thresholds. The
    hot paths make no reference cycles, so what is left to collect under load is small."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
