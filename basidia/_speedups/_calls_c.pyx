# The compiled call path: an RPC call (``Call``) and the serving of one request
# (``RequestHandler``) as C awaitables, so that a round trip whose handler does not
# suspend runs no Python frame but the handler's own (docs/benchmarks.md#the-compiled-call-path).
#
# The pure-Python twins are ``RpcClient._call`` (basidia/rpc.py) and
# ``RequestServer.on_request`` with ``ServiceContainer.handle`` (basidia/_serving.py,
# basidia/container.py): every test of those runs on both cores, so the two
# implementations are held to one behaviour.  What is not on the straight line
# (a malformed or expired frame, an unknown method, a rate limit, arguments that do
# not validate, an unsendable result, a handler that raised, middleware, a limit
# shared by several entrypoints, a delivery to settle) is handed to the Python code,
# so only the common path exists twice.
#
# Each awaitable is its own iterator and implements the ``am_send`` slot
# (``PyIter_Send``): awaiting one costs a C call per step, and finishing one
# returns its result without raising ``StopIteration``.

# cython: language_level=3

from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.contextvars cimport (
    PyContext_Enter,
    PyContext_Exit,
    PyContextVar_Get,
    PyContextVar_Reset,
    PyContextVar_Set,
)

import asyncio
import asyncio.tasks
import logging
import time

import msgspec

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from libc.stdint cimport int64_t

from basidia._speedups._frames_c cimport as_limit, decode_view, encode_parts
from basidia._speedups._router_c cimport ReplyRouter

cdef extern from "Python.h":
    ctypedef int (*sendfunc)(PyObject* iter, PyObject* value, PyObject** result) except -1
    ctypedef struct PyAsyncMethods:
        sendfunc am_send
    ctypedef struct _TypeWithAsync "PyTypeObject":
        PyAsyncMethods* tp_as_async
    int PyIter_Send(object iter, object arg, PyObject** presult) except? -1
    bint PyCoro_CheckExact(object obj)

cdef enum:
    PYGEN_RETURN = 0
    PYGEN_NEXT = 1

from basidia._speedups._frame import FLAG_JSON, FLAG_KWARGS, Kind
from basidia._speedups._frames_c import decode_frame
from basidia.context import CALL_STACK_HEADER, CallContext, current_call
from basidia.errors import (
    BrokerError,
    FrameError,
    RemoteError,
    RequestNotSent,
    RpcTimeout,
    ValidationError,
)

cdef object _time = time.time
cdef object _perf_counter = time.perf_counter
cdef object _CancelledError = asyncio.CancelledError
cdef object _enter_task = asyncio.tasks._enter_task
cdef object _leave_task = asyncio.tasks._leave_task
# asyncio's dict of running tasks by loop, where its C _enter_task/_leave_task keep it
# (basidia/_tasks.py): the hand-off swaps tasks in it directly.
from basidia._tasks import _current_tasks
cdef object _running = _current_tasks if type(_current_tasks) is dict else None
cdef object _current_call = current_call
cdef object _CallContext = CallContext
cdef object _new_context = CallContext.__new__
cdef object _decode_frame = decode_frame
cdef object _CALL_STACK_HEADER = CALL_STACK_HEADER
cdef int _REQUEST = int(Kind.REQUEST)
cdef int _REPLY = int(Kind.REPLY)
cdef int _FLAG_JSON = FLAG_JSON
cdef int _FLAG_KWARGS = FLAG_KWARGS
cdef object _ENCODE_ERRORS = (TypeError, ValueError, msgspec.EncodeError, RecursionError)
cdef object _DECODE_ERRORS = (msgspec.DecodeError, ValidationError, RecursionError)
cdef object _logger = logging.getLogger("basidia.container")

# Taken from basidia._wire and basidia.brokers.base on first use: they import this
# module (through basidia._speedups), so it cannot import them at its own import.
cdef bint _configured = False
cdef object _decode_result = None
cdef object _error_from_frame = None
cdef object _msgpack_encode = None
cdef object _json_encode = None
cdef object _msgpack_decode = None
cdef object _json_decode = None
cdef object _ArgumentSpec = None
cdef object _CONTENT_TYPE_HEADER = None
cdef object _NOTHING_TO_SETTLE = None
# Frame targets remembered per service (RequestHandler._route).
cdef Py_ssize_t _MAX_TARGETS = 256
# What _Serving._prepare returns once the handler has begun.
cdef object _STARTED = object()


