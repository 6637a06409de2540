"""
Tests for dit4c.tunnel.splice: two transports joined into one pipe.

First on ``StringTransport`` s (every call visible), then on two
``twisted.test.iosim`` connections, then on a tunnel stream spliced to a
"target" connection the way the listener does it, where half-close and
back-pressure cross the tunnel.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connect

from dit4c.tunnel.errors import ErrorCode, StreamReset
from dit4c.tunnel.splice import SpliceProtocol, splice


class HalfCloseTransport(StringTransport):
    """A StringTransport that can half-close, as TCP can."""

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


def connected(transport: StringTransport | None = None) -> SpliceProtocol:
    proto = SpliceProtocol()
    transport = transport if transport is not None else HalfCloseTransport()
    if isinstance(transport, StringTransportWithDisconnection):
        transport.protocol = proto
    proto.makeConnection(transport)
    return proto


def spliced() -> tuple[SpliceProtocol, SpliceProtocol]:
    a, b = connected(), connected()
    splice(a, b)
    return a, b


# -- on StringTransports ------------------------------------------------------------


def test_data_both_ways() -> None:
    a, b = spliced()
    a.dataReceived(b"request")
    b.dataReceived(b"response")
    a.dataReceived(b" more")
    assert b.transport.value() == b"request more"
    assert a.transport.value() == b"response"
    assert (a.bytesIn, b.bytesIn) == (len(b"request more"), len(b"response"))


def test_each_transport_has_the_other_as_producer() -> None:
    a, b = spliced()
    assert a.transport.producer is b.transport and a.transport.streaming
    assert b.transport.producer is a.transport and b.transport.streaming
    # a's transport, full, pauses reading on b's side, and resumes it.
    a.transport.producer.pauseProducing()
    assert b.transport.producerState == "paused"
    a.transport.producer.resumeProducing()
    assert b.transport.producerState == "producing"


def test_half_close_propagates_each_way() -> None:
    a, b = spliced()
    a.readConnectionLost()
    assert b.transport.writeClosed
    assert not a.transport.writeClosed
    assert not a.transport.disconnecting and not b.transport.disconnecting
    # the other direction still flows
    b.dataReceived(b"still talking")
    assert a.transport.value() == b"still talking"
    b.readConnectionLost()
    assert a.transport.writeClosed
    # once each side's FIN has gone too, each closes itself
    a.writeConnectionLost()
    b.writeConnectionLost()
    assert a.transport.disconnecting and b.transport.disconnecting


def test_half_close_after_write_close() -> None:
    """A side whose write half went first closes when its read half ends."""
    a, b = spliced()
    a.writeConnectionLost()
    assert not a.transport.disconnecting
    a.readConnectionLost()
    assert b.transport.writeClosed
    assert a.transport.disconnecting


def test_half_close_to_a_transport_that_cannot() -> None:
    a, b = connected(), connected(StringTransport())
    splice(a, b)
    a.readConnectionLost()
    assert b.transport.disconnecting


def test_close_propagates() -> None:
    a, b = spliced()
    a.connectionLost(Failure(ConnectionDone()))
    assert b.transport.disconnecting
    assert a.partner is None and b.partner is None
    b.connectionLost(Failure(ConnectionDone()))
    assert not a.transport.disconnecting


def test_close_propagates_once_through_real_disconnection() -> None:
    a = connected(StringTransportWithDisconnection())
    b = connected(StringTransportWithDisconnection())
    splice(a, b)
    a.transport.loseConnection()
    assert not a.transport.connected and not b.transport.connected
    assert a.partner is None and b.partner is None


def test_data_and_eof_before_the_join_are_held() -> None:
    a = connected()
    a.dataReceived(b"early ")
    a.dataReceived(b"bytes")
    assert a.transport.producerState == "paused"
    a.readConnectionLost()
    b = connected()
    a.join(b)
    assert b.transport.value() == b"early bytes"
    assert a.transport.producerState == "producing"
    assert b.transport.writeClosed
    b.dataReceived(b"late")
    assert a.transport.value() == b"late"


# -- on two iosim connections ---------------------------------------------------------


class Endpoint(Protocol):
    """The far end of one connection: a client, or a target server."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


def iosimPairs() -> tuple[Endpoint, SpliceProtocol, SpliceProtocol, Endpoint, Any, Any]:
    """client <-> a ~splice~ b <-> server."""
    client, a, b, server = Endpoint(), SpliceProtocol(), SpliceProtocol(), Endpoint()
    front = connect(a, FakeTransport(a, True), client, FakeTransport(client, False))
    back = connect(server, FakeTransport(server, True), b, FakeTransport(b, False))
    splice(a, b)
    return client, a, b, server, front, back


def flushAll(*pumps: Any) -> None:
    while any([p.flush() for p in pumps]):
        pass


