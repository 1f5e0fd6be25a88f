"""``llama-orch lab`` by hand: up, a task from the client host, a fault and its heal, down.

As a person would use it, with the mock engine (the scenarios run the real one): ``lab up``
returns with the cluster running and says how to reach it; ``submit`` from the client namespace
streams a task; a partition makes gpu1's pools unready at orchestratord and ``heal`` brings them
back; ``lab down`` leaves no process and no namespace of the lab.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support import wait_until

from llama_orch.io.lab.netns import Topology, unavailable_reason

if os.environ.get("LLAMA_ORCH_NO_EXTENSIONS") == "1":
    pytest.skip("the multi-host lab runs once per `make test`, in the compiled variant", allow_module_level=True)
if (reason := unavailable_reason()) is not None:
    pytest.skip(reason, allow_module_level=True)

PREFIX, SUBNET = "lcl", "10.213.79"
CLI = [sys.executable, "-m", "llama_orch.cli"]


def lab(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "lab", *args, "--dir", str(tmp_path / "lab")], capture_output=True, text=True,
                          timeout=180)


def pools_line(tmp_path) -> str:
    return lab("status", tmp_path=tmp_path).stdout


def test_lab_up_a_task_a_partition_healed_and_down(tmp_path):
    up = subprocess.run([*CLI, "lab", "up", "--engine", "mock", "--dir", str(tmp_path / "lab"), "--prefix", PREFIX,
                         "--subnet", SUBNET], capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert f"ip netns exec {PREFIX}-client" in up.stdout and f"{SUBNET}.1:8080" in up.stdout
        key = up.stdout.split("LLAMA_ORCH_API_KEY=")[1].split()[0]
        env = dict(os.environ, LLAMA_ORCH_URL=f"http://{SUBNET}.1:8080", LLAMA_ORCH_API_KEY=key)
        task = subprocess.run(["ip", "netns", "exec", f"{PREFIX}-client", *CLI, "submit", "Once upon a time",
                               "--max-tokens", "8"], capture_output=True, text=True, timeout=60, env=env)
        assert task.returncode == 0 and "tokens_out=8" in task.stderr, task.stderr

        fault = lab("fault", "gpu1", "partition", tmp_path=tmp_path)
        assert fault.returncode == 0, fault.stderr
        wait_until(lambda: "gpu1-a   unready" in (s := pools_line(tmp_path)) and "gpu2-a   ready" in s,
                   what="gpu1's pools unready, gpu2's ready, at orchestratord")
        heal = lab("fault", "gpu1", "heal", tmp_path=tmp_path)
        assert heal.returncode == 0 and "reset" in heal.stdout, heal.stderr
        wait_until(lambda: pools_line(tmp_path).count(" ready ") == 4, what="every pool ready again after the heal")
    finally:
        down = lab("down", tmp_path=tmp_path)
    assert down.returncode == 0, down.stderr
    assert not Topology(prefix=PREFIX, subnet=SUBNET).existing()
