"""A listener given several routing servers dials the nearest, and the others if it fails."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from support.sockets import refusedPort
from support.waiting import deferLater
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from dit4c.listener.nearest import NearestEndpoint


class Counting(Factory):
    """A server that counts the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.accepted += 1
        return Protocol()


@implementer(IStreamClientEndpoint)
class Far:
    """A real endpoint behind a slower network: every connection takes ``delay`` longer."""

    def __init__(self, endpoint: IStreamClientEndpoint, delay: float) -> None:
        self.endpoint = endpoint
        self.delay = delay

    def connect(self, factory: Any) -> Any:
        return deferLater(self.delay).addCallback(lambda _: self.endpoint.connect(factory))


@pytest_twisted.async_yield_fixture
async def servers() -> Any:
    made = []
    for _ in range(2):
        factory = Counting()
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        made.append((port, factory))
    yield made
    for port, _ in made:
        await port.stopListening()


def local(port: Any) -> TCP4ClientEndpoint:
    return TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)


@pytest_twisted.ensureDeferred
async def test_the_nearest_is_dialled(servers: Any) -> None:
    (nearPort, near), (farPort, far) = servers
    endpoint = NearestEndpoint(reactor, [("far", Far(local(farPort), 0.3)), ("near", local(nearPort))])
    protocol = await endpoint.connect(Factory.forProtocol(Protocol))
    assert endpoint.chosen == "near"
    # Each was probed once; the near one was then dialled for real.
    await deferLater(0.4)
    assert (near.accepted, far.accepted) == (2, 1)
    protocol.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_one_that_does_not_answer_comes_last(servers: Any) -> None:
    (port, server), _ = servers
    with refusedPort() as gone:
        closed = TCP4ClientEndpoint(reactor, "127.0.0.1", gone)
        endpoint = NearestEndpoint(reactor, [("gone", closed), ("up", local(port))])
        protocol = await endpoint.connect(Factory.forProtocol(Protocol))
    assert endpoint.chosen == "up"
    protocol.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_none_answering_fails_as_the_last_one_did() -> None:
    from twisted.internet.error import ConnectionRefusedError

    with refusedPort() as first, refusedPort() as second:
        endpoint = NearestEndpoint(
            reactor, [(f"gone{i}", TCP4ClientEndpoint(reactor, "127.0.0.1", port)) for i, port in enumerate((first, second))]
        )
        with pytest.raises(ConnectionRefusedError):
            await endpoint.connect(Factory.forProtocol(Protocol))
    assert endpoint.chosen is None


def test_needs_an_endpoint() -> None:
    with pytest.raises(ValueError):
        NearestEndpoint(reactor, [])
