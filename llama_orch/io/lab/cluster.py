"""The lab cluster: the Cloud Profile's daemons on namespace hosts, as an operator would run them.

``ctrl`` runs orchestratord on its own address (API keys on: it is not loopback). Each ``gpuN``
runs an engine-provisioner (its control API on the host's own loopback), pool-managerd on the
host's address and the provisioner's engines (``llama-server`` with the tiny model, or the mock
engine), each host from its own directory ``<lab dir>/<host>/``: its own copy of the engine
binary and the model (``bin/``, ``models/``), handoff files, provisioner state and logs. Nothing
on one host reads another's files; the harness itself reads only logs and state files, as an
operator on the machine would. Pools are found by orchestratord's configured list
(``discovery="list"``) or by pool-managerd registering itself (``"push"``). The last worker
host's inbound TCP goes through the lab's delay proxy (off until a latency fault turns it on).

Every process is started with ``ip netns exec`` and recorded; ``stop`` ends them by pid, then
removes the namespaces, whatever state they are in (stopped ones are continued first).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp
import orjson

from ..daemon import log_tail
from .netns import NetnsError, Topology, alive

ORCHD_PORT = 8080
POOL_MANAGERD_PORT = 9200
PROVISIONER_CONTROL = "127.0.0.1:9300"
DELAY_PROXY_PORT = 9999
#: The lab's model: the tiny model's kind, larger, so that a stream lasts long enough to be cut
#: mid-way (about 350 tokens/s on one core, against the tiny model's several thousand).
MODEL_SHAPE = (12, 384)

Report = Callable[[str], None]


class LabError(Exception):
    """The lab could not be brought up, or a process of it failed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LabConfig:
    workers: int = 2
    pools_per_worker: int = 2
    slots: int = 2
    ctx: int = 512  # per slot
    engine: str = "llama-server"  # or "mock"
    discovery: str = "list"  # or "push"
    prefix: str = "lo"
    subnet: str = "10.213.77"
    lab_dir: Path = Path(".lab")
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/llama-orch").expanduser())
    poll_interval_ms: int = 500
    delay_ms: float = 200.0  # the latency fault, each way
    api_key: str = "lab-client-key-0123456789abcdef"
    node_key: str = "lab-node-key-0123456789abcdef"
    ready_timeout_s: float = 120.0
    orchd_env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.engine not in ("llama-server", "mock"):
            raise ValueError(f"engine must be llama-server or mock, got {self.engine!r}")
        if self.discovery not in ("list", "push"):
            raise ValueError(f"discovery must be list or push, got {self.discovery!r}")
        if not 1 <= self.pools_per_worker <= 8 or self.slots < 1:
            raise ValueError("pools_per_worker must be 1-8 and slots >= 1")

    @property
    def latency_host(self) -> str | None:
        """The worker behind the delay proxy: the last one, when there are two or more."""
        return f"gpu{self.workers}" if self.workers >= 2 else None


