# Augments _router_py.py, the one source of the reply router, where setup.py
# compiles it in Cython's pure-Python mode as basidia._speedups._router_c.
# Cython reads the .pxd named after the module it compiles, hence the name;
# there is no _router_c.pyx.
#
# Nothing here changes what the router does: the class becomes an extension
# type whose fields are C slots, some of them typed, and _arm a C method.  The
# annotations in the .py are for mypy only (setup.py turns annotation_typing
# off for this module).
#
# docs/benchmarks.md has why there is no hand-written twin: one measured 2.7%
# fewer instructions per RPC round trip than this, below the 5% that would pay
# for a second implementation.

# The id counter is a u64 that wraps; the mask keeps the .py's arithmetic exact
# in Python, and compiled it is the identity on a u64.
cdef unsigned long long _U64_MASK
cdef Py_ssize_t _COMPACT_SLACK
cdef object _UNCLAIMED
cdef object _ABSENT


cdef class ReplyRouter:
    cdef object _loop
    cdef object _create_future      # loop.create_future, bound once
    cdef object _time               # time.monotonic or loop.time, bound once
    cdef dict _pending              # correlation id -> future, or _UNCLAIMED
    cdef dict _arrived              # correlation id -> reply come before a wait
    cdef dict _failed               # correlation id -> failure come before a wait
    cdef list _deadlines            # heap of (deadline, correlation id); may hold stale entries
    cdef object _timer              # the armed asyncio.TimerHandle, or None
    cdef double _timer_at
    cdef unsigned long long _last_id
    cdef public Py_ssize_t late_replies
    cdef public Py_ssize_t timeouts
    cdef object __weakref__         # weak references work, as on the pure-Python class

    cdef _arm(self, double when)
    cdef _settle(self, correlation_id, future, exc)
    # Called from C by the call path (_calls_c.pyx) on every call; Python sees the
    # same methods.
    cpdef object register(self, timeout)
    cpdef object take(self, correlation_id, default=*)
    cpdef object wait(self, correlation_id)
    cpdef object resolve(self, correlation_id, reply)
    cpdef object discard(self, correlation_id)
