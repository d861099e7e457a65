"""Reply routing: the hand-written compiled twin of ``_router_py.py``.

It runs the twin's algorithm and keeps everything a caller can observe: the
same correlation ids, deadlines on the same clock, the one loop timer armed at
the same moments for the same times, futures failed in the same order, the
same counters and errors (tests/speedups/test_router_c_internals.py compares
the two step by step).  What differs is the bookkeeping.  The twin pays for a
dict entry, a float, an int and a tuple per call; here the futures sit in an
open-addressing table keyed by the u64 id, and the deadlines in a heap of C
structs.  The heap is a port of ``heapq``, comparing entries as the twin
compares its tuples, so that entries come off it in the twin's order.

Two calls out are made cheaper where that cannot change their meaning: on
asyncio's own loops, ``loop.create_future()`` is made as BaseEventLoop makes it
(``futures.Future(loop=loop)``), and on a future of exactly asyncio's immutable
Future type, with no instance dict, ``set_result`` is called without looking it
up.  The twin does the same for the clock: BaseEventLoop.time() is read as
time.monotonic(), which here is CPython's clock read from C.

Memory: the table owns a reference to each future it holds, in the
``_futures`` list, which also shows them to the garbage collector.  It grows,
sheds its tombstones and shrinks by rehashing; ``fail_all`` and the router's
end release everything.  Python code can run whenever the router calls out
(the loop's methods, a future's), so no slot index or heap position is
trusted across such a call.

Known differences, none reachable by a caller keeping to the twin's types:
code run by a future's own methods (a custom future type) while the timer
fires sees the router as it is, where the twin's loop keeps working on the
containers it started with; ``create`` turns ``now + timeout`` into a float at
once; and an id still pending 2**64 calls later would be in the table twice,
where the twin's dict would replace it.
"""

cimport cython
from cpython.dict cimport PyDict_GetItemWithError
from cpython.exc cimport PyErr_Clear, PyErr_ExceptionMatches, PyErr_Occurred
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_AsDouble, PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject, PyObject_Call
from libc.stdint cimport UINT64_MAX, uint64_t
from libc.stdlib cimport qsort

import asyncio
import sys
from asyncio import InvalidStateError

from basidia._speedups import _router_py
from basidia.errors import RpcTimeout

__all__ = ["ReplyRouter"]


cdef extern from "Python.h":
    # The table's slots, as borrowed and stolen references.  They cannot fail on
    # the indices the table uses, so no exception specs.
    PyObject* _get_slot "PyList_GET_ITEM"(object futures, Py_ssize_t slot)
    void _set_slot "PyList_SET_ITEM"(object futures, Py_ssize_t slot, PyObject* item)
    void _incref "Py_INCREF"(PyObject* obj)
    void _decref "Py_DECREF"(PyObject* obj)
    # No exception spec either: an int that does not fit a u64 is simply no id.
    uint64_t _as_u64 "PyLong_AsUnsignedLongLong"(object value)
    # Calls whose failure _set_result examines itself.
    PyObject* _vectorcall "PyObject_Vectorcall"(
        PyObject* callable, PyObject** args, size_t nargsf, PyObject* kwnames)
    PyObject* _call_method "PyObject_CallMethodOneArg"(object obj, object name, object arg)


cdef extern from *:
    """
    /* time.monotonic() without the Python call: CPython's own clock function and
       conversion to seconds, so the value is the one time.monotonic() gives. */
    static CYTHON_INLINE double basidia_monotonic(void) {
    #if PY_VERSION_HEX >= 0x030D0000
        PyTime_t t;
        if (PyTime_Monotonic(&t) < 0) return -1.0;
        return PyTime_AsSecondsDouble(t);
    #else
        return _PyTime_AsSecondsDouble(_PyTime_GetMonotonicClock());
    #endif
    }
    """
    double _monotonic "basidia_monotonic"() except? -1.0


