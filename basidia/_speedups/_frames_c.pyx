"""Frame encoding and decoding: the compiled twin of ``_frames_py.py``.

For the same frame it gives the same bytes, and for any input the same
``Frame`` or a ``FrameError`` with the same message, from checks made in the
same order (docs/protocol.md).  The byte work runs on ``const unsigned char*``;
every read is preceded by an explicit bounds check, which is why Cython's own
bounds checking is switched off for this module in setup.py.

Inputs of unusual types (an object that is not exactly a ``Frame``, a payload
that is not ``bytes``, a header map that is not a ``dict`` of ``str``, a string
that cannot be encoded, a memoryview to decode) are handed to the reference
implementation, so that even their errors are the reference's.  One difference
remains: ``max_size`` must be an integer here.
"""

from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_CheckExact,
    PyByteArray_GET_SIZE,
)
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.dict cimport PyDict_CheckExact, PyDict_Next
from cpython.exc cimport PyErr_Clear
from cpython.long cimport (
    PyLong_AsLongLongAndOverflow,
    PyLong_AsUnsignedLongLong,
    PyLong_Check,
)
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_DecodeUTF8
from libc.stdint cimport INT64_MAX, INT64_MIN, UINT32_MAX, int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from basidia._speedups import _frame
from basidia._speedups import _frames_py as _reference
from basidia._speedups._frame import DEFAULT_MAX_FRAME_SIZE, Frame
from basidia.errors import FrameError

__all__ = ["decode_frame", "encode_frame"]


cdef extern from "Python.h":
    # Declared without an exception spec, unlike cpython.unicode's: a NULL result
    # (a str holding lone surrogates) sends the frame to the reference
    # implementation, which raises the very UnicodeEncodeError of ``str.encode``.
    const char* _utf8 "PyUnicode_AsUTF8AndSize"(object value, Py_ssize_t* size)


# The constants of _frames_c.pxd are compiled in; refuse to run with a build
# that disagrees with the Python definition of the format.
if (FRAME_VERSION, PREFIX_SIZE, FIXED_HEADER_SIZE, MAX_HEADERS, MAX_KIND, KNOWN_FLAGS) != (
    _frame.FRAME_VERSION,
    _frame.PREFIX_SIZE,
    _frame.FIXED_HEADER_SIZE,
    _frame.MAX_HEADERS,
    max(_frame.Kind),
    _frame.FLAG_JSON | _frame.FLAG_KWARGS,
):
    raise ImportError("basidia._speedups._frames_c is out of date with _frame.py; rebuild it")


# Every integer on the wire is big-endian (network order).  The callers of
# these helpers have already checked that the bytes exist.