cdef int _configure() except -1:
    global _configured, _decode_result, _error_from_frame, _msgpack_encode, _json_encode
    global _CONTENT_TYPE_HEADER, _NOTHING_TO_SETTLE, _msgpack_decode, _json_decode
    global _ArgumentSpec
    from basidia import _wire
    from basidia.brokers.base import Delivery
    _decode_result = _wire.decode_result
    _error_from_frame = _wire.error_from_frame
    _msgpack_encode = _wire._msgpack_encode
    _json_encode = _wire._json_encode
    _msgpack_decode = _wire._MSGPACK_DECODE
    _json_decode = _wire._JSON_DECODE
    _ArgumentSpec = _wire.ArgumentSpec
    _CONTENT_TYPE_HEADER = _wire.CONTENT_TYPE_HEADER
    _NOTHING_TO_SETTLE = Delivery
    _configured = True
    return 0


cdef inline object _iterator(object awaitable):
    """What to drive with ``PyIter_Send`` for ``awaitable``."""
    if PyCoro_CheckExact(awaitable):
        return awaitable
    return awaitable.__await__()


cdef inline object _decode(object body, int64_t limit, object max_size):
    """``decode_frame(body, max_size)``, without a Python-level call for bytes."""
    if PyBytes_CheckExact(body):
        return decode_view(
            <const unsigned char*>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), limit, max_size
        )
    return _decode_frame(body, max_size)


cdef object _exception(object typ, object val):
    """The exception a ``throw(typ, val)`` call means."""
    if val is None:
        if isinstance(typ, BaseException):
            return typ
        return typ()
    if isinstance(val, BaseException):
        return val
    return typ(val)


cdef object _throw(object iterator, object exc, bint* finished):
    """Throw ``exc`` into ``iterator``: what it yields next, or (``finished``) its result."""
    try:
        return iterator.throw(exc)
    except StopIteration as stop:
        finished[0] = True
        return stop.value


cdef inline object _resume(object iterator, object value, object exc, bint* finished):
    """Send ``value`` (or throw ``exc``) into ``iterator``: what it yields next, or
    (``finished``) what it returned; raises what it raises."""
    cdef PyObject* out = NULL
    if exc is not None:
        return _throw(iterator, exc, finished)
    if PyIter_Send(iterator, value, &out) == PYGEN_RETURN:
        finished[0] = True
    result = <object>out
    Py_XDECREF(out)
    return result


cdef class _Awaitable:
    """An awaitable that is its own iterator, as a coroutine is: ``_advance`` takes
    one step (``done``: it returned its result instead of yielding)."""

    cdef object _advance(self, object value, object exc, bint* done):
        raise NotImplementedError

    def __await__(self):
        return self

    def __iter__(self):
        return self

    def __next__(self):
        cdef bint done = False
        result = self._advance(None, None, &done)
        if done:
            raise StopIteration(result)
        return result

    def send(self, value):
        cdef bint done = False
        result = self._advance(value, None, &done)
        if done:
            raise StopIteration(result)
        return result

    def throw(self, typ, val=None, tb=None):
        cdef bint done = False
        result = self._advance(None, _exception(typ, val), &done)
        if done:
            raise StopIteration(result)
        return result


cdef int _awaitable_send(PyObject* self, PyObject* value, PyObject** out) except -1:
    """The ``am_send`` slot: a step without ``StopIteration`` at the end."""
    cdef bint done = False
    out[0] = NULL
    result = (<_Awaitable>self)._advance(
        <object>value if value is not NULL else None, None, &done
    )
    Py_INCREF(result)
    out[0] = <PyObject*>result
    return PYGEN_RETURN if done else PYGEN_NEXT


# -- the caller ---------------------------------------------------------------------------------

cdef enum CallState:
    CALL_START
    CALL_SENDING
    CALL_WAITING
    CALL_DONE


cdef class ClientCore:
    """What every call of one started ``RpcClient`` reads (its ``_core``)."""

    cdef readonly ReplyRouter router
    cdef object broker
    cdef object codec
    cdef object encode
    cdef object flags
    cdef object codec_headers
    cdef object reply_to
    cdef object max_frame_size

    def __init__(self, client):
        codec = client._codec
        self.router = client._router
        self.broker = client._broker
        self.codec = codec
        self.encode = codec._encode
        self.flags = codec.flags
        self.codec_headers = client._codec_headers
        self.reply_to = client.reply_to
        self.max_frame_size = client._max_frame_size


