"""
What an instance's helpers report to the portal, and the image server's
question "may this request go ahead?" (docs/protocols.md section 8).

Mounted by the portal at ``/reports/``:

- ``POST /reports/url``: the listener tells the portal the instance's public
  URL, as the routing server gave it in its ``WELCOME``;
- ``POST /reports/image``: the upload helper tells the portal where the
  image server stored the image the instance saved; the portal makes it a
  saved image of the instance's owner;
- ``POST /reports/image-access``: the image server, server to server, asks
  whether a request it received may go ahead, passing along that request's
  credentials. It proves itself with a secret shared with the portal; a
  portal configured without one has no such endpoint (404).
- ``POST /reports/file-access``: the file server, server to server, asks
  whose storage an instance may reach (its owner's, while it is active),
  proving itself the same way with a secret of its own.

A report's body is a JWT signed with the instance's own private key: the
portal checks it against the instance's public key in its store (set by
the scheduler channel from the node), never against a key the token names.
Its ``jti`` is spent in the store, so no report is accepted twice, by any
portal process.

Nothing here logs a token, a cookie, an API token or the image server's
secret: only instance ids, image ids and short reasons. What reports and
questions are checked against, without the endpoints, is in
:mod:`dit4c.portal.reportrules`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from dit4c.common import tokens
from dit4c.common.errors import InvalidToken
from dit4c.common.life import ACTIVE, State
from dit4c.common.tokens import TokenVerifier
from dit4c.portal.errors import ReportError
from dit4c.portal.events import EventBus
from dit4c.portal.importtokens import NEW_IMAGE, ImportTokens
from dit4c.portal.keys import KeyRing, KeyRingKeySource
from dit4c.portal.reportrules import (
    API_TOKEN_PREFIX,
    DELETE_AUDIENCE,
    FILE_SERVER_HEADER,
    IMAGE_SERVER_HEADER,
    LEEWAY,
    MAX_JTI,
    MAX_URL,
    METHODS,
    MIN_SECRET,
    READ_AUDIENCE,
    READ_METHODS,
    REPORT_AUDIENCE,
    SAVE_STATES,
    UPLOAD_AUDIENCE,
    WRITE_METHODS,
    InstanceTokens,
    badRequest,
    badToken,
    bearerToken,
    checkDigest,
    checkImageURL,
    checkInstanceURL,
    checkName,
    imageReadToken,
    peopleIn,
    savedName,
    why,
)
from dit4c.portal.store.errors import Conflict, NotFound, StoreClosed
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import Image, Instance, User
from dit4c.portal.web import utc

__all__ = [
    "MAX_BODY",
    "Reports",
    # Of dit4c.portal.reportrules, these the image server's tests take from here.
    "DELETE_AUDIENCE",
    "UPLOAD_AUDIENCE",
    "imageReadToken",
]

#: The largest request body read: a report is a JWT of a few hundred bytes.
MAX_BODY = 16 * 1024


# -- the endpoints ----------------------------------------------------------------------------------


class ReportsParts(Protocol):
    """
    What the reports use (``dit4c.portal.interfaces.Basics``): the store,
    the portal's keys (its read and delete tokens), the clock, and the
    event bus the instances they change are published on.
    """

    @property
    def store(self) -> IStore: ...
    @property
    def keys(self) -> KeyRing: ...
    @property
    def clock(self) -> IReactorTime: ...
    @property
    def events(self) -> EventBus: ...


class Decision:
    """The answer to the image server's question."""

    def __init__(
        self, allowed: bool, reason: str, user: str | None = None, via: str | None = None,
        instance: str | None = None,
    ) -> None:  # fmt: skip
        self.allowed = allowed
        self.reason = reason
        self.user = user
        self.via = via
        self.instance = instance

    def body(self) -> dict[str, Any]:
        if not self.allowed:
            return {"allowed": False, "reason": self.reason}
        body: dict[str, Any] = {"allowed": True, "user": self.user, "via": self.via, "reason": self.reason}
        if self.instance is not None:
            body["instance"] = self.instance
        return body


def _deny(reason: str) -> Decision:
    return Decision(False, reason)


def _proven(given: bytes | None, secretHash: bytes) -> bool:
    """Whether ``given`` is the secret whose SHA-256 is ``secretHash``."""
    # Hashes of equal length, compared in constant time: neither the
    # secret's bytes nor its length show in the time taken.
    offered = hashlib.sha256((given or b"").strip()).digest()
    return hmac.compare_digest(offered, secretHash) and bool(given)


