"""
The listener helper: keeps a tunnel open to a routing server and turns each
stream the routing server opens into a connection to the target (the auth
helper, or any local web server), or, where the target runs in this very
process (the pod helper, ``dit4c.podhelper``), hands the stream itself to
the target's protocol: the stream is its transport, so back-pressure and
half-close are the stream's own, with no loopback connection between.

The outbound link is a ``ClientService``: it reconnects with exponential
back-off and jitter; ``whenRegistered`` waits for the WELCOME, so
"registered" means reachable at the public URL.

A tunnel the routing server replaced (``GOAWAY(REPLACED)``: another
listener dialled with a valid token for the same instance) is left to
finish its streams while a new ``ClientService`` dials again: at once the
first time, so the genuine listener wins its name back; then after a
growing back-off while it keeps being replaced, so two listeners of one
instance (a stale duplicate) take turns slowly instead of flapping fast.
Giving up is never right: the other listener may be gone a moment later,
and the instance would answer 404 for good.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
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
    Twisted's exponential back-off (``backoffPolicy``) with jitter in
    proportion: each delay drawn from half to the full figure, so that a
    routing server coming back is not met by every listener at the same
    instant. (``backoffPolicy``'s own jitter adds up to a second whatever
    the delay: too little to spread a 30 s wait, too much for the tenths
    of a second tests wait.)
    """
    nominal = backoffPolicy(initialDelay=initial, maxDelay=maximum, factor=factor, jitter=lambda: 0.0)

    def policy(attempt: int) -> float:
        delay: float = nominal(attempt) * (0.5 + random.random() / 2)
        return delay

    return policy


class Replacements:
    """
    How soon to dial again after the routing server replaced this
    listener's tunnel: at once the first time in a row, then after
    ``policy(1)``, ``policy(2)``, ... A tunnel that held the name for
    ``settled`` seconds before being replaced starts the count again.

    Sans-I/O: it reads the clock and returns delays; the service keeps the
    timers.
    """

    def __init__(self, clock: IReactorTime, policy: Callable[[int], float], *, settled: float) -> None:
        self.clock = clock
        self.policy = policy
        self.settled = settled
        #: Times replaced in a row.
        self.count = 0
        self._registeredAt: float | None = None

    def registered(self) -> None:
        """A tunnel of ours now holds the name."""
        self._registeredAt = self.clock.seconds()

    def replaced(self) -> float:
        """Our tunnel lost the name: the seconds to wait before dialling again."""
        now = self.clock.seconds()
        if self._registeredAt is not None and now - self._registeredAt >= self.settled:
            self.count = 0
        self._registeredAt = None
        self.count += 1
        return 0.0 if self.count == 1 else self.policy(self.count - 1)


class _TunnelFactory(Factory):
    noisy = False

    def __init__(self, listener: ListenerService) -> None:
        self.listener = listener

    def buildProtocol(self, addr: Any) -> TunnelClientProtocol:
        listener = self.listener

        def goneAway(code: int, reason: str) -> None:
            listener.goneAway(tunnel, code, reason)

        tunnel = TunnelClientProtocol(
            listener.settings,
            listener.reactor,
            listener.token,
            listener.streamOpened,
            goneAway,
        )
        tunnel.ready.addCallbacks(
            lambda welcome: listener._registered(tunnel, welcome), listener._refused
        )
        return tunnel


class _TargetFactory(Factory):
    """One connection to the target per stream (quiet: one per request)."""

    noisy = False
    protocol = SpliceProtocol


#: Replaced again and again, a listener waits at most this long to dial again.
REPLACED_MAXIMUM = 60.0


