"""The package's shape: no import cycle anywhere, and each daemon's wing under ``llama_orch.io``
imports only ``core``, ``ext``, the shared ``io`` modules and itself.

Two graphs are checked. The static one is read from the source (every ``import`` statement,
those inside functions and under ``TYPE_CHECKING`` included: a lazy import is a dependency
too). The runtime one is recorded while every module is imported first, each into a package
state of its own (the ``llama_orch`` modules loaded before are forgotten), in a fresh
interpreter: a cycle that only bites when one particular module is imported first shows up
there as an ``ImportError``. ``core`` purity and the ext/core/sim directions are
``tests/core/test_purity.py``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llama_orch"
IO = "llama_orch.io"
COMPOSERS = {"llama_orch.io.local_cluster"}  # starts all three daemons: may use every wing


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()
WINGS = sorted(name.rsplit(".", 1)[1] for name, path in MODULES.items()
               if name.count(".") == 2 and name.startswith(IO + ".") and path.name == "__init__.py")
SHARED = {name for name, path in MODULES.items()
          if name.count(".") == 2 and name.startswith(IO + ".") and path.name != "__init__.py"} - COMPOSERS


def wing_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["llama_orch", "io"] and parts[2] in WINGS else None


def static_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, from every import statement in its source."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level:
                    base = base[: len(base) - node.level + 1]
                else:
                    base = []
                module = ".".join(base + (node.module.split(".") if node.module else []))
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
                targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in MODULES:  # ``import a.b.c`` where c is a name
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def allowed(importer: str, imported: str) -> bool:
    """The wing rule: a wing module imports core, ext, the shared io modules, the package root
    and its own wing; shared io modules import no wing and no composer."""
    wing = wing_of(importer)
    if wing is not None:
        return (imported in ("llama_orch", IO) or imported.startswith(("llama_orch.core", "llama_orch.ext"))
                or imported in SHARED or wing_of(imported) == wing)
    if importer in SHARED or importer == IO:
        return wing_of(imported) is None and imported not in COMPOSERS
    return True


def violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if not allowed(a, b))


# -- the checks themselves ----------------------------------------------------------------------


def test_the_three_daemons_the_load_bench_and_the_lab_have_a_wing_each():
    assert WINGS == ["bench", "lab", "orchestratord", "pool_managerd", "provisioner"]
    for wing in WINGS:
        doc = ast.get_docstring(ast.parse((PACKAGE / "io" / wing / "__init__.py").read_text()))
        assert doc and "owns" in doc and "talks to" in doc, f"{wing}/__init__.py must say what it owns and talks to"


def test_no_import_cycle_in_the_source():
    assert cycles(static_graph()) == []


def test_wings_import_only_core_ext_and_the_shared_modules_in_the_source():
    assert violations(static_graph()) == []


_RECORDER = r"""
import builtins, importlib, importlib.util, json, sys, traceback
names = json.loads(sys.argv[1])
edges, failures = {}, {}
real_import = builtins.__import__

def record(importer, target):
    if target.startswith("llama_orch") and target != importer:
        edges.setdefault(importer, set()).add(target)

def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    module = real_import(name, globals, locals, fromlist, level)
    importer = (globals or {}).get("__name__", "")
    if importer.startswith("llama_orch"):
        package = globals.get("__package__") or importer
        target = importlib.util.resolve_name("." * level + name, package) if level else name
        for sub in fromlist or ():
            if f"{target}.{sub}" in sys.modules:
                record(importer, f"{target}.{sub}")
                break
        else:
            record(importer, target)
    return module

builtins.__import__ = recording_import
for name in names:
    # Forget every package module but the compiled ext ones (an extension cannot be loaded twice),
    # so this module is imported first, as a daemon importing it would.
    for loaded in [m for m in sys.modules if m.startswith("llama_orch") and not m.startswith("llama_orch.ext")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps({"edges": {k: sorted(v) for k, v in edges.items()}, "failures": failures}))
