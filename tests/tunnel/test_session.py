"""
Tests for the tunnel session, its streams and the handshake protocols
(dit4c.tunnel.session, .stream, .protocol; docs/protocols.md section 1).

A client and a server protocol are joined in memory by the ``tunnel`` fixture
(``twisted.test.iosim``) and share one ``Clock``: no real reactor, no real
time. Frames the tests build by hand are written into one side's transport so
that they reach the other side as if the peer had sent them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dit4c.tunnel.errors import (
    ErrorCode,
    HandshakeRefused,
    StreamLimit,
    StreamReset,
    TunnelClosed,
)
from dit4c.tunnel.frames import (
    ABSOLUTE_MAX_FRAME,
    FLAG_ACK,
    FLAG_FIN,
    PREFACE,
    Frame,
    FrameDecoder,
    FrameType,
    decodeCode,
    decodeJSON,
    decodeWindow,
    encode,
    encodeJSON,
    encodeWindow,
)
from dit4c.tunnel.protocol import Phase, TunnelClientProtocol, TunnelServerFactory
from dit4c.tunnel.session import Settings
from dit4c.tunnel.stream import _TRANSITIONS, Event, State

KiB = 1024
MiB = 1024 * KiB
REGISTRATION = {"instance": "i1", "host": "i1.example", "url": "http://i1.example/"}


# -- helpers --------------------------------------------------------------------


def resetCode(proto: Any) -> int:
    """The code of the StreamReset that ended ``proto``'s stream."""
    assert proto.lost is not None, "stream protocol was not told of the end"
    assert isinstance(proto.lost.value, StreamReset), proto.lost
    return proto.lost.value.code


def closedCleanly(proto: Any) -> bool:
    return proto.lost is not None and isinstance(proto.lost.value, ConnectionDone)


def decodeFrames(data: bytes) -> list[Frame]:
    return FrameDecoder(ABSOLUTE_MAX_FRAME).feed(data)


def of(frames: list[Frame], ftype: int, stream: int | None = None) -> list[Frame]:
    return [f for f in frames if f.type == ftype and (stream is None or f.stream == stream)]


def dataBytes(frames: list[Frame], stream: int) -> int:
    return sum(len(f.payload) for f in of(frames, FrameType.DATA, stream))


def goAwayOf(frames: list[Frame]) -> tuple[int, str]:
    (frame,) = of(frames, FrameType.GOAWAY)
    return decodeCode(frame)


@implementer(IPushProducer)
class RecordingProducer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


def serverAlone(
    settings: Settings, authenticate: Callable[..., Any] | None = None
) -> tuple[Any, StringTransport, Clock, list[Any]]:
    """A server protocol on a StringTransport, with nobody at the other end."""
    clock = Clock()
    established: list[Any] = []

    async def allow(token: str, proto: Any) -> dict[str, Any]:
        return dict(REGISTRATION)

    factory = TunnelServerFactory(settings, clock, authenticate or allow, established.append)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock, established


def hello(**overrides: Any) -> bytes:
    body = {"version": 1, "token": "tok", "window": 16 * KiB, "max_frame": 4 * KiB}
    body.update(overrides)
    return encodeJSON(FrameType.HELLO, 0, body)


# -- the interfaces ---------------------------------------------------------------


def test_stream_and_session_provide_their_interfaces(tunnel: Any) -> None:
    pair = tunnel.open()
    for stream in (pair.opener, pair.accepter):
        assert verifyObject(ITransport, stream)
        assert verifyObject(IConsumer, stream)
        assert verifyObject(IPushProducer, stream)
    assert verifyObject(IPushProducer, tunnel.serverSession)
    assert verifyObject(IPushProducer, tunnel.clientSession)


def test_stream_machine_table() -> None:
    """RESET ends a stream from anywhere; CLOSED is final; FIN each way closes."""
    live = [s for s in State if s is not State.CLOSED]
    for state in live:
        assert _TRANSITIONS[(state, Event.RESET)] is State.CLOSED
    assert not [key for key in _TRANSITIONS if key[0] is State.CLOSED]
    state = State.OPEN
    for event in (Event.FIN_SENT, Event.FIN_RECEIVED):
        state = _TRANSITIONS[(state, event)]
    assert state is State.CLOSED
    state = State.OPEN
    for event in (Event.FIN_RECEIVED, Event.FIN_SENT):
        state = _TRANSITIONS[(state, event)]
    assert state is State.CLOSED
    assert (State.LOCAL_CLOSED, Event.FIN_SENT) not in _TRANSITIONS
    assert (State.REMOTE_CLOSED, Event.FIN_RECEIVED) not in _TRANSITIONS


# -- handshake ----------------------------------------------------------------------


def test_handshake(tunnel: Any, small: Settings) -> None:
    (welcome,) = tunnel.ready
    assert {k: welcome[k] for k in REGISTRATION} == REGISTRATION
    assert welcome["window"] == small.window
    assert welcome["max_frame"] == small.maxFrame
    assert welcome["max_streams"] == small.maxStreams
    assert welcome["heartbeat"] == small.heartbeat
    assert welcome["timeout"] == small.timeout
    assert tunnel.client.welcome == welcome
    assert tunnel.server.registration == REGISTRATION
    assert tunnel.established == [tunnel.server]
    assert tunnel.client.phase is Phase.ESTABLISHED
    assert tunnel.server.phase is Phase.ESTABLISHED
    assert tunnel.tokens == ["tok"]
    assert b"".join(tunnel.clientIO.tap).startswith(PREFACE)
    first = tunnel.framesFromClient()[0]
    assert first.type == FrameType.HELLO
    assert decodeJSON(first) == {
        "version": 1,
        "token": "tok",
        "window": small.window,
        "max_frame": small.maxFrame,
    }
    assert tunnel.framesFromServer()[0].type == FrameType.WELCOME


