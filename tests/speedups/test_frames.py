"""The frame codec, run against both implementations (``impl`` is ``py`` then ``c``)."""

from __future__ import annotations

import struct
import tracemalloc
from types import SimpleNamespace

import pytest

from basidia._speedups import FLAG_JSON, FLAG_KWARGS, HARD_MAX_FRAME_SIZE, Frame, Kind
from basidia.errors import FrameError
from tests.speedups.conftest import Implementation

REQUEST = Frame(
    Kind.REQUEST,
    7,
    "greeting_service.hello",
    b"\x91\xa5World",
    "inbox.1f2e3d4c",
    1_767_225_600_000,
    {"idem": "k-1", "tp": "00-4bf92f35-01"},
    FLAG_KWARGS,
)


def patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``data`` with one big-endian field overwritten."""
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    "frame",
    [
        REQUEST,
        Frame(Kind.REPLY, 7, "", b"\xadHello, World!"),
        Frame(Kind.EVENT, 0, "user.created", b'{"a":1}', flags=FLAG_JSON),
        Frame(Kind.ERROR, 2**64 - 1, "é" * 100, b"", "r" * 0xFFFF, 2**64 - 1),
        Frame(Kind.EVENT, 1, "t", b"p" * 100_000, headers={f"h{i}": "v" * i for i in range(64)}),
        Frame(Kind.REQUEST, 1, "", b"", headers={"k" * 255: "v" * 0xFFFF}),
    ],
    ids=["request", "reply", "event-json", "limits", "64-headers", "longest-header"],
)
def test_round_trip(impl: Implementation, frame: Frame) -> None:
    data = impl.encode_frame(frame)
    assert len(data) == struct.unpack_from(">I", data, 4)[0]
    assert impl.decode_frame(data) == frame


def test_decoded_frame_has_plain_types(impl: Implementation) -> None:
    frame = impl.decode_frame(impl.encode_frame(REQUEST))
    assert type(frame) is Frame
    assert type(frame.kind) is int
    assert type(frame.payload) is bytes
    assert type(frame.headers) is dict


def test_encode_accepts_kind_enum_and_bool_flags(impl: Implementation) -> None:
    plain = Frame(1, 1, "t", b"", flags=1)
    assert impl.encode_frame(Frame(Kind.REQUEST, 1, "t", b"", flags=True)) == impl.encode_frame(
        plain
    )


def test_decode_accepts_bytearray_and_memoryview(impl: Implementation) -> None:
    data = impl.encode_frame(REQUEST)
    assert impl.decode_frame(bytearray(data)) == REQUEST
    assert impl.decode_frame(memoryview(data)) == REQUEST


def test_encode_accepts_any_frame_like_object(impl: Implementation) -> None:
    fields = {f: getattr(REQUEST, f) for f in REQUEST.__struct_fields__}
    assert impl.encode_frame(SimpleNamespace(**fields)) == impl.encode_frame(REQUEST)


GOOD = Frame(Kind.REQUEST, 1, "svc.m", b"\x90", "inbox", 0, {"a": "b"})


def _good() -> bytes:
    return bytes.fromhex(
        "01010001 00000030 0000000000000001 0000000000000000 0005 0005 00000001"
        " 73 76 63 2e 6d  69 6e 62 6f 78  01 0001 61 62  90"
    )


# (bytes, max_size, message): one case per check, in the documented order.
DECODE_ERRORS = [
    (b"", None, "truncated frame: 0 bytes, the prefix needs 8"),
    (_good()[:7], None, "truncated frame: 7 bytes, the prefix needs 8"),
    (patched(_good(), 0, ">B", 0), None, "unsupported frame version 0"),
    (patched(_good(), 1, ">B", 0), None, "unknown frame kind 0"),
    (patched(_good(), 1, ">B", 255), None, "unknown frame kind 255"),
    (patched(_good(), 2, ">B", 0x80), None, "unknown frame flags 0x80"),
    (patched(_good(), 3, ">B", 255), None, "too many headers: 255 > 64"),
    (_good(), 47, "frame of 48 bytes exceeds the limit of 47 bytes"),
    (patched(_good(), 4, ">I", 2**32 - 1), None, "frame of 4294967295 bytes exceeds the limit"),
    (
        patched(_good(), 4, ">I", 0),
        None,
        "declared frame length 0 is shorter than the fixed header",
    ),
    (_good()[:40], None, "truncated frame: 40 of 48 bytes"),
    (_good() + b"xy", None, "2 trailing bytes after the frame"),
    (patched(_good(), 24, ">H", 18), None, "target of 18 bytes overruns the frame at offset 32"),
    (patched(_good(), 32, ">B", 0xC3), None, "target is not valid UTF-8"),
    (patched(_good(), 26, ">H", 14), None, "reply_to of 14 bytes overruns the frame at offset 37"),
    (patched(_good(), 37, ">B", 0x80), None, "reply_to is not valid UTF-8"),
    (patched(_good(), 3, ">B", 2), None, "header 1 overruns the frame at offset 47"),
    (patched(_good(), 42, ">B", 9), None, "header key of 9 bytes overruns the frame at offset 45"),
    (patched(_good(), 45, ">B", 0xFF), None, "header key is not valid UTF-8"),
    (
        patched(_good(), 43, ">H", 3),
        None,
        "header value of 3 bytes overruns the frame at offset 46",
    ),
    (patched(_good(), 46, ">B", 0xED), None, "header value is not valid UTF-8"),
    (patched(_good(), 28, ">I", 2), None, "payload of 2 bytes overruns the frame at offset 47"),
    (patched(_good(), 28, ">I", 0), None, "1 unused bytes in the frame"),
]


def test_the_hand_built_frame_is_valid(impl: Implementation) -> None:
    assert impl.decode_frame(_good()) == GOOD
    assert impl.encode_frame(GOOD) == _good()


@pytest.mark.parametrize(("data", "max_size", "message"), DECODE_ERRORS)
def test_decode_errors(
    impl: Implementation, data: bytes, max_size: int | None, message: str
) -> None:
    with pytest.raises(FrameError) as caught:
        impl.decode_frame(data, *([] if max_size is None else [max_size]))
    assert str(caught.value).startswith(message)


def test_duplicate_header_keys(impl: Implementation) -> None:
    data = impl.encode_frame(Frame(Kind.EVENT, 0, "e", b"", headers={"ab": "1", "ac": "2"}))
    with pytest.raises(FrameError, match=r"^duplicate header keys$"):
        impl.decode_frame(data.replace(b"ac", b"ab"))


def test_an_overrun_is_reported_before_a_duplicate(impl: Implementation) -> None:
    # The duplicate check runs once every entry is read, as in the reference.
    data = impl.encode_frame(Frame(Kind.EVENT, 0, "e", b"", headers={"ab": "1", "ac": "2"}))
    data = patched(data.replace(b"ac", b"ab"), 3, ">B", 3)
    with pytest.raises(FrameError, match=r"^header 2 overruns"):
        impl.decode_frame(data)


def _frame(**changes: object) -> Frame:
    fields = {f: getattr(REQUEST, f) for f in REQUEST.__struct_fields__}
    fields.update(changes)
    return Frame(**fields)  # type: ignore[arg-type]


ENCODE_ERRORS = [
    (_frame(kind=0), "unknown frame kind 0"),
    (_frame(kind=False), "unknown frame kind False"),
    (_frame(kind=5), "unknown frame kind 5"),
    (_frame(kind=2**70), f"unknown frame kind {2**70}"),
    (_frame(flags=4), "unknown frame flags 0x04"),
    (_frame(flags=-1), "unknown frame flags 0x-1"),
    (_frame(flags=2**64), f"unknown frame flags 0x{2**64:02x}"),
    (_frame(correlation_id=-1), "correlation id out of range"),
    (_frame(correlation_id=2**64), "correlation id out of range"),
    (_frame(deadline=-1), "deadline out of range"),
    (_frame(deadline=2**64), "deadline out of range"),
    (_frame(headers={str(i): "" for i in range(65)}), "too many headers: 65 > 64"),
    (_frame(target="é" * 32768), "target of 65536 bytes exceeds 65535 bytes"),
    (_frame(reply_to="r" * 65536), "reply_to of 65536 bytes exceeds 65535 bytes"),
    (_frame(headers={"k" * 256: ""}), "header key of 256 bytes exceeds 255 bytes"),
    (_frame(headers={"k": "v" * 65536}), "header value of 65536 bytes exceeds 65535 bytes"),
    (_frame(payload=b"x" * (1 << 20)), "frame of 1048673 bytes exceeds the limit of 1048576 bytes"),
]


@pytest.mark.parametrize(("frame", "message"), ENCODE_ERRORS)
def test_encode_errors(impl: Implementation, frame: Frame, message: str) -> None:
    with pytest.raises(FrameError) as caught:
        impl.encode_frame(frame)
    assert str(caught.value) == message


def test_encode_checks_run_in_order(impl: Implementation) -> None:
    frame = _frame(kind=9, flags=9, correlation_id=-1, target="x" * 70000)
    with pytest.raises(FrameError, match=r"^unknown frame kind 9$"):
        impl.encode_frame(frame)
    with pytest.raises(FrameError, match=r"^unknown frame flags 0x09$"):
        impl.encode_frame(_frame(flags=9, correlation_id=-1))


def test_encode_limit_is_configurable(impl: Implementation) -> None:
    data = impl.encode_frame(REQUEST)
    assert impl.encode_frame(REQUEST, len(data)) == data
    with pytest.raises(FrameError, match=f"exceeds the limit of {len(data) - 1} bytes"):
        impl.encode_frame(REQUEST, len(data) - 1)
    big = _frame(payload=b"x" * (HARD_MAX_FRAME_SIZE - 200))
    data = impl.encode_frame(big, HARD_MAX_FRAME_SIZE)
    assert impl.decode_frame(data, HARD_MAX_FRAME_SIZE) == big


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (_frame(target="\ud800"), UnicodeEncodeError),
        (_frame(headers={"k": "\udfff"}), UnicodeEncodeError),
        (_frame(headers={1: "v"}), AttributeError),
        (_frame(payload="text"), TypeError),
    ],
    ids=["surrogate-target", "surrogate-header", "int-header-key", "str-payload"],
)
def test_encode_of_ill_typed_fields_fails_like_the_reference(
    impl: Implementation, py_impl: Implementation, frame: Frame, error: type[Exception]
) -> None:
    with pytest.raises(error) as caught:
        impl.encode_frame(frame)
    with pytest.raises(error) as expected:
        py_impl.encode_frame(frame)
    assert str(caught.value) == str(expected.value)


# -- B2: declared sizes are checked before anything is allocated for them ---------------


@pytest.mark.parametrize(
    ("data", "max_size", "message"),
    [
        (patched(_good()[:8], 4, ">I", 2**32 - 1), None, "frame of 4294967295 bytes exceeds"),
        (patched(_good()[:40], 4, ">I", 2**32 - 1), 2**40, "truncated frame: 40 of 4294967295"),
        (patched(_good(), 28, ">I", 2**32 - 1), None, "payload of 4294967295 bytes overruns"),
        (patched(_good(), 24, ">H", 0xFFFF), None, "target of 65535 bytes overruns"),
        (patched(_good(), 43, ">H", 0xFFFF), None, "header value of 65535 bytes overruns"),
        (patched(_good(), 3, ">B", 255), None, "too many headers: 255 > 64"),
    ],
    ids=["4GiB", "4GiB-no-limit", "4GiB-payload", "64KiB-target", "64KiB-value", "255-headers"],
)
def test_bombs_are_rejected_before_allocating(
    impl: Implementation, data: bytes, max_size: int | None, message: str
) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match=f"^{message}"):
            impl.decode_frame(data, *([] if max_size is None else [max_size]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
