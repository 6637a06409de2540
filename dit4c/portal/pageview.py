"""
A person's page read at once: the person behind a request's session
cookie or API token and what their page lists, from one read transaction
of the store (``IPageViews.pageView``), for ``GET /`` and
``GET /api/v1/instances``, the pages people load most.
"""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from dit4c.portal.errors import APIError
from dit4c.portal.sessions import LoggedIn, LoginSessions
from dit4c.portal.store.interfaces import IPageViews
from dit4c.portal.store.model import PageView


async def sessionView(
    sessions: LoginSessions, store: IPageViews, request: IRequest, *, full: bool = True
) -> tuple[LoggedIn, PageView] | None:
    """
    Who is logged in behind ``request`` (as ``LoginSessions.loggedIn``, which
    this replaces for the pages it reads: another site's state-changing
    request is refused the same way) and their page; None if nobody is.
    """
    token = sessions.sessionToken(request)
    if token is None:
        return None
    view = await store.pageView(sessionToken=token, full=full)
    if view is None or view.session is None:
        return None
    return LoggedIn(view.user, view.session, token), view


def bearerToken(request: IRequest) -> str | None:
    """The API token of an ``Authorization: Bearer`` header; None without the header; 401 for another scheme."""
    authorization: bytes | None = request.getHeader(b"authorization")
    if not authorization:
        return None
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer" or not token:
        raise APIError(401, "unauthenticated", "Use 'Authorization: Bearer <API token>'.")
    return token.decode("ascii", "replace").strip()


def homeContext(view: PageView) -> dict[str, Any]:
    """
    What the instances page's template takes from a page view: its images
    parted here once (the catalogue, the person's saved images, those shared
    with them) rather than filtered in the template for each list that shows them.
    """
    me = view.user.id
    return {
        "instances": view.instances,
        "shared": view.shared,
        "images": view.images,
        "catalogue": [i for i in view.images if i.owner_id is None],
        "mine": [i for i in view.images if i.owner_id == me],
        "theirs": [i for i in view.images if i.owner_id is not None and i.owner_id != me],
        "imageNames": view.imageNames,
        "schedulers": view.schedulers,
        "sharedCounts": view.sharedCounts,
    }