cdef extern from *:
    """
    /* Whether ``obj`` may have an instance dict, which could hold an attribute
       shadowing a method of its type.  Only a dict at a fixed offset, never
       created, counts as none. */
    static CYTHON_INLINE int basidia_may_have_dict(PyObject *obj) {
        Py_ssize_t offset = Py_TYPE(obj)->tp_dictoffset;
        if (offset == 0) return 0;
        if (offset < 0) return 1;
        return *(PyObject **)((char *)obj + offset) != NULL;
    }
    """
    bint _may_have_dict "basidia_may_have_dict"(object obj) noexcept


# The constants of _router_c.pxd are compiled in; refuse to run with a build
# that disagrees with the twin.
if COMPACT_SLACK != _router_py._COMPACT_SLACK:
    raise ImportError("basidia._speedups._router_c is out of date with _router_py.py; rebuild it")

# Markers for the table's slots, never handed out, so no future is either of them.
cdef object _EMPTY = object()    # unused since the last rehash: a probe stops here
cdef object _DELETED = object()  # a tombstone: a call ended here, probes go on past it

# Fibonacci hashing: multiplying by 2**64 / golden ratio and keeping the top bits
# spreads consecutive ids evenly over the slots.
cdef uint64_t _FIBONACCI = 0x9E3779B97F4A7C15ULL
# A non-negative int k hashes to k % this (2**61 - 1 on 64-bit builds).
cdef uint64_t _HASH_MODULUS = sys.hash_info.modulus

# Where BaseEventLoop.create_future finds ``Future``.
cdef dict _FUTURES_GLOBALS = vars(sys.modules[asyncio.BaseEventLoop.__module__].futures)

# asyncio's Future type and its set_result, looked up once.  The C Future is an
# immutable type (Py_TPFLAGS_IMMUTABLETYPE, 1 << 8), so on a future of exactly
# that type without an instance dict, ``future.set_result`` is always this.
cdef type _FUTURE_TYPE = asyncio.Future if asyncio.Future.__flags__ & (1 << 8) else None
cdef object _SET_RESULT = asyncio.Future.set_result

cdef str _TIMEOUT_MESSAGE = "deadline passed before a reply arrived"


# ---- the table of pending calls ---------------------------------------------

cdef inline Py_ssize_t _find(ReplyRouter self, uint64_t cid) noexcept:
    """The slot of the pending call ``cid``, or -1."""
    cdef Py_ssize_t slot = <Py_ssize_t>((cid * _FIBONACCI) >> self._shift)
    cdef PyObject* item
    while True:  # ends: at least half of the slots are empty
        item = _get_slot(self._futures, slot)
        if item == <PyObject*>_EMPTY:
            return -1
        if self._keys[slot] == cid and item != <PyObject*>_DELETED:
            return slot
        slot = (slot + 1) & self._mask


cdef int _install_table(ReplyRouter self, Py_ssize_t slots) except -1:
    """Give the router an empty table of ``slots`` (a power of two of at least 2).

    The old table is left to the caller, which has kept ``_futures`` and ``_keys``.
    Nothing changes if memory runs out.
    """
    cdef uint64_t* keys = <uint64_t*>PyMem_Malloc(slots * sizeof(uint64_t))
    cdef int shift = 64
    cdef Py_ssize_t size = slots
    if keys is NULL:
        raise MemoryError()
    try:
        futures = [_EMPTY] * slots
    except MemoryError:
        PyMem_Free(keys)
        raise
    while size > 1:
        size >>= 1
        shift -= 1
    # Dropping a list can run finalizers, which may call the router: the old
    # one goes only when this returns, with the router in order again.
    old_futures = self._futures
    self._futures = futures
    self._keys = keys
    self._mask = slots - 1
    self._shift = shift
    self._used = 0
    self._filled = 0
    return 0


cdef int _rehash(ReplyRouter self) except -1:
    """Move the pending calls to a table at most a quarter full, without tombstones."""
    cdef list futures = self._futures
    cdef uint64_t* keys = self._keys
    cdef Py_ssize_t old_slots = self._mask + 1, slots = MIN_SLOTS, used = self._used
    cdef Py_ssize_t slot, new_slot
    cdef PyObject* item
    while slots < 4 * (used + 1):
        slots *= 2
    _install_table(self, slots)
    for slot in range(old_slots):
        item = _get_slot(futures, slot)
        if item == <PyObject*>_EMPTY or item == <PyObject*>_DELETED:
            continue
        new_slot = <Py_ssize_t>((keys[slot] * _FIBONACCI) >> self._shift)
        while _get_slot(self._futures, new_slot) != <PyObject*>_EMPTY:
            new_slot = (new_slot + 1) & self._mask
        _incref(item)  # the old list lets go of its own reference when it goes
        _decref(_get_slot(self._futures, new_slot))
        _set_slot(self._futures, new_slot, item)
        self._keys[new_slot] = keys[slot]
    self._used = self._filled = used
    PyMem_Free(keys)
    return 0


