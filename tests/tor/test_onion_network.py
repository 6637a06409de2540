"""
DIT4C over Tor on a private Tor network on loopback (tests/support/tornet.py):
Twisted endpoint strings that txtorcon provides (``onion:`` to listen as an
onion service, ``tor:`` to dial through Tor), a listener tunnel to a routing
server that is reachable only as an onion service, and a listener that
publishes its instance as an onion service with no routing server at all.

One network for the whole module (it takes tens of seconds and a few
hundred MiB to start); every test publishes its own onion services.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from support.backend import startBackend
from support.tornet import TorNetwork, requireTor, startTorNetwork
from support.waiting import eventually
from twisted.internet import defer, reactor
from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

requireTor("The tests over a private Tor network")

pytestmark = pytest.mark.slow

#: Seconds a first onion round trip may take: the descriptor reaches the
#: directories, the client fetches it and builds the circuits.
FIRST_TRIP = 120.0


@pytest_twisted.async_yield_fixture(scope="module")
async def tornet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TorNetwork]:
    net = await startTorNetwork(tmp_path_factory.mktemp("tornet"))
    print(f"private Tor network bootstrapped in {net.bootstrapSeconds:.1f} s")
    try:
        yield net
    finally:
        net.stop()


class _Exchange(Protocol):
    """Send a request, read until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(self.data)


async def httpGet(endpoint: str, host: str, path: str = "/", headers: str = "") -> bytes:
    """One HTTP/1.0 GET over the client endpoint string ``endpoint``; the whole answer."""
    request = f"GET {path} HTTP/1.0\r\nHost: {host}\r\n{headers}\r\n".encode()
    protocol = await connectProtocol(clientFromString(reactor, endpoint), _Exchange(request))
    return await protocol.done.addTimeout(60, reactor)


async def firstAnswer(endpoint: str, host: str, path: str = "/", headers: str = "") -> tuple[bytes, float]:
    """:func:`httpGet`, again until the onion service answers (its descriptor takes a while to reach the client)."""
    began = time.monotonic()
    failures: list[str] = []

    async def answer() -> bytes | None:
        try:
            return await httpGet(endpoint, host, path, headers) or None
        except Exception as e:  # not published yet, or not yet fetched
            failures[:] = [f"{type(e).__name__}: {e}"]
            return None

    response: bytes = await eventually(answer, FIRST_TRIP, 1.0, lambda: f"an answer from {host}: {failures}")
    return response, time.monotonic() - began


@pytest_twisted.ensureDeferred
async def test_an_onion_endpoint_string_is_reached_through_a_tor_endpoint_string(tornet: TorNetwork) -> None:
    """
    What every DIT4C server listens with (``serverFromString``) takes
    txtorcon's ``onion:`` string, given the control port of a running tor;
    what every DIT4C client dials with (``clientFromString``) takes
    ``tor:``, given a SOCKS port: a web server published so is reached
    through Tor, and only by its .onion name.
    """
    backend = startBackend(reactor)
    onion = serverFromString(reactor, f"onion:80:controlPort={tornet.controlPort}:version=3")
    port = await onion.listen(backend.site)
    try:
        host = port.getHost().onion_uri
        assert host.endswith(".onion") and len(host) == 56 + len(".onion"), host
        response, seconds = await firstAnswer(tornet.dial(host, 80), host, "/bytes?n=5")
        print(f"first onion round trip {seconds:.1f} s after the service was published")
        assert response.startswith(b"HTTP/1.0 200") or response.startswith(b"HTTP/1.1 200"), response[:200]
        began = time.monotonic()
        again = await httpGet(tornet.dial(host, 80), host, "/bytes?n=5")
        print(f"next onion round trip {time.monotonic() - began:.2f} s")
        assert b" 200 " in again.split(b"\r\n", 1)[0]
    finally:
        await defer.maybeDeferred(port.stopListening)
        await backend.stop()
