"""Pool discovery for orchestratord: poll every pool-managerd, turn answers into core events.

Each manager in ``ORCHD_POOL_MANAGERS`` is polled (``GET /v2/pools``) every interval with a
timeout, never on a client's request path. A pool it lists becomes ``PoolUpdated`` with a
``PoolSnapshot``; a pool it stopped listing, ``PoolRemoved``. A manager that does not answer
(down, stalled, partitioned) sends nothing: its pools go stale in the core once no snapshot has
come for ``pool_stale_ms`` (no new dispatches there), while streams already running on their
engines go on as long as the engines answer. The data path does not depend on the control
plane's liveness; an engine that fails is its adapter's to report. The last
answer of each manager is kept, with its time and error, for ``GET /v2/pools`` and probes.
The events go to a callback: the driver that owns the core.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp
import orjson
from opentelemetry.trace import SpanKind

from ...core.events import Event, PoolRemoved, PoolStale, PoolUpdated
from ...core.types import PoolSnapshot
from ..tls import TlsContexts, connector, describe_failure
from ..tracing import MAX_ATTRIBUTE, Tracing, end

log = logging.getLogger("llama_orch.orchestratord.discovery")


def snapshot_from_status(status: dict, manager_url: str) -> PoolSnapshot:
    """The contract's pool status shape -> the core's snapshot (KeyError/ValueError if malformed)."""
    slots_total = int(status.get("slots_total") or 0)
    return PoolSnapshot(
        pool_id=str(status["pool_id"]), ready=bool(status.get("ready")), draining=bool(status.get("draining")),
        live=bool(status.get("live", True)), slots_total=slots_total,
        slots_free=min(slots_total, max(0, int(status.get("slots_free") or 0))),
        vram_total_bytes=max(0, int(status.get("vram_total_bytes") or 0)),
        vram_free_bytes=max(0, int(status.get("vram_free_bytes") or 0)),
        engine=str(status.get("engine") or "llamacpp"), engine_version=status.get("engine_version"),
        model_ref=str(status.get("model_ref") or ""), model_digest=status.get("model_digest"),
        sampler_profile_version=status.get("sampler_profile_version"), ctx_max=max(0, int(status.get("ctx_max") or 0)),
        device_mask=str(status.get("device_mask") or ""), replica_id=str(status.get("replica_id") or ""),
        engine_url=status.get("engine_url"), last_error=status.get("last_error"), manager_url=manager_url)


@dataclass(slots=True)
class ManagerState:
    url: str
    pools: dict[str, dict] = field(default_factory=dict)
    last_ok: float | None = None  # monotonic seconds
    last_error: str | None = None
    reachable: bool = False
    suspended: str | None = None  # why its pools are not trusted now (a stale pushed node), else None
    static: bool = False  # configured (ORCHD_POOL_MANAGERS): never removed by a node's deregistration
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one poll at a time: answers apply in order
    last_poll_span: object = None  # the last poll's span context (tracing on): placements link to it


#: How long one poll of a pool-managerd may take before it counts as unanswered.
POLL_TIMEOUT_MS = 2000


def pool_stale_ms(poll_interval_ms: int) -> int:
    """When a pool not heard of counts as stale: three polls missed, and never before a poll sent
    after its last snapshot could have timed out (with fast polling, a slow answer is not silence)."""
    return max(3 * poll_interval_ms, poll_interval_ms + POLL_TIMEOUT_MS)


class PoolDiscovery:
    def __init__(self, manager_urls: list[str], emit: Callable[[Event], None], *, interval_ms: int = 5000,
                 timeout_ms: int = POLL_TIMEOUT_MS, session: aiohttp.ClientSession | None = None,
                 on_check: Callable[[str, bool, float], None] | None = None,
                 tls: TlsContexts | None = None, tracing: Tracing | None = None) -> None:
        self.managers = {url.rstrip("/"): ManagerState(url.rstrip("/"), static=True) for url in manager_urls}
        # Which manager speaks for each pool id: only it may update, lose or remove the pool. A
        # manager's ``pools`` hold exactly the pools it owns.
        self.owners: dict[str, str] = {}
        self.emit = emit
        self.on_check = on_check  # (pool_id, ok, duration_ms) per pool per poll: the health-check metrics
        self.interval_s = interval_ms / 1000
        self.timeout = aiohttp.ClientTimeout(total=timeout_ms / 1000)
        self._session = session
        self._own_session = session is None
        self.tls = tls
        self.tracing = tracing
        self._task: asyncio.Task | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The session for pool-managerds (the cluster's CA only, with mTLS): polls, drain, reload."""
        assert self._session is not None
        return self._session

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=connector(self.tls))
        await self.poll_all()  # one round before serving, so the first requests see pools
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # gather, not a suppressed CancelledError: a cancel aimed at stop() itself still propagates
            await asyncio.gather(self._task, return_exceptions=True)
        if self._own_session and self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        """Every manager polled every interval on its own: one that is slow to answer (stopped,
        partitioned: each poll waits out its timeout) must not delay the others' polls, or their
        pools go stale too and every task is refused for one silent machine."""
        polls: set[asyncio.Task] = set()
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                for manager in list(self.managers.values()):
                    if not manager.lock.locked():  # still waiting for its last answer: not asked twice
                        task = asyncio.ensure_future(self.poll(manager))
                        polls.add(task)
                        task.add_done_callback(polls.discard)
        finally:
            for task in list(polls):
                task.cancel()
            await asyncio.gather(*polls, return_exceptions=True)

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll(m) for m in self.managers.values()))

    def add_manager(self, url: str) -> ManagerState:
        """A pool-managerd that registered itself: polled like the configured ones from now on."""
        url = url.rstrip("/")
        manager = self.managers.get(url)
        if manager is None:
            manager = self.managers[url] = ManagerState(url)
        return manager

    def remove_manager(self, url: str) -> None:
        """Forget a manager and its pools (a node that deregistered)."""
        manager = self.managers.get(url.rstrip("/"))
        if manager is None or manager.static:
            return
        del self.managers[manager.url]
        for pool_id in sorted(manager.pools):
            self.owners.pop(pool_id, None)
            self.emit(PoolRemoved(pool_id=pool_id))

    def suspend(self, url: str, reason: str) -> None:
        """Stop polling a manager until ``resume`` (its node is judged gone): its pools are stale
        for placement at once; what runs on them goes on while their engines answer."""
        manager = self.managers.get(url.rstrip("/"))
        if manager is None or manager.suspended is not None:
            return
        manager.suspended = reason
        log.warning("pool-managerd %s suspended (%s): its pools %s take no new tasks; running streams go on",
                    manager.url, reason, ", ".join(sorted(manager.pools)) or "(none)")
        for pool_id in sorted(manager.pools):
            self.emit(PoolStale(pool_id=pool_id, reason=reason))

    def resume(self, url: str) -> bool:
        """Trust a suspended manager again; True when it was suspended (poll it now)."""
        manager = self.managers.get(url.rstrip("/"))
        if manager is None or manager.suspended is None:
            return False
        manager.suspended = None
        return True

    async def poll(self, manager: ManagerState) -> None:
        async with manager.lock:
            await self._poll(manager)

    async def _poll(self, manager: ManagerState) -> None:
        assert self._session is not None
        if manager.suspended is not None:
            return
        started = time.monotonic()
        span, headers = None, None
        if self.tracing is not None:  # one trace per poll: pool-managerd's get_status is its child
            span = self.tracing.start("pool_health_check", kind=SpanKind.CLIENT,
                                      attributes={"server.address": manager.url, "pools": len(manager.pools)})
            headers = self.tracing.inject({}, span)
            manager.last_poll_span = span.get_span_context()
        try:
            async with self._session.get(f"{manager.url}/v2/pools", timeout=self.timeout, headers=headers) as resp:
                if resp.status != 200:
                    raise ValueError(f"GET /v2/pools answered HTTP {resp.status}")
                listing = orjson.loads(await resp.read())
            pools = {p["pool_id"]: p for p in listing["pools"]}
            claimed = self._claimed_elsewhere(manager, pools)
            for pool_id in claimed:
                del pools[pool_id]
            snapshots = [snapshot_from_status(p, manager.url) for p in pools.values()]
        except asyncio.CancelledError:
            end(span, outcome="canceled")  # discovery stopping: the span ends rather than lingering
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError, TypeError) as exc:
            error = describe_failure(self.tls, "pool-managerd", exc)
            end(span, outcome="error", error=error[:MAX_ATTRIBUTE])
            self._checked(manager.pools, False, started)
            if error.startswith("TLS:") and error != manager.last_error:
                # not "down": it answered, and the certificates disagree. Each new failure is logged.
                log.error("pool-managerd %s: %s; its pools %s take no new tasks once stale. Check both sides' "
                          "certificates and CA", manager.url, error, ", ".join(sorted(manager.pools)) or "(none)")
            elif manager.reachable and not error.startswith("TLS:"):
                log.warning("pool-managerd %s does not answer (%s): its pools %s take no new tasks once stale; "
                            "running streams go on", manager.url, error, ", ".join(sorted(manager.pools)) or "(none)")
            manager.reachable = False
            manager.last_error = error
            return
        end(span, outcome="ok", attributes={"pools": len(pools)})
        if manager.suspended is not None or self.managers.get(manager.url) is not manager:
            return  # suspended or removed while the answer was on its way: it must not revive the pools
        for pool_id in sorted(set(manager.pools) - set(pools)):
            if self.owners.get(pool_id) == manager.url:
                del self.owners[pool_id]
                self.emit(PoolRemoved(pool_id=pool_id))
        for snap in snapshots:
            previous = self.owner_of(snap.pool_id)
            if previous is not None and previous is not manager:
                previous.pools.pop(snap.pool_id, None)  # taken over from a manager that went quiet
            self.owners[snap.pool_id] = manager.url
            self.emit(PoolUpdated(snapshot=snap))
        manager.pools = pools
        self._checked(pools, True, started)
        manager.reachable = True
        manager.last_ok = time.monotonic()
        conflict = f"pool ids already served by another pool-managerd, ignored here: {', '.join(claimed)}"
        if claimed and manager.last_error != conflict:
            log.warning("pool-managerd %s: %s", manager.url, conflict)
        manager.last_error = conflict if claimed else None

    def _claimed_elsewhere(self, manager: ManagerState, pools: dict[str, dict]) -> list[str]:
        """Pool ids another live manager owns: the owner keeps them while it answers. Two managers
        answering for one pool id would flip its engine URL on every poll (or let a stray node
        take over another's pool); when the owner goes quiet, the next one to list it takes over."""
        claimed = []
        for pool_id in sorted(pools):
            owner = self.owner_of(pool_id)
            if owner is not None and owner is not manager and owner.reachable and owner.suspended is None:
                claimed.append(pool_id)
        return claimed

    def _checked(self, pool_ids, ok: bool, started: float) -> None:
        if self.on_check is not None:
            ms = (time.monotonic() - started) * 1000.0
            for pool_id in pool_ids:
                self.on_check(pool_id, ok, ms)

    def poll_span(self, pool_id: str):
        """The span context of the last poll of the pool's manager (tracing on), for links."""
        manager = self.owner_of(pool_id)
        return manager.last_poll_span if manager is not None else None

    def owner_of(self, pool_id: str) -> ManagerState | None:
        url = self.owners.get(pool_id)
        return self.managers.get(url) if url is not None else None
