"""
What the routing tests share: a second HELLO sent by hand (the tests
directory is not a package, so helpers are handed out as fixtures).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from dit4c.tunnel.errors import HandshakeRefused
from dit4c.tunnel.protocol import TunnelClientProtocol
from dit4c.tunnel.session import Settings

Replay = Callable[[int, str], Awaitable[HandshakeRefused]]


async def _replay(port: int, token: str) -> HandshakeRefused:
    tunnel = TunnelClientProtocol(Settings(), reactor, lambda: token, lambda stream: None)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), tunnel)
    with pytest.raises(HandshakeRefused) as info:
        await tunnel.ready
    await tunnel.closed
    return info.value


@pytest.fixture
def replay() -> Replay:
    """
    ``await replay(tunnelPort, token)``: a HELLO with ``token`` from a
    connection of its own, as whoever copied a token would send it; returns
    the refusal (the test fails if the tunnel is accepted).
    """
    return _replay
