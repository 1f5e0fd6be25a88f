"""What every process the bench starts does the same way: run on uvloop where it can be imported
(as the daemons do). Each announces itself with ``daemon.announce_until_signalled``."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run(main: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)

