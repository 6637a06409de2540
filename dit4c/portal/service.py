"""
The portal as a service: open (and migrate) the store, load the signing
keys, then serve the web application on every listen endpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Site

from dit4c.common.service import ListeningService
from dit4c.portal.app import Portal, PortalConfig
from dit4c.portal.keys import KeyRing


class PortalService(MultiService):
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        database: str,
        dataDir: Path,
        config: PortalConfig,
        endpoints: list[Any],
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.database = database
        self.dataDir = Path(dataDir)
        self.config = config
        self.endpoints = endpoints
        self.store: Any = None
        self.portal: Portal | None = None
        self.ready: Deferred[Portal] = Deferred()
        self.ports: list[ListeningService] = []

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self._start())

        def failed(f: Any) -> None:
            self.log.failure("the portal could not start", f)
            if not self.ready.called:
                self.ready.errback(f)
            self.reactor.callLater(0, self.reactor.stop)

        d.addErrback(failed)

    async def _start(self) -> None:
        from dit4c.portal.store import openStore

        self.dataDir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = await openStore(self.database, self.reactor)
        keys = KeyRing(self.dataDir / "keys", issuer=self.config.publicURL, clock=self.reactor)
        self.portal = Portal(self.store, keys, self.config, self.reactor)
        site = Site(self.portal.app.resource())
        site.displayTracebacks = False
        site.timeOut = 60
        for endpoint in self.endpoints:
            service = ListeningService(endpoint, site, "portal")
            service.setServiceParent(self)
            self.ports.append(service)
        self.ready.callback(self.portal)

    async def _stop(self) -> None:
        await MultiService.stopService(self)
        if self.store is not None:
            await self.store.close()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())
