"""pool-managerd: one per GPU worker. Turns the engines on this machine into pools over HTTP.

It owns the pool registry of its machine: a handoff watcher on the runtime dir (new and
changed files; a malformed or half-written file is counted and logged by name, never fatal),
one ``core.pool.PoolLifecycle`` per pool in observer mode (health probes, staleness, ready or
not; restarting engines is the provisioner's job), a health poller driven by the lifecycle's
``ProbeHealth`` commands (``/health``, then ``/slots`` and ``/props`` for slots and ctx), GPU
discovery over NVML (or system memory for CPU pools), the pool-ready callback to
orchestratord with retry and backoff, drain, reload forwarded to the local engine-provisioner,
and Prometheus metrics. The HTTP API is the contract's: ``GET /health``, ``GET /v2/pools``,
``GET /v2/pools/{id}/status``, ``POST /v2/pools/{id}/drain``, ``POST /v2/pools/{id}/reload``,
``GET /metrics``, and its OpenAPI document at ``GET /openapi.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ...core.commands import PoolStateChanged, ProbeHealth, StopEngine
from ...core.events import (
    DrainRequested,
    EngineExited,
    EngineStarted,
    HealthChecked,
    LeasesChanged,
    ProvisionFailed,
    ProvisionStarted,
    Tick,
)
from ...core.pool import PoolLifecycle, PoolPolicy, PoolState
from ..config import ConfigError, PoolManagerSettings
from ..daemon import prepare, spawn
from ..handoff import Handoff, HandoffError, read_handoff
from ..http import AccessLogger, correlation, fail, json_body, json_response, pool_or_404, serve_metrics_on
from ..openapi_doc import add_openapi_route
from ..tls import TlsContexts, connector, describe_failure
from ..tracing import Tracing, server_spans
from ..tracing import setup as setup_tracing
from ..waits import within
from .gpu import GpuDiscovery, device_label, pool_devices, select, vram_of

log = logging.getLogger("llama_orch.pool_managerd")


@dataclass(slots=True)
class Pool:
    handoff: Handoff
    lifecycle: PoolLifecycle
    file: str
    slots_total: int
    slots_free: int
    ctx_max: int
    model_ref: str
    generation: int = 0
    kv_usage: float | None = None  # share of the engine's KV cache running requests hold (``/slots``)


#: The labels of a pool's series: what its handoff says of its engine.
POOL_LABELS = ("engine", "engine_version", "pool_id", "replica_id")
NO_POOL = ("", "", "", "")  # the pool labels of a device no pool uses


def pool_labels(handoff: Handoff) -> tuple[str, str, str, str]:
    return handoff.engine, handoff.engine_version or "unknown", handoff.pool_id, handoff.replica_id or "unknown"


def _forget(metric, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def kv_cache_usage(slots: object) -> float | None:
    """The share of an engine's KV cache (its slots' contexts together) that running requests hold,
    from llama-server's ``/slots``: a running slot holds ``n_past`` tokens where it says so, else
    ``n_prompt_tokens`` (which today's llama-server counts with the generated tokens); an idle
    slot's kept prompt is there for reuse, not held. None when no slot says its context size."""
    if not isinstance(slots, list):
        return None
    total = used = 0
    for slot in slots:
        if not isinstance(slot, dict):
            continue
        n_ctx = slot.get("n_ctx")
        if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx <= 0:
            continue
        total += n_ctx
        if slot.get("is_processing"):
            held = slot.get("n_past")
            if not isinstance(held, int) or isinstance(held, bool):
                held = slot.get("n_prompt_tokens")
            if isinstance(held, int) and not isinstance(held, bool) and held > 0:
                used += min(held, n_ctx)
    return used / total if total else None


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.handoffs = Counter("pool_handoff_files_processed", "Handoff files processed", ["pool_id", "outcome"], registry=r)
        self.handoff_ms = Histogram("pool_handoff_processing_duration_ms", "Time to process a handoff file (ms)",
                                    ["pool_id"], registry=r, buckets=(0.1, 0.5, 1, 2, 5, 10, 25, 50, 100, 250))
        self.slots_total = Gauge("pool_slots_total", "Slots of the pool's engine", ["pool_id"], registry=r)
        self.slots_free = Gauge("pool_slots_free", "Free slots of the pool's engine", ["pool_id"], registry=r)
        self.vram_total = Gauge("pool_vram_total_bytes", "VRAM of the pool's devices", ["pool_id"], registry=r)
        self.vram_free = Gauge("pool_vram_free_bytes", "Free VRAM of the pool's devices", ["pool_id"], registry=r)
        self.health = Counter("pool_health_checks", "Engine health checks", ["pool_id", "outcome"], registry=r)
        self.ready = Gauge("pool_ready", "1 when the pool is ready", ["pool_id"], registry=r)
        self.gpu_util = Gauge("gpu_utilization", "GPU utilisation (%, NVML) of a device, by the pool that uses it",
                              [*POOL_LABELS, "device"], registry=r)
        self.vram_used = Gauge("vram_used_bytes", "Memory in use on a device (NVML; the system's for a CPU pool), by "
                               "the pool that uses it", [*POOL_LABELS, "device"], registry=r)
        self.kv_usage = Gauge("kv_cache_usage_ratio", "Share of the engine's KV cache (its slots' contexts) that "
                              "running requests hold (llama-server's /slots)", POOL_LABELS, registry=r)
        self._devices: set[tuple[str, ...]] = set()  # (pool labels..., device) of the device series set
        self._kv: dict[str, tuple[str, ...]] = {}  # pool id -> the labels of its kv_cache_usage_ratio

    def set_devices(self, discovery, handoffs) -> None:
        """``gpu_utilization`` and ``vram_used_bytes``: a series per device per pool that uses it (its
        mask's devices), one with empty pool labels per device no pool uses; a pool that moved
        takes its series along (the old ones are removed)."""
        by_pool = {h.pool_id: h for h in handoffs}
        per_pool, spare = pool_devices(discovery, {pool_id: h.device_mask for pool_id, h in by_pool.items()})
        rows = [(pool_labels(by_pool[pool_id]), d) for pool_id, devices in per_pool.items() for d in devices]
        rows += [(NO_POOL, d) for d in spare]
        now: set[tuple[str, ...]] = set()
        for labels, d in rows:
            key = (*labels, device_label(d))
            now.add(key)
            self.vram_used.labels(*key).set(d.vram_total_bytes - d.vram_free_bytes)
            if d.utilization_pct is not None:
                self.gpu_util.labels(*key).set(d.utilization_pct)
            else:  # NVML cannot say (some boards, MIG): absent, not 0
                _forget(self.gpu_util, key)
        for key in self._devices - now:
            _forget(self.vram_used, key)
            _forget(self.gpu_util, key)
        self._devices = now

    def set_kv(self, handoff: Handoff, ratio: float | None) -> None:
        """The pool's ``kv_cache_usage_ratio`` (None: unknown, no series), under its current labels."""
        labels = pool_labels(handoff)
        old = self._kv.pop(handoff.pool_id, None)
        if old is not None and old != labels:
            _forget(self.kv_usage, old)
        if ratio is None:
            _forget(self.kv_usage, labels)
            return
        self.kv_usage.labels(*labels).set(ratio)
        self._kv[handoff.pool_id] = labels


class PoolManager:
    """The registry and its drivers. Time is the event loop's clock in milliseconds."""

    def __init__(self, settings: PoolManagerSettings, *, gpu: GpuDiscovery | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.pools: dict[str, Pool] = {}
        self.seen_files: dict[str, tuple[int, int]] = {}
        self.malformed: dict[str, str] = {}
        self.gpu = gpu or GpuDiscovery()
        self.discovery = None
        self.session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._discovering: asyncio.Future | None = None
        self._orchd_headers: dict[str, str] = {}
        self._rng = random.Random(0)
        self.tls = TlsContexts(settings.tls) if settings.tls is not None else None
        self.tracing: Tracing | None = None  # create_app's: spans of requests served and calls made
        if self.tls is not None:
            self.metrics.registry.register(self.tls.collector("pool-managerd"))

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time() * 1000.0

    # -- lifecycle of the manager ---------------------------------------------------------------

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.health_timeout_ms / 1000),
                                             connector=connector(self.tls))
        key = self.settings.orchestratord_api_key
        self._orchd_headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.apply_gpus(self.gpu.discover())
        if self.discovery is not None and not self.discovery.nvml:
            log.warning("GPU discovery: %s; pools are CPU pools sized by system memory", self.discovery.error)
        self.settings.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.scan()
        for loop_fn in (self._watch_loop, self._timer_loop, self._gpu_loop):
            self._spawn(loop_fn())
        if self.tls is not None:
            self._spawn(self.tls.watch())
        if self.settings.orchestratord_url:
            self._spawn(self._registration_loop())
        if self.settings.provisioner_url:
            self._spawn(self._ask_for_handoffs())

    #: Waits between asks for the provisioner's handoff files at start (it may be starting too).
    ANNOUNCE_RETRY_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)

    async def _ask_for_handoffs(self) -> None:
        """A restarted pool-managerd finds no handoff file (its predecessor consumed them) while the
        provisioner's engines run on: it asks the provisioner to write them again, until it answers."""
        assert self.session is not None
        url = f"{self.settings.provisioner_url}/v2/handoffs/announce"
        for wait in (0.0, *self.ANNOUNCE_RETRY_S):
            await asyncio.sleep(wait)  # a backoff between attempts, not a wait for a condition
            try:
                async with self.session.post(url) as resp:
                    if resp.status == 200:
                        announced = orjson.loads(await resp.read()).get("announced") or []
                        log.info("engine-provisioner wrote the handoff files of %s again",
                                 ", ".join(announced) or "no ready pool")
                        return
                    if resp.status == 404:
                        log.info("engine-provisioner at %s cannot write handoff files again (HTTP 404)",
                                 self.settings.provisioner_url)
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, orjson.JSONDecodeError, AttributeError) as exc:
                error = describe_failure(self.tls, "engine-provisioner", exc)
                if error.startswith("TLS:"):  # retrying will not mend a certificate
                    log.error("engine-provisioner at %s: %s; pools appear as it writes handoff files",
                              self.settings.provisioner_url, error)
                    return
        log.warning("engine-provisioner at %s did not answer; pools appear as it writes handoff files",
                    self.settings.provisioner_url)

    async def stop(self) -> None:
        while self._tasks:  # again while a task being stopped spawned another
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._discovering is not None:
            await asyncio.gather(self._discovering, return_exceptions=True)
        if self.settings.orchestratord_url and self.session is not None:
            await self._deregister()
        if self.session is not None:
            await self.session.close()
        self.gpu.close()

    def _spawn(self, coro) -> asyncio.Task:
        return spawn(coro, self._tasks, log)

    @contextlib.contextmanager
    def _outgoing(self, name: str, headers: Mapping[str, str] | None = None, **attributes):
        """Headers for a call to a peer: with tracing on, a CLIENT span around it and its traceparent."""
        out = dict(headers or {})
        if self.tracing is None:
            yield out
            return
        with self.tracing.client_span(name, out, attributes=attributes):
            yield out

    # -- handoff watcher ------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.watch_interval_ms / 1000)
            self.scan()

    def scan(self) -> None:
        """Process new and changed handoff files; never raises for a bad file."""
        directory = self.settings.runtime_dir
        try:
            entries = [e for e in os.scandir(directory) if e.name.endswith(".json") and not e.name.startswith(".")]
        except OSError as exc:
            log.error("handoff watcher cannot read %s: %s", directory, exc.strerror)
            return
        for entry in sorted(entries, key=lambda e: e.name):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            if self.seen_files.get(entry.path) == stamp:
                continue
            self.seen_files[entry.path] = stamp
            started = time.perf_counter()
            try:
                handoff = read_handoff(entry.path)
            except HandoffError as exc:
                self.malformed[entry.name] = str(exc)
                self.metrics.handoffs.labels(pool_id=Path(entry.name).stem, outcome="malformed").inc()
                log.error("%s", exc)
                continue
            self.malformed.pop(entry.name, None)
            self.adopt(handoff, entry.path)
            self.metrics.handoffs.labels(pool_id=handoff.pool_id, outcome="ok").inc()
            self.metrics.handoff_ms.labels(pool_id=handoff.pool_id).observe((time.perf_counter() - started) * 1000)
            if self.settings.auto_delete_handoff:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                self.seen_files.pop(entry.path, None)

    def adopt(self, handoff: Handoff, path: str) -> None:
        pool = self.pools.get(handoff.pool_id)
        if pool is None:
            policy = PoolPolicy(health_interval_ms=self.settings.health_interval_ms, restart=False,
                                stale_after_misses=self.settings.stale_after_misses)
            pool = Pool(handoff=handoff, lifecycle=PoolLifecycle(handoff.pool_id, policy=policy, rng=self._rng),
                        file=path, slots_total=handoff.slots_total, slots_free=0, ctx_max=handoff.ctx,
                        model_ref=handoff.model_id or handoff.model_path)
            self.pools[handoff.pool_id] = pool
            log.info("pool %s: engine %s at %s (from %s)", handoff.pool_id, handoff.engine, handoff.url, path)
        else:
            same_engine = (handoff.url, handoff.pid) == (pool.handoff.url, pool.handoff.pid) and handoff.error is None
            pool.handoff = handoff
            pool.file = path
            pool.slots_total = handoff.slots_total
            pool.ctx_max = handoff.ctx or pool.ctx_max
            pool.model_ref = handoff.model_id or handoff.model_path
            if same_engine and pool.lifecycle.state is not PoolState.FAILED:
                return  # news about the engine we already watch (a notice): no restart of its lifecycle
            log.info("pool %s: handoff changed, engine now at %s (pid %s)", handoff.pool_id, handoff.url, handoff.pid)
            if handoff.error is None and pool.lifecycle.ready:
                self._spawn(self._switch(pool, handoff))  # a reload: stay ready while the new engine is checked
                return
        life = pool.lifecycle
        if handoff.error is not None:
            log.error("pool %s: provisioning failed: %s", handoff.pool_id, handoff.error)
            now, pid = self.now(), handoff.pool_id
            out = []
            if life.state in (PoolState.READY, PoolState.DRAINING):
                out += life.handle(EngineExited(pool_id=pid, detail=handoff.error), now)
            if life.state in (PoolState.UNKNOWN, PoolState.FAILED, PoolState.DRAINED, PoolState.UNREADY):
                out += life.handle(ProvisionStarted(pool_id=pid), now)
            if life.state in (PoolState.PROVISIONING, PoolState.STARTING):
                out += life.handle(ProvisionFailed(pool_id=pid, error=handoff.error), now)
            self._apply(pool, out)
            return
        self._apply(pool, life.handle(EngineStarted(pool_id=handoff.pool_id, engine_url=handoff.url,
                                                    pid=handoff.pid), self.now()))

    async def _switch(self, pool: Pool, handoff: Handoff) -> None:
        """Move a ready pool to its new engine without an unready gap when the engine is healthy."""
        healthy = False
        try:
            assert self.session is not None
            async with self.session.get(f"{handoff.url}/health") as resp:
                healthy = resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass
        if (pool.handoff.url, pool.handoff.pid) != (handoff.url, handoff.pid) or pool.handoff.error is not None:
            return  # superseded by another engine meanwhile (a rewrite with news of this one is not)
        if pool.lifecycle.state is PoolState.DRAINED:
            return  # drained meanwhile: the drain stopped this engine too, and must not be undone
        now, pid = self.now(), handoff.pool_id
        out = pool.lifecycle.handle(EngineStarted(pool_id=pid, engine_url=handoff.url, pid=handoff.pid), now)
        if healthy:
            out += pool.lifecycle.handle(HealthChecked(pool_id=pid, ok=True), now)
        self._apply(pool, out)

    # -- timers and health ----------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            now = self.now()
            for pool in list(self.pools.values()):
                due = pool.lifecycle.next_deadline()
                if due is not None and due <= now:
                    self._apply(pool, pool.lifecycle.handle(Tick(), now))
            deadlines = [d for p in self.pools.values() if (d := p.lifecycle.next_deadline()) is not None]
            timeout = max(0.0, (min(deadlines) - self.now()) / 1000) if deadlines else None
            self._wake.clear()
            await within(self._wake.wait(), timeout)

    def _apply(self, pool: Pool, commands: list) -> None:
        for cmd in commands:
            if isinstance(cmd, ProbeHealth):
                self._spawn(self._probe(pool, pool.generation))
            elif isinstance(cmd, StopEngine):
                if self.settings.provisioner_url:
                    self._spawn(self._stop_engine(pool))
            elif isinstance(cmd, PoolStateChanged):
                log.info("pool %s: %s -> %s%s", cmd.pool_id, cmd.previous, cmd.state,
                         f" ({cmd.cause})" if cmd.cause else "")
                self.metrics.ready.labels(pool_id=cmd.pool_id).set(1 if cmd.state == PoolState.READY.value else 0)
                if cmd.state == PoolState.READY.value:
                    pool.generation += 1
                    if self.settings.callback_url:
                        self._spawn(self._callback(pool, pool.generation))
        self._wake.set()

    async def _probe(self, pool: Pool, generation: int) -> None:
        url = pool.handoff.url
        ok, loading, detail = False, False, None
        try:
            assert self.session is not None
            async with self.session.get(f"{url}/health") as resp:
                if resp.status == 200:
                    ok = True
                elif resp.status == 503:
                    loading = True
                    detail = f"engine loading (/health 503: {(await resp.text())[:120]})"
                else:
                    detail = f"/health answered HTTP {resp.status}"
            if ok:
                await self._read_slots(pool)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            ok, detail = False, f"health check failed: {type(exc).__name__}: {exc}".rstrip(": ")
        outcome = "ok" if ok else ("loading" if loading else "failed")
        self.metrics.health.labels(pool_id=pool.handoff.pool_id, outcome=outcome).inc()
        if pool is not self.pools.get(pool.handoff.pool_id) or url != pool.handoff.url:
            return  # the pool was replaced while the probe ran
        now = self.now()
        self._apply(pool, pool.lifecycle.handle(HealthChecked(pool_id=pool.handoff.pool_id, ok=ok, loading=loading,
                                                              detail=detail), now))
        if ok:
            busy = pool.slots_total - pool.slots_free
            self._apply(pool, pool.lifecycle.handle(LeasesChanged(pool_id=pool.handoff.pool_id, active=busy), now))
        self._update_gauges(pool)

    async def _read_slots(self, pool: Pool) -> None:
        assert self.session is not None
        async with self.session.get(f"{pool.handoff.url}/slots") as resp:
            if resp.status == 200:
                slots = orjson.loads(await resp.read())
                if isinstance(slots, list) and slots:
                    pool.slots_total = len(slots)
                    pool.slots_free = sum(1 for s in slots if not s.get("is_processing"))
                    pool.kv_usage = kv_cache_usage(slots)
                    ctx = slots[0].get("n_ctx")
                    if isinstance(ctx, int) and ctx > 0:
                        pool.ctx_max = ctx
                    return
        async with self.session.get(f"{pool.handoff.url}/props") as resp:  # /slots disabled: fall back
            props = orjson.loads(await resp.read())
            pool.slots_total = int(props.get("total_slots") or pool.slots_total)
            pool.ctx_max = int((props.get("default_generation_settings") or {}).get("n_ctx") or pool.ctx_max)
            pool.slots_free = pool.slots_total
            pool.kv_usage = None  # /slots is off: nobody says

    async def _stop_engine(self, pool: Pool) -> None:
        """A drained pool's engine is stopped by the provisioner that owns the process."""
        url = f"{self.settings.provisioner_url}/v2/pools/{pool.handoff.pool_id}/stop"
        try:
            assert self.session is not None
            with self._outgoing("stop_engine", pool_id=pool.handoff.pool_id) as headers:
                async with self.session.post(url, timeout=aiohttp.ClientTimeout(total=60), headers=headers) as resp:
                    status = resp.status
            if status >= 300:
                log.warning("pool %s: provisioner refused to stop the engine: HTTP %s", pool.handoff.pool_id, status)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.warning("pool %s: could not ask the provisioner to stop the engine: %s", pool.handoff.pool_id,
                        describe_failure(self.tls, "engine-provisioner", exc))

    async def _callback(self, pool: Pool, generation: int) -> None:
        """Tell orchestratord the pool is ready; retry with capped exponential backoff."""
        delay = 0.2
        body = {"pool_id": pool.handoff.pool_id, "node_id": self.settings.node_id,
                "status_url": f"{self.advertise_url}/v2/pools/{pool.handoff.pool_id}/status"}
        while pool.generation == generation and pool.lifecycle.ready:
            try:
                assert self.session is not None
                with self._outgoing("pool_ready_callback", self._orchd_headers, pool_id=pool.handoff.pool_id) as headers:
                    async with self.session.post(self.settings.callback_url, json=body, headers=headers) as resp:
                        status = resp.status
                if status < 300:
                    return
                log.warning("pool-ready callback for %s: HTTP %s", pool.handoff.pool_id, status)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                log.warning("pool-ready callback for %s failed: %s", pool.handoff.pool_id,
                            describe_failure(self.tls, "orchestratord", exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    # -- pushed registration with orchestratord ---------------------------------------------------

    @property
    def advertise_url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return self.settings.advertise_url or f"{scheme}://{self.settings.host}:{self.settings.port}"

    async def _registration_loop(self) -> None:
        """Register, then heartbeat; register again whenever orchestratord forgot this node."""
        base = self.settings.orchestratord_url
        node = self.settings.node_id
        interval_s, delay, registered = 10.0, 0.2, False
        while True:
            pools = sorted(self.pools)
            try:
                assert self.session is not None
                if not registered:
                    with self._outgoing("register_node", self._orchd_headers, node_id=node) as headers:
                        async with self.session.post(f"{base}/v2/nodes/register", headers=headers, json={
                                "node_id": node, "base_url": self.advertise_url, "pools": pools}) as resp:
                            if resp.status != 200:
                                raise ValueError(f"register answered HTTP {resp.status}")
                            answer = orjson.loads(await resp.read())
                    interval_s = max(0.05, answer.get("heartbeat_interval_ms", 10_000) / 1000)
                    registered, delay = True, 0.2
                    log.info("registered with orchestratord %s as node %s (%s)", base, node, self.advertise_url)
                else:
                    with self._outgoing("heartbeat", self._orchd_headers, node_id=node) as headers:
                        async with self.session.post(f"{base}/v2/nodes/{node}/heartbeat", json={"pools": pools},
                                                     headers=headers) as resp:
                            status = resp.status
                    if status == 404:
                        registered = False  # orchestratord restarted: register again at once
                        continue
                    if status != 200:
                        raise ValueError(f"heartbeat answered HTTP {status}")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                log.warning("orchestratord %s: %s", base, describe_failure(self.tls, "orchestratord", exc))
                if not registered:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, interval_s)
                    continue
            await asyncio.sleep(interval_s)

    async def _deregister(self) -> None:
        try:
            assert self.session is not None
            async with self.session.delete(f"{self.settings.orchestratord_url}/v2/nodes/{self.settings.node_id}",
                                           headers=self._orchd_headers,
                                           timeout=aiohttp.ClientTimeout(total=2)) as resp:
                log.info("deregistered from orchestratord: HTTP %s", resp.status)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.warning("could not deregister from orchestratord: %s", exc)

    # -- GPUs -----------------------------------------------------------------------------------

    def apply_gpus(self, discovery) -> None:
        """Take a discovery in, on the loop: the pools and gauges are only touched from here."""
        self.discovery = discovery
        self.metrics.set_devices(discovery, [p.handoff for p in self.pools.values()])
        for pool in self.pools.values():
            self._update_gauges(pool)

    async def _gpu_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.gpu_discovery_interval_ms / 1000)
            # NVML may block, so it runs in a thread; stop() waits for a call in flight before it
            # shuts NVML down, and the result is applied back on the loop
            self._discovering = asyncio.ensure_future(asyncio.to_thread(self.gpu.discover))
            self.apply_gpus(await asyncio.shield(self._discovering))

    def vram(self, pool: Pool) -> tuple[int, int]:
        if self.discovery is None:
            return 0, 0
        try:
            return vram_of(select(self.discovery, pool.handoff.device_mask))
        except ValueError:
            return 0, 0

    def _update_gauges(self, pool: Pool) -> None:
        pid = pool.handoff.pool_id
        total, free = self.vram(pool)
        self.metrics.slots_total.labels(pool_id=pid).set(pool.slots_total)
        self.metrics.slots_free.labels(pool_id=pid).set(pool.slots_free if pool.lifecycle.ready else 0)
        self.metrics.vram_total.labels(pool_id=pid).set(total)
        self.metrics.vram_free.labels(pool_id=pid).set(free)
        self.metrics.set_kv(pool.handoff, pool.kv_usage if pool.lifecycle.ready else None)

    # -- views ----------------------------------------------------------------------------------

    def status(self, pool: Pool) -> dict:
        h = pool.handoff
        life = pool.lifecycle
        total, free = self.vram(pool)
        ready = life.ready
        return {
            "pool_id": h.pool_id, "live": life.state not in (PoolState.FAILED, PoolState.DRAINED, PoolState.UNKNOWN),
            "ready": ready, "draining": life.draining, "state": life.state.value,
            "slots_total": pool.slots_total, "slots_free": pool.slots_free if ready else 0,
            "active_leases": max(0, pool.slots_total - pool.slots_free) if ready else 0,
            "engine": h.engine, "engine_version": h.engine_version, "engine_url": h.url,
            "device_mask": h.device_mask, "vram_total_bytes": total, "vram_free_bytes": free,
            "model_ref": pool.model_ref, "ctx_max": pool.ctx_max, "replica_id": h.replica_id,
            "provisioning_mode": h.provisioning_mode, "engine_pid": h.pid,
            "last_error": life.last_error or h.notice,
        }


