"""
One process for all of a pod's helpers: the existing services, composed.

- The auth helper (:class:`~dit4c.auth.service.AuthService`) in front of
  the tool; it also listens on ``DIT4C_AUTH_LISTEN`` (the node's check that
  the pod answers, and local access).
- The listener (:class:`~dit4c.listener.service.ListenerService`), whose
  target is the auth proxy's factory itself: each stream the routing server
  opens becomes an auth proxy protocol running on the stream as its
  transport. No loopback connection, no second copy of each byte; the
  stream's flow control is the proxy's back-pressure, per stream.
  Or, where the node gives a tor's control port (``DIT4C_ONION``), the
  instance published as a Tor onion service
  (:class:`~dit4c.listener.onion.OnionService`) with the same target: tor's
  connections to the service's local port are the auth proxy's, counted on
  the way in for the idle limit (:class:`CountedOnionService`).
- The storage helper (:class:`~dit4c.storage.helper.SSHFSMount`), when the
  node has a file server, held by :class:`StorageAfterTool`: on stop the
  person's files stay mounted until the tool has ended, so that nothing the
  tool still writes is lost, and only then unmounted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from dit4c.auth.service import AuthService
from dit4c.common.helperenv import HelperEnvironment
from dit4c.common.keys import PrivateKey
from dit4c.listener.onion import ONION_KEY_FILE, OnionService
from dit4c.listener.service import ListenerService

__all__ = ["CountedOnionService", "PodHelperService", "StorageAfterTool", "instanceListener", "onionListener"]

#: Seconds the storage stays mounted after a stop, waiting for the tool to end.
HOLD = 30.0


def instanceListener(reactor: Any, helper: HelperEnvironment, key: PrivateKey, target: Any) -> ListenerService:
    """
    The listener of an instance a node runs: a fresh routing token signed
    with the instance key for every dial (the ``instance:<id>`` kid the
    portal publishes), to the nearest of the routing servers, and the public
    URL reported to the portal after every (re)connect, and its use
    (:class:`~dit4c.listener.activity.ActivityReporter`) once a minute while
    a browser uses it.
    """
    from twisted.internet.endpoints import clientFromString

    from dit4c.listener.activity import ActivityReporter
    from dit4c.listener.nearest import NearestEndpoint
    from dit4c.listener.report import URLReporter, routingToken

    reporter = URLReporter(reactor, helper.portalBase, helper.instance, key)

    def registered(welcome: dict[str, Any]) -> None:
        if welcome.get("url"):
            reporter.report(welcome["url"])

    listener = ListenerService(
        reactor,
        NearestEndpoint(reactor, [(d, clientFromString(reactor, d)) for d in helper.routing]),
        target,
        routingToken(key, helper.instance, audience=helper.routingAudience, clock=reactor),
        onRegistered=registered,
    )
    # Whether anyone uses the instance, for the portal's idle limit.
    ActivityReporter(reactor, listener, helper.portalBase, helper.instance, key).setServiceParent(listener)
    return listener


class _Counted(ProtocolWrapper):
    """A connection from tor, handed to the wrapped protocol; the bytes a browser sends counted."""

    factory: CountingFactory

    def dataReceived(self, data: bytes) -> None:
        self.factory.bytesIn += len(data)
        super().dataReceived(data)


class CountingFactory(WrappingFactory):
    """``wrappedFactory``'s connections, counted as they open, and the bytes they bring."""

    protocol = _Counted
    noisy = False

    def __init__(self, wrappedFactory: IProtocolFactory) -> None:
        super().__init__(wrappedFactory)
        self.connections = 0
        self.bytesIn = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)


class CountedOnionService(OnionService):
    """
    An onion service whose target is a protocol factory in this process
    (the auth proxy's), counted where tor's connections come in.

    :meth:`OnionService.used` counts only what it splices to an endpoint; a
    factory in the same process is handed the connection as it is, so the
    count is kept here, at the service's own listening side, by wrapping the
    factory (:class:`CountingFactory`): the simplest place that sees every
    connection and every byte a browser sends, without the auth proxy
    having to count anything itself. The activity reporter
    (:class:`~dit4c.listener.onion.OnionActivity`) reads :meth:`used`.
    """

    def __init__(self, reactor: Any, control: IStreamClientEndpoint, target: IProtocolFactory, **kwargs: Any) -> None:
        self.counted = CountingFactory(target)
        super().__init__(reactor, control, self.counted, **kwargs)

    def used(self) -> tuple[int, int]:
        """Connections opened and bytes received through the service so far."""
        return self.counted.connections, self.counted.bytesIn


