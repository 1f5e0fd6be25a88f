"""Obtaining a ``llama-server`` binary: build it from source once, then reuse it from the cache.

Sources, in order: a git URL when one is configured (production: ``--llama-cpp-git`` /
``ENGINE_PROVISIONER_LLAMA_CPP_GIT`` with a ref), else the pinned ``llama-cpp-python`` sdist
from the package index, fetched with pip, whose ``vendor/llama.cpp`` holds the full tree. Only
the ``llama-server`` target is built, with cmake, CUDA on when ``nvcc`` is present and the GPU
mask is not empty. The binary is cached under ``<cache>/engines/<key>/`` where the key names
the source version and a digest of the build flags, so a second provisioner (or a second CI
run) finds it. Steps are reported as progress; the whole build log is kept next to the
binary; a failure names the step and the log path. A file lock keeps two concurrent builds of
the same key from racing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
BASE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
)

Report = Callable[[str], None]


class BuildError(Exception):
    def __init__(self, step: str, log_path: Path, detail: str) -> None:
        super().__init__(f"llama-server build failed at step '{step}': {detail} (full log: {log_path})")
        self.step = step
        self.log_path = log_path


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildSpec:
    version: str = LLAMA_CPP_PYTHON_VERSION  # llama-cpp-python version, or the git ref
    git_url: str | None = None
    cuda: bool = False
    extra_flags: tuple[str, ...] = field(default=())

    @property
    def flags(self) -> tuple[str, ...]:
        return BASE_FLAGS + (("-DGGML_CUDA=ON",) if self.cuda else ()) + self.extra_flags

    @property
    def key(self) -> str:
        origin = f"git-{re.sub(r'[^A-Za-z0-9._-]', '_', self.version)}" if self.git_url else f"lcp-{self.version}"
        digest = hashlib.sha256("\n".join((self.git_url or "",) + self.flags).encode()).hexdigest()[:10]
        return f"{origin}-{'cuda' if self.cuda else 'cpu'}-{digest}"


def default_spec(gpu_mask: str = "") -> BuildSpec:
    """CUDA when nvcc is on PATH and GPUs were asked for; a git source when one is configured."""
    git_url = os.environ.get("ENGINE_PROVISIONER_LLAMA_CPP_GIT") or None
    version = os.environ.get("ENGINE_PROVISIONER_LLAMA_CPP_REF", "master" if git_url else LLAMA_CPP_PYTHON_VERSION)
    return BuildSpec(version=version, git_url=git_url, cuda=bool(gpu_mask.strip()) and shutil.which("nvcc") is not None)


def stderr_report(message: str) -> None:
    print(f"engine-build: {message}", file=sys.stderr, flush=True)


def cached_binary(cache_dir: str | os.PathLike[str], spec: BuildSpec) -> Path | None:
    path = Path(cache_dir) / "engines" / spec.key / "llama-server"
    return path if path.is_file() and os.access(path, os.X_OK) else None


async def ensure_llama_server(cache_dir: str | os.PathLike[str], spec: BuildSpec | None = None, *,
                              report: Report = stderr_report, jobs: int | None = None) -> Path:
    """Return the cached ``llama-server`` for ``spec``, building it first if needed."""
    spec = spec or default_spec()
    home = Path(cache_dir) / "engines" / spec.key
    home.mkdir(parents=True, exist_ok=True)
    found = cached_binary(cache_dir, spec)
    if found:
        return found
    with (home / ".lock").open("w") as lock:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        found = cached_binary(cache_dir, spec)  # another process may have built it meanwhile
        if found:
            return found
        log_path = home / "build.log"
        with tempfile.TemporaryDirectory(prefix="llama-build-", dir=home) as work:
            builder = _Builder(spec, Path(work), log_path, report, jobs or os.cpu_count() or 2)
            binary = await builder.run()
            tmp = home / "llama-server.tmp"
            shutil.copy2(binary, tmp)
            os.replace(tmp, home / "llama-server")
        report(f"built {home / 'llama-server'} (log: {log_path})")
        return home / "llama-server"


class _Builder:
    def __init__(self, spec: BuildSpec, work: Path, log_path: Path, report: Report, jobs: int) -> None:
        self.spec = spec
        self.work = work
        self.log_path = log_path
        self.report = report
        self.jobs = jobs

    async def run(self) -> Path:
        self.log_path.write_text(f"# llama-server build, key {self.spec.key}\n")
        source = await self._obtain()
        build = self.work / "build"
        await self._step("configure", ["cmake", "-S", str(source), "-B", str(build), *self.spec.flags])
        await self._step("build", ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(self.jobs)],
                         progress=True)
        binary = build / "bin" / "llama-server"
        if not binary.is_file():
            raise BuildError("build", self.log_path, f"no binary at {binary}")
        return binary

    async def _obtain(self) -> Path:
        if self.spec.git_url:
            dest = self.work / "llama.cpp"
            await self._step("obtain source", ["git", "clone", "--depth", "1", "--branch", self.spec.version,
                                               self.spec.git_url, str(dest)])
            return dest
        sdist_dir = self.work / "sdist"
        await self._step("obtain source", [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                                           ":all:", f"llama-cpp-python=={self.spec.version}", "-d", str(sdist_dir)])
        archives = list(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
        if not archives:
            raise BuildError("obtain source", self.log_path, "pip downloaded no llama-cpp-python sdist")
        self.report("unpacking the llama.cpp source")
        await asyncio.to_thread(_extract, archives[0], self.work / "src")
        roots = list((self.work / "src").glob("llama_cpp_python-*/vendor/llama.cpp"))
        if not roots or not (roots[0] / "CMakeLists.txt").is_file():
            raise BuildError("obtain source", self.log_path, "the sdist has no vendor/llama.cpp tree")
        return roots[0]

    async def _step(self, name: str, argv: list[str], *, progress: bool = False) -> None:
        if shutil.which(argv[0]) is None and not os.path.isabs(argv[0]):
            raise BuildError(name, self.log_path, f"{argv[0]} is not installed")
        self.report(f"{name}: {' '.join(argv[:4])} ...")
        with self.log_path.open("a") as log:
            log.write(f"\n# step {name}: {' '.join(argv)}\n")
            log.flush()
            # a session of its own, so that stopping a step stops the compilers it started as well
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            shown = -1
            assert proc.stdout is not None
            try:
                async for raw in proc.stdout:
                    line = raw.decode(errors="replace")
                    log.write(line)
                    match = re.match(r"\[\s*(\d+)%\]", line) if progress else None
                    if match and int(match.group(1)) >= shown + 5:
                        shown = int(match.group(1))
                        self.report(f"{name}: {shown}%")
                rc = await proc.wait()
            except BaseException:  # canceled (shutdown) or failed: the step's child must not outlive it
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await asyncio.shield(proc.wait())
                raise
        if rc != 0:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise BuildError(name, self.log_path, f"exit status {rc}: {' | '.join(tail)}")


def _extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