cdef int _insert(ReplyRouter self, uint64_t cid, object future) except -1:
    """Add the call ``cid``, which is not pending: ids are fresh."""
    cdef Py_ssize_t slots = self._mask + 1
    # Keep at least half of the slots empty, so that probes stay short and end;
    # and give memory back once a burst of calls has passed (under 1/16 full).
    if 2 * (self._filled + 1) > slots or (slots > MIN_SLOTS and 16 * self._used < slots):
        _rehash(self)
    cdef Py_ssize_t slot = <Py_ssize_t>((cid * _FIBONACCI) >> self._shift)
    cdef PyObject* item = _get_slot(self._futures, slot)
    while item != <PyObject*>_EMPTY and item != <PyObject*>_DELETED:
        slot = (slot + 1) & self._mask
        item = _get_slot(self._futures, slot)
    if item == <PyObject*>_EMPTY:
        self._filled += 1
    _incref(<PyObject*>future)
    _set_slot(self._futures, slot, <PyObject*>future)
    _decref(item)  # a marker, which the module keeps alive
    self._keys[slot] = cid
    self._used += 1
    return 0


cdef inline void _mark(ReplyRouter self, Py_ssize_t slot, object marker) noexcept:
    """Put ``marker`` in ``slot``, which holds a marker or a future the caller owns too."""
    cdef PyObject* item = _get_slot(self._futures, slot)
    _incref(<PyObject*>marker)
    _set_slot(self._futures, slot, <PyObject*>marker)
    _decref(item)


cdef inline object _take(ReplyRouter self, Py_ssize_t slot):
    """Remove the call in ``slot`` from the table and return its future."""
    future = <object>_get_slot(self._futures, slot)
    cdef Py_ssize_t mask = self._mask
    self._used -= 1
    if _get_slot(self._futures, (slot + 1) & mask) != <PyObject*>_EMPTY:
        _mark(self, slot, _DELETED)
        return future
    # A probe stops at an empty slot, so a slot just before one need not be a
    # tombstone, nor need the tombstones just before it.  With few calls in
    # flight this keeps the table free of tombstones, and rehashes rare.
    _mark(self, slot, _EMPTY)
    self._filled -= 1
    slot = (slot - 1) & mask
    while _get_slot(self._futures, slot) == <PyObject*>_DELETED:
        _mark(self, slot, _EMPTY)
        self._filled -= 1
        slot = (slot - 1) & mask
    return future


cdef Py_ssize_t _slot_of(ReplyRouter self, object correlation_id) except -2:
    """The slot of the pending call ``correlation_id`` names, or -1 if none."""
    if not PyLong_CheckExact(correlation_id):
        return _slot_of_other(self, correlation_id)
    cdef uint64_t cid = _as_u64(correlation_id)
    if cid == UINT64_MAX and PyErr_Occurred() != NULL:
        PyErr_Clear()  # an OverflowError: negative, or 2**64 and beyond, so no id
        return -1
    return _find(self, cid)


cdef Py_ssize_t _slot_of_other(ReplyRouter self, object correlation_id) except -2:
    """``_slot_of`` for a key that is not an exact int (a bool, a float, an enum...).

    The twin's dict finds a pending id that hashes the same and compares equal,
    so True, 1.0 and Decimal(1) all name id 1.  An id k hashes to k % modulus.
    """
    cdef Py_hash_t hashed
    cdef uint64_t cid
    cdef Py_ssize_t slot
    if self._used == 0:  # an empty dict's pop() does not even hash the key
        return -1
    hashed = hash(correlation_id)  # TypeError if unhashable, as in the twin
    cid = <uint64_t>hashed
    if hashed < 0 or cid >= _HASH_MODULUS:
        return -1
    while True:
        if _find(self, cid) >= 0 and cid == correlation_id:  # the dict's comparison
            slot = _find(self, cid)  # again: __eq__ may have changed the table
            if slot >= 0:
                return slot
        if cid > UINT64_MAX - _HASH_MODULUS:
            return -1
        cid += _HASH_MODULUS


