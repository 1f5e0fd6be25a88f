# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Admission queue: compiled build of ``_queue_py`` (the specification).

Same rings, index, numbering and tombstones as the twin; the difference is that ring
state, including the Fenwick tree of tombstones, lives in typed C fields and the hot
paths avoid Python-level attribute and method lookups.  Behaviour, including error
types and messages, is identical; the differential tests in ``tests/ext`` hold the
two together.
"""

import operator
import sys

cimport cython
from cpython.dict cimport PyDict_SetDefault
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_SET_ITEM
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from libc.stdint cimport uint32_t

__all__ = ["AdmissionQueue"]

cdef enum:
    # See the twin for why these bounds.
    _MIN_SLOTS = 8
    _MAX_INITIAL_SLOTS = 1024
    _MAX_CLASSES = 64
    _CLASS_BITS = 6  # bits of _MAX_CLASSES - 1
    _CLASS_MASK = (1 << _CLASS_BITS) - 1
    _BIG_INDEX = 1024

# Fills the slot of a cancelled key; private, so never a key.
cdef object _TOMBSTONE = object()


cdef inline void _set_slot(list slots, Py_ssize_t i, object value) noexcept:
    # slots[i] = value without the generic item-assignment path (a few % of push+pop).
    cdef PyObject *old = PyList_GET_ITEM(slots, i)
    Py_INCREF(value)
    PyList_SET_ITEM(slots, i, value)
    Py_XDECREF(old)


cdef inline Py_ssize_t _initial_slots(Py_ssize_t capacity) noexcept:
    cdef Py_ssize_t size = _MIN_SLOTS
    while size < capacity and size < _MAX_INITIAL_SLOTS:
        size <<= 1
    return size


@cython.final
cdef class _Ring:
    cdef Py_ssize_t priority
    cdef Py_ssize_t initial
    cdef list slots
    cdef Py_ssize_t mask
    cdef Py_ssize_t head
    # occupied slots, live and tombstones
    cdef Py_ssize_t used
    cdef Py_ssize_t live
    # sequence number of the slot at ``head``
    cdef Py_ssize_t base
    # Fenwick tree (1-based, len(slots) + 1 entries) counting tombstones per slot;
    # NULL while there are none.  32-bit counts: a node counts at most len(slots),
    # and 2**32 slots would be a 32 GiB list.
    cdef uint32_t *tombstones

    def __cinit__(self, Py_ssize_t priority, Py_ssize_t initial):
        self.priority = priority
        self.initial = initial
        self.slots = [None] * initial
        self.mask = initial - 1
        self.head = 0
        self.used = 0
        self.live = 0
        self.base = 0
        self.tombstones = NULL

    def __dealloc__(self):
        PyMem_Free(self.tombstones)

    cdef inline void _drop_tombstone_counts(self) noexcept:
        PyMem_Free(self.tombstones)
        self.tombstones = NULL

    cdef inline int reserve(self, dict index) except -1:
        # Split from put() so that everything that can fail happens before the key
        # enters the index; a rebuild for a push that is then refused is harmless.
        if self.used == PyList_GET_SIZE(self.slots):
            self._rebuild(index)
        return 0

    cdef inline Py_ssize_t put(self, object key) noexcept:
        """Put *key* at the tail (reserve() made room) and return its sequence number."""
        cdef Py_ssize_t offset = self.used
        _set_slot(self.slots, (self.head + offset) & self.mask, key)
        self.used = offset + 1
        self.live += 1
        return self.base + offset

    cdef int _rebuild(self, dict index) except -1:
        # Called only when every slot is occupied; doubling or same-size compaction
        # both free >= size/2 slots for O(size) work (amortised O(1) per push).
        cdef Py_ssize_t size = PyList_GET_SIZE(self.slots)
        cdef Py_ssize_t seq
        cdef bint compacting = self.used > self.live
        cdef list slots
        if self.live * 2 > size:
            size <<= 1
        slots = self._live_keys(self.used, size)
        self.slots = slots
        self.mask = size - 1
        self.head = 0
        self.used = self.live
        self._drop_tombstone_counts()
        if compacting:
            # Keys behind a dropped tombstone moved up: number them afresh from 0.
            self.base = 0
            for seq in range(self.live):
                index[<object>PyList_GET_ITEM(slots, seq)] = (seq << _CLASS_BITS) | self.priority
        return 0

    cdef list _live_keys(self, Py_ssize_t limit, Py_ssize_t pad_to):
        cdef list out = []
        cdef list slots = self.slots
        cdef Py_ssize_t j, count = 0, mask = self.mask, head = self.head
        cdef object key
        for j in range(self.used):
            if count >= limit:
                break
            key = <object>PyList_GET_ITEM(slots, (head + j) & mask)
            if key is _TOMBSTONE:
                continue
            out.append(key)
            count += 1
        if pad_to > count:
            out.extend([None] * (pad_to - count))
        return out

    cdef inline void _count_tombstone(self, Py_ssize_t slot, int delta) noexcept:
        cdef uint32_t *tree = self.tombstones
        cdef Py_ssize_t size = PyList_GET_SIZE(self.slots)
        cdef Py_ssize_t i = slot + 1
        while i <= size:
            tree[i] += delta
            i += i & -i

    cdef inline Py_ssize_t _tombstones_before(self, Py_ssize_t slot) noexcept:
        # Tombstones in slots [0, slot).
        cdef uint32_t *tree = self.tombstones
        cdef Py_ssize_t total = 0
        while slot:
            total += tree[slot]
            slot &= slot - 1
        return total

    cdef inline int _skip_tombstones(self) except -1:
        cdef list slots = self.slots
        while self.used > self.live and <object>PyList_GET_ITEM(slots, self.head) is _TOMBSTONE:
            _set_slot(slots, self.head, None)
            self._count_tombstone(self.head, -1)
            self.head = (self.head + 1) & self.mask
            self.used -= 1
            self.base += 1
        return 0

    cdef inline object first(self):
        if self.used > self.live:
            self._skip_tombstones()
        if self.used:
            return <object>PyList_GET_ITEM(self.slots, self.head)
        return None

    cdef inline object popleft(self):
        cdef Py_ssize_t head
        cdef object key
        if self.used > self.live:
            self._skip_tombstones()
        if not self.used:
            return None
        head = self.head
        key = <object>PyList_GET_ITEM(self.slots, head)
        _set_slot(self.slots, head, None)
        self.head = (head + 1) & self.mask
        self.used -= 1
        self.live -= 1
        self.base += 1
        if not self.used:
            # Restart the numbering (small ints) and release a drained burst's list.
            self.reset()
        return key

    cdef inline int discard(self, Py_ssize_t seq) except -1:
        cdef Py_ssize_t offset = seq - self.base, slot
        if self.live == 1:
            # Everything left would be tombstones: drop them now rather than hold them.
            self.reset()
            return 0
        if offset == 0:
            # The head, as when a dispatch takes the first task: a pop, no tombstone.
            self.popleft()
            return 0
        slot = (self.head + offset) & self.mask
        if offset == self.used - 1:
            # The tail: give the slot back.
            _set_slot(self.slots, slot, None)
            self.used -= 1
            self.live -= 1
            return 0
        if self.tombstones == NULL:
            # Before any change, so that a failure leaves the ring as it was.
            self.tombstones = <uint32_t *>PyMem_Calloc(
                PyList_GET_SIZE(self.slots) + 1, sizeof(uint32_t))
            if self.tombstones == NULL:
                raise MemoryError()
        self.live -= 1
        _set_slot(self.slots, slot, _TOMBSTONE)
        self._count_tombstone(slot, 1)
        return 0

    cdef inline Py_ssize_t position(self, Py_ssize_t seq) noexcept:
        # Live keys ahead of the live key numbered *seq*.
        cdef Py_ssize_t offset = seq - self.base, start, end, skipped
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

    cdef int reset(self) except -1:
        cdef Py_ssize_t j
        cdef list slots = self.slots
        if PyList_GET_SIZE(slots) > self.initial:
            self.slots = [None] * self.initial
            self.mask = self.initial - 1
        else:
            # O(used), not O(size).
            for j in range(self.used):
                _set_slot(slots, (self.head + j) & self.mask, None)
        self.head = 0
        self.used = 0
        self.live = 0
        self.base = 0
        self._drop_tombstone_counts()
        return 0


@cython.final
cdef class AdmissionQueue:
    """Bounded multi-class FIFO of hashable keys with O(1) cancel by key.

    Class 0 is served before class 1 and so on (0 = interactive, 1 = batch); within a
    class keys leave in arrival order.  *capacity* bounds the number of live keys
    over all classes together.  ``None`` cannot be a key: it is the "empty" answer
    of :meth:`pop` and :meth:`peek`.
    """

    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _num_classes
    cdef list _rings
    # key -> seq << _CLASS_BITS | class
    cdef dict _index
    cdef bint _big

    def __init__(self, capacity, num_classes=2):
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
        cdef Py_ssize_t initial = _initial_slots(self._capacity)
        self._rings = [_Ring(p, initial) for p in range(self._num_classes)]
        self._index = {}
        self._big = False

    cdef inline _Ring _ring(self, Py_ssize_t priority):
        if priority < 0 or priority >= self._num_classes:
            raise ValueError(f"priority must be in [0, {self._num_classes}), got {priority}")
        return <_Ring>PyList_GET_ITEM(self._rings, priority)

    cdef inline _Ring _ring_of(self, Py_ssize_t code):
        return <_Ring>PyList_GET_ITEM(self._rings, code & _CLASS_MASK)

    cdef inline int _forget(self, object key) except -1:
        del self._index[key]
        if self._big and not self._index:
            # Dicts never shrink on deletion: let a drained burst's table go.
            self._index = {}
            self._big = False
        return 0

    @property
    def capacity(self):
        """Maximum number of live keys over all classes."""
        return self._capacity

    @property
    def num_classes(self):
        """Number of priority classes; valid priorities are ``0 .. num_classes - 1``."""
        return self._num_classes

    @property
    def is_full(self):
        """True when :meth:`push` would raise :class:`OverflowError`."""
        return len(self._index) >= self._capacity

    def push(self, key, Py_ssize_t priority):
        """Append *key* to class *priority*; return its 0-based place in service order.

        The place counts the live keys of every more urgent class plus those already
        in the key's own class.  Raises TypeError for a None key, ValueError for a
        bad priority, KeyError if *key* is already queued and OverflowError when the
        queue is full.
        """
        cdef Py_ssize_t position, p, size
        if key is None:
            raise TypeError("AdmissionQueue keys must not be None")
        cdef _Ring ring = self._ring(priority)
        cdef dict index = self._index
        size = len(index)
        if size >= self._capacity:
            if key in index:
                raise KeyError(key)
            raise OverflowError(f"admission queue is full ({self._capacity} keys)")
        ring.reserve(index)
        # One hash lookup for "is it queued?" and "index it": the dict only grows if
        # the key was absent.  The slot is not taken until then.
        PyDict_SetDefault(index, key, ((ring.base + ring.used) << _CLASS_BITS) | priority)
        if len(index) == size:
            raise KeyError(key)
        ring.put(key)
        if size >= _BIG_INDEX:
            self._big = True
        position = ring.live - 1
        for p in range(priority):
            position += (<_Ring>PyList_GET_ITEM(self._rings, p)).live
        return position

    def pop(self):
        """Remove and return the oldest key of the most urgent non-empty class, or None."""
        cdef Py_ssize_t p
        cdef _Ring ring
        cdef object key
        for p in range(self._num_classes):
            ring = <_Ring>PyList_GET_ITEM(self._rings, p)
            if ring.live:
                key = ring.popleft()
                self._forget(key)
                return key
        return None

    def pop_class(self, Py_ssize_t priority):
        """Remove and return the oldest key of class *priority*, or None if it is empty."""
        cdef object key = self._ring(priority).popleft()
        if key is not None:
            self._forget(key)
        return key

    def peek(self):
        """The key :meth:`pop` would return, without removing it."""
        cdef Py_ssize_t p
        cdef _Ring ring
        for p in range(self._num_classes):
            ring = <_Ring>PyList_GET_ITEM(self._rings, p)
            if ring.live:
                return ring.first()
        return None

    def head(self, Py_ssize_t priority, limit):
        """Up to *limit* oldest live keys of class *priority*, oldest first; no mutation."""
        cdef _Ring ring = self._ring(priority)
        limit = operator.index(limit)
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        ring._skip_tombstones()
        # A limit beyond the ring's size is the same as "all of them".
        return ring._live_keys(min(limit, ring.used), 0)

    def remove(self, key):
        """Cancel *key*; return False if it was not queued.  O(log n)."""
        cdef object code = self._index.pop(key, None)
        if code is None:
            return False
        cdef Py_ssize_t packed = code
        try:
            self._ring_of(packed).discard(packed >> _CLASS_BITS)
        except MemoryError:
            self._index[key] = code  # the ring is unchanged: so is the queue
            raise
        if self._big and not self._index:
            self._index = {}
            self._big = False
        return True

    def position(self, key):
        """Live keys of *key*'s own class ahead of it, or None if it is not queued.  O(log n).

        Unlike push's answer this leaves out more urgent classes: add their
        len_class for the place in service order.
        """
        cdef object code = self._index.get(key)
        if code is None:
            return None
        cdef Py_ssize_t packed = code
        return self._ring_of(packed).position(packed >> _CLASS_BITS)

    def priority_of(self, key):
        """The class *key* is queued in, or None if it is not queued."""
        cdef object code = self._index.get(key)
        if code is None:
            return None
        return (<Py_ssize_t>code) & _CLASS_MASK

    def len_class(self, Py_ssize_t priority):
        """Number of live keys in class *priority*."""
        return self._ring(priority).live

    def clear(self):
        """Drop every key and release grown ring storage."""
        cdef Py_ssize_t p
        for p in range(self._num_classes):
            (<_Ring>PyList_GET_ITEM(self._rings, p)).reset()
        self._index.clear()
        self._big = False

    def __len__(self):
        return len(self._index)

    def __contains__(self, key):
        return key in self._index

    def __iter__(self):
        """Live keys in service order, as a snapshot: mutating while iterating is safe."""
        cdef list keys = []
        cdef _Ring ring
        cdef Py_ssize_t p
        for p in range(self._num_classes):
            ring = <_Ring>PyList_GET_ITEM(self._rings, p)
            keys.extend(ring._live_keys(ring.live, 0))
        return iter(keys)

    def __repr__(self):
        sizes = ", ".join([str((<_Ring>r).live) for r in self._rings])
        return f"<AdmissionQueue {len(self._index)}/{self._capacity} keys, per class [{sizes}]>"