def test_handshake_settings_cross_over(makeTunnel: Any, small: Settings) -> None:
    """Each side sends within the window the other granted; heartbeats are the server's."""
    clientSettings = Settings(window=8 * KiB, maxFrame=2 * KiB)
    tunnel = makeTunnel(small, clientSettings)
    assert tunnel.serverSession.peerWindow == 8 * KiB
    assert tunnel.serverSession.peerMaxFrame == 2 * KiB
    assert tunnel.clientSession.peerWindow == small.window
    assert tunnel.clientSession.peerMaxFrame == small.maxFrame
    assert tunnel.clientSession.heartbeat == small.heartbeat
    assert tunnel.clientSession.timeout == small.timeout
    pair = tunnel.open()
    assert pair.opener.sendWindow == 8 * KiB
    assert pair.accepter.sendWindow == small.window
    pair.opener.write(b"x" * 6 * KiB)
    frames = tunnel.framesFromServer()
    assert max(len(f.payload) for f in of(frames, FrameType.DATA)) == 2 * KiB


def test_authenticate_gets_the_token(makeTunnel: Any) -> None:
    seen: list[tuple[str, Any]] = []

    async def authenticate(token: str, proto: Any) -> dict[str, Any]:
        seen.append((token, proto))
        return dict(REGISTRATION)

    tunnel = makeTunnel(authenticate=authenticate)
    assert seen == [("tok", tunnel.server)]


def test_authenticate_may_answer_later(makeTunnel: Any) -> None:
    pending: Deferred[dict[str, Any]] = Deferred()
    tunnel = makeTunnel(authenticate=lambda token, proto: pending, handshake=False)
    tunnel.flush()
    assert tunnel.server.phase is Phase.VERIFYING
    assert tunnel.ready == []
    pending.callback(dict(REGISTRATION))
    tunnel.flush()
    assert tunnel.server.phase is Phase.ESTABLISHED
    assert tunnel.ready[0]["instance"] == "i1"


def test_handshake_refused(makeTunnel: Any) -> None:
    async def refuse(token: str, proto: Any) -> dict[str, Any]:
        raise HandshakeRefused("token expired")

    tunnel = makeTunnel(authenticate=refuse, handshake=False)
    tunnel.flush()
    (failure,) = tunnel.ready
    assert isinstance(failure, Failure)
    assert failure.check(HandshakeRefused)
    assert failure.value.reason == "token expired"
    assert failure.value.code == ErrorCode.AUTH_FAILED
    assert goAwayOf(tunnel.framesFromServer()) == (ErrorCode.AUTH_FAILED, "token expired")
    assert tunnel.established == []
    assert tunnel.client.session is None and tunnel.server.session is None
    assert tunnel.client.closed.called and tunnel.server.closed.called


def test_welcome_and_a_large_frame_in_one_read(makeTunnel: Any, recorder: Any) -> None:
    """
    The server may open a stream the moment it is established; a DATA frame
    up to the client's own max_frame arriving in the same read as WELCOME is
    fine (it used to fail the 16 KiB handshake frame limit).
    """
    opened: list[Any] = []

    def established(proto: Any) -> None:
        stream = proto.session.openStream(recorder())
        stream.write(b"x" * 60 * KiB)
        opened.append(stream)

    tunnel = makeTunnel(Settings(), established=established)
    assert tunnel.client.phase is Phase.ESTABLISHED
    assert not isinstance(tunnel.ready[0], Failure)
    (proto,) = tunnel.accepted
    assert proto.received == b"x" * 60 * KiB


def clientAlone(settings: Settings) -> tuple[Any, StringTransport, list[Any]]:
    ready: list[Any] = []
    client = TunnelClientProtocol(
        settings, Clock(), token=lambda: "tok", handler=lambda stream: None
    )
    client.ready.addBoth(ready.append)
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport, ready


@pytest.mark.parametrize(
    "frame",
    [
        encodeJSON(
            FrameType.WELCOME, 0, dict(REGISTRATION, max_frame=4096, heartbeat=1.0, timeout=3.0)
        ),
        encodeJSON(
            FrameType.WELCOME, 0, dict(window=4096, max_frame=4096, heartbeat=5.0, timeout=1.0)
        ),
        encode(FrameType.WELCOME, 0, b"[]"),
        encode(FrameType.PING, 0, b"12345678"),
        encodeJSON(FrameType.OPEN, 2, {}),
    ],
    ids=["no-window", "timeout-below-heartbeat", "not-object", "ping", "open"],
)
def test_client_refuses_a_bad_welcome(small: Settings, frame: bytes) -> None:
    client, transport, ready = clientAlone(small)
    sent = transport.value()
    assert sent.startswith(PREFACE)
    client.dataReceived(frame)
    (failure,) = ready
    assert isinstance(failure, Failure)
    assert failure.value.code == ErrorCode.PROTOCOL_ERROR
    frames = decodeFrames(transport.value()[len(sent) :])
    assert [f.type for f in frames] == [FrameType.GOAWAY]
    assert transport.disconnecting
    assert client.session is None


def test_client_link_lost_before_welcome(small: Settings) -> None:
    client, transport, ready = clientAlone(small)
    client.connectionLost(Failure(ConnectionDone()))
    (failure,) = ready
    assert failure.check(HandshakeRefused)
    assert failure.value.code == ErrorCode.CANCEL
    assert client.closed.called


def test_client_sees_the_handshake_timeout(makeTunnel: Any, small: Settings) -> None:
    tunnel = makeTunnel(authenticate=lambda token, proto: Deferred(), handshake=False)
    tunnel.flush()
    tunnel.clock.advance(small.handshakeTimeout)
    tunnel.flush()
    (failure,) = tunnel.ready
    assert failure.check(HandshakeRefused)
    assert tunnel.serverIO.aborted
    assert tunnel.client.closed.called and tunnel.server.closed.called


# -- the server's guard before the handshake -------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"DIT4CT\x00\x02",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03",
    ],
    ids=["http", "version-2", "tls-hello"],
)
def test_bad_preface_is_dropped_without_reply(
    small: Settings, data: bytes, logged: list[Any]
) -> None:
    proto, transport, clock, established = serverAlone(small)
    proto.dataReceived(data)
    assert transport.disconnecting
    assert transport.value() == b""
    assert proto.phase is Phase.CLOSED
    assert any("bad preface" in str(e.get("log_format", "")) for e in logged)
    proto.dataReceived(PREFACE + hello())
    assert transport.value() == b""
    assert established == []


def test_bad_preface_is_seen_early(small: Settings) -> None:
    proto, transport, clock, _ = serverAlone(small)
    proto.dataReceived(b"DIT4")
    assert not transport.disconnecting
    proto.dataReceived(b"X")
    assert transport.disconnecting