ctypedef struct _Pending:
    uint64_t age        # how many calls were made before it, modulo 2**64
    PyObject* future    # a reference of its own


cdef int _by_age(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const _Pending*>a).age, y = (<const _Pending*>b).age
    return (x > y) - (x < y)


# ---- the deadline heap: heapq's algorithm on Deadline structs ----------------

cdef inline bint _earlier(Deadline a, Deadline b) noexcept:
    # The order of the twin's (deadline, id) tuples: by deadline, then by id.
    if a.when == b.when:
        return a.cid < b.cid
    return a.when < b.when


cdef void _sift_down(Deadline* heap, Py_ssize_t start, Py_ssize_t pos) noexcept:
    # heapq._siftdown: move heap[pos] towards the root while it is earlier than its parent.
    cdef Deadline entry = heap[pos]
    cdef Py_ssize_t parent
    while pos > start:
        parent = (pos - 1) >> 1
        if not _earlier(entry, heap[parent]):
            break
        heap[pos] = heap[parent]
        pos = parent
    heap[pos] = entry


cdef void _sift_up(Deadline* heap, Py_ssize_t length, Py_ssize_t pos) noexcept:
    # heapq._siftup: move the earlier child up until heap[pos] reaches a leaf,
    # then put it in place with _sift_down (fewer comparisons than stopping early).
    cdef Py_ssize_t start = pos
    cdef Py_ssize_t child = 2 * pos + 1
    cdef Deadline entry = heap[pos]
    while child < length:
        if child + 1 < length and not _earlier(heap[child], heap[child + 1]):
            child += 1
        heap[pos] = heap[child]
        pos = child
        child = 2 * pos + 1
    heap[pos] = entry
    _sift_down(heap, start, pos)


cdef int _grow_heap(ReplyRouter self) except -1:
    cdef Py_ssize_t capacity = 2 * self._heap_cap
    cdef Deadline* heap = <Deadline*>PyMem_Realloc(self._heap, capacity * sizeof(Deadline))
    if heap is NULL:
        raise MemoryError()
    self._heap = heap
    self._heap_cap = capacity
    return 0


cdef inline void _push_deadline(ReplyRouter self, double when, uint64_t cid) noexcept:
    """heapq.heappush; the caller has made room."""
    cdef Py_ssize_t pos = self._heap_len
    self._heap[pos].when = when
    self._heap[pos].cid = cid
    self._heap_len = pos + 1
    _sift_down(self._heap, 0, pos)


cdef inline void _pop_deadline(ReplyRouter self) noexcept:
    """heapq.heappop, the earliest entry dropped; the heap is not empty."""
    self._heap_len -= 1
    if self._heap_len:
        self._heap[0] = self._heap[self._heap_len]
        _sift_up(self._heap, self._heap_len, 0)


cdef inline void _clear_deadlines(ReplyRouter self) noexcept:
    cdef Deadline* heap
    self._heap_len = 0
    if self._heap_cap > KEEP_DEADLINES:  # shrinking cannot fail; if it does, keep it all
        heap = <Deadline*>PyMem_Realloc(self._heap, MIN_DEADLINES * sizeof(Deadline))
        if heap is not NULL:
            self._heap = heap
            self._heap_cap = MIN_DEADLINES


