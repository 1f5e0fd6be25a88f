"""Fixtures that run every ``llama_orch.ext`` test against each implementation.

``py`` is the pure-Python twin (the specification); ``c`` is the Cython build and is
skipped, with the reason shown by ``-ra``, when it has not been compiled.
"""

from __future__ import annotations

from types import ModuleType

import pytest

from llama_orch.ext import implementations

_NOT_BUILT = (
    "compiled llama_orch.ext._{unit}_c is not importable "
    "(build it with: python setup.py build_ext --inplace)"
)


def _impl(unit: str, name: str) -> ModuleType:
    found = implementations(unit)
    if name not in found:
        pytest.skip(_NOT_BUILT.format(unit=unit))
    return found[name]


def _both(unit: str) -> dict[str, ModuleType]:
    found = implementations(unit)
    if "c" not in found:
        pytest.skip(_NOT_BUILT.format(unit=unit))
    return found


@pytest.fixture(scope="session", params=["py", "c"])
def queue_impl(request: pytest.FixtureRequest) -> ModuleType:
    """``_queue_py`` or ``_queue_c``."""
    return _impl("queue", request.param)


@pytest.fixture(scope="session", params=["py", "c"])
def sse_impl(request: pytest.FixtureRequest) -> ModuleType:
    """``_sse_py`` or ``_sse_c``."""
    return _impl("sse", request.param)


@pytest.fixture(scope="session")
def queue_impls() -> dict[str, ModuleType]:
    """Both queue implementations, for differential tests."""
    return _both("queue")


@pytest.fixture(scope="session")
def sse_impls() -> dict[str, ModuleType]:
    """Both SSE implementations, for differential tests."""
    return _both("sse")
