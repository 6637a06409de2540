"""
Tokens, a routing server and listeners in the test's own process, on real
loopback sockets.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString

from dit4c.common.keys import jwks
from dit4c.common.tokens import StaticKeySource, TokenSigner, TokenVerifier
from dit4c.listener.service import ListenerService, backoff
from dit4c.routing.front import FrontLimits
from dit4c.routing.server import RoutingServer
from dit4c.tunnel.session import Settings


@dataclass
class Signing:
    """A portal-like signing key, its JWKS on disk, and a way to mint tokens."""

    key: Any
    keyPath: Path
    jwksPath: Path
    signer: TokenSigner
    audience: str = "dit4c-routing"

    def token(self, instance: str, lifetime: float = 120, **claims: Any) -> str:
        """A single-use routing token (a fresh ``jti`` unless ``claims`` has one)."""
        claims.setdefault("jti", secrets.token_urlsafe(16))
        return self.signer.sign(dict(claims, sub=instance), audience=self.audience, lifetime=lifetime)

    def verifier(self) -> TokenVerifier:
        return TokenVerifier(StaticKeySource(jwks(self.key)), audience=self.audience)



@dataclass
class Routing:
    server: RoutingServer
    tunnelPort: int
    httpPort: int
    listeners: list[ListenerService] = field(default_factory=list)

    def tunnelEndpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.tunnelPort}"

    def url(self, instance: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.httpPort}{path}"

    async def listen(
        self,
        token: str | Any,
        target: str,
        *,
        routing: str | None = None,
        settings: Settings | None = None,
        wait: bool = True,
    ) -> ListenerService:
        """Start a listener in this process and wait until it is registered."""
        from twisted.internet import reactor

        tokenSource = token if callable(token) else (lambda: token)
        listener = ListenerService(
            reactor,
            clientFromString(reactor, routing or self.tunnelEndpoint()),
            clientFromString(reactor, target),
            tokenSource,
            settings=settings,
            retryPolicy=backoff(initial=0.05, maximum=0.5),
        )
        listener.startService()
        self.listeners.append(listener)
        if wait:
            await listener.whenRegistered().addTimeout(15, reactor)
        return listener


async def startRouting(
    signing: Signing,
    *,
    settings: Settings | None = None,
    limits: FrontLimits | None = None,
    websocket: bool = False,
) -> Routing:
    from twisted.internet import reactor

    server = RoutingServer(
        reactor, signing.verifier(), "localhost", settings=settings, limits=limits, drainTimeout=2.0
    )
    tunnel = server.addTunnelEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    if websocket:
        server.addTunnelWebSocketEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    public = server.addPublicEndpoint(
        serverFromString(reactor, "tcp:0:interface=127.0.0.1:backlog=4096"), "http"
    )
    server.startService()
    return Routing(server, tunnel.port.getHost().port, public.port.getHost().port)  # type: ignore[union-attr]


async def stopRouting(routing: Routing) -> None:
    for listener in routing.listeners:
        await defer.maybeDeferred(listener.stopService)
    await routing.server.stopService()
