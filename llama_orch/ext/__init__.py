"""Hot data structures and wire codecs of llama-orch.

This package owns the few pieces of code that run once per request or once per
token: the admission queue (:mod:`llama_orch.ext.queue`) and the server-sent-events
codec plus the token relay (:mod:`llama_orch.ext.sse`).  Each unit comes as a
pure-Python twin (``_<unit>_py``, the specification) and an optional Cython
build (``_<unit>_c``) with the same API and behaviour; the selector module
``<unit>`` picks the compiled one unless ``LLAMA_ORCH_NO_EXTENSIONS=1`` is set
or it was not built, and says which in ``IMPLEMENTATION``.

Nothing here imports the rest of ``llama_orch``: the package sits at the bottom
of the dependency graph, so the compiled modules never drag in application code.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["UNITS", "implementations"]

#: The units that have a pure-Python twin and an optional compiled module.
UNITS = ("queue", "sse")


def implementations(unit: str) -> dict[str, ModuleType]:
    """Return every importable implementation of *unit*.

    The result maps ``"py"`` to the pure-Python twin and, when the extension was
    built and imports, ``"c"`` to the compiled module.  ``LLAMA_ORCH_NO_EXTENSIONS``
    is deliberately not consulted: this is for tests and benchmarks that want to
    compare both, while the selector modules are what applications use.
    """
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; expected one of {', '.join(map(repr, UNITS))}")
    found = {"py": importlib.import_module(f"{__name__}._{unit}_py")}
    try:
        found["c"] = importlib.import_module(f"{__name__}._{unit}_c")
    except ImportError:
        pass
    return found
