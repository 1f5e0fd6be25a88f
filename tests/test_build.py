"""A failed compile leaves a working pure install, with one clear message."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_failed_compile_falls_back_to_the_pure_twins(tmp_path):
    shutil.copytree(ROOT / "llama_orch", tmp_path / "llama_orch",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    env = dict(os.environ, CC="false", LDSHARED="false")
    env.pop("LLAMA_ORCH_NO_EXTENSIONS", None)
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    assert "could not compile" in build.stderr and "pure-Python twins will be used" in build.stderr
    assert not list((tmp_path / "llama_orch" / "ext").glob("*.so"))
    probe = subprocess.run(
        [sys.executable, "-c", "import llama_orch.ext.queue as q, llama_orch.ext.sse as s;"
                               "print(q.IMPLEMENTATION, s.IMPLEMENTATION);"
                               "x = q.AdmissionQueue(2, 2); x.push('a', 1); print(x.pop())"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["py", "py", "a"]
