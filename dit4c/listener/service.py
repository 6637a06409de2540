"""
The listener helper: keeps a tunnel open to a routing server and turns each
stream the routing server opens into a connection to the target (the auth
helper, or any local web server).

The outbound link is a ``ClientService``: it reconnects with exponential
back-off and jitter; ``whenRegistered`` waits for the WELCOME, so
"registered" means reachable at the public URL.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from dit4c.tunnel.errors import ErrorCode, codeName
from dit4c.tunnel.protocol import TunnelClientProtocol, TunnelProtocol
from dit4c.tunnel.session import Settings
from dit4c.tunnel.splice import SpliceProtocol
from dit4c.tunnel.stream import Stream


def backoff(initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0) -> Callable[[int], float]:
    """
    Exponential back-off with jitter (each delay drawn from half to the full
    figure), so that a routing server coming back is not met by every
    listener at the same instant.
    """

    def policy(attempt: int) -> float:
        delay = min(initial * factor ** min(attempt, 32), maximum)
        return delay * (0.5 + random.random() / 2)

    return policy


class _TunnelFactory(Factory):
    noisy = False

    def __init__(self, listener: ListenerService) -> None:
        self.listener = listener

    def buildProtocol(self, addr: Any) -> TunnelClientProtocol:
        listener = self.listener
        tunnel = TunnelClientProtocol(
            listener.settings,
            listener.reactor,
            listener.token,
            listener.streamOpened,
            listener.goneAway,
        )
        tunnel.ready.addCallbacks(
            lambda welcome: listener._registered(tunnel, welcome), listener._refused
        )
        return tunnel


class _TargetFactory(Factory):
    """One connection to the target per stream (quiet: one per request)."""

    noisy = False
    protocol = SpliceProtocol


class ListenerService(MultiService):
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        routing: IStreamClientEndpoint,
        target: IStreamClientEndpoint,
        token: Callable[[], str],
        *,
        settings: Settings | None = None,
        retryPolicy: Callable[[int], float] | None = None,
        onRegistered: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.target = target
        self.token = token
        self.settings = settings or Settings()
        self.onRegistered = onRegistered
        self.welcome: dict[str, Any] | None = None
        #: Why the last attempt to establish the tunnel failed, if it did.
        self.lastError: BaseException | None = None
        self.tunnel: TunnelClientProtocol | None = None
        self._policy = retryPolicy or backoff()
        self._refusals = 0
        self._waiting: list[Deferred[TunnelClientProtocol]] = []
        # The handshake is not ClientService's prepareConnection: a connection
        # that prepareConnection rejects and that then closes upsets its
        # machine. A refused handshake is a connection that closes; the back-off
        # counts refusals in a row itself, so a bad token is not retried fast.
        self.client = ClientService(
            routing, _TunnelFactory(self), retryPolicy=self._retryDelay, clock=reactor
        )
        self.client.setServiceParent(self)

    def _retryDelay(self, attempt: int) -> float:
        return self._policy(max(attempt, self._refusals))

    def _registered(self, tunnel: TunnelClientProtocol, welcome: dict[str, Any]) -> None:
        self._refusals = 0
        self.lastError = None
        self.tunnel = tunnel
        self.welcome = welcome
        tunnel.closed.addCallback(self._tunnelClosed)
        self.log.info(
            "tunnel up: instance {instance} at {url}", instance=welcome.get("instance"), url=welcome.get("url")
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(tunnel)
        if self.onRegistered is not None:
            self.onRegistered(welcome)

    def _refused(self, failure: Failure) -> None:
        self._refusals += 1
        self.lastError = failure.value
        self.log.warn("tunnel not established: {reason}", reason=failure.getErrorMessage())

    def _tunnelClosed(self, tunnel: TunnelProtocol) -> None:
        if self.tunnel is tunnel:
            self.tunnel = None

    def whenRegistered(self) -> Deferred[TunnelClientProtocol]:
        """The established tunnel, now or once there is one."""
        if self.tunnel is not None and self.tunnel.session is not None and not self.tunnel.session.closed:
            return succeed(self.tunnel)
        d: Deferred[TunnelClientProtocol] = Deferred()
        self._waiting.append(d)
        return d

    def stopService(self) -> Deferred[Any]:
        # Say goodbye on the tunnel before ClientService drops it, so the
        # routing server hears why (and a TLS link is not left waiting on
        # its producer).
        tunnel = self.tunnel
        if tunnel is not None and tunnel.session is not None:
            tunnel.session.close(ErrorCode.SHUTDOWN, "listener stopping")
        return super().stopService()

    def goneAway(self, code: int, reason: str) -> None:
        self.log.info("routing server going away: {code} {reason}", code=codeName(code), reason=reason)
        if code == ErrorCode.REPLACED:
            # Another listener now holds this instance's name; redialling
            # would only take it back and forth.
            self.log.error("another listener took this instance's name; not reconnecting")
            self.reactor.callLater(0, self.client.stopService)

    def streamOpened(self, stream: Stream) -> IProtocol:
        """A new public connection: dial the target and splice the two."""
        inbound = SpliceProtocol()

        def connected(outbound: SpliceProtocol) -> None:
            if inbound.transport is None or stream.protocol is not inbound:
                outbound.transport.loseConnection()
                return
            inbound.join(outbound)

        def failed(failure: Failure) -> None:
            self.log.info(
                "target refused stream {id}: {reason}", id=stream.id, reason=failure.getErrorMessage()
            )
            stream.reset(ErrorCode.CONNECT_FAILED, failure.getErrorMessage())

        self.target.connect(_TargetFactory()).addCallbacks(connected, failed)
        return inbound
