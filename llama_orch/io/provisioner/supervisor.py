"""engine-provisioner: obtains, starts and supervises the engines of one GPU worker.

For each configured pool it resolves the model (``artifacts``), obtains the engine
(``source``: a cached ``llama-server`` built from source; ``binary``: an existing
``llama-server``; ``mock``: the project's mock engine), starts it on a free port with
``--parallel``, ``-c``, ``--metrics`` and ``CUDA_VISIBLE_DEVICES`` from the GPU mask, waits for
``/health`` (503 while loading) with a deadline, and writes the handoff file atomically. It
then supervises: when the engine exits, ``core.pool.PoolLifecycle`` decides when to restart it
(exponential backoff behind a circuit breaker) and the handoff is rewritten; a failure that
stops the pool is written as a handoff with ``error`` so pool-managerd shows the cause.
A restarted provisioner adopts a still-healthy engine it started before (its state file
records pid, port and flags) instead of starting a duplicate. SIGTERM stops every engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from ...core.commands import PoolStateChanged, ProbeHealth, StartEngine, StopEngine
from ...core.events import (
    DrainRequested,
    EngineExited,
    EngineStarted,
    HealthChecked,
    ProvisionFailed,
    ProvisionStarted,
    Tick,
)
from ...core.pool import PoolLifecycle, PoolPolicy, PoolState
from ..config import ConfigError, Env, TlsFiles, parse_address
from ..tls import TlsContexts
from ..tracing import Tracing, server_spans
from ..tracing import setup as setup_tracing
from ..daemon import prepare, spawn
from ..handoff import Handoff, write_handoff
from ..http import fail, json_body, json_response, pool_or_404
from ..waits import within
from .artifacts import ArtifactError, fetch_model, terminal_progress
from .engine_build import BuildError, BuildSpec, default_spec, ensure_llama_server

log = logging.getLogger("llama_orch.provisioner")

MODES = ("source", "binary", "mock")
KILL_WAIT_S = 5.0  # after SIGKILL: only an unkillable (D-state) or foreign process takes longer


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolSpec:
    pool_id: str
    model_ref: str
    mode: str = "source"
    slots: int = 2
    ctx: int = 2048  # per slot
    replica_id: str = "r0"
    gpu_mask: str = ""
    binary: str | None = None
    host: str = "127.0.0.1"
    threads: int | None = None  # CPU threads for the engine; None: llama-server's default (every core)
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"pool {self.pool_id}: threads must be >= 1, got {self.threads}")
        if self.mode not in MODES:
            raise ValueError(f"pool {self.pool_id}: mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.slots < 1 or self.ctx < 64:
            raise ValueError(f"pool {self.pool_id}: slots must be >= 1 and ctx >= 64")
        if self.mode == "binary" and not self.binary:
            raise ValueError(f"pool {self.pool_id}: mode 'binary' needs --binary PATH")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProvisionerSettings:
    handoff_dir: Path
    cache_dir: Path
    state_dir: Path
    start_timeout_s: float = 120.0
    control: tuple[str, int] = ("127.0.0.1", 9300)
    health_interval_ms: float = 1000.0
    build: BuildSpec | None = None  # None: default_spec(pool's GPU mask), as `llama-orch build-engine`
    tls: TlsFiles | None = None  # the control API's mTLS (ENGINE_PROVISIONER_TLS_CERT/KEY/CA)
    policy: PoolPolicy = field(default_factory=lambda: PoolPolicy(health_interval_ms=1000.0, backoff_base_ms=500.0,
                                                                 backoff_max_ms=30_000.0, breaker_threshold=5))


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie counts as gone: an adopted engine is not our child, so
    nothing here can reap it, and waiting for it to vanish would wait for ever."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False  # exited and reaped since kill(0)
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat[stat.rindex(")") + 2:][:1] != "Z"  # the state follows the parenthesised command name


class Engine:
    """One engine process: spawned by us, or adopted from a previous provisioner run."""

    def __init__(self, *, pid: int, url: str, port: int, proc: asyncio.subprocess.Process | None,
                 log_path: Path) -> None:
        self.pid = pid
        self.url = url
        self.port = port
        self.proc = proc
        self.log_path = log_path

    async def wait(self) -> int | None:
        if self.proc is not None:
            return await self.proc.wait()
        while pid_alive(self.pid):  # not our child: we cannot wait(), so watch it
            await asyncio.sleep(0.5)
        return None

    async def stop(self, grace_s: float = 10.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if not await within(self.wait(), grace_s):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            if not await within(self.wait(), KILL_WAIT_S):
                log.error("engine pid %d still there %.0f s after SIGKILL; leaving it", self.pid, KILL_WAIT_S)

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:])


class PoolSupervisor:
    """Provisions one pool and keeps its engine running, as the pool lifecycle decides."""

    def __init__(self, spec: PoolSpec, settings: ProvisionerSettings, session: aiohttp.ClientSession) -> None:
        self.spec = spec
        self.settings = settings
        self.session = session
        self.lifecycle = PoolLifecycle(spec.pool_id, policy=settings.policy, rng=random.Random(hash(spec.pool_id) & 0xFFFF))
        self.engine: Engine | None = None
        self.model_path: Path | None = None
        self.binary: list[str] | None = None
        self.engine_version = "unknown"
        self.wake = asyncio.Event()
        self.stopping = False
        self.reloading: str | None = None  # the model ref being loaded by a reload in progress
        self.notice: str | None = None  # the outcome of the last failed reload, for the handoff
        self.drains = 0  # stops asked for so far: a reload tells a drain that came during it from an earlier one
        self._tasks: set[asyncio.Task] = set()

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time() * 1000.0

    @property
    def state_file(self) -> Path:
        return self.settings.state_dir / f"{self.spec.pool_id}-{self.spec.replica_id}.json"

    # -- provisioning -------------------------------------------------------------------------

    async def provision(self) -> bool:
        """Model and binary in hand; False (and an error handoff) when that fails."""
        self.lifecycle.handle(ProvisionStarted(pool_id=self.spec.pool_id), self.now())
        try:
            self.model_path = await fetch_model(self.spec.model_ref, self.settings.cache_dir,
                                                progress=terminal_progress(f"model {self.spec.model_ref}"))
            self.binary = await self._obtain_binary()
        except (ArtifactError, BuildError, OSError) as exc:
            self._fail(f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc))
            return False
        return True

    async def _obtain_binary(self) -> list[str]:
        if self.spec.mode == "mock":
            self.engine_version = "mock"
            return [sys.executable, "-m", "llama_orch.io.provisioner.mock_engine"]
        if self.spec.mode == "binary":
            path = Path(self.spec.binary or "")
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise ArtifactError("ENGINE_NOT_FOUND", f"llama-server binary {path} does not exist or is not executable")
        else:
            build = self.settings.build or default_spec(self.spec.gpu_mask)
            path = await ensure_llama_server(self.settings.cache_dir, build)
        self.engine_version = await self._version(path)
        return [str(path)]

    @staticmethod
    async def _version(path: Path) -> str:
        """``version: 0.5.0-dev (build 1, commit 0c1e570)`` -> ``0.5.0-dev+0c1e570``."""
        proc = await asyncio.create_subprocess_exec(str(path), "--version", stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("version:"):
                text = line.split(":", 1)[1].strip()
                number = text.split()[0] if text else "unknown"
                commit = re.search(r"commit ([0-9a-f]+)", text) or re.search(r"\(([0-9a-f]{6,})\)", text)
                return f"{number}+{commit.group(1)}" if commit else number
        return "unknown"

    def argv(self, port: int) -> list[str]:
        s = self.spec
        assert self.binary is not None and self.model_path is not None
        return [*self.binary, "-m", str(self.model_path), "--host", s.host, "--port", str(port),
                "--parallel", str(s.slots), "-c", str(s.ctx * s.slots), "--metrics",
                *(("--threads", str(s.threads)) if s.threads else ()), *s.extra_args]

    def _fail(self, error: str) -> None:
        log.error("pool %s: %s", self.spec.pool_id, error)
        self._apply(self.lifecycle.handle(ProvisionFailed(pool_id=self.spec.pool_id, error=error), self.now()))
        write_handoff(self.settings.handoff_dir, Handoff(
            pool_id=self.spec.pool_id, replica_id=self.spec.replica_id, url="", error=error,
            provisioning_mode=self.spec.mode, model_id=self.spec.model_ref, slots_total=self.spec.slots))

    # -- engines ------------------------------------------------------------------------------

    async def start_engine(self) -> None:
        """Start (or adopt) the engine and wait until it is healthy or has failed."""
        adopted = await self._adopt()
        if adopted is not None:
            self.engine = adopted
            log.info("pool %s: adopted healthy engine pid %s at %s", self.spec.pool_id, adopted.pid, adopted.url)
        else:
            self.engine = await self._spawn()
        self._apply(self.lifecycle.handle(EngineStarted(pool_id=self.spec.pool_id, engine_url=self.engine.url,
                                                        pid=self.engine.pid), self.now()))
        self._watch(self.engine)
        if adopted is not None:
            self._write_handoff()

    async def _spawn(self, *, record: bool = True) -> Engine:
        s = self.spec
        port = free_port(s.host)
        argv = self.argv(port)
        env = dict(os.environ)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # the mask uses NVML (PCI bus) numbering
        if s.gpu_mask:
            env["CUDA_VISIBLE_DEVICES"] = s.gpu_mask
        log_path = self.settings.state_dir / f"{s.pool_id}-{s.replica_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as logf:
            logf.write(f"\n# {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
            proc = await asyncio.create_subprocess_exec(*argv, stdout=logf, stderr=asyncio.subprocess.STDOUT,
                                                        env=env, start_new_session=True)
        url = f"http://{s.host if ':' not in s.host else f'[{s.host}]'}:{port}"
        log.info("pool %s: started %s (pid %s) on %s", s.pool_id, Path(argv[0]).name, proc.pid, url)
        engine = Engine(pid=proc.pid, url=url, port=port, proc=proc, log_path=log_path)
        if record:
            self._record(engine)
        return engine

    def _record(self, engine: Engine) -> None:
        """The state file a restarted provisioner reads to adopt this engine."""
        self.state_file.write_bytes(orjson.dumps({"pid": engine.pid, "url": engine.url, "port": engine.port,
                                                  "argv": self.argv(engine.port)}))

    async def _adopt(self) -> Engine | None:
        try:
            state = orjson.loads(self.state_file.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        pid, url, argv = state.get("pid"), state.get("url"), state.get("argv")
        if not (isinstance(pid, int) and pid_alive(pid) and argv == self.argv(state.get("port", 0))):
            return None
        try:
            async with self.session.get(f"{url}/health") as resp:
                if resp.status != 200:
                    return None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None
        return Engine(pid=pid, url=url, port=state["port"], proc=None,
                      log_path=self.settings.state_dir / f"{self.spec.pool_id}-{self.spec.replica_id}.log")

    def _watch(self, engine: Engine) -> None:
        async def watch() -> None:
            code = await engine.wait()
            if self.engine is engine and not self.stopping:
                detail = f"engine exited with status {code}" if code is not None else "engine process disappeared"
                tail = engine.log_tail()
                self._apply(self.lifecycle.handle(EngineExited(pool_id=self.spec.pool_id,
                                                               detail=f"{detail}: {tail}" if tail else detail), self.now()))
        self._spawn_task(watch())

    def _write_handoff(self) -> None:
        assert self.engine is not None and self.model_path is not None
        s = self.spec
        write_handoff(self.settings.handoff_dir, Handoff(
            pool_id=s.pool_id, replica_id=s.replica_id, url=self.engine.url, engine="llamacpp",
            engine_version=self.engine_version, provisioning_mode=s.mode, model_id=s.model_ref,
            model_path=str(self.model_path), flags=tuple(self.argv(self.engine.port)[len(self.binary or []):]),
            device_mask=s.gpu_mask, slots_total=s.slots, ctx=s.ctx, pid=self.engine.pid, notice=self.notice))

    # -- reload and stop (asked for by pool-managerd through the control API) -------------------

    async def reload(self, new_ref: str) -> None:
        """Swap the model atomically: the old engine serves until one with the new model is
        healthy; if the new one never gets there it is stopped and the old one stays."""
        old_spec, old_model, old_engine = self.spec, self.model_path, self.engine
        drains_before = self.drains  # a pool drained before the reload is brought back by it
        self.reloading = new_ref
        try:
            try:
                new_model = await fetch_model(new_ref, self.settings.cache_dir)
            except ArtifactError as exc:
                return self._reload_failed(new_ref, str(exc))
            self.spec = replace(self.spec, model_ref=new_ref)
            self.model_path = new_model
            candidate = await self._spawn(record=False)
            try:
                error = await self._wait_healthy(candidate, self.settings.start_timeout_s)
            except BaseException:  # canceled (shutdown): the candidate must not outlive the reload
                await asyncio.shield(candidate.stop())
                self.spec, self.model_path = old_spec, old_model
                raise
            if error is None and self.drains != drains_before:
                error = "the pool was drained while the new engine loaded"  # the later word wins
            if error is not None:
                await candidate.stop()
                self.spec, self.model_path = old_spec, old_model
                return self._reload_failed(new_ref, f"{error}: {candidate.log_tail()}".rstrip(": "))
            log.info("pool %s: reloaded %s -> %s, engine pid %s", self.spec.pool_id, old_spec.model_ref, new_ref,
                     candidate.pid)
            self.notice = None
            self.engine = candidate
            self._record(candidate)
            self._watch(candidate)
            self._apply(self.lifecycle.handle(EngineStarted(pool_id=self.spec.pool_id, engine_url=candidate.url,
                                                            pid=candidate.pid), self.now()))
            self._write_handoff()
            if old_engine is not None:
                self._spawn_task(self._retire(old_engine))
        finally:
            self.reloading = None

    def _reload_failed(self, new_ref: str, error: str) -> None:
        self.notice = f"reload to {new_ref} failed, rolled back to {self.spec.model_ref}: {error}"
        log.error("pool %s: %s", self.spec.pool_id, self.notice)
        if self.engine is not None and self.lifecycle.ready:
            self._write_handoff()

    async def _wait_healthy(self, engine: Engine, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if engine.proc is not None and engine.proc.returncode is not None:
                return f"engine exited with status {engine.proc.returncode}"
            try:
                async with self.session.get(f"{engine.url}/health") as resp:
                    if resp.status == 200:
                        return None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            await asyncio.sleep(0.1)
        return f"engine not healthy within {timeout_s:.0f} s"

    async def _retire(self, engine: Engine, grace_s: float = 60.0) -> None:
        """Let the old engine finish what it is streaming, then stop it."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                async with self.session.get(f"{engine.url}/slots") as resp:
                    slots = orjson.loads(await resp.read()) if resp.status == 200 else []
                if not any(isinstance(x, dict) and x.get("is_processing") for x in slots):
                    break
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, orjson.JSONDecodeError):
                break
            await asyncio.sleep(0.2)
        await engine.stop()

    async def stop_engine(self, reason: str) -> None:
        """Stop the engine for good (a drained pool); no restart until a reload."""
        engine = self.engine
        self.drains += 1
        self._apply(self.lifecycle.handle(DrainRequested(pool_id=self.spec.pool_id, deadline_ms=0), self.now()))
        if engine is not None:  # the lifecycle's StopEngine is under way: wait for it
            await engine.wait()
        log.info("pool %s: engine stopped (%s)", self.spec.pool_id, reason)

    def announce(self) -> bool:
        """Write the handoff file again when the engine is ready (a restarted pool-managerd, whose
        predecessor consumed the first one, learns of the pool from it); False when not ready."""
        if self.lifecycle.state is not PoolState.READY or self.engine is None or self.model_path is None \
                or self.stopping:
            return False
        self._write_handoff()
        return True

    def view(self) -> dict:
        e = self.engine
        return {"pool_id": self.spec.pool_id, "replica_id": self.spec.replica_id, "state": self.lifecycle.state.value,
                "model_ref": self.spec.model_ref, "engine_url": e.url if e else None, "pid": e.pid if e else None,
                "reloading": self.reloading, "notice": self.notice, "last_error": self.lifecycle.last_error,
                "restarts": self.lifecycle.restarts, "breaker": self.lifecycle.breaker.state.value}

    # -- the lifecycle's commands ---------------------------------------------------------------

    def _apply(self, commands: list) -> None:
        for cmd in commands:
            if isinstance(cmd, ProbeHealth):
                self._spawn_task(self._probe())
            elif isinstance(cmd, StartEngine):
                self._spawn_task(self._restart(cmd.attempt))
            elif isinstance(cmd, StopEngine):
                if self.engine is not None:
                    self._spawn_task(self.engine.stop())
            elif isinstance(cmd, PoolStateChanged):
                log.info("pool %s: %s -> %s%s", cmd.pool_id, cmd.previous, cmd.state, f" ({cmd.cause})" if cmd.cause else "")
                if cmd.state == PoolState.READY.value:
                    self._write_handoff()
                elif cmd.state in (PoolState.UNREADY.value, PoolState.FAILED.value) and \
                        cmd.previous != PoolState.PROVISIONING.value:
                    # pool-managerd learns of the outage and its cause now, not at the next probe
                    write_handoff(self.settings.handoff_dir, Handoff(
                        pool_id=self.spec.pool_id, replica_id=self.spec.replica_id, url="",
                        error=cmd.cause or "engine failed", provisioning_mode=self.spec.mode,
                        model_id=self.spec.model_ref, slots_total=self.spec.slots))
        self.wake.set()

    async def _restart(self, attempt: int) -> None:
        log.info("pool %s: restarting the engine (attempt %s)", self.spec.pool_id, attempt)
        old = self.engine
        if old is not None and old.proc is not None and old.proc.returncode is None:
            await old.stop()
        await self.start_engine()

    async def _probe(self) -> None:
        engine = self.engine
        if engine is None:
            return
        ok, loading, detail = False, False, None
        try:
            async with self.session.get(f"{engine.url}/health") as resp:
                ok = resp.status == 200
                loading = resp.status == 503
                detail = None if ok else f"/health answered HTTP {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            detail = f"health check failed: {type(exc).__name__}: {exc}"
        if engine is self.engine:
            if not ok and engine.proc is not None and engine.proc.returncode is not None:
                return  # the exit watcher reports this one, with the exit status
            self._apply(self.lifecycle.handle(HealthChecked(pool_id=self.spec.pool_id, ok=ok, loading=loading,
                                                            detail=detail), self.now()))

    async def run(self) -> None:
        """Drive the lifecycle's timers until stopped."""
        while not self.stopping:
            now = self.now()
            due = self.lifecycle.next_deadline()
            if due is not None and due <= now:
                self._apply(self.lifecycle.handle(Tick(), now))
                continue
            self.wake.clear()
            await within(self.wake.wait(), None if due is None else (due - now) / 1000)

    async def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.lifecycle.state is not PoolState.READY:
            if self.lifecycle.state is PoolState.FAILED or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        while self._tasks:  # again while a task being stopped spawned another
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.engine is not None:
            await self.engine.stop()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()

    def _spawn_task(self, coro) -> None:
        if self.stopping:  # stop() has cancelled what runs; nothing new may start behind it
            coro.close()
            return
        spawn(coro, self._tasks, log)