cdef class Call(_Awaitable):
    """One RPC call, as ``RpcClient._call`` makes it (basidia/rpc.py), awaitable once."""

    cdef object _client
    cdef object _service
    cdef object _method
    cdef object _args
    cdef object _kwargs
    cdef object _timeout
    cdef object _headers
    cdef ReplyRouter _router
    cdef object _correlation_id
    cdef object _iterator
    cdef object _reply
    cdef CallState _state

    def __init__(self, client, service, method, args, kwargs, timeout, headers):
        self._client = client
        self._service = service
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._timeout = timeout
        self._headers = headers

    def __del__(self):
        # As a coroutine dropped unfinished is closed: the router forgets the call.
        if self._state == CALL_SENDING or self._state == CALL_WAITING:
            self.close()

    def close(self):
        state, self._state = self._state, CALL_DONE
        if state == CALL_SENDING or state == CALL_WAITING:
            try:
                self._iterator.close()
            finally:
                self._router.discard(self._correlation_id)

    cdef object _advance(self, object value, object exc, bint* done):
        cdef bint finished
        state = self._state
        if state == CALL_DONE:
            if exc is not None:
                raise exc
            raise RuntimeError("cannot reuse already awaited RPC call")
        if state == CALL_START:
            if exc is not None:
                self._state = CALL_DONE
                raise exc
            state = self._start()
        while state == CALL_SENDING or state == CALL_WAITING:
            finished = False
            try:
                result = _resume(self._iterator, value, exc, &finished)
            except BrokerError as error:
                if state != CALL_SENDING:
                    raise self._failed(error)
                self._state = CALL_DONE
                self._router.discard(self._correlation_id)
                raise RequestNotSent(str(error)) from None
            except BaseException as error:
                raise self._failed(error)
            if not finished:
                return result
            value = exc = None
            if state == CALL_SENDING:
                state = self._sent()
            else:
                self._reply = result
                state = self._state = CALL_DONE
        reply, self._reply = self._reply, None
        return self._answer(reply, done)

    cdef object _failed(self, object exc):
        """What ends the call when what it waits for raised ``exc``: a timeout says
        which method; anything else leaves the router."""
        self._state = CALL_DONE
        if isinstance(exc, RpcTimeout):
            timeout = RpcTimeout(
                f"{self._service}.{self._method}: no reply within {self._timeout:.3g} s"
            )
            timeout.__suppress_context__ = True
            return timeout
        self._router.discard(self._correlation_id)
        return exc

    cdef CallState _start(self) except *:
        if not _configured:
            _configure()
        client = self._client
        cdef ClientCore core = client._core
        if core is None:
            self._state = CALL_DONE
            raise RuntimeError("the RPC client is not started")
        cdef ReplyRouter router = core.router
        self._router = router
        service, method = self._service, self._method
        timeout = self._timeout
        headers = self._headers
        now = _time()
        cdef PyObject* found = NULL
        PyContextVar_Get(_current_call, NULL, &found)
        ctx = <object>found if found is not NULL else None
        Py_XDECREF(found)
        if ctx is not None:
            if ctx.deadline:
                remaining = ctx.deadline - now
                if remaining <= 0:
                    self._state = CALL_DONE
                    raise RpcTimeout(f"{service}.{method}: the caller's deadline has passed")
                if remaining < timeout:
                    timeout = self._timeout = remaining
            headers = dict(headers) if headers else {}
            headers[_CALL_STACK_HEADER] = " ".join(ctx.call_id_stack)
        codec_headers = core.codec_headers
        if codec_headers:
            headers = {**headers, **codec_headers} if headers else codec_headers
        try:
            if self._kwargs:
                payload, flags = core.codec.encode_args(self._args, self._kwargs)
            else:  # Codec.encode_args, positional arguments only
                payload = core.encode(self._args)
                flags = core.flags
        except _ENCODE_ERRORS as error:
            self._state = CALL_DONE
            raise ValidationError(
                f"{service}.{method}: arguments cannot be encoded: {error}"
            ) from None
        correlation_id = self._correlation_id = router.register(timeout)
        try:
            body = encode_parts(
                _REQUEST,
                correlation_id,
                f"{service}.{method}",
                payload,
                core.reply_to,
                int((now + timeout) * 1000),
                headers or {},
                flags,
                core.max_frame_size,
            )
            broker = core.broker
            try:
                if not broker.send_request_now(service, body, correlation_id):
                    self._iterator = _iterator(
                        broker.send_request(service, body, correlation_id=correlation_id)
                    )
                    self._state = CALL_SENDING
                    return CALL_SENDING
            except BrokerError as error:
                raise RequestNotSent(str(error)) from None
        except BaseException as error:
            raise self._failed(error)
        return self._sent()

    cdef CallState _sent(self) except *:
        """The request is out: the reply if it came meanwhile, else wait for it."""
        cdef ReplyRouter router = self._router
        try:
            reply = router.take(self._correlation_id)  # raises what failed the call first
            if reply is not None:
                self._reply = reply
                self._state = CALL_DONE
                return CALL_DONE
            self._iterator = router.wait(self._correlation_id).__await__()
        except BaseException as error:
            raise self._failed(error)
        self._state = CALL_WAITING
        return CALL_WAITING

    cdef object _answer(self, object reply, bint* done):
        if reply.kind == _REPLY:
            try:
                headers = reply.headers
                if headers and _CONTENT_TYPE_HEADER in headers:
                    result = _decode_result(reply)
                elif reply.flags & _FLAG_JSON:  # basidia._wire.decode_result
                    result = _json_decode(reply.payload)
                else:
                    result = _msgpack_decode(reply.payload)
            except _DECODE_ERRORS as error:
                raise RemoteError(
                    "MalformedReply",
                    f"{self._service}.{self._method} sent an unreadable reply: {error}",
                ) from None
            done[0] = True
            return result
        raise _error_from_frame(reply)


