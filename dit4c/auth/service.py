"""The auth helper as a service: its listening port and everything behind it."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint

from dit4c.auth.connections import Connections, Revocations
from dit4c.auth.gate import Sessions
from dit4c.auth.portal import PortalClient
from dit4c.auth.proxy import AuthConfig, AuthProxyFactory
from dit4c.auth.session import FlowCookies, deriveKey
from dit4c.auth.watch import AccessWatch
from dit4c.common.httpfront import FrontLimits
from dit4c.common.keys import loadPrivateKey
from dit4c.common.portalhttp import portalHTTP
from dit4c.common.service import ListeningService
from dit4c.common.tokens import JWKSKeySource, TokenSigner, TokenVerifier

__all__ = ["AuthService", "audienceFor"]


def audienceFor(instance: str) -> str:
    """The audience of the portal's access tokens for ``instance`` (docs/protocols.md 6.4)."""
    return "dit4c-instance:" + instance


class AuthService(MultiService):
    """
    Listen on ``listen`` and guard ``tool`` for ``instance``.

    :param portal: the portal's public URL (browsers are sent there, and it
        is the issuer of access tokens).
    :param portalInternal: where this helper reaches the portal (token,
        userinfo, JWKS): a URL or ``unix:/path``; ``portal`` if empty.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        instance: str,
        keyFile: str,
        portal: str,
        portalInternal: str,
        listen: IStreamServerEndpoint,
        tool: IStreamClientEndpoint,
        recheck: float = 30.0,
        unwatchedRecheck: float = 5.0,
        timeout: float = 10.0,
        limits: FrontLimits | None = None,
        clock: Any = None,
    ) -> None:
        super().__init__()
        clock = clock if clock is not None else reactor
        portal = portal.rstrip("/")
        http, internal = portalHTTP(reactor, (portalInternal or portal).rstrip("/"), timeout=timeout)
        keys = JWKSKeySource(
            internal + "/.well-known/jwks.json", reactor=reactor, timeout=timeout, clock=clock, http_client=http
        )
        verifier = TokenVerifier(keys, audience=audienceFor(instance), issuer=portal, clock=clock)
        signer = TokenSigner(loadPrivateKey(keyFile), clock=clock)
        client = PortalClient(reactor, internal, instance, timeout=timeout, http=http, signer=signer)
        self.sessions = Sessions(verifier, client, clock, recheck=recheck, unwatchedRecheck=unwatchedRecheck)
        #: Every connection that forwards for a session, so that a revoked one is closed.
        self.connections = Connections()
        self.revocations = Revocations(self.sessions, self.connections, clock)
        self.revocations.setServiceParent(self)
        #: The watch at the portal that tells of every access change (docs/protocols.md 6.6).
        self.watch = AccessWatch(client, self.revocations, clock)
        self.watch.setServiceParent(self)
        self.config = AuthConfig(
            instance=instance,
            portal=portal,
            flows=FlowCookies(deriveKey(keyFile, instance, "flow-cookie")),
            sessions=self.sessions,
            portalClient=client,
            verifier=verifier,
            tool=tool,
            clock=clock,
            limits=limits or FrontLimits(),
            connections=self.connections,
        )
        self.listening = ListeningService(listen, AuthProxyFactory(self.config), "auth helper")
        self.listening.setServiceParent(self)

    @property
    def port(self) -> Any:
        """The listening port (once started): ``port.getHost().port`` in tests."""
        return self.listening.port
