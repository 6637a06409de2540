"""
The tunnel's frame codec: bytes in, frames out, and frames to bytes.

No I/O and no clock here, so the parser can be fed anything (tests feed it
random and corrupted bytes) and every limit is checked in one place. The
format is written in ``docs/protocols.md`` section 1.2.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any, NamedTuple

from dit4c.tunnel.errors import ErrorCode, ProtocolError

PREFACE = b"DIT4CT\x00\x01"
HEADER = struct.Struct("!IBBI")
HEADER_SIZE = HEADER.size
_U32 = struct.Struct("!I")

FLAG_FIN = 0x01
FLAG_ACK = 0x02

#: Largest payload anyone may configure; a length field above the receiver's
#: own ``max_frame`` is refused before any of the payload is buffered.
ABSOLUTE_MAX_FRAME = 16 * 1024 * 1024


class FrameType(enum.IntEnum):
    HELLO = 0
    WELCOME = 1
    OPEN = 2
    DATA = 3
    WINDOW = 4
    RESET = 5
    PING = 6
    GOAWAY = 7


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)
_CONTROL_ONLY = frozenset((FrameType.HELLO, FrameType.WELCOME, FrameType.PING, FrameType.GOAWAY))


class Frame(NamedTuple):
    type: int
    flags: int
    stream: int
    payload: bytes


def encode(ftype: int, stream: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """One frame as bytes."""
    return HEADER.pack(len(payload), ftype, flags, stream) + payload


def encodeHeader(ftype: int, stream: int, length: int, flags: int = 0) -> bytes:
    """
    Just the header, for callers that hand the payload to
    ``writeSequence`` separately and so avoid copying bulk data once more.
    """
    return HEADER.pack(length, ftype, flags, stream)


def encodeJSON(ftype: int, stream: int, body: dict[str, Any]) -> bytes:
    return encode(ftype, stream, json.dumps(body, separators=(",", ":")).encode())


def encodeCode(ftype: int, stream: int, code: int, reason: str = "") -> bytes:
    """A RESET or GOAWAY frame: a 32-bit code and a UTF-8 reason."""
    return encode(ftype, stream, _U32.pack(code) + reason.encode("utf-8", "replace")[:1024])


def encodeWindow(stream: int, increment: int) -> bytes:
    return encode(FrameType.WINDOW, stream, _U32.pack(increment))


def decodeJSON(frame: Frame) -> dict[str, Any]:
    try:
        body = json.loads(frame.payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError(f"{FrameType(frame.type).name} payload is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{FrameType(frame.type).name} payload is not a JSON object")
    return body


def decodeCode(frame: Frame) -> tuple[int, str]:
    if len(frame.payload) < 4:
        raise ProtocolError(f"{FrameType(frame.type).name} frame shorter than its code")
    (code,) = _U32.unpack_from(frame.payload)
    return code, frame.payload[4:].decode("utf-8", "replace")


def decodeWindow(frame: Frame) -> int:
    if len(frame.payload) != 4:
        raise ProtocolError("WINDOW payload must be 4 bytes")
    (increment,) = _U32.unpack(frame.payload)
    if increment == 0:
        raise ProtocolError("WINDOW increment of zero")
    return increment


class FrameDecoder:
    """
    Incremental parser: ``feed`` it whatever arrived; it returns the frames
    completed so far and keeps at most one partial frame (bounded by
    ``maxFrame``) buffered.

    It checks what can be checked without session state: the length limit,
    known types, and that control frames are on stream 0 and stream frames
    are not. Anything else raises :class:`ProtocolError`, after which the
    decoder must not be used again.
    """

    __slots__ = ("maxFrame", "_parts", "_partsLen", "_need")

    def __init__(self, maxFrame: int) -> None:
        self.maxFrame = maxFrame
        # A partial frame is kept as a list of pieces and joined only once
        # the whole frame is there, so a large frame trickling in costs one
        # copy rather than one per read.
        self._parts: list[bytes] = []
        self._partsLen = 0
        self._need = HEADER_SIZE

    @property
    def buffered(self) -> int:
        return self._partsLen

    def feed(self, data: bytes) -> list[Frame]:
        if self._parts:
            self._parts.append(data)
            self._partsLen += len(data)
            if self._partsLen < self._need:
                return []
            buf = b"".join(self._parts)
            self._parts = []
        else:
            buf = data
        frames: list[Frame] = []
        pos = 0
        end = len(buf)
        need = HEADER_SIZE
        unpack = HEADER.unpack_from
        maxFrame = self.maxFrame
        while end - pos >= HEADER_SIZE:
            length, ftype, flags, stream = unpack(buf, pos)
            if length > maxFrame:
                raise ProtocolError(f"frame of {length} bytes exceeds the limit of {maxFrame}")
            if ftype not in _KNOWN_TYPES:
                raise ProtocolError(f"unknown frame type {ftype}")
            if (stream == 0) != (ftype in _CONTROL_ONLY):
                raise ProtocolError(f"{FrameType(ftype).name} frame on stream {stream}")
            start = pos + HEADER_SIZE
            if end - start < length:
                need = HEADER_SIZE + length
                break
            pos = start + length
            frames.append(Frame(ftype, flags, stream, buf[start:pos]))
        if pos < end:
            rest = buf[pos:]
            self._parts = [rest]
            self._partsLen = len(rest)
            self._need = need
        else:
            self._partsLen = 0
        return frames


__all__ = [
    "ABSOLUTE_MAX_FRAME",
    "ErrorCode",
    "FLAG_ACK",
    "FLAG_FIN",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "PREFACE",
    "ProtocolError",
    "encode",
    "encodeCode",
    "encodeHeader",
    "encodeJSON",
    "encodeWindow",
]
