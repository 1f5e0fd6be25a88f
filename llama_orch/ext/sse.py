"""SSE codec and token relay selector: the compiled ``_sse_c`` when available, else the twin.

``LLAMA_ORCH_NO_EXTENSIONS=1`` forces the pure-Python twin (``_sse_py``, which is
also the specification).  ``IMPLEMENTATION`` says which one was loaded.
"""

from __future__ import annotations

import os

__all__ = ["DIALECTS", "IMPLEMENTATION", "SSEParser", "TokenRelay", "frame_event", "frame_events"]

IMPLEMENTATION: str

if os.environ.get("LLAMA_ORCH_NO_EXTENSIONS") == "1":
    from ._sse_py import DIALECTS, SSEParser, TokenRelay, frame_event, frame_events

    IMPLEMENTATION = "py"
else:
    try:
        from ._sse_c import DIALECTS, SSEParser, TokenRelay, frame_event, frame_events
    except ImportError:
        from ._sse_py import DIALECTS, SSEParser, TokenRelay, frame_event, frame_events

        IMPLEMENTATION = "py"
    else:
        IMPLEMENTATION = "c"
