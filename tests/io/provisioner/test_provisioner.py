"""engine-provisioner as a real process with the mock engine: handoff, restart, adoption, errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_support import free_port
from support import wait_until

from llama_orch.io.provisioner.supervisor import pid_alive


class Run:
    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.handoffs = tmp_path / "engines"
        self.cache = tmp_path / "cache"
        self.log = (tmp_path / "provisioner.log").open("ab")
        self.control = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_orch.io.provisioner", "--handoff-dir", str(self.handoffs),
             "--cache-dir", str(self.cache), "--control-bind", self.control.removeprefix("http://"), *args],
            stdout=self.log, stderr=subprocess.STDOUT)

    def handoff(self, name="pool-0-r0.json"):
        try:
            return json.loads((self.handoffs / name).read_text())
        except (OSError, ValueError):
            return None

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)


@pytest.fixture
def runs():
    started = []
    yield started
    for run in started:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        for name in os.listdir(run.handoffs) if run.handoffs.exists() else ():
            try:
                pid = json.loads((run.handoffs / name).read_text()).get("pid")
            except ValueError:
                continue
            if pid and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_mock_pool_is_provisioned_restarted_after_kill_9_and_stopped_on_sigterm(tmp_path, runs):
    run = Run(tmp_path, "--mode", "mock", "--slots", "3", "--ctx", "512")
    runs.append(run)
    h = wait_until(lambda: run.handoff(), what="handoff")
    assert h["pool_id"] == "pool-0" and h["slots_total"] == 3 and h["provisioning_mode"] == "mock"
    assert h["url"].startswith("http://127.0.0.1:") and "--parallel" in h["flags"] and h["error"] is None
    assert Path(h["model"]["path"]).read_bytes()[:4] == b"GGUF"  # no --model: the tiny model
    first = h["pid"]
    os.kill(first, signal.SIGKILL)
    h2 = wait_until(lambda: (x := run.handoff()) and x["pid"] not in (None, first) and x,
                  what="handoff rewritten after restart")
    assert pid_alive(h2["pid"]) and not pid_alive(first)
    assert run.stop() == 0
    wait_until(lambda: not pid_alive(h2["pid"]), what="engine stopped on SIGTERM")


def test_a_restarted_provisioner_adopts_its_healthy_engine(tmp_path, runs):
    run = Run(tmp_path, "--mode", "mock")
    runs.append(run)
    pid = wait_until(lambda: run.handoff(), what="handoff")["pid"]
    run.proc.kill()  # the provisioner dies; its engine lives on in its own session
    run.proc.wait()
    (run.handoffs / "pool-0-r0.json").unlink()
    again = Run(tmp_path, "--mode", "mock")
    runs.append(again)
    h = wait_until(lambda: again.handoff(), what="handoff from the adopting provisioner")
    assert h["pid"] == pid and pid_alive(pid)
    assert again.stop() == 0
    wait_until(lambda: not pid_alive(pid), what="adopted engine stopped")


@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"not a model", "not a GGUF file")])
def test_missing_or_corrupt_model_writes_an_error_handoff(tmp_path, runs, content, message):
    model = tmp_path / "model.gguf"
    if content is not None:
        model.write_bytes(content)
    run = Run(tmp_path, "--mode", "mock", "--model", f"file:{model}")
    runs.append(run)
    h = wait_until(lambda: run.handoff(), what="error handoff")
    assert h["url"] == "" and message in h["error"] and str(model) in h["error"]
    assert run.proc.poll() is None  # the provisioner stays up for its other pools
    assert run.stop() == 0


@pytest.mark.parametrize(("pool", "message"), [
    ({"pool_id": "a", "slotz": 2}, "unknown keys ['slotz']"),
    ({"pool_id": "a", "engine_args": "--mlock"}, "pools[0].engine_args must be a list of strings"),
])
def test_bad_config_is_one_clear_line(tmp_path, pool, message):
    cfg = tmp_path / "pools.json"
    cfg.write_text(json.dumps({"pools": [pool]}))
    out = subprocess.run([sys.executable, "-m", "llama_orch.io.provisioner", "--config", str(cfg), "--mode", "mock",
                          "--control-bind", f"127.0.0.1:{free_port()}",
                          "--handoff-dir", str(tmp_path / "h"), "--cache-dir", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr and str(cfg) in out.stderr


def test_config_file_provisions_several_pools(tmp_path, runs):
    cfg = tmp_path / "pools.json"
    cfg.write_text(json.dumps({"pools": [{"pool_id": "a", "slots": 1}, {"pool_id": "b", "slots": 2}]}))
    run = Run(tmp_path, "--mode", "mock", "--config", str(cfg))
    runs.append(run)
    a = wait_until(lambda: run.handoff("a-r0.json"), what="pool a")
    b = wait_until(lambda: run.handoff("b-r0.json"), what="pool b")
    assert (a["slots_total"], b["slots_total"]) == (1, 2) and a["url"] != b["url"]
    assert run.stop() == 0


def test_reload_swaps_the_model_and_rolls_back_a_missing_one(tmp_path, runs):
    import urllib.request

    run = Run(tmp_path, "--mode", "mock")
    runs.append(run)
    first = wait_until(lambda: run.handoff(), what="handoff")
    other = tmp_path / "other.gguf"
    other.write_bytes(Path(first["model"]["path"]).read_bytes())

    def post(path, body):
        req = urllib.request.Request(run.control + path, data=json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, body = post("/v2/pools/pool-0/reload", {"new_model_ref": f"file:{other}"})
    assert status == 202 and body["reloading"] == f"file:{other}"
    swapped = wait_until(lambda: (h := run.handoff()) and h["model"]["id"] == f"file:{other}" and h, what="reload")
    assert swapped["pid"] != first["pid"] and pid_alive(swapped["pid"])
    wait_until(lambda: not pid_alive(first["pid"]), what="old engine retired")
    status, body = post("/v2/pools/pool-0/reload", {"new_model_ref": f"file:{tmp_path}/missing.gguf"})
    assert status == 202
    kept = wait_until(lambda: (h := run.handoff()) and h.get("notice") and h, what="rollback notice")
    assert "rolled back" in kept["notice"] and "missing.gguf" in kept["notice"]
    assert kept["pid"] == swapped["pid"] and kept["model"]["id"] == f"file:{other}" and pid_alive(kept["pid"])
    assert post("/v2/pools/nope/reload", {"new_model_ref": "x"})[0] == 404
    assert post("/v2/pools/pool-0/reload", {})[0] == 400
    status, view = post("/v2/pools/pool-0/stop", {})
    assert status == 200 and view["state"] == "drained"
    wait_until(lambda: not pid_alive(kept["pid"]), what="engine stopped")
    # A drain is undone by a reload that starts after it (it once failed: "drained meanwhile").
    status, body = post("/v2/pools/pool-0/reload", {"new_model_ref": f"file:{other}"})
    assert status == 202
    back = wait_until(lambda: (h := run.handoff()) and h["pid"] != kept["pid"] and h, what="the drained pool back")
    assert back["error"] is None and back.get("notice") is None and pid_alive(back["pid"])
    with urllib.request.urlopen(run.control + "/v2/pools", timeout=10) as r:
        assert json.loads(r.read())["pools"][0]["state"] == "ready"
    assert run.stop() == 0


def test_a_bad_environment_value_is_named(tmp_path):
    env = dict(os.environ, ENGINE_PROVISIONER_SLOTS="many")
    out = subprocess.run([sys.executable, "-m", "llama_orch.io.provisioner", "--mode", "mock"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "ENGINE_PROVISIONER_SLOTS='many': expected an integer >= 1" in out.stderr


def test_threads_reach_the_engine_command_line_and_bad_values_are_refused(tmp_path):
    from llama_orch.io.provisioner.supervisor import PoolSpec, PoolSupervisor, ProvisionerSettings

    settings = ProvisionerSettings(handoff_dir=tmp_path, cache_dir=tmp_path, state_dir=tmp_path)
    sup = PoolSupervisor(PoolSpec(pool_id="p", model_ref="file:/m.gguf", threads=3), settings, None)
    sup.binary, sup.model_path = ["/bin/llama-server"], Path("/m.gguf")
    argv = sup.argv(1234)
    assert argv[argv.index("--threads") + 1] == "3"
    sup.spec = PoolSpec(pool_id="p", model_ref="file:/m.gguf")
    assert "--threads" not in sup.argv(1234)  # llama-server's own default
    with pytest.raises(ValueError, match="threads"):
        PoolSpec(pool_id="p", model_ref="file:/m.gguf", threads=0)


def test_a_zombie_counts_as_gone():
    # An adopted engine is not our child and cannot be reaped here: waiting for its zombie to
    # vanish would wait for ever. (This one is our child, left unreaped on purpose.)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_until(lambda: not pid_alive(child.pid), timeout=10, what="the exited, unreaped child")
        assert Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1].startswith("Z")  # still a zombie
    finally:
        child.wait()
    assert pid_alive(os.getpid())


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return kids


def test_a_reload_still_starting_when_the_pool_is_stopped_brings_no_engine_back(tmp_path, runs):
    import urllib.request

    # engines that take 2 s to load: the stop lands while the reload's engine is still loading
    cfg = tmp_path / "pools.json"
    cfg.write_text(json.dumps({"pools": [{"pool_id": "pool-0", "engine_args": ["--start-delay-s", "2"]}]}))
    run = Run(tmp_path, "--mode", "mock", "--config", str(cfg))
    runs.append(run)
    first = wait_until(lambda: run.handoff(), what="handoff")
    other = tmp_path / "other.gguf"
    other.write_bytes(Path(first["model"]["path"]).read_bytes())

    def post(path, body):
        req = urllib.request.Request(run.control + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())

    assert post("/v2/pools/pool-0/reload", {"new_model_ref": f"file:{other}"})[0] == 202
    wait_until(lambda: len(_children(run.proc.pid)) == 2, what="the reload's engine started beside the first")
    status, view = post("/v2/pools/pool-0/stop", {})
    assert status == 200 and view["state"] == "drained" and view["reloading"] == f"file:{other}"

    def pools():
        with urllib.request.urlopen(run.control + "/v2/pools", timeout=10) as r:
            return json.loads(r.read())["pools"][0]
    after = wait_until(lambda: (p := pools())["reloading"] is None and p, what="the reload to end")
    assert after["state"] == "drained" and "drained while the new engine loaded" in after["notice"]
    assert after["model_ref"] == first["model"]["id"]  # the pool's model is what it was
    wait_until(lambda: _children(run.proc.pid) == [], what="no engine left running")
    assert run.stop() == 0


def test_a_consumed_handoff_is_written_again_when_pool_managerd_asks(tmp_path, runs):
    """A restarted pool-managerd finds the handoff dir empty (its predecessor consumed the files):
    the provisioner writes every ready pool's file again on ``POST /v2/handoffs/announce``."""
    import urllib.request

    run = Run(tmp_path, "--mode", "mock", "--slots", "2", "--ctx", "512")
    runs.append(run)
    first = wait_until(lambda: run.handoff(), what="handoff")
    (run.handoffs / "pool-0-r0.json").unlink()
    req = urllib.request.Request(run.control + "/v2/handoffs/announce", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read()) == {"announced": ["pool-0"]}
    again = run.handoff()
    assert again is not None and (again["url"], again["pid"]) == (first["url"], first["pid"])
