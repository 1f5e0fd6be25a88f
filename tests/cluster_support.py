"""Helpers for the end-to-end tests: a worker node of real processes, free ports, the engine.

With ``LLAMA_ORCH_TEST_TLS=1`` (``make test`` runs the e2e suite once so) every daemon serves
mTLS with a development CA made for this test process, and ``client_session``/``client_ssl``
give the tests a client certificate from it: the same tests then prove every hop over TLS.
"""

from __future__ import annotations

import atexit
import functools
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
from support import eventually, task_body

CACHE = Path(os.environ.get("LLAMA_ORCH_CACHE_DIR", "~/.cache/llama-orch")).expanduser()
TLS = os.environ.get("LLAMA_ORCH_TEST_TLS") == "1"
SCHEME = "https" if TLS else "http"


@functools.cache
def dev_certs() -> dict:
    from llama_orch.io.certs import make_dev_certs

    directory = Path(tempfile.mkdtemp(prefix="llama-orch-test-certs-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return make_dev_certs(directory)


def tls_env(service: str, prefix: str) -> dict[str, str]:
    """A daemon's ``{prefix}_TLS_*`` variables in TLS mode, else none."""
    return dev_certs()[service].env(prefix) if TLS else {}


def client_ssl() -> ssl.SSLContext | bool:
    """What the tests' own clients present and trust: the client certificate in TLS mode."""
    if not TLS:
        return True
    client = dev_certs()["client"]
    context = ssl.create_default_context(cafile=str(client.ca))
    context.load_cert_chain(client.cert, client.key)
    return context


def client_session(**kwargs) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl()), **kwargs)


_PORTS = random.Random()  # its own: a plugin that reseeds ``random`` per test must not repeat the ports


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nothing is bound to, for a daemon started next.

    Taken below the kernel's ephemeral range: a port from port 0 is free now, but an outgoing
    connection made before the daemon binds it may be given the same port, and the daemon then
    fails to start. Ports below that range are never handed out to connections."""
    low = _ephemeral_low()
    for _ in range(200):
        port = _PORTS.randrange(max(1024, low - 12_000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port below the ephemeral range ({low})")


class Node:
    """pool-managerd + engine-provisioner on this machine, as an operator would start them."""

    def __init__(self, tmp_path: Path, callback_url: str | None = None) -> None:
        self.tmp = tmp_path
        self.runtime = tmp_path / "engines"
        self.port = free_port()
        self.url = f"{SCHEME}://127.0.0.1:{self.port}"
        self.control = f"127.0.0.1:{free_port()}"
        env = dict(os.environ, POOL_MANAGERD_BIND_ADDR=f"127.0.0.1:{self.port}", POOL_MANAGERD_RUNTIME_DIR=str(self.runtime),
                   POOL_MANAGERD_WATCH_INTERVAL_MS="100", POOL_MANAGERD_HEALTH_INTERVAL_MS="100",
                   POOL_MANAGERD_GPU_DISCOVERY_INTERVAL_MS="1000", POOL_MANAGERD_PROVISIONER_URL=f"{SCHEME}://{self.control}",
                   **tls_env("pool-managerd", "POOL_MANAGERD"))
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
        if "--threads" not in args and "mock" not in args:
            args = (*args, "--threads", "1")  # engines of several nodes share this machine's cores
        self.prov = self._start([sys.executable, "-m", "llama_orch.io.provisioner", "--mode", "source",
                                 "--cache-dir", str(CACHE), "--handoff-dir", str(self.runtime),
                                 "--state-dir", str(self.tmp / "provisioner-state"),
                                 "--control-bind", self.control, *args],
                                dict(os.environ, **tls_env("engine-provisioner", "ENGINE_PROVISIONER")),
                                "provisioner.log")
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


class Orchd:
    """An orchestratord process in front of one or more nodes (``node`` or ``nodes``)."""

    def __init__(self, tmp_path, node: "Node | list[Node]", **env: str) -> None:
        port = free_port()
        self.url = f"{SCHEME}://127.0.0.1:{port}"
        nodes = node if isinstance(node, list) else [node]
        full = dict(os.environ, ORCHD_BIND_ADDR=f"127.0.0.1:{port}", ORCHD_POOL_MANAGERS=",".join(n.url for n in nodes),
                    ORCHD_POOL_POLL_INTERVAL_MS="100", **tls_env("orchestratord", "ORCHD"), **env)
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_orch.io.orchestratord"], env=full,
                                     stdout=(tmp_path / "orchestratord.log").open("ab"), stderr=subprocess.STDOUT)

    async def wait_ready(self, session, node: Node) -> None:
        async def ready():
            try:
                async with session.get(f"{self.url}/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False
        await eventually(ready, timeout=60, what=lambda: "orchestratord sees a ready pool\n" + node.logs())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def task(**kw):
    return task_body(f"file:{CACHE / 'models' / 'tiny.gguf'}", **{"max_tokens": 24, "prompt": "hello llama", **kw})
