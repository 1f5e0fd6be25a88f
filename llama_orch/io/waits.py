"""Waiting with a time limit, without ever losing a cancel.

On Python 3.11, ``asyncio.wait_for`` returns the inner result when the inner awaitable finishes
in the same loop iteration in which the waiting task is canceled: the cancel is swallowed
(CPython gh-86296, fixed in 3.12). A timer loop that waits on an ``Event`` with ``wait_for`` and
is woken often (every health probe wakes pool-managerd's) then survives its ``cancel()``, and the
shutdown that awaits it hangs for ever. ``asyncio.timeout`` has no inner waiter to race with, so
every wait with a limit in the daemons goes through ``within``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


async def within(awaitable: Awaitable[object], timeout_s: float | None) -> bool:
    """Await ``awaitable`` for at most ``timeout_s`` (None: no limit); True if it finished in time.

    On timeout the awaitable is canceled, as with ``wait_for``; a cancel of the caller always
    propagates.
    """
    try:
        async with asyncio.timeout(timeout_s) as scope:
            await awaitable
    except TimeoutError:
        if scope.expired():
            return False
        raise  # the awaitable's own TimeoutError, not our limit
    return True