# -- HTTP ---------------------------------------------------------------------------------------

MANAGER = web.AppKey("manager", PoolManager)


def _pool(request: web.Request) -> Pool:
    return pool_or_404(request.app[MANAGER].pools, request)


async def health(request: web.Request) -> web.Response:
    m = request.app[MANAGER]
    d = m.discovery
    return json_response({"status": "ok", "node_id": m.settings.node_id, "pools": len(m.pools),
                  "ready_pools": sum(p.lifecycle.ready for p in m.pools.values()),
                  "nvml": bool(d and d.nvml), "malformed_handoffs": sorted(m.malformed)})


async def list_pools(request: web.Request) -> web.Response:
    m = request.app[MANAGER]
    devices = [
        {"index": d.index, "name": d.name, "uuid": d.uuid, "kind": d.kind, "vram_total_bytes": d.vram_total_bytes,
         "vram_free_bytes": d.vram_free_bytes, "utilization_pct": d.utilization_pct}
        for d in (m.discovery.devices if m.discovery else ())
    ]
    return json_response({"node_id": m.settings.node_id, "pools": [m.status(p) for _, p in sorted(m.pools.items())],
                  "devices": devices})


async def pool_status(request: web.Request) -> web.Response:
    return json_response(request.app[MANAGER].status(_pool(request)))


