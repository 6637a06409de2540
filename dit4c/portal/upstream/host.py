"""
What the upstream login uses of the portal it is mounted in, and nothing
more (``LoginHost``): the people and sessions of its store, its cookie
policy, its login throttle, who sent a request, its public URL and session
lifetime, its clock, who is logged in already and its error page (the
doors every room has: ``dit4c.portal.interfaces.SessionLookup`` and
``PageRenderer``).

``LoginHost`` is a structural ``Protocol`` rather than a zope
``Interface``: the portal (``dit4c.portal.app.Portal``) has these members
already and need not declare them, and the portal's service hands the
login a ``LoginDoors`` that holds only them, so the login cannot come to
depend on anything else of the portal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from dit4c.portal.interfaces import PageRenderer, SessionLookup
from dit4c.portal.sessions import LoggedIn
from dit4c.portal.store.model import Identity, Session, User

__all__ = [
    "ClientAddresses",
    "Cookies",
    "LoginDoors",
    "LoginHost",
    "People",
    "Renderer",
    "SessionSettings",
    "Throttle",
]


class People(Protocol):
    """
    The store's people and sessions, as far as a login goes: the part of
    ``IPeople`` and ``ISessions`` it uses (any ``IStore`` fits, as mypy
    checks against those interfaces).
    """

    def userByIdentity(self, provider: str, subject: str) -> Deferred[User | None]: ...

    def userByName(self, name: str) -> Deferred[User | None]: ...

    def createUser(
        self, name: str, *, email: str | None = None, display_name: str | None = None
    ) -> Deferred[User]: ...

    def linkIdentity(self, user_id: str, provider: str, subject: str) -> Deferred[Identity]: ...

    def updateUser(self, user_id: str, *, disabled: bool) -> Deferred[User]: ...

    def createSession(self, user_id: str, lifetime: float) -> Deferred[Session]: ...

    def deleteSession(self, token: str) -> Deferred[None]: ...


class Cookies(Protocol):
    """How the portal names, sets and reads its cookies (``security.CookiePolicy``)."""

    def get(self, request: IRequest, base: bytes) -> bytes | None: ...

    def set(self, request: IRequest, base: bytes, value: str, *, maxAge: float | None) -> None: ...

    def clear(self, request: IRequest, base: bytes) -> None: ...


class Throttle(Protocol):
    """Failed logins slow down their address (``security.LoginThrottle``)."""

    async def claim(self, name: str | None, address: str) -> float: ...

    async def succeeded(self, name: str | None, address: str) -> None: ...


class ClientAddresses(Protocol):
    """Who sent a request, behind trusted reverse proxies too (``security.TrustedProxies``)."""

    def clientAddress(self, request: IRequest) -> str: ...


class SessionSettings(Protocol):
    """The portal's settings a login reads (``PortalConfig``)."""

    @property
    def publicURL(self) -> str: ...

    @property
    def sessionLifetime(self) -> float: ...


class Renderer(Protocol):
    """``PageRenderer.render`` on its own (``web.Pages.render``)."""

    def __call__(
        self,
        request: IRequest,
        template: str,
        status: int = 200,
        *,
        formTargets: tuple[str, ...] = (),
        **context: Any,
    ) -> bytes: ...


class LoginHost(SessionLookup, PageRenderer, Protocol):
    """
    The portal, as the upstream login sees it: who is logged in already
    (``SessionLookup``), the error page (``PageRenderer``), and these.
    """

    @property
    def store(self) -> People: ...

    @property
    def cookies(self) -> Cookies: ...

    @property
    def throttle(self) -> Throttle: ...

    @property
    def proxies(self) -> ClientAddresses: ...

    @property
    def config(self) -> SessionSettings: ...

    @property
    def clock(self) -> IReactorTime: ...


@dataclass(frozen=True)
class LoginDoors:
    """A ``LoginHost`` that holds just those members, taken from the portal."""

    store: People
    cookies: Cookies
    throttle: Throttle
    proxies: ClientAddresses
    config: SessionSettings
    clock: IReactorTime
    #: ``SessionLookup.loggedIn`` (``sessions.LoginSessions``).
    loggedIn: Callable[[IRequest], Awaitable[LoggedIn | None]]
    #: ``PageRenderer.render`` (``web.Pages``).
    render: Renderer