def test_preface_in_pieces(small: Settings) -> None:
    proto, transport, clock, established = serverAlone(small)
    data = PREFACE + hello()
    for i in range(len(data)):
        proto.dataReceived(data[i : i + 1])
    assert established == [proto]
    assert not transport.disconnecting
    assert decodeFrames(transport.value())[0].type == FrameType.WELCOME


def test_handshake_timeout(small: Settings) -> None:
    proto, transport, clock, established = serverAlone(small)
    proto.dataReceived(PREFACE)
    clock.advance(small.handshakeTimeout - 0.5)
    assert not transport.disconnecting
    clock.advance(0.5)
    assert transport.disconnecting
    assert proto.phase is Phase.CLOSED


def test_handshake_timeout_while_verifying(small: Settings) -> None:
    pending: Deferred[dict[str, Any]] = Deferred()
    proto, transport, clock, established = serverAlone(small, lambda token, proto: pending)
    proto.dataReceived(PREFACE + hello())
    assert proto.phase is Phase.VERIFYING
    clock.advance(small.handshakeTimeout)
    assert transport.disconnecting
    pending.callback(dict(REGISTRATION))
    assert established == []
    assert transport.value() == b""


def test_handshake_timer_stops_once_established(tunnel: Any, small: Settings) -> None:
    for _ in range(int(small.handshakeTimeout * 3)):
        tunnel.clock.advance(0.5)
        tunnel.flush()
    assert not tunnel.serverIO.disconnecting
    assert not tunnel.serverSession.closed


@pytest.mark.parametrize(
    "frame",
    [
        hello(version=2),
        hello(token=None),
        hello(window=10),
        hello(max_frame=True),
        encode(FrameType.HELLO, 0, b"[" * 10_000),
        encode(FrameType.HELLO, 0, b"not json"),
        encode(FrameType.PING, 0, b"12345678"),
        encode(FrameType.DATA, 1, b"x"),
        encode(FrameType.HELLO, 0, b"x" * (16 * KiB + 1)),
    ],
    ids=[
        "version",
        "token",
        "window",
        "max-frame-bool",
        "deep-json",
        "not-json",
        "ping",
        "data",
        "huge",
    ],
)
def test_bad_hello_is_a_protocol_error(small: Settings, frame: bytes) -> None:
    proto, transport, clock, established = serverAlone(small)
    proto.dataReceived(PREFACE + frame)
    assert transport.disconnecting
    frames = decodeFrames(transport.value())
    assert [f.type for f in frames] == [FrameType.GOAWAY]
    code, reason = decodeCode(frames[0])
    assert code == ErrorCode.PROTOCOL_ERROR and reason
    assert established == []


def test_data_before_welcome_is_a_protocol_error(small: Settings) -> None:
    pending: Deferred[dict[str, Any]] = Deferred()
    proto, transport, clock, established = serverAlone(small, lambda token, proto: pending)
    proto.dataReceived(PREFACE + hello())
    proto.dataReceived(encode(FrameType.PING, 0, b"12345678"))
    assert transport.disconnecting
    assert decodeCode(decodeFrames(transport.value())[0])[0] == ErrorCode.PROTOCOL_ERROR


# -- streams -----------------------------------------------------------------------------


def test_open_stream_from_server(tunnel: Any) -> None:
    metadata = {"peer": "203.0.113.7:51234", "scheme": "http", "host": "i1.example"}
    pair = tunnel.open(metadata=metadata)
    assert pair.opener.id == 2 and pair.accepter.id == 2
    assert pair.accepter.metadata == metadata
    assert pair.accepter.getPeer().metadata == metadata
    assert pair.accepter.getPeer().stream == 2
    assert pair.openerProto.made and pair.accepterProto.made
    second = tunnel.open()
    assert second.opener.id == 4
    assert tunnel.serverSession.streamCount == tunnel.clientSession.streamCount == 2
    (opened,) = of(tunnel.framesFromServer(), FrameType.OPEN, 2)
    assert decodeJSON(opened) == metadata


def test_streams_opened_by_the_client_are_refused_by_the_server(tunnel: Any, recorder: Any) -> None:
    proto = recorder()
    stream = tunnel.clientSession.openStream(proto, {"x": 1})
    assert stream.id == 1
    tunnel.flush()
    assert resetCode(proto) == ErrorCode.REFUSED_STREAM
    assert tunnel.clientSession.streamCount == 0
    assert tunnel.clientSession.openStream(recorder()).id == 3


def test_data_both_ways(tunnel: Any) -> None:
    pair = tunnel.open()
    pair.opener.write(b"hello ")
    pair.opener.writeSequence([b"wor", b"ld", b""])
    pair.accepter.write(b"back")
    tunnel.flush()
    assert pair.accepterProto.received == b"hello world"
    assert pair.openerProto.received == b"back"
    down = bytes(range(256)) * 400
    up = bytes(reversed(range(256))) * 300
    pair.opener.write(down)
    pair.accepter.write(up)
    tunnel.flush()
    assert pair.accepterProto.received == b"hello world" + down
    assert pair.openerProto.received == b"back" + up


@pytest.mark.parametrize("direction", ["server-first", "client-first"])
def test_half_close(tunnel: Any, direction: str) -> None:
    pair = tunnel.open()
    first, firstProto, second, secondProto = (
        (pair.opener, pair.openerProto, pair.accepter, pair.accepterProto)
        if direction == "server-first"
        else (pair.accepter, pair.accepterProto, pair.opener, pair.openerProto)
    )
    first.write(b"request")
    first.loseWriteConnection()
    tunnel.flush()
    assert secondProto.received == b"request"
    assert secondProto.readClosed and firstProto.writeClosed
    assert secondProto.lost is None and firstProto.lost is None
    # FIN is on the last DATA frame of the stream, after the data.
    frames = tunnel.framesFromServer() if direction == "server-first" else tunnel.framesFromClient()
    data = of(frames, FrameType.DATA, 2)
    assert data[-1].flags & FLAG_FIN
    assert not any(f.flags & FLAG_FIN for f in data[:-1])
    # Writes after our FIN go nowhere; the other direction still flows.
    first.write(b"late")
    second.write(b"response")
    tunnel.flush()
    assert firstProto.received == b"response"
    assert secondProto.received == b"request"
    second.loseWriteConnection()
    tunnel.flush()
    assert closedCleanly(firstProto) and closedCleanly(secondProto)
    assert tunnel.serverSession.streamCount == tunnel.clientSession.streamCount == 0


