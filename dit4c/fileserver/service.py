"""The file server as a service: its SSH server on each listen endpoint, its figures on their own."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger

from dit4c.common.adminsite import adminSite
from dit4c.common.portalhttp import portalHTTP
from dit4c.common.service import ListeningService
from dit4c.common.tokens import JWKSKeySource
from dit4c.fileserver.access import InstanceKeyChecker, PortalAsker
from dit4c.fileserver.metrics import FileServerMetrics
from dit4c.fileserver.personlogin import PortalTokenChecker
from dit4c.fileserver.server import FileServerFactory
from dit4c.fileserver.sftp import MAX_HANDLES

__all__ = ["FileServerService"]


class FileServerService(MultiService):
    """
    Serve each person's storage under ``dataDir`` on ``endpoints``, with
    instances' keys from the portal's JWKS and the portal's answer (asked
    with ``secret``) about whose storage an instance reaches.

    :param portal: the portal as this server reaches it: an http(s) URL or
        ``unix:/path``.
    :param metricsEndpoint: where to serve ``/metrics`` (Prometheus) and
        ``/health``, if anywhere; the figures are counted either way
        (``self.metrics``).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        endpoints: Sequence[IStreamServerEndpoint],
        dataDir: str | Path,
        portal: str,
        secret: str,
        maxConnections: int = 100,
        idleTimeout: float = 300.0,
        loginTimeout: float = 30.0,
        portalTimeout: float = 10.0,
        accessCache: float = 30.0,
        maxHandles: int = MAX_HANDLES,
        clock: Any = None,
        metricsEndpoint: IStreamServerEndpoint | None = None,
    ) -> None:
        super().__init__()
        self.metrics = FileServerMetrics()
        clock = clock if clock is not None else reactor
        http, base = portalHTTP(reactor, portal, timeout=portalTimeout)
        # An instance's key is published as it starts: an unknown kid is
        # looked for again after a second; known keys are refreshed as often
        # as the portal lets the JWKS be cached.
        self.keys = JWKSKeySource(
            base + "/.well-known/jwks.json", reactor=reactor, http_client=http, refresh=10.0,
            min_refetch=1.0, timeout=portalTimeout, clock=clock,
        )  # fmt: skip
        self.asker = PortalAsker(reactor, portal, secret, timeout=portalTimeout)
        checker = InstanceKeyChecker(self.keys, self.asker, clock, cacheFor=accessCache, metrics=self.metrics)
        self.factory = FileServerFactory(
            clock, Path(dataDir), checker, maxConnections=maxConnections, idleTimeout=idleTimeout,
            loginTimeout=loginTimeout, maxHandles=maxHandles, metrics=self.metrics,
            # The portal's Files page logs in for a person with a token it signs (docs/protocols.md 13.6).
            personChecker=PortalTokenChecker(self.keys, clock, metrics=self.metrics),
        )  # fmt: skip
        self.listeners = [ListeningService(endpoint, self.factory, "file server (SFTP)") for endpoint in endpoints]
        for listener in self.listeners:
            listener.setServiceParent(self)
        #: The /metrics and /health port, if asked for (announced as "file server metrics").
        self.metricsListener: ListeningService | None = None
        if metricsEndpoint is not None:
            self.metricsListener = ListeningService(
                metricsEndpoint, adminSite(self.metrics, self.metrics.health), "file server metrics"
            )
            self.metricsListener.setServiceParent(self)

    @property
    def hostKeyLine(self) -> str:
        """The host key as an OpenSSH public key line: what storage helpers pin."""
        return str(self.factory.hostKey.public().toString("openssh").decode("ascii"))