class ListenerService(MultiService):
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        routing: IStreamClientEndpoint,
        target: IStreamClientEndpoint | IProtocolFactory,
        token: Callable[[], str],
        *,
        settings: Settings | None = None,
        retryPolicy: Callable[[int], float] | None = None,
        replacedPolicy: Callable[[int], float] | None = None,
        onRegistered: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        """
        :param target: where each stream goes: an endpoint, dialled once
            per stream and spliced to it; or a protocol factory in this
            process, whose protocol runs on the stream itself.
        :param token: called for every dial; must give a new token each
            time (a routing server refuses one it has seen).
        :param retryPolicy: seconds before the n-th dial in a row that failed
            or was refused.
        :param replacedPolicy: seconds before dialling again after being
            replaced the (n+1)-th time in a row (the first time: at once).
        """
        super().__init__()
        self.reactor = reactor
        self.routing = routing
        self.target = target
        self.token = token
        self.settings = settings or Settings()
        self.onRegistered = onRegistered
        self.welcome: dict[str, Any] | None = None
        #: Why the last attempt to establish the tunnel failed, if it did.
        self.lastError: BaseException | None = None
        self.tunnel: TunnelClientProtocol | None = None
        self._policy = retryPolicy or backoff()
        self.replacements = Replacements(
            reactor,
            replacedPolicy or backoff(initial=0.5, maximum=REPLACED_MAXIMUM),
            settled=2 * REPLACED_MAXIMUM,
        )
        self._refusals = 0
        self._waiting: list[Deferred[TunnelClientProtocol]] = []
        self._redial: IDelayedCall | None = None
        #: The link being kept now; a replaced one is retired once its tunnel closes.
        self.client = self._newClient()
        self.client.setServiceParent(self)

    def _newClient(self) -> ClientService:
        # The handshake is not ClientService's prepareConnection: a connection
        # that prepareConnection rejects and that then closes upsets its
        # machine. A refused handshake is a connection that closes; the back-off
        # counts refusals in a row itself, so a bad token is not retried fast.
        return ClientService(self.routing, _TunnelFactory(self), retryPolicy=self._retryDelay, clock=self.reactor)

    def _retryDelay(self, attempt: int) -> float:
        return self._policy(max(attempt, self._refusals))

    def _registered(self, tunnel: TunnelClientProtocol, welcome: dict[str, Any]) -> None:
        self._refusals = 0
        self.lastError = None
        self.tunnel = tunnel
        self.welcome = welcome
        self.replacements.registered()
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
        if self._redial is not None and self._redial.active():
            self._redial.cancel()
        self._redial = None
        # Say goodbye on the tunnel before ClientService drops it, so the
        # routing server hears why (and a TLS link is not left waiting on
        # its producer).
        tunnel = self.tunnel
        if tunnel is not None and tunnel.session is not None:
            tunnel.session.close(ErrorCode.SHUTDOWN, "listener stopping")
        return super().stopService()

    def goneAway(self, tunnel: TunnelClientProtocol, code: int, reason: str) -> None:
        self.log.info("routing server going away: {code} {reason}", code=codeName(code), reason=reason)
        if code == ErrorCode.REPLACED and tunnel is self.tunnel:
            self._replaced(tunnel)

    def _replaced(self, tunnel: TunnelClientProtocol) -> None:
        """
        Another listener took this instance's name. The replaced tunnel
        finishes its streams on the link that carries it, which is then
        stopped, never redialled; a new link dials after the delay.
        """
        self.tunnel = None
        delay = self.replacements.replaced()
        old = self.client
        # Once the link is down (the next turn: ClientService hears of it
        # after the tunnel does), so stopping it touches no dead transport.
        tunnel.closed.addCallback(lambda _: self.reactor.callLater(0, self._retire, old))
        self.client = self._newClient()
        self.log.warn(
            "another listener took this instance's name ({count} times in a row); dialling again in {delay:.1f} s",
            count=self.replacements.count,
            delay=delay,
        )
        if self._redial is not None and self._redial.active():
            self._redial.cancel()
        self._redial = self.reactor.callLater(delay, self._dialAgain)

    def _dialAgain(self) -> None:
        self._redial = None
        if self.running and self.client.parent is None:
            self.client.setServiceParent(self)

    def _retire(self, client: ClientService) -> None:
        if client.parent is self:
            client.disownServiceParent()

    def streamOpened(self, stream: Stream) -> IProtocol | None:
        """A new public connection: to the target's protocol in this process, or dial the target and splice the two."""
        if IProtocolFactory.providedBy(self.target):
            factory: IProtocolFactory = self.target
            return factory.buildProtocol(stream.getPeer())
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

        endpoint: IStreamClientEndpoint = self.target
        endpoint.connect(_TargetFactory()).addCallbacks(connected, failed)
        return inbound
