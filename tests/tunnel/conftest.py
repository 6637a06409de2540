"""
Shared harness for the tunnel tests.

A :class:`Tunnel` joins a ``TunnelClientProtocol`` and a
``TunnelServerProtocol`` in memory with ``twisted.test.iosim`` and one
``Clock``; nothing here touches the real reactor or real time. Every byte each
side writes is also kept (``tap``) so that tests can look at the frames that
went over the link. The stream protocols that record what happens to them are
handed to tests through fixtures (``recorder``, ``plainRecorder``) because the
tests directory is not a package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import implementer

from dit4c.tunnel.frames import ABSOLUTE_MAX_FRAME, PREFACE, Frame, FrameDecoder
from dit4c.tunnel.protocol import TunnelClientProtocol, TunnelServerFactory, TunnelServerProtocol
from dit4c.tunnel.session import Session, Settings
from dit4c.tunnel.stream import Stream

KiB = 1024

#: Small figures so that windows, buffers and high-water marks are reached
#: with a few frames. A window is at least 1 KiB (the handshake checks it).
SMALL = Settings(
    window=16 * KiB,
    maxWindow=256 * KiB,
    maxFrame=4 * KiB,
    maxStreams=100,
    growthBudget=1024 * KiB,
    bufferLimit=1024 * KiB,
    heartbeat=1.0,
    timeout=3.0,
    sendHighWater=32 * KiB,
    handshakeTimeout=10.0,
)

REGISTRATION = {"instance": "i1", "host": "i1.example", "url": "http://i1.example/"}


class Recorder(Protocol):
    """A stream protocol that keeps everything that happens to it."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.made = False
        self.readClosed = False
        self.writeClosed = False
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        assert self.lost is None, "connectionLost twice"
        self.lost = reason

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    def readConnectionLost(self) -> None:
        self.readClosed = True

    def writeConnectionLost(self) -> None:
        self.writeClosed = True


class TappedTransport(FakeTransport):
    """An iosim transport that also keeps a copy of everything written."""

    def __init__(self, protocol: Any, isServer: bool) -> None:
        super().__init__(protocol, isServer)
        self.tap: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        if not self.disconnecting:
            self.tap.append(bytes(data))
        super().write(data)

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def decodeAll(data: bytes) -> list[Frame]:
    return FrameDecoder(ABSOLUTE_MAX_FRAME).feed(data)


class StreamPair:
    """Both ends of one stream and the protocols on them."""

    def __init__(
        self, opener: Stream, openerProto: Any, accepter: Stream, accepterProto: Any
    ) -> None:
        self.opener = opener
        self.openerProto = openerProto
        self.accepter = accepter
        self.accepterProto = accepterProto


class Tunnel:
    """A client and a server tunnel protocol, joined in memory."""

    def __init__(
        self,
        serverSettings: Settings = SMALL,
        clientSettings: Settings | None = None,
        authenticate: Callable[[str, TunnelServerProtocol], Any] | None = None,
        established: Callable[[TunnelServerProtocol], None] | None = None,
    ) -> None:
        self.clock = Clock()
        self.tokens: list[str] = []
        self.established: list[TunnelServerProtocol] = []
        self.goAways: list[tuple[int, str]] = []
        #: Stream protocols the client's handler handed out, in order.
        self.accepted: list[Any] = []
        #: Builds the protocol for the next stream the server opens; None
        #: refuses it.
        self.clientProtocol: Callable[[Stream], Any] = lambda stream: HalfCloseRecorder()
        self._onEstablished = established

        async def allow(token: str, proto: TunnelServerProtocol) -> dict[str, Any]:
            return dict(REGISTRATION)

        self.factory = TunnelServerFactory(
            serverSettings, self.clock, authenticate or allow, self._established
        )
        self.server: TunnelServerProtocol = self.factory.buildProtocol(None)
        self.client = TunnelClientProtocol(
            clientSettings or serverSettings,
            self.clock,
            token=self._token,
            handler=self._handle,
            onGoAway=lambda code, reason: self.goAways.append((code, reason)),
        )
        self.serverIO = TappedTransport(self.server, isServer=True)
        self.clientIO = TappedTransport(self.client, isServer=False)
        self.pump: IOPump = connect(
            self.server, self.serverIO, self.client, self.clientIO, greet=False, clock=self.clock
        )
        self.ready: list[Any] = []
        self.client.ready.addBoth(self.ready.append)

    def _token(self) -> str:
        self.tokens.append("tok")
        return "tok"

    def _established(self, proto: TunnelServerProtocol) -> None:
        self.established.append(proto)
        if self._onEstablished is not None:
            self._onEstablished(proto)

    def _handle(self, stream: Stream) -> Any:
        proto = self.clientProtocol(stream)
        if proto is not None:
            self.accepted.append(proto)
        return proto

    # -- moving bytes ----------------------------------------------------------

    def flush(self, tick: float = 0.0, limit: int = 100_000) -> int:
        """
        Pump until both directions are idle; with ``tick``, the clock moves
        that far after every exchange (a link with latency). Returns the
        number of exchanges.
        """
        for n in range(limit):
            moved = self.pump.pump()
            if tick:
                self.clock.advance(tick)
            if not moved:
                return n
        raise AssertionError("the tunnel never went quiet")

    @property
    def clientSession(self) -> Session:
        assert self.client.session is not None
        return self.client.session

    @property
    def serverSession(self) -> Session:
        assert self.server.session is not None
        return self.server.session

    def framesFromClient(self) -> list[Frame]:
        data = b"".join(self.clientIO.tap)
        assert data.startswith(PREFACE)
        return decodeAll(data[len(PREFACE) :])

    def framesFromServer(self) -> list[Frame]:
        return decodeAll(b"".join(self.serverIO.tap))

    def open(
        self, protocol: Any = None, metadata: dict[str, Any] | None = None, flush: bool = True
    ) -> StreamPair:
        """Open a stream from the server (as the routing server does)."""
        proto = protocol if protocol is not None else HalfCloseRecorder()
        count = len(self.accepted)
        stream = self.serverSession.openStream(proto, metadata)
        if not flush:
            return StreamPair(stream, proto, None, None)  # type: ignore[arg-type]
        self.flush()
        assert len(self.accepted) == count + 1, "the client did not accept the stream"
        accepterProto = self.accepted[-1]
        return StreamPair(stream, proto, accepterProto.transport, accepterProto)


@pytest.fixture
def makeTunnel() -> Callable[..., Tunnel]:
    """A factory of established tunnels; ``handshake=False`` stops before."""

    def make(*args: Any, handshake: bool = True, **kwargs: Any) -> Tunnel:
        tunnel = Tunnel(*args, **kwargs)
        if handshake:
            tunnel.flush()
            assert tunnel.client.session is not None and tunnel.server.session is not None
        return tunnel

    return make


@pytest.fixture
def tunnel(makeTunnel: Callable[..., Tunnel]) -> Tunnel:
    """An established tunnel with :data:`SMALL` settings on both sides."""
    return makeTunnel()


@pytest.fixture
def recorder() -> type[HalfCloseRecorder]:
    """The class of a half-closeable stream protocol that records everything."""
    return HalfCloseRecorder


@pytest.fixture
def plainRecorder() -> type[Recorder]:
    """The class of a recording stream protocol without half-close."""
    return Recorder


@pytest.fixture
def small() -> Settings:
    return SMALL


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    """Every log event emitted during the test."""
    events: list[dict[str, Any]] = []
    observer = _Observer(events)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


@implementer(ILogObserver)
class _Observer:
    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
