"""
Administrators' pages: people (add, disable, remove, quota, administrator rights),
the image catalogue, schedulers (registered by their public key), and the
compute nodes of the connected schedulers (``/admin/nodes``: cool down,
accept again, drain; :mod:`dit4c.portal.nodes`).

A separate Klein app mounted at ``/admin/``; every page needs an
administrator's session and every form its CSRF token. A form that succeeds
answers with a redirect back to the page (``?done=``), so a reload sends
nothing again; the two that make a password (a new person, a reset) answer
with the page itself, the only place the password is ever shown, and its
script turns that answer into the page's own address in the browser's
history. What is done here can also be done with the ``dit4c`` command-line
tool.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from dit4c.common.limits import LimitError, ToolLimits
from dit4c.portal import security
from dit4c.portal.access import changePerson, endInstancesOf, removePerson
from dit4c.portal.errors import InstanceError
from dit4c.portal.events import AccessChange, EventBus
from dit4c.portal.instances import Instances, Sharing
from dit4c.portal.interfaces import KeyRotation, PageRenderer, SessionLookup
from dit4c.portal.jwks import publicJWKProblem
from dit4c.portal.nodes import NodeAdmin
from dit4c.portal.sessions import LoggedIn
from dit4c.portal.store.errors import StoreError
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.web import arg, csrfOK, redirect, served

#: What a form that succeeded says, by the ``done`` its redirect carries.
DONE = {
    "saved": "Saved.",
    "image-added": "Added to the catalogue.",
    "image-removed": "Removed from the catalogue.",
    "limits-set": "Limits set: instances started from now on get them.",
    "scheduler-added": "The scheduler is registered.",
    "key-rotated": "The portal now signs with a new key.",
    "ending": "Their running instances are stopping and those at rest are being discarded; "
    "once the stopped ones are at rest, end them again to discard those.",
    "removed": "Removed, with their instances' records, saved images, sessions, tokens and shares. "
    "Their storage on the file server is left: remove users/{id}/ in its data directory.",
}


#: What an id a message names looks like (the store's ids); anything else is not shown.
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def limitsFrom(request: IRequest) -> ToolLimits:
    """A catalogue entry's limits from a form (``cpus``, ``memory``, ``idle``, ``idle_action``; empty: none)."""
    return ToolLimits.fromForm(*((arg(request, name) or "") for name in ("cpus", "memory", "idle", "idle_action")))


def done(request: IRequest, what: str, id: str | None = None) -> bytes:
    """Back to the page, which says ``DONE[what]`` (about the person ``id``, if given)."""
    assert what in DONE, what
    return redirect(request, f"/admin/?done={what}" + (f"&id={id}" if id is not None else ""))


#: What the nodes page says after each of its forms, by action.
NODES_DONE = {
    "cool-down": "The node is cooling down: it takes no new instances; those on it run on.",
    "accept": "The node takes new instances again.",
    "drain": "The node is cooling down, and the instances on it that were running are stopping: {count}. "
    "They are stopped, not discarded.",
}


def doneMessage(what: str, id: str | None) -> str | None:
    """What the page says after ``done``; None for anything a form did not send."""
    message = DONE.get(what)
    if message is None or "{id}" not in message:
        return message
    return message.format(id=id) if id is not None and _ID.fullmatch(id) else None