class Provisioner:
    """All pools of this worker; the ``engine-provisioner`` process."""

    def __init__(self, specs: list[PoolSpec], settings: ProvisionerSettings) -> None:
        ids = [f"{s.pool_id}-{s.replica_id}" for s in specs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate pool ids in {ids}")
        self.specs = specs
        self.settings = settings
        self.supervisors: dict[str, PoolSupervisor] = {}
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> dict[str, bool]:
        """Provision and start every pool; returns which became ready within the start timeout."""
        for d in (self.settings.handoff_dir, self.settings.cache_dir, self.settings.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        for spec in self.specs:
            self.supervisors[spec.pool_id] = PoolSupervisor(spec, self.settings, self.session)

        async def bring_up(sup: PoolSupervisor) -> bool:
            if not await sup.provision():
                return False
            await sup.start_engine()
            sup._spawn_task(sup.run())
            ready = await sup.wait_ready(self.settings.start_timeout_s)
            if not ready and sup.lifecycle.state is not PoolState.FAILED:
                log.warning("pool %s: not ready after %.0f s (%s)", sup.spec.pool_id, self.settings.start_timeout_s,
                            sup.lifecycle.last_error or sup.lifecycle.state.value)
            return ready

        results = await asyncio.gather(*(bring_up(s) for s in self.supervisors.values()))
        return dict(zip(self.supervisors, results))

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.supervisors.values()), return_exceptions=True)
        if self.session is not None:
            await self.session.close()


