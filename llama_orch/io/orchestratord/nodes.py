"""orchestratord's side of pushed node registration: ``/v2/nodes/*`` and the staleness timer.

A pool-managerd that knows its orchestratord registers (``POST /v2/nodes/register`` with its
node id and base URL), then heartbeats every ``heartbeat_interval_ms``. Registration adds its
URL to discovery, so its pools are polled like the configured ones. The decisions (fresh,
stale, unknown) are the core's ``Nodes``; this shell owns its one timer and turns the outcomes
into discovery actions: a stale node's pools are lost for placement until it is heard from
again; a deregistered node's pools are removed.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlparse

from aiohttp import web

from ...core.nodes import Nodes, NodeState
from ..config import NODE_ID_RULE, is_node_id
from ..http import fail, json_body, json_response
from .discovery import PoolDiscovery

log = logging.getLogger("llama_orch.orchestratord.nodes")

STALE_AFTER_MS = 30_000
HEARTBEAT_INTERVAL_MS = 10_000
MAX_NODES = 1024
#: Routes only pool-managerd calls (registration, heartbeats, deregistration, the pool-ready
#: callback): with mTLS on, they need the node's client certificate. ``GET /v2/nodes`` is the
#: operator's, and authenticates as clients do.
NODE_PATHS = ("/v2/nodes/", "/callbacks/")


class NodeService:
    def __init__(self, discovery: PoolDiscovery, *, stale_after_ms: float = STALE_AFTER_MS,
                 heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS) -> None:
        self.discovery = discovery
        self.nodes = Nodes(stale_after_ms=stale_after_ms)
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self._timer: asyncio.TimerHandle | None = None

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time() * 1000.0

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.nodes.next_deadline()
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline / 1000.0, self._fire)

    def _fire(self) -> None:
        self._timer = None
        for node in self.nodes.tick(self.now()):
            if self._vouched_for(node.base_url, node.node_id):
                continue  # the same pool-managerd is configured or another fresh node speaks for it
            log.warning("node %s (%s) is stale: no heartbeat for %.0f s; its pools take no work until it is back",
                        node.node_id, node.base_url, self.nodes.stale_after_ms / 1000)
            self.discovery.suspend(node.base_url, f"node {node.node_id} stale: no heartbeat for "
                                                  f"{self.nodes.stale_after_ms / 1000:.0f} s")
        self._arm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _vouched_for(self, base_url: str, node_id: str) -> bool:
        manager = self.discovery.managers.get(base_url.rstrip("/"))
        return (manager is not None and manager.static) or any(
            n.base_url == base_url and n.node_id != node_id and n.state is NodeState.FRESH for n in self.nodes.all())

    def _shared(self, base_url: str, node_id: str) -> bool:
        """Another node (or the static configuration) uses this pool-managerd URL too."""
        return any(n.base_url == base_url and n.node_id != node_id for n in self.nodes.all())

    async def register(self, node_id: str, base_url: str, pools: tuple[str, ...]) -> dict:
        if node_id not in self.nodes and len(self.nodes) >= MAX_NODES:
            fail(429, "ADMISSION_REJECT", f"{MAX_NODES} nodes are registered; deregister one first",
                 retry_after_ms=self.heartbeat_interval_ms)
        node, previous = self.nodes.register(node_id, base_url, self.now(), pools)
        if previous is not None and not self._shared(previous, node_id):
            self.discovery.remove_manager(previous)
        self.discovery.add_manager(base_url)
        self.discovery.resume(base_url)
        self._arm()
        log.info("node %s registered at %s", node_id, base_url)
        await self.discovery.poll(self.discovery.managers[base_url.rstrip("/")])  # its pools, at once
        return self.nodes.view(node, self.now())

    async def heartbeat(self, node_id: str, pools: tuple[str, ...] | None) -> dict | None:
        node = self.nodes.heartbeat(node_id, self.now(), pools)
        if node is None:
            return None
        self.discovery.add_manager(node.base_url)  # idempotent: a manager dropped meanwhile comes back
        if self.discovery.resume(node.base_url):
            log.info("node %s is back", node_id)
            await self.discovery.poll(self.discovery.managers[node.base_url.rstrip("/")])
        self._arm()
        return self.nodes.view(node, self.now())

    def deregister(self, node_id: str) -> bool:
        node = self.nodes.remove(node_id)
        if node is None:
            return False
        if not self._shared(node.base_url, node_id):
            self.discovery.remove_manager(node.base_url)
        self._arm()
        log.info("node %s deregistered", node_id)
        return True


NODES = web.AppKey("nodes", NodeService)


def _node_id(value: object) -> str:
    if not is_node_id(value):
        fail(400, "INVALID_PARAMS", f"node_id: expected {NODE_ID_RULE}; got {value!r}")
    return value  # type: ignore[return-value]


def _pools(body: dict) -> tuple[str, ...] | None:
    pools = body.get("pools")
    if pools is None:
        return None
    if not isinstance(pools, list) or not all(isinstance(p, str) for p in pools):
        fail(400, "INVALID_PARAMS", "pools: expected a list of pool ids")
    return tuple(pools)


async def register(request: web.Request) -> web.Response:
    body = await json_body(request)
    node_id = _node_id(body.get("node_id"))
    base_url = body.get("base_url")
    parsed = urlparse(base_url) if isinstance(base_url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        fail(400, "INVALID_PARAMS", f"base_url: expected the http(s) URL of the node's pool-managerd, got {base_url!r}")
    service = request.app[NODES]
    view = await service.register(node_id, base_url.rstrip("/"), _pools(body) or ())
    return json_response({**view, "heartbeat_interval_ms": service.heartbeat_interval_ms,
                          "stale_after_ms": int(service.nodes.stale_after_ms)})


async def heartbeat(request: web.Request) -> web.Response:
    body = await json_body(request) if request.can_read_body else {}
    node_id = request.match_info["node_id"]
    view = await request.app[NODES].heartbeat(node_id, _pools(body))
    if view is None:
        fail(404, "NODE_NOT_FOUND", f"node {node_id} is not registered; register it again")
    return json_response(view)


async def deregister(request: web.Request) -> web.Response:
    node_id = request.match_info["node_id"]
    if not request.app[NODES].deregister(node_id):
        fail(404, "NODE_NOT_FOUND", f"node {node_id} not found")
    return web.Response(status=204)


async def list_nodes(request: web.Request) -> web.Response:
    service = request.app[NODES]
    now = service.now()
    return json_response({"nodes": [service.nodes.view(n, now) for n in service.nodes.all()],
                          "stale_after_ms": int(service.nodes.stale_after_ms)})


def add_node_routes(app: web.Application, discovery: PoolDiscovery, **kw: float) -> NodeService:
    service = app[NODES] = NodeService(discovery, **kw)

    async def timer(app: web.Application):
        yield
        service.stop()

    app.cleanup_ctx.append(timer)
    app.router.add_post("/v2/nodes/register", register)
    # /v2/nodes/register is never also "DELETE /v2/nodes/{node_id}"; any other id reaches the
    # handler (one that cannot be registered is simply not found).
    node = "{node_id:(?!register$)[^/]+}"
    app.router.add_post(f"/v2/nodes/{node}/heartbeat", heartbeat)
    app.router.add_delete(f"/v2/nodes/{node}", deregister)
    app.router.add_get("/v2/nodes", list_nodes)
    return service