@pytest.mark.parametrize("direction", ["server-resets", "client-resets"])
def test_reset(tunnel: Any, direction: str) -> None:
    pair = tunnel.open()
    other = tunnel.open()
    resetter, resetterProto, peerProto = (
        (pair.opener, pair.openerProto, pair.accepterProto)
        if direction == "server-resets"
        else (pair.accepter, pair.accepterProto, pair.openerProto)
    )
    resetter.write(b"x" * 40 * KiB)  # more than the window: some is still queued
    resetter.reset(ErrorCode.CONNECT_FAILED, "no route to target")
    tunnel.flush()
    assert resetCode(peerProto) == ErrorCode.CONNECT_FAILED
    assert peerProto.lost.value.reason == "no route to target"
    assert resetCode(resetterProto) == ErrorCode.CONNECT_FAILED
    assert tunnel.serverSession.streamCount == tunnel.clientSession.streamCount == 1
    # Frames for the ended stream (crossing the RESET) are ignored.
    peerIO = tunnel.clientIO if direction == "server-resets" else tunnel.serverIO
    peerIO.write(encode(FrameType.DATA, 2, b"late") + encodeWindow(2, 100))
    tunnel.flush()
    other.opener.write(b"still here")
    tunnel.flush()
    assert other.accepterProto.received == b"still here"


def test_abort_and_stop_producing_reset_with_cancel(tunnel: Any) -> None:
    a = tunnel.open()
    b = tunnel.open()
    a.accepter.abortConnection()
    b.opener.stopProducing()
    tunnel.flush()
    assert resetCode(a.openerProto) == ErrorCode.CANCEL
    assert resetCode(b.accepterProto) == ErrorCode.CANCEL


def test_protocol_without_half_close_is_closed_by_fin(tunnel: Any, plainRecorder: Any) -> None:
    tunnel.clientProtocol = lambda stream: plainRecorder()
    pair = tunnel.open()
    pair.opener.write(b"all of it")
    pair.opener.loseWriteConnection()
    tunnel.flush()
    assert pair.accepterProto.received == b"all of it"
    assert closedCleanly(pair.accepterProto)
    assert closedCleanly(pair.openerProto)
    assert pair.openerProto.writeClosed
    assert tunnel.serverSession.streamCount == tunnel.clientSession.streamCount == 0


def test_lose_connection_is_tcp_like(tunnel: Any) -> None:
    """loseConnection: the protocol is done once the FIN has gone; later data resets."""
    pair = tunnel.open()
    pair.accepter.write(b"bye")
    pair.accepter.loseConnection()
    tunnel.flush()
    assert closedCleanly(pair.accepterProto)
    assert pair.openerProto.received == b"bye"
    assert pair.openerProto.readClosed and pair.openerProto.lost is None
    pair.opener.write(b"too late")
    tunnel.flush()
    assert resetCode(pair.openerProto) == ErrorCode.CANCEL
    assert pair.accepterProto.received == b""
    assert tunnel.serverSession.streamCount == tunnel.clientSession.streamCount == 0


@pytest.mark.parametrize("finFirst", [False, True], ids=["fin-after-close", "fin-before-close"])
def test_full_close_with_unread_data_still_ends_the_stream(tunnel: Any, finFirst: bool) -> None:
    """
    A paused reader's protocol that closes with data still held for it: the
    held data is dropped and the peer's FIN (already in, or still to come)
    ends the stream, which used to stay open forever holding its buffer.
    """
    pair = tunnel.open()
    pair.accepter.pauseProducing()
    pair.opener.write(b"never read")
    if finFirst:
        pair.opener.loseWriteConnection()
    tunnel.flush()
    assert tunnel.clientSession.recvBuffered == len(b"never read")
    pair.accepter.loseConnection()
    tunnel.flush()
    assert closedCleanly(pair.accepterProto)
    assert pair.accepterProto.received == b""
    assert tunnel.clientSession.recvBuffered == 0
    if not finFirst:
        assert pair.openerProto.readClosed
        pair.opener.loseWriteConnection()
        tunnel.flush()
    assert closedCleanly(pair.openerProto)
    assert tunnel.clientSession.streamCount == tunnel.serverSession.streamCount == 0


def test_full_close_while_delivering_held_data(tunnel: Any, recorder: Any) -> None:
    class CloseOnFirst(recorder):  # type: ignore[misc, valid-type]
        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            self.transport.loseConnection()

    tunnel.clientProtocol = lambda stream: CloseOnFirst()
    pair = tunnel.open()
    pair.accepter.pauseProducing()
    pair.opener.write(b"one")
    pair.opener.write(b"two")
    pair.opener.loseWriteConnection()
    tunnel.flush()
    pair.accepter.resumeProducing()
    tunnel.flush()
    assert pair.accepterProto.received == b"one"
    assert closedCleanly(pair.accepterProto)
    assert tunnel.clientSession.recvBuffered == 0
    assert tunnel.clientSession.streamCount == tunnel.serverSession.streamCount == 0


@pytest.mark.allow_logged_errors
def test_failing_stream_protocol_costs_its_stream_only(
    tunnel: Any, recorder: Any, logged: list[Any]
) -> None:
    class Exploding(recorder):  # type: ignore[misc, valid-type]
        def dataReceived(self, data: bytes) -> None:
            raise ValueError("bug in the stream protocol")

    tunnel.clientProtocol = lambda stream: Exploding()
    pair = tunnel.open()
    tunnel.clientProtocol = lambda stream: recorder()
    fine = tunnel.open()
    pair.opener.write(b"boom")
    tunnel.flush()
    assert resetCode(pair.openerProto) == ErrorCode.INTERNAL_ERROR
    assert resetCode(pair.accepterProto) == ErrorCode.INTERNAL_ERROR
    assert any(
        e.get("log_failure") is not None and e["log_failure"].check(ValueError) for e in logged
    )
    fine.opener.write(b"ok")
    tunnel.flush()
    assert fine.accepterProto.received == b"ok"
    assert not tunnel.clientSession.closed and not tunnel.serverSession.closed