def onionListener(reactor: Any, helper: HelperEnvironment, key: PrivateKey, target: IProtocolFactory) -> OnionService:
    """
    The instance published as an onion service through the tor at
    ``helper.onion`` (instead of a routing server): its key kept in the
    pod's state directory under the name the listener uses
    (:data:`~dit4c.listener.onion.ONION_KEY_FILE`), so a resumed instance
    keeps its .onion name; its URL reported to the portal as a routing URL
    is (:class:`~dit4c.listener.report.URLReporter`), and its use
    (:class:`~dit4c.listener.onion.OnionActivity`) once a minute while a
    browser uses it.
    """
    from twisted.internet.endpoints import clientFromString

    from dit4c.listener.onion import OnionActivity
    from dit4c.listener.report import URLReporter

    assert helper.onion is not None
    keyFile = None
    if helper.stateDir:
        # Nobody else makes it; the node's user alone enters the pod's directory.
        Path(helper.stateDir).mkdir(mode=0o700, parents=True, exist_ok=True)
        keyFile = Path(helper.stateDir) / ONION_KEY_FILE
    onion = CountedOnionService(
        reactor,
        clientFromString(reactor, helper.onion),
        target,
        keyFile=keyFile,
        onPublished=URLReporter(reactor, helper.portalBase, helper.instance, key).report,
    )
    OnionActivity(reactor, onion, helper.portalBase, helper.instance, key).setServiceParent(onion)
    return onion


class StorageAfterTool(Service):
    """
    The storage service, whose stop waits for the tool to end (at most
    ``hold`` seconds): the tool is found by its pid file (pid and start
    time, as the node wrote it: :class:`~dit4c.node.processes.PodProcess`),
    so an unrelated process given the same pid later is not waited for.
    """

    log = Logger()

    def __init__(self, reactor: Any, storage: IService, toolPidFile: Path | None, hold: float = HOLD) -> None:
        self.reactor = reactor
        self.storage = storage
        self.toolPidFile = toolPidFile
        self.hold = hold

    def startService(self) -> None:
        super().startService()
        self.storage.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.toolPidFile is not None:
            await self._toolEnded(self.toolPidFile)
        await maybeDeferred(self.storage.stopService)

    def _toolEnded(self, pidFile: Path) -> Deferred[None]:
        from dit4c.node.processes import PodProcess

        tool = PodProcess(self.reactor, pidFile.stem, pidFile.parent, pollInterval=0.1)
        ended: Deferred[None] = Deferred()
        if not tool.adopt():
            ended.callback(None)
            return ended
        self.log.info("keeping the storage mounted until the tool has ended")

        def done(*_: object) -> None:
            if not ended.called:
                if timer.active():
                    timer.cancel()
                tool.forget()
                ended.callback(None)

        def expired() -> None:
            self.log.warn("the tool still runs after {hold} s: unmounting the storage anyway", hold=self.hold)
            done()

        timer = self.reactor.callLater(self.hold, expired)
        tool.onExit(done)
        return ended


class PodHelperService(MultiService):
    """
    A pod's helpers: ``auth``, and ``listener`` (if given routing servers
    or a tor: a :class:`ListenerService` or an :class:`OnionService`) and ``storage`` (if given one) beside it. Started storage first (the
    tool waits for its mount); stopped all at once, the storage last of all
    (see :class:`StorageAfterTool`).
    """

    def __init__(
        self, auth: AuthService, listener: ListenerService | OnionService | None, storage: StorageAfterTool | None
    ) -> None:
        super().__init__()
        self.auth = auth
        self.listener = listener
        self.storage = storage
        for service in (storage, auth, listener):
            if service is not None:
                service.setServiceParent(self)
