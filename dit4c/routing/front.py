"""
The routing server's public side: one front connection
(:mod:`dit4c.common.frontconn`) per browser connection, with the routing
server's rules (:class:`RoutingRules`).

Each connection is routed by its first request's host name and becomes one
tunnel stream; the listener turns that stream into one connection to its
target, so keep-alive and pipelining work end to end. Every request head is
parsed so that forwarding headers are set again on each (the routing server
says who the client is) and bodies re-framed exactly as parsed; responses
pass back untouched. The connection becomes a plain pipe only once the
instance answered ``101`` to a request that asked to switch protocols (a
WebSocket). The rules are in docs/protocols.md section 3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from dit4c.common.errors import HeadError
from dit4c.common.frontconn import (
    Forward,
    FrontMetrics,
    FrontProtocol,
    IFrontRules,
    UpstreamProtocol,
)
from dit4c.common.httpfront import FrontLimits, RequestHead, errorPage
from dit4c.tunnel.errors import ErrorCode, StreamReset, TunnelError

if TYPE_CHECKING:
    from dit4c.tunnel.session import Session

__all__ = ["FrontLimits", "Metrics", "PublicHTTPFactory", "Resolver", "RoutingRules"]

#: Headers a client may not set: the routing server says who the client is.
_DROP = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"))

#: The counters the admin endpoint shows (the front's own).
Metrics = FrontMetrics

#: host name (lower case, no port) → the session of the tunnel that owns it.
Resolver = Callable[[str], "Session | None"]


@implementer(IFrontRules)
class RoutingRules:
    """
    One public connection's rules: the first request's host name chooses
    the tunnel, every later request must name the same host, and each one
    goes on with ``X-Forwarded-*`` set from what the routing server saw.
    """

    __slots__ = ("resolve", "scheme", "transport", "sniHost", "clientIP", "host", "session")

    def __init__(
        self, resolve: Resolver, scheme: bytes, transport: Any, sniHost: Callable[[Any], str | None] | None
    ) -> None:
        self.resolve = resolve
        self.scheme = scheme
        self.transport = transport
        self.sniHost = sniHost
        self.clientIP = str(getattr(transport.getPeer(), "host", "")).encode()
        self.host: str | None = None
        self.session: Session | None = None

    def check(self, head: RequestHead) -> Forward:
        host = head.host
        if self.sniHost is not None:
            sni = self.sniHost(self.transport)
            if sni is not None and sni != host:
                raise HeadError(421, "Misdirected Request", "The Host header does not match TLS SNI.", "misdirected")
        if self.session is None:
            session = self.resolve(host)
            if session is None:
                raise HeadError(404, "Not Found", f"There is no instance at {host}.", "unknown_host")
            self.session, self.host = session, host
        elif host != self.host:
            raise HeadError(421, "Misdirected Request", "One connection serves one host name.", "misdirected")
        return Forward(
            head.rebuilt(
                _DROP,
                (
                    b"X-Forwarded-For: ", self.clientIP,
                    b"\r\nX-Forwarded-Proto: ", self.scheme,
                    b"\r\nX-Forwarded-Host: ", head.hostHeader or b"",
                    b"\r\n",
                ),
            )
        )  # fmt: skip

    def connect(self, protocol: UpstreamProtocol) -> None:
        """One tunnel stream per connection (its protocol is connected at once)."""
        assert self.session is not None
        peer = self.transport.getPeer()
        metadata = {
            "peer": f"{getattr(peer, 'host', '')}:{getattr(peer, 'port', '')}",
            "scheme": self.scheme.decode(),
            "host": self.host,
        }
        try:
            self.session.openStream(protocol, metadata)
        except TunnelError as e:
            raise HeadError(
                502, "Bad Gateway", f"The instance cannot take connections now ({e}).", "tunnel_unavailable"
            ) from None
        return None

    def page(self, status: int, title: str, message: str) -> bytes:
        return errorPage(status, title, message)

    def unanswered(self, reason: Failure | None) -> bytes:
        error = reason.value if reason is not None else None
        if isinstance(error, StreamReset) and error.code != ErrorCode.CONNECT_FAILED:
            message = "The instance's tunnel went away."
        else:
            message = "The tool is not answering."
        return errorPage(502, "Bad Gateway", message)

    def cut(self, reason: Failure | None) -> bool:
        return reason is not None and isinstance(reason.value, StreamReset)

    def ended(self) -> None:
        pass


class PublicHTTPFactory(Factory):
    noisy = False

    def __init__(
        self,
        resolve: Resolver,
        scheme: str,
        clock: IReactorTime,
        limits: FrontLimits | None = None,
        metrics: FrontMetrics | None = None,
        sniHost: Callable[[Any], str | None] | None = None,
    ) -> None:
        self.resolve = resolve
        self.scheme = scheme.encode()
        self.clock = clock
        self.limits = limits or FrontLimits()
        self.metrics = metrics or FrontMetrics()
        self.sniHost = sniHost

    def rulesFor(self, transport: Any) -> RoutingRules:
        return RoutingRules(self.resolve, self.scheme, transport, self.sniHost)

    def buildProtocol(self, addr: Any) -> Protocol:
        cap = self.limits.maxConnections
        if cap is not None and self.metrics.open >= cap:
            # At the cap, not at the open-file limit: the descriptors left
            # are the tunnels', so instances keep registering and the one
            # turned away is told why.
            self.metrics.error("too_many_connections")
            return _TooBusy()
        return FrontProtocol(self.rulesFor, self.clock, self.limits, self.metrics)


#: Seconds a browser turned away at the connection cap is asked to wait.
BUSY_RETRY = 5


class _TooBusy(Protocol):
    """A connection over the cap: a 503 at once, then closed."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(
            errorPage(
                503, "Service Unavailable",
                "This routing server holds as many connections as it may. Try again in a moment.",
                headers=b"Retry-After: %d\r\n" % BUSY_RETRY,
            )
        )  # fmt: skip
        self.transport.loseConnection()
