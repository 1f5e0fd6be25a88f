"""What a simulated engine keeps of earlier prompts: the prefix blocks its KV cache still holds.

A task's prompt is a chain of prefix blocks (a trace's ``hash_ids``); a block found in the
pool's cache is not computed again, so the task's prefill is charged only for the rest. Two
models, chosen per engine kind (``SimConfig.kv_cache``):

- ``block-lru``: vLLM's automatic prefix caching: one cache of blocks per engine, shared by
  its slots, least recently used out first, ``capacity`` blocks (None: never forgets). A
  chain is touched last block first, so its first blocks are the last to go.
- ``llamacpp-slots``: llama.cpp's server: each slot keeps the prompt it served last, and a new
  request takes the free slot whose kept prompt shares the longest prefix with its own.

Both hand back the slot taken (-1 where slots share one cache) and how many leading blocks of
the chain were found; ``release`` frees the slot when the task leaves it.
"""

from __future__ import annotations

from collections import OrderedDict

from ..core.prefix import common_prefix_length

KV_CACHE_MODELS = ("none", "block-lru", "llamacpp-slots")


class BlockLRU:
    __slots__ = ("capacity", "_blocks")

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def admit(self, chain: tuple[int, ...]) -> tuple[int, int]:
        """``(-1, leading blocks of chain already held)`` (no slot of its own); then the whole chain
        is held, as the most recent blocks."""
        blocks = self._blocks
        hit = 0
        for block in chain:
            if block not in blocks:
                break
            hit += 1
        for block in reversed(chain):
            if block in blocks:
                blocks.move_to_end(block)
            else:
                blocks[block] = None
        if self.capacity is not None:
            while len(blocks) > self.capacity:
                blocks.popitem(last=False)
        return -1, hit

    def release(self, slot: int) -> None:
        pass

    def clear(self) -> None:
        self._blocks.clear()


class SlotCaches:
    __slots__ = ("_kept", "_busy")

    def __init__(self, slots: int) -> None:
        self._kept: list[tuple[int, ...]] = [() for _ in range(slots)]
        self._busy = [False] * slots

    def admit(self, chain: tuple[int, ...]) -> tuple[int, int]:
        """``(slot, leading blocks found)``: the free slot whose kept prompt shares the longest
        prefix (the lowest slot among equals); it now keeps this chain."""
        best, best_hit = -1, -1
        for slot, kept in enumerate(self._kept):
            if self._busy[slot]:
                continue
            hit = common_prefix_length(kept, chain)
            if hit > best_hit:
                best, best_hit = slot, hit
        if best < 0:
            raise ValueError("no free slot: the simulator dispatched past the pool's slots")
        self._kept[best] = chain
        self._busy[best] = True
        return best, best_hit

    def release(self, slot: int) -> None:
        self._busy[slot] = False

    def clear(self) -> None:
        self._kept = [() for _ in self._kept]
