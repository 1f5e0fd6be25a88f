"""Admission queue selector: the compiled ``_queue_c`` when available, else the twin.

``LLAMA_ORCH_NO_EXTENSIONS=1`` forces the pure-Python twin (``_queue_py``, which is
also the specification).  ``IMPLEMENTATION`` says which one was loaded.
"""

from __future__ import annotations

import os

__all__ = ["IMPLEMENTATION", "AdmissionQueue"]

IMPLEMENTATION: str

if os.environ.get("LLAMA_ORCH_NO_EXTENSIONS") == "1":
    from ._queue_py import AdmissionQueue

    IMPLEMENTATION = "py"
else:
    try:
        from ._queue_c import AdmissionQueue
    except ImportError:
        from ._queue_py import AdmissionQueue

        IMPLEMENTATION = "py"
    else:
        IMPLEMENTATION = "c"
