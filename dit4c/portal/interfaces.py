"""
The doors between the portal's rooms: what each part (the pages, the
administrators' pages, the API, the OAuth server, the reports) may use of
the others, as small protocols. ``dit4c.portal.app.Portal`` builds the
parts and hands each only the collaborators it names; no part imports the
app, and none holds the whole portal.

============================  ===========================================  =============================
door                          what it gives                                made by
============================  ===========================================  =============================
:class:`SessionLookup`        who is logged in behind a request            ``sessions.LoginSessions``
:class:`PageRenderer`         an HTML page from the templates              ``web.Pages``
``events.EventBus``           instance and access changes, as they happen  ``events.InstanceEvents``
:class:`KeyRotation`          a new signing key for the portal             ``keys.KeyRing``
:class:`InstanceTokenCheck`   a token an instance signed with its own key  ``reportrules.InstanceTokens``
:class:`Basics`               the store, the key ring, the clock, the bus  ``app.Portal``
============================  ===========================================  =============================

Who gets which: the API a session lookup, the instance and sharing
services, the bus and key rotation; the administrators' pages a session
lookup, the page renderer, the bus and key rotation; the OAuth server the
basics, a session lookup, the page renderer and the instance-token check;
the reports the basics and the instance-token check. The scheduler channel
(``channel.ChannelHub``) publishes on the bus it is given.

The store is ``dit4c.portal.store.interfaces.IStore`` and the clock
``IReactorTime``; the instance and sharing services
(``dit4c.portal.instances``) are passed as they are.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from dit4c.common.tokens import TokenSigner
from dit4c.portal.events import EventBus
from dit4c.portal.keys import KeyRing
from dit4c.portal.sessions import LoggedIn
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import Instance

__all__ = ["Basics", "InstanceTokenCheck", "KeyRotation", "PageRenderer", "SessionLookup"]


class SessionLookup(Protocol):
    """Who is logged in: the person behind a request's session cookie."""

    def loggedIn(self, request: IRequest) -> Awaitable[LoggedIn | None]:
        """The person and session, None if none; raises ``CrossSiteRequest`` for another site's request."""
        ...


class PageRenderer(Protocol):
    """The portal's HTML pages."""

    def render(
        self, request: IRequest, template: str, status: int = 200, *, formTargets: tuple[str, ...] = (), **context: Any
    ) -> bytes:
        """The page ``template`` with ``context``, as the answer to ``request`` (headers set)."""
        ...


class KeyRotation(Protocol):
    """The portal's signing keys, as an administrator rotates them."""

    def rotate(self) -> str:
        """Sign with a new key from now on; its ``kid``."""
        ...

    def signer(self) -> TokenSigner:
        """What signs now (its ``kid`` is shown to administrators)."""
        ...


class InstanceTokenCheck(Protocol):
    """Tokens an instance's helpers sign with the instance's own key."""

    def check(self, token: str, audience: str) -> Awaitable[tuple[Instance, dict[str, Any]]]:
        """The instance that signed ``token`` for ``audience``, and its claims; ``ReportError`` if not."""
        ...


@dataclass(frozen=True)
class Basics:
    """What several rooms share: the store, the portal's keys, the clock and the event bus."""

    store: IStore
    keys: KeyRing
    clock: IReactorTime
    events: EventBus
