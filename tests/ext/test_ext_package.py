"""The selector modules, ``implementations()`` and the package's import isolation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llama_orch
from llama_orch import ext
from llama_orch.ext import implementations

REPO_ROOT = Path(llama_orch.__file__).resolve().parent.parent
PUBLIC = {
    "queue": ["AdmissionQueue"],
    "sse": ["DIALECTS", "SSEParser", "TokenRelay", "frame_event", "frame_events"],
}


def run_python(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "LLAMA_ORCH_NO_EXTENSIONS"}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environ.get("PYTHONPATH")]))
    environ.update(env)
    done = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


SELECTED = """
import json
import llama_orch.ext.queue as q, llama_orch.ext.sse as s
print(json.dumps([q.IMPLEMENTATION, q.AdmissionQueue.__module__, s.IMPLEMENTATION, s.SSEParser.__module__]))
"""


def test_no_extensions_env_selects_twins():
    got = json.loads(run_python(SELECTED, LLAMA_ORCH_NO_EXTENSIONS="1"))
    assert got == ["py", "llama_orch.ext._queue_py", "py", "llama_orch.ext._sse_py"]


def test_selectors_prefer_compiled_modules():
    got = json.loads(run_python(SELECTED))
    for unit, (implementation, module) in zip(("queue", "sse"), (got[:2], got[2:])):
        expected = "c" if "c" in implementations(unit) else "py"
        assert implementation == expected
        assert module == f"llama_orch.ext._{unit}_{expected}"


def test_importing_ext_loads_nothing_else_from_llama_orch():
    code = (
        "import sys, json, llama_orch.ext.queue, llama_orch.ext.sse;"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('llama_orch'))))"
    )
    for env in ({}, {"LLAMA_ORCH_NO_EXTENSIONS": "1"}):
        loaded = json.loads(run_python(code, **env))
        strays = [m for m in loaded if m != "llama_orch" and not m.startswith("llama_orch.ext")]
        assert strays == [], env


@pytest.mark.parametrize("unit", ["queue", "sse"])
def test_selector_exposes_the_public_api(unit):
    selector = __import__(f"llama_orch.ext.{unit}", fromlist=["IMPLEMENTATION"])
    assert selector.IMPLEMENTATION in ("c", "py")
    chosen = implementations(unit)[selector.IMPLEMENTATION]
    for name in PUBLIC[unit]:
        assert getattr(selector, name) is getattr(chosen, name)
    assert sorted(selector.__all__) == sorted(["IMPLEMENTATION", *PUBLIC[unit]])


@pytest.mark.parametrize("unit", ["queue", "sse"])
def test_twins_share_the_public_api(unit):
    impls = implementations(unit)
    for mod in impls.values():
        assert sorted(mod.__all__) == sorted(PUBLIC[unit])
        assert mod.__doc__
    if "c" in impls:
        for name in PUBLIC[unit]:
            py, c = getattr(impls["py"], name), getattr(impls["c"], name)
            if isinstance(py, type):
                public = {a for a in dir(py) if not a.startswith("_")}
                assert public == {a for a in dir(c) if not a.startswith("_")}, name


def test_implementations():
    assert ext.UNITS == ("queue", "sse")
    found = implementations("queue")
    assert found["py"].__name__ == "llama_orch.ext._queue_py"
    assert set(found) <= {"py", "c"}
    with pytest.raises(ValueError, match="unknown unit"):
        implementations("nope")