class AdminPages:
    app = Klein()
    log = Logger()

    def __init__(
        self,
        store: IStore,
        *,
        sessions: SessionLookup,
        pages: PageRenderer,
        events: EventBus,
        keys: KeyRotation,
        instances: Instances,
        sharing: Sharing,
    ) -> None:
        """
        :param events: where a person's access that ends here (disabled, removed) is told.
        :param keys: the portal's signing keys, which an administrator may rotate.
        :param instances: what ends a person's instances before they are removed.
        :param sharing: what removes a removed person's saved images' bytes.
        """
        self.store = store
        self.sessions = sessions
        self.pages = pages
        self.events = events
        self.keys = keys
        self.instances = instances
        self.sharing = sharing
        self.nodes = NodeAdmin(store, instances)

    async def admin(self, request: IRequest) -> LoggedIn | None:
        who = await self.sessions.loggedIn(request)
        if who is None:
            redirect(request, "/login?next=/admin/")
            return None
        if not who.user.is_admin:
            request.setResponseCode(403)
            return None
        return who

    async def page(self, request: IRequest, who: LoggedIn, status: int = 200, **extra: Any) -> bytes:
        users = await self.store.listUsers(0, 1000)
        images = await self.store.listCatalogue()
        schedulers = await self.store.listSchedulers()
        names = {u.id: u.name for u in users}
        # A disabled person's instances not yet discarded: what stands before their removal.
        left = {u.id: len(await self.store.listInstancesOf(u.id)) for u in users if u.disabled}
        restricted = {
            s.id: ", ".join(names.get(i, i) for i in await self.store.schedulerUsers(s.id)) for s in schedulers
        }
        return self.pages.render(
            request,
            "admin.html",
            status,
            user=who.user,
            csrf=who.session.csrf,
            users=users,
            images=images,
            schedulers=schedulers,
            restricted=restricted,
            left=left,
            kid=self.keys.signer().kid,
            **extra,
        )

    async def guarded(self, request: IRequest) -> LoggedIn | bytes:
        """The administrator behind a form post, or the answer to give instead."""
        who = await self.admin(request)
        if who is None:
            return self.forbidden(request)
        if not csrfOK(request, who.session.csrf):
            request.setResponseCode(400)
            return self.pages.render(
                request, "error.html", 400, title="Form expired", message="Reload the page and try again."
            )
        return who

    def forbidden(self, request: IRequest) -> bytes:
        if served(request).code == 303:
            return b""
        return self.pages.render(
            request, "error.html", 403, title="Forbidden", message="Only administrators may see this page."
        )

    @app.route("/", methods=["GET"])
    async def index(self, request: IRequest) -> bytes:
        who = await self.admin(request)
        if who is None:
            return self.forbidden(request)
        return await self.page(request, who, message=doneMessage(arg(request, "done") or "", arg(request, "id")))

    @app.route("/users", methods=["POST"])
    async def addUser(self, request: IRequest) -> bytes:
        who = await self.guarded(request)
        if isinstance(who, bytes):
            return who
        name = (arg(request, "name") or "").strip().lower()
        password = secrets.token_urlsafe(15)
        try:
            created = await self.store.createUser(
                name,
                display_name=(arg(request, "display_name") or "").strip() or None,
                email=(arg(request, "email") or "").strip() or None,
                is_admin=arg(request, "is_admin") == "on",
                password_hash=await security.hashPassword(password),
            )
        except StoreError as e:
            return await self.page(request, who, 400, error=str(e))
        self.log.info("{admin} added user {name}", admin=who.user.name, name=created.name)
        # The password is shown once, on this page only: it is in no log.
        return await self.page(request, who, message=f"Added {created.name}.", newPassword=password)

    @app.route("/users/<user_id>", methods=["POST"])
    async def changeUser(self, request: IRequest, user_id: str) -> bytes:
        who = await self.guarded(request)
        if isinstance(who, bytes):
            return who
        changes: dict[str, Any] = {}
        action = arg(request, "action")
        if action in ("disable", "enable"):
            if user_id == who.user.id:
                return await self.page(request, who, 400, error="You cannot disable yourself.")
            changes["disabled"] = action == "disable"
        elif action == "quota":
            raw = (arg(request, "max_instances") or "").strip()
            if raw and not (raw.isdigit() and int(raw) <= 10000):
                return await self.page(request, who, 400, error="A quota is a whole number (or empty).")
            changes["max_instances"] = int(raw) if raw else None
        elif action == "reset-password":
            return await self.resetPassword(request, who, user_id)
        elif action in ("end-instances", "remove"):
            return await self.endPerson(request, who, user_id, action)
        elif action in ("grant-admin", "revoke-admin"):
            if user_id == who.user.id:
                return await self.page(request, who, 400, error="You cannot change your own rights.")
            changes["is_admin"] = action == "grant-admin"
        else:
            return await self.page(request, who, 400, error="Unknown action.")
        try:
            await changePerson(self.store, self.events, user_id, **changes)
        except StoreError as e:
            return await self.page(request, who, 400, error=str(e))
        self.log.info("{admin} changed user {id}: {action}", admin=who.user.name, id=user_id, action=action)
        return done(request, "saved")

    async def endPerson(self, request: IRequest, who: LoggedIn, userId: str, action: str) -> bytes:
        """
        A disabled person's instances ended (``end-instances``), then the
        person removed (``remove``), which is refused while any instance of
        theirs is not discarded.
        """
        person = await self.store.userById(userId)
        if person is None:
            return await self.page(request, who, 404, error="There is no such person.")
        if not person.disabled:
            return await self.page(request, who, 400, error=f"Disable {person.name} first.")
        if action == "end-instances":
            stopped, discarded = await endInstancesOf(self.instances, who.user, userId)
            self.log.info(
                "{admin} ended the instances of {name}: {stopped} stopped, {discarded} discarded",
                admin=who.user.name, name=person.name, stopped=stopped, discarded=discarded,
            )  # fmt: skip
            return done(request, "ending")
        try:
            removed = await removePerson(self.store, self.events, self.sharing, userId)
        except StoreError as e:
            return await self.page(request, who, 409, error=f"{person.name} cannot be removed yet: {e}.")
        self.log.info(
            "{admin} removed {name} ({id}): {instances} instance records, {images} saved images",
            admin=who.user.name, name=person.name, id=userId, instances=removed.instances, images=len(removed.images),
        )  # fmt: skip
        return done(request, "removed", id=userId)

    async def resetPassword(self, request: IRequest, who: LoggedIn, userId: str) -> bytes:
        """
        A new password for a person who lost theirs, shown once, here: every
        session of theirs ends, and at their next login they choose their own
        before anything else (the administrator knows this one).
        """
        password = secrets.token_urlsafe(15)
        try:
            person = await self.store.updateUser(
                userId, password_hash=await security.hashPassword(password), password_reset=True
            )
        except StoreError as e:
            return await self.page(request, who, 400, error=str(e))
        await self.store.deleteSessionsOfUser(userId)
        self.events.accessChanged(AccessChange(user=userId))
        self.log.info("{admin} reset the password of {name}", admin=who.user.name, name=person.name)
        return await self.page(
            request, who, message=f"{person.name}'s password is reset; they choose their own at their next login.",
            newPassword=password,
        )  # fmt: skip

    @app.route("/images", methods=["POST"])
    async def addImage(self, request: IRequest) -> bytes:
        who = await self.guarded(request)
        if isinstance(who, bytes):
            return who
        name = (arg(request, "name") or "").strip()
        ref = (arg(request, "ref") or "").strip()
        rawPort = (arg(request, "port") or "").strip()
        if not name or not ref:
            return await self.page(request, who, 400, error="An image needs a name and a reference.")
        if rawPort and not (rawPort.isdigit() and 0 < int(rawPort) < 65536):
            return await self.page(request, who, 400, error="The port must be between 1 and 65535.")
        try:
            limits = limitsFrom(request)
        except LimitError as e:
            return await self.page(request, who, 400, error=str(e))
        await self.store.createImage(name, ref, owner_id=None, port=int(rawPort) if rawPort else None, limits=limits)
        return done(request, "image-added")

    @app.route("/images/<image_id>/limits", methods=["POST"])
    async def setLimits(self, request: IRequest, image_id: str) -> bytes:
        """A catalogue entry's limits: new instances of it (and of images saved from it from now on) get them."""
        who = await self.guarded(request)
        if isinstance(who, bytes):
            return who
        image = await self.store.imageById(image_id)
        if image is None or image.deleted or image.owner_id is not None:
            return await self.page(request, who, 404, error="There is no such catalogue entry.")
        try:
            await self.store.setImageLimits(image_id, limitsFrom(request))
        except LimitError as e:
            return await self.page(request, who, 400, error=str(e))
        self.log.info("{admin} set the limits of {image}", admin=who.user.name, image=image.name)
        return done(request, "limits-set")

    @app.route("/images/<image_id>/delete", methods=["POST"])
    async def deleteImage(self, request: IRequest, image_id: str) -> bytes:
        who = await self.guarded(request)
        if isinstance(who, bytes):
            return who
        try:
            await self.store.deleteImage(image_id)
        except StoreError as e:
            return await self.page(request, who, 400, error=str(e))
        return done(request, "image-removed")

    @app.route("/schedulers", methods=["POST"])
    async def addScheduler(self, request: IRequest) -> bytes:
        who = await self.guarded(request)
        if isinstance(who, bytes):
            return who
        name = (arg(request, "name") or "").strip()
        jwk, problem = publicJWKProblem(arg(request, "public_jwk") or "")
        if problem or not name:
            return await self.page(request, who, 400, error=problem or "A scheduler needs a name.")
        try:
            scheduler = await self.store.createScheduler(name, json.dumps(jwk))
        except StoreError as e:
            return await self.page(request, who, 400, error=str(e))
        self.log.info("{admin} registered scheduler {name} ({id})", admin=who.user.name, name=name, id=scheduler.id)
        return done(request, "scheduler-added")

    @app.route("/keys/rotate", methods=["POST"])
    async def rotateKey(self, request: IRequest) -> bytes:
        who = await self.guarded(request)
        if isinstance(who, bytes):
            return who
        kid = self.keys.rotate()
        self.log.info("{admin} rotated the portal's signing key; now {kid}", admin=who.user.name, kid=kid)
        return done(request, "key-rotated")

    @app.route("/schedulers/<scheduler_id>", methods=["POST"])
    async def changeScheduler(self, request: IRequest, scheduler_id: str) -> bytes:
        who = await self.guarded(request)
        if isinstance(who, bytes):
            return who
        action = arg(request, "action")
        if action == "restrict":
            names = [n.strip().lower() for n in (arg(request, "users") or "").split(",") if n.strip()]
            ids = []
            for name in names:
                person = await self.store.userByName(name)
                if person is None:
                    return await self.page(request, who, 400, error=f"There is nobody called {name!r}.")
                ids.append(person.id)
            try:
                await self.store.setSchedulerUsers(scheduler_id, ids)
            except StoreError as e:
                return await self.page(request, who, 400, error=str(e))
            return done(request, "saved")
        if action not in ("disable", "enable"):
            return await self.page(request, who, 400, error="Unknown action.")
        try:
            await self.store.updateScheduler(scheduler_id, disabled=action == "disable")
        except StoreError as e:
            return await self.page(request, who, 400, error=str(e))
        return done(request, "saved")

    # -- compute nodes -----------------------------------------------------------------------

    @app.route("/nodes", methods=["GET"])
    async def nodesPage(self, request: IRequest) -> bytes:
        who = await self.admin(request)
        if who is None:
            return self.forbidden(request)
        message = NODES_DONE.get(arg(request, "done") or "")
        count = arg(request, "count") or ""
        return await self.renderNodes(request, who, message=message.format(count=count) if message and count.isdigit() else None)

    async def renderNodes(self, request: IRequest, who: LoggedIn, status: int = 200, **extra: Any) -> bytes:
        return self.pages.render(
            request, "admin_nodes.html", status, user=who.user, csrf=who.session.csrf,
            schedulers=await self.nodes.overview(), **extra,
        )  # fmt: skip

    @app.route("/nodes", methods=["POST"])
    async def changeNode(self, request: IRequest) -> bytes:
        """Cool a node down, have it take instances again, or drain it; back to the page, which says what was done."""
        who = await self.guarded(request)
        if isinstance(who, bytes):
            return who
        action = arg(request, "action") or ""
        try:
            stopped = await self.nodes.act(who.user, arg(request, "scheduler") or "", arg(request, "node") or "", action)
        except InstanceError as e:
            return await self.renderNodes(request, who, e.status, error=str(e))
        return redirect(request, f"/admin/nodes?done={action}&count={len(stopped)}")