cdef inline uint16_t _load_u16(const unsigned char* p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline uint32_t _load_u32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _load_u64(const unsigned char* p) noexcept nogil:
    return (<uint64_t>_load_u32(p) << 32) | _load_u32(p + 4)


cdef inline void _store_u16(unsigned char* p, uint16_t value) noexcept nogil:
    p[0] = <unsigned char>(value >> 8)
    p[1] = <unsigned char>value


cdef inline void _store_u32(unsigned char* p, uint32_t value) noexcept nogil:
    p[0] = <unsigned char>(value >> 24)
    p[1] = <unsigned char>(value >> 16)
    p[2] = <unsigned char>(value >> 8)
    p[3] = <unsigned char>value


cdef inline void _store_u64(unsigned char* p, uint64_t value) noexcept nogil:
    _store_u32(p, <uint32_t>(value >> 32))
    _store_u32(p + 4, <uint32_t>value)


cdef int64_t as_limit(object max_size) except? -1:
    cdef int overflow = 0
    cdef long long value = PyLong_AsLongLongAndOverflow(max_size, &overflow)
    if overflow > 0:
        return INT64_MAX
    if overflow < 0:
        return INT64_MIN
    return value


cdef inline bint _as_u64(object value, uint64_t* out) except -1:
    """Store the int ``value`` in ``out``; False if it does not fit a u64."""
    try:
        out[0] = PyLong_AsUnsignedLongLong(value)
    except OverflowError:  # negative, or 2**64 and beyond
        return False
    return True


cdef uint32_t check_prefix(const unsigned char* data, int64_t limit, object max_size) except 0:
    cdef unsigned int version = data[0]
    cdef unsigned int kind = data[1]
    cdef unsigned int flags = data[2]
    cdef unsigned int count = data[3]
    cdef uint32_t total = _load_u32(data + 4)
    if version != FRAME_VERSION:
        raise FrameError(f"unsupported frame version {version}")
    if kind < 1 or kind > MAX_KIND:
        raise FrameError(f"unknown frame kind {kind}")
    if flags & ~KNOWN_FLAGS:
        raise FrameError(f"unknown frame flags 0x{flags:02x}")
    if count > MAX_HEADERS:
        raise FrameError(f"too many headers: {count} > {MAX_HEADERS}")
    # The limit is checked before anything is buffered or allocated for the frame.
    if <int64_t>total > limit:
        raise FrameError(f"frame of {total} bytes exceeds the limit of {max_size} bytes")
    if total < FIXED_HEADER_SIZE:
        raise FrameError(f"declared frame length {total} is shorter than the fixed header")
    return total


cdef inline str _text(const unsigned char* data, Py_ssize_t start, Py_ssize_t length,
                      Py_ssize_t end, str section):
    """Decode ``length`` bytes of UTF-8 at ``start``, which must end by ``end``."""
    if length > end - start:
        raise FrameError(f"{section} of {length} bytes overruns the frame at offset {start}")
    try:
        return PyUnicode_DecodeUTF8(<char*>data + start, length, NULL)
    except UnicodeDecodeError:
        raise FrameError(f"{section} is not valid UTF-8") from None


cdef object decode_view(const unsigned char* data, Py_ssize_t size, int64_t limit,
                        object max_size):
    if size < PREFIX_SIZE:
        raise FrameError(f"truncated frame: {size} bytes, the prefix needs {PREFIX_SIZE}")
    cdef int64_t total = check_prefix(data, limit, max_size)
    if size < total:
        raise FrameError(f"truncated frame: {size} of {total} bytes")
    if size > total:
        raise FrameError(f"{size - total} trailing bytes after the frame")
    # From here on the frame is exactly ``end`` bytes, at least FIXED_HEADER_SIZE,
    # so the fixed header below is in bounds; every later read is checked.
    cdef Py_ssize_t end = size
    cdef unsigned int kind = data[1]
    cdef unsigned int flags = data[2]
    cdef unsigned int count = data[3]
    cdef uint64_t correlation_id = _load_u64(data + 8)
    cdef uint64_t deadline = _load_u64(data + 16)
    cdef Py_ssize_t target_len = _load_u16(data + 24)
    cdef Py_ssize_t reply_len = _load_u16(data + 26)
    cdef int64_t payload_len = _load_u32(data + 28)
    cdef Py_ssize_t pos = FIXED_HEADER_SIZE
    cdef Py_ssize_t key_len, value_len
    cdef unsigned int index

    target = _text(data, pos, target_len, end, "target")
    pos += target_len
    reply_to = _text(data, pos, reply_len, end, "reply_to")
    pos += reply_len
    cdef dict headers = {}
    for index in range(count):
        if ENTRY_SIZE > end - pos:
            raise FrameError(f"header {index} overruns the frame at offset {pos}")
        key_len = data[pos]
        value_len = _load_u16(data + pos + 1)
        pos += ENTRY_SIZE
        key = _text(data, pos, key_len, end, "header key")
        pos += key_len
        headers[key] = _text(data, pos, value_len, end, "header value")
        pos += value_len
    # A repeated key only shows once every entry has been read, as in the reference.
    if len(headers) != count:
        raise FrameError("duplicate header keys")
    if payload_len > end - pos:
        raise FrameError(f"payload of {payload_len} bytes overruns the frame at offset {pos}")
    if payload_len < end - pos:
        raise FrameError(f"{end - pos - payload_len} unused bytes in the frame")
    payload = PyBytes_FromStringAndSize(<char*>data + pos, <Py_ssize_t>payload_len)
    # Positional arguments: the cheapest way into a msgspec Struct.
    return Frame(kind, correlation_id, target, payload, reply_to, deadline, headers, flags)


def decode_frame(data, max_size=DEFAULT_MAX_FRAME_SIZE):
    """Decode one whole frame; raise ``FrameError`` on anything malformed."""
    cdef int64_t limit = as_limit(max_size)
    if PyBytes_CheckExact(data):
        return decode_view(
            <const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), limit, max_size
        )
    if PyByteArray_CheckExact(data):
        return decode_view(
            <const unsigned char*>PyByteArray_AS_STRING(data),
            PyByteArray_GET_SIZE(data),
            limit,
            max_size,
        )
    return _reference.decode_frame(data, max_size)


