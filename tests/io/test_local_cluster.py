"""``io.local_cluster`` and the ``llama-orch status`` table, without starting a cluster."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from support import eventually

from llama_orch.cli import format_pools
from llama_orch.core.errors import UsageError
from llama_orch.io.local_cluster import Child, ClusterConfig, ClusterError, LocalCluster, choose_ports, pool_config


def test_pool_config_names_pools_and_picks_the_provisioner_mode():
    assert pool_config(ClusterConfig(pools=3, engine="mock", slots=4, ctx=1024)) == {"pools": [
        {"pool_id": f"pool-{i}", "mode": "mock", "slots": 4, "ctx": 1024} for i in range(3)]}
    assert {p["mode"] for p in pool_config(ClusterConfig(pools=2))["pools"]} == {"source"}


@pytest.mark.parametrize("kw, message", [
    ({"pools": 0}, "--pools must be >= 1"),
    ({"engine": "vllm"}, "--engine must be one of"),
    ({"slots": 0}, "--slots must be >= 1"),
    ({"ctx": 10}, "--ctx must be >= 64"),
    ({"port": -1}, "--port must be a port number"),
])
def test_config_refuses_bad_values_naming_the_flag(kw, message):
    with pytest.raises(UsageError, match=message):
        ClusterConfig(**kw)


def test_ports_zero_picks_distinct_free_ports_and_a_busy_one_names_its_flag():
    ports = choose_ports(ClusterConfig(port=0, pool_managerd_port=0, provisioner_port=0))
    assert set(ports) == {"--port", "--pool-managerd-port", "--provisioner-port"} and len(set(ports.values())) == 3
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        with pytest.raises(UsageError, match=rf"port {busy} .* in use \(pool-managerd\).*--pool-managerd-port"):
            choose_ports(ClusterConfig(port=0, pool_managerd_port=busy, provisioner_port=0))
    with pytest.raises(UsageError, match="--port and --provisioner-port are both"):
        choose_ports(ClusterConfig(port=9999, pool_managerd_port=0, provisioner_port=9999))


def test_a_dead_child_is_reported_with_its_status_and_log_tail(tmp_path):
    cluster = LocalCluster(ClusterConfig(state_dir=tmp_path))
    log = tmp_path / "x.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", "print('cannot listen on 127.0.0.1:9200'); raise SystemExit(2)"],
                                stdout=f, stderr=subprocess.STDOUT)
    proc.wait()
    cluster.children.append(Child(name="pool-managerd", argv=[], env={}, log_path=log, url="", proc=proc))
    with pytest.raises(ClusterError, match=r"(?s)pool-managerd exited with status 2.*cannot listen on 127.0.0.1:9200"):
        cluster.check_children()


async def test_prepare_writes_the_state_dir_and_clears_stale_handoffs(tmp_path):
    state = tmp_path / "state"
    (state / "engines").mkdir(parents=True)
    (state / "engines" / "pool-0-r0.json").write_text("{}")  # left by a killed run
    tiny = Path(tmp_path / "cache" / "models" / "tiny.gguf")
    cluster = LocalCluster(ClusterConfig(engine="mock", pools=2, state_dir=state, cache_dir=tmp_path / "cache",
                                         port=0, pool_managerd_port=0, provisioner_port=0))
    await cluster.prepare()
    try:
        assert not list((state / "engines").glob("*.json")) and (state / "logs").is_dir()
        assert tiny.exists() and cluster.model_ref == f"file:{tiny}"
        second = LocalCluster(ClusterConfig(engine="mock", state_dir=state, port=0, pool_managerd_port=0,
                                            provisioner_port=0))
        with pytest.raises(UsageError, match="in use by another `llama-orch up`"):
            await second.prepare()
        provisioner = cluster._children()[0]
        assert "--config" in provisioner.argv
        assert orjson.loads((state / "pools.json").read_bytes()) == pool_config(cluster.config)
    finally:
        assert await cluster.stop() == []
    await LocalCluster(ClusterConfig(engine="mock", state_dir=state, port=0, pool_managerd_port=0,
                                     provisioner_port=0, cache_dir=tmp_path / "cache")).prepare()  # lock released


def test_status_table_has_a_row_per_pool_and_the_last_errors_below():
    table = format_pools([
        {"pool_id": "pool-1", "ready": False, "slots_total": 2, "leases": 0, "engine": "llamacpp",
         "engine_version": "b1", "vram_free_bytes": None, "model_ref": "file:/m.gguf", "last_error": "engine exited"},
        {"pool_id": "pool-0", "ready": True, "slots_total": 4, "leases": 1, "engine": "llamacpp",
         "engine_version": "b1", "vram_free_bytes": 3 << 30, "vram_total_bytes": 24 << 30, "model_ref": "file:/m.gguf"},
    ])
    lines = table.splitlines()
    assert lines[0].split() == ["POOL", "READY", "SLOTS", "FREE", "VRAM", "FREE", "ENGINE", "MODEL"]
    assert lines[1].split() == ["pool-0", "yes", "3/4", "3.0", "GiB", "/", "24.0", "GiB", "llamacpp", "b1", "file:/m.gguf"]
    assert lines[2].split()[:5] == ["pool-1", "no", "0/2", "?", "/"]  # an unready pool takes no work
    assert lines[3] == "pool-1: last error: engine exited"
    assert lines[0].index("ENGINE") == lines[1].index("llamacpp") == lines[2].index("llamacpp")  # aligned


async def test_stop_kills_an_engine_the_dead_provisioner_recorded_but_nobody_else_knew(tmp_path):
    """An engine the provisioner restarted after start-up, the provisioner then dead: ``up`` finds it
    in the provisioner's state files and kills it, rather than leaving it bound to its port."""
    cluster = LocalCluster(ClusterConfig(state_dir=tmp_path))
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "mock_engine"])
    try:
        (tmp_path / "provisioner").mkdir()
        (tmp_path / "provisioner" / "pool-0-r0.json").write_bytes(orjson.dumps({"pid": engine.pid, "port": 1}))
        (tmp_path / "provisioner" / "broken.json").write_text("{not json")  # ignored, not fatal
        warnings = await cluster.stop()
        assert engine.wait(timeout=10) == -signal.SIGKILL
        assert warnings == [f"engine pid {engine.pid} outlived the provisioner: killed"]
    finally:
        if engine.poll() is None:
            engine.kill()


