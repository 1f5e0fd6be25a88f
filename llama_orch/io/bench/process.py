"""What every process the bench starts does the same way: run on uvloop where it can be imported
(as the daemons do), and announce itself with one ``READY <url>`` line, then serve until SIGTERM
or SIGINT."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any


def run(main: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def announce_until_signalled(url: str) -> None:
    """Print ``READY <url>`` (the parent reads it), then wait for SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {url}", flush=True)
    await stop.wait()
