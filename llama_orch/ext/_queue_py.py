"""Admission queue: the pure-Python twin and specification of ``_queue_c``.

Owns the per-priority FIFO of task ids waiting for a GPU slot.  Every operation the
scheduler does per request (push, pop, cancel by id, position lookup) is O(1)
amortised, and a queue of 100k ids costs little more than the dict that indexes it.

Layout.  Each priority class is a ring buffer: a list whose length is a power of two,
a head index and a count of occupied slots.  ``_index`` maps every live key to its
class's ring.  Cancelling a key only deletes it from the index and records it in the
ring's ``stale`` multiset, so no per-key slot number (one int object per key) needs
storing; the stale copy is skipped when it reaches the head, or dropped when the
ring is rebuilt.  Within one ring a key's stale copies always precede its live copy
(a key is live at most once and was pushed after it went stale), so "skip the first
*n* copies of a key with stale count *n*" is exact.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Hashable, Iterator

__all__ = ["AdmissionQueue"]

#: Rings start at the capacity rounded up to a power of two, clamped to this range:
#: small queues never grow, large ones grow by doubling instead of reserving
#: ``capacity`` slots per class up front.
_MIN_SLOTS = 8
_MAX_INITIAL_SLOTS = 1024
#: Priority classes are a handful in practice; the bound stops a typo allocating
#: thousands of rings.
_MAX_CLASSES = 64
#: A dict never shrinks when keys are deleted; once the index has held this many keys
#: it is replaced by a fresh one whenever the queue drains, so a burst's table goes.
_BIG_INDEX = 1024


def _initial_slots(capacity: int) -> int:
    size = _MIN_SLOTS
    while size < capacity and size < _MAX_INITIAL_SLOTS:
        size <<= 1
    return size


class _Ring:
    """FIFO of one priority class; see the module docstring for the stale scheme."""

    __slots__ = ("priority", "initial", "slots", "mask", "head", "used", "live", "stale")

    def __init__(self, priority: int, initial: int) -> None:
        self.priority = priority
        self.initial = initial
        self.slots: list[Hashable | None] = [None] * initial
        self.mask = initial - 1
        self.head = 0
        #: occupied slots, live and stale
        self.used = 0
        self.live = 0
        #: key -> number of stale copies of it in ``slots``
        self.stale: dict[Hashable, int] = {}

    def append(self, key: Hashable) -> None:
        if self.used == len(self.slots):
            self._rebuild()
        self.slots[(self.head + self.used) & self.mask] = key
        self.used += 1
        self.live += 1

    def _rebuild(self) -> None:
        # Called only when every slot is occupied.  Doubling when most slots are live
        # and compacting in place of the same size when at least half are stale both
        # leave >= size/2 free slots for O(size) work: amortised O(1) per push.
        size = len(self.slots)
        if self.live * 2 > size:
            size <<= 1
        self.slots = self._live_keys(self.used, size)
        self.mask = size - 1
        self.head = 0
        self.used = self.live
        self.stale.clear()

    def _live_keys(self, limit: int, pad_to: int = 0) -> list[Hashable | None]:
        """The first *limit* live keys in FIFO order, padded with None to *pad_to*."""
        out: list[Hashable | None] = []
        slots, mask, head = self.slots, self.mask, self.head
        stale = self.stale
        # Stale copies met so far, per key; only needed while stale slots exist.
        seen: dict[Hashable, int] = {}
        for j in range(self.used):
            if len(out) >= limit:
                break
            key = slots[(head + j) & mask]
            if self.used > self.live:
                n = stale.get(key, 0)
                if n:
                    m = seen.get(key, 0)
                    if m < n:
                        seen[key] = m + 1
                        continue
            out.append(key)
        if pad_to:
            out.extend([None] * (pad_to - len(out)))
        return out

    def _skip_stale(self) -> None:
        # Only consults ``stale`` while some slot is stale, keeping the pop fast path
        # to one comparison.
        slots, mask, stale = self.slots, self.mask, self.stale
        while self.used > self.live:
            key = slots[self.head]
            n = stale.get(key, 0)
            if not n:
                return
            if n == 1:
                del stale[key]
            else:
                stale[key] = n - 1
            slots[self.head] = None
            self.head = (self.head + 1) & mask
            self.used -= 1

    def first(self) -> Hashable | None:
        self._skip_stale()
        return self.slots[self.head] if self.used else None

    def popleft(self) -> Hashable | None:
        self._skip_stale()
        if not self.used:
            return None
        head = self.head
        key = self.slots[head]
        self.slots[head] = None
        self.head = (head + 1) & self.mask
        self.used -= 1
        self.live -= 1
        if not self.used and len(self.slots) > self.initial:
            # A drained burst should not pin its peak-sized list forever.
            self.reset()
        return key

    def discard(self, key: Hashable) -> None:
        """Account for *key* (live in this ring) having been cancelled."""
        self.live -= 1
        if not self.live:
            # Everything left is stale: drop it now instead of holding the cancelled
            # keys until the next push reaches the end of the ring.
            self.reset()
            return
        self.stale[key] = self.stale.get(key, 0) + 1

    def reset(self) -> None:
        if len(self.slots) > self.initial:
            self.slots = [None] * self.initial
            self.mask = self.initial - 1
        else:
            # O(used), not O(size): clearing a 1024-slot ring that held one key
            # must stay cheap.
            slots, mask, head = self.slots, self.mask, self.head
            for j in range(self.used):
                slots[(head + j) & mask] = None
        self.head = 0
        self.used = 0
        self.live = 0
        self.stale.clear()


class AdmissionQueue:
    """Bounded multi-class FIFO of hashable keys with O(1) cancel by key.

    Class 0 is served before class 1 and so on (0 = interactive, 1 = batch); within a
    class keys leave in arrival order.  *capacity* bounds the number of live keys
    over all classes together.  ``None`` cannot be a key: it is the "empty" answer
    of :meth:`pop` and :meth:`peek`.
    """

    __slots__ = ("_capacity", "_num_classes", "_rings", "_index", "_big")

    def __init__(self, capacity: int, num_classes: int = 2) -> None:
        capacity = operator.index(capacity)
        num_classes = operator.index(num_classes)
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if capacity > sys.maxsize:
            raise OverflowError(f"capacity must be <= {sys.maxsize}, got {capacity}")
        if not 1 <= num_classes <= _MAX_CLASSES:
            raise ValueError(f"num_classes must be in [1, {_MAX_CLASSES}], got {num_classes}")
        self._capacity = capacity
        self._num_classes = num_classes
        initial = _initial_slots(capacity)
        self._rings = [_Ring(p, initial) for p in range(num_classes)]
        self._index: dict[Hashable, _Ring] = {}
        self._big = False

    def _ring(self, priority: int) -> _Ring:
        if not 0 <= priority < self._num_classes:
            raise ValueError(f"priority must be in [0, {self._num_classes}), got {priority}")
        return self._rings[priority]

    @property
    def capacity(self) -> int:
        """Maximum number of live keys over all classes."""
        return self._capacity

    @property
    def num_classes(self) -> int:
        """Number of priority classes; valid priorities are ``0 .. num_classes - 1``."""
        return self._num_classes

    @property
    def is_full(self) -> bool:
        """True when :meth:`push` would raise :class:`OverflowError`."""
        return len(self._index) >= self._capacity

    def push(self, key: Hashable, priority: int) -> int:
        """Append *key* to class *priority*; return its 0-based place in service order.

        The place counts the live keys of every more urgent class plus those already
        in the key's own class, i.e. how many keys :meth:`pop` returns before it if
        nothing else arrives.

        Raises :class:`TypeError` for a ``None`` key, :class:`ValueError` for a bad
        priority, :class:`KeyError` if *key* is already queued and
        :class:`OverflowError` when the queue is full (check :attr:`is_full` first;
        refusing work is the caller's policy, not the queue's).
        """
        if key is None:
            raise TypeError("AdmissionQueue keys must not be None")
        ring = self._ring(priority)
        if key in self._index:
            raise KeyError(key)
        if len(self._index) >= self._capacity:
            raise OverflowError(f"admission queue is full ({self._capacity} keys)")
        position = ring.live
        for p in range(ring.priority):
            position += self._rings[p].live
        ring.append(key)
        self._index[key] = ring
        if len(self._index) > _BIG_INDEX:
            self._big = True
        return position

    def _forget(self, key: Hashable) -> None:
        del self._index[key]
        self._release_if_drained()

    def _release_if_drained(self) -> None:
        if self._big and not self._index:
            self._index = {}
            self._big = False

    def pop(self) -> Hashable | None:
        """Remove and return the oldest key of the most urgent non-empty class, or None."""
        for ring in self._rings:
            key = ring.popleft()
            if key is not None:
                self._forget(key)
                return key
        return None

    def pop_class(self, priority: int) -> Hashable | None:
        """Remove and return the oldest key of class *priority*, or None if it is empty."""
        key = self._ring(priority).popleft()
        if key is not None:
            self._forget(key)
        return key

    def peek(self) -> Hashable | None:
        """The key :meth:`pop` would return, without removing it."""
        for ring in self._rings:
            key = ring.first()
            if key is not None:
                return key
        return None

    def head(self, priority: int, limit: int) -> list[Hashable]:
        """Up to *limit* oldest live keys of class *priority*, oldest first; no mutation.

        Lets the scheduler look past a head-of-line task that cannot be placed yet.
        """
        ring = self._ring(priority)
        limit = operator.index(limit)
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        ring._skip_stale()
        return ring._live_keys(limit)  # type: ignore[return-value]

    def remove(self, key: Hashable) -> bool:
        """Cancel *key*; return False if it was not queued.  O(1)."""
        ring = self._index.pop(key, None)
        if ring is None:
            return False
        self._release_if_drained()
        ring.discard(key)
        return True

    def priority_of(self, key: Hashable) -> int | None:
        """The class *key* is queued in, or None if it is not queued."""
        ring = self._index.get(key)
        return None if ring is None else ring.priority

    def len_class(self, priority: int) -> int:
        """Number of live keys in class *priority*."""
        return self._ring(priority).live

    def clear(self) -> None:
        """Drop every key and release grown ring storage."""
        for ring in self._rings:
            ring.reset()
        self._index.clear()
        self._big = False

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[Hashable]:
        """Live keys in service order, as a snapshot: mutating while iterating is safe."""
        keys: list[Hashable] = []
        for ring in self._rings:
            keys.extend(ring._live_keys(ring.live))  # type: ignore[arg-type]
        return iter(keys)

    def __repr__(self) -> str:
        sizes = ", ".join(str(ring.live) for ring in self._rings)
        return f"<AdmissionQueue {len(self._index)}/{self._capacity} keys, per class [{sizes}]>"
