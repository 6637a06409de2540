"""
Half-close through the auth helper over TCP, as a direct connection to the
tool would see it: a client that sends its request and then EOF has the
tool hear that EOF after the request, and still gets the tool's answer.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from auth_client import Browser, logIn
from support.sockets import RawClient
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer


@implementer(IHalfCloseableProtocol)
class AnswersAtEOF(Protocol):
    """A tool that answers only once the client's EOF has arrived, saying what it read before."""

    def __init__(self) -> None:
        self.request = b""

    def dataReceived(self, data: bytes) -> None:
        self.request += data

    def readConnectionLost(self) -> None:
        head = self.request.split(b"\r\n", 1)[0]
        body = b"read " + head
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_the_clients_eof_reaches_the_tool_and_the_answer_comes_back(world: Any) -> None:
    port = reactor.listenTCP(0, Factory.forProtocol(AnswersAtEOF), interface="127.0.0.1")
    world.ports.append(port)
    await world.startAuth(tool=f"tcp:host=127.0.0.1:port={port.getHost().port}")
    alice = Browser(world)
    assert (await logIn(alice, "alice")).code == 303
    cookie = "; ".join(f"{k}={v}" for k, v in alice.instanceCookies().items())
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", world.authPort), client)
    client.transport.write(f"GET /report HTTP/1.1\r\nHost: {world.host}\r\nCookie: {cookie}\r\n\r\n".encode())
    client.transport.loseWriteConnection()  # type: ignore[attr-defined]
    answer = await client.done.addTimeout(15, reactor)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:200]
    assert answer.endswith(b"\r\n\r\nread GET /report HTTP/1.1")


@pytest_twisted.ensureDeferred
async def test_eof_in_the_middle_of_a_head_closes(world: Any) -> None:
    await world.startAuth()
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", world.authPort), client)
    client.transport.write(f"GET / HTTP/1.1\r\nHost: {world.host}\r\n".encode())
    client.transport.loseWriteConnection()  # type: ignore[attr-defined]
    assert await client.done.addTimeout(15, reactor) == b""
    assert world.toolSaw == []
