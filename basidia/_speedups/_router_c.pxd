# C types for _router_py.py, which setup.py compiles in Cython's pure-Python mode
# as the module basidia._speedups._router_c; the same source, uncompiled, is the
# pure twin.  Cython finds this file by the module name it compiles.

import cython

cdef object RpcTimeout
cdef object heapify, heappop, heappush
cdef unsigned long long _U64_MASK
cdef Py_ssize_t _COMPACT_SLACK


cdef class ReplyRouter:
    cdef object _loop
    cdef object _create_future    # loop.create_future, bound once
    cdef object _time             # the loop's clock: loop.time, or time.monotonic
    cdef dict _pending            # correlation id -> future
    cdef list _deadlines          # heap of (deadline, correlation id), stale entries included
    cdef object _timer            # the armed asyncio.TimerHandle, or None
    cdef double _timer_at         # when the armed timer fires, in loop time
    cdef unsigned long long _last_id
    cdef public Py_ssize_t late_replies
    cdef public Py_ssize_t timeouts

    @cython.locals(now=cython.double, deadline=cython.double, pending=dict, deadlines=list)
    cpdef tuple create(self, double timeout)

    cpdef bint resolve(self, object correlation_id, object reply) except -1

    cpdef bint fail(self, object correlation_id, object exc) except -1

    cpdef discard(self, object correlation_id)

    @cython.locals(pending=dict)
    cpdef Py_ssize_t fail_all(self, object exc) except -1

    cdef _arm(self, double when)

    @cython.locals(now=cython.double, deadline=cython.double, pending=dict, deadlines=list)
    cpdef _on_timer(self)
