"""
Who is behind a request: the person whose portal session cookie came with
it (:class:`LoginSessions`). Every room that acts for a logged-in person
asks here, so here a state-changing request sent by another site is
refused, whatever it carries.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from dit4c.portal import security
from dit4c.portal.errors import CrossSiteRequest
from dit4c.portal.security import CookiePolicy
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import Session, User

__all__ = ["LoggedIn", "LoginSessions"]


class LoggedIn:
    """The person behind a request, and their session."""

    def __init__(self, user: User, session: Session, token: str) -> None:
        self.user = user
        self.session = session
        self.token = token


class LoginSessions:
    """The portal sessions behind requests' cookies, for requests from the portal's own ``origin``."""

    log = Logger()

    def __init__(self, store: IStore, cookies: CookiePolicy, origin: str) -> None:
        self.store = store
        self.cookies = cookies
        #: The portal's own origin, which state-changing requests must come from.
        self.origin = origin

    async def loggedIn(self, request: IRequest) -> LoggedIn | None:
        """
        The person whose session cookie came with ``request``, if any.
        Every use of a session goes through here, so here a state-changing
        request sent by another site is refused (403), whatever it carries.
        """
        text = self.sessionToken(request)
        if text is None:
            return None
        session = await self.store.sessionByToken(text)
        if session is None:
            return None
        user = await self.store.userById(session.user_id)
        if user is None or user.disabled:
            return None
        return LoggedIn(user, session, text)

    def sessionToken(self, request: IRequest) -> str | None:
        """
        The session token ``request``'s cookie carries, if any, after
        refusing (403) a state-changing request another site sent, whatever
        it carries: every read of a session begins here.
        """
        self.refuseCrossSite(request)
        token = self.cookies.get(request, security.SESSION_COOKIE)
        if not token:
            return None
        try:
            return str(token.decode("ascii"))
        except UnicodeDecodeError:
            return None

    def refuseCrossSite(self, request: IRequest) -> None:
        """Raise ``CrossSiteRequest`` (403) for a state-changing request another site sent (``security.crossSite``)."""
        why = security.crossSite(request, self.origin)
        if why is not None:
            self.log.warn(
                "refused {method} {path} from another site ({why})",
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                why=why,
            )
            raise CrossSiteRequest()
