"""Differential tests: the compiled codec against the reference, on generated input (B1, B2).

For any frame both encoders give the same bytes or the same error; for any bytes
(random, truncated, corrupted, with mutated lengths) both decoders give an equal
``Frame`` or a ``FrameError`` of the same text.  The reference itself only ever
raises ``FrameError`` on bytes.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from basidia._speedups import Frame  # noqa: E402
from basidia.errors import FrameError  # noqa: E402
from tests.speedups.conftest import Implementation, outcome  # noqa: E402

GOLDEN = sorted((Path(__file__).parent / "data" / "frames").glob("*.bin"))
SEEDS = [path.read_bytes() for path in GOLDEN]

# Timings vary with the machine's load; the cases themselves are fast.
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Mostly valid values, with the edges and some out-of-range ones mixed in.
u64 = st.one_of(
    st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**32, 2**63, 2**64 - 1, -1, 2**64])
)
short_text = st.text(max_size=12)
frames = st.builds(
    Frame,
    kind=st.one_of(st.integers(1, 4), st.sampled_from([0, 5, -1, 255, 2**70, True, False])),
    correlation_id=u64,
    target=st.one_of(short_text, st.sampled_from(["é" * 32768, "x" * 65535])),
    payload=st.binary(max_size=200),
    reply_to=short_text,
    deadline=u64,
    headers=st.one_of(
        st.dictionaries(short_text, short_text, max_size=4),
        st.dictionaries(st.text(min_size=250, max_size=260), st.just(""), min_size=1, max_size=1),
        st.just({str(i): "" for i in range(65)}),
    ),
    flags=st.one_of(st.integers(0, 3), st.sampled_from([4, -1, 0xFF, 2**64])),
)


def decode_outcome(impl: Implementation, data: bytes, *max_size: int) -> tuple[Any, ...]:
    result = outcome(impl.decode_frame, data, *max_size)
    if result[0] == "error":  # B1: bytes only ever give a typed frame error
        assert result[1] is FrameError, result
    return result


@given(frames, st.one_of(st.none(), st.integers(0, 2**40)))
@settings(relaxed, max_examples=400)
def test_encode_gives_the_same_bytes_or_error(
    py_impl: Implementation, c_impl: Implementation, frame: Frame, max_size: int | None
) -> None:
    args = () if max_size is None else (max_size,)
    expected = outcome(py_impl.encode_frame, frame, *args)
    assert outcome(c_impl.encode_frame, frame, *args) == expected
    if expected[0] == "ok":
        assert decode_outcome(c_impl, expected[1], *args) == ("ok", frame)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A golden frame or a random byte string, then a few random edits."""
    data = bytearray(draw(st.one_of(st.sampled_from(SEEDS), st.binary(max_size=64))))
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "length"]))
        where = draw(st.integers(0, max(len(data) - 1, 0)))
        if edit == "truncate":
            del data[where:]
        elif edit == "flip" and data:
            data[where] = draw(st.integers(0, 255))
        elif edit == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=4))
        elif edit == "delete":
            del data[where : where + draw(st.integers(1, 4))]
        elif edit == "length" and len(data) >= 32:
            # The declared total, section lengths, header count or an entry's lengths.
            offset, fmt = draw(
                st.sampled_from([(3, ">B"), (4, ">I"), (24, ">H"), (26, ">H"), (28, ">I")])
            )
            bits = struct.calcsize(fmt) * 8
            struct.pack_into(fmt, data, offset, draw(st.integers(0, 2**bits - 1)))
    return bytes(data)


@given(st.one_of(mutated(), st.binary(max_size=300)), st.sampled_from([(), (40,), (2**40,)]))
@settings(relaxed, max_examples=1500)
def test_decode_gives_the_same_frame_or_error(
    py_impl: Implementation, c_impl: Implementation, data: bytes, max_size: tuple[int, ...]
) -> None:
    assert decode_outcome(c_impl, data, *max_size) == decode_outcome(py_impl, data, *max_size)


def test_fuzz_compiled_parser(py_impl: Implementation, c_impl: Implementation) -> None:
    """A quick seeded mutation fuzz of the compiled parser (tens of thousands of inputs)."""
    rng = random.Random(20_261_121)
    for _ in range(40_000):
        data = bytearray(rng.choice(SEEDS))
        for _ in range(rng.randint(1, 4)):
            where = rng.randrange(len(data) + 1)
            choice = rng.random()
            if choice < 0.5 and data:
                data[min(where, len(data) - 1)] = rng.randrange(256)
            elif choice < 0.7:
                del data[where : where + rng.randint(1, 8)]
            elif choice < 0.9:
                data[where:where] = rng.randbytes(rng.randint(1, 8))
            else:
                data += bytes(data)  # a second frame, or a long tail
        blob = bytes(data)
        assert decode_outcome(c_impl, blob) == decode_outcome(py_impl, blob)
