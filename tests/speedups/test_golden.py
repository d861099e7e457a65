"""Golden vectors: fixed bytes that both implementations must decode as described.

``data/frames/NAME.bin`` holds the bytes and ``data/frames/frames.json`` says what
each decodes to (a frame, or the exact ``FrameError`` message).  The hex blocks
of docs/protocol.md are the same vectors, checked here so the document cannot
drift from the code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from basidia._speedups import Frame
from basidia.errors import FrameError
from tests.speedups.conftest import Implementation

DATA = Path(__file__).parent / "data" / "frames"
PROTOCOL_MD = Path(__file__).parents[2] / "docs" / "protocol.md"
VECTORS: dict[str, dict[str, Any]] = json.loads((DATA / "frames.json").read_text("utf-8"))


def expected_frame(fields: dict[str, Any]) -> Frame:
    fields = dict(fields)
    payload = bytes.fromhex(fields.pop("payload_hex"))
    return Frame(payload=payload, **fields)


def test_every_vector_is_described() -> None:
    assert sorted(path.stem for path in DATA.glob("*.bin")) == sorted(VECTORS)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_golden_vector(impl: Implementation, name: str) -> None:
    data = (DATA / f"{name}.bin").read_bytes()
    vector = VECTORS[name]
    if "frame" in vector:
        frame = expected_frame(vector["frame"])
        assert impl.decode_frame(data) == frame
        assert impl.encode_frame(frame) == data
    else:
        with pytest.raises(FrameError) as caught:
            impl.decode_frame(data)
        assert str(caught.value) == vector["error"]


# A golden block in the document: a fenced ``text golden=NAME`` block of hex
# bytes, where ``#`` starts a comment that runs to the end of the line.
_BLOCK = re.compile(r"^```text golden=(?P<name>\w+)\n(?P<body>.*?)^```$", re.M | re.S)


def doc_vectors() -> dict[str, bytes]:
    vectors = {}
    for match in _BLOCK.finditer(PROTOCOL_MD.read_text("utf-8")):
        hex_digits = "".join(line.split("#", 1)[0] for line in match["body"].splitlines())
        vectors[match["name"]] = bytes.fromhex(hex_digits)
    return vectors


def test_protocol_md_shows_every_valid_vector() -> None:
    valid = {name for name, vector in VECTORS.items() if "frame" in vector}
    assert valid <= set(doc_vectors())


@pytest.mark.parametrize("name", sorted(doc_vectors()))
def test_protocol_md_hex_matches_the_vector(impl: Implementation, name: str) -> None:
    data = doc_vectors()[name]
    assert data == (DATA / f"{name}.bin").read_bytes()
    vector = VECTORS[name]
    if "frame" in vector:
        assert impl.decode_frame(data) == expected_frame(vector["frame"])
    else:
        with pytest.raises(FrameError, match=f"^{re.escape(vector['error'])}$"):
            impl.decode_frame(data)