@pytest.mark.allow_logged_errors
@pytest.mark.parametrize("method", ["connectionMade", "readConnectionLost"])
def test_failing_stream_callbacks_cost_their_stream_only(
    tunnel: Any, recorder: Any, logged: list[Any], method: str
) -> None:
    def explode(*args: Any) -> None:
        raise ValueError(f"bug in {method}")

    class Exploding(recorder):  # type: ignore[misc, valid-type]
        pass

    setattr(Exploding, method, explode)
    tunnel.clientProtocol = lambda stream: Exploding()
    pair = tunnel.open()
    tunnel.clientProtocol = lambda stream: recorder()
    fine = tunnel.open()
    pair.opener.loseWriteConnection()
    tunnel.flush()
    assert resetCode(pair.openerProto) == ErrorCode.INTERNAL_ERROR
    assert any(e.get("log_failure") is not None and e["log_failure"].check(ValueError) for e in logged)
    fine.opener.write(b"ok")
    tunnel.flush()
    assert fine.accepterProto.received == b"ok"
    assert not tunnel.clientSession.closed and not tunnel.serverSession.closed


def test_handler_refusing_a_stream(tunnel: Any) -> None:
    tunnel.clientProtocol = lambda stream: None
    pair = tunnel.open(flush=False)
    tunnel.flush()
    assert resetCode(pair.openerProto) == ErrorCode.REFUSED_STREAM
    assert tunnel.clientSession.streamCount == 0


# -- flow control ------------------------------------------------------------------------