# -- the control API: pool-managerd on the same machine asks for reloads and stops --------------

PROVISIONER = web.AppKey("provisioner", Provisioner)


def _supervisor(request: web.Request) -> PoolSupervisor:
    return pool_or_404(request.app[PROVISIONER].supervisors, request)


async def _control_health(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "pools": len(request.app[PROVISIONER].supervisors)})


async def _control_pools(request: web.Request) -> web.Response:
    return json_response({"pools": [s.view() for _, s in sorted(request.app[PROVISIONER].supervisors.items())]})


async def _control_announce(request: web.Request) -> web.Response:
    """Every ready pool's handoff file written again (pool-managerd asks when it starts)."""
    announced = [pool_id for pool_id, s in sorted(request.app[PROVISIONER].supervisors.items()) if s.announce()]
    log.info("handoff files written again for %s (asked by pool-managerd)", ", ".join(announced) or "no ready pool")
    return json_response({"announced": announced})


async def _control_reload(request: web.Request) -> web.Response:
    sup = _supervisor(request)
    ref = (await json_body(request)).get("new_model_ref")
    if not isinstance(ref, str) or not ref:
        fail(400, "INVALID_PARAMS", "new_model_ref must be a non-empty string")
    if sup.stopping:
        fail(503, "POOL_UNREADY", f"pool {sup.spec.pool_id} is shutting down", retry_after_ms=5_000)
    if sup.reloading is not None:
        fail(409, "RELOAD_IN_PROGRESS", f"pool {sup.spec.pool_id} is already reloading {sup.reloading}")
    sup.reloading = ref
    sup._spawn_task(sup.reload(ref))
    return json_response({"pool_id": sup.spec.pool_id, "reloading": ref, "serving": sup.spec.model_ref}, 202)


