"""Admission queue: the pure-Python twin and specification of ``_queue_c``.

Owns the per-priority FIFO of task ids waiting for a GPU slot.  Push and pop are O(1)
amortised, cancel by id and a key's position in its class O(log n) (cancelling the
head or the tail, as a dispatch does, O(1)), and a queue of 100k ids costs little more
than the dict that indexes it.

Layout.  Each priority class is a ring buffer: a list whose length is a power of two,
a head index and a count of occupied slots.  Every append gets the ring's next
sequence number: the slot at the head has number ``base`` and the one *i* slots
behind it ``base + i``.  ``_index`` maps every live key to one int, its sequence
number and class packed together (``seq << _CLASS_BITS | class``), which locates its
slot in O(1) and is the only per-key storage besides the dict entry and the slot.

Cancelling a key overwrites its slot with ``_TOMBSTONE``; tombstones are skipped when
they reach the head and dropped when the ring is rebuilt.  A key's place in its class
is its distance from the head less the tombstones in between, which a Fenwick tree
over the slots counts in O(log n); the tree exists only while the ring holds
tombstones.  A rebuild that drops tombstones moves keys, so it renumbers the ring's
live keys in the index (amortised O(1) per push, like the rebuild itself); numbering
also restarts whenever a ring empties, which keeps the ints small.
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
#: Low bits of an index value that hold the class; the rest is the sequence number.
_CLASS_BITS = (_MAX_CLASSES - 1).bit_length()
_CLASS_MASK = (1 << _CLASS_BITS) - 1
#: A dict never shrinks when keys are deleted; once the index has held this many keys
#: it is replaced by a fresh one whenever the queue drains, so a burst's table goes.
_BIG_INDEX = 1024


class _Tombstone:
    """Fills the slot of a cancelled key; compared by identity and private, so never a key."""

    __slots__ = ()

    def __reduce__(self) -> str:
        return "_TOMBSTONE"  # the one instance, so a pickled or copied queue keeps working

    def __repr__(self) -> str:
        return "<tombstone>"


_TOMBSTONE = _Tombstone()


def _initial_slots(capacity: int) -> int:
    size = _MIN_SLOTS
    while size < capacity and size < _MAX_INITIAL_SLOTS:
        size <<= 1
    return size


class _Ring:
    """FIFO of one priority class; see the module docstring for the numbering."""

    __slots__ = (
        "priority", "initial", "slots", "mask", "head", "used", "live", "base", "tombstones",
    )

    def __init__(self, priority: int, initial: int) -> None:
        self.priority = priority
        self.initial = initial
        self.slots: list[Hashable | None] = [None] * initial
        self.mask = initial - 1
        self.head = 0
        #: occupied slots, live and tombstones
        self.used = 0
        self.live = 0
        #: sequence number of the slot at ``head``
        self.base = 0
        #: Fenwick tree (1-based) counting tombstones per slot; None while there are none
        self.tombstones: list[int] | None = None

    def append(self, key: Hashable, index: dict[Hashable, int]) -> int:
        """Put *key* at the tail and return its sequence number."""
        if self.used == len(self.slots):
            self._rebuild(index)
        offset = self.used
        self.slots[(self.head + offset) & self.mask] = key
        self.used = offset + 1
        self.live += 1
        return self.base + offset

    def _rebuild(self, index: dict[Hashable, int]) -> None:
        # Called only when every slot is occupied.  Doubling when most slots are live
        # and compacting in place of the same size when at least half are tombstones
        # both leave >= size/2 free slots for O(size) work: amortised O(1) per push.
        size = len(self.slots)
        if self.live * 2 > size:
            size <<= 1
        compacting = self.used > self.live
        self.slots = slots = self._live_keys(self.used, size)
        self.mask = size - 1
        self.head = 0
        self.used = self.live
        self.tombstones = None
        if compacting:
            # Keys behind a dropped tombstone moved up: number them afresh from 0.
            self.base = 0
            priority = self.priority
            for seq in range(self.live):
                index[slots[seq]] = seq << _CLASS_BITS | priority

    def _live_keys(self, limit: int, pad_to: int = 0) -> list[Hashable | None]:
        """The first *limit* live keys in FIFO order, padded with None to *pad_to*."""
        slots, mask, head = self.slots, self.mask, self.head
        if self.used == self.live:
            out = [slots[(head + j) & mask] for j in range(min(limit, self.used))]
        else:
            out = []
            for j in range(self.used):
                if len(out) >= limit:
                    break
                key = slots[(head + j) & mask]
                if key is not _TOMBSTONE:
                    out.append(key)
        if pad_to:
            out.extend([None] * (pad_to - len(out)))
        return out

    def _skip_tombstones(self) -> None:
        slots, mask = self.slots, self.mask
        while self.used > self.live and slots[self.head] is _TOMBSTONE:
            slots[self.head] = None
            self._count_tombstone(self.head, -1)
            self.head = (self.head + 1) & mask
            self.used -= 1
            self.base += 1

    def first(self) -> Hashable | None:
        if self.used > self.live:
            self._skip_tombstones()
        return self.slots[self.head] if self.used else None

    def popleft(self) -> Hashable | None:
        if self.used > self.live:
            self._skip_tombstones()
        if not self.used:
            return None
        head = self.head
        key = self.slots[head]
        self.slots[head] = None
        self.head = (head + 1) & self.mask
        self.used -= 1
        self.live -= 1
        self.base += 1
        if not self.used:
            # Restart the numbering (small ints) and, after a burst, release the
            # peak-sized list.
            self.reset()
        return key

    def discard(self, seq: int) -> None:
        """Account for the live key numbered *seq* having been cancelled."""
        offset = seq - self.base
        if self.live == 1:
            # Everything left would be tombstones: drop them now instead of holding
            # them until the next push reaches the end of the ring.
            self.reset()
            return
        if offset == 0:
            # The head, as when a dispatch takes the first task: a pop, no tombstone.
            self.popleft()
            return
        slot = (self.head + offset) & self.mask
        if offset == self.used - 1:
            # The tail: give the slot back.
            self.slots[slot] = None
            self.used -= 1
            self.live -= 1
            return
        if self.tombstones is None:
            # Before any change, so that a MemoryError leaves the ring as it was.
            self.tombstones = [0] * (len(self.slots) + 1)
        self.live -= 1
        self.slots[slot] = _TOMBSTONE
        self._count_tombstone(slot, 1)

    def _count_tombstone(self, slot: int, delta: int) -> None:
        tree = self.tombstones
        assert tree is not None
        size = len(self.slots)
        i = slot + 1
        while i <= size:
            tree[i] += delta
            i += i & -i

    def _tombstones_before(self, slot: int) -> int:
        """Tombstones in slots ``[0, slot)``."""
        tree = self.tombstones
        assert tree is not None
        total = 0
        while slot:
            total += tree[slot]
            slot &= slot - 1
        return total

    def position(self, seq: int) -> int:
        """Live keys ahead of the live key numbered *seq*."""
        offset = seq - self.base
        if self.used == self.live or not offset:
            return offset
        start = self.head
        end = (start + offset) & self.mask
        if start <= end:
            skipped = self._tombstones_before(end) - self._tombstones_before(start)
        else:  # the span wraps: [start, size) and [0, end)
            skipped = (self.used - self.live - self._tombstones_before(start)
                       + self._tombstones_before(end))
        return offset - skipped

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
        self.base = 0
        self.tombstones = None


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
        #: key -> ``seq << _CLASS_BITS | class``
        self._index: dict[Hashable, int] = {}
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
        index = self._index
        if key in index:
            raise KeyError(key)
        if len(index) >= self._capacity:
            raise OverflowError(f"admission queue is full ({self._capacity} keys)")
        position = ring.live
        for p in range(ring.priority):
            position += self._rings[p].live
        index[key] = ring.append(key, index) << _CLASS_BITS | ring.priority
        if len(index) > _BIG_INDEX:
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
        ring._skip_tombstones()
        return ring._live_keys(limit)  # type: ignore[return-value]

    def remove(self, key: Hashable) -> bool:
        """Cancel *key*; return False if it was not queued.  O(log n)."""
        code = self._index.pop(key, None)
        if code is None:
            return False
        try:
            self._rings[code & _CLASS_MASK].discard(code >> _CLASS_BITS)
        except MemoryError:
            self._index[key] = code  # the ring is unchanged: so is the queue
            raise
        self._release_if_drained()
        return True

    def position(self, key: Hashable) -> int | None:
        """Live keys of *key*'s own class ahead of it, or None if it is not queued.  O(log n).

        Unlike :meth:`push`'s answer this leaves out more urgent classes: add their
        :meth:`len_class` for the place in service order.
        """
        code = self._index.get(key)
        if code is None:
            return None
        return self._rings[code & _CLASS_MASK].position(code >> _CLASS_BITS)

    def priority_of(self, key: Hashable) -> int | None:
        """The class *key* is queued in, or None if it is not queued."""
        code = self._index.get(key)
        return None if code is None else code & _CLASS_MASK

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
