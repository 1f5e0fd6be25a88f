# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Admission queue: compiled build of ``_queue_py`` (the specification).

Same rings, index and stale-copy scheme as the twin; the difference is that ring
state lives in typed C fields and the hot paths avoid Python-level attribute and
method lookups.  Behaviour, including error types and messages, is identical; the
differential tests in ``tests/ext`` hold the two together.
"""

import operator
import sys

cimport cython
from cpython.dict cimport PyDict_SetDefault
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE

__all__ = ["AdmissionQueue"]

cdef enum:
    # See the twin for why these bounds.
    _MIN_SLOTS = 8
    _MAX_INITIAL_SLOTS = 1024
    _MAX_CLASSES = 64
    _BIG_INDEX = 1024


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
    # occupied slots, live and stale
    cdef Py_ssize_t used
    cdef Py_ssize_t live
    # key -> number of stale copies of it in ``slots``
    cdef dict stale

    def __cinit__(self, Py_ssize_t priority, Py_ssize_t initial):
        self.priority = priority
        self.initial = initial
        self.slots = [None] * initial
        self.mask = initial - 1
        self.head = 0
        self.used = 0
        self.live = 0
        self.stale = {}

    cdef inline int reserve(self) except -1:
        # Split from put() so that everything that can fail happens before the key
        # enters the index; a rebuild for a push that is then refused is harmless.
        if self.used == PyList_GET_SIZE(self.slots):
            self._rebuild()
        return 0

    cdef inline int put(self, object key) except -1:
        self.slots[(self.head + self.used) & self.mask] = key
        self.used += 1
        self.live += 1
        return 0

    cdef int _rebuild(self) except -1:
        # Called only when every slot is occupied; doubling or same-size compaction
        # both free >= size/2 slots for O(size) work (amortised O(1) per push).
        cdef Py_ssize_t size = PyList_GET_SIZE(self.slots)
        if self.live * 2 > size:
            size <<= 1
        self.slots = self._live_keys(self.used, size)
        self.mask = size - 1
        self.head = 0
        self.used = self.live
        self.stale.clear()
        return 0

    cdef list _live_keys(self, Py_ssize_t limit, Py_ssize_t pad_to):
        cdef list out = []
        cdef list slots = self.slots
        cdef dict stale = self.stale
        cdef dict seen = None
        cdef Py_ssize_t j, count = 0, mask = self.mask, head = self.head
        cdef bint has_stale = self.used > self.live
        cdef object key, n
        cdef Py_ssize_t m
        for j in range(self.used):
            if count >= limit:
                break
            key = <object>PyList_GET_ITEM(slots, (head + j) & mask)
            if has_stale:
                n = stale.get(key)
                if n is not None:
                    if seen is None:
                        seen = {}
                    m = seen.get(key, 0)
                    if m < <Py_ssize_t>n:
                        seen[key] = m + 1
                        continue
            out.append(key)
            count += 1
        if pad_to > count:
            out.extend([None] * (pad_to - count))
        return out

    cdef inline int _skip_stale(self) except -1:
        cdef object key, n
        while self.used > self.live:
            key = <object>PyList_GET_ITEM(self.slots, self.head)
            n = self.stale.get(key)
            if n is None:
                return 0
            if <Py_ssize_t>n == 1:
                del self.stale[key]
            else:
                self.stale[key] = <Py_ssize_t>n - 1
            self.slots[self.head] = None
            self.head = (self.head + 1) & self.mask
            self.used -= 1
        return 0

    cdef inline object first(self):
        if self.used > self.live:
            self._skip_stale()
        if self.used:
            return <object>PyList_GET_ITEM(self.slots, self.head)
        return None

    cdef inline object popleft(self):
        cdef Py_ssize_t head
        cdef object key
        if self.used > self.live:
            self._skip_stale()
        if not self.used:
            return None
        head = self.head
        key = <object>PyList_GET_ITEM(self.slots, head)
        self.slots[head] = None
        self.head = (head + 1) & self.mask
        self.used -= 1
        self.live -= 1
        if not self.used and PyList_GET_SIZE(self.slots) > self.initial:
            # A drained burst should not pin its peak-sized list forever.
            self.reset()
        return key

    cdef inline int discard(self, object key) except -1:
        self.live -= 1
        if not self.live:
            # Everything left is stale: drop it now rather than hold cancelled keys.
            self.reset()
            return 0
        # Usually the key's first stale copy: one lookup that inserts 1, and a second
        # only for a key cancelled again before its older copy was passed.
        cdef Py_ssize_t size = len(self.stale)
        cdef object n = <object>PyDict_SetDefault(self.stale, key, 1)
        if len(self.stale) == size:
            self.stale[key] = <Py_ssize_t>n + 1
        return 0

    cdef int reset(self) except -1:
        cdef Py_ssize_t j
        cdef list slots = self.slots
        if PyList_GET_SIZE(slots) > self.initial:
            self.slots = [None] * self.initial
            self.mask = self.initial - 1
        else:
            # O(used), not O(size).
            for j in range(self.used):
                slots[(self.head + j) & self.mask] = None
        self.head = 0
        self.used = 0
        self.live = 0
        self.stale.clear()
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
        ring.reserve()
        # One hash lookup for "is it queued?" and "index it": the dict only grows if
        # the key was absent.
        PyDict_SetDefault(index, key, ring)
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
        ring._skip_stale()
        # A limit beyond the ring's size is the same as "all of them".
        return ring._live_keys(min(limit, ring.used), 0)

    def remove(self, key):
        """Cancel *key*; return False if it was not queued.  O(1)."""
        cdef object ring = self._index.pop(key, None)
        if ring is None:
            return False
        if self._big and not self._index:
            self._index = {}
            self._big = False
        (<_Ring>ring).discard(key)
        return True

    def priority_of(self, key):
        """The class *key* is queued in, or None if it is not queued."""
        cdef object ring = self._index.get(key)
        if ring is None:
            return None
        return (<_Ring>ring).priority

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
