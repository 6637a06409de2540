"""
Tests for dit4c.tunnel.frames: the codec of docs/protocols.md section 1.2.

The decoder is sans-I/O, so it is fed bytes directly: whole frames, frames cut
at every byte, and (with hypothesis, derandomized so runs are repeatable)
random and corrupted input in random chunks.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dit4c.tunnel.errors import ErrorCode, ProtocolError
from dit4c.tunnel.frames import (
    FLAG_ACK,
    FLAG_FIN,
    HEADER_SIZE,
    PREFACE,
    Frame,
    FrameDecoder,
    FrameType,
    decodeCode,
    decodeJSON,
    decodeWindow,
    encode,
    encodeCode,
    encodeHeader,
    encodeJSON,
    encodeWindow,
)

MAX_FRAME = 1024
CONTROL = (FrameType.HELLO, FrameType.WELCOME, FrameType.PING, FrameType.GOAWAY)
STREAM = (FrameType.OPEN, FrameType.DATA, FrameType.WINDOW, FrameType.RESET)

SAMPLES = [
    Frame(FrameType.HELLO, 0, 0, b'{"version":1}'),
    Frame(FrameType.WELCOME, 0, 0, b"{}"),
    Frame(FrameType.OPEN, 0, 2, b'{"peer":"203.0.113.7:51234"}'),
    Frame(FrameType.DATA, 0, 2, b"hello"),
    Frame(FrameType.DATA, FLAG_FIN, 2, b""),
    Frame(FrameType.WINDOW, 0, 3, struct.pack("!I", 65536)),
    Frame(FrameType.RESET, 0, 4, struct.pack("!I", 5) + b"gone"),
    Frame(FrameType.PING, 0, 0, b"12345678"),
    Frame(FrameType.PING, FLAG_ACK, 0, b"12345678"),
    Frame(FrameType.GOAWAY, 0, 0, struct.pack("!I", 0)),
    Frame(FrameType.DATA, 0, 2**32 - 2, b"x" * MAX_FRAME),
]
WIRE = b"".join(encode(f.type, f.stream, f.payload, f.flags) for f in SAMPLES)


def test_preface() -> None:
    assert PREFACE == bytes.fromhex("44 49 54 34 43 54 00 01")


def test_header_layout() -> None:
    """Length, type, flags, stream id; big-endian (docs/protocols.md 1.2)."""
    assert HEADER_SIZE == 10
    assert (
        encode(FrameType.DATA, 7, b"abc", FLAG_FIN)
        == b"\x00\x00\x00\x03\x03\x01\x00\x00\x00\x07abc"
    )
    assert encodeHeader(FrameType.DATA, 7, 3, FLAG_FIN) + b"abc" == encode(
        FrameType.DATA, 7, b"abc", FLAG_FIN
    )


@pytest.mark.parametrize(
    "frame", SAMPLES, ids=lambda f: f"{FrameType(f.type).name}-{len(f.payload)}"
)
def test_round_trip(frame: Frame) -> None:
    decoder = FrameDecoder(MAX_FRAME)
    assert decoder.feed(encode(frame.type, frame.stream, frame.payload, frame.flags)) == [frame]
    assert decoder.buffered == 0


def test_round_trip_many_in_one_read() -> None:
    assert FrameDecoder(MAX_FRAME).feed(WIRE) == SAMPLES


def test_split_at_every_byte_boundary() -> None:
    for cut in range(len(WIRE) + 1):
        decoder = FrameDecoder(MAX_FRAME)
        frames = decoder.feed(WIRE[:cut]) + decoder.feed(WIRE[cut:])
        assert frames == SAMPLES, cut
        assert decoder.buffered == 0


def test_byte_by_byte() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    frames = []
    for i in range(len(WIRE)):
        frames += decoder.feed(WIRE[i : i + 1])
        assert decoder.buffered <= MAX_FRAME + HEADER_SIZE
    assert frames == SAMPLES
    assert decoder.buffered == 0


def test_partial_frame_is_buffered() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    data = encode(FrameType.DATA, 2, b"abcdef")
    assert decoder.feed(data[:12]) == []
    assert decoder.buffered == 12
    assert decoder.feed(b"") == []
    assert decoder.feed(data[12:]) == [Frame(FrameType.DATA, 0, 2, b"abcdef")]
    assert decoder.buffered == 0


def test_json_helpers() -> None:
    body = {"peer": "203.0.113.7:1", "n": [1, 2]}
    (frame,) = FrameDecoder(MAX_FRAME).feed(encodeJSON(FrameType.OPEN, 2, body))
    assert frame.type == FrameType.OPEN and frame.stream == 2
    assert decodeJSON(frame) == body


@pytest.mark.parametrize("payload", [b"", b"{", b"\xff\xfe", b"[1, 2]", b'"text"', b"null"])
def test_json_that_is_not_an_object(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decodeJSON(Frame(FrameType.OPEN, 0, 2, payload))


def test_code_helpers() -> None:
    (frame,) = FrameDecoder(MAX_FRAME).feed(
        encodeCode(FrameType.RESET, 4, ErrorCode.CANCEL, "gone é")
    )
    assert decodeCode(frame) == (ErrorCode.CANCEL, "gone é")
    (frame,) = FrameDecoder(MAX_FRAME).feed(encodeCode(FrameType.GOAWAY, 0, 99))
    assert decodeCode(frame) == (99, "")
    with pytest.raises(ProtocolError):
        decodeCode(Frame(FrameType.RESET, 0, 4, b"\x00\x00\x01"))


def test_code_reason_is_bounded() -> None:
    frame = encodeCode(FrameType.GOAWAY, 0, 1, "x" * 100_000)
    assert len(frame) <= HEADER_SIZE + 4 + 1024


def test_window_helpers() -> None:
    (frame,) = FrameDecoder(MAX_FRAME).feed(encodeWindow(3, 12345))
    assert frame.type == FrameType.WINDOW and frame.stream == 3
    assert decodeWindow(frame) == 12345
    for bad in (b"", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00", struct.pack("!I", 0)):
        with pytest.raises(ProtocolError):
            decodeWindow(Frame(FrameType.WINDOW, 0, 3, bad))


def test_frame_of_exactly_max_frame() -> None:
    frame = Frame(FrameType.DATA, 0, 2, b"y" * MAX_FRAME)
    assert FrameDecoder(MAX_FRAME).feed(encode(*_args(frame))) == [frame]


def test_oversize_length_refused_from_the_header_alone() -> None:
    """Refused before any of the payload is buffered."""
    decoder = FrameDecoder(MAX_FRAME)
    header = encodeHeader(FrameType.DATA, 2, MAX_FRAME + 1)
    assert decoder.feed(header[:5]) == []
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.feed(header[5:])


def test_oversize_length_after_good_frames() -> None:
    good = encode(FrameType.DATA, 2, b"ok")
    with pytest.raises(ProtocolError):
        FrameDecoder(MAX_FRAME).feed(good + encodeHeader(FrameType.DATA, 2, 2**32 - 1))


@pytest.mark.parametrize("ftype", [8, 9, 0x7F, 0xFF])
def test_unknown_type(ftype: int) -> None:
    with pytest.raises(ProtocolError, match="unknown frame type"):
        FrameDecoder(MAX_FRAME).feed(encode(ftype, 0, b""))
    with pytest.raises(ProtocolError, match="unknown frame type"):
        FrameDecoder(MAX_FRAME).feed(encode(ftype, 2, b""))


@pytest.mark.parametrize("ftype", CONTROL, ids=lambda t: t.name)
def test_control_frame_on_a_stream(ftype: FrameType) -> None:
    with pytest.raises(ProtocolError, match="on stream 5"):
        FrameDecoder(MAX_FRAME).feed(encode(ftype, 5, b"12345678"))


@pytest.mark.parametrize("ftype", STREAM, ids=lambda t: t.name)
def test_stream_frame_on_stream_zero(ftype: FrameType) -> None:
    with pytest.raises(ProtocolError, match="on stream 0"):
        FrameDecoder(MAX_FRAME).feed(encode(ftype, 0, b"\x00\x00\x00\x01"))


def test_bad_header_split_across_reads() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    data = encode(FrameType.DATA, 0, b"x")
    for i in range(HEADER_SIZE - 1):
        assert decoder.feed(data[i : i + 1]) == []
    with pytest.raises(ProtocolError):
        decoder.feed(data[HEADER_SIZE - 1 :])


# -- fuzzing ------------------------------------------------------------------

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

frames = st.builds(
    lambda ftype, stream, flags, payload: Frame(
        ftype, flags, 0 if ftype in CONTROL else stream, payload
    ),
    st.sampled_from(list(FrameType)),
    st.integers(1, 2**32 - 1),
    st.integers(0, 255),
    st.binary(max_size=MAX_FRAME),
)


def _args(frame: Frame) -> tuple[int, int, bytes, int]:
    return frame.type, frame.stream, frame.payload, frame.flags


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


def _feedAll(data: bytes, cuts: list[int]) -> tuple[list[Frame], ProtocolError | None]:
    """Feed ``data`` cut at ``cuts``; any error but ProtocolError fails the test."""
    decoder = FrameDecoder(MAX_FRAME)
    out: list[Frame] = []
    for chunk in _chunks(data, cuts):
        try:
            out += decoder.feed(chunk)
        except ProtocolError as e:
            return out, e
        assert decoder.buffered <= MAX_FRAME + HEADER_SIZE
        for frame in out:
            assert len(frame.payload) <= MAX_FRAME
    return out, None


@FUZZ
@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 10_000), max_size=20))
def test_fuzz_valid_frames_in_random_chunks(sample: list[Frame], cuts: list[int]) -> None:
    data = b"".join(encode(*_args(f)) for f in sample)
    decoded, error = _feedAll(data, cuts)
    assert error is None
    assert decoded == sample


@FUZZ
@given(st.binary(max_size=4 * MAX_FRAME), st.lists(st.integers(0, 10_000), max_size=20))
def test_fuzz_random_bytes(data: bytes, cuts: list[int]) -> None:
    _feedAll(data, cuts)


@FUZZ
@given(
    st.lists(frames, min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 10_000),
    st.lists(st.integers(0, 10_000), max_size=20),
)
def test_fuzz_corrupted_frames(
    sample: list[Frame], flips: list[tuple[int, int]], truncate: int, cuts: list[int]
) -> None:
    data = bytearray(b"".join(encode(*_args(f)) for f in sample))
    for pos, value in flips:
        data[pos % len(data)] = value
    data = data[: len(data) - truncate % len(data)]
    decoded, error = _feedAll(bytes(data), cuts)
    if error is None:
        # Whatever it accepted obeys the rules it checks.
        for frame in decoded:
            assert frame.type in set(FrameType)
            assert (frame.stream == 0) == (frame.type in CONTROL)


@pytest.mark.parametrize(
    "payload",
    [b"\x00", b'{"a":', b"1e999999", b"[" * 5000, b'{"a":' * 5000, b"[" * MAX_FRAME],
    ids=["nul", "truncated", "huge-number", "deep-array", "deep-object", "deep-max-frame"],
)
def test_decodeJSON_raises_only_protocol_error(payload: bytes) -> None:
    """Deeply nested JSON (a RecursionError inside json) is a protocol error too."""
    with pytest.raises(ProtocolError):
        decodeJSON(Frame(FrameType.OPEN, 0, 2, payload))


@FUZZ
@given(st.binary(max_size=MAX_FRAME))
def test_fuzz_decodeJSON(payload: bytes) -> None:
    try:
        body = decodeJSON(Frame(FrameType.OPEN, 0, 2, payload))
    except ProtocolError:
        return
    assert isinstance(body, dict)
