"""The whole of llama-orch on one machine, as real processes: what ``llama-orch up`` runs.

``LocalCluster`` owns the contract's "home" profile: one ``engine-provisioner`` (N pools named
``pool-0`` .. ``pool-{N-1}`` from one ``--config`` file, the real ``llama-server`` or the mock
engine, the tiny model unless another is given), one ``pool-managerd`` watching the
provisioner's handoff dir, and one ``orchestratord`` polling that pool-managerd. Each is started
as an operator would start it (``python -m llama_orch.io.<daemon>`` with the contract's flags and
environment variables), with its log in ``<state dir>/logs/<name>.log``.

It owns, beyond starting them: the checks that come first (ports free, the state dir not used by
another cluster, the model and the engine binary in the cache, both obtained in the foreground
so their progress shows), waiting until orchestratord has every pool ready (a child that dies
meanwhile ends the wait with the last lines of its log), and stopping front to back
(orchestratord, pool-managerd, then the provisioner, which stops the engines), after which no
engine of this cluster may be left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp
import orjson

from ..core.errors import UsageError
from .daemon import log_tail

ENGINES = ("llama-server", "mock")
HOST = "127.0.0.1"  # the home profile is loopback only: orchestratord refuses other addresses without auth

Report = Callable[[str], None]


class ClusterError(Exception):
    """The cluster could not be brought up or failed while running (not a usage error)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    pools: int = 1
    engine: str = "llama-server"
    model: str | None = None  # None: the tiny model, written into the cache when missing
    slots: int = 2
    ctx: int = 2048  # per slot
    port: int = 8080  # orchestratord; 0 picks a free port (as do the two below)
    pool_managerd_port: int = 9200
    provisioner_port: int = 9300
    state_dir: Path = Path(".runtime")
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/llama-orch").expanduser())
    ready_timeout_s: float = 120.0
    poll_interval_ms: int = 500  # orchestratord's discovery polling: a pool shows up within about this
    shutdown_grace_s: float = 5.0  # orchestratord lets running streams finish this long on Ctrl-C
    engine_args: tuple[str, ...] = ()  # more flags for every engine (the mock's speed, llama-server's own)
    orchd_env: tuple[tuple[str, str], ...] = ()  # more ORCHD_* settings (capacity, placement strategy)
    tls: bool = False  # mTLS on every hop between the daemons, with a development CA in <state dir>/certs

    def __post_init__(self) -> None:
        if self.pools < 1:
            raise UsageError(f"--pools must be >= 1, got {self.pools}")
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.slots < 1:
            raise UsageError(f"--slots must be >= 1, got {self.slots}")
        if self.ctx < 64:
            raise UsageError(f"--ctx must be >= 64 (tokens per slot), got {self.ctx}")
        if self.ready_timeout_s <= 0:
            raise UsageError(f"--ready-timeout-s must be > 0, got {self.ready_timeout_s}")
        for flag, port in self.port_flags().items():
            if not 0 <= port <= 65535:
                raise UsageError(f"{flag} must be a port number (0-65535; 0 picks a free one), got {port}")

    def port_flags(self) -> dict[str, int]:
        return {"--port": self.port, "--pool-managerd-port": self.pool_managerd_port,
                "--provisioner-port": self.provisioner_port}


