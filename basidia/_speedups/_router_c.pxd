# Declarations of the compiled reply router (behaviour in _router_c.pyx), the
# hand-written twin of _router_py.py.
#
# Pending calls live in an open-addressing hash table keyed by the u64
# correlation id; deadlines in a binary heap of C structs.  Neither allocates a
# Python object per call, which is where the twin spends most of its time.

from libc.stdint cimport uint64_t


cdef enum:
    # _router_py._COMPACT_SLACK: stale heap entries tolerated beyond the pending
    # calls before the heap is rebuilt (the same rule as the twin's).
    COMPACT_SLACK = 1024
    # The table never has fewer slots than this: 64 x 16 bytes, 1 KiB.  A power of
    # two, as the slot index is the hash masked.
    MIN_SLOTS = 64
    # Deadline heap entries allocated up front, and kept when the heap empties;
    # a heap grown beyond KEEP_DEADLINES (64 KiB) gives its memory back then.
    MIN_DEADLINES = 64
    KEEP_DEADLINES = 4096


cdef struct Deadline:
    # One entry of the deadline heap: the twin's (deadline, correlation id) tuple.
    double when             # the deadline, in loop time
    uint64_t cid            # the call it belongs to; stale once that call has ended


cdef class ReplyRouter:
    # The loop, and what the router calls on it for every call, bound once.
    cdef object _loop
    cdef object _create_future  # loop.create_future
    cdef dict _future_kwargs    # {"loop": loop} where that is BaseEventLoop's, else None
    cdef object _time           # loop.time, or None where that is time.monotonic()

    # Pending calls: correlation id -> future.  Linear probing over a power-of-two
    # number of slots.  The futures are kept in a list, so that the garbage
    # collector sees them; a slot of the list holds a future, _EMPTY, or _DELETED
    # (a tombstone: the probe sequences of other ids may run through it).
    cdef list _futures          # slot -> future, _EMPTY or _DELETED
    cdef uint64_t* _keys        # slot -> correlation id; meaningful only beside a future
    cdef Py_ssize_t _mask       # slots - 1
    cdef int _shift             # 64 - log2(slots): the hash keeps the top bits
    cdef Py_ssize_t _used       # pending calls
    cdef Py_ssize_t _filled     # slots that are not _EMPTY: pending calls + tombstones

    # Deadlines: a binary min-heap ordered like the twin's tuples, with stale entries.
    cdef Deadline* _heap
    cdef Py_ssize_t _heap_len
    cdef Py_ssize_t _heap_cap

    # The one timer, armed for _timer_at <= the earliest pending deadline.
    cdef object _timer          # the armed asyncio.TimerHandle, or None
    cdef double _timer_at

    cdef uint64_t _last_id      # the last correlation id given out; wraps at 2**64
    cdef public Py_ssize_t late_replies
    cdef public Py_ssize_t timeouts
    cdef object __weakref__     # weak references work, as on the twin

    cdef _arm(self, double when)
