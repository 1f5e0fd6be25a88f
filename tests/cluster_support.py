"""Helpers for the end-to-end tests: a worker node of real processes, free ports, the engine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("LLAMA_ORCH_CACHE_DIR", "~/.cache/llama-orch")).expanduser()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """pool-managerd + engine-provisioner on this machine, as an operator would start them."""

    def __init__(self, tmp_path: Path, callback_url: str | None = None) -> None:
        self.tmp = tmp_path
        self.runtime = tmp_path / "engines"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.control = f"127.0.0.1:{free_port()}"
        env = dict(os.environ, POOL_MANAGERD_BIND_ADDR=f"127.0.0.1:{self.port}", POOL_MANAGERD_RUNTIME_DIR=str(self.runtime),
                   POOL_MANAGERD_WATCH_INTERVAL_MS="100", POOL_MANAGERD_HEALTH_INTERVAL_MS="100",
                   POOL_MANAGERD_GPU_DISCOVERY_INTERVAL_MS="1000", POOL_MANAGERD_PROVISIONER_URL=f"http://{self.control}")
        if callback_url:
            env["POOL_MANAGERD_ORCHESTRATORD_CALLBACK_URL"] = callback_url
        self.procs: list[subprocess.Popen] = []
        self.pmd = self._start([sys.executable, "-m", "llama_orch.io.pool_managerd"], env, "pool-managerd.log")
        self.prov: subprocess.Popen | None = None

    def _start(self, argv, env, log_name) -> subprocess.Popen:
        proc = subprocess.Popen(argv, env=env, stdout=(self.tmp / log_name).open("ab"), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def provision(self, *args: str) -> subprocess.Popen:
        self.prov = self._start([sys.executable, "-m", "llama_orch.io.provisioner", "--mode", "source",
                                 "--cache-dir", str(CACHE), "--handoff-dir", str(self.runtime),
                                 "--control-bind", self.control, *args],
                                dict(os.environ), "provisioner.log")
        return self.prov

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.tmp.glob("*.log"))

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
