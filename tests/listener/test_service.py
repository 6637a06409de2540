"""
The listener's link to the routing server on a ``MemoryReactorClock``:
a new token for every dial, and what it does when another listener takes
its instance's name (``GOAWAY(REPLACED)``): it dials again, at once the
first time, then with a growing back-off.
"""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from dit4c.common.keys import generatePrivateKey
from dit4c.listener.report import ROUTING_TOKEN_LIFETIME, routingToken
from dit4c.listener.service import ListenerService, Replacements, backoff
from dit4c.tunnel.errors import ErrorCode
from dit4c.tunnel.frames import PREFACE, FrameDecoder, FrameType, decodeJSON, encodeCode, encodeJSON

WELCOME = {
    "instance": "inst",
    "host": "inst.localhost",
    "url": "http://inst.localhost/",
    "window": 262144,
    "max_frame": 65536,
    "max_streams": 100,
    "heartbeat": 10.0,
    "timeout": 30.0,
}


# -- the back-off after being replaced ----------------------------------------------------


def test_replaced_first_at_once_then_growing() -> None:
    clock = Clock()
    replacements = Replacements(clock, lambda n: 10.0 * n, settled=120)
    replacements.registered()
    assert replacements.replaced() == 0.0
    for n in range(1, 5):
        clock.advance(1)
        replacements.registered()
        clock.advance(1)
        assert replacements.replaced() == 10.0 * n
    assert replacements.count == 5


def test_holding_the_name_long_enough_starts_the_count_again() -> None:
    clock = Clock()
    replacements = Replacements(clock, lambda n: 10.0 * n, settled=120)
    replacements.registered()
    assert replacements.replaced() == 0.0
    replacements.registered()
    clock.advance(119)
    assert replacements.replaced() == 10.0
    replacements.registered()
    clock.advance(120)
    assert replacements.replaced() == 0.0
    assert replacements.count == 1


def test_the_default_back_off_grows_and_is_bounded() -> None:
    policy = backoff(initial=0.5, maximum=60.0)
    for attempt, nominal in [(1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (40, 60.0)]:
        for _ in range(20):
            assert nominal / 2 <= policy(attempt) <= nominal


# -- a fresh token for every dial -----------------------------------------------------------


def test_every_token_is_new_and_short() -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    source = routingToken(generatePrivateKey(), "inst", scoped=False, clock=clock)
    tokens = [source() for _ in range(50)]
    claims = [jwt.decode(t, options={"verify_signature": False}) for t in tokens]
    assert len({c["jti"] for c in claims}) == 50
    assert all(c["exp"] - c["iat"] == ROUTING_TOKEN_LIFETIME <= 300 for c in claims)
    assert {c["sub"] for c in claims} == {"inst"}
    scoped = routingToken(generatePrivateKey(), "inst", clock=clock)()
    assert jwt.get_unverified_header(scoped)["kid"] == "instance:inst"
    assert jwt.get_unverified_header(tokens[0])["kid"] != "instance:inst"


# -- a listener replaced, on a memory reactor ------------------------------------------------


class Link:
    """One dial the listener made, completed by hand."""

    def __init__(self, reactor: MemoryReactorClock, index: int) -> None:
        _, _, factory, _, _ = reactor.tcpClients[index]
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def hello(self) -> dict[str, Any]:
        data = self.transport.value()
        assert data.startswith(PREFACE)
        frame = FrameDecoder(1 << 20).feed(data[len(PREFACE) :])[0]
        assert frame.type == FrameType.HELLO
        hello: dict[str, Any] = decodeJSON(frame)
        return hello

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def reactor() -> MemoryReactorClock:
    reactor = MemoryReactorClock()
    reactor.advance(1_700_000_000)
    return reactor


@pytest.fixture
def listener(reactor: MemoryReactorClock) -> Any:
    tokens = iter(range(1000))
    service = ListenerService(
        reactor,
        TCP4ClientEndpoint(reactor, "routing.example", 8443),
        TCP4ClientEndpoint(reactor, "127.0.0.1", 8888),
        lambda: f"token-{next(tokens)}",
        retryPolicy=lambda n: 100.0,
        replacedPolicy=lambda n: 10.0 * n,
    )
    service.startService()
    yield service
    service.stopService()


def registered(reactor: MemoryReactorClock, listener: ListenerService, index: int) -> Link:
    link = Link(reactor, index)
    link.send(encodeJSON(FrameType.WELCOME, 0, WELCOME))
    assert listener.tunnel is not None and listener.tunnel.transport is link.transport
    return link


def replaced(link: Link) -> None:
    link.send(encodeCode(FrameType.GOAWAY, 0, ErrorCode.REPLACED, "a newer tunnel took this instance"))


def test_replaced_dials_again_at_once_then_backs_off(reactor: MemoryReactorClock, listener: Any) -> None:
    first = registered(reactor, listener, 0)
    assert first.hello()["token"] == "token-0"

    replaced(first)
    assert listener.tunnel is None
    assert len(reactor.tcpClients) == 1
    reactor.advance(0)
    assert len(reactor.tcpClients) == 2  # at once
    second = registered(reactor, listener, 1)
    assert second.hello()["token"] == "token-1"  # a new token, never the same one

    # Replaced again in a row: policy(1) = 10 s, then policy(2) = 20 s.
    for index, delay in [(2, 10.0), (3, 20.0)]:
        replaced(second)
        reactor.advance(delay - 0.01)
        assert len(reactor.tcpClients) == index
        reactor.advance(0.01)
        assert len(reactor.tcpClients) == index + 1
        second = registered(reactor, listener, index)
        assert second.hello()["token"] == f"token-{index}"
    assert listener.replacements.count == 3

    # Holding the name for two minutes starts the count again.
    reactor.advance(120)
    replaced(second)
    reactor.advance(0)
    assert len(reactor.tcpClients) == 5


def test_a_replaced_link_finishes_and_is_not_dialled_again(reactor: MemoryReactorClock, listener: Any) -> None:
    first = registered(reactor, listener, 0)
    oldClient = listener.client
    replaced(first)
    reactor.advance(0)
    second = registered(reactor, listener, 1)
    assert listener.client is not oldClient
    assert oldClient in listener.services and listener.client in listener.services

    # The old tunnel's link closes (its streams done); its ClientService is
    # retired, and it never dials again, however long we wait.
    first.lose()
    reactor.advance(0)
    assert oldClient not in listener.services
    assert not oldClient.running
    reactor.advance(10_000)
    assert len(reactor.tcpClients) == 2
    assert listener.tunnel is not None and listener.tunnel.transport is second.transport


def test_other_go_aways_keep_the_link(reactor: MemoryReactorClock, listener: Any) -> None:
    first = registered(reactor, listener, 0)
    client = listener.client
    first.send(encodeCode(FrameType.GOAWAY, 0, ErrorCode.SHUTDOWN, "routing server stopping"))
    reactor.advance(0)
    assert len(reactor.tcpClients) == 1
    first.lose()
    reactor.advance(100)  # the usual back-off, on the same link
    assert listener.client is client
    assert len(reactor.tcpClients) == 2
    assert listener.replacements.count == 0


def test_stopping_while_waiting_to_dial_again_dials_nothing(reactor: MemoryReactorClock, listener: Any) -> None:
    first = registered(reactor, listener, 0)
    replaced(first)
    reactor.advance(0)
    second = registered(reactor, listener, 1)
    replaced(second)  # the next dial is 10 s away
    listener.stopService()
    reactor.advance(1000)
    assert len(reactor.tcpClients) == 2