async def test_a_daemon_that_dies_is_restarted_and_one_that_keeps_dying_ends_the_cluster(tmp_path, monkeypatch):
    monkeypatch.setattr(LocalCluster, "RESTART_BACKOFF_S", (0.01,))
    lines: list[str] = []
    cluster = LocalCluster(ClusterConfig(state_dir=tmp_path), report=lines.append)
    mark = tmp_path / "ran-once"
    once = ("import pathlib, sys, time\n"
            f"p = pathlib.Path({str(mark)!r})\n"
            "if not p.exists():\n    p.touch()\n    sys.exit(3)\n"
            "time.sleep(60)\n")
    flaky = Child(name="pool-managerd", argv=[sys.executable, "-c", once], env=dict(os.environ),
                  log_path=tmp_path / "pmd.log", url="")
    cluster._spawn(flaky, "wb")
    cluster.children.append(flaky)
    first = flaky.pid
    watch = asyncio.ensure_future(cluster.watch())
    try:
        await eventually(lambda: flaky.pid != first and flaky.exited() is None, what="the daemon restarted")
        assert any("pool-managerd exited with status 3; restarting it" in line for line in lines), lines
        assert not watch.done()  # the cluster goes on
    finally:
        watch.cancel()
        flaky.proc.kill()
        flaky.proc.wait()
    dying = Child(name="orchestratord", argv=[sys.executable, "-c", "import sys; print('bad config'); sys.exit(2)"],
                  env=dict(os.environ), log_path=tmp_path / "orchd.log", url="")
    cluster.children[:] = [dying]
    cluster._spawn(dying, "wb")
    with pytest.raises(ClusterError, match=r"(?s)orchestratord exited 6 times within 60 s \(last status 2\).*bad config"):
        await asyncio.wait_for(cluster.watch(), 30)