def encode_frame(frame, max_size=DEFAULT_MAX_FRAME_SIZE):
    """Encode ``frame``; raise ``FrameError`` if a field is out of range or the frame too big."""
    if type(frame) is not Frame:
        return _reference.encode_frame(frame, max_size)
    return encode_parts(
        frame.kind,
        frame.correlation_id,
        frame.target,
        frame.payload,
        frame.reply_to,
        frame.deadline,
        frame.headers,
        frame.flags,
        max_size,
    )


cdef object _encode_by_reference(kind, correlation_id, target, payload, reply_to, deadline,
                                 headers, flags, max_size):
    return _reference.encode_frame(
        Frame(kind, correlation_id, target, payload, reply_to, deadline, headers, flags),
        max_size,
    )


cdef object encode_parts(kind, correlation_id, target, payload, reply_to, deadline, headers,
                         flags, max_size):
    cdef int64_t limit = as_limit(max_size)
    if not (
        PyLong_Check(kind)
        and PyLong_Check(flags)
        and PyLong_Check(correlation_id)
        and PyLong_Check(deadline)
        and PyDict_CheckExact(headers)
        and PyUnicode_CheckExact(target)
        and PyUnicode_CheckExact(reply_to)
        and PyBytes_CheckExact(payload)
    ):
        return _encode_by_reference(
            kind, correlation_id, target, payload, reply_to, deadline, headers, flags, max_size
        )

    cdef int overflow = 0
    cdef long long c_kind = PyLong_AsLongLongAndOverflow(kind, &overflow)
    if overflow or c_kind < 1 or c_kind > MAX_KIND:
        raise FrameError(f"unknown frame kind {kind}")
    cdef long long c_flags = PyLong_AsLongLongAndOverflow(flags, &overflow)
    if overflow or c_flags & ~KNOWN_FLAGS:  # a negative value has unknown high bits set too
        raise FrameError(f"unknown frame flags 0x{flags:02x}")
    cdef uint64_t c_correlation_id, c_deadline
    if not _as_u64(correlation_id, &c_correlation_id):
        raise FrameError("correlation id out of range")
    if not _as_u64(deadline, &c_deadline):
        raise FrameError("deadline out of range")
    cdef Py_ssize_t count = len(<dict>headers)
    if count > MAX_HEADERS:
        raise FrameError(f"too many headers: {count} > {MAX_HEADERS}")

    # UTF-8 views of the strings, valid while the frame holds them; nothing below
    # runs Python code that could drop them.
    cdef Py_ssize_t target_len, reply_len, payload_len
    cdef const char* target_ptr = _utf8(target, &target_len)
    if target_ptr is NULL:
        PyErr_Clear()
        return _encode_by_reference(
            kind, correlation_id, target, payload, reply_to, deadline, headers, flags, max_size
        )
    if target_len > MAX_SECTION_SIZE:
        raise FrameError(f"target of {target_len} bytes exceeds {MAX_SECTION_SIZE} bytes")
    cdef const char* reply_ptr = _utf8(reply_to, &reply_len)
    if reply_ptr is NULL:
        PyErr_Clear()
        return _encode_by_reference(
            kind, correlation_id, target, payload, reply_to, deadline, headers, flags, max_size
        )
    if reply_len > MAX_SECTION_SIZE:
        raise FrameError(f"reply_to of {reply_len} bytes exceeds {MAX_SECTION_SIZE} bytes")

    cdef const char* key_ptrs[MAX_HEADERS]
    cdef const char* value_ptrs[MAX_HEADERS]
    cdef Py_ssize_t key_lens[MAX_HEADERS]
    cdef Py_ssize_t value_lens[MAX_HEADERS]
    cdef Py_ssize_t entries = 0, dict_pos = 0
    cdef PyObject* key
    cdef PyObject* value
    # At most 64 headers of at most 3 + 255 + 65535 bytes and two sections of at
    # most 65535 bytes: the sum cannot overflow a u64 whatever the payload size.
    cdef uint64_t total = FIXED_HEADER_SIZE + target_len + reply_len
    # ``entries < count`` bounds the writes to the arrays above by MAX_HEADERS.
    while entries < count and PyDict_Next(headers, &dict_pos, &key, &value):
        if not (PyUnicode_CheckExact(<object>key) and PyUnicode_CheckExact(<object>value)):
            return _encode_by_reference(
            kind, correlation_id, target, payload, reply_to, deadline, headers, flags, max_size
        )
        key_ptrs[entries] = _utf8(<object>key, &key_lens[entries])
        if key_ptrs[entries] is NULL:
            PyErr_Clear()
            return _encode_by_reference(
            kind, correlation_id, target, payload, reply_to, deadline, headers, flags, max_size
        )
        if key_lens[entries] > MAX_KEY_SIZE:
            raise FrameError(
                f"header key of {key_lens[entries]} bytes exceeds {MAX_KEY_SIZE} bytes"
            )
        value_ptrs[entries] = _utf8(<object>value, &value_lens[entries])
        if value_ptrs[entries] is NULL:
            PyErr_Clear()
            return _encode_by_reference(
            kind, correlation_id, target, payload, reply_to, deadline, headers, flags, max_size
        )
        if value_lens[entries] > MAX_SECTION_SIZE:
            raise FrameError(
                f"header value of {value_lens[entries]} bytes exceeds {MAX_SECTION_SIZE} bytes"
            )
        total += ENTRY_SIZE + key_lens[entries] + value_lens[entries]
        entries += 1
    payload_len = PyBytes_GET_SIZE(payload)
    total += <uint64_t>payload_len
    if limit < 0 or total > <uint64_t>limit:
        raise FrameError(f"frame of {total} bytes exceeds the limit of {max_size} bytes")
    if total > UINT32_MAX:
        # Only reachable with a limit beyond 4 GiB; the reference fails to pack it.
        return _encode_by_reference(
            kind, correlation_id, target, payload, reply_to, deadline, headers, flags, max_size
        )

    # One allocation, filled in place.
    cdef bytes out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>total)
    cdef unsigned char* buf = <unsigned char*>PyBytes_AS_STRING(out)
    buf[0] = FRAME_VERSION
    buf[1] = <unsigned char>c_kind
    buf[2] = <unsigned char>c_flags
    buf[3] = <unsigned char>count
    _store_u32(buf + 4, <uint32_t>total)
    _store_u64(buf + 8, c_correlation_id)
    _store_u64(buf + 16, c_deadline)
    _store_u16(buf + 24, <uint16_t>target_len)
    _store_u16(buf + 26, <uint16_t>reply_len)
    _store_u32(buf + 28, <uint32_t>payload_len)
    cdef Py_ssize_t pos = FIXED_HEADER_SIZE
    memcpy(buf + pos, target_ptr, target_len)
    pos += target_len
    memcpy(buf + pos, reply_ptr, reply_len)
    pos += reply_len
    cdef Py_ssize_t index
    for index in range(entries):
        buf[pos] = <unsigned char>key_lens[index]
        _store_u16(buf + pos + 1, <uint16_t>value_lens[index])
        pos += ENTRY_SIZE
        memcpy(buf + pos, key_ptrs[index], key_lens[index])
        pos += key_lens[index]
        memcpy(buf + pos, value_ptrs[index], value_lens[index])
        pos += value_lens[index]
    memcpy(buf + pos, PyBytes_AS_STRING(payload), payload_len)
    return out
