"""Pushed node registration: which worker nodes said they exist, and which went quiet.

Rules
- A node registers with its id and the base URL of its pool-managerd; registering again
  (a restarted node, a new address) replaces the URL and counts as a heartbeat.
- A heartbeat keeps a node fresh. A node is stale ``stale_after_ms`` after its last one: its
  pools stop taking work until it is heard from again (a heartbeat or a new registration).
- Deregistration forgets the node; a heartbeat from an unknown node is refused so that the
  node registers again (the orchestrator may have restarted and lost its memory).
- ``next_deadline()`` is the moment the next fresh node would go stale; ``tick(now)`` returns
  the nodes that went stale by then. Times are milliseconds on the caller's clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .errors import UsageError
from .fsm import transition


class NodeState(Enum):
    FRESH = "fresh"
    STALE = "stale"


N = NodeState
NODE_TRANSITIONS: dict[tuple[NodeState, str], NodeState] = {
    (N.FRESH, "heartbeat"): N.FRESH,
    (N.STALE, "heartbeat"): N.FRESH,
    (N.FRESH, "silence"): N.STALE,
}
del N


@dataclass(slots=True)
class Node:
    node_id: str
    base_url: str
    registered_at: float
    last_seen: float
    state: NodeState = NodeState.FRESH
    pools: tuple[str, ...] = ()

    def go(self, trigger: str) -> None:
        self.state = transition(NODE_TRANSITIONS, self.state, trigger, what=f"node {self.node_id}")


class Nodes:
    def __init__(self, *, stale_after_ms: float = 30_000.0) -> None:
        if not stale_after_ms > 0:
            raise UsageError(f"stale_after_ms must be > 0, got {stale_after_ms}")
        self.stale_after_ms = stale_after_ms
        self._by_id: dict[str, Node] = {}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, node_id: str) -> Node | None:
        return self._by_id.get(node_id)

    def all(self) -> list[Node]:
        return [self._by_id[k] for k in sorted(self._by_id)]

    def register(self, node_id: str, base_url: str, now: float, pools: tuple[str, ...] = ()) -> tuple[Node, str | None]:
        """Register or re-register; returns the node and its previous URL when that changed."""
        if not node_id or not base_url:
            raise UsageError("a node needs an id and a base URL")
        node = self._by_id.get(node_id)
        if node is None:
            node = self._by_id[node_id] = Node(node_id=node_id, base_url=base_url, registered_at=now, last_seen=now,
                                               pools=pools)
            return node, None
        previous = node.base_url if node.base_url != base_url else None
        node.base_url = base_url
        node.pools = pools or node.pools
        node.last_seen = now
        node.go("heartbeat")
        return node, previous

    def heartbeat(self, node_id: str, now: float, pools: tuple[str, ...] | None = None) -> Node | None:
        """The node, now fresh; None when unknown (it must register)."""
        node = self._by_id.get(node_id)
        if node is None:
            return None
        node.last_seen = max(node.last_seen, now)
        if pools is not None:
            node.pools = pools
        node.go("heartbeat")
        return node

    def remove(self, node_id: str) -> Node | None:
        return self._by_id.pop(node_id, None)

    def next_deadline(self) -> float | None:
        fresh = [n.last_seen for n in self._by_id.values() if n.state is NodeState.FRESH]
        return min(fresh) + self.stale_after_ms if fresh else None

    def tick(self, now: float) -> list[Node]:
        """The fresh nodes not heard from for ``stale_after_ms`` by ``now``: now stale."""
        went_stale = []
        for node in self.all():
            if node.state is NodeState.FRESH and now >= node.last_seen + self.stale_after_ms:
                node.go("silence")
                went_stale.append(node)
        return went_stale

    def view(self, node: Node, now: float) -> dict:
        return {"node_id": node.node_id, "base_url": node.base_url, "state": node.state.value,
                "stale": node.state is NodeState.STALE, "last_seen_ms_ago": max(0, int(now - node.last_seen)),
                "pools": list(node.pools)}