async def _control_stop(request: web.Request) -> web.Response:
    sup = _supervisor(request)
    await sup.stop_engine("stop requested")
    return json_response(sup.view())


def create_control_app(provisioner: Provisioner, tracing: Tracing | None = None) -> web.Application:
    names = {"/v2/pools/{pool_id}/reload": "reload_engine", "/v2/pools/{pool_id}/stop": "stop_engine",
             "/v2/handoffs/announce": "announce_handoffs"}
    app = web.Application(middlewares=[server_spans(tracing, names)] if tracing is not None else [])
    app[PROVISIONER] = provisioner
    app.router.add_get("/health", _control_health)
    app.router.add_get("/v2/pools", _control_pools)
    app.router.add_post("/v2/handoffs/announce", _control_announce)
    app.router.add_post("/v2/pools/{pool_id}/reload", _control_reload)
    app.router.add_post("/v2/pools/{pool_id}/stop", _control_stop)
    return app


def _threads(value: object, index: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"pools[{index}].threads: expected an integer >= 1, got {value!r}")
    return value


def _specs_from_args(args, env) -> list[PoolSpec]:
    if args.config:
        try:
            data = orjson.loads(Path(args.config).read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ValueError(f"config file {args.config}: {exc}") from None
        pools = data.get("pools") if isinstance(data, dict) else None
        if not isinstance(pools, list) or not pools:
            raise ValueError(f"config file {args.config}: expected {{\"pools\": [{{...}}, ...]}}")
        specs = []
        for i, p in enumerate(pools):
            if not isinstance(p, dict) or "pool_id" not in p:
                raise ValueError(f"config file {args.config}: pools[{i}] needs at least a pool_id")
            known = {"pool_id", "model", "mode", "slots", "ctx", "replica_id", "gpu_mask", "binary", "host", "threads",
                     "engine_args"}
            unknown = set(p) - known
            if unknown:
                raise ValueError(f"config file {args.config}: pools[{i}] has unknown keys {sorted(unknown)}")
            engine_args = p.get("engine_args", [])
            if not isinstance(engine_args, list) or not all(isinstance(a, str) for a in engine_args):
                raise ValueError(f"config file {args.config}: pools[{i}].engine_args must be a list of strings, "
                                 f"got {engine_args!r}")
            specs.append(PoolSpec(pool_id=p["pool_id"], model_ref=p.get("model") or args.model,
                                  mode=p.get("mode", args.mode), slots=int(p.get("slots", args.slots)),
                                  ctx=int(p.get("ctx", args.ctx)), replica_id=p.get("replica_id", "r0"),
                                  gpu_mask=str(p.get("gpu_mask", args.gpu_mask)), binary=p.get("binary", args.binary),
                                  host=p.get("host", args.host), threads=_threads(p.get("threads", args.threads), i),
                                  extra_args=tuple(engine_args)))
        return specs
    return [PoolSpec(pool_id=args.pool_id, model_ref=args.model, mode=args.mode, slots=args.slots, ctx=args.ctx,
                     gpu_mask=args.gpu_mask, binary=args.binary, host=args.host, threads=args.threads)]


def build_parser():
    import argparse

    env = os.environ.get
    numbers = Env()

    def integer(name: str, default: int) -> int:
        return numbers.integer(name, default=default, minimum=1)

    def seconds(name: str, default: float) -> float:
        return numbers.get(name, default=default, parse=float, expected="a number of seconds")

    p = argparse.ArgumentParser(prog="engine-provisioner", description="llama-orch engine provisioner for one GPU worker")
    p.add_argument("--pool-id", default=env("ENGINE_PROVISIONER_POOL_ID", "pool-0"))
    p.add_argument("--model", default=env("ENGINE_PROVISIONER_MODEL"),
                   help="file:/path.gguf, a path, https://... or hf:org/repo/file.gguf (default: the tiny model)")
    p.add_argument("--mode", choices=MODES, default=env("ENGINE_PROVISIONER_MODE", "source"))
    p.add_argument("--slots", type=int, default=integer("ENGINE_PROVISIONER_SLOTS", 2))
    p.add_argument("--ctx", type=int, default=integer("ENGINE_PROVISIONER_CTX", 2048), help="context per slot")
    p.add_argument("--handoff-dir", default=env("ENGINE_PROVISIONER_HANDOFF_DIR") or env("POOL_MANAGERD_RUNTIME_DIR")
                   or "/var/lib/llama-orch/engines")
    p.add_argument("--cache-dir", default=env("ENGINE_PROVISIONER_CACHE_DIR", "/var/cache/llama-orch"))
    p.add_argument("--state-dir", default=env("ENGINE_PROVISIONER_STATE_DIR"),
                   help="engine state files (for adoption) and engine logs; default <cache-dir>/state. Give each "
                        "provisioner on one machine its own, or they may adopt each other's engines")
    p.add_argument("--gpu-mask", default=env("ENGINE_PROVISIONER_GPU_MASK", ""))
    p.add_argument("--binary", default=env("ENGINE_PROVISIONER_BINARY"), help="llama-server path for --mode binary")
    p.add_argument("--host", default=env("ENGINE_PROVISIONER_ENGINE_HOST", "127.0.0.1"), help="engine bind address")
    p.add_argument("--threads", type=int, default=numbers.get("ENGINE_PROVISIONER_THREADS", default=None, parse=int,
                                                              expected="an integer >= 1"),
                   help="CPU threads per engine (default: llama-server's, every core). Several CPU engines on one "
                        "machine should share the cores, or they slow each other down many times over")
    p.add_argument("--config", default=env("ENGINE_PROVISIONER_CONFIG"), help='JSON {"pools": [{pool_id, model, ...}]}')
    p.add_argument("--start-timeout-s", type=float, default=seconds("ENGINE_PROVISIONER_START_TIMEOUT_S", 120.0))
    p.add_argument("--control-bind", default=env("ENGINE_PROVISIONER_CONTROL_ADDR", "127.0.0.1:9300"),
                   help="HOST:PORT of the control API that pool-managerd calls for reload and stop")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ConfigError as exc:  # a bad number in an environment variable, named
        print(f"engine-provisioner: error: {exc}", file=sys.stderr)
        return 2
    prepare("engine-provisioner")
    cache = Path(args.cache_dir).expanduser()
    if not args.model:
        from .tiny_model import write_tiny_model

        tiny = cache / "models" / "tiny.gguf"
        if not tiny.exists():
            write_tiny_model(tiny)
            log.info("no --model given: wrote the tiny model to %s", tiny)
        args.model = f"file:{tiny}"
    try:
        specs = _specs_from_args(args, os.environ)
    except ValueError as exc:
        print(f"engine-provisioner: error: {exc}", file=sys.stderr)
        return 2
    try:
        tls = TlsFiles.from_env("ENGINE_PROVISIONER", os.environ)
    except ConfigError as exc:
        print(f"engine-provisioner: error: {exc}", file=sys.stderr)
        return 2
    try:
        control = parse_address(args.control_bind)
    except ValueError:
        print(f"engine-provisioner: error: --control-bind / ENGINE_PROVISIONER_CONTROL_ADDR={args.control_bind!r}: "
              "expected HOST:PORT", file=sys.stderr)
        return 2
    settings = ProvisionerSettings(handoff_dir=Path(args.handoff_dir).expanduser(), cache_dir=cache,
                                   state_dir=Path(args.state_dir).expanduser() if args.state_dir else cache / "state",
                                   start_timeout_s=args.start_timeout_s, control=control, tls=tls)
    return asyncio.run(_serve(specs, settings))


async def _serve(specs: list[PoolSpec], settings: ProvisionerSettings) -> int:
    provisioner = Provisioner(specs, settings)
    tracing = setup_tracing("engine-provisioner")
    runner = web.AppRunner(create_control_app(provisioner, tracing), access_log=None)
    await runner.setup()
    host, port = settings.control
    tls = TlsContexts(settings.tls) if settings.tls is not None else None
    try:
        await web.TCPSite(runner, host, port, ssl_context=tls.server if tls else None).start()
    except OSError as exc:
        print(f"engine-provisioner: error: cannot listen on {host}:{port} for the control API: {exc.strerror}",
              file=sys.stderr)
        await runner.cleanup()
        return 2
    log.info("control API on %s://%s:%s", "https" if tls else "http", host, port)
    watchers: set[asyncio.Task] = set()
    if tls is not None:
        spawn(tls.watch(), watchers, log)  # a crash of the watcher is logged at once
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.ensure_future(provisioner.start())
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            results = starting.result()
            log.info("pools: %s", ", ".join(f"{k} {'ready' if v else 'NOT ready'}" for k, v in results.items()))
            await waiter
        else:
            starting.cancel()
            # let the half-done bring-up unwind before stop(), so nothing it starts outlives us
            await asyncio.gather(starting, return_exceptions=True)
    finally:
        log.info("stopping engines")
        for watcher in watchers:
            watcher.cancel()
        await provisioner.stop()
        await runner.cleanup()
        if tracing is not None:
            tracing.shutdown()
    return 0
