"""
The listener without a routing server: the instance published as a Tor
onion service (txtorcon), reachable at ``http://<56 characters>.onion/``
from any Tor client, with no routing server and no open port on the node.

The service is ephemeral (``ADD_ONION``, tied to this helper's control
connection: it ends when the helper stops, and tor never keeps a service
of a stopped instance in its configuration) with a key kept in the pod's
state directory: the first start has tor make the key, which is saved
(mode 0600); a resumed instance hands it back, so it keeps the same
.onion name, the URL the portal recorded and the person bookmarked.
Without a state directory the key is new at every start. A tor that
restarts takes the service with it: the listener publishes it again, on
the same name, as soon as tor answers.

Each connection the onion service brings (tor connects to a port this
helper listens on at 127.0.0.1) goes to the target: spliced to a new
connection to the auth helper, or, where the auth helper runs in this
same process (the pod helper), handed to its protocol factory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from dit4c.common.keys import PrivateKey
from dit4c.listener.activity import ActivityReporter
from dit4c.listener.service import ListenerService, backoff
from dit4c.tunnel.splice import SpliceProtocol

__all__ = ["ONION_KEY_FILE", "OnionActivity", "OnionService", "SpliceFactory", "onionURL"]

#: The onion service's key, in the pod's state directory.
ONION_KEY_FILE = "onion-service.key"
#: The port the service offers (the URL has none: http's own).
ONION_PORT = 80


def onionURL(hostname: str) -> str:
    """The public URL of an onion service named ``hostname`` (``<56 characters>.onion``)."""
    return f"http://{hostname}/"


class _Inbound(SpliceProtocol):
    """A connection from tor: dials the target once connected, and is spliced to it."""

    def __init__(self, factory: SpliceFactory) -> None:
        super().__init__()
        self.factory = factory
        self.target = factory.target

    def dataReceived(self, data: bytes) -> None:
        self.factory.bytesIn += len(data)
        super().dataReceived(data)

    def connectionMade(self) -> None:
        super().connectionMade()
        self.target.connect(Factory.forProtocol(SpliceProtocol)).addCallbacks(self._joined, self._failed)

    def _joined(self, outbound: SpliceProtocol) -> None:
        if self.transport is None or not self.transport.connected:  # type: ignore[attr-defined]
            outbound.transport.loseConnection()
            return
        self.join(outbound)

    def _failed(self, failure: Failure) -> None:
        OnionService.log.info("the target refused a connection: {reason}", reason=failure.getErrorMessage())
        self.transport.loseConnection()


class SpliceFactory(Factory):
    """Each connection spliced to a new one to ``target``; counted, as a tunnel counts its streams."""

    noisy = False

    def __init__(self, target: IStreamClientEndpoint) -> None:
        self.target = target
        #: Connections opened, and the bytes browsers sent on them.
        self.connections = 0
        self.bytesIn = 0

    def buildProtocol(self, addr: Any) -> _Inbound:
        self.connections += 1
        return _Inbound(self)


class OnionService(MultiService):
    """
    Publishes ``target`` as an onion service through the tor at
    ``control`` (its control port: a client endpoint), calls
    ``onPublished`` with the service's URL, and keeps trying (with
    back-off) while tor cannot be reached or refuses.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        control: IStreamClientEndpoint,
        target: IStreamClientEndpoint | IProtocolFactory,
        *,
        keyFile: Path | None = None,
        onPublished: Callable[[str], Any] | None = None,
        retryPolicy: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.control = control
        self.factory: IProtocolFactory = target if IProtocolFactory.providedBy(target) else SpliceFactory(target)
        self.keyFile = keyFile
        self.onPublished = onPublished
        self.retryPolicy = retryPolicy or backoff(initial=1.0, maximum=60.0)
        #: The service's URL, once published.
        self.url: str | None = None
        self._tor: Any = None
        self._onion: Any = None
        #: The service's key, once tor made it (kept in memory where there is no key file).
        self._key: str | None = None
        self._port: IListeningPort | None = None
        self._running: Deferred[None] | None = None
        self._waiting: list[Deferred[str]] = []

    def startService(self) -> None:
        super().startService()
        self._running = Deferred.fromCoroutine(self._keepTrying())
        self._running.addErrback(lambda f: f.trap(CancelledError))

    def whenPublished(self) -> Deferred[str]:
        """The service's URL, now or once it is published."""
        d: Deferred[str] = Deferred()
        if self.url is not None:
            d.callback(self.url)
        else:
            self._waiting.append(d)
        return d

    async def _keepTrying(self) -> None:
        attempt = 0
        while True:
            try:
                await self._publish()
                return
            except CancelledError:
                raise
            except Exception as e:
                await self._close()
                attempt += 1
                delay = self.retryPolicy(attempt)
                self.log.warn(
                    "could not publish the onion service ({why}); again in {delay:.1f} s", why=e or type(e).__name__, delay=delay
                )
                await deferLater(self.reactor, delay, lambda: None)

    async def _publish(self) -> None:
        import txtorcon

        self._port = await serverFromString(self.reactor, "tcp:0:interface=127.0.0.1").listen(self.factory)
        local = self._port.getHost().port  # type: ignore[union-attr]
        self._tor = await txtorcon.connect(self.reactor, self.control)
        key = self._savedKey() or self._key
        self._onion = await self._tor.create_onion_service(
            ports=[(ONION_PORT, f"127.0.0.1:{local}")], private_key=key, version=3, detach=False
        )
        if key is None:
            self._key = self._onion.private_key
            self._saveKey(self._key)
        self.url = onionURL(self._onion.hostname)
        self.log.info("the instance is published as an onion service at {url}", url=self.url)
        tor = self._tor
        tor.protocol.when_disconnected().addBoth(lambda _: self._lost(tor))
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self.url)
        if self.onPublished is not None:
            self.onPublished(self.url)

    def _lost(self, tor: Any) -> None:
        """
        Tor's control connection closed (tor restarted, or stopped): the
        ephemeral service went with it. Published again, on the same name
        (the key is kept), as soon as tor answers again.
        """
        if not self.running or tor is not self._tor:
            return  # stopping, or an old connection
        self.log.warn("the connection to tor's control port closed; publishing the onion service again")
        self._tor = None
        self.url = None
        self._running = Deferred.fromCoroutine(self._again())
        self._running.addErrback(lambda f: f.trap(CancelledError))

    async def _again(self) -> None:
        await self._close()
        await self._keepTrying()

    def _savedKey(self) -> str | None:
        if self.keyFile is None or not self.keyFile.exists():
            return None
        return self.keyFile.read_text().strip() or None

    def _saveKey(self, key: str | None) -> None:
        if self.keyFile is None or not key:
            return
        partial = self.keyFile.with_name(self.keyFile.name + ".new")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(key + "\n")
        partial.replace(self.keyFile)

    async def _close(self) -> None:
        onion, self._onion = self._onion, None
        tor, self._tor = self._tor, None
        port, self._port = self._port, None
        if onion is not None:
            try:
                await onion.remove()
            except Exception as e:  # tor gone already: the service went with it
                self.log.info("could not remove the onion service: {why}", why=e)
        if tor is not None:
            try:
                await tor.quit()
            except Exception as e:  # the connection is gone already
                self.log.info("tor's control connection ended: {why}", why=e)
        if port is not None:
            await maybeDeferred(port.stopListening)

    def stopService(self) -> Deferred[Any]:
        children = super().stopService()
        running, self._running = self._running, None
        if running is not None and not running.called:
            running.cancel()
        self.url = None
        return gatherResults([children, Deferred.fromCoroutine(self._close())])

    def used(self) -> tuple[int, int]:
        """Connections opened and bytes received so far (zeros where the target counts its own: a protocol factory)."""
        if isinstance(self.factory, SpliceFactory):
            return self.factory.connections, self.factory.bytesIn
        return 0, 0


class OnionActivity(ActivityReporter):
    """
    Tells the portal when a browser last used the instance through its
    onion service (docs/protocols.md 8.8), as the tunnel's reporter does:
    new connections or bytes from browsers since the last look are use.
    """

    def __init__(self, reactor: Any, onion: OnionService, portal: str, instance: str, key: PrivateKey, **kwargs: Any) -> None:
        super().__init__(reactor, cast(ListenerService, None), portal, instance, key, **kwargs)
        self.onion = onion
        self._counted = onion.used()

    def used(self) -> bool:
        now = self.onion.used()
        before, self._counted = self._counted, now
        return now != before
