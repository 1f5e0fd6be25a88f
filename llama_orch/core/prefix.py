"""Which prompt prefixes each pool's KV cache probably still holds: a bounded index per pool.

A task's prefix is a chain of block hashes (``TaskSpec.prefix``), computed by the I/O shell
from what the engine will see (or taken from a trace's block ids): block ``k``'s hash covers
blocks ``0..k``, so one equal hash means an equal prefix up to and including that block. The
core never sees the text.

The index remembers, per pool, the blocks of the tasks recently dispatched there, LRU by count
(the engine evicts from its cache too: this is an estimate, never asked of the engine). A chain
is touched last block first, so a prefix's first blocks are the most recent and leave last: a
pool that holds block ``k`` almost always holds ``0..k-1`` too, and the deepest block held is
the match. One reverse map (block -> pools holding it) makes a match O(chain length), whatever
the number of pools. A pool's entries are forgotten when its engine restarts or reloads.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, Sequence

from .errors import InvariantViolation


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """How many leading items two sequences share (an engine slot's kept prompt and a new one)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixIndex:
    __slots__ = ("_pools", "_holders", "_capacity")

    def __init__(self) -> None:
        self._pools: dict[str, OrderedDict[int, None]] = {}
        self._holders: dict[int, set[str]] = {}
        self._capacity: dict[str, int] = {}

    def set_capacity(self, pool_id: str, blocks: int) -> None:
        """How many blocks the pool's cache is taken to hold (at least 1)."""
        self._capacity[pool_id] = max(1, blocks)
        self._trim(pool_id)

    def capacity(self, pool_id: str) -> int | None:
        return self._capacity.get(pool_id)

    def blocks(self, pool_id: str) -> int:
        lru = self._pools.get(pool_id)
        return len(lru) if lru else 0

    def record(self, pool_id: str, chain: tuple[int, ...]) -> None:
        """The pool was sent this prefix: its blocks are now its most recent ones."""
        if not chain:
            return
        lru = self._pools.get(pool_id)
        if lru is None:
            lru = self._pools[pool_id] = OrderedDict()
        holders = self._holders
        for block in reversed(chain):
            if block in lru:
                lru.move_to_end(block)
            else:
                lru[block] = None
                owners = holders.get(block)
                if owners is None:
                    holders[block] = {pool_id}
                else:
                    owners.add(pool_id)
        self._trim(pool_id)

    def _trim(self, pool_id: str) -> None:
        lru = self._pools.get(pool_id)
        capacity = self._capacity.get(pool_id)
        if lru is None or capacity is None:
            return
        holders = self._holders
        while len(lru) > capacity:
            block, _ = lru.popitem(last=False)
            owners = holders[block]
            owners.discard(pool_id)
            if not owners:
                del holders[block]

    def forget(self, pool_id: str) -> None:
        """The pool's cache is gone (engine restarted, reloaded, lost or removed)."""
        lru = self._pools.pop(pool_id, None)
        if not lru:
            return
        holders = self._holders
        for block in lru:
            owners = holders[block]
            owners.discard(pool_id)
            if not owners:
                del holders[block]

    def matches(self, chain: tuple[int, ...]) -> dict[str, int]:
        """Pool -> how many leading blocks of ``chain`` it holds (pools holding none are absent)."""
        found: dict[str, int] = {}
        for depth, owners in self.deepest(chain):
            for pool_id in owners:
                found.setdefault(pool_id, depth)
        return found

    def deepest(self, chain: tuple[int, ...]) -> Iterator[tuple[int, set[str]]]:
        """``(depth, pools holding block depth-1)`` from the deepest block held down: the first
        depth at which some acceptable pool appears is the longest prefix any of them holds,
        found without visiting every holder of every block (which the whole map, ``matches``, does)."""
        holders = self._holders
        for depth in range(len(chain), 0, -1):
            owners = holders.get(chain[depth - 1])
            if owners:
                yield depth, owners

    def check(self) -> None:
        """The reverse map agrees with the per-pool LRUs (for invariant checks and tests)."""
        seen: dict[int, set[str]] = {}
        for pool_id, lru in self._pools.items():
            capacity = self._capacity.get(pool_id)
            if capacity is not None and len(lru) > capacity:
                raise InvariantViolation(f"prefix index of {pool_id} holds {len(lru)} blocks over its {capacity}")
            for block in lru:
                seen.setdefault(block, set()).add(pool_id)
        if seen != self._holders:
            raise InvariantViolation("prefix index: the reverse map disagrees with the pools' blocks")
