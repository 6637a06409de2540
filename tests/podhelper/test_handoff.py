"""
The pod helper's in-process hand-off: the listener gives each tunnel stream
straight to the auth proxy (no loopback connection between), here on real
loopback sockets in one process: a routing server, the listener, the auth
helper of a real portal's world, and a tool that shows what reaches it.

A reader that stops reading stops only its own stream, back to the tool;
half-close crosses both ways, as a direct connection to the tool would.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest_twisted
from support.waiting import deferLater
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from dit4c.listener.service import ListenerService, backoff

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "auth"))
from auth_client import Browser, closeWorld, logIn, makeWorld  # noqa: E402

CHUNK = b"x" * 65536


@implementer(IHalfCloseableProtocol, IPushProducer)
class Tool(Protocol):
    """
    ``GET /flood``: an endless body, written only while the connection
    takes it (a push producer), counted in ``produced``. ``GET /small``: a
    short answer. Upgrades: ``/echo`` echoes, and on the client's EOF says
    ``[eof]`` and closes; ``/bye`` says ``bye`` and half-closes at once.
    """

    def __init__(self, seen: dict[str, Any]) -> None:
        self.seen = seen
        self.buffer = b""
        self.path: bytes | None = None
        self.paused = False
        self.flooding = False

    def dataReceived(self, data: bytes) -> None:
        if self.path is not None:
            self.seen.setdefault(self.path.decode(), b"")
            self.seen[self.path.decode()] += data
            if self.path == b"/echo":
                self.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        self.path = head.split(b" ")[1]
        self.seen["user"] = [line for line in head.split(b"\r\n") if line.lower().startswith(b"x-dit4c-user:")]
        if self.path == b"/flood":
            self.seen["flood"] = self
            self.seen["produced"] = 0
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n")
            self.transport.registerProducer(self, True)
            self.flooding = True
            self.resumeProducing()
        elif self.path == b"/small":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nsmall")
            self.transport.loseConnection()
        elif self.path in (b"/echo", b"/bye"):
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: pipe\r\nConnection: Upgrade\r\n\r\n")
            if self.path == b"/bye":
                self.transport.write(b"bye")
                self.transport.loseWriteConnection()
            if rest:
                self.dataReceived(rest)

    def resumeProducing(self) -> None:
        self.paused = False
        while self.flooding and not self.paused:
            self.seen["produced"] += len(CHUNK)
            self.transport.write(CHUNK)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.flooding = False

    def readConnectionLost(self) -> None:
        self.seen[f"eof {self.path.decode() if self.path else ''}"] = True
        if self.path == b"/echo":
            self.transport.write(b"[eof]")
            self.transport.loseConnection()
        elif self.path == b"/bye":
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.flooding = False


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    """A public client that can half-close and be told the server half-closed; closes once both have."""

    def __init__(self) -> None:
        self.received = b""
        self.eof: defer.Deferred[bytes] = defer.Deferred()
        self.closed: defer.Deferred[bytes] = defer.Deferred()
        self.writeClosed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.eof.callback(self.received)
        if self.writeClosed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.writeClosed = True
        if self.eof.called:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.eof.called:
            self.eof.callback(self.received)
        self.closed.callback(self.received)


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path, routing: Any, signing: Any) -> Any:
    """The auth world, its auth helper in front of :class:`Tool`, and a listener handing it streams in this process."""
    w = await makeWorld(tmp_path)
    seen: dict[str, Any] = {}
    factory = Factory.forProtocol(lambda: Tool(seen))
    toolPort = reactor.listenTCP(0, factory, interface="127.0.0.1")
    w.ports.append(toolPort)
    await w.startAuth(tool=f"tcp:host=127.0.0.1:port={toolPort.getHost().port}")
    instance = w.instance.id
    listener = ListenerService(
        reactor,
        clientFromString(reactor, routing.tunnelEndpoint()),
        w.auth.listening.factory,  # the auth proxy itself: no loopback hop
        lambda: signing.token(instance),
        retryPolicy=backoff(initial=0.05, maximum=0.5),
    )
    listener.startService()
    routing.listeners.append(listener)
    await listener.whenRegistered().addTimeout(15, reactor)
    # Every request from here on goes through the routing server.
    w.authPort = routing.httpPort
    w.instance = await w.store.updateInstance(instance, url=w.instanceURL)
    w.seen = seen
    w.browser = Browser(w)
    assert (await logIn(w.browser, "alice")).code == 303
    yield w
    await closeWorld(w)


async def connect(w: Any, path: str, *, upgrade: bool = False) -> Client:
    """A raw connection to the routing server, a request for ``path`` on the instance sent, as alice."""
    cookie = "; ".join(f"{k}={v}" for k, v in w.browser.instanceCookies().items())
    extra = "Upgrade: pipe\r\nConnection: Upgrade\r\n" if upgrade else ""
    client = Client()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", w.authPort), client)
    client.transport.write(f"GET {path} HTTP/1.1\r\nHost: {w.host}\r\nCookie: {cookie}\r\n{extra}\r\n".encode())
    return client


async def until(check: Any, what: str, timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        await deferLater(0.05)
    raise AssertionError(f"never: {what}")


async def steady(read: Any) -> Any:
    """``read()`` once it has stopped changing (the same over ten looks a tenth of a second apart), or after 300 looks."""
    last, same = read(), 0
    for _ in range(300):
        if same >= 10:
            break
        await deferLater(0.1)
        now = read()
        same = same + 1 if now == last else 0
        last = now
    return last


@pytest_twisted.ensureDeferred
async def test_a_stalled_reader_stops_only_its_stream(world: Any) -> None:
    w = world
    slow = await connect(w, "/flood")
    await until(lambda: w.seen.get("produced", 0) > 0 and b"200 OK" in slow.received, "the flood begins")
    slow.transport.pauseProducing()  # alice stops reading
    produced = await steady(lambda: w.seen["produced"])
    # The tool was stopped: what it wrote is bounded by the buffers on the way (sockets, the stream's window).
    assert produced < 32 * 1024 * 1024, produced
    assert w.seen["flood"].paused
    # Another stream of the same tunnel goes on meanwhile.
    quick = await connect(w, "/small")
    # (The routing server closes the connection after the answer: this client half-closes, so it hears EOF.)
    assert (await quick.eof.addTimeout(15, reactor)).endswith(b"\r\n\r\nsmall")
    assert w.seen["produced"] == produced
    # Reading again, the tool writes again.
    slow.transport.resumeProducing()
    await until(lambda: w.seen["produced"] > produced + 4 * 1024 * 1024, "the flood goes on")
    slow.transport.loseConnection()
    await until(lambda: not w.seen["flood"].flooding, "the tool hears the client has gone")


@pytest_twisted.ensureDeferred
async def test_half_close_each_way_through_a_raw_pipe(world: Any) -> None:
    w = world
    # The client's EOF, after its data: the tool gets both, in order, and answers after it.
    echo = await connect(w, "/echo", upgrade=True)
    await until(lambda: b"101 Switching Protocols" in echo.received, "the pipe opens")
    echo.transport.write(b"one two three")
    await until(lambda: echo.received.endswith(b"one two three"), "the echo")
    echo.transport.loseWriteConnection()
    answer = await echo.closed.addTimeout(15, reactor)
    assert answer.endswith(b"one two three[eof]")
    assert w.seen["/echo"] == b"one two three"

    # The tool's EOF first: the client hears it after what the tool sent.
    bye = await connect(w, "/bye", upgrade=True)
    assert (await bye.eof.addTimeout(15, reactor)).endswith(b"\r\n\r\nbye")
