"""
Raw TCP (or Unix socket) clients, what came back on them read as HTTP
responses, and a port that refuses connections.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Protocol


class RawClient(Protocol):
    """Sends bytes as given and collects everything until the server closes."""

    transport: ITransport

    def __init__(self) -> None:
        self.received = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(bytes(self.received))


async def rawRequest(port: int | Path, data: bytes, host: str = "127.0.0.1") -> bytes:
    """Send ``data`` to ``host:port`` (or to the Unix socket at a path) and return all that comes back until close."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol

    client = RawClient()
    endpoint: Any = (
        UNIXClientEndpoint(reactor, str(port), timeout=5) if isinstance(port, Path) else TCP4ClientEndpoint(reactor, host, port)
    )
    await connectProtocol(endpoint, client)
    client.transport.write(data)
    return await client.done


@contextmanager
def refusedPort(host: str = "127.0.0.1") -> Iterator[int]:
    """
    A port on ``host`` that refuses every connection while the block runs:
    bound by this process and never listening (without ``SO_REUSEADDR``,
    so no other socket can bind it meanwhile), for a test of what happens
    when nobody answers.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind((host, 0))
        yield int(held.getsockname()[1])


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """Each response in ``data`` (status, body), read with httptools' response parser."""
    import httptools

    found: list[list[Any]] = []

    class Collect:
        def on_message_begin(self) -> None:
            found.append([0, b""])

        def on_headers_complete(self) -> None:
            found[-1][0] = parser.get_status_code()

        def on_body(self, body: bytes) -> None:
            found[-1][1] += body

    parser = httptools.HttpResponseParser(Collect())
    parser.feed_data(data)
    return [(status, body) for status, body in found]


def seenHeaders(body: bytes) -> dict[str, list[str]]:
    """The headers the test backend's ``/headers`` saw (its answer's body), by lower-case name."""
    return {k.lower(): v for k, v in json.loads(body)["headers"].items()}
