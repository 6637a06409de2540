"""
The portal as a service: open (and migrate) the store, load the signing
keys, then serve the web application on every listen endpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from dit4c.common.adminsite import adminSite
from dit4c.common.httpsite import SiteLimits
from dit4c.common.service import ListeningService
from dit4c.portal.app import Portal, PortalConfig
from dit4c.portal.channel import ChannelHub
from dit4c.portal.culling import CULL_INTERVAL, IdleCuller
from dit4c.portal.deadlines import DeadlineWatch
from dit4c.portal.events import InstanceEvents
from dit4c.portal.fileclient import FileClient, fileServerEndpoint, hostKeyFrom
from dit4c.portal.files import filesBodyLimit
from dit4c.portal.http import portalSite
from dit4c.portal.keys import KeyRing, SharedKeys
from dit4c.portal.metrics import PortalMetrics
from dit4c.portal.peers import EventRelay, IPeers, NoPeers
from dit4c.portal.pgpeers import PostgresPeers
from dit4c.portal.store import IStore, openStore
from dit4c.portal.uploads import DEFAULT_UPLOAD_LIMIT, ImageUploads
from dit4c.portal.upstream.config import ProviderConfig

#: Seconds between the scheduler channel's looks at the store for commands
#: when other portal processes tell of theirs: a backstop, not the way they come.
COMMAND_BACKSTOP = 3600.0


def isPostgres(url: str) -> bool:
    return url.partition(":")[0].lower() in ("postgresql", "postgres")


class PortalService(MultiService):
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        database: str,
        dataDir: Path,
        config: PortalConfig,
        endpoints: list[IStreamServerEndpoint],
        channelEndpoints: Sequence[IStreamServerEndpoint] = (),
        loginProviders: Sequence[ProviderConfig] = (),
        imageServerSecret: str | None = None,
        fileServerSecret: str | None = None,
        limits: SiteLimits | None = None,
        metricsEndpoint: IStreamServerEndpoint | None = None,
        imageServer: str | None = None,
        uploadLimit: int = DEFAULT_UPLOAD_LIMIT,
        fileServer: str | None = None,
        fileServerHostKey: str | None = None,
        cullInterval: float = CULL_INTERVAL,
        onionURLs: bool = False,
        routingDomains: tuple[str, ...] = (),
    ) -> None:
        """
        :param reactor: the process's reactor: its clock (``IReactorTime``),
            the store's threads (``IReactorCore``) and the upstream logins'
            connections (``IReactorTCP``). Typed ``Any``: one value that
            provides several interfaces is more than mypy can say.
        """
        super().__init__()
        self.reactor = reactor
        self.database = database
        self.dataDir = Path(dataDir)
        self.config = config
        self.endpoints = endpoints
        #: Where schedulers dial in (the scheduler channel); none by default.
        self.channelEndpoints = list(channelEndpoints)
        #: GitHub / OpenID Connect providers people may log in through.
        self.loginProviders = list(loginProviders)
        self.imageServerSecret = imageServerSecret
        self.fileServerSecret = fileServerSecret
        #: Seconds between the idle culler's looks (dit4c.portal.culling).
        self.cullInterval = cullInterval
        #: Deadlines and limits of the web port's connections (dit4c.portal.http).
        self.limits = limits
        #: Where /metrics and /health are served, if anywhere (dit4c.portal.metrics).
        self.metricsEndpoint = metricsEndpoint
        #: The image server as the portal reaches it, where uploaded saved images go (none: no uploads).
        self.imageServer = imageServer
        #: The largest saved image uploaded as a file, in bytes.
        self.uploadLimit = uploadLimit
        #: The file server (a client endpoint string) and its host key (a line or a file), for the Files page.
        self.fileServer = fileServer
        self.fileServerHostKey = fileServerHostKey
        #: Whether instances may report a .onion URL (their listener publishes an onion service).
        self.onionURLs = onionURLs
        #: The routing servers' domains an instance's URL must be under (none: any domain).
        self.routingDomains = routingDomains
        self.metrics: PortalMetrics | None = None
        #: The scheduler channel (``ChannelHub``), once started.
        self.channels: ChannelHub | None = None
        self.store: IStore | None = None
        #: The other portal processes sharing the database (none on SQLite).
        self.peers: IPeers = NoPeers()
        self.portal: Portal | None = None
        self.ready: Deferred[Portal] = Deferred()
        self.ports: list[ListeningService] = []

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self._start())

        def failed(f: Failure) -> None:
            self.log.failure("the portal could not start", f)
            if not self.ready.called:
                self.ready.errback(f)
            self.reactor.callLater(0, self.reactor.stop)

        d.addErrback(failed)

    async def _start(self) -> None:
        self.dataDir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = await openStore(self.database, self.reactor)
        # The other portal processes on the same database, told at once of
        # what changes here (docs/protocols.md 16); none beside SQLite.
        if isPostgres(self.database):
            peers = PostgresPeers(self.reactor, self.database)
            peers.setServiceParent(self)
            await peers.listening
            self.peers = peers
        keys = KeyRing(self.dataDir / "keys", issuer=self.config.publicURL, clock=self.reactor)
        await SharedKeys(keys, self.store, self.peers).publish()
        # The one bus: what schedulers report and deadlines that pass reach
        # the pages' live streams, the helpers' watches and the key directory
        # there, and the other portal processes hear of it.
        events = InstanceEvents()
        EventRelay(events, self.peers, self.store)
        self.channels = ChannelHub(
            self.reactor, self.store, issuer=self.config.publicURL, events=events, peers=self.peers,
            # What the others store for a scheduler here, they tell: the poll is a backstop.
            pollInterval=COMMAND_BACKSTOP if not self.peers.alone else 30.0,
        )  # fmt: skip
        for endpoint in self.channelEndpoints:
            self.channels.listen(endpoint)
        self.channels.setServiceParent(self)
        self.portal = portal = Portal(self.store, keys, self.config, self.reactor, commands=self.channels, events=events)
        # Back after the link to the others was lost: changes told meanwhile
        # were missed, so the pages' browsers come back for a fresh snapshot.
        self.peers.onJoined(lambda: portal.streams.closeAll("the portal lost news of changes for a moment"))
        # A saved image's read token is made as its start command is sent, never stored.
        self.channels.paramsToSend = portal.instances.paramsToSend
        # Instances stuck in a transient state (their node or scheduler away) are errored.
        DeadlineWatch(self.reactor, self.store, events=events).setServiceParent(self)
        # Instances unused past their catalogue entry's idle limit are stopped or saved.
        self.culler = IdleCuller(self.store, portal.instances, self.reactor, interval=self.cullInterval)
        self.culler.setServiceParent(self)
        # Schedulers may also dial the portal's own web port (wss://.../.dit4c/channel).
        self.portal.channelResource = self.channels.resource()
        self.portal.reports.setImageServerSecret(self.imageServerSecret)
        self.portal.reports.setFileServerSecret(self.fileServerSecret)
        self.portal.reports.onionURLs = self.onionURLs
        if self.routingDomains:
            self.portal.reports.instanceDomains = tuple(d.lower().strip(".") for d in self.routingDomains)
        if self.loginProviders:
            from treq.client import HTTPClient
            from twisted.web.client import Agent

            from dit4c.portal.upstream import LoginDoors, UpstreamLogin

            doors = LoginDoors(
                store=portal.store,
                cookies=portal.cookies,
                throttle=portal.throttle,
                proxies=portal.proxies,
                config=portal.config,
                clock=portal.clock,
                loggedIn=portal.sessions.loggedIn,
                render=portal.pages.render,
            )
            portal.upstream = UpstreamLogin(
                doors, self.loginProviders, HTTPClient(Agent(self.reactor))
            )
        if self.metricsEndpoint is not None:
            self.metrics = PortalMetrics(
                portal.store, events, self.reactor,
                schedulers=lambda: len(self.channels.connectedSchedulers()) if self.channels else 0,
                streams=portal.streams.count,
                following=lambda: sum(portal.api.following.values()),
            )  # fmt: skip
            self.metrics.setServiceParent(self)
            people = self.metrics
            ListeningService(
                self.metricsEndpoint, adminSite(people, lambda: {"people": people.people}), "portal metrics"
            ).setServiceParent(self)
        if self.imageServer is not None:
            portal.api.uploads = ImageUploads(portal.store, keys, self.reactor, self.imageServer, limit=self.uploadLimit)
        if self.fileServer is not None and self.fileServerHostKey is not None:
            hostKey = hostKeyFrom(self.fileServerHostKey)
            portal.files.client = FileClient(self.reactor, fileServerEndpoint(self.fileServer), hostKey, keys)
        site = portalSite(self.portal.app.resource(), self.reactor, self.limits, portal.api.uploads)
        site.bodyLimit = filesBodyLimit(site.bodyLimit)  # files uploaded on the Files page
        for endpoint in self.endpoints:
            service = ListeningService(endpoint, site, "portal")
            service.setServiceParent(self)
            self.ports.append(service)
        self.ready.callback(self.portal)

    async def _stop(self) -> None:
        if self.portal is not None:
            # Before the store closes under their checks.
            self.portal.streams.closeAll("the portal is stopping")
        await MultiService.stopService(self)
        if self.store is not None:
            await self.store.close()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())