"""


@pytest.fixture(scope="module")
def runtime():
    names = [name for name in MODULES if not name.endswith(".__main__")]  # __main__ runs a daemon
    out = subprocess.run([sys.executable, "-c", _RECORDER, json.dumps(names)], cwd=ROOT, capture_output=True,
                         text=True, timeout=240, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    graph = {name: set(targets) for name, targets in result["edges"].items()}
    return graph, result["failures"]


def test_every_module_imports_first_in_a_fresh_interpreter(runtime):
    _, failures = runtime
    assert failures == {}, "\n".join(f"{name}:\n{trace}" for name, trace in failures.items())


def test_no_import_cycle_at_runtime(runtime):
    graph, _ = runtime
    assert graph, "the recorder saw no import at all"
    assert cycles(graph) == []


def test_wings_import_only_core_ext_and_the_shared_modules_at_runtime(runtime):
    graph, _ = runtime
    assert violations(graph) == []
    # the recorder sees real edges: the app imports its driver, the manager the shared http module
    assert "llama_orch.io.orchestratord.driver" in graph["llama_orch.io.orchestratord.app"]
    assert "llama_orch.io.http" in graph["llama_orch.io.pool_managerd.manager"]


# -- the checker catches what it must (it would pass vacuously otherwise) -----------------------


def test_the_checks_catch_a_cycle_and_a_cross_wing_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"], ["e"]]
    crossing = {"llama_orch.io.orchestratord.app": {"llama_orch.io.pool_managerd.manager",
                                                     "llama_orch.io.local_cluster", "llama_orch.sim.simulator",
                                                     "llama_orch.io.http", "llama_orch.core.types",
                                                     "llama_orch.io.orchestratord.driver"},
                "llama_orch.io.http": {"llama_orch.io.provisioner.supervisor"},
                "llama_orch.io.local_cluster": {"llama_orch.io.provisioner.engine_build"}}
    assert violations(crossing) == [
        "llama_orch.io.http -> llama_orch.io.provisioner.supervisor",
        "llama_orch.io.orchestratord.app -> llama_orch.io.local_cluster",
        "llama_orch.io.orchestratord.app -> llama_orch.io.pool_managerd.manager",
        "llama_orch.io.orchestratord.app -> llama_orch.sim.simulator",
    ]


def test_the_static_graph_reads_relative_lazy_and_type_checking_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "llama_orch"
    for rel, text in {
        "__init__.py": "",
        "io/__init__.py": "",
        "io/http.py": "",
        "io/orchestratord/__init__.py": "",
        "io/orchestratord/app.py": "from ..http import x\nfrom . import driver\n",
        "io/orchestratord/driver.py": "def f():\n    from ..pool_managerd.manager import y\n",
        "io/pool_managerd/__init__.py": "",
        "io/pool_managerd/manager.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                       "    from llama_orch.io.orchestratord import app\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", _modules())
    graph = static_graph()
    assert graph["llama_orch.io.orchestratord.app"] == {"llama_orch.io.http", "llama_orch.io.orchestratord.driver"}
    assert graph["llama_orch.io.orchestratord.driver"] == {"llama_orch.io.pool_managerd.manager"}
    assert graph["llama_orch.io.pool_managerd.manager"] == {"llama_orch.io.orchestratord.app"}
    assert cycles(graph) == [["llama_orch.io.orchestratord.app", "llama_orch.io.orchestratord.driver",
                              "llama_orch.io.pool_managerd.manager"]]


# -- how operators start the daemons -------------------------------------------------------------


@pytest.mark.parametrize("wing, prog", [("orchestratord", "orchestratord"), ("pool_managerd", "pool-managerd"),
                                        ("provisioner", "engine-provisioner")])
def test_python_dash_m_runs_each_daemon(wing, prog):
    out = subprocess.run([sys.executable, "-m", f"llama_orch.io.{wing}", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"usage: {prog}")


def test_console_scripts_point_at_the_daemons_mains():
    scripts = {ep.name: ep for ep in metadata.entry_points(group="console_scripts")
               if ep.value.startswith("llama_orch")}
    assert set(scripts) == {"llama-orch", "orchestratord", "pool-managerd", "engine-provisioner"}
    for ep in scripts.values():
        assert callable(ep.load()), ep.value
    assert scripts["orchestratord"].value == "llama_orch.io.orchestratord.app:main"