async def drain(request: web.Request) -> web.Response:
    pool = _pool(request)
    deadline = (await json_body(request)).get("deadline_ms", 30_000)
    if not isinstance(deadline, int) or isinstance(deadline, bool) or deadline < 0:
        fail(400, "INVALID_PARAMS", f"deadline_ms must be an integer >= 0, got {deadline!r}")
    m = request.app[MANAGER]
    m._apply(pool, pool.lifecycle.handle(DrainRequested(pool_id=pool.handoff.pool_id, deadline_ms=deadline), m.now()))
    return json_response({"pool_id": pool.handoff.pool_id, "state": pool.lifecycle.state.value, "deadline_ms": deadline}, 202)


async def reload(request: web.Request) -> web.Response:
    pool = _pool(request)
    ref = (await json_body(request)).get("new_model_ref")
    if not isinstance(ref, str) or not ref:
        fail(400, "INVALID_PARAMS", "new_model_ref must be a non-empty string")
    return await _reload(request.app[MANAGER], pool, ref)


async def undrain(request: web.Request) -> web.Response:
    """A drained pool back into service: its engine started again with the model it served."""
    pool = _pool(request)
    state = pool.lifecycle.state
    if state is not PoolState.DRAINED:
        fail(409, "POOL_NOT_DRAINED", f"pool {pool.handoff.pool_id} is {state.value}: only a drained pool can be "
                                      "undrained (a draining one finishes its drain first)")
    return await _reload(request.app[MANAGER], pool, pool.model_ref)