# Each type's async slots (or, inherited, its base's) get am_send.
(<_TypeWithAsync*>_Awaitable).tp_as_async.am_send = <sendfunc>_awaitable_send
(<_TypeWithAsync*>Call).tp_as_async.am_send = <sendfunc>_awaitable_send


# -- the service --------------------------------------------------------------------------------

cdef class RequestHandler:
    """What a ``RequestServer`` (basidia/_serving.py) gives its broker to call per
    request on the compiled core: ``handler(delivery)`` is an awaitable that serves it."""

    cdef object _server
    cdef object _container
    cdef object _broker
    cdef object _name
    cdef dict _routes
    cdef dict _targets   # frame target -> (method, *route), for _routes
    cdef set _reply_addresses
    cdef set _tasks
    cdef object _current_task
    cdef object _stats
    cdef object _watchdog
    cdef dict _watched
    cdef object _max_frame_size
    cdef int64_t _limit
    cdef object _reply_limit
    cdef object _service_cls
    cdef object _make_instance
    cdef dict _injections
    cdef list _observers
    cdef bint _straight          # no middleware, no limit shared with other entrypoints
    cdef object _plain_delivery  # the last delivery type seen with nothing to settle

    def __init__(self, server):
        if not _configured:
            _configure()
        container = server.container
        self._server = server
        self._container = container
        self._broker = server._broker
        self._name = server._name
        self._routes = {}
        self._targets = {}
        for method, (func, decode, endpoint, limiter) in server._routes.items():
            spec = getattr(decode, "__self__", None)
            if limiter is None and type(spec) is _ArgumentSpec:
                self._routes[method] = (func, spec._msgpack, spec._json, spec._astuple, endpoint)
        self._reply_addresses = server._reply_addresses
        self._tasks = container._tasks
        self._current_task = container._current_task
        self._stats = container.stats
        self._watchdog = container._watchdog
        self._watched = container._watchdog.watched
        self._max_frame_size = server._max_frame_size
        self._limit = as_limit(server._max_frame_size)
        self._reply_limit = server._reply_limit
        self._service_cls = container.service_cls
        self._make_instance = container.make_instance
        self._injections = container._injections  # updated in place (replace_dependency)
        self._observers = container._observers  # updated in place (basidia.testing)
        self._straight = container._handle is None and container._limit is None
        self._plain_delivery = None

    def __call__(self, delivery):
        cdef _Serving serving = _Serving.__new__(_Serving)
        serving._handler = self
        serving._delivery = delivery
        return serving

    cdef object _accept(self, object body):
        """The request frame in ``body`` if it can be served as it is, else what
        ``RequestServer._accept`` makes of it (None: dropped, counted, logged)."""
        try:
            frame = _decode(body, self._limit, self._max_frame_size)
        except FrameError:
            return self._server._accept(body)
        cdef long kind = frame.kind
        if kind != _REQUEST:
            return self._server._accept(body)
        reply_to = frame.reply_to
        if reply_to and reply_to not in self._reply_addresses:
            return self._server._accept(body)
        cdef double deadline = frame.deadline  # a u64 of milliseconds: exact in a double
        if deadline and deadline <= <double>_time() * 1000:
            return self._server._accept(body)
        return frame

    cdef object _route(self, object target):
        """The route of the method ``target`` names (``service.method``), remembered
        for the next request to that target; None if it has none here."""
        method = target.rpartition(".")[2]
        route = self._routes.get(method)
        if route is None:
            return None
        route = (method, *route)
        targets = self._targets
        if len(targets) >= _MAX_TARGETS:  # targets come from callers: keep a bounded few
            targets.clear()
        targets[target] = route
        return route

    cdef object _reply_body(self, object frame, object result):
        """The reply carrying ``result``, or what ``RequestServer._reply_body`` makes of it."""
        headers = frame.headers
        if not headers or _CONTENT_TYPE_HEADER not in headers:
            flags = frame.flags & _FLAG_JSON
            try:
                payload = _json_encode(result) if flags else _msgpack_encode(result)
                return encode_parts(
                    _REPLY, frame.correlation_id, "", payload, "", 0, {}, flags, self._reply_limit
                )
            except Exception:  # RequestServer._reply_body says why, or makes it fit
                pass
        return self._server._reply_body(frame, result)


