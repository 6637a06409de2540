"""
Join two transports into one pipe, with back-pressure both ways.

Each side is registered as the other's producer (as the transit relay's
``connect_partner`` does), so a slow reader on one side pauses reading on the
other instead of filling memory. Half-close is carried across when both
transports support it; otherwise closing one side closes the other once its
writes are flushed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from dit4c.common.service import IConnectionTransport, noDelay


@implementer(IHalfCloseableProtocol)
class SpliceProtocol(Protocol):
    """One end of a splice. Create both with :func:`splice`."""

    transport: IConnectionTransport
    partner: SpliceProtocol | None = None
    bytesIn = 0

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._pendingEOF = False
        self._readClosed = False
        self._writeClosed = False

    def connectionMade(self) -> None:
        noDelay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.bytesIn += len(data)
        partner = self.partner
        if partner is not None and partner.transport is not None:
            partner.transport.write(data)
        else:
            # The partner is still connecting: hold data and stop reading.
            self._pending.append(data)
            self.transport.pauseProducing()

    def readConnectionLost(self) -> None:
        self._readClosed = True
        partner = self.partner
        if partner is None or partner.transport is None:
            self._pendingEOF = True
        else:
            halfClose(partner.transport)
        if self._writeClosed:
            # Both halves are shut: a half-closeable protocol closes itself.
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self._writeClosed = True
        if self._readClosed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        partner, self.partner = self.partner, None
        if partner is not None:
            partner.partner = None
            if partner.transport is not None:
                # We were its producer: a paused producer left registered
                # would be resumed instead of the connection closing.
                partner.transport.unregisterProducer()
                partner.transport.loseConnection()

    def join(self, partner: SpliceProtocol) -> None:
        """Connect this side (already connected) with ``partner`` (also connected)."""
        self.partner = partner
        partner.partner = self
        self.transport.registerProducer(partner.transport, True)
        partner.transport.registerProducer(self.transport, True)
        for side, other in ((self, partner), (partner, self)):
            pending, side._pending = side._pending, []
            for data in pending:
                other.transport.write(data)
            if pending:
                side.transport.resumeProducing()
            if side._pendingEOF:
                halfClose(other.transport)


def halfClose(transport: Any) -> None:
    """Send EOF on ``transport`` and keep reading (close it outright if it cannot half-close)."""
    loseWrite = getattr(transport, "loseWriteConnection", None)
    if loseWrite is not None:
        loseWrite()
    else:
        transport.loseConnection()


def splice(a: SpliceProtocol, b: SpliceProtocol) -> None:
    a.join(b)
