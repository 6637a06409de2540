"""
The routing server as one service: tunnel ports, public ports, admin port,
and what ties them together (the registry and the token check).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger

from dit4c.common.errors import InvalidToken
from dit4c.common.service import ListeningService
from dit4c.common.tokens import (
    ROUTING_MAX_LIFETIME,
    TokenVerifier,
    checkInstanceID,
    checkLifetime,
    checkTokenID,
)
from dit4c.routing.errors import ReplayedToken
from dit4c.routing.front import FrontLimits, Metrics, PublicHTTPFactory
from dit4c.routing.registry import TunnelRegistry
from dit4c.routing.replay import SeenTokens
from dit4c.tunnel.errors import ErrorCode, HandshakeRefused
from dit4c.tunnel.protocol import TunnelServerFactory, TunnelServerProtocol
from dit4c.tunnel.session import Settings


class RoutingServer(MultiService):
    """
    Owns the registry of tunnels and answers the two questions the tunnel
    and public sides ask: may this token open a tunnel (and under which host
    name), and which tunnel owns this host name.

    A token opens one tunnel only: it must carry a ``jti``, live at most
    ``maxTokenLifetime`` seconds, and not have been used before (``seen``),
    so a copied token cannot take a name from the listener that holds it.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        verifier: TokenVerifier,
        domain: str,
        *,
        settings: Settings | None = None,
        limits: FrontLimits | None = None,
        publicURL: str | None = None,
        drainTimeout: float = 10.0,
        maxTokenLifetime: float = ROUTING_MAX_LIFETIME,
        seen: SeenTokens | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.verifier = verifier
        self.maxTokenLifetime = maxTokenLifetime
        #: The ids of the tokens already accepted.
        self.seen = seen if seen is not None else SeenTokens(reactor)
        self.registry = TunnelRegistry(domain)
        self.settings = settings or Settings()
        self.limits = limits or FrontLimits()
        self.metrics = Metrics()
        self.publicURL = publicURL
        self.drainTimeout = drainTimeout
        self.tunnelFactory = TunnelServerFactory(
            self.settings, reactor, self.authenticate, self.established
        )
        self.tunnelPorts: list[ListeningService] = []
        self.publicPorts: list[tuple[str, ListeningService]] = []

    # -- configuration ----------------------------------------------------------

    def addTunnelEndpoint(self, endpoint: Any, description: str = "tunnel") -> ListeningService:
        service = ListeningService(endpoint, self.tunnelFactory, description)
        service.setServiceParent(self)
        self.tunnelPorts.append(service)
        return service

    def addTunnelWebSocketEndpoint(self, endpoint: Any) -> ListeningService:
        from dit4c.tunnel.websocket import tunnelWebSocketFactory

        service = ListeningService(
            endpoint, tunnelWebSocketFactory(self.tunnelFactory), "tunnel (WebSocket)"
        )
        service.setServiceParent(self)
        self.tunnelPorts.append(service)
        return service

    def addPublicEndpoint(self, endpoint: Any, scheme: str) -> ListeningService:
        sni = _sniHost if scheme == "https" else None
        factory = PublicHTTPFactory(
            self.registry.resolve, scheme, self.clock, self.limits, self.metrics, sni
        )
        service = ListeningService(endpoint, factory, f"public {scheme}")
        service.setServiceParent(self)
        self.publicPorts.append((scheme, service))
        return service

    # -- tunnels ---------------------------------------------------------------

    def urlFor(self, host: str) -> str:
        if self.publicURL:
            return self.publicURL.format(host=host)
        for wanted in ("https", "http"):
            for scheme, service in self.publicPorts:
                if scheme == wanted and service.port is not None:
                    port = service.port.getHost().port  # type: ignore[attr-defined]
                    default = 443 if scheme == "https" else 80
                    return f"{scheme}://{host}/" if port == default else f"{scheme}://{host}:{port}/"
        return f"http://{host}/"

    async def authenticate(self, token: str, tunnel: TunnelServerProtocol) -> dict[str, Any]:
        """
        The registration for a HELLO's token, or :class:`HandshakeRefused`
        (sent as ``GOAWAY(AUTH_FAILED)``). The id is spent last, once all
        else holds, so a token refused for another reason is not used up.
        Nothing here touches the registry: a refused token costs the
        tunnel that holds the name nothing.
        """
        instance = None
        try:
            claims = await self.verifier.verify(token)
            instance = checkInstanceID(claims.get("sub"))
            jti = checkTokenID(claims)
            checkLifetime(claims, self.maxTokenLifetime)
            self.seen.spend(instance, jti, claims["exp"] + self.verifier.leeway)
        except ReplayedToken as e:
            self.metrics.error("tunnel_auth")
            self.metrics.error("tunnel_replay")
            self.log.warn(
                "a used token for {instance} came again from {peer}; refused",
                instance=instance,
                peer=tunnel.transport.getPeer(),
            )
            raise HandshakeRefused(e.reason) from None
        except InvalidToken as e:
            self.metrics.error("tunnel_auth")
            raise HandshakeRefused(e.reason) from None
        host = self.registry.hostFor(instance)
        return {"instance": instance, "host": host, "url": self.urlFor(host)}

    def established(self, tunnel: TunnelServerProtocol) -> None:
        self.registry.add(tunnel.registration["instance"], tunnel)

    # -- shutting down ---------------------------------------------------------

    def stopService(self) -> Deferred[Any]:
        """
        Stop taking public connections, ask every tunnel to go away (running
        streams may finish, within ``drainTimeout``), then stop the rest.
        """
        self.running = False
        for _, service in self.publicPorts:
            service.stopService()
        tunnels = self.registry.tunnels()
        for tunnel in tunnels:
            if tunnel.session is not None:
                tunnel.session.goAway(ErrorCode.SHUTDOWN, "routing server stopping")
        waiting = DeferredList([t.closed for t in tunnels])

        def cutOff() -> None:
            for tunnel in tunnels:
                if tunnel.transport is not None and tunnel.session is not None and not tunnel.session.closed:
                    tunnel.session.close(ErrorCode.SHUTDOWN, "routing server stopped", abort=True)

        timer = self.clock.callLater(self.drainTimeout, cutOff)

        def done(_: Any) -> Deferred[Any]:
            if timer.active():
                timer.cancel()
            return MultiService.stopService(self)

        return waiting.addBoth(done)


def _sniHost(transport: Any) -> str | None:
    try:
        name = transport.getHandle().get_servername()
    except Exception:
        return None
    return name.decode("ascii").lower().rstrip(".") if name else None


__all__ = ["RoutingServer", "IReactorCore"]