cdef void _compact(ReplyRouter self) noexcept:
    """Drop the stale entries, keeping the others in order, and heapify, as the twin."""
    cdef Py_ssize_t pos, kept = 0
    for pos in range(self._heap_len):
        if _find(self, self._heap[pos].cid) >= 0:
            self._heap[kept] = self._heap[pos]
            kept += 1
    self._heap_len = kept
    for pos in reversed(range(kept // 2)):
        _sift_up(self._heap, kept, pos)


cdef int _set_result(object future, object reply) except -1:
    """``future.set_result(reply)``: 1, or 0 if the future was done (InvalidStateError)."""
    cdef PyObject* args[2]
    cdef PyObject* result
    if type(future) is _FUTURE_TYPE and not _may_have_dict(future):
        args[0] = <PyObject*>future
        args[1] = <PyObject*>reply
        result = _vectorcall(<PyObject*>_SET_RESULT, args, 2, NULL)
    else:
        result = _call_method(future, "set_result", reply)
    if result is not NULL:
        _decref(result)
        return 1
    if PyErr_ExceptionMatches(InvalidStateError):
        PyErr_Clear()
        return 0
    return -1  # with the error set, so it propagates


cdef inline object _new_future(ReplyRouter self):
    """``loop.create_future()``."""
    cdef PyObject* future_class
    if self._future_kwargs is not None:
        # The name is looked up for every call, as BaseEventLoop.create_future does.
        future_class = PyDict_GetItemWithError(_FUTURES_GLOBALS, "Future")
        if future_class is not NULL:
            return PyObject_Call(<object>future_class, (), self._future_kwargs)
    return self._create_future()


cdef inline double _now(ReplyRouter self) except? -1.0:
    """The loop's time: BaseEventLoop.time() is time.monotonic()."""
    if self._time is None:
        return _monotonic()
    return self._time()


# ---- the router ---------------------------------------------------------------

# tp_clear would empty _futures under a method that a finalizer still calls;
# the futures, tasks and loop in a cycle with the router are cleared instead.
@cython.no_gc_clear
cdef class ReplyRouter:
    """Routes replies to the futures of the calls waiting for them.

    Every call registers with ``create`` and gets a fresh 64-bit correlation id
    and a future that resolves with the reply, or fails with ``RpcTimeout``
    when its deadline passes.  A reply for an id that is no longer pending
    (late, duplicate or unknown) is dropped and counted in ``late_replies``.
    """

    def __cinit__(self):
        self._heap = <Deadline*>PyMem_Malloc(MIN_DEADLINES * sizeof(Deadline))
        if self._heap is NULL:
            raise MemoryError()
        self._heap_cap = MIN_DEADLINES
        _install_table(self, MIN_SLOTS)

    def __dealloc__(self):
        # The futures go with the _futures list, after this.
        PyMem_Free(self._keys)
        PyMem_Free(self._heap)

    def __init__(self, loop):
        cdef uint64_t* keys
        self._loop = loop
        self._create_future = create_future = loop.create_future
        # BaseEventLoop.create_future() is ``futures.Future(loop=self)``: make that
        # call here, without its Python frame and the keyword dict built per call.
        if (getattr(create_future, "__func__", None) is asyncio.BaseEventLoop.create_future
                and getattr(create_future, "__self__", None) is loop):
            self._future_kwargs = {"loop": loop}
        else:
            self._future_kwargs = None
        # BaseEventLoop.time() is time.monotonic(), which _now reads without a
        # Python call; loops with a clock of their own keep it.
        self._time = None if type(loop).time is asyncio.BaseEventLoop.time else loop.time
        if self._filled:  # __init__ again: start afresh, as the twin does
            keys = self._keys
            _install_table(self, MIN_SLOTS)
            PyMem_Free(keys)
        self._heap_len = 0
        self._timer = None
        self._timer_at = 0.0
        self._last_id = 0
        self.late_replies = 0
        self.timeouts = 0

    @property
    def pending(self):
        """Calls waiting for a reply."""
        return self._used

    def create(self, timeout):
        """Register a call that expires after ``timeout`` seconds."""
        cdef double deadline
        self._last_id += 1  # wraps at 2**64, as the twin's mask makes it
        cdef uint64_t cid = self._last_id
        future = _new_future(self)
        cdef double now = _now(self)
        if PyFloat_CheckExact(timeout):
            deadline = now + PyFloat_AS_DOUBLE(timeout)
        elif PyLong_CheckExact(timeout):
            deadline = now + PyLong_AsDouble(timeout)  # what float + int does
        else:
            deadline = now + timeout  # Python's addition, then a float
        if self._heap_len == self._heap_cap:  # now, so nothing fails once the table has the call
            _grow_heap(self)
        _insert(self, cid, future)
        _push_deadline(self, deadline, cid)
        if self._heap_len > 2 * self._used + COMPACT_SLACK:
            _compact(self)
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        return cid, future

    def resolve(self, correlation_id, reply):
        """Hand ``reply`` to the waiting call; return False if none was waiting."""
        cdef Py_ssize_t slot = _slot_of(self, correlation_id)
        future = _take(self, slot) if slot >= 0 else None
        if future is None:  # (a loop's create_future may give None: the twin's dict.pop too)
            self.late_replies += 1
            return False
        if self._used == 0:
            _clear_deadlines(self)  # every entry is stale now
        if not _set_result(future, reply):  # the caller was cancelled and did not discard
            self.late_replies += 1
            return False
        return True

    def fail(self, correlation_id, exc):
        """Fail one waiting call with ``exc``; return False if it was not pending."""
        cdef Py_ssize_t slot = _slot_of(self, correlation_id)
        future = _take(self, slot) if slot >= 0 else None
        if future is None:
            return False
        if self._used == 0:
            _clear_deadlines(self)
        if not future.done():
            future.set_exception(exc)
        return True

    def discard(self, correlation_id):
        """Forget a call whose caller has gone (cancelled); a later reply counts as late."""
        cdef Py_ssize_t slot = _slot_of(self, correlation_id)
        if slot >= 0 and _take(self, slot) is not None and self._used == 0:
            _clear_deadlines(self)

    def fail_all(self, exc):
        """Fail every pending call with ``exc`` (connection lost, shutdown); disarm the timer."""
        cdef list futures = self._futures
        cdef uint64_t* keys = self._keys
        cdef Py_ssize_t slots = self._mask + 1, count = self._used, slot, n = 0, done = 0
        cdef uint64_t first = self._last_id + 1  # the oldest id that can be pending
        cdef PyObject* item
        cdef _Pending* calls = <_Pending*>PyMem_Malloc(max(count, 1) * sizeof(_Pending))
        if calls is NULL:
            raise MemoryError()
        try:
            # A fresh table, like the twin's new dict: calls made from here on
            # (while the timer is cancelled, by the futures) go there.
            _install_table(self, MIN_SLOTS)
            for slot in range(slots):
                item = _get_slot(futures, slot)
                if item != <PyObject*>_EMPTY and item != <PyObject*>_DELETED:
                    _incref(item)
                    calls[n].age = keys[slot] - first
                    calls[n].future = item
                    n += 1
            PyMem_Free(keys)
            # The twin fails them in its dict's order, the order the calls were made.
            qsort(calls, n, sizeof(_Pending), _by_age)
            _clear_deadlines(self)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            while done < n:
                future = <object>calls[done].future
                _decref(calls[done].future)  # ``future`` holds it now
                done += 1
                if not future.done():
                    future.set_exception(exc)
        finally:
            while done < n:  # after an error: let go of the rest, as the twin does
                _decref(calls[done].future)
                done += 1
            PyMem_Free(calls)
        return count

    def _stats(self):
        """The table's and the heap's sizes, for tests and debugging."""
        return {
            "slots": self._mask + 1,
            "pending": self._used,
            "tombstones": self._filled - self._used,
            "deadlines": self._heap_len,
            "deadline_capacity": self._heap_cap,
        }

    cdef _arm(self, double when):
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)
        self._timer_at = when

    def _on_timer(self):
        """Fail the calls whose deadline has passed, then re-arm for the next one."""
        cdef Deadline top
        cdef Py_ssize_t slot
        self._timer = None
        cdef double now = _now(self)
        while self._heap_len:
            if self._used == 0:
                _clear_deadlines(self)  # all stale
                return
            top = self._heap[0]
            slot = _find(self, top.cid)
            future = <object>_get_slot(self._futures, slot) if slot >= 0 else None
            if future is not None and top.when > now:
                self._arm(top.when)
                return
            _pop_deadline(self)
            if future is None:  # the call ended before its deadline
                continue
            _take(self, slot)  # no Python code has run since _find
            if not future.done():
                self.timeouts += 1
                future.set_exception(RpcTimeout(_TIMEOUT_MESSAGE))