@dataclass(slots=True)
class LabProcess:
    host: str
    name: str
    argv: list[str]
    env: dict[str, str]  # the lab's own settings; the rest is inherited
    log_path: Path
    proc: subprocess.Popen | None = None
    known_pid: int | None = None  # a process started by an earlier ``lab up`` (no Popen here)
    expected_exit: bool = False  # killed by a fault: its exit is not a failure of the lab

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else self.known_pid

    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.known_pid is not None and alive(self.known_pid)

    def exit_status(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def state(self) -> dict:
        return {"host": self.host, "name": self.name, "argv": self.argv, "env": self.env,
                "log_path": str(self.log_path), "pid": self.pid}



class Agent:
    """The harness's handle on the client host's agent (HTTP over its Unix socket)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket_path)),
                                               timeout=aiohttp.ClientTimeout(total=30))
        return self._http

    async def call(self, method: str, path: str, body: dict | None = None) -> dict:
        async with self._session().request(method, f"http://agent{path}", json=body) as resp:
            data = orjson.loads(await resp.read())
            if resp.status >= 400:
                raise LabError(f"agent {method} {path}: HTTP {resp.status}: {data}")
            return data

    async def probe(self, url: str, *, method: str = "GET", json: dict | None = None,
                    headers: dict | None = None, timeout_s: float = 3.0) -> dict:
        return await self.call("POST", "/probe", {"method": method, "url": url, "json": json,
                                                  "headers": headers or {}, "timeout_s": timeout_s})

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


class LabCluster:
    """``await up()``, then faults and load; ``await down()`` always (it also runs on a failed up)."""

    def __init__(self, config: LabConfig, *, report: Report = lambda line: None) -> None:
        self.config = config
        self.report = report
        self.topology = Topology(prefix=config.prefix, subnet=config.subnet, workers=config.workers)
        self.lab_dir = config.lab_dir.expanduser().resolve()
        self.processes: list[LabProcess] = []
        self.agent = Agent(self.lab_dir / "client" / "agent.sock")
        self.engine_binary: Path | None = None
        self.model: Path | None = None

    # -- where things are ----------------------------------------------------------------------------

    @property
    def orchestratord_url(self) -> str:
        return f"http://{self.topology.host('ctrl').address}:{ORCHD_PORT}"

    def pool_managerd_url(self, host: str) -> str:
        return f"http://{self.topology.host(host).address}:{POOL_MANAGERD_PORT}"

    @property
    def worker_names(self) -> list[str]:
        return [h.name for h in self.topology.workers_hosts]

    def pool_ids(self, host: str | None = None) -> list[str]:
        hosts = [host] if host else self.worker_names
        return [f"{h}-{chr(ord('a') + i)}" for h in hosts for i in range(self.config.pools_per_worker)]

    def host_of_pool(self, pool_id: str) -> str:
        return pool_id.rsplit("-", 1)[0]

    def host_dir(self, host: str) -> Path:
        return self.lab_dir / host

    def process(self, host: str, name: str) -> LabProcess:
        for p in self.processes:
            if p.host == host and p.name == name:
                return p
        raise LabError(f"no {name} on {host}")

    @property
    def client_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.api_key}"}

    # -- up --------------------------------------------------------------------------------------------

    async def up(self) -> None:
        self.check_lab_dir()  # before anything is made: a refused directory leaves nothing to undo
        try:
            await self._obtain()
            self.report(f"making hosts {', '.join(h.name for h in self.topology.hosts)} "
                        f"({self.config.subnet}.0/24, namespaces {self.config.prefix}-*)")
            self.topology.create()
            self.topology.check_routes()
            self._provision_hosts()
            self._start_agent()
            await self._wait_agent()
            for host in self.worker_names:
                self._start_worker(host)
            self._start_orchestratord()
            await self.wait_ready()
        except BaseException:
            await self.down()
            raise

    async def _obtain(self) -> None:
        """The engine and the model, built or written once into the cache (progress shows), as the
        operator's image would hold them; each host gets its own copy."""
        cli = [sys.executable, "-m", "llama_orch.cli"]
        layers, embd = MODEL_SHAPE
        model = self.config.cache_dir / "models" / f"lab-{layers}x{embd}.gguf"
        if not model.exists():
            self.report(f"writing the lab's model ({layers} layers, {embd} wide) to {model}")
            subprocess.run([*cli, "make-tiny-model", "--layers", str(layers), "--embd", str(embd), str(model)], check=True)
        self.model = model
        if self.config.engine == "llama-server":
            done = subprocess.run([*cli, "build-engine", "--cache-dir", str(self.config.cache_dir)],
                                  stdout=subprocess.PIPE, text=True)
            if done.returncode != 0:
                raise LabError("llama-server could not be built (its output is above)")
            self.engine_binary = Path(done.stdout.strip().splitlines()[-1])

    def check_lab_dir(self) -> None:
        """The lab's directory is cleared at each ``up``: it must be new, empty or an earlier lab's."""
        if self.lab_dir.exists() and any(self.lab_dir.iterdir()) and not self.state_path.exists():
            raise LabError(f"{self.lab_dir} is not empty and holds no lab (no lab.json): refusing to clear it; "
                           "give a new or empty directory")

    def _provision_hosts(self) -> None:
        if self.lab_dir.exists():  # an earlier lab's (up() checked)
            shutil.rmtree(self.lab_dir)
        for h in self.topology.hosts:
            (self.host_dir(h.name) / "logs").mkdir(parents=True)
        for host in self.worker_names:
            d = self.host_dir(host)
            for sub in ("bin", "models", "engines", "state"):
                (d / sub).mkdir()
            shutil.copy2(self.model, d / "models" / "model.gguf")
            if self.engine_binary is not None:
                shutil.copy2(self.engine_binary, d / "bin" / "llama-server")

    def _spawn(self, host: str, name: str, argv: list[str], env: dict[str, str]) -> LabProcess:
        log_path = self.host_dir(host) / "logs" / f"{name}.log"
        p = LabProcess(host=host, name=name, argv=self.topology.exec_argv(host, argv),
                       env={"PYTHONUNBUFFERED": "1", **env}, log_path=log_path)
        self.processes.append(p)
        self._launch(p)
        return p

    def _launch(self, p: LabProcess) -> None:
        with p.log_path.open("ab") as log:
            p.proc = subprocess.Popen(p.argv, env={**os.environ, **p.env}, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True, cwd=self.host_dir(p.host))
        p.known_pid = p.proc.pid
        self.report(f"{p.host}: started {p.name} (pid {p.pid})")
        self.save_state()

    # -- the lab on disk: ``lab up`` leaves it running; ``lab fault`` and ``lab down`` find it -------

    @property
    def state_path(self) -> Path:
        return self.lab_dir / "lab.json"

    def save_state(self) -> None:
        c = self.config
        state = {"config": {"workers": c.workers, "pools_per_worker": c.pools_per_worker, "slots": c.slots,
                            "ctx": c.ctx, "engine": c.engine, "discovery": c.discovery, "prefix": c.prefix,
                            "subnet": c.subnet, "lab_dir": str(self.lab_dir), "delay_ms": c.delay_ms},
                 "processes": [p.state() for p in self.processes]}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))
        tmp.replace(self.state_path)

    @classmethod
    def attach(cls, lab_dir: Path, *, report: Report = lambda line: None) -> "LabCluster":
        """The lab a ``lab up`` left running in ``lab_dir``."""
        path = lab_dir.expanduser().resolve() / "lab.json"
        try:
            state = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise LabError(f"no lab in {lab_dir} ({exc}); start one with `llama-orch lab up`") from None
        config = state["config"]
        config["lab_dir"] = Path(config["lab_dir"])
        lab = cls(LabConfig(**config), report=report)
        lab.processes = [LabProcess(host=p["host"], name=p["name"], argv=p["argv"], env=p["env"],
                                    log_path=Path(p["log_path"]), known_pid=p["pid"]) for p in state["processes"]]
        return lab

    def _start_agent(self) -> None:
        self.agent.socket_path.unlink(missing_ok=True)
        self._spawn("client", "agent", [sys.executable, "-m", "llama_orch.io.lab.agent",
                                        "--socket", str(self.agent.socket_path)], {})

    async def _wait_agent(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            self.check_processes()
            with contextlib.suppress(aiohttp.ClientError, OSError, LabError):
                if (await self.agent.call("GET", "/healthz")).get("ok"):
                    return
            if time.monotonic() > deadline:
                raise LabError(f"the client agent did not answer within 20 s:\n{log_tail(self.process('client', 'agent').log_path)}")
            await asyncio.sleep(0.1)

    def _start_worker(self, host: str) -> None:
        c = self.config
        d = self.host_dir(host)
        h = self.topology.host(host)
        pool = {"slots": c.slots, "ctx": c.ctx, "host": h.address, # One name for the model on every host, as a fleet has it: relative to each host's own
        # directory (every process of a host runs there).
        "model": "file:models/model.gguf"}
        if c.engine == "mock":
            pool["mode"] = "mock"
        else:
            pool.update(mode="binary", binary=str(d / "bin" / "llama-server"), threads=1)
        pools = {"pools": [{"pool_id": pid, **pool} for pid in self.pool_ids(host)]}
        (d / "pools.json").write_bytes(orjson.dumps(pools, option=orjson.OPT_INDENT_2))
        self._spawn(host, "engine-provisioner", [
            sys.executable, "-m", "llama_orch.io.provisioner", "--config", str(d / "pools.json"),
            "--cache-dir", str(d / "cache"), "--handoff-dir", str(d / "engines"), "--state-dir", str(d / "state"),
            "--control-bind", PROVISIONER_CONTROL, "--start-timeout-s", str(c.ready_timeout_s)], {})
        self._spawn(host, "pool-managerd", [sys.executable, "-m", "llama_orch.io.pool_managerd"],
                    self._pool_managerd_env(host))
        if host == c.latency_host:
            self.topology.redirect_inbound(host, DELAY_PROXY_PORT)
            self._spawn(host, "delay-proxy", [sys.executable, "-m", "llama_orch.io.lab.delay_proxy",
                                              "--port", str(DELAY_PROXY_PORT), "--delay-ms", str(c.delay_ms)], {})

    def _pool_managerd_env(self, host: str) -> dict[str, str]:
        d = self.host_dir(host)
        env = {"POOL_MANAGERD_BIND_ADDR": f"{self.topology.host(host).address}:{POOL_MANAGERD_PORT}",
               "POOL_MANAGERD_RUNTIME_DIR": str(d / "engines"), "POOL_MANAGERD_NODE_ID": host,
               "POOL_MANAGERD_PROVISIONER_URL": f"http://{PROVISIONER_CONTROL}",
               "POOL_MANAGERD_WATCH_INTERVAL_MS": "250", "POOL_MANAGERD_HEALTH_INTERVAL_MS": "500",
               "POOL_MANAGERD_HEALTH_TIMEOUT_MS": "1000", "POOL_MANAGERD_STALE_AFTER_MISSES": "2",
               "POOL_MANAGERD_ORCHESTRATORD_API_KEY": self.config.node_key}
        if self.config.discovery == "push":
            env["POOL_MANAGERD_ORCHESTRATORD_URL"] = self.orchestratord_url
            env["POOL_MANAGERD_ADVERTISE_URL"] = self.pool_managerd_url(host)
        else:
            env["POOL_MANAGERD_ORCHESTRATORD_CALLBACK_URL"] = f"{self.orchestratord_url}/callbacks/pool-ready"
        return env

    def orchestratord_env(self) -> dict[str, str]:
        c = self.config
        env = {"ORCHD_BIND_ADDR": f"{self.topology.host('ctrl').address}:{ORCHD_PORT}",
               "ORCHD_API_KEYS": f"{c.api_key},{c.node_key}",
               "ORCHD_POOL_POLL_INTERVAL_MS": str(c.poll_interval_ms),
               # Every hop bounded: a partition is a silent stall, each of these ends one.
               "ORCHD_CONNECT_TIMEOUT_MS": "1000", "ORCHD_FIRST_TOKEN_TIMEOUT_MS": "10000",
               "ORCHD_TOKEN_TIMEOUT_MS": "2000", "ORCHD_STREAM_TIMEOUT_MS": "12000",
               "ORCHD_SHUTDOWN_GRACE_MS": "3000", "ORCHD_ADMISSION_CAPACITY": "200",
               # spread over every pool even when one has room: the scenarios watch all four
               "ORCHD_PLACEMENT_STRATEGY": "least-loaded"}
        if c.discovery == "list":
            env["ORCHD_POOL_MANAGERS"] = ",".join(self.pool_managerd_url(h) for h in self.worker_names)
        env.update(dict(c.orchd_env))
        return env

    def _start_orchestratord(self) -> None:
        self._spawn("ctrl", "orchestratord", [sys.executable, "-m", "llama_orch.io.orchestratord"],
                    self.orchestratord_env())

    def check_processes(self) -> None:
        for p in self.processes:
            if p.exit_status() is not None and not p.expected_exit:
                raise LabError(f"{p.name} on {p.host} exited with status {p.exit_status()}; the last lines of "
                               f"{p.log_path}:\n{log_tail(p.log_path)}")

    async def pools(self) -> list[dict] | None:
        """orchestratord's ``/v2/pools``, asked from the client host; None while it does not answer."""
        answer = await self.agent.probe(f"{self.orchestratord_url}/v2/pools", headers=self.client_headers)
        if answer.get("status") != 200 or not isinstance(answer.get("body"), dict):
            return None
        return answer["body"].get("pools") or []

    async def wait_ready(self, timeout_s: float | None = None) -> list[dict]:
        """Until orchestratord lists every pool ready, or ``LabError`` with where it stands."""
        want = set(self.pool_ids())
        deadline = time.monotonic() + (timeout_s or self.config.ready_timeout_s)
        shown = None
        while True:
            self.check_processes()
            pools = await self.pools() or []
            ready = {p["pool_id"] for p in pools if p.get("ready")}
            if want <= ready:
                return pools
            if ready != shown:
                shown = ready
                self.report(f"waiting: {len(ready & want)}/{len(want)} pools ready at orchestratord")
            if time.monotonic() > deadline:
                raise LabError(f"{len(ready & want)}/{len(want)} pools ready after the deadline; missing "
                               f"{sorted(want - ready)}; the provisioner logs are in {self.lab_dir}/gpu*/logs")
            await asyncio.sleep(0.2)

    # -- processes: what the faults act on ---------------------------------------------------------------

    def signal(self, host: str, name: str, sig: int) -> int:
        p = self.process(host, name)
        if not p.running():
            raise LabError(f"{name} on {host} is not running")
        os.kill(p.pid, sig)
        return p.pid

    async def kill(self, host: str, name: str) -> None:
        """SIGKILL, and wait until it is gone (reaped)."""
        p = self.process(host, name)
        p.expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while p.running():
            if time.monotonic() > deadline:
                raise LabError(f"{name} on {host} (pid {p.pid}) outlived SIGKILL by 10 s")
            await asyncio.sleep(0.02)

    def restart(self, host: str, name: str) -> LabProcess:
        p = self.process(host, name)
        if p.running():
            raise LabError(f"{name} on {host} is still running")
        p.expected_exit = False
        self._launch(p)
        return p

    def engine_pid(self, pool_id: str) -> int:
        """The engine serving ``pool_id`` now, from its host's provisioner state file."""
        host = self.host_of_pool(pool_id)
        for path in (self.host_dir(host) / "state").glob(f"{pool_id}-*.json"):
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                pid = orjson.loads(path.read_bytes()).get("pid")
                if isinstance(pid, int):
                    return pid
        raise LabError(f"no engine pid recorded for {pool_id} in {self.host_dir(host) / 'state'}")

    # -- down --------------------------------------------------------------------------------------------

    async def down(self) -> list[str]:
        """Every process (SIGTERM, continued if stopped, then SIGKILL), then the namespaces. Returns
        warnings for processes that had to be killed."""
        await self.agent.close()
        warnings = []
        for p in reversed(self.processes):
            if p.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 8
        while any(p.running() for p in self.processes) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in self.processes:
            if p.running():
                warnings.append(f"{p.name} on {p.host} (pid {p.pid}) did not stop on SIGTERM: killed")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
            if p.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.proc.wait(5)
        try:
            warnings += [f"left running, killed: {w}" for w in self.topology.destroy()]
        except NetnsError as exc:
            warnings.append(str(exc))
        return warnings
