"""Type stub: the compiled ``_sse_c`` has exactly the API of its twin ``_sse_py``."""

from ._sse_py import DIALECTS as DIALECTS
from ._sse_py import SSEParser as SSEParser
from ._sse_py import TokenRelay as TokenRelay
from ._sse_py import frame_event as frame_event
from ._sse_py import frame_events as frame_events

__all__ = ["DIALECTS", "SSEParser", "TokenRelay", "frame_event", "frame_events"]
