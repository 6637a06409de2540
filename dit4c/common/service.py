"""Service helpers shared by every server."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IConsumer,
    IListeningPort,
    IProtocolFactory,
    IPushProducer,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.logger import Logger

from dit4c.common.listening import raiseOpenFileLimit


class ListeningService(Service):
    """
    Listen on an endpoint while running, and keep the port so that callers
    can learn the address really bound (``tcp:0`` in tests). Binding happens
    in ``privilegedStartService`` and a failure to bind fails start-up at once,
    as a user starting ``twistd`` expects.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, description: str = "") -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.port: IListeningPort | None = None
        self._listening: Deferred[Any] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        raised = raiseOpenFileLimit()
        if raised is not None:
            self.log.info("open files: soft limit raised from {old} to {new} (the hard limit)", old=raised[0], new=raised[1])
        self._listen()

    def startService(self) -> None:
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self._listening is not None:
            return
        self._listening = self.endpoint.listen(self.factory)
        failures: list[Any] = []
        self._listening.addCallbacks(self._bound, failures.append)
        if failures:
            failures[0].raiseException()

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self.log.info("{what} listening on {address}", what=self.description or "server", address=port.getHost())
        return port

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        listening, self._listening = self._listening, None
        port, self.port = self.port, None
        if port is not None:
            return maybeDeferred(port.stopListening)
        if listening is not None:
            listening.cancel()
        return None


class IConnectionTransport(ITransport, IConsumer, IPushProducer):
    """
    The transport of a connection as the relays here use it: a TCP or TLS
    transport is also its connection's consumer and push producer, and can
    be aborted; so are the stand-ins for one (a tunnel stream, a WebSocket's
    message transport). For type annotations only: nothing declares it.
    """

    def abortConnection() -> None:
        """Close the connection at once, dropping whatever is not yet written."""


def noDelay(transport: Any) -> None:
    """
    Turn off Nagle's algorithm on a TCP connection (through TLS and other
    wrappers too): a relay's small writes, such as a request head or a
    window update, must leave at once rather than wait for an ACK.
    """
    import socket

    while transport is not None:
        setter = getattr(transport, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
            except OSError:
                pass
            return
        handle = getattr(transport, "getHandle", None)
        sock = handle() if handle is not None else None
        if isinstance(sock, socket.socket):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            return
        transport = getattr(transport, "transport", None)
