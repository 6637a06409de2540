"""
The portal's JSON REST API, mounted at ``/api/v1/`` and described by the
OpenAPI document it serves at ``/api/v1/openapi.json``.

Callers authenticate with a personal API token (``Authorization: Bearer
dit4c_...``) or, from the portal's own pages, with the session cookie plus
the session's CSRF token in an ``X-CSRF-Token`` header on every request that
changes something. Errors are JSON: ``{"error": code, "reason": text}``.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict
from functools import partial
from typing import Any

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException

from dit4c.channel.wire import MAX_LOG_CHUNK
from dit4c.common.life import ACTIONS, ACTIVE
from dit4c.common.life import toJSON as lifeJSON
from dit4c.common.limits import LimitError, ToolLimits
from dit4c.portal import security
from dit4c.portal.access import changePerson, endInstancesOf, removePerson
from dit4c.portal.downloads import ImageDownloads
from dit4c.portal.errors import APIError, InstanceError
from dit4c.portal.events import EventBus
from dit4c.portal.files import Files
from dit4c.portal.instances import Instances, Sharing, imageJSON
from dit4c.portal.interfaces import KeyRotation, SessionLookup
from dit4c.portal.jwks import publicJWKProblem
from dit4c.portal.logstream import follow
from dit4c.portal.nodes import NodeAdmin
from dit4c.portal.openapi import document
from dit4c.portal.pageview import bearerToken
from dit4c.portal.store.errors import Conflict, NotFound, StoreClosed, StoreError
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import Grant, Instance, User
from dit4c.portal.uploads import ImageUploads
from dit4c.portal.web import arg

MAX_BODY = 64 * 1024
#: Outputs one person may follow at once (``GET .../logs?follow=1``).
FOLLOWS_PER_PERSON = 4


def instanceJSON(instance: Instance) -> dict[str, Any]:
    return {
        "id": instance.id,
        "state": instance.state,
        "reason": instance.reason,
        "url": instance.url,
        "image": instance.image_id,
        "owner": instance.owner_id,
        "scheduler": instance.scheduler_id,
        "created": instance.created,
        "updated": instance.updated,
    }


def grantJSON(grant: Grant) -> dict[str, Any]:
    return {"name": grant.name, "since": grant.since, "link": grant.link_id}


def userJSON(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "name": user.name,
        "display_name": user.display_name,
        "email": user.email,
        "is_admin": user.is_admin,
        "max_instances": user.max_instances,
        "disabled": user.disabled,
    }


class API:
    app = Klein()
    log = Logger()

    def __init__(
        self,
        store: IStore,
        *,
        sessions: SessionLookup,
        instances: Instances,
        sharing: Sharing,
        events: EventBus,
        keys: KeyRotation,
        publicURL: str,
        clock: IReactorTime,
        downloads: ImageDownloads,
    ) -> None:
        """
        :param sessions: who is logged in, for calls from the portal's own pages.
        :param downloads: saved images as files.
        :param events: where a person's access that ends here (disabled) is told.
        :param keys: the portal's signing keys, which an administrator may rotate.
        :param publicURL: the portal's public base URL (the OpenAPI document names it).
        :param clock: paces a followed log.
        """
        self.store = store
        self.sessions = sessions
        self.instances = instances
        self.sharing = sharing
        self.events = events
        self.keys = keys
        self.publicURL = publicURL
        self.clock = clock
        self.downloads = downloads
        #: The compute nodes of the connected schedulers (cool down, accept, drain).
        self.nodes = NodeAdmin(store, instances)
        #: Saved images uploaded as files, once the portal knows its image server (``PortalService``).
        self.uploads: ImageUploads | None = None
        #: A person's storage at /files (``dit4c.portal.files``), set by the portal.
        self.files: Files | None = None
        #: Followed outputs open now, by person (each asks its node once a second).
        self.following: dict[str, int] = {}

    # -- plumbing -----------------------------------------------------------------------

    async def caller(self, request: IRequest) -> User:
        token = bearerToken(request)
        if token is not None:
            user = await self.store.userByApiToken(token)
            if user is None:
                raise APIError(401, "unauthenticated", "That API token is not valid.")
            return user
        who = await self.sessions.loggedIn(request)
        if who is None:
            raise APIError(401, "unauthenticated", "Log in, or send an API token.")
        if request.method not in (b"GET", b"HEAD") and not security.tokensEqual(
            request.getHeader(b"x-csrf-token"), who.session.csrf
        ):
            raise APIError(403, "csrf", "Missing or wrong X-CSRF-Token header.")
        return who.user

    async def admin(self, request: IRequest) -> User:
        user = await self.caller(request)
        if not user.is_admin:
            raise APIError(403, "forbidden", "Only administrators may do this.")
        return user

    @staticmethod
    def body(request: IRequest) -> dict[str, Any]:
        raw = request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise APIError(413, "too_large", f"Request bodies are limited to {MAX_BODY} bytes.")
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise APIError(400, "bad_json", "The body is not JSON.") from None
        if not isinstance(body, dict):
            raise APIError(400, "bad_json", "The body must be a JSON object.")
        return body

    @staticmethod
    def field(body: dict[str, Any], name: str, required: bool = True) -> Any:
        value = body.get(name)
        if required and (value is None or value == ""):
            raise APIError(400, "missing", f"The field {name!r} is required.")
        if value is not None and not isinstance(value, (str, int, bool)):
            raise APIError(400, "bad_field", f"The field {name!r} has the wrong type.")
        return value

    def reply(self, request: IRequest, body: object, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode()

    @app.handle_errors(APIError)
    def apiError(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, APIError)
        return self.reply(request, {"error": e.code, "reason": e.reason}, e.status)

    @app.handle_errors(InstanceError)
    def instanceError(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, InstanceError)
        return self.reply(request, {"error": e.code, "reason": str(e)}, e.status)

    @app.handle_errors(StoreError)
    def storeError(self, request: IRequest, failure: Failure) -> bytes:
        status = 404 if failure.check(NotFound) else 409 if failure.check(Conflict) else 400
        if failure.check(StoreClosed):
            status = 503  # the portal is stopping: another process, or this one again, answers
        return self.reply(request, {"error": "store", "reason": str(failure.value)}, status)

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Failure) -> bytes:
        if isinstance(failure.value, HTTPException):
            e = failure.value
            return self.reply(request, {"error": "http", "reason": e.description}, e.code or 500)
        self.log.failure("API request failed: {uri}", failure, uri=request.uri)
        return self.reply(request, {"error": "internal", "reason": "The portal failed."}, 500)

    # -- the caller ---------------------------------------------------------------------------

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        return self.reply(request, document(self.publicURL))

    @app.route("/life", methods=["GET"])
    def life(self, request: IRequest) -> bytes:
        """An instance's life (states, actions, deadlines), for clients that show or drive instances."""
        return self.reply(request, lifeJSON())

    @app.route("/me", methods=["GET"])
    async def me(self, request: IRequest) -> bytes:
        return self.reply(request, userJSON(await self.caller(request)))

    @app.route("/tokens", methods=["GET"])
    async def tokens(self, request: IRequest) -> bytes:
        user = await self.caller(request)
        tokens = await self.store.listApiTokens(user.id)
        return self.reply(
            request,
            [{"id": t.id, "name": t.name, "created": t.created, "last_used": t.last_used, "revoked": t.revoked} for t in tokens],
        )

    @app.route("/tokens", methods=["POST"])
    async def newToken(self, request: IRequest) -> bytes:
        user = await self.caller(request)
        name = str(self.field(self.body(request), "name"))[:100]
        token, plain = await self.store.createApiToken(user.id, name)
        return self.reply(request, {"id": token.id, "name": token.name, "token": plain}, 201)

    @app.route("/tokens/<token_id>", methods=["DELETE"])
    async def revokeToken(self, request: IRequest, token_id: str) -> bytes:
        user = await self.caller(request)
        await self.store.revokeApiToken(token_id, user.id)
        return self.reply(request, {"revoked": token_id})

    # -- images and instances ------------------------------------------------------------------

    @app.route("/images", methods=["GET"])
    async def images(self, request: IRequest) -> bytes:
        user = await self.caller(request)
        return self.reply(
            request,
            [imageJSON(i, user.id) for i in await self.instances.images(user)],
        )

    @app.route("/instances", methods=["GET"])
    async def listInstances(self, request: IRequest) -> bytes:
        # With a token, who and what in one read (``IPageViews.pageView``); with a session, two.
        token = bearerToken(request)
        if token is None:
            view = await self.store.pageView(user_id=(await self.caller(request)).id, full=False)
        elif (view := await self.store.pageView(apiToken=token, full=False)) is None:
            raise APIError(401, "unauthenticated", "That API token is not valid.")
        if view is None:
            raise APIError(401, "unauthenticated", "Log in, or send an API token.")
        mine, shared = view.instances, view.shared
        return self.reply(
            request,
            [dict(instanceJSON(i), shared=False) for i in mine] + [dict(instanceJSON(i), shared=True) for i in shared],
        )

    @app.route("/instances", methods=["POST"])
    async def startInstance(self, request: IRequest) -> bytes:
        user = await self.caller(request)
        body = self.body(request)
        instance = await self.instances.start(
            user, str(self.field(body, "image")), self.field(body, "scheduler", required=False)
        )
        request.setHeader(b"location", f"/api/v1/instances/{instance.id}".encode())
        return self.reply(request, instanceJSON(instance), 201)

    @app.route("/instances/<instance_id>", methods=["GET"])
    async def getInstance(self, request: IRequest, instance_id: str) -> bytes:
        user = await self.caller(request)
        instance = await self.store.instanceById(instance_id)
        if instance is None or not (
            instance.owner_id == user.id or user.is_admin or await self.store.mayUseInstance(user.id, instance.id)
        ):
            raise APIError(404, "not_found", "There is no such instance of yours.")
        return self.reply(request, instanceJSON(instance))

    @app.route("/instances/<instance_id>/<action>", methods=["POST"])
    async def instanceAction(self, request: IRequest, instance_id: str, action: str) -> bytes:
        user = await self.caller(request)
        if action == "shares":
            await self.instances.share(user, instance_id, str(self.field(self.body(request), "user")))
            return await self.sharedWith(request, user, instance_id)
        if action not in ACTIONS:
            raise APIError(404, "not_found", f"Instances have no action {action!r}.")
        return self.reply(request, instanceJSON(await self.instances.act(user, instance_id, action)))

    @app.route("/instances/<instance_id>/links", methods=["GET"])
    async def links(self, request: IRequest, instance_id: str) -> bytes:
        user = await self.caller(request)
        links = await self.sharing.links(user, instance_id)
        return self.reply(request, [{"id": k.id, "created": k.created, "revoked": k.revoked} for k in links])

    @app.route("/instances/<instance_id>/links", methods=["POST"])
    async def newLink(self, request: IRequest, instance_id: str) -> bytes:
        user = await self.caller(request)
        link, url = await self.sharing.createLink(user, instance_id)
        return self.reply(request, {"id": link.id, "url": url}, 201)

    @app.route("/instances/<instance_id>/links/<link_id>", methods=["DELETE"])
    async def revokeLink(self, request: IRequest, instance_id: str, link_id: str) -> bytes:
        user = await self.caller(request)
        await self.sharing.revokeLink(user, instance_id, link_id)
        return self.reply(request, {"revoked": link_id})

    @app.route("/images/<image_id>/shares", methods=["POST"])
    async def shareImage(self, request: IRequest, image_id: str) -> bytes:
        user = await self.caller(request)
        await self.sharing.shareImage(user, image_id, str(self.field(self.body(request), "user")))
        return self.reply(request, {"shared": image_id})

    @app.route("/images/<image_id>/shares/<name>", methods=["DELETE"])
    async def unshareImage(self, request: IRequest, image_id: str, name: str) -> bytes:
        user = await self.caller(request)
        await self.sharing.unshareImage(user, image_id, name)
        return self.reply(request, {"unshared": image_id})

    @app.route("/images/<image_id>", methods=["PATCH"])
    async def renameImage(self, request: IRequest, image_id: str) -> bytes:
        user = await self.caller(request)
        image = await self.sharing.renameImage(user, image_id, str(self.field(self.body(request), "name")))
        return self.reply(request, imageJSON(image, user.id))

    @app.route("/images/<image_id>", methods=["DELETE"])
    async def deleteImage(self, request: IRequest, image_id: str) -> bytes:
        user = await self.caller(request)
        await self.sharing.deleteImage(user, image_id)
        return self.reply(request, {"deleted": image_id})

    @app.route("/images/<image_id>/download", methods=["GET"])
    async def downloadImage(self, request: IRequest, image_id: str) -> bytes | None:
        """A saved image (the caller's, or shared with them) as an OCI archive, its SHA-256 in ``Repr-Digest``."""
        user = await self.caller(request)
        return await self.downloads.send(request, user, image_id)

    @app.route("/images", methods=["POST"])
    async def uploadImage(self, request: IRequest) -> bytes | None:
        """A file as downloaded (the body) as a new saved image of the caller's (``dit4c.portal.uploads``)."""
        user = await self.caller(request)
        if self.uploads is None:
            raise APIError(503, "no_image_server", "This portal has no image server to keep uploaded images.")
        image = await self.uploads.receive(request, user)
        return None if image is None else self.reply(request, image, 201)

    @app.route("/files", branch=True)
    def fileRoutes(self, request: IRequest) -> IResource:
        """A person's storage (``dit4c.portal.files``; documented in the OpenAPI document)."""
        if self.files is None:
            raise APIError(404, "no_storage", "Storage is not available on this portal.")
        return self.files.api.resource()

    @app.route("/instances/<instance_id>/logs", methods=["GET"])
    async def logs(self, request: IRequest, instance_id: str) -> bytes | None:
        """
        A piece of the tool's output (``offset``, ``limit``; no offset: the
        last ``limit`` bytes), as JSON; with ``follow=1``, plain text that
        grows as the tool writes, until it stops.
        """
        user = await self.caller(request)
        offset, limit = self.count(request, "offset"), self.count(request, "limit")
        if arg(request, "follow") in ("1", "true"):
            instance = await self.instances.owned(user, instance_id)
            if self.following.get(user.id, 0) >= FOLLOWS_PER_PERSON:
                raise APIError(429, "too_many", f"At most {FOLLOWS_PER_PERSON} outputs may be followed at once.")

            async def running() -> bool:
                now = await self.store.instanceById(instance.id)
                return now is not None and now.state in ACTIVE

            self.following[user.id] = self.following.get(user.id, 0) + 1
            try:
                await follow(request, partial(self.instances.logs, user, instance.id), running, self.clock)
            finally:
                self.following[user.id] -= 1
                if not self.following[user.id]:
                    del self.following[user.id]
            return None
        chunk = await self.instances.logs(user, instance_id, offset, min(limit or MAX_LOG_CHUNK, MAX_LOG_CHUNK))
        return self.reply(request, {"offset": chunk.offset, "next": chunk.next, "text": chunk.text, "error": chunk.error})

    @staticmethod
    def count(request: IRequest, name: str) -> int | None:
        """A whole-number query parameter, if given."""
        raw = arg(request, name)
        if raw is None or raw == "":
            return None
        if not raw.isdigit() or len(raw) > 15:
            raise APIError(400, "bad_field", f"{name} must be a whole number.")
        return int(raw)

    @app.route("/instances/<instance_id>/shares", methods=["GET"])
    async def shares(self, request: IRequest, instance_id: str) -> bytes:
        return await self.sharedWith(request, await self.caller(request), instance_id)

    @app.route("/instances/<instance_id>/shares/<name>", methods=["DELETE"])
    async def unshare(self, request: IRequest, instance_id: str, name: str) -> bytes:
        user = await self.caller(request)
        await self.instances.unshare(user, instance_id, name)
        return await self.sharedWith(request, user, instance_id)

    async def sharedWith(self, request: IRequest, user: User, instance_id: str) -> bytes:
        """Who may use the owner's instance, and how: named, or through which link."""
        access = await self.instances.access(user, instance_id)
        return self.reply(request, {"shared_with": [grantJSON(g) for g in access]})

    # -- administration --------------------------------------------------------------------------

    @app.route("/admin/users", methods=["GET"])
    async def users(self, request: IRequest) -> bytes:
        await self.admin(request)
        return self.reply(request, [userJSON(u) for u in await self.store.listUsers(0, 10000)])

    @app.route("/admin/users", methods=["POST"])
    async def addUser(self, request: IRequest) -> bytes:
        caller = await self.admin(request)
        body = self.body(request)
        password = secrets.token_urlsafe(15)
        user = await self.store.createUser(
            str(self.field(body, "name")),
            display_name=self.field(body, "display_name", required=False),
            email=self.field(body, "email", required=False),
            is_admin=bool(self.field(body, "is_admin", required=False)),
            max_instances=self.field(body, "max_instances", required=False),
            password_hash=await security.hashPassword(password),
        )
        self.log.info("{admin} added user {name} (API)", admin=caller.name, name=user.name)
        return self.reply(request, dict(userJSON(user), password=password), 201)

    @app.route("/admin/users/<user_id>", methods=["PATCH"])
    async def changeUser(self, request: IRequest, user_id: str) -> bytes:
        caller = await self.admin(request)
        body = self.body(request)
        allowed = {"display_name", "email", "is_admin", "max_instances", "disabled"}
        unknown = set(body) - allowed
        if unknown:
            raise APIError(400, "bad_field", f"Unknown fields: {', '.join(sorted(unknown))}.")
        if user_id == caller.id and ({"is_admin", "disabled"} & set(body)):
            raise APIError(400, "refused", "You cannot change your own rights or disable yourself.")
        user = await changePerson(self.store, self.events, user_id, **body)
        return self.reply(request, userJSON(user))

    @app.route("/admin/users/<user_id>/end-instances", methods=["POST"])
    async def endInstances(self, request: IRequest, user_id: str) -> bytes:
        caller = await self.admin(request)
        person = await self.disabledPerson(user_id)
        stopped, discarded = await endInstancesOf(self.instances, caller, person.id)
        self.log.info("{admin} ended the instances of {name} (API)", admin=caller.name, name=person.name)
        return self.reply(request, {"stopped": stopped, "discarded": discarded})

    @app.route("/admin/users/<user_id>", methods=["DELETE"])
    async def removeUser(self, request: IRequest, user_id: str) -> bytes:
        caller = await self.admin(request)
        person = await self.disabledPerson(user_id)
        removed = await removePerson(self.store, self.events, self.sharing, person.id)
        self.log.info("{admin} removed {name} ({id}) (API)", admin=caller.name, name=person.name, id=person.id)
        return self.reply(request, {"removed": person.id, "instances": removed.instances, "images": len(removed.images)})

    async def disabledPerson(self, userId: str) -> User:
        person = await self.store.userById(userId)
        if person is None:
            raise APIError(404, "not_found", "There is no such person.")
        if not person.disabled:
            raise APIError(409, "conflict", f"Disable {person.name} first.")
        return person

    @app.route("/admin/schedulers/<scheduler_id>/users", methods=["PUT"])
    async def schedulerUsers(self, request: IRequest, scheduler_id: str) -> bytes:
        await self.admin(request)
        names = self.body(request).get("users")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise APIError(400, "bad_field", "'users' must be a list of user names (empty: everyone).")
        ids = []
        for name in names:
            person = await self.store.userByName(name.strip().lower())
            if person is None:
                raise APIError(404, "not_found", f"There is nobody called {name!r}.")
            ids.append(person.id)
        await self.store.setSchedulerUsers(scheduler_id, ids)
        return self.reply(request, {"scheduler": scheduler_id, "users": sorted(n.strip().lower() for n in names)})

    @app.route("/admin/nodes", methods=["GET"])
    async def listNodes(self, request: IRequest) -> bytes:
        await self.admin(request)
        return self.reply(request, {"schedulers": [s.toJSON() for s in await self.nodes.overview()]})

    @app.route("/admin/nodes/<scheduler_id>/<node>/<action>", methods=["POST"])
    async def changeNode(self, request: IRequest, scheduler_id: str, node: str, action: str) -> bytes:
        """Cool a node down, have it take instances again, or drain it (``NodeAdmin.act``)."""
        caller = await self.admin(request)
        stopped = await self.nodes.act(caller, scheduler_id, node, action)
        return self.reply(request, {"scheduler": scheduler_id, "node": node, "action": action, "stopping": stopped})

    @app.route("/admin/keys/rotate", methods=["POST"])
    async def rotateKey(self, request: IRequest) -> bytes:
        caller = await self.admin(request)
        kid = self.keys.rotate()
        self.log.info("{admin} rotated the portal's signing key (API); now {kid}", admin=caller.name, kid=kid)
        return self.reply(request, {"kid": kid})

    @app.route("/admin/images", methods=["POST"])
    async def addImage(self, request: IRequest) -> bytes:
        await self.admin(request)
        body = self.body(request)
        port = self.field(body, "port", required=False)
        if port is not None and not (isinstance(port, int) and 0 < port < 65536):
            raise APIError(400, "bad_field", "The port must be a number between 1 and 65535.")
        image = await self.store.createImage(
            str(self.field(body, "name")), str(self.field(body, "ref")), owner_id=None, port=port,
            limits=self.limits(body.get("limits")),
        )  # fmt: skip
        return self.reply(request, {**asdict(image), "limits": image.limits.toJSON()}, 201)

    @app.route("/admin/images/<image_id>/limits", methods=["PUT"])
    async def setImageLimits(self, request: IRequest, image_id: str) -> bytes:
        """A catalogue entry's limits, for instances started from now on (and images saved from them)."""
        caller = await self.admin(request)
        limits = self.limits(self.body(request))
        image = await self.store.imageById(image_id)
        if image is None or image.deleted or image.owner_id is not None:
            raise APIError(404, "not_found", "There is no such catalogue entry.")
        image = await self.store.setImageLimits(image_id, limits)
        self.log.info("{admin} set the limits of {image} (API)", admin=caller.name, image=image.name)
        return self.reply(request, {**asdict(image), "limits": image.limits.toJSON()})

    @staticmethod
    def limits(value: object) -> ToolLimits:
        try:
            return ToolLimits.fromJSON(value)
        except LimitError as e:
            raise APIError(400, "bad_limits", str(e)) from None

    @app.route("/admin/schedulers", methods=["POST"])
    async def addScheduler(self, request: IRequest) -> bytes:
        await self.admin(request)
        body = self.body(request)
        jwk = body.get("public_jwk")
        parsed, problem = publicJWKProblem(json.dumps(jwk) if isinstance(jwk, dict) else str(jwk or ""))
        if problem:
            raise APIError(400, "bad_key", problem)
        scheduler = await self.store.createScheduler(str(self.field(body, "name")), json.dumps(parsed))
        return self.reply(request, {"id": scheduler.id, "name": scheduler.name}, 201)
