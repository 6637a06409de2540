"""
A listener given two routing servers, on a ``MemoryReactorClock``: when
the tunnel to the one it uses is lost (its routing server killed: the
kernel closes the socket; or silent past the heartbeat timeout: a host
gone), it dials again after its back-off, probes both, skips the one that
refuses, and is registered on the other, whose WELCOME carries the URL it
reports. While that tunnel holds it dials nothing, so the first routing
server coming back does not move the instance again.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from dit4c.listener.nearest import NearestEndpoint
from dit4c.listener.service import ListenerService
from dit4c.tunnel.frames import FrameType, encode, encodeJSON
from dit4c.tunnel.session import Settings

RETRY = 1.0
HEARTBEAT, TIMEOUT = 10.0, 30.0


def welcome(domain: str) -> dict[str, Any]:
    return {
        "instance": "inst",
        "host": f"inst.{domain}",
        "url": f"http://inst.{domain}/",
        "window": 262144,
        "max_frame": 65536,
        "max_streams": 100,
        "heartbeat": HEARTBEAT,
        "timeout": TIMEOUT,
    }


class World:
    """The listener, the dials it made (completed, refused or lost by hand), and the URLs it was given."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor
        self.urls: list[str] = []
        self.links: dict[int, Any] = {}
        endpoints = [(name, TCP4ClientEndpoint(reactor, name, 8443)) for name in ("a.example", "b.example")]
        self.nearest = NearestEndpoint(reactor, endpoints, probeTimeout=5.0)
        self.listener = ListenerService(
            reactor,
            self.nearest,
            TCP4ClientEndpoint(reactor, "127.0.0.1", 8888),
            lambda: "token",
            settings=Settings(heartbeat=HEARTBEAT, timeout=TIMEOUT),
            retryPolicy=lambda n: RETRY,
            onRegistered=lambda w: self.urls.append(w["url"]),
        )

    def hosts(self, start: int = 0) -> list[str]:
        """The host each dial went to (probes and tunnels alike), from the ``start``-th."""
        return [host for host, *_ in self.reactor.tcpClients[start:]]

    def answer(self, index: int) -> Any:
        """The ``index``-th dial connects."""
        _, _, factory, _, _ = self.reactor.tcpClients[index]
        protocol: Any = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.links[index] = protocol
        return protocol

    def refuse(self, index: int) -> None:
        """The ``index``-th dial is refused (nothing listens there any more)."""
        _, _, factory, _, _ = self.reactor.tcpClients[index]
        factory.clientConnectionFailed(self.reactor.connectors[index], Failure(ConnectionRefusedError()))

    def welcomed(self, index: int, domain: str) -> None:
        """The ``index``-th dial is the tunnel, and the routing server welcomes it."""
        self.links[index].dataReceived(encodeJSON(FrameType.WELCOME, 0, welcome(domain)))


@pytest.fixture
def world() -> Any:
    reactor = MemoryReactorClock()
    reactor.advance(1_700_000_000)
    made = World(reactor)
    made.listener.startService()
    # Both routing servers answer the first probes; a.example (first, on a tie) is dialled.
    assert made.hosts() == ["a.example", "b.example"]
    made.answer(0)
    made.answer(1)
    assert made.hosts(2) == ["a.example"]
    made.answer(2)
    made.welcomed(2, "r1.example")
    assert made.urls == ["http://inst.r1.example/"]
    yield made
    made.listener.stopService()


def redialledToB(world: World, start: int) -> None:
    """After the back-off: both probed, a.example refuses, b.example is dialled and welcomes."""
    world.reactor.advance(RETRY - 0.01)
    assert world.hosts(start) == [], "dialled again before the back-off"
    world.reactor.advance(0.01)
    assert world.hosts(start) == ["a.example", "b.example"]
    world.refuse(start)
    world.answer(start + 1)
    assert world.hosts(start + 2) == ["b.example"], "the one that refused was dialled"
    world.answer(start + 2)
    world.welcomed(start + 2, "r2.example")


def test_a_lost_tunnel_moves_to_the_other_routing_server(world: World) -> None:
    # Routing server A is killed: the kernel closes its socket, the tunnel hears at once.
    world.links[2].connectionLost(Failure(ConnectionLost("killed")))
    assert world.listener.tunnel is None

    redialledToB(world, 3)

    # The new URL, from B's WELCOME, goes to onRegistered (the pod helper reports it to the portal).
    assert world.urls == ["http://inst.r1.example/", "http://inst.r2.example/"]
    assert world.listener.tunnel is not None and world.listener.tunnel.transport is world.links[5].transport
    assert world.nearest.chosen == "b.example"


def test_a_silent_routing_server_is_left_after_the_heartbeat_timeout(world: World) -> None:
    # A's host is gone without a word (no FIN, no RST): only the timeout notices.
    link, tunnel = world.links[2], world.listener.tunnel
    world.reactor.advance(TIMEOUT - 0.01)
    assert world.hosts(3) == [] and world.listener.tunnel is tunnel
    world.reactor.advance(0.01)
    assert link.transport.disconnecting, "a peer silent past the timeout was kept"
    link.connectionLost(Failure(ConnectionDone()))

    redialledToB(world, 3)
    assert world.urls[-1] == "http://inst.r2.example/"


def test_the_first_routing_server_coming_back_does_not_move_the_instance(world: World) -> None:
    world.links[2].connectionLost(Failure(ConnectionLost("killed")))
    redialledToB(world, 3)
    link, tunnel = world.links[5], world.listener.tunnel
    assert tunnel is not None

    # A is back (it would answer now), B keeps answering its heartbeats:
    # nothing is dialled, however long the tunnel to B holds.
    for _ in range(100):
        world.reactor.advance(HEARTBEAT)
        link.dataReceived(encode(FrameType.PING, 0, struct.pack("!d", world.reactor.seconds())))
        assert tunnel.session is not None and not tunnel.session.closed
    assert world.hosts(6) == []
    assert world.listener.tunnel is tunnel
    assert world.urls == ["http://inst.r1.example/", "http://inst.r2.example/"]


def test_a_silent_host_does_not_hold_up_the_dial(world: World) -> None:
    world.links[2].connectionLost(Failure(ConnectionLost("gone")))
    world.reactor.advance(RETRY)
    assert world.hosts(3) == ["a.example", "b.example"]
    # A's host answers nothing (no refusal: the probe would wait its 5 s);
    # B answers, and is dialled at once.
    world.answer(4)
    assert world.hosts(5) == ["b.example"]
    world.answer(5)
    world.welcomed(5, "r2.example")
    assert world.urls[-1] == "http://inst.r2.example/"
    # A's probe times out later; nothing more is dialled.
    world.reactor.advance(5.0)
    assert world.hosts(6) == []
    assert world.nearest.chosen == "b.example"
