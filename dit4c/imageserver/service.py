"""The image server as a service: its storage, its question to the portal, its listening ports, its figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger

from dit4c.common.adminsite import adminSite
from dit4c.common.service import ListeningService
from dit4c.imageserver.metrics import ImageServerMetrics
from dit4c.imageserver.portal import PortalGate
from dit4c.imageserver.storage import DirectoryStorage, IImageStorage
from dit4c.imageserver.web import DEFAULT_MAX_SIZE, ImageServer, ImageSite

__all__ = ["ImageServerService"]


class ImageServerService(MultiService):
    """
    Serve ``storage`` (a :class:`DirectoryStorage` of ``dataDir`` unless
    given) on ``endpoints``, asking the portal at ``portal`` (an http(s) URL
    or ``unix:/path``) about every request, with ``secret``.

    :param publicURL: the base URL clients use; None: ``http://<host>:<port>``
        of the first endpoint, as bound.
    :param idleTimeout: seconds a connection may send nothing (a request's
        head included) before it is closed.
    :param metricsEndpoint: where to serve Prometheus ``/metrics`` and
        ``/health`` (:mod:`dit4c.imageserver.metrics`), if anywhere; the
        figures are counted either way (``self.metrics``).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        endpoints: Sequence[IStreamServerEndpoint],
        portal: str,
        secret: str,
        dataDir: str | Path | None = None,
        storage: IImageStorage | None = None,
        publicURL: str | None = None,
        maxSize: int = DEFAULT_MAX_SIZE,
        portalTimeout: float = 10.0,
        idleTimeout: float = 60.0,
        metricsEndpoint: IStreamServerEndpoint | None = None,
    ) -> None:
        super().__init__()
        if storage is None:
            if dataDir is None:
                raise ValueError("give dataDir or storage")
            storage = DirectoryStorage(dataDir)
        self.storage = storage
        self.gate = PortalGate(reactor, portal, secret, timeout=portalTimeout)
        self.metrics = ImageServerMetrics()
        self.server = ImageServer(reactor, storage, self.gate, publicURL=publicURL, maxSize=maxSize, metrics=self.metrics)
        self.site = ImageSite(self.server, timeout=idleTimeout)
        self.listeners = [ListeningService(endpoint, self.site, "image server") for endpoint in endpoints]
        for listener in self.listeners:
            listener.setServiceParent(self)
        #: Serving /metrics and /health, if asked to (never on the public ports).
        self.metricsListener: ListeningService | None = None
        if metricsEndpoint is not None:
            self.metricsListener = ListeningService(
                metricsEndpoint, adminSite(self.metrics, dict), "image server metrics"
            )
            self.metricsListener.setServiceParent(self)

    def startService(self) -> None:
        # The directory storage is ready when this returns; a remote one
        # checks its store meanwhile and logs what it finds.
        self.storage.prepare().addErrback(lambda f: self.log.failure("preparing the image storage failed", f))
        super().startService()
        if self.server.publicURL is None and self.listeners and self.listeners[0].port is not None:
            address = self.listeners[0].port.getHost()
            if not isinstance(address, (IPv4Address, IPv6Address)):
                self.log.warn("no --public-url, and none follows from {address}: answers name relative URLs", address=address)
                return
            host = address.host
            if host in ("0.0.0.0", "::", ""):
                host = "127.0.0.1"
            elif ":" in host:
                host = f"[{host}]"
            self.server.publicURL = f"http://{host}:{address.port}"

    def stopService(self) -> Deferred[None]:
        d: Deferred[Any] = maybeDeferred(super().stopService)

        def closeStorage(result: Any) -> Deferred[Any]:
            return self.storage.close().addCallback(lambda _: result)

        return d.addBoth(closeStorage)
