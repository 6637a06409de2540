"""
The channel's wire format: what portal and scheduler, and scheduler and
compute node, say to each other (docs/protocols.md sections 7 and 11).

One JSON object per WebSocket text message, with a string ``type``. This
module encodes and decodes them, checks every field (a bad one is a
:class:`ProtocolError`, which closes only the offending link), and names
the limits and close codes both links share. The states it carries are
:class:`dit4c.common.life.State`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any
from urllib.parse import urlsplit

from dit4c.channel.errors import ProtocolError
from dit4c.common.life import ACTIONS, STATES, State
from dit4c.common.tokens import INSTANCE_ID_RE
from dit4c.common.websocket import configureFactory

__all__ = [
    "AUDIENCE",
    "HANDSHAKE_TIMEOUT",
    "MAX_ID",
    "MAX_MESSAGE",
    "MAX_NONCE",
    "MAX_REASON",
    "MAX_URL",
    "OPS",
    "PATH",
    "PING_INTERVAL",
    "PING_TIMEOUT",
    "PROOF_LIFETIME",
    "SUBPROTOCOL",
    "CloseCode",
    "Command",
    "InstanceStatus",
    "LogChunk",
    "LogsRequest",
    "MAX_LOG_CHUNK",
    "decode",
    "encode",
    "instanceField",
    "linkOptions",
    "parseCommand",
    "parseLogChunk",
    "parseLogsRequest",
    "parseReport",
    "parseStatus",
    "privateMembers",
    "text",
]

#: The WebSocket subprotocol both ends name; the portal refuses a client without it.
SUBPROTOCOL = "dit4c-channel.1"
#: Where the portal serves the channel.
PATH = "/.dit4c/channel"
#: The ``aud`` of a scheduler's proof.
AUDIENCE = "dit4c-portal-channel"
#: The largest message either end accepts (bytes); a larger one closes the channel (1009).
MAX_MESSAGE = 1024 * 1024
#: Seconds from the WebSocket opening to the end of the handshake (``welcome``).
HANDSHAKE_TIMEOUT = 10.0
#: Seconds between WebSocket pings, and without a pong before the peer is taken for dead.
PING_INTERVAL = 10.0
PING_TIMEOUT = 30.0
#: The longest a proof may live (``exp - iat``), in seconds.
PROOF_LIFETIME = 60
#: What a scheduler can be told to do: start, and each person's action.
OPS: tuple[str, ...] = ("start", *(action.op for action in ACTIONS.values()))
#: JWK members that only a private key has (RFC 7518 section 6): never on the channel.
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

MAX_ID = 128
MAX_REASON = 1000
MAX_URL = 2048
MAX_NONCE = 256
#: The most of a tool's output one ``logs`` answer carries (bytes before
#: decoding): escaped as JSON at worst six bytes each, it still fits a message.
MAX_LOG_CHUNK = 128 * 1024


class CloseCode(IntEnum):
    """WebSocket close codes (private range) the channel uses, beside 1000 and 1009."""

    #: Malformed JSON, an unknown type, a field of the wrong kind, a message out of turn.
    PROTOCOL_ERROR = 4000
    #: The scheduler's proof (or the scheduler itself) was refused.
    AUTH_FAILED = 4001
    #: The handshake did not finish within ``HANDSHAKE_TIMEOUT``.
    HANDSHAKE_TIMEOUT = 4002
    #: A newer channel of the same scheduler took over.
    REPLACED = 4003
    #: The portal is stopping.
    SHUTDOWN = 4004
    #: A bug, or the portal's database failed: reconnect later.
    INTERNAL_ERROR = 4005


def encode(message: Mapping[str, Any]) -> bytes:
    """A message as the UTF-8 JSON text of one WebSocket text frame."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _noConstant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(payload: bytes, isBinary: bool) -> dict[str, Any]:
    """
    A received message: a JSON object with a string ``type``.

    :raises ProtocolError: anything else.
    """
    if isBinary:
        raise ProtocolError("binary message (the channel speaks JSON text)")
    try:
        message = json.loads(payload.decode("utf-8"), parse_constant=_noConstant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("malformed JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("message is not a JSON object")
    if not isinstance(message.get("type"), str):
        raise ProtocolError("message without a type")
    return message


def text(message: Mapping[str, Any], name: str, *, limit: int = MAX_ID, optional: bool = False) -> Any:
    """The string field ``name`` (None if ``optional`` and absent or null)."""
    value = message.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{message.get('type')}: {name} must be a non-empty string")
    if len(value) > limit:
        raise ProtocolError(f"{message.get('type')}: {name} longer than {limit} characters")
    return value


def instanceField(message: Mapping[str, Any], name: str = "instance") -> str:
    """An instance id field: one DNS label."""
    value = message.get(name)
    if not isinstance(value, str) or INSTANCE_ID_RE.fullmatch(value) is None:
        raise ProtocolError(f"{message.get('type')}: {name} is not an instance id")
    return value


def _url(message: Mapping[str, Any]) -> str | None:
    value = text(message, "url", limit=MAX_URL, optional=True)
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ProtocolError(f"{message.get('type')}: url must be an http(s) URL")
    return str(value)


@dataclass(frozen=True)
class InstanceStatus:
    """What a scheduler says about one instance: its state, why, and where to reach it."""

    instance: str
    state: State
    #: Shown to the user: why it is in this state (chiefly for ``errored``).
    reason: str | None = None
    #: The tool's URL, once it works.
    url: str | None = None

    def __post_init__(self) -> None:
        # A state given by name is checked (and made a State) here.
        object.__setattr__(self, "state", State(self.state))

    def toJSON(self) -> dict[str, Any]:
        return {"instance": self.instance, "state": self.state.value, "reason": self.reason, "url": self.url}


def parseStatus(message: Mapping[str, Any]) -> InstanceStatus:
    """A ``state`` message, or one entry of a ``report``."""
    if not isinstance(message, Mapping):
        raise ProtocolError("report: each instance must be a JSON object")
    try:
        state = State(str(message.get("state")))
    except ValueError:
        raise ProtocolError(f"{message.get('type', 'report')}: state must be one of {', '.join(STATES)}") from None
    return InstanceStatus(
        instance=instanceField(message),
        state=state,
        reason=text(message, "reason", limit=MAX_REASON, optional=True),
        url=_url(message),
    )


def parseReport(message: Mapping[str, Any]) -> list[InstanceStatus]:
    """The instances of a ``report`` message."""
    instances = message.get("instances")
    if not isinstance(instances, list):
        raise ProtocolError("report: instances must be a list")
    return [parseStatus(each) for each in instances]


@dataclass(frozen=True)
class Command:
    """An instruction from the portal about one instance."""

    #: Unique; a command can arrive more than once (after a reconnect), with the same id.
    id: str
    #: One of ``OPS``.
    op: str
    instance: str
    #: For ``start``: ``image`` (reference), ``port`` (or null), ``digest`` (or null).
    params: Mapping[str, Any] = field(default_factory=dict)

    def toJSON(self) -> dict[str, Any]:
        return {"type": "command", "id": self.id, "op": self.op, "instance": self.instance, "params": dict(self.params)}


def parseCommand(message: Mapping[str, Any]) -> Command:
    op = message.get("op")
    if op not in OPS:
        raise ProtocolError(f"command: op must be one of {', '.join(OPS)}")
    params = message.get("params", {})
    if not isinstance(params, dict):
        raise ProtocolError("command: params must be a JSON object")
    return Command(text(message, "id"), op, instanceField(message), params)


@dataclass(frozen=True)
class LogsRequest:
    """
    A question about a tool's output (docs/protocols.md 7.6): from byte
    ``offset`` on, or (None) its last ``limit`` bytes. Asked afresh each
    time, never stored: one that cannot reach the node now fails.
    """

    id: str
    instance: str
    offset: int | None
    limit: int

    def toJSON(self) -> dict[str, Any]:
        return {"type": "logs", "id": self.id, "instance": self.instance, "offset": self.offset, "limit": self.limit}


def _count(message: Mapping[str, Any], name: str, *, optional: bool = False, limit: int | None = None) -> int | None:
    value = message.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (limit is not None and value > limit):
        raise ProtocolError(f"{message.get('type')}: {name} must be a whole number from 0" + (f" to {limit}" if limit else ""))
    return value


def parseLogsRequest(message: Mapping[str, Any]) -> LogsRequest:
    limit = _count(message, "limit", limit=MAX_LOG_CHUNK)
    assert limit is not None
    return LogsRequest(text(message, "id"), instanceField(message), _count(message, "offset", optional=True), limit)


@dataclass(frozen=True)
class LogChunk:
    """
    A piece of a tool's output: the bytes from ``offset`` to ``next`` (where
    to ask from next time), decoded as UTF-8; or, with ``error``, why there
    is none (no such instance on that node, the node unreachable).
    """

    offset: int
    next: int
    text: str
    error: str | None = None

    def toJSON(self, requestId: str) -> dict[str, Any]:
        return {
            "type": "logs-chunk", "id": requestId, "offset": self.offset, "next": self.next,
            "text": self.text, "error": self.error,
        }  # fmt: skip

    @classmethod
    def fromBytes(cls, offset: int, data: bytes) -> LogChunk:
        """The chunk of ``data`` read at ``offset``; a character cut at either end is replaced, never lost twice."""
        return cls(offset, offset + len(data), data.decode("utf-8", "replace"))

    @staticmethod
    def startOf(size: int, offset: int | None, limit: int) -> int:
        """Where a question reads an output of ``size`` bytes from: ``offset`` (no further than the end), or ``limit`` bytes before the end."""
        return max(size - limit, 0) if offset is None else min(offset, size)

    @classmethod
    def of(cls, output: bytes, offset: int | None, limit: int) -> LogChunk:
        """The answer to a question about ``output``, held whole in memory."""
        start = cls.startOf(len(output), offset, limit)
        return cls.fromBytes(start, output[start : start + limit])


def parseLogChunk(message: Mapping[str, Any]) -> tuple[str, LogChunk]:
    """A ``logs-chunk`` answer: the id of the question it answers, and the chunk."""
    offset, next_ = _count(message, "offset"), _count(message, "next")
    assert offset is not None and next_ is not None
    chunk = message.get("text")
    if not isinstance(chunk, str) or len(chunk) > MAX_LOG_CHUNK:
        raise ProtocolError(f"logs-chunk: text must be a string of at most {MAX_LOG_CHUNK} characters")
    error = text(message, "error", limit=MAX_REASON, optional=True)
    return text(message, "id"), LogChunk(offset, next_, chunk, error)


def privateMembers(jwk: Mapping[str, Any]) -> set[str]:
    """The private-key members a JWK carries (it must carry none to cross the channel)."""
    return {name for name in jwk if name in PRIVATE_JWK_MEMBERS}




def linkOptions(
    factory: Any,
    *,
    handshakeTimeout: float = HANDSHAKE_TIMEOUT,
    pingInterval: float = PING_INTERVAL,
    pingTimeout: float = PING_TIMEOUT,
) -> None:
    """The WebSocket limits of every channel link, on both of its ends."""
    configureFactory(
        factory,
        maxMessage=MAX_MESSAGE,
        # autobahn's timers round down to whole seconds: give its bound on the
        # HTTP upgrade a second more (the link's own handshake timer is exact).
        openHandshakeTimeout=handshakeTimeout + 1,
        pingInterval=pingInterval,
        pingTimeout=pingTimeout,
    )