def port_is_free(host: str, port: int) -> bool:
    """Whether a daemon could listen on ``port`` now. SO_REUSEADDR as aiohttp sets it, so a port in
    TIME_WAIT after a previous run counts as free, as it is for the daemon."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def choose_ports(config: ClusterConfig, host: str = HOST) -> dict[str, int]:
    """The three listening ports, by flag: a busy one is a usage error naming the flag to change."""
    chosen: dict[str, int] = {}
    given = {flag: port for flag, port in config.port_flags().items() if port != 0}
    for flag, port in given.items():
        other = next((f for f, p in given.items() if p == port and f != flag), None)
        if other is not None:
            raise UsageError(f"{flag} and {other} are both {port}: each daemon needs its own port")
    for flag, port in given.items():
        if not port_is_free(host, port):
            raise UsageError(f"port {port} on {host} is already in use ({_DAEMON_OF_FLAG[flag]}); "
                             f"stop what holds it or pass {flag} with another port (0 picks a free one)")
        chosen[flag] = port
    for flag, port in config.port_flags().items():
        if port == 0:
            picked = pick_free_port(host)
            while picked in chosen.values():
                picked = pick_free_port(host)
            chosen[flag] = picked
    return chosen


_DAEMON_OF_FLAG = {"--port": "orchestratord", "--pool-managerd-port": "pool-managerd",
                   "--provisioner-port": "engine-provisioner's control API"}


def pool_config(config: ClusterConfig) -> dict:
    """The provisioner's ``--config``: one entry per pool, all with the same engine and model."""
    mode = "mock" if config.engine == "mock" else "source"
    pool = {"mode": mode, "slots": config.slots, "ctx": config.ctx}
    if config.engine_args:
        pool["engine_args"] = list(config.engine_args)
    if mode == "source":
        # The engines share this machine's cores: each taking all of them makes every one crawl.
        pool["threads"] = max(1, (os.cpu_count() or 1) // config.pools)
    return {"pools": [{"pool_id": f"pool-{i}", **pool} for i in range(config.pools)]}


def _die_with_parent() -> Callable[[], None] | None:
    """A child that gets SIGTERM when ``llama-orch up`` itself dies (even by SIGKILL), so a killed
    ``up`` leaves no daemons behind. Linux only; elsewhere the signal handlers are all there is.
    The libc function is looked up here, before any fork: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    return arm


_PREEXEC = _die_with_parent()


def process_alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _looks_like_engine(pid: int) -> bool:
    """Before a last-resort SIGKILL: is ``pid`` still an engine, not a recycled pid?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc to ask: trust the pid we were given moments ago
    return b"llama-server" in cmdline or b"mock_engine" in cmdline



@dataclass(slots=True)
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    url: str
    proc: subprocess.Popen | None = None
    exits: list[float] = field(default_factory=list)  # when it exited on its own, lately (monotonic s)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


class LocalCluster:
    """Bring the cluster up with ``prepare()``, ``start()``, ``wait_ready()``; ``stop()`` always.

    ``report`` gets one line per step (the CLI prints them to stderr)."""

    def __init__(self, config: ClusterConfig, *, report: Report = lambda line: None) -> None:
        self.config = config
        self.report = report
        self.state_dir = config.state_dir.expanduser().resolve()
        self.handoff_dir = self.state_dir / "engines"
        self.log_dir = self.state_dir / "logs"
        self.ports: dict[str, int] = {}
        self.children: list[Child] = []
        self.model_ref: str | None = None
        self.pools: list[dict] = []  # pool-managerd's view once ready: engine URLs and pids
        self.engine_pids: set[int] = set()
        self._lock_file = None
        self._hurry = False
        self.certs_dir = self.state_dir / "certs"
        self.certs: dict = {}  # service name -> ServiceCert, with --tls
        self.ssl: ssl.SSLContext | bool = True  # what this supervisor's own checks present and trust

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls else "http"

    def http(self) -> aiohttp.ClientSession:
        """A session for this supervisor's checks of its daemons (with the ``client`` certificate under --tls)."""
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2),
                                     connector=aiohttp.TCPConnector(ssl=self.ssl))

    # -- where things are ------------------------------------------------------------------------

    @property
    def orchestratord_url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.ports['--port']}"

    @property
    def pool_managerd_url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.ports['--pool-managerd-port']}"

    @property
    def provisioner_url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.ports['--provisioner-port']}"

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    # -- before anything runs ----------------------------------------------------------------------

    async def prepare(self) -> None:
        """Every check and every slow download or build, in the foreground, before any daemon."""
        self.ports = choose_ports(self.config)
        self._lock_state_dir()
        for stale in self.handoff_dir.glob("*.json"):  # a killed run's pools must not look alive
            stale.unlink(missing_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.config.tls:
            self._make_certs()
        await self._obtain_model()
        if self.config.engine == "llama-server":
            await self._obtain_engine()

    def _lock_state_dir(self) -> None:
        """One cluster per state dir: two would delete each other's handoff files."""
        self.handoff_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.state_dir / "up.lock"
        f = lock_path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise UsageError(f"state dir {self.state_dir} is in use by another `llama-orch up` (pid {holder}); "
                             "stop that one or pass --state-dir with another directory") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f

    async def _obtain_model(self) -> None:
        from .provisioner.artifacts import ArtifactError, fetch_model, parse_model_ref, terminal_progress

        if self.config.model is None:
            tiny = self.config.cache_dir / "models" / "tiny.gguf"
            if not tiny.exists():
                from .provisioner.tiny_model import write_tiny_model

                write_tiny_model(tiny)
                self.report(f"wrote the tiny model to {tiny}")
            self.model_ref = f"file:{tiny}"
            return
        try:
            local = parse_model_ref(self.config.model).kind == "file"
        except ArtifactError as exc:
            raise UsageError(f"--model {self.config.model!r}: {exc}") from None
        try:  # the provisioner finds it in the cache afterwards; here its progress reaches the terminal
            path = await fetch_model(self.config.model, self.config.cache_dir,
                                     progress=terminal_progress(f"model {self.config.model}"))
        except ArtifactError as exc:
            if local:  # a missing or broken local file is bad input; a failed download is not
                raise UsageError(f"--model {self.config.model!r}: {exc}") from None
            raise ClusterError(f"cannot obtain the model {self.config.model}: {exc}") from None
        self.report(f"model {self.config.model} at {path}")
        self.model_ref = self.config.model

    async def _obtain_engine(self) -> None:
        from .provisioner.engine_build import BuildError, cached_binary, default_spec, ensure_llama_server, stderr_report

        spec = default_spec("")  # what the provisioner builds for a pool without a GPU mask
        if cached_binary(self.config.cache_dir, spec) is None:
            self.report(f"llama-server is not in {self.config.cache_dir} yet: building it from source once "
                        "(several minutes; progress follows)")
        try:
            path = await ensure_llama_server(self.config.cache_dir, spec, report=stderr_report)
        except BuildError as exc:
            raise ClusterError(str(exc)) from None
        self.report(f"llama-server {path}")

    def _make_certs(self) -> None:
        from .certs import make_dev_certs

        self.certs = make_dev_certs(self.certs_dir)
        client = self.certs["client"]
        context = ssl.create_default_context(cafile=str(client.ca))
        context.load_cert_chain(client.cert, client.key)
        self.ssl = context
        self.report(f"mTLS: development CA and certificates in {self.certs_dir}")

    def _tls_env(self, service: str, prefix: str) -> dict[str, str]:
        return self.certs[service].env(prefix) if self.config.tls else {}

    # -- the daemons -------------------------------------------------------------------------------

    def _children(self) -> list[Child]:
        c = self.config
        base = dict(os.environ, PYTHONUNBUFFERED="1")
        config_path = self.state_dir / "pools.json"
        config_path.write_bytes(orjson.dumps(pool_config(c), option=orjson.OPT_INDENT_2))
        control = f"{HOST}:{self.ports['--provisioner-port']}"
        provisioner = Child(
            name="engine-provisioner", log_path=self.log_dir / "engine-provisioner.log", url=self.provisioner_url,
            argv=[sys.executable, "-m", "llama_orch.io.provisioner", "--config", str(config_path),
                  "--mode", "mock" if c.engine == "mock" else "source", "--model", str(self.model_ref),
                  "--cache-dir", str(c.cache_dir), "--handoff-dir", str(self.handoff_dir),
                  "--state-dir", str(self.state_dir / "provisioner"),
                  "--control-bind", control, "--start-timeout-s", str(c.ready_timeout_s)],
            env=dict(base, **self._tls_env("engine-provisioner", "ENGINE_PROVISIONER")))
        pool_managerd = Child(
            name="pool-managerd", log_path=self.log_dir / "pool-managerd.log", url=self.pool_managerd_url,
            argv=[sys.executable, "-m", "llama_orch.io.pool_managerd"],
            env=dict(base, POOL_MANAGERD_BIND_ADDR=f"{HOST}:{self.ports['--pool-managerd-port']}",
                     POOL_MANAGERD_RUNTIME_DIR=str(self.handoff_dir),
                     POOL_MANAGERD_PROVISIONER_URL=self.provisioner_url,
                     POOL_MANAGERD_ORCHESTRATORD_CALLBACK_URL=f"{self.orchestratord_url}/callbacks/pool-ready",
                     POOL_MANAGERD_WATCH_INTERVAL_MS="250", **self._tls_env("pool-managerd", "POOL_MANAGERD")))
        orchestratord = Child(
            name="orchestratord", log_path=self.log_dir / "orchestratord.log", url=self.orchestratord_url,
            argv=[sys.executable, "-m", "llama_orch.io.orchestratord"],
            env=dict(base, ORCHD_BIND_ADDR=f"{HOST}:{self.ports['--port']}", ORCHD_POOL_MANAGERS=self.pool_managerd_url,
                     ORCHD_POOL_POLL_INTERVAL_MS=str(c.poll_interval_ms), ORCHD_PROFILE="home",
                     ORCHD_SHUTDOWN_GRACE_MS=str(int(c.shutdown_grace_s * 1000)),
                     **self._tls_env("orchestratord", "ORCHD"), **dict(c.orchd_env)))
        # Started back to front (the slow one first); stopped front to back.
        return [provisioner, pool_managerd, orchestratord]

    def start(self) -> None:
        for child in self._children():
            self.children.append(child)
            self._spawn(child, "wb")  # this run's log only: its tail is what a failure shows
            self.report(f"started {child.name} (pid {child.pid}, log {child.log_path})")

    @staticmethod
    def _spawn(child: Child, mode: str) -> None:
        with child.log_path.open(mode) as log:
            # Its own session: a Ctrl-C in the terminal reaches ``up`` alone, which then stops
            # the daemons in order instead of all of them at once.
            child.proc = subprocess.Popen(child.argv, env=child.env, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_PREEXEC)

    def check_children(self) -> None:
        """Raise ``ClusterError`` with the log tail of the first daemon that has exited."""
        for child in self.children:
            code = child.exited()
            if code is not None:
                raise ClusterError(f"{child.name} exited with status {code}; the last lines of {child.log_path}:\n"
                                   f"{log_tail(child.log_path)}")

    async def wait_ready(self) -> None:
        """Until orchestratord answers /readyz and lists every pool ready; a deadline, a dead child
        or a pool the provisioner gave up on ends it with ``ClusterError``."""
        want = self.config.pools
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.ready_timeout_s
        shown: tuple = ()
        async with self.http() as http:
            while True:
                self.check_children()
                pools = (await _get_json(http, f"{self.orchestratord_url}/v2/pools") or {}).get("pools") or []
                ready = sorted(p["pool_id"] for p in pools if p.get("ready"))
                if len(ready) >= want and await _status(http, f"{self.orchestratord_url}/readyz") == 200:
                    break
                provisioned = (await _get_json(http, f"{self.provisioner_url}/v2/pools") or {}).get("pools") or []
                self._remember_engines(provisioned, "pid")
                failed = [p for p in provisioned if p.get("state") == "failed"]
                if failed:
                    raise ClusterError("; ".join(f"{p['pool_id']} failed: {p.get('last_error') or 'no detail'}"
                                                 for p in failed) + f"\n(log: {self.child('engine-provisioner').log_path})")
                progress = (len(ready), tuple(sorted((p["pool_id"], p.get("state")) for p in provisioned)))
                if progress != shown:
                    shown = progress
                    states = ", ".join(f"{pid} {state}" for pid, state in progress[1]) or "starting up"
                    self.report(f"waiting: {len(ready)}/{want} pools ready at orchestratord (engines: {states})")
                if loop.time() > deadline:
                    errors = "; ".join(f"{p['pool_id']}: {p['last_error']}" for p in provisioned if p.get("last_error"))
                    raise ClusterError(
                        f"{len(ready)}/{want} pools ready after {self.config.ready_timeout_s:.0f} s"
                        f"{' (' + errors + ')' if errors else ''} (--ready-timeout-s waits longer); "
                        f"the last lines of {self.child('engine-provisioner').log_path}:\n"
                        f"{log_tail(self.child('engine-provisioner').log_path)}")
                await asyncio.sleep(0.1)
            managed = (await _get_json(http, f"{self.pool_managerd_url}/v2/pools") or {}).get("pools") or []
        self.pools = sorted(managed, key=lambda p: p.get("pool_id", ""))
        self._remember_engines(self.pools, "engine_pid")

    def _remember_recorded_engines(self) -> None:
        """The engines the provisioner recorded for adoption (``<state dir>/provisioner/*.json``):
        every engine it started, restarts included, whether or not it is still alive to say so."""
        for path in sorted((self.state_dir / "provisioner").glob("*.json")):
            with contextlib.suppress(OSError, orjson.JSONDecodeError, AttributeError):
                pid = orjson.loads(path.read_bytes()).get("pid")
                if isinstance(pid, int) and pid > 0:
                    self.engine_pids.add(pid)

    def _remember_engines(self, pools: list[dict], key: str) -> None:
        self.engine_pids.update(p[key] for p in pools if isinstance(p.get(key), int))

    #: Waits before restarting a daemon that exited, by how often it has lately; past
    #: ``CRASH_LOOP_EXITS`` exits within ``CRASH_LOOP_WINDOW_S`` it is not restarted again.
    RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
    CRASH_LOOP_EXITS = 5
    CRASH_LOOP_WINDOW_S = 60.0

    async def watch(self) -> None:
        """Keep the daemons running: one that exits on its own is started again (its log goes on),
        after a wait that grows with its recent exits, so the rest of the cluster keeps serving.
        One that keeps dying ends the cluster: ``ClusterError`` with its status and log tail."""
        while True:
            for child in self.children:
                code = child.exited()
                if code is None:
                    continue
                now = time.monotonic()
                child.exits = [t for t in child.exits if now - t < self.CRASH_LOOP_WINDOW_S] + [now]
                if len(child.exits) > self.CRASH_LOOP_EXITS:
                    raise ClusterError(f"{child.name} exited {len(child.exits)} times within "
                                       f"{self.CRASH_LOOP_WINDOW_S:.0f} s (last status {code}); the last lines of "
                                       f"{child.log_path}:\n{log_tail(child.log_path)}")
                wait = self.RESTART_BACKOFF_S[min(len(child.exits), len(self.RESTART_BACKOFF_S)) - 1]
                self.report(f"{child.name} exited with status {code}; restarting it in {wait:g} s "
                            f"(log {child.log_path})")
                await asyncio.sleep(wait)  # the backoff itself, not a wait for anything
                self._spawn(child, "ab")
                self.report(f"restarted {child.name} (pid {child.pid})")
            await asyncio.sleep(0.2)

    # -- stopping ----------------------------------------------------------------------------------

    def hurry(self) -> None:
        """A second Ctrl-C: stop waiting for graceful exits, kill what is left."""
        self._hurry = True

    async def stop(self) -> list[str]:
        """Stop every daemon, front to back, and make sure no engine of this cluster survives.
        Returns warnings (a daemon that had to be killed, an engine left behind and killed)."""
        warnings: list[str] = []
        if self.children:
            with contextlib.suppress(Exception):  # the provisioner knows the current engines (restarts included)
                async with self.http() as http:
                    provisioned = (await _get_json(http, f"{self.provisioner_url}/v2/pools") or {}).get("pools") or []
                    self._remember_engines(provisioned, "pid")
        self._remember_recorded_engines()  # and its state files know them even when it has died
        # The grace of each: orchestratord lets streams finish; the provisioner stops engines (10 s each).
        graces = {"orchestratord": self.config.shutdown_grace_s + 5, "pool-managerd": 15.0, "engine-provisioner": 25.0}
        for child in reversed(self.children):
            if child.proc is None or child.proc.poll() is not None:
                continue
            self.report(f"stopping {child.name} (pid {child.pid})")
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
            if not await self._exited(child.proc, graces.get(child.name, 10.0)):
                warnings.append(f"{child.name} (pid {child.pid}) did not stop within its grace: killed")
                child.proc.kill()
                await self._exited(child.proc, 5.0, hurry_ok=False)
        for pid in sorted(self.engine_pids):
            if process_alive(pid) and _looks_like_engine(pid):
                # The provisioner stops its engines on SIGTERM; one still here was orphaned.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                warnings.append(f"engine pid {pid} outlived the provisioner: killed")
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        return warnings

    async def _exited(self, proc: subprocess.Popen, timeout_s: float, *, hurry_ok: bool = True) -> bool:
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if time.monotonic() > deadline or (hurry_ok and self._hurry):
                return False
            await asyncio.sleep(0.05)
        return True


async def _get_json(http: aiohttp.ClientSession, url: str) -> dict | None:
    """The JSON at ``url``, or None while the daemon is not (yet) answering."""
    try:
        async with http.get(url) as resp:
            if resp.status != 200:
                return None
            return orjson.loads(await resp.read())
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, orjson.JSONDecodeError):
        return None


async def _status(http: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with http.get(url) as resp:
            return resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None