cdef enum ServingState:
    SERVE_START
    SERVE_HANDLING
    SERVE_REPLYING
    SERVE_WHOLE
    SERVE_DONE


cdef class _Serving(_Awaitable):
    """One request being served: ``RequestServer.on_request`` in C."""

    cdef RequestHandler _handler
    cdef object _delivery
    cdef object _iterator
    cdef object _task
    cdef object _frame
    cdef object _ctx
    cdef object _args
    cdef object _endpoint
    cdef object _token
    cdef object _outer
    cdef double _deadline
    cdef double _started
    cdef ServingState _state

    def __del__(self):
        # As a coroutine dropped unfinished is closed: the handler's own cleanup runs,
        # and the call is counted and no longer in flight.
        if self._state != SERVE_START and self._state != SERVE_DONE:
            self.close()

    def close(self):
        state = self._state
        if state == SERVE_START or state == SERVE_DONE:
            self._state = SERVE_DONE
            return
        cdef bint done = False
        try:
            self._advance(None, GeneratorExit(), &done)
        except GeneratorExit:
            pass
        else:
            raise RuntimeError("a request being served ignored GeneratorExit")

    cdef object _advance(self, object value, object exc, bint* done):
        cdef bint finished = False
        state = self._state
        if state == SERVE_DONE:
            if exc is not None:
                raise exc
            raise RuntimeError("cannot reuse an already awaited request")
        if state == SERVE_START:
            if exc is not None:
                self._state = SERVE_DONE
                raise exc
            return self._start(done)
        if state == SERVE_WHOLE:
            try:
                result = _resume(self._iterator, value, exc, &finished)
            except BaseException:
                self._state = SERVE_DONE
                raise
            if finished:
                self._state = SERVE_DONE
                done[0] = True
            return result
        try:
            if state == SERVE_HANDLING:
                try:
                    result = _resume(self._iterator, value, exc, &finished)
                except BaseException as error:
                    reply = self._failed(error)
                else:
                    if not finished:
                        return result
                    reply = self._handled(result)
                self._iterator = None
                if not self._reply(reply):
                    return self._advance(None, None, done)
            else:  # SERVE_REPLYING
                try:
                    result = _resume(self._iterator, value, exc, &finished)
                except BrokerError as error:
                    self._handler._server._reply_not_sent(self._frame, error)
                else:
                    if not finished:
                        return result
        except Exception:  # a bug: the delivery is settled all the same
            _logger.exception("%s: a request failed unexpectedly", self._handler._name)
        except BaseException:  # a cancellation: the delivery needs no nack (none does here)
            self._finish()
            raise
        self._finish()
        done[0] = True
        return None

    cdef object _start(self, bint* done):
        cdef RequestHandler handler = self._handler
        delivery = self._delivery
        kind = type(delivery)
        if kind is not handler._plain_delivery:
            if (
                not handler._straight
                or kind.ack is not _NOTHING_TO_SETTLE.ack
                or kind.nack is not _NOTHING_TO_SETTLE.nack
            ):
                # Middleware, a shared limit or a delivery to settle: the Python path
                # serves it.
                self._iterator = _iterator(handler._server.on_request(delivery))
                self._state = SERVE_WHOLE
                return self._advance(None, None, done)
            handler._plain_delivery = kind
        task = self._task = handler._current_task()
        handler._tasks.add(task)
        try:
            body = delivery.body
            frame = handler._accept(body)
            if frame is None:
                reply = None
            else:
                self._frame = frame
                reply = self._prepare(frame, len(body))
                if reply is _STARTED:
                    self._state = SERVE_HANDLING
                    return self._advance(None, None, done)
            if reply is not None and not self._reply(reply):
                return self._advance(None, None, done)
        except Exception:  # a bug: the delivery is settled all the same
            _logger.exception("%s: a request failed unexpectedly", handler._name)
        except BaseException:  # a cancellation: the delivery needs no nack (none does here)
            self._finish()
            raise
        self._finish()
        done[0] = True
        return None

    cdef object _prepare(self, object frame, Py_ssize_t size):
        """Begin the handler (``_STARTED``), or the error reply (None: none to send)
        when it must not run or failed to begin."""
        cdef RequestHandler handler = self._handler
        if size > handler._limit:
            return self._prepare_slowly(frame, size)
        target = frame.target
        route = handler._targets.get(target)
        if route is None:
            route = handler._route(target)
            if route is None:  # unknown, rate-limited, or decoded otherwise
                return self._prepare_slowly(frame, size)
        method, func, from_msgpack, from_json, astuple, endpoint = route
        flags = frame.flags
        headers = frame.headers
        if flags & _FLAG_KWARGS or (headers and _CONTENT_TYPE_HEADER in headers):
            return self._prepare_slowly(frame, size)
        try:  # ArgumentSpec.decode's common case: positional, in a built-in format
            args = astuple((from_json if flags & _FLAG_JSON else from_msgpack)(frame.payload))
        except Exception:  # RequestServer._prepare says why, as ArgumentSpec.decode does
            return self._prepare_slowly(frame, size)
        # CallContext(handler._name, method, frame, frame.deadline / 1000.0), without
        # running its __init__ in Python: the same slots, set here.
        ctx = _new_context(_CallContext)
        ctx.service = handler._name
        ctx.entrypoint = method
        ctx.frame = frame
        ctx.deadline = frame.deadline / 1000.0
        ctx.attempt = 1
        ctx.data = {}
        ctx._call_id = None
        return self._begin(ctx, func, args, endpoint)

    cdef object _prepare_slowly(self, object frame, Py_ssize_t size):
        """``_prepare`` by ``RequestServer._prepare``."""
        call = self._handler._server._prepare(frame, size)
        if isinstance(call, bytes):
            return call
        ctx, func, args, endpoint = call
        return self._begin(ctx, func, args, endpoint)

    cdef object _begin(self, object ctx, object func, object args, object endpoint):
        cdef RequestHandler handler = self._handler
        cdef double deadline = ctx.deadline
        # ServiceContainer.handle, from here to _handled/_failed.
        container = handler._container
        self._ctx = ctx
        self._args = args
        self._endpoint = endpoint
        self._token = PyContextVar_Set(_current_call, ctx)
        self._deadline = deadline
        if deadline:
            watched = handler._watched
            task = self._task
            self._outer = watched.get(task)
            watched[task] = deadline
            watchdog = handler._watchdog
            if watchdog.timer is None:
                watchdog.arm()
        self._started = _perf_counter()
        try:
            if container._per_call:
                instance = handler._make_instance(ctx)
            else:
                instance = handler._service_cls()
                if handler._injections:
                    instance.__dict__.update(handler._injections)
            self._iterator = _iterator(func(instance, *args))
        except BaseException as error:
            return self._failed(error)
        return _STARTED

    cdef object _handled(self, object result):
        """The handler returned ``result``: count it, and the reply."""
        self._done_handling()
        if self._handler._observers:
            self._handler._container._observe(self._ctx, self._args, None, result)
        return self._handler._reply_body(self._frame, result)

    cdef object _failed(self, object exc):
        """The handler raised ``exc``: count it, and the error reply (None: nobody
        waits for one).  A cancellation goes on."""
        cdef RequestHandler handler = self._handler
        watchdog = handler._watchdog
        task = self._task
        if isinstance(exc, _CancelledError) and task in watchdog.expired:
            watchdog.expired.discard(task)
            task.uncancel()
            exc = TimeoutError(f"{self._ctx.service}.{self._ctx.entrypoint} passed its deadline")
        stats = handler._stats
        stats.errors += 1
        stats.last_error = f"{type(exc).__name__}: {exc}"
        endpoint = self._endpoint
        endpoint.num_errors += 1
        endpoint.last_error = stats.last_error
        self._done_handling()
        if handler._observers:
            handler._container._observe(self._ctx, self._args, exc, None)
        if isinstance(exc, TimeoutError):
            return None  # the caller has timed out too
        if not isinstance(exc, Exception):
            raise exc
        try:
            raise exc  # RequestServer._failure_body formats the exception being handled
        except Exception:
            return handler._server._failure_body(self._frame, exc)

    cdef _done_handling(self):
        cdef RequestHandler handler = self._handler
        if self._deadline:
            if self._outer is None:
                handler._watched.pop(self._task, None)  # gone already if its deadline passed
            else:
                handler._watched[self._task] = self._outer
        elapsed = _perf_counter() - self._started
        stats = handler._stats
        stats.handled += 1
        stats.processing_time += elapsed
        endpoint = self._endpoint
        endpoint.num_requests += 1
        endpoint.processing_time += int(elapsed * 1e9)
        PyContextVar_Reset(_current_call, self._token)
        self._token = None

    cdef bint _reply(self, object reply) except -1:
        """Send ``reply`` (if any, and if the caller waits for one); False when sending
        must be awaited (``SERVE_REPLYING``)."""
        frame = self._frame
        if reply is None or not frame.reply_to:
            return True
        broker = self._handler._broker
        try:
            if broker.send_reply_now(frame.reply_to, reply):
                return True
            self._iterator = _iterator(broker.send_reply(frame.reply_to, reply))
        except BrokerError as error:
            self._handler._server._reply_not_sent(frame, error)
            return True
        self._state = SERVE_REPLYING
        return False

    cdef _finish(self):
        self._state = SERVE_DONE
        self._iterator = None
        task = self._task
        if task is None:
            return
        handler = self._handler
        tasks = handler._tasks
        tasks.discard(task)
        if not tasks:
            drained = handler._container._drained
            if drained is not None:
                drained.set()