async def _reload(m: PoolManager, pool: Pool, ref: str) -> web.Response:
    """The provisioner owns the engines: a reload (of a drained pool too) is its to do."""
    if not m.settings.provisioner_url:
        fail(503, "PROVISIONER_UNAVAILABLE", "no engine-provisioner is configured on this node")
    url = f"{m.settings.provisioner_url}/v2/pools/{pool.handoff.pool_id}/reload"
    try:
        assert m.session is not None
        with m._outgoing("reload_engine", pool_id=pool.handoff.pool_id) as headers:
            async with m.session.post(url, json={"new_model_ref": ref}, headers=headers) as resp:
                return web.Response(body=await resp.read(), status=resp.status, content_type="application/json")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        fail(503, "PROVISIONER_UNAVAILABLE", f"engine-provisioner at {m.settings.provisioner_url}: "
                                             f"{describe_failure(m.tls, 'engine-provisioner', exc)}")


async def metrics(request: web.Request) -> web.Response:
    m = request.app[MANAGER]
    for pool in m.pools.values():
        m._update_gauges(pool)
    if m.discovery is not None:  # the pools' devices as they are now (a pool may have moved since)
        m.metrics.set_devices(m.discovery, [p.handoff for p in m.pools.values()])
    return web.Response(body=generate_latest(m.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


#: Span names of pool-managerd's routes (the contract's tree: orchestratord's health check -> get_status).
SPAN_NAMES = {"/v2/pools": "get_status", "/v2/pools/{pool_id}/status": "get_status", "/health": "health",
              "/v2/pools/{pool_id}/drain": "drain", "/v2/pools/{pool_id}/reload": "reload",
              "/v2/pools/{pool_id}/undrain": "undrain"}


def create_app(settings: PoolManagerSettings, *, gpu: GpuDiscovery | None = None,
               tracing: Tracing | None = None) -> web.Application:
    app = web.Application(middlewares=[correlation, *([server_spans(tracing, SPAN_NAMES)] if tracing else [])])
    app[MANAGER] = PoolManager(settings, gpu=gpu)
    app[MANAGER].tracing = tracing

    async def manager_ctx(app: web.Application):
        await app[MANAGER].start()
        yield
        await app[MANAGER].stop()
        if tracing is not None:
            tracing.shutdown()

    app.cleanup_ctx.append(manager_ctx)
    app.router.add_get("/health", health)
    app.router.add_get("/v2/pools", list_pools)
    app.router.add_get("/v2/pools/{pool_id}/status", pool_status)
    app.router.add_post("/v2/pools/{pool_id}/drain", drain)
    app.router.add_post("/v2/pools/{pool_id}/reload", reload)
    app.router.add_post("/v2/pools/{pool_id}/undrain", undrain)
    app.router.add_get("/metrics", metrics)
    add_openapi_route(app, "pool_managerd")
    serve_metrics_on(app, settings.host, settings.metrics_port, metrics, MANAGER)
    return app


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="pool-managerd", description="llama-orch pool manager for one GPU worker")
    parser.add_argument("--bind", help="HOST:PORT (env POOL_MANAGERD_BIND_ADDR, default 127.0.0.1:9200)")
    parser.add_argument("--runtime-dir", help="handoff directory (env POOL_MANAGERD_RUNTIME_DIR)")
    args = parser.parse_args(argv)
    prepare("pool-managerd")
    try:
        settings = PoolManagerSettings.from_env(bind=args.bind, runtime_dir=args.runtime_dir)
    except ConfigError as exc:
        print(f"pool-managerd: error: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, tracing=setup_tracing("pool-managerd"))
    tls = app[MANAGER].tls
    log.info("listening on %s://%s:%s, watching %s", "https" if tls else "http", settings.host, settings.port,
             settings.runtime_dir)
    web.run_app(app, host=settings.host, port=settings.port, print=None, ssl_context=tls.server if tls else None,
                handle_signals=True, shutdown_timeout=10, access_log_class=AccessLogger)
    return 0
