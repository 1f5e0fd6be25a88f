"""What every daemon's ``main`` does first: logging in one format, and uvloop as the event loop.

JSON logs with correlation ids (roadmap) will replace the format here, in one place.
"""

from __future__ import annotations

import logging


def prepare(prog: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {prog} %(levelname)s %(message)s")
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; without it the default loop still works
        return
    uvloop.install()