(<_TypeWithAsync*>_Serving).tp_as_async.am_send = <sendfunc>_awaitable_send


cdef class Inbox:
    """The reply inbox of an ``RpcClient`` (its ``_on_reply`` in C): a reply goes
    straight to the reply router; what does not decode goes to ``_on_reply``."""

    cdef object _client
    cdef object _max_frame_size
    cdef int64_t _limit

    def __init__(self, client):
        self._client = client
        self._max_frame_size = client._max_frame_size
        self._limit = as_limit(client._max_frame_size)

    def __call__(self, body):
        client = self._client
        try:
            frame = _decode(body, self._limit, self._max_frame_size)
        except FrameError:
            client._on_reply(body)
            return
        cdef ReplyRouter router = client._router
        if router is not None:
            router.resolve(frame.correlation_id, frame)


# -- the memory broker's hand-off ---------------------------------------------------------------

cdef class MemorySender:
    """``MemoryBroker.send_request_now`` with the hand-off of ``_Queue.put`` and
    ``_Queue.run_eagerly`` (basidia/brokers/memory.py, docs/memory.md#the-hand-off) in C.
    What is not the common case (not connected, no consumer, a queued or busy queue)
    goes to the Python methods."""

    cdef object _broker
    cdef object _fallback
    cdef object _delivery_type
    cdef object _new_delivery
    cdef object _started_type
    cdef Py_ssize_t _max_depth

    def __init__(self, broker, fallback, delivery_type, started_type, max_depth):
        self._broker = broker
        self._fallback = fallback
        self._delivery_type = delivery_type
        self._new_delivery = delivery_type.__new__
        self._started_type = started_type
        self._max_depth = max_depth

    def __call__(self, service, body, correlation_id):
        hub = self._broker._hub
        if hub is None:
            return self._fallback(self._broker, service, body, correlation_id)
        queue = hub.requests.get(service)
        if queue is None or not queue.consumers:
            return self._fallback(self._broker, service, body, correlation_id)
        delivery = self._new_delivery(self._delivery_type)
        delivery.body = body
        if queue.eager and not queue.items and queue.waiters and self._run_eagerly(hub, queue, delivery):
            return True
        queue.put(delivery)
        return True

    cdef bint _run_eagerly(self, object hub, object queue, object delivery) except -1:
        cdef Py_ssize_t budget = hub.eager_budget
        cdef Py_ssize_t depth = hub.eager_depth
        cdef bint finished = False
        cdef PyObject* out = NULL
        if budget <= 0 or depth >= self._max_depth:
            return False
        waiters = queue.waiters
        while waiters:
            entry = waiters.pop()  # the worker idle last: its memory is warm
            waiter, worker = entry
            if worker is not None and not waiter.done():
                break
            if not waiter.done():  # a consumer that cannot be borrowed: leave it
                waiters.append(entry)
                return False
        else:
            return False
        budget -= 1
        hub.eager_budget = budget
        loop = queue._loop
        if not budget:
            loop.call_soon(hub.refill)
        task = worker.task
        cdef dict running = _running
        if running is not None:  # _leave_task and _enter_task, as asyncio's C code does them
            current = running.get(loop)
            if current is not None:
                del running[loop]
            running[loop] = task
        else:
            current = queue._current_task()
            if current is not None:
                _leave_task(loop, current)
            _enter_task(loop, task)
        hub.eager_depth = depth + 1
        try:
            context = worker.context
            PyContext_Enter(context)
            try:
                iterator = _iterator(worker.handle(delivery))
                finished = PyIter_Send(iterator, None, &out) == PYGEN_RETURN
                yielded = <object>out
                Py_XDECREF(out)
            except _CancelledError:
                # The handler let a cancellation out: the worker ends, as it would have.
                waiters.append(entry)
                task.cancel()
                return True
            except Exception:  # the framework settles and logs its own errors: a bug
                worker.pool.log_failure()
                finished = True
            finally:
                PyContext_Exit(context)
            if finished:
                waiters.append(entry)  # idle again
                return True
        finally:
            hub.eager_depth = depth
            if running is not None:
                if current is not None:
                    running[loop] = current
                else:
                    del running[loop]
            else:
                _leave_task(loop, task)
                if current is not None:
                    _enter_task(loop, current)
        # Suspended: from now on the worker is busy with it.
        worker.pool.busy(task)
        queue._woken += 1
        waiter.set_result(self._started_type(iterator, yielded))
        return True


