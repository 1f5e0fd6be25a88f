"""The core stays pure, and imports point one way: ext <- core <- (io, sim); sim never imports io."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORE = ROOT / "llama_orch" / "core"

FORBIDDEN = {
    "asyncio", "socket", "threading", "time", "logging", "subprocess", "os", "aiohttp", "uvloop",
    "selectors", "signal", "ssl", "http", "urllib", "datetime", "multiprocessing", "concurrent",
    "secrets", "uuid", "pathlib", "io", "shutil", "tempfile", "llama_orch.io",
}
GLOBAL_RANDOM = {"random", "randint", "randrange", "choice", "choices", "shuffle", "uniform", "seed",
                 "sample", "gauss", "getrandbits"}


def _core_files():
    return sorted(CORE.glob("*.py"))


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: p.name)
def test_core_module_imports_no_io(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module and node.module.startswith("io"):
            pytest.fail(f"{path.name}:{node.lineno} imports the io package")
        for name in names:
            top = name.split(".")[0]
            assert name not in FORBIDDEN and top not in FORBIDDEN, f"{path.name}:{node.lineno} imports {name}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            base = node.func.value
            if isinstance(base, ast.Name) and base.id == "random" and node.func.attr in GLOBAL_RANDOM:
                pytest.fail(f"{path.name}:{node.lineno} uses the global random generator")


def _modules_loaded_by(*imports: str) -> set[str]:
    code = (
        "import sys, json; before = set(sys.modules)\n"
        + "".join(f"import {m}\n" for m in imports)
        + "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    return set(json.loads(out.stdout))


def test_importing_the_core_loads_no_io_module():
    loaded = _modules_loaded_by(*(f"llama_orch.core.{p.stem}" for p in _core_files() if p.stem != "__init__"))
    bad = {m for m in loaded if m.split(".")[0] in FORBIDDEN or m.startswith("llama_orch.io")}
    assert not bad, f"importing llama_orch.core loaded {sorted(bad)}"


def test_simulator_never_imports_io():
    loaded = _modules_loaded_by("llama_orch.sim.simulator", "llama_orch.sim.report", "llama_orch.sim.traces")
    assert not [m for m in loaded if m.startswith("llama_orch.io")]
    assert "aiohttp" not in loaded and "asyncio" not in loaded


def test_ext_imports_nothing_from_the_package():
    loaded = _modules_loaded_by("llama_orch.ext.queue", "llama_orch.ext.sse")
    ours = {m for m in loaded if m.startswith("llama_orch")}
    assert ours <= {"llama_orch"} | {m for m in ours if m.startswith("llama_orch.ext")}
