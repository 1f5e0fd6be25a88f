"""The engine build: cache keys, a cached binary reused, a failed step named with its log."""

import pytest

from llama_orch.io.provisioner.engine_build import (
    BuildError,
    BuildSpec,
    cached_binary,
    default_spec,
    ensure_llama_server,
)


def test_cache_keys_name_the_source_and_the_flags():
    cpu, cuda = BuildSpec(), BuildSpec(cuda=True)
    assert cpu.key.startswith("lcp-0.3.36-cpu-") and cuda.key.startswith("lcp-0.3.36-cuda-")
    assert cpu.key != BuildSpec(extra_flags=("-DGGML_AVX2=OFF",)).key
    assert BuildSpec(git_url="https://example.invalid/llama.cpp", version="b1234").key.startswith("git-b1234-cpu-")
    assert "-DGGML_CUDA=ON" in cuda.flags and "-DGGML_CUDA=ON" not in cpu.flags


def test_no_gpu_mask_means_a_cpu_build(monkeypatch):
    monkeypatch.delenv("ENGINE_PROVISIONER_LLAMA_CPP_GIT", raising=False)
    assert default_spec("").cuda is False


async def test_a_cached_binary_is_reused_without_building(tmp_path):
    spec = BuildSpec(version="0.0.0-test")
    home = tmp_path / "engines" / spec.key
    home.mkdir(parents=True)
    binary = home / "llama-server"
    binary.write_text("#!/bin/sh\necho version: 1\n")
    binary.chmod(0o755)
    reports = []
    assert cached_binary(tmp_path, spec) == binary
    assert await ensure_llama_server(tmp_path, spec, report=reports.append) == binary and reports == []


async def test_a_failed_step_names_the_step_and_the_log(tmp_path):
    spec = BuildSpec(git_url=str(tmp_path / "no-such-repo"), version="main")
    reports = []
    with pytest.raises(BuildError) as err:
        await ensure_llama_server(tmp_path / "cache", spec, report=reports.append)
    assert err.value.step == "obtain source" and "step 'obtain source'" in str(err.value)
    log = err.value.log_path
    assert str(log) in str(err.value) and log.is_file() and "git clone" in log.read_text()
    assert reports and reports[0].startswith("obtain source")
    assert cached_binary(tmp_path / "cache", spec) is None
    # no half-built tree left behind
    assert not [p for p in log.parent.iterdir() if p.name.startswith("llama-build-")]


async def test_a_canceled_step_stops_the_processes_it_started(tmp_path):
    # Shutdown during a build must not leave compilers running: the step's whole group goes.
    import asyncio

    from support import eventually

    from llama_orch.io.provisioner.engine_build import _Builder
    from llama_orch.io.provisioner.supervisor import pid_alive

    pidfile = tmp_path / "grandchild.pid"
    builder = _Builder(BuildSpec(), tmp_path, tmp_path / "build.log", lambda _: None, 1)
    step = asyncio.ensure_future(builder._step("compile", ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]))

    async def started():
        return pidfile.is_file() and pidfile.read_text().strip()
    grandchild = int(await eventually(started, timeout=10, what="the step's child process"))
    assert pid_alive(grandchild)
    step.cancel()
    with pytest.raises(asyncio.CancelledError):
        await step

    async def gone():
        return not pid_alive(grandchild)
    await eventually(gone, timeout=5, what="the step's grandchild to be killed with it")