cdef class MemoryReplier:
    """``MemoryBroker.send_reply_now`` in C: the reply goes to the caller's inbox."""

    cdef object _broker
    cdef object _fallback

    def __init__(self, broker, fallback):
        self._broker = broker
        self._fallback = fallback

    def __call__(self, reply_to, body):
        hub = self._broker._hub
        if hub is None:
            return self._fallback(self._broker, reply_to, body)
        handler = hub.inboxes.get(reply_to)
        if handler is not None:
            handler(body)
        return True


cdef class MethodProxy:
    """basidia.rpc.MethodProxy on the compiled core: one remote method; calling it
    returns an awaitable of the result."""

    cdef readonly object _client
    cdef readonly object _service
    cdef readonly object _method
    cdef readonly object _timeout

    def __init__(self, client, service, method, timeout):
        self._client = client
        self._service = service
        self._method = method
        self._timeout = timeout

    def __call__(self, *args, **kwargs):
        client = self._client
        cdef Call call
        if client._chain is None:  # no middleware: skip a layer
            call = Call.__new__(Call)
            call._client = client
            call._service = self._service
            call._method = self._method
            call._args = args
            call._kwargs = kwargs
            call._timeout = self._timeout or client.timeout
            call._headers = None
            return call
        return client.call(self._service, self._method, args, kwargs, self._timeout)

    def with_timeout(self, timeout):
        """The same method with a different per-call timeout (seconds)."""
        return MethodProxy(self._client, self._service, self._method, timeout)

    def __repr__(self):
        return f"<MethodProxy {self._service}.{self._method}>"
