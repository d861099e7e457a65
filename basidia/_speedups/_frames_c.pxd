# Declarations of the compiled frame codec (behaviour in _frames_c.pyx).
#
# Other compiled modules may ``cimport`` these to decode frames straight out of
# a buffer they own, without a Python call per frame.

from libc.stdint cimport int64_t, uint32_t


cdef enum:
    # Mirrors of the wire constants in _frame.py; _frames_c.pyx checks at import
    # that they agree, so the two cannot drift.
    FRAME_VERSION = 1       # first byte of every version 1 frame
    PREFIX_SIZE = 8         # version, kind, flags, header count, u32 total length
    FIXED_HEADER_SIZE = 32  # prefix + u64 correlation id + u64 deadline + u16 u16 u32 lengths
    MAX_HEADERS = 64        # header entries allowed in one frame
    MAX_KIND = 4            # Kind.EVENT, the highest frame kind of version 1
    KNOWN_FLAGS = 0x03      # FLAG_JSON | FLAG_KWARGS
    ENTRY_SIZE = 3          # a header entry's u8 key length + u16 value length
    MAX_KEY_SIZE = 0xFF     # a header key's length travels in a u8
    MAX_SECTION_SIZE = 0xFFFF  # target, reply_to and header values: u16 lengths


cdef int64_t as_limit(object max_size) except? -1
# ``max_size`` as a C integer; values beyond int64 are clamped, which changes no
# comparison with a u32 frame length.

cdef uint32_t check_prefix(const unsigned char* data, int64_t limit, object max_size) except 0
# Validate the 8-byte prefix at ``data`` (the caller guarantees 8 readable bytes)
# and return the declared total length.

cdef object decode_view(const unsigned char* data, Py_ssize_t size, int64_t limit,
                        object max_size)
# Decode the ``size`` bytes at ``data`` as exactly one frame.  ``max_size`` is
# only used in error messages; ``limit`` is its C value.

cdef object encode_parts(kind, correlation_id, target, payload, reply_to, deadline, headers,
                         flags, max_size)
# encode_frame(Frame(kind, correlation_id, target, payload, reply_to, deadline, headers,
# flags), max_size), without making the Frame when it is not needed.
