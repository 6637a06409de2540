"""
What can go wrong on a tunnel, as codes for the wire and exceptions for code.

Each exception's docstring is the meaning a person reading a log sees.
"""

from __future__ import annotations

import enum

from twisted.internet.error import ConnectionLost


class ErrorCode(enum.IntEnum):
    """The 32-bit codes carried by RESET and GOAWAY (docs/protocols.md 1.6)."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    FLOW_CONTROL_ERROR = 2
    REFUSED_STREAM = 3
    CONNECT_FAILED = 4
    CANCEL = 5
    AUTH_FAILED = 6
    HEARTBEAT_TIMEOUT = 7
    REPLACED = 8
    INTERNAL_ERROR = 9
    BUFFER_LIMIT = 10
    SHUTDOWN = 11


def codeName(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"UNKNOWN({code})"


class TunnelError(Exception):
    """The tunnel failed."""

    code: int = ErrorCode.INTERNAL_ERROR

    def __init__(self, reason: str = "", code: int | None = None) -> None:
        super().__init__(reason or (self.__doc__ or "").strip())
        if code is not None:
            self.code = code

    @property
    def reason(self) -> str:
        return str(self.args[0])


class ProtocolError(TunnelError):
    """The peer broke the tunnel protocol; its tunnel was closed."""

    code = ErrorCode.PROTOCOL_ERROR


class FlowControlError(ProtocolError):
    """The peer sent more than a stream's window allowed."""

    code = ErrorCode.FLOW_CONTROL_ERROR


class HandshakeRefused(TunnelError):
    """The routing server refused this tunnel (for example, its token)."""

    code = ErrorCode.AUTH_FAILED


class TunnelClosed(TunnelError):
    """The tunnel is closed or going away; no new streams can be opened on it."""

    code = ErrorCode.SHUTDOWN


class StreamLimit(TunnelError):
    """This tunnel already carries as many streams as it may."""

    code = ErrorCode.REFUSED_STREAM


class StreamReset(ConnectionLost):
    """The stream was reset: by the peer, or because its tunnel went away."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"{codeName(code)}: {reason}" if reason else codeName(code))
        self.code = code
        self.reason = reason