def test_sender_stops_at_the_window_and_resumes_when_the_reader_consumes(
    tunnel: Any, small: Settings
) -> None:
    pair = tunnel.open()
    pair.accepter.pauseProducing()
    payload = bytes(range(256)) * 160  # 40 KiB
    pair.opener.write(payload)
    tunnel.flush()
    assert pair.opener.sendWindow == 0
    assert pair.opener.sendBuffered == len(payload) - small.window
    assert dataBytes(tunnel.framesFromServer(), 2) == small.window
    assert pair.accepter.recvBuffered == small.window
    assert pair.accepterProto.received == b""
    assert of(tunnel.framesFromClient(), FrameType.WINDOW, 2) == []
    pair.accepter.resumeProducing()
    tunnel.flush()
    assert pair.accepterProto.received == payload
    assert pair.opener.sendBuffered == 0
    increments = [decodeWindow(f) for f in of(tunnel.framesFromClient(), FrameType.WINDOW, 2)]
    assert increments and all(i >= small.window // 4 for i in increments)


def test_paused_reader_does_not_slow_other_streams(
    tunnel: Any, makeTunnel: Any, small: Settings
) -> None:
    alone = makeTunnel()
    only = alone.open()
    only.opener.write(b"f" * MiB)
    exchangesAlone = alone.flush()
    assert only.accepterProto.received == b"f" * MiB

    slow = tunnel.open()
    fast = tunnel.open()
    slow.accepter.pauseProducing()
    slow.opener.write(b"s" * MiB)
    fast.opener.write(b"f" * MiB)
    exchanges = tunnel.flush()
    assert fast.accepterProto.received == b"f" * MiB
    # as many round trips as with the link to itself
    assert exchanges == exchangesAlone
    assert slow.accepterProto.received == b""
    assert slow.accepter.recvBuffered == small.window
    assert dataBytes(tunnel.framesFromServer(), slow.opener.id) == small.window
    assert of(tunnel.framesFromClient(), FrameType.WINDOW, slow.opener.id) == []
    assert slow.opener.sendWindow == 0
    # and the slow one gets everything once it reads again
    slow.accepter.resumeProducing()
    tunnel.flush()
    assert slow.accepterProto.received == b"s" * MiB


def test_reader_pausing_inside_dataReceived(tunnel: Any, recorder: Any, small: Settings) -> None:
    class OneChunkAtATime(recorder):  # type: ignore[misc, valid-type]
        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            self.transport.pauseProducing()

    tunnel.clientProtocol = lambda stream: OneChunkAtATime()
    pair = tunnel.open()
    pair.opener.write(b"q" * 3 * small.maxFrame)
    tunnel.flush()
    assert pair.accepterProto.received == b"q" * small.maxFrame
    for n in (2, 3):
        pair.accepter.resumeProducing()
        assert pair.accepterProto.received == b"q" * n * small.maxFrame


def test_fin_waits_behind_data_held_for_a_paused_reader(tunnel: Any) -> None:
    pair = tunnel.open()
    pair.accepter.pauseProducing()
    pair.opener.write(b"body")
    pair.opener.loseWriteConnection()
    tunnel.flush()
    assert not pair.accepterProto.readClosed
    pair.accepter.resumeProducing()
    assert pair.accepterProto.received == b"body"
    assert pair.accepterProto.readClosed


def test_window_grows_for_a_fast_reader(makeTunnel: Any, small: Settings) -> None:
    tunnel = makeTunnel(handshake=False)
    tunnel.flush(tick=0.001)  # a link with latency, so that the RTT is measured
    assert tunnel.clientSession.rtt > 0
    pair = tunnel.open()
    payload = b"g" * 4 * MiB
    pair.opener.write(payload)
    tunnel.flush(tick=0.001)
    assert pair.accepterProto.received == payload
    window = pair.accepter.recvWindow
    assert small.window < window <= small.maxWindow
    assert window == small.maxWindow
    assert pair.accepter.grown == window - small.window
    session = tunnel.clientSession
    assert session.growthAvailable == small.growthBudget - pair.accepter.grown
    # the sender was allowed past the initial window at some point
    increments = [decodeWindow(f) for f in of(tunnel.framesFromClient(), FrameType.WINDOW, 2)]
    assert max(increments) > small.window // 4
    pair.opener.loseWriteConnection()
    pair.accepter.loseWriteConnection()
    tunnel.flush(tick=0.001)
    assert closedCleanly(pair.accepterProto)
    assert session.growthAvailable == small.growthBudget


def test_window_growth_is_bounded_by_the_tunnel_budget(makeTunnel: Any, small: Settings) -> None:
    settings = replace(small, growthBudget=48 * KiB)
    tunnel = makeTunnel(settings, handshake=False)
    tunnel.flush(tick=0.001)
    a = tunnel.open()
    b = tunnel.open()
    a.opener.write(b"a" * MiB)
    b.opener.write(b"b" * MiB)
    tunnel.flush(tick=0.001)
    assert a.accepterProto.received == b"a" * MiB
    assert b.accepterProto.received == b"b" * MiB
    session = tunnel.clientSession
    assert a.accepter.grown + b.accepter.grown == settings.growthBudget
    assert session.growthAvailable == 0
    grownB = b.accepter.grown
    a.accepter.reset(ErrorCode.CANCEL)
    assert session.growthAvailable == settings.growthBudget - grownB
    b.accepter.abortConnection()
    assert session.growthAvailable == settings.growthBudget


def test_data_beyond_the_window_is_a_flow_control_error(tunnel: Any, small: Settings) -> None:
    pair = tunnel.open()
    pair.accepter.pauseProducing()
    pair.opener.write(b"w" * small.window)
    tunnel.flush()
    assert pair.accepter.recvRemaining == 0
    # A hand-built frame the server's flow control would never have sent.
    tunnel.serverIO.write(encode(FrameType.DATA, 2, b"!"))
    tunnel.flush()
    code, reason = goAwayOf(tunnel.framesFromClient())
    assert code == ErrorCode.FLOW_CONTROL_ERROR and reason
    assert tunnel.clientSession.closed
    assert tunnel.client.closed.called and tunnel.server.closed.called
    assert resetCode(pair.accepterProto) == ErrorCode.FLOW_CONTROL_ERROR
    assert pair.openerProto.lost is not None


def test_window_overflow_is_a_flow_control_error(tunnel: Any) -> None:
    pair = tunnel.open()
    tunnel.clientIO.write(encodeWindow(2, 2**31 - 1))
    tunnel.flush()
    assert goAwayOf(tunnel.framesFromServer())[0] == ErrorCode.FLOW_CONTROL_ERROR
    assert pair.openerProto.lost is not None


# -- limits --------------------------------------------------------------------------------


def test_max_streams_local(makeTunnel: Any, small: Settings, recorder: Any) -> None:
    tunnel = makeTunnel(replace(small, maxStreams=2), small)
    first = tunnel.open()
    tunnel.open()
    with pytest.raises(StreamLimit):
        tunnel.serverSession.openStream(recorder())
    first.opener.reset(ErrorCode.CANCEL)
    tunnel.flush()
    tunnel.open()


def test_max_streams_of_the_peer(makeTunnel: Any, small: Settings) -> None:
    tunnel = makeTunnel(small, replace(small, maxStreams=2))
    a = tunnel.open()
    b = tunnel.open()
    refused = tunnel.open(flush=False)
    tunnel.flush()
    assert len(tunnel.accepted) == 2
    assert resetCode(refused.openerProto) == ErrorCode.REFUSED_STREAM
    (reset,) = of(tunnel.framesFromClient(), FrameType.RESET, refused.opener.id)
    assert decodeCode(reset)[0] == ErrorCode.REFUSED_STREAM
    for pair in (a, b):
        pair.opener.write(b"alive")
    tunnel.flush()
    assert a.accepterProto.received == b.accepterProto.received == b"alive"
    assert not tunnel.clientSession.closed and not tunnel.serverSession.closed


def test_stream_id_not_increasing_is_refused(tunnel: Any) -> None:
    pair = tunnel.open()
    pair.opener.reset(ErrorCode.CANCEL)
    tunnel.flush()
    tunnel.serverIO.write(encodeJSON(FrameType.OPEN, 2, {}))
    tunnel.flush()
    resets = of(tunnel.framesFromClient(), FrameType.RESET, 2)
    assert decodeCode(resets[-1])[0] == ErrorCode.REFUSED_STREAM
    assert not tunnel.clientSession.closed
    assert tunnel.open().opener.id == 4


def test_buffer_limit_resets_the_largest(makeTunnel: Any, small: Settings) -> None:
    tunnel = makeTunnel(small, replace(small, bufferLimit=32 * KiB))
    pairs = [tunnel.open() for _ in range(3)]
    for pair in pairs:
        pair.accepter.pauseProducing()
    for pair, size in zip(pairs, (8 * KiB, 16 * KiB, 12 * KiB), strict=True):
        pair.opener.write(b"b" * size)
    tunnel.flush()
    one, two, three = pairs
    assert resetCode(two.accepterProto) == ErrorCode.BUFFER_LIMIT
    assert resetCode(two.openerProto) == ErrorCode.BUFFER_LIMIT
    assert one.accepterProto.lost is None and three.accepterProto.lost is None
    assert tunnel.clientSession.recvBuffered == 20 * KiB
    one.accepter.resumeProducing()
    three.accepter.resumeProducing()
    tunnel.flush()
    assert one.accepterProto.received == b"b" * 8 * KiB
    assert three.accepterProto.received == b"b" * 12 * KiB
    assert tunnel.clientSession.recvBuffered == 0
    assert not tunnel.clientSession.closed


# -- heartbeats ------------------------------------------------------------------------------


def test_silent_peer_is_detected_after_timeout(tunnel: Any, small: Settings) -> None:
    clock = tunnel.clock
    for _ in range(10):
        clock.advance(0.5)
        tunnel.flush()
    assert clock.seconds() == 5.0
    assert not tunnel.clientSession.closed and not tunnel.serverSession.closed
    pings = [f for f in of(tunnel.framesFromClient(), FrameType.PING) if not f.flags & FLAG_ACK]
    assert len(pings) == 6  # at 0, 1, 2, 3, 4, 5
    # The link goes quiet: nothing is pumped any more.
    clock.advance(small.timeout - 0.5)
    assert not tunnel.clientSession.closed and not tunnel.serverSession.closed
    clock.advance(0.25)
    assert not tunnel.clientSession.closed and not tunnel.serverSession.closed
    clock.advance(0.25)
    assert clock.seconds() == 5.0 + small.timeout
    for session, io, frames in (
        (tunnel.clientSession, tunnel.clientIO, tunnel.framesFromClient),
        (tunnel.serverSession, tunnel.serverIO, tunnel.framesFromServer),
    ):
        assert session.closed
        assert io.aborted
        assert goAwayOf(frames())[0] == ErrorCode.HEARTBEAT_TIMEOUT


def test_heartbeat_timeout_resets_streams(tunnel: Any, small: Settings) -> None:
    pair = tunnel.open()
    tunnel.clock.advance(small.timeout)
    tunnel.flush()
    assert pair.openerProto.lost is not None and pair.accepterProto.lost is not None
    assert tunnel.client.closed.called and tunnel.server.closed.called


def test_ping_is_answered(tunnel: Any) -> None:
    tunnel.serverIO.write(encode(FrameType.PING, 0, b"abcdefgh"))
    tunnel.flush()
    acks = [f for f in of(tunnel.framesFromClient(), FrameType.PING) if f.flags & FLAG_ACK]
    assert acks[-1].payload == b"abcdefgh"


def test_ping_of_the_wrong_size_is_a_protocol_error(tunnel: Any) -> None:
    tunnel.serverIO.write(encode(FrameType.PING, 0, b"short"))
    tunnel.flush()
    assert goAwayOf(tunnel.framesFromClient())[0] == ErrorCode.PROTOCOL_ERROR


def test_rtt_is_measured(makeTunnel: Any, small: Settings) -> None:
    tunnel = makeTunnel(replace(small, heartbeat=10.0, timeout=30.0), handshake=False)
    tunnel.flush(tick=0.25)  # every exchange takes a quarter second
    assert tunnel.serverSession.rtt == pytest.approx(0.5)
    assert tunnel.clientSession.rtt == pytest.approx(0.5)
    # An ACK with an unusable payload changes nothing.
    tunnel.serverIO.write(encode(FrameType.PING, 0, b"1234567", FLAG_ACK))
    tunnel.flush()
    assert tunnel.clientSession.rtt == pytest.approx(0.5)


# -- going away, closing ---------------------------------------------------------------------


def test_goaway(tunnel: Any, recorder: Any) -> None:
    pair = tunnel.open()
    tunnel.serverSession.goAway(ErrorCode.SHUTDOWN, "stopping")
    tunnel.flush()
    assert tunnel.goAways == [(ErrorCode.SHUTDOWN, "stopping")]
    with pytest.raises(TunnelClosed):
        tunnel.serverSession.openStream(recorder())
    with pytest.raises(TunnelClosed):
        tunnel.clientSession.openStream(recorder())
    # The running stream carries on to its end.
    pair.opener.write(b"down")
    pair.accepter.write(b"up")
    tunnel.flush()
    assert pair.accepterProto.received == b"down" and pair.openerProto.received == b"up"
    assert not tunnel.serverIO.disconnecting and not tunnel.clientIO.disconnecting
    pair.opener.loseWriteConnection()
    pair.accepter.loseWriteConnection()
    tunnel.flush()
    assert closedCleanly(pair.openerProto) and closedCleanly(pair.accepterProto)
    assert tunnel.client.closed.called and tunnel.server.closed.called


def test_goaway_without_streams_closes_at_once(tunnel: Any) -> None:
    tunnel.clientSession.goAway()
    tunnel.flush()
    assert tunnel.client.closed.called and tunnel.server.closed.called


def test_open_crossing_our_goaway_is_refused(tunnel: Any) -> None:
    keep = tunnel.open()
    tunnel.clientSession.goAway(ErrorCode.NO_ERROR, "")
    crossing = tunnel.open(flush=False)  # sent before the GOAWAY arrives
    tunnel.flush()
    assert tunnel.accepted == [keep.accepterProto]
    assert resetCode(crossing.openerProto) == ErrorCode.REFUSED_STREAM
    keep.opener.write(b"on")
    tunnel.flush()
    assert keep.accepterProto.received == b"on"
    assert keep.accepterProto.lost is None


def test_close_resets_streams_and_drops_the_link(tunnel: Any) -> None:
    pair = tunnel.open()
    tunnel.serverSession.close(ErrorCode.SHUTDOWN, "stopping")
    tunnel.flush()
    assert tunnel.goAways == [(ErrorCode.SHUTDOWN, "stopping")]
    # Both ends' protocols hear of the end as a reset carrying the GOAWAY's
    # code, so a stream knows why its tunnel went.
    assert resetCode(pair.openerProto) == ErrorCode.SHUTDOWN
    assert resetCode(pair.accepterProto) == ErrorCode.SHUTDOWN
    assert tunnel.client.closed.called and tunnel.server.closed.called


def test_close_aborts_a_peer_that_does_not_read(tunnel: Any) -> None:
    tunnel.serverSession.close(ErrorCode.SHUTDOWN, "stopping")
    assert tunnel.serverIO.disconnecting and not tunnel.serverIO.aborted
    tunnel.clock.advance(5.0)
    assert tunnel.serverIO.aborted


@pytest.mark.parametrize(
    "garbage, expected",
    [
        (b"\x00\x00\x00\x00\xff\x00\x00\x00\x00\x00", "unknown frame type 255"),
        (b"\xff" * 10, "exceeds the limit"),
        (encode(FrameType.HELLO, 0, b"{}"), "HELLO frame after the handshake"),
        (encode(FrameType.DATA, 99, b"x"), "never opened"),
        (encodeJSON(FrameType.OPEN, 2, {}), "our parity"),
        (encode(FrameType.OPEN, 1, b"[" * 3000), "not JSON"),
        (
            encode(FrameType.DATA, 2, b"", FLAG_FIN) + encode(FrameType.DATA, 2, b"x"),
            "DATA after FIN",
        ),
        (encodeWindow(2, 0), "increment of zero"),
        (encode(FrameType.RESET, 2, b"\x00"), "shorter than its code"),
    ],
    ids=[
        "type",
        "length",
        "hello",
        "unknown-stream",
        "parity",
        "deep-json",
        "data-after-fin",
        "window-zero",
        "short-reset",
    ],
)
def test_protocol_error_closes_the_tunnel_with_a_reason(
    tunnel: Any, garbage: bytes, expected: str, logged: list[Any]
) -> None:
    pair = tunnel.open()
    tunnel.clientIO.write(garbage)  # what the server reads after the handshake
    tunnel.flush()
    code, reason = goAwayOf(tunnel.framesFromServer())
    assert code == ErrorCode.PROTOCOL_ERROR
    assert expected in reason
    assert tunnel.goAways == [(ErrorCode.PROTOCOL_ERROR, reason)]
    assert tunnel.client.closed.called and tunnel.server.closed.called
    assert resetCode(pair.openerProto) == ErrorCode.PROTOCOL_ERROR
    assert any(e.get("reason") == reason for e in logged)


# -- back-pressure ------------------------------------------------------------------------------


def test_stream_producer_paused_over_high_water_and_resumed_when_drained(
    tunnel: Any, small: Settings
) -> None:
    pair = tunnel.open()
    pair.accepter.pauseProducing()
    producer = RecordingProducer()
    pair.opener.registerProducer(producer, True)
    pair.opener.write(b"a" * small.window)  # goes out at once
    pair.opener.write(b"b" * small.sendHighWater)  # waits, at the mark
    assert pair.opener.sendBuffered == small.sendHighWater
    assert producer.events == []
    pair.opener.write(b"c")
    assert producer.events == ["pause"]
    pair.opener.write(b"d")
    tunnel.flush()
    assert producer.events == ["pause"]
    pair.accepter.resumeProducing()
    tunnel.flush()
    assert producer.events == ["pause", "resume"]
    assert pair.accepterProto.received == b"a" * small.window + b"b" * small.sendHighWater + b"cd"
    with pytest.raises(RuntimeError):
        pair.opener.registerProducer(RecordingProducer(), True)
    pair.opener.unregisterProducer()
    pair.opener.registerProducer(RecordingProducer(), True)


def test_producer_registered_over_high_water_is_paused_at_once(
    tunnel: Any, small: Settings
) -> None:
    pair = tunnel.open()
    pair.accepter.pauseProducing()
    pair.opener.write(b"x" * (small.window + small.sendHighWater + 1))
    producer = RecordingProducer()
    pair.opener.registerProducer(producer, True)
    assert producer.events == ["pause"]


def test_pull_producer_is_asked_for_more_as_the_buffer_drains(tunnel: Any, small: Settings) -> None:
    pair = tunnel.open()
    chunks = [b"%d" % i * 1000 for i in range(30)]

    class Pull:
        calls = 0

        def resumeProducing(self) -> None:
            Pull.calls += 1
            if chunks:
                pair.opener.write(chunks.pop(0))
            else:
                pair.opener.unregisterProducer()

        def stopProducing(self) -> None:
            pass

    pair.opener.registerProducer(Pull(), False)
    tunnel.flush()
    assert not chunks
    assert len(pair.accepterProto.received) == sum(len(b"%d" % i * 1000) for i in range(30))


def test_paused_link_stops_data_but_not_window_or_ping(tunnel: Any, small: Settings) -> None:
    a = tunnel.open()
    b = tunnel.open()
    session = tunnel.serverSession
    session.pauseProducing()
    mark = len(tunnel.framesFromServer())
    a.opener.write(b"A" * 2 * small.maxFrame)
    b.opener.write(b"B" * 2 * small.maxFrame)
    a.accepter.write(b"c" * small.window)  # the server reads this and returns credit
    tunnel.clientIO.write(encode(FrameType.PING, 0, b"pingpong"))
    tunnel.clock.advance(small.heartbeat)  # the server's own heartbeat is due
    tunnel.flush()
    sent = tunnel.framesFromServer()[mark:]
    assert of(sent, FrameType.DATA) == []
    assert of(sent, FrameType.WINDOW, a.opener.id)
    assert [f.payload for f in of(sent, FrameType.PING) if f.flags & FLAG_ACK][0] == b"pingpong"
    assert [f for f in of(sent, FrameType.PING) if not f.flags & FLAG_ACK]
    assert a.openerProto.received == b"c" * small.window
    assert a.accepterProto.received == b"" and b.accepterProto.received == b""
    mark = len(tunnel.framesFromServer())
    session.resumeProducing()
    tunnel.flush()
    order = [f.stream for f in of(tunnel.framesFromServer()[mark:], FrameType.DATA)]
    assert order == [a.opener.id, b.opener.id, a.opener.id, b.opener.id]
    assert a.accepterProto.received == b"A" * 2 * small.maxFrame
    assert b.accepterProto.received == b"B" * 2 * small.maxFrame


def test_congested_link_is_shared_round_robin(tunnel: Any, small: Settings) -> None:
    """While the link keeps filling, each turn gives every waiting stream one frame."""
    a = tunnel.open()
    b = tunnel.open()
    session = tunnel.serverSession
    session.pauseProducing()
    a.opener.write(b"A" * 3 * small.maxFrame)
    b.opener.write(b"B" * 3 * small.maxFrame)
    io = tunnel.serverIO
    writeSequence = io.writeSequence
    budget = [0]

    def congested(data: Any) -> None:
        writeSequence(data)
        budget[0] -= 1
        if budget[0] <= 0:
            session.pauseProducing()  # the link's buffer is full again

    io.writeSequence = congested
    mark = len(tunnel.framesFromServer())
    for _ in range(3):
        budget[0] = 2
        session.resumeProducing()
    order = [f.stream for f in of(tunnel.framesFromServer()[mark:], FrameType.DATA)]
    assert order == [a.opener.id, b.opener.id] * 3
    tunnel.flush()
    assert a.accepterProto.received == b"A" * 3 * small.maxFrame
    assert b.accepterProto.received == b"B" * 3 * small.maxFrame


def test_stream_reset_while_waiting_for_the_link_leaves_the_queue(tunnel: Any) -> None:
    a = tunnel.open()
    b = tunnel.open()
    tunnel.serverSession.pauseProducing()
    a.opener.write(b"dropped")
    b.opener.write(b"kept")
    a.opener.reset(ErrorCode.CANCEL)
    tunnel.serverSession.resumeProducing()
    tunnel.flush()
    assert a.accepterProto.received == b""
    assert resetCode(a.accepterProto) == ErrorCode.CANCEL
    assert b.accepterProto.received == b"kept"
    assert dataBytes(tunnel.framesFromServer(), a.opener.id) == 0


def test_fin_waits_for_a_paused_link_then_rides_on_the_data(tunnel: Any) -> None:
    pair = tunnel.open()
    tunnel.serverSession.pauseProducing()
    pair.opener.write(b"last words")
    pair.opener.loseWriteConnection()
    tunnel.flush()
    assert not pair.accepterProto.readClosed
    tunnel.serverSession.resumeProducing()
    tunnel.flush()
    assert pair.accepterProto.received == b"last words"
    assert pair.accepterProto.readClosed
    last = of(tunnel.framesFromServer(), FrameType.DATA, 2)[-1]
    assert last.flags & FLAG_FIN and last.payload == b"last words"
