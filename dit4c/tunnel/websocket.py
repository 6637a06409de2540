"""
The tunnel over WebSocket, for networks that pass nothing but HTTP(S).

The tunnel's byte stream rides in binary WebSocket messages (autobahn), so
the tunnel protocol runs over it unchanged: each side wraps the WebSocket in
a small transport (:class:`MessageTransport`) and hands it to the usual
tunnel protocol. The client side is an endpoint, ``dit4c-ws:url=...``, so a
listener picks WebSocket with an endpoint string like any other carrier.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny
from hyperlink import URL
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dit4c.common.websocket import configureFactory, webSocketEndpoint

SUBPROTOCOL = "dit4c-tunnel.1"
PATH = "/.dit4c/tunnel"
#: Tunnel frames are at most 64 KiB plus a header by default; a message may
#: carry a few of them.
MAX_MESSAGE = 1024 * 1024


@implementer(ITransport, IConsumer, IPushProducer)
class MessageTransport:
    """A byte-stream transport whose bytes travel as binary WebSocket messages."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        if data and not self.disconnecting:
            self.ws.sendMessage(data, isBinary=True)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.ws.sendClose(1000)

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.ws.transport.abortConnection()

    def getPeer(self) -> Any:
        return self.ws.transport.getPeer()

    def getHost(self) -> Any:
        return self.ws.transport.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.ws.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.ws.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.ws.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.ws.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abortConnection()


class _Carrier:
    """What both WebSocket ends share: message in, bytes to the tunnel protocol."""

    # Not "log": that name is autobahn's own (txaio) logger on the protocol.
    _log = Logger()
    inner: IProtocol | None = None
    #: The WebSocket's own connection, set by the protocol this is mixed into.
    transport: ITransport

    def _attach(self, inner: IProtocol) -> None:
        self.inner = inner
        inner.makeConnection(MessageTransport(self))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.inner is None:
            return
        if not isBinary:
            self._log.warn("text message on a tunnel WebSocket; closing")
            self.sendClose(1003, "binary messages only")  # type: ignore[attr-defined]
            return
        self.inner.dataReceived(payload)

    def _innerLost(self, wasClean: bool, reason: str | None) -> None:
        inner, self.inner = self.inner, None
        if inner is not None:
            error = ConnectionDone(reason or "") if wasClean else ConnectionLost(reason or "")
            inner.connectionLost(Failure(error))


# autobahn's two protocol bases disagree on the types of ``peer`` and
# ``_transport_details``: the ignores below are for that, not for this code.
class TunnelWebSocketServerProtocol(_Carrier, WebSocketServerProtocol):  # type: ignore[misc]
    def onConnect(self, request: Any) -> str:
        if request.path != PATH:
            raise ConnectionDeny(404, "not a tunnel endpoint")
        if SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(400, f"subprotocol {SUBPROTOCOL} required")
        return SUBPROTOCOL

    def onOpen(self) -> None:
        self._attach(self.factory.tunnelFactory.buildProtocol(self.transport.getPeer()))

    def onClose(self, wasClean: bool, code: int, reason: str | None) -> None:
        self._innerLost(wasClean, reason)


class _TunnelWebSocketServerFactory(WebSocketServerFactory):
    tunnelFactory: IProtocolFactory


def _configure(factory: Any) -> None:
    """The same limits on both ends (the tunnel has heartbeats of its own: no WebSocket pings)."""
    configureFactory(factory, maxMessage=MAX_MESSAGE, openHandshakeTimeout=10)


def tunnelWebSocketFactory(tunnelFactory: Factory, url: str = "ws://localhost/") -> WebSocketServerFactory:
    """A WebSocket server factory that carries tunnels to ``tunnelFactory``."""
    factory = _TunnelWebSocketServerFactory(url)
    factory.protocol = TunnelWebSocketServerProtocol
    factory.tunnelFactory = tunnelFactory
    _configure(factory)
    return factory


class TunnelWebSocketClientProtocol(_Carrier, WebSocketClientProtocol):  # type: ignore[misc]
    def onOpen(self) -> None:
        factory = self.factory
        inner = factory.tunnelFactory.buildProtocol(self.transport.getPeer())
        self._attach(inner)
        if not factory.opened.called:
            factory.opened.callback(inner)

    def onClose(self, wasClean: bool, code: int, reason: str | None) -> None:
        opened = self.factory.opened
        if not opened.called:
            opened.errback(Failure(ConnectionLost(f"WebSocket closed before opening: {code} {reason}")))
        self._innerLost(wasClean, reason)


class _TunnelWebSocketClientFactory(WebSocketClientFactory):
    tunnelFactory: IProtocolFactory
    #: Fires with the tunnel protocol once the WebSocket is open.
    opened: Deferred[IProtocol]


@implementer(IStreamClientEndpoint)
class WebSocketTunnelEndpoint:
    """
    Dial ``url`` (``ws://`` or ``wss://``), open the WebSocket with the tunnel
    subprotocol, and connect the factory's protocol over it. The Deferred
    fires with that protocol once the WebSocket is open.
    """

    def __init__(self, reactor: Any, url: str, *, trustRoots: str | None = None, timeout: float = 30) -> None:
        parsed = URL.from_text(url)
        if parsed.scheme not in ("ws", "wss") or not parsed.host:
            raise ValueError(f"tunnel WebSocket URL must be ws:// or wss://, not {url!r}")
        self.reactor = reactor
        self.url = url
        self.host = parsed.host
        self.port = parsed.port or (443 if parsed.scheme == "wss" else 80)
        self._endpoint = webSocketEndpoint(reactor, url, trustRoots=trustRoots, timeout=timeout)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        factory = _TunnelWebSocketClientFactory(self.url, protocols=[SUBPROTOCOL])
        factory.protocol = TunnelWebSocketClientProtocol
        factory.tunnelFactory = protocolFactory
        factory.opened = Deferred()
        _configure(factory)
        d = self._endpoint.connect(factory)
        return d.addCallback(lambda _: factory.opened)


class WebSocketTunnelParser:
    """``dit4c-ws:url=wss\\://host/.dit4c/tunnel[:trustRoots=DIR][:timeout=30]``"""

    prefix = "dit4c-ws"

    def parseStreamClient(self, reactor: Any, *args: str, **kwargs: str) -> WebSocketTunnelEndpoint:
        url = kwargs.get("url") or (args[0] if args else None)
        if not url:
            raise ValueError("dit4c-ws endpoint needs url=")
        return WebSocketTunnelEndpoint(
            reactor, url, trustRoots=kwargs.get("trustRoots"), timeout=float(kwargs.get("timeout", 30))
        )