def test_iosim_data_both_ways() -> None:
    client, a, b, server, front, back = iosimPairs()
    assert a.transport.producer is b.transport and b.transport.producer is a.transport
    client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    flushAll(front, back)
    assert server.received == b"GET / HTTP/1.1\r\n\r\n"
    server.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    flushAll(front, back)
    assert client.received == b"HTTP/1.1 200 OK\r\n\r\n"


def test_iosim_close_propagates_from_either_end() -> None:
    client, a, b, server, front, back = iosimPairs()
    client.transport.loseConnection()
    flushAll(front, back)
    assert server.lost is not None and client.lost is not None

    client, a, b, server, front, back = iosimPairs()
    server.transport.write(b"last")
    server.transport.loseConnection()
    flushAll(front, back)
    assert client.received == b"last"
    assert client.lost is not None and server.lost is not None


# -- a tunnel stream spliced to a target, as the listener does ----------------------------


def streamSpliced(tunnel: Any) -> tuple[Any, SpliceProtocol, SpliceProtocol]:
    tunnel.clientProtocol = lambda stream: SpliceProtocol()
    pair = tunnel.open()
    inbound = pair.accepterProto
    outbound = connected()
    return pair, inbound, outbound


def test_stream_data_before_the_target_connects(tunnel: Any) -> None:
    pair, inbound, outbound = streamSpliced(tunnel)
    pair.opener.write(b"GET / HTTP/1.1\r\n\r\n")
    tunnel.flush()
    pair.opener.write(b"body")
    tunnel.flush()
    # The first bytes are held by the splice, which stops the stream reading.
    assert inbound.transport.recvBuffered == len(b"body")
    inbound.join(outbound)
    assert outbound.transport.value() == b"GET / HTTP/1.1\r\n\r\nbody"
    assert inbound.transport.recvBuffered == 0
    outbound.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    tunnel.flush()
    assert pair.openerProto.received == b"HTTP/1.1 200 OK\r\n\r\n"


def test_stream_half_close_crosses_the_splice(tunnel: Any) -> None:
    pair, inbound, outbound = streamSpliced(tunnel)
    inbound.join(outbound)
    pair.opener.write(b"upload")
    pair.opener.loseWriteConnection()
    tunnel.flush()
    assert outbound.transport.value() == b"upload"
    assert outbound.transport.writeClosed  # the target sees EOF
    assert not outbound.transport.disconnecting
    outbound.dataReceived(b"stored")
    outbound.readConnectionLost()  # the target is done too
    tunnel.flush()
    assert pair.openerProto.received == b"stored"
    assert isinstance(pair.openerProto.lost.value, ConnectionDone)
    assert outbound.transport.disconnecting
    assert tunnel.clientSession.streamCount == 0


def test_stream_reset_closes_the_target(tunnel: Any) -> None:
    pair, inbound, outbound = streamSpliced(tunnel)
    inbound.join(outbound)
    pair.opener.reset(ErrorCode.CANCEL, "client went away")
    tunnel.flush()
    assert outbound.transport.disconnecting


def test_target_close_closes_the_stream(tunnel: Any) -> None:
    pair, inbound, outbound = streamSpliced(tunnel)
    inbound.join(outbound)
    outbound.dataReceived(b"bye")
    outbound.connectionLost(Failure(ConnectionDone()))
    tunnel.flush()
    assert pair.openerProto.received == b"bye"
    assert pair.openerProto.readClosed
    # Like a closed socket, the far end resets a stream that keeps sending.
    pair.opener.write(b"anyone?")
    tunnel.flush()
    assert isinstance(pair.openerProto.lost.value, StreamReset)


def test_back_pressure_across_the_tunnel(tunnel: Any, small: Any) -> None:
    pair, inbound, outbound = streamSpliced(tunnel)
    inbound.join(outbound)
    stream = inbound.transport
    # The target floods us; the tunnel window and the send high-water mark
    # stop reading from the target until the data has gone.
    pair.opener.pauseProducing()
    outbound.dataReceived(b"x" * (small.window + small.sendHighWater + 1))
    tunnel.flush()
    assert outbound.transport.producerState == "paused"
    pair.opener.resumeProducing()
    tunnel.flush()
    assert outbound.transport.producerState == "producing"
    assert len(pair.openerProto.received) == small.window + small.sendHighWater + 1
    # The target's connection, full, pauses the stream: its data waits in
    # the tunnel and the sender's window is not refilled.
    assert outbound.transport.producer is stream
    outbound.transport.producer.pauseProducing()
    pair.opener.write(b"y" * 2 * small.window)
    tunnel.flush()
    assert outbound.transport.value() == b""
    assert pair.opener.sendWindow == 0
    outbound.transport.producer.resumeProducing()
    tunnel.flush()
    assert outbound.transport.value() == b"y" * 2 * small.window
