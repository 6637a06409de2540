"""
The Twisted side of the shared HTTP front: the client's connection
(:class:`FrontProtocol`) and the upstream's (:class:`UpstreamProtocol`)
around the machine (:class:`~dit4c.common.frontmachine.FrontConnection`),
and a front's whole rules (:class:`IFrontRules`): what the machine asks,
and how the protocol reaches the upstream, here beside the protocol it is
given.

They only move bytes and events between the two connections and the
machine, and carry back-pressure and half-close across: each transport is
the other's producer, so a slow reader slows the writer. Kept apart from
the machine so that the machine can be driven without them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from dit4c.common.frontmachine import FrontConnection
from dit4c.common.frontmetrics import FrontMetrics
from dit4c.common.frontmoves import CLOSED
from dit4c.common.frontrules import IFrontIO, IRequestRules
from dit4c.common.httpfront import FrontLimits
from dit4c.common.service import IConnectionTransport, noDelay
from dit4c.tunnel.splice import halfClose

__all__ = ["FrontProtocol", "IFrontRules", "UpstreamProtocol"]


class IFrontRules(IRequestRules):
    """What one front decides for one client connection (made per connection), and how it reaches its upstream."""

    def connect(protocol: UpstreamProtocol) -> Deferred[Any] | None:
        """
        Open the upstream connection for ``protocol`` (once, at the first
        request passed on): None when connected at once, else a Deferred
        that fires once connected or fails (:class:`HeadError` for the
        page the client gets).
        """


@implementer(IHalfCloseableProtocol, IPushProducer)
class UpstreamProtocol(Protocol):
    """
    The upstream connection (a tunnel stream, a connection to the tool):
    its bytes go to the machine. It is the client transport's producer: a
    client that reads slowly pauses reading from the upstream.
    """

    transport: IConnectionTransport

    def __init__(self, front: FrontProtocol) -> None:
        self.front = front
        self.readClosed = False
        self.writeClosed = False

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self.front.upstreamMade(self)

    def dataReceived(self, data: bytes) -> None:
        self.front.machine.upstreamData(data)

    def readConnectionLost(self) -> None:
        self.readClosed = True
        self.front.machine.upstreamEOF()
        if self.writeClosed and self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.writeClosed = True
        if self.readClosed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.front.upstreamGone(self, reason)

    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


#: Why the client is not read: the machine holds it, or the upstream takes no more now.
_HELD, _CONGESTED = 1, 2


@implementer(IHalfCloseableProtocol, IPushProducer, IFrontIO)
class FrontProtocol(Protocol):
    """
    One client connection of a front: moves bytes between the two
    connections and its :class:`FrontConnection`. It is the upstream
    transport's producer: an upstream that takes bytes slowly pauses
    reading from the client, as the machine does while it waits.

    :param rulesFor: ``rulesFor(transport)``, the front's rules for the
        connection on ``transport``.
    """

    transport: IConnectionTransport

    def __init__(
        self, rulesFor: Callable[[Any], IFrontRules], clock: IReactorTime, limits: FrontLimits, metrics: FrontMetrics
    ) -> None:
        self.rulesFor = rulesFor
        self.clock = clock
        self.limits = limits
        self.metrics = metrics
        self.machine: FrontConnection = None  # type: ignore[assignment]
        self.rules: IFrontRules = None  # type: ignore[assignment]
        self.upstream: UpstreamProtocol | None = None
        #: The upstream whose transport and ours are each other's producers.
        self._paired: UpstreamProtocol | None = None
        self._paused = 0
        self._readClosed = False
        self._writeClosed = False

    # -- the client's connection ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self.rules = self.rulesFor(self.transport)
        self.machine = FrontConnection(self.rules, self, self.clock, self.limits, self.metrics)
        self.machine.start()

    def dataReceived(self, data: bytes) -> None:
        self.machine.dataReceived(data)

    def readConnectionLost(self) -> None:
        self._readClosed = True
        self.machine.clientEOF()
        if self._writeClosed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self._writeClosed = True
        if self._readClosed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.machine is not None:
            self.machine.clientLost()

    # -- IPushProducer, for the upstream transport -------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._pause(_CONGESTED, True)

    def resumeProducing(self) -> None:
        self._pause(_CONGESTED, False)

    def stopProducing(self) -> None:
        pass

    def _pause(self, why: int, on: bool) -> None:
        before = self._paused
        after = before | why if on else before & ~why
        if after == before:
            return
        self._paused = after
        transport = self.transport
        if transport is None:
            return
        if not before:
            transport.pauseProducing()
        elif not after:
            transport.resumeProducing()

    # -- IFrontIO ----------------------------------------------------------------------------------------

    def writeClient(self, data: bytes) -> None:
        self.transport.write(data)

    def writeUpstream(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.write(data)

    def connectUpstream(self) -> Deferred[Any] | None:
        return self.rules.connect(UpstreamProtocol(self))

    def upstreamMade(self, upstream: UpstreamProtocol) -> None:
        if self.machine.phase is CLOSED:
            upstream.transport.loseConnection()
            return
        self.upstream = upstream
        # Back-pressure both ways: a slow client pauses reading from the
        # upstream, a slow upstream pauses reading from the client.
        self.transport.registerProducer(upstream, True)
        upstream.transport.registerProducer(self, True)
        self._paired = upstream
        self.machine.upstreamConnected()

    def _unpair(self) -> None:
        """
        Each transport was the other's producer: unregister them before a
        close, or a paused producer would be resumed instead of the close.
        """
        paired, self._paired = self._paired, None
        if paired is not None:
            self.transport.unregisterProducer()
            if paired.transport is not None:
                paired.transport.unregisterProducer()

    def upstreamGone(self, upstream: UpstreamProtocol, reason: Failure | None) -> None:
        if upstream is not self.upstream:
            return
        self.upstream = None
        self._unpair()
        self.machine.upstreamLost(reason)

    def holdClient(self, hold: bool) -> None:
        self._pause(_HELD, hold)

    def closeClient(self, abort: bool) -> None:
        self._unpair()
        transport = self.transport
        if abort:
            transport.abortConnection()
        else:
            transport.loseConnection()

    def halfCloseClient(self) -> None:
        halfClose(self.transport)

    def closeUpstream(self, abort: bool) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is None or upstream.transport is None:
            return
        self._unpair()
        if abort:
            upstream.transport.abortConnection()
        else:
            upstream.transport.loseConnection()

    def halfCloseUpstream(self) -> None:
        upstream = self.upstream
        if upstream is not None:
            halfClose(upstream.transport)
