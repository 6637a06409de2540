"""
A person's own page (``/account/``): their personal API tokens (made,
listed, revoked) and their password.

A separate Klein app mounted at ``/account/``, as the administrators'
pages are; every page needs a session and every form its CSRF token, and
every form that succeeds answers with a redirect back to the page (a
reload sends nothing again) except the one that makes a token, whose
answer is the only place the token is ever shown.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from dit4c.portal import security
from dit4c.portal.events import AccessChange, EventBus
from dit4c.portal.interfaces import PageRenderer, SessionLookup
from dit4c.portal.sessions import LoggedIn
from dit4c.portal.store.errors import NotFound
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.web import arg, csrfOK, redirect

__all__ = ["MAX_TOKEN_NAME", "AccountPages"]

#: The longest name a person gives a token (what it is for).
MAX_TOKEN_NAME = 100


class AccountPages:
    app = Klein()
    log = Logger()

    def __init__(self, store: IStore, *, sessions: SessionLookup, pages: PageRenderer, events: EventBus) -> None:
        """:param events: where the end of a person's other sessions is told (their streams close)."""
        self.store = store
        self.sessions = sessions
        self.pages = pages
        self.events = events

    async def page(self, request: IRequest, who: LoggedIn, status: int = 200, **extra: Any) -> bytes:
        tokens = [t for t in await self.store.listApiTokens(who.user.id) if not t.revoked]
        return self.pages.render(
            request, "account.html", status, user=who.user, csrf=who.session.csrf, tokens=tokens, **extra
        )

    async def form(self, request: IRequest) -> LoggedIn | bytes:
        """The person behind a form post, or the answer to give instead."""
        who = await self.sessions.loggedIn(request)
        if who is None:
            return redirect(request, "/login?next=/account/")
        if not csrfOK(request, who.session.csrf):
            return await self.page(request, who, 400, error="The form expired; try again.")
        return who

    @app.route("/", methods=["GET"])
    async def index(self, request: IRequest) -> bytes:
        who = await self.sessions.loggedIn(request)
        if who is None:
            return redirect(request, "/login?next=/account/")
        done = {"password": "Your password is changed; your other sessions ended.", "revoked": "The token is revoked."}
        return await self.page(request, who, message=done.get(arg(request, "done") or ""))

    # -- API tokens ----------------------------------------------------------------------------

    @app.route("/tokens", methods=["POST"])
    async def makeToken(self, request: IRequest) -> bytes:
        who = await self.form(request)
        if isinstance(who, bytes):
            return who
        name = (arg(request, "name") or "").strip()
        if not 0 < len(name) <= MAX_TOKEN_NAME:
            return await self.page(request, who, 400, error=f"Name the token (what it is for): 1 to {MAX_TOKEN_NAME} characters.")
        token, plain = await self.store.createApiToken(who.user.id, name)
        self.log.info("{name} made API token {id}", name=who.user.name, id=token.id)
        # The token is shown once, in this answer only: the store keeps its hash.
        return await self.page(request, who, newToken=plain, newTokenName=token.name)

    @app.route("/tokens/<token_id>/revoke", methods=["POST"])
    async def revokeToken(self, request: IRequest, token_id: str) -> bytes:
        who = await self.form(request)
        if isinstance(who, bytes):
            return who
        try:
            await self.store.revokeApiToken(token_id, who.user.id)
        except NotFound:
            return await self.page(request, who, 404, error="There is no such token of yours.")
        self.log.info("{name} revoked API token {id}", name=who.user.name, id=token_id)
        return redirect(request, "/account/?done=revoked")

    # -- password --------------------------------------------------------------------------------

    @app.route("/password", methods=["POST"])
    async def changePassword(self, request: IRequest) -> bytes:
        """
        The person's password, changed: the current one first (a session
        left open on a shared computer must not be enough to take the
        account), then the new one twice. Every other session of theirs ends.
        """
        who = await self.form(request)
        if isinstance(who, bytes):
            return who
        current, new = arg(request, "current") or "", arg(request, "new") or ""
        if who.user.password_hash is None:
            return await self.page(request, who, 400, error="You log in through another site; there is no password here.")
        if not await security.verifyPassword(who.user.password_hash, current):
            return await self.page(request, who, 400, error="Your current password is not that.")
        problem = security.passwordProblem(new)
        if problem is None and new != (arg(request, "repeat") or ""):
            problem = "The two new passwords differ."
        if problem is not None:
            return await self.page(request, who, 400, error=problem)
        await self.store.updateUser(who.user.id, password_hash=await security.hashPassword(new), password_reset=False)
        ended = await self.store.deleteSessionsOfUser(who.user.id, keep=who.token)
        self.events.accessChanged(AccessChange(user=who.user.id))
        self.log.info("{name} changed their password; {ended} other session(s) ended", name=who.user.name, ended=ended)
        return redirect(request, "/account/?done=password")