class Reports:
    """
    The report endpoints and the image server's question, as a Klein app to
    mount at ``/reports/`` (its routes are relative to it).
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        parts: ReportsParts,
        *,
        instanceTokens: InstanceTokens | None = None,
        imageServerSecret: str | bytes | None = None,
        imageServerURLs: Iterable[str] | None = None,
        instanceDomains: Iterable[str] | None = None,
        onionURLs: bool = False,
    ) -> None:
        """
        :param imageServerSecret: what the image server sends in
            ``X-DIT4C-Image-Server``; None: no image server, and
            ``/reports/image-access`` answers 404. Only its SHA-256 is kept.
        :param imageServerURLs: the image servers' base URLs: a reported
            ``image_url`` must be under one of them. None: any http(s) URL.
        :param instanceDomains: the routing domains: a reported instance URL
            must be ``<id>.<one of them>``. None: any domain.
        :param onionURLs: take a Tor v3 onion service's URL as well
            (``http://<56 characters>.onion/``: a listener that publishes its
            instance as an onion service).
        """
        self.store = parts.store
        self.clock = parts.clock
        self.events = parts.events
        #: The check of tokens signed with an instance's own key (shared with the OAuth server's watch).
        self.instanceTokens = instanceTokens or InstanceTokens(parts.store, parts.clock)
        self.imageServerURLs = (
            None if imageServerURLs is None
            else tuple(url if url.endswith("/") else url + "/" for url in imageServerURLs)
        )  # fmt: skip
        self.instanceDomains = None if instanceDomains is None else tuple(d.lower().strip(".") for d in instanceDomains)
        #: Whether a reported instance URL may be a .onion one (``--onion-urls``).
        self.onionURLs = onionURLs
        self._secretHash: bytes | None = None
        self.setImageServerSecret(imageServerSecret)
        self._fileSecretHash: bytes | None = None
        self._readTokens = TokenVerifier(
            KeyRingKeySource(parts.keys), audience=READ_AUDIENCE, issuer=parts.keys.issuer,
            leeway=LEEWAY, clock=self.clock,
        )  # fmt: skip
        self._deleteTokens = TokenVerifier(
            KeyRingKeySource(parts.keys), audience=DELETE_AUDIENCE, issuer=parts.keys.issuer,
            leeway=LEEWAY, clock=self.clock,
        )  # fmt: skip
        self._importTokens = ImportTokens(parts.keys, self.clock)  # a person's file as a new image

    def setImageServerSecret(self, secret: str | bytes | None) -> None:
        """Set (or, with None, remove) the image server's secret. Only its hash is kept."""
        if secret is None:
            self._secretHash = None
            return
        raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        raw = raw.strip()
        if len(raw) < MIN_SECRET:
            raise ValueError(f"the image server secret must have at least {MIN_SECRET} bytes")
        self._secretHash = hashlib.sha256(raw).digest()

    def _imageServerProven(self, given: bytes | None) -> bool:
        assert self._secretHash is not None
        return _proven(given, self._secretHash)

    def setFileServerSecret(self, secret: str | bytes | None) -> None:
        """Set (or, with None, remove) the file server's secret. Only its hash is kept."""
        if secret is None:
            self._fileSecretHash = None
            return
        raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        raw = raw.strip()
        if len(raw) < MIN_SECRET:
            raise ValueError(f"the file server secret must have at least {MIN_SECRET} bytes")
        self._fileSecretHash = hashlib.sha256(raw).digest()

    # -- answers ------------------------------------------------------------------------------

    @staticmethod
    def _json(request: IRequest, body: object, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode()

    @app.handle_errors(ReportError)
    def refused(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, ReportError)
        return self._json(request, {"error": e.error, "reason": e.reason}, e.status)

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Failure) -> bytes:
        if isinstance(failure.value, HTTPException):
            e = failure.value
            code = e.code or 500
            error = {404: "not_found", 405: "method_not_allowed"}.get(code, "invalid_request")
            if code == 405:
                request.setHeader(b"allow", b"POST")
            return self._json(request, {"error": error, "reason": f"{e.name}."}, code)
        if failure.check(StoreClosed):
            # A report that came as the portal stopped: the helper reports again.
            return self._json(request, {"error": "unavailable", "reason": str(failure.value)}, 503)
        self.log.failure("report request failed: {uri}", failure, uri=request.uri)
        return self._json(request, {"error": "server_error", "reason": "The portal failed; try again."}, 500)

    # -- reading requests -------------------------------------------------------------------------

    @staticmethod
    def _body(request: IRequest, contentType: bytes) -> bytes:
        given = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if given != contentType:
            raise ReportError(
                415, "unsupported_media_type", f"The body must be {contentType.decode('ascii')}."
            )
        request.content.seek(0)
        raw: bytes = request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise ReportError(413, "too_large", f"The body is larger than {MAX_BODY} bytes.")
        return raw

    def _token(self, request: IRequest) -> str:
        raw = self._body(request, b"application/jwt").strip()
        try:
            token = raw.decode("ascii")
        except UnicodeDecodeError:
            raise badToken("The token was refused: malformed token.") from None
        if not token:
            raise badToken("The body must be a JWT.")
        return token

    # -- instance tokens ----------------------------------------------------------------------------

    async def _report(self, request: IRequest) -> tuple[Instance, dict[str, Any]]:
        """A report's instance and claims, its ``jti`` spent: a replay is refused."""
        instance, claims = await self.instanceTokens.check(self._token(request), REPORT_AUDIENCE)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI:
            raise badToken(f"The token needs a jti claim of 1 to {MAX_JTI} characters.")
        # Remembered for as long as the token could still verify.
        if not await self.store.spendTokenId(instance.id, jti, float(claims["exp"]) + LEEWAY):
            raise ReportError(401, "replayed", "This report was made before: its jti is used.")
        return instance, claims

    # -- POST /reports/url ------------------------------------------------------------------------------

    @app.route("/url", methods=["POST"])
    async def url(self, request: IRequest) -> bytes:
        try:
            instance, claims = await self._report(request)
            url = checkInstanceURL(claims.get("url"), instance.id, self.instanceDomains, onion=self.onionURLs)
            updated = await self._setURL(instance, url)
        except ReportError as e:
            self.log.info("URL report refused: {reason}", reason=e.reason)
            raise
        self.log.info("instance {instance} is at {url}", instance=updated.id, url=url)
        return self._json(request, {"instance": updated.id, "url": url, "state": updated.state})

    async def _setURL(self, instance: Instance, url: str) -> Instance:
        if instance.state not in ACTIVE:
            raise self._wrongState(instance, "active")
        if instance.url == url:
            return instance
        try:
            updated: Instance = await self.store.updateInstance(
                instance.id, url=url, expected_state=ACTIVE
            )
        except (Conflict, NotFound):
            now = await self.store.instanceById(instance.id)
            raise self._wrongState(now or instance, "active") from None
        self.events.publish(updated)
        return updated

    @staticmethod
    def _wrongState(instance: Instance, wanted: str) -> ReportError:
        return ReportError(409, "wrong_state", f"The instance is {instance.state}, not {wanted}.")

    # -- POST /reports/activity -------------------------------------------------------------------------

    @app.route("/activity", methods=["POST"])
    async def activity(self, request: IRequest) -> bytes:
        """Traffic reached a running instance at ``active_at`` (its helpers' word): the idle limit counts from then."""
        instance, claims = await self._report(request)
        at = claims.get("active_at")
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
            raise badRequest("The claim active_at must be a time, in seconds since the epoch.")
        if instance.state is not State.RUNNING:
            raise self._wrongState(instance, "running")
        if await self.store.markActive(instance.id, min(float(at), self.clock.seconds())):
            instance = await self.store.instanceById(instance.id) or instance
            self.events.publish(instance)  # the owner's pages show the new deadline
        return self._json(request, {"instance": instance.id, "active_at": instance.active_at})

    # -- POST /reports/image ----------------------------------------------------------------------------

    @app.route("/image", methods=["POST"])
    async def image(self, request: IRequest) -> bytes:
        try:
            instance, claims = await self._report(request)
            image, created = await self._saveImage(instance, claims)
        except ReportError as e:
            self.log.info("image report refused: {reason}", reason=e.reason)
            raise
        body = {"image": image.id, "name": image.name, "digest": image.digest, "created": created}
        return self._json(request, body, 201 if created else 200)

    async def _saveImage(self, instance: Instance, claims: Mapping[str, Any]) -> tuple[Image, bool]:
        ref = checkImageURL(claims.get("image_url"), self.imageServerURLs)
        digest = checkDigest(claims.get("digest"))
        name = checkName(claims.get("name"))
        if instance.state not in SAVE_STATES:
            raise self._wrongState(instance, "saving or uploading")
        if name is None:
            source = await self.store.imageById(instance.image_id)
            name = savedName(source.name if source else "Image", utc(self.clock.seconds()))
        try:
            image, created = await self.store.saveInstanceImage(
                instance.id, name, ref, digest, states=SAVE_STATES
            )
        except (Conflict, NotFound):
            now = await self.store.instanceById(instance.id)
            raise self._wrongState(now or instance, "saving or uploading") from None
        if created:
            self.log.info(
                "instance {instance} saved image {image} ({digest})",
                instance=instance.id, image=image.id, digest=digest,
            )  # fmt: skip
        else:
            self.log.info(
                "instance {instance} reported image {digest} again: it is image {image}",
                instance=instance.id, image=image.id, digest=digest,
            )  # fmt: skip
        latest = await self.store.instanceById(instance.id)
        self.events.publish(latest or instance)
        return image, created

    # -- POST /reports/image-access -----------------------------------------------------------------------

    @app.route("/image-access")
    async def imageAccess(self, request: IRequest) -> bytes:
        if self._secretHash is None:
            # No image server: as if there were no such endpoint.
            raise ReportError(404, "not_found", "Not Found.")
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            raise ReportError(405, "method_not_allowed", "Only POST is allowed here.")
        if not self._imageServerProven(request.getHeader(IMAGE_SERVER_HEADER)):
            address = getattr(request.getClientAddress(), "host", "unknown")
            self.log.warn(
                "image access question from {address} refused: missing or wrong image server secret",
                address=address,
            )
            raise ReportError(403, "forbidden", "Only the image server may ask this.")
        method, reference, headers = self._question(request)
        decision = await self._decide(method, reference, headers)
        self.log.info(
            "image server: {method} {image}: {answer} ({reason})",
            method=method, image=reference[:100], answer="allowed" if decision.allowed else "refused",
            reason=decision.reason,
        )  # fmt: skip
        return self._json(request, decision.body(), 200 if decision.allowed else 403)

    def _question(self, request: IRequest) -> tuple[str, str, dict[str, str]]:
        raw = self._body(request, b"application/json")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise badRequest("The body is not JSON.") from None
        if not isinstance(body, dict):
            raise badRequest("The body must be a JSON object.")
        method = body.get("method")
        if not isinstance(method, str) or method.upper() not in METHODS:
            raise badRequest(f"method must be one of {', '.join(sorted(METHODS))}.")
        reference = body.get("image")
        if not isinstance(reference, str) or not 0 < len(reference) <= MAX_URL:
            raise badRequest(f"image must be an image reference, id or digest of at most {MAX_URL} characters.")
        given = body.get("headers", {})
        if given is None:
            given = {}
        if not isinstance(given, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in given.items()
        ):
            raise badRequest("headers must be an object of strings.")
        return method.upper(), reference, {k.lower(): v for k, v in given.items()}

    async def _decide(self, method: str, reference: str, headers: Mapping[str, str]) -> Decision:
        if method in WRITE_METHODS and reference == NEW_IMAGE:  # POST /images: the portal's own upload
            user, why = await self._importTokens.who(headers.get("authorization"))
            return Decision(True, why, user=user, via="import-token") if user else _deny(why)
        if method in WRITE_METHODS:
            return await self._mayWrite(reference, headers.get("authorization"))
        if method == "DELETE":
            removal = await self._removal(reference, headers.get("authorization"))
            if removal is not None:
                return removal
        images: list[Image] = await self.store.findImages(reference)
        if not images:
            return _deny("The portal knows no such image.")
        if method in READ_METHODS:
            return await self._mayRead(images, headers)
        return await self._mayDelete(images, headers)

    async def _stoppingToSave(self, instance: Instance) -> bool:
        """
        Stopping on the way to a save (its latest command a save): the node's
        report that it saves goes through its scheduler, and may come after
        its upload helper's first request, which comes straight here.
        """
        return instance.state == State.STOPPING and await self.store.latestCommandOp(instance.id) == "save"

    async def _mayWrite(self, reference: str, authorization: str | None) -> Decision:
        token = bearerToken(authorization)
        if token is None:
            return _deny("Writes need a Bearer upload token signed by the instance that saves the image.")
        try:
            instance, claims = await self.instanceTokens.check(token, UPLOAD_AUDIENCE)
            digest = checkDigest(claims.get("digest"))
        except ReportError as e:
            return _deny(f"Upload token: {e.reason}")
        if reference != digest:
            return _deny("The upload token is for another digest.")
        if instance.state not in SAVE_STATES and not await self._stoppingToSave(instance):
            return _deny(f"Instance {instance.id} is {instance.state}, not saving or uploading.")
        return Decision(
            True, f"Instance {instance.id} is saving this image.", user=instance.owner_id,
            via="upload-token", instance=instance.id,
        )  # fmt: skip

    async def _mayRead(self, images: list[Image], headers: Mapping[str, str]) -> Decision:
        reasons: list[str] = []
        token = bearerToken(headers.get("authorization"))
        if token is not None and not token.startswith(API_TOKEN_PREFIX):
            try:
                claims = await self._readTokens.verify(token)
            except InvalidToken as e:
                reasons.append(f"the read token was refused: {e.reason}")
            else:
                if claims.get("image") in {image.id for image in images}:
                    return Decision(True, "A read token the portal signed for this image.", via="read-token")
                reasons.append("the read token is for another image")
        for user, via in await peopleIn(self.store, headers, reasons):
            for image in images:
                if await self.store.mayUseImage(user.id, image.id):
                    how = "owns it" if image.owner_id == user.id else "may use it"
                    return Decision(True, f"{user.name} {how}.", user=user.id, via=via)
            reasons.append(f"{user.name} may not use this image")
        return _deny(why(reasons, "Reads need a Bearer API token or read token, or a portal session."))

    async def _removal(self, reference: str, authorization: str | None) -> Decision | None:
        """
        The portal's own delete token (a saved image was deleted, and its
        bytes are to go): allowed for its digest while no saved image has
        that digest. None: not such a token.
        """
        token = bearerToken(authorization)
        if token is None or token.startswith(API_TOKEN_PREFIX):
            return None
        try:
            claims = await self._deleteTokens.verify(token)
        except InvalidToken:
            return None  # perhaps another kind of token: the other rules decide
        if claims.get("digest") != reference:
            return _deny("The delete token is for another digest.")
        if await self.store.findImages(reference):
            return _deny("A saved image still has these bytes.")
        return Decision(True, "The portal deleted every image with these bytes.", via="delete-token")

    async def _mayDelete(self, images: list[Image], headers: Mapping[str, str]) -> Decision:
        reasons: list[str] = []
        for user, via in await peopleIn(self.store, headers, reasons):
            # Every image the reference names must be theirs: a digest two
            # people saved is not one person's to delete.
            if all(image.owner_id == user.id for image in images):
                return Decision(True, f"{user.name} owns it.", user=user.id, via=via)
            reasons.append(f"{user.name} does not own this image")
        return _deny(why(reasons, "Only the image's owner may delete it (API token or portal session)."))

    # -- POST /reports/file-access -------------------------------------------------------------------

    @app.route("/file-access")
    async def fileAccess(self, request: IRequest) -> bytes:
        """
        The file server asks whose storage an instance may reach: its
        owner's, while the instance is active and the owner enabled.
        """
        if self._fileSecretHash is None:
            # No file server: as if there were no such endpoint.
            raise ReportError(404, "not_found", "Not Found.")
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            raise ReportError(405, "method_not_allowed", "Only POST is allowed here.")
        if not _proven(request.getHeader(FILE_SERVER_HEADER), self._fileSecretHash):
            address = getattr(request.getClientAddress(), "host", "unknown")
            self.log.warn(
                "file access question from {address} refused: missing or wrong file server secret",
                address=address,
            )
            raise ReportError(403, "forbidden", "Only the file server may ask this.")
        raw = self._body(request, b"application/json")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise badRequest("The body is not JSON.") from None
        subject = body.get("instance") if isinstance(body, dict) else None
        if not isinstance(subject, str) or tokens.INSTANCE_ID_RE.fullmatch(subject) is None:
            raise badRequest("instance must be an instance id.")
        decision = await self._mayReachFiles(subject)
        self.log.info(
            "file server: instance {instance}: {answer} ({reason})",
            instance=subject, answer="allowed" if decision.allowed else "refused", reason=decision.reason,
        )  # fmt: skip
        if not decision.allowed:
            return self._json(request, decision.body(), 403)
        return self._json(
            request, {"allowed": True, "instance": subject, "user": decision.user, "reason": decision.reason}
        )

    async def _mayReachFiles(self, instanceId: str) -> Decision:
        instance: Instance | None = await self.store.instanceById(instanceId)
        if instance is None:
            return _deny("The portal knows no such instance.")
        if instance.state not in ACTIVE:
            return _deny(f"Instance {instance.id} is {instance.state}, not active.")
        owner: User | None = await self.store.userById(instance.owner_id)
        if owner is None or owner.disabled:
            return _deny(f"The owner of instance {instance.id} is not an enabled user.")
        return Decision(True, f"Instance {instance.id} is {owner.name}'s.", user=owner.id, instance=instance.id)
