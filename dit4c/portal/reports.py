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
secret: only instance ids, image ids and short reasons.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
import treq
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from dit4c.common import tokens
from dit4c.common.life import ACTIVE, SAVING_IMAGE, states
from dit4c.common.tokens import StaticKeySource, TokenVerifier
from dit4c.portal.events import EventBus
from dit4c.portal.keys import KeyRing, KeyRingKeySource
from dit4c.portal.store.errors import Conflict, NotFound
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import Image, Instance, User

__all__ = [
    "DELETE_AUDIENCE",
    "FILE_SERVER_HEADER",
    "IMAGE_SERVER_HEADER",
    "MAX_BODY",
    "MAX_REPORT_LIFETIME",
    "READ_AUDIENCE",
    "REPORT_AUDIENCE",
    "UPLOAD_AUDIENCE",
    "InstanceTokens",
    "ReportError",
    "Reports",
    "checkImageURL",
    "checkInstanceURL",
    "imageReadToken",
    "removeImageBytes",
]

_log = Logger()

#: The audience of an instance's reports to the portal.
REPORT_AUDIENCE = "dit4c-portal-report"
#: The audience of the tokens the upload helper shows the image server.
UPLOAD_AUDIENCE = "dit4c-image-upload"
#: The audience of the read tokens the portal signs for a scheduler / node.
READ_AUDIENCE = "dit4c-image-read"
#: The ``aud`` of the token the portal signs to have a deleted image's bytes removed.
DELETE_AUDIENCE = "dit4c-image-delete"

#: The largest request body read: a report is a JWT of a few hundred bytes.
MAX_BODY = 16 * 1024
#: ``exp`` of an instance's token may be at most this many seconds after its ``iat``.
MAX_REPORT_LIFETIME = 300.0
#: Clock skew allowed on ``exp`` and ``iat``, in seconds.
LEEWAY = 30.0
MAX_URL = 2048
MAX_NAME = 200
#: The longest ``jti`` accepted (the store remembers it).
MAX_JTI = 255
#: Read tokens are valid for this long unless asked otherwise, and never longer than a day.
READ_TOKEN_LIFETIME = 3600.0
MAX_READ_TOKEN_LIFETIME = 86400.0

#: Where an instance may report a saved image from: while it saves it.
SAVE_STATES: tuple[str, ...] = tuple(states(SAVING_IMAGE))

#: The header with which the image server proves itself.
IMAGE_SERVER_HEADER = b"x-dit4c-image-server"
#: The header with which the file server proves itself.
FILE_SERVER_HEADER = b"x-dit4c-file-server"
#: The shortest image server (or file server) secret accepted (bytes).
MIN_SECRET = 16

#: Personal API tokens look like this (``IStore.createApiToken``); anything else is taken for a JWT.
API_TOKEN_PREFIX = "dit4c_"
SESSION_COOKIE = "dit4c_session"

READ_METHODS = frozenset({"GET", "HEAD"})
WRITE_METHODS = frozenset({"PUT", "POST"})
METHODS = READ_METHODS | WRITE_METHODS | {"DELETE"}

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class ReportError(Exception):
    """A refusal: answered as JSON ``{"error", "reason"}`` with ``status``."""

    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error

    @property
    def reason(self) -> str:
        """Safe to show and to log: never token text."""
        return str(self.args[0])


def _badRequest(reason: str) -> ReportError:
    return ReportError(400, "invalid_request", reason)


def _badToken(reason: str) -> ReportError:
    return ReportError(401, "invalid_token", reason)


# -- the rules, without I/O ----------------------------------------------------------------------


def _checkHTTPURL(value: object, what: str) -> tuple[str, Any]:
    """``value`` if it is a plain http(s) URL (no user info, query or fragment), and its parts."""
    if not isinstance(value, str) or not value:
        raise _badRequest(f"The {what} claim is missing.")
    if len(value) > MAX_URL or not value.isascii() or any(c <= " " or c == "\x7f" for c in value):
        raise _badRequest(f"The {what} claim must be an ASCII URL of at most {MAX_URL} characters.")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise _badRequest(f"The {what} claim is not a URL.") from None
    if parts.scheme not in ("http", "https"):
        raise _badRequest(f"The {what} claim must be an http or https URL.")
    if "?" in value or "#" in value:
        raise _badRequest(f"The {what} claim must have no query or fragment.")
    host = parts.hostname
    # The host as written, in lower case, and a port only if there is one:
    # no user info, no "host:" with an empty port, no upper case.
    if not host or parts.netloc not in (host, f"{host}:{port}"):
        raise _badRequest(f"The {what} claim must be http(s)://host[:port]/path, in lower case.")
    if parts.path and not parts.path.startswith("/"):
        raise _badRequest(f"The {what} claim is not a URL.")
    return value, parts


def checkInstanceURL(value: object, instanceId: str, domains: Sequence[str] | None = None) -> str:
    """
    ``value`` if it may be the public URL of instance ``instanceId``: http
    or https, and a host name that is the instance id followed by a domain
    (``<id>.<domain>``), so that no instance can claim another's name. With
    ``domains``, the domain must be one of them.

    :raises ReportError: 400 for what is not such a URL, 403 for the URL of
        another host name.
    """
    url, parts = _checkHTTPURL(value, "url")
    host: str = parts.hostname
    labels = host.split(".")
    if len(host) > 253 or any(_LABEL.fullmatch(label) is None for label in labels):
        raise _badRequest("The url claim's host must be a DNS name.")
    if labels[0] != instanceId or len(labels) < 2:
        raise ReportError(403, "wrong_host", f"The URL's host name must be {instanceId}.<domain>.")
    domain = ".".join(labels[1:])
    if domains is not None and domain not in domains:
        raise ReportError(403, "wrong_host", "The URL's domain is not one of this portal's routing domains.")
    return url


def checkImageURL(value: object, prefixes: Sequence[str] | None = None) -> str:
    """
    ``value`` if it may be where an image server stored a saved image: an
    http(s) URL, and (with ``prefixes``) under one of the image servers'
    base URLs.
    """
    url, _ = _checkHTTPURL(value, "image_url")
    if prefixes is not None and not any(url.startswith(prefix) for prefix in prefixes):
        raise ReportError(403, "wrong_image_server", "The image_url is not at one of this portal's image servers.")
    return url


def _checkDigest(value: object) -> str:
    if not isinstance(value, str) or _DIGEST.fullmatch(value) is None:
        raise _badRequest("The digest claim must be sha256: and 64 lower-case hexadecimal digits.")
    return value


def _checkName(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _badRequest("The name claim must be a string.")
    value = value.strip()
    if not value:
        return None
    if len(value) > MAX_NAME or not value.isprintable():
        raise _badRequest(f"The name claim must be at most {MAX_NAME} printable characters.")
    return value


def _unverifiedSubject(token: str) -> str:
    """
    The ``sub`` of a token not checked yet: only to find the instance whose
    key will check it. Nothing else is read before the signature holds.
    """
    if len(token) > tokens.MAX_TOKEN_LENGTH:
        raise _badToken("The token was refused: token too long.")
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except Exception:
        raise _badToken("The token was refused: malformed token.") from None
    subject = payload.get("sub") if isinstance(payload, dict) else None
    if not isinstance(subject, str) or tokens.INSTANCE_ID_RE.fullmatch(subject) is None:
        raise _badToken("The token's sub claim must be an instance id.")
    return subject


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        return None
    return value


def _cookie(header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header (RFC 6265 section 5.4)."""
    if not header:
        return None
    for pair in header.split(";"):
        key, sep, value = pair.strip().partition("=")
        if sep and key.strip() == name:
            value = value.strip().strip('"')
            return value or None
    return None


class HoldsKeys(Protocol):
    """Whatever holds the portal's key ring (``interfaces.Basics``, the portal)."""

    @property
    def keys(self) -> KeyRing: ...


def imageReadToken(holder: HoldsKeys, image: Image, lifetime: float = READ_TOKEN_LIFETIME) -> str:
    """
    A read token for ``image``: a JWT signed by the portal's current key
    (``holder.keys``) for the audience ``dit4c-image-read``, with the claim
    ``image`` (its id; ``ref`` and ``digest`` too, for the reader). A
    scheduler gives it to the node that starts an instance from a saved
    image; the image server passes it on to ``/reports/image-access``, where
    it allows reads (GET, HEAD) of that image, and of nothing else, until it
    expires, or the image is deleted.
    """
    if image.deleted:
        raise ValueError("a deleted image cannot be read")
    if not 0 < lifetime <= MAX_READ_TOKEN_LIFETIME:
        raise ValueError(f"lifetime must be more than 0 and at most {MAX_READ_TOKEN_LIFETIME} s")
    claims = {"sub": image.id, "image": image.id, "ref": image.ref, "digest": image.digest}
    token: str = holder.keys.signer().sign(claims, audience=READ_AUDIENCE, lifetime=lifetime)
    return token


def removeImageBytes(keys: KeyRing, image: Image) -> Deferred[None]:
    """
    ``DELETE`` a deleted saved image's bytes at the image server, with a
    delete token the portal signs for that digest (60 s); the image
    server asks the portal, which allows it only while no saved image
    has that digest (docs/protocols.md 8.4).
    """
    token = keys.signer().sign({"sub": image.digest, "digest": image.digest}, audience=DELETE_AUDIENCE, lifetime=60)

    async def remove() -> None:
        response = await treq.delete(image.ref, headers=Headers({"Authorization": [f"Bearer {token}"]}), timeout=10)
        await response.content()
        if response.code not in (204, 404):
            raise RuntimeError(f"the image server answered {response.code}")
        _log.info("removed the bytes of deleted image {image} ({digest})", image=image.id, digest=image.digest)

    return Deferred.fromCoroutine(remove())


class InstanceTokens:
    """
    Tokens an instance's helpers sign with the instance's own key: its
    reports here, an upload's proof, and its auth helper's watch
    (``dit4c.portal.oauth``), each for its own audience.
    """

    log = Logger()

    def __init__(self, store: IStore, clock: IReactorTime) -> None:
        self.store = store
        self.clock = clock

    async def check(self, token: str, audience: str) -> tuple[Instance, dict[str, Any]]:
        """
        The instance that signed ``token`` for ``audience``, and the token's
        claims: signature by the key the store holds for the instance named
        by ``sub`` (ES256/EdDSA only), ``exp`` at most 5 minutes after
        ``iat``, and not expired (30 s leeway).
        """
        subject = _unverifiedSubject(token)
        instance: Instance | None = await self.store.instanceById(subject)
        if instance is None or not instance.public_jwk:
            raise _badToken("The instance is unknown, or has no key yet.")
        try:
            keys = StaticKeySource({"keys": [json.loads(instance.public_jwk)]})
        except (ValueError, TypeError):
            self.log.warn("instance {instance} has an unusable public key", instance=instance.id)
            raise _badToken("The instance has no usable key.") from None
        verifier = TokenVerifier(keys, audience=audience, leeway=LEEWAY, clock=self.clock)
        try:
            claims = await verifier.verify(token)
        except tokens.InvalidToken as e:
            raise _badToken(f"The token was refused: {e.reason}.") from None
        if claims.get("sub") != instance.id:
            raise _badToken("The token's sub claim must be an instance id.")
        if not 0 < claims["exp"] - claims["iat"] <= MAX_REPORT_LIFETIME:
            raise _badToken(f"The token's exp must be at most {int(MAX_REPORT_LIFETIME)} s after its iat.")
        return instance, claims


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
    ) -> None:
        """
        :param imageServerSecret: what the image server sends in
            ``X-DIT4C-Image-Server``; None: no image server, and
            ``/reports/image-access`` answers 404. Only its SHA-256 is kept.
        :param imageServerURLs: the image servers' base URLs: a reported
            ``image_url`` must be under one of them. None: any http(s) URL.
        :param instanceDomains: the routing domains: a reported instance URL
            must be ``<id>.<one of them>``. None: any domain.
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
    def _json(request: IRequest, body: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode()

    @app.handle_errors(ReportError)
    def refused(self, request: IRequest, failure: Any) -> bytes:
        e: ReportError = failure.value
        return self._json(request, {"error": e.error, "reason": e.reason}, e.status)

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Any) -> bytes:
        if failure.check(HTTPException):
            e = failure.value
            error = {404: "not_found", 405: "method_not_allowed"}.get(e.code, "invalid_request")
            if e.code == 405:
                request.setHeader(b"allow", b"POST")
            return self._json(request, {"error": error, "reason": f"{e.name}."}, e.code)
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
            raise _badToken("The token was refused: malformed token.") from None
        if not token:
            raise _badToken("The body must be a JWT.")
        return token

    # -- instance tokens ----------------------------------------------------------------------------

    async def _report(self, request: IRequest) -> tuple[Instance, dict[str, Any]]:
        """A report's instance and claims, its ``jti`` spent: a replay is refused."""
        instance, claims = await self.instanceTokens.check(self._token(request), REPORT_AUDIENCE)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI:
            raise _badToken(f"The token needs a jti claim of 1 to {MAX_JTI} characters.")
        # Remembered for as long as the token could still verify.
        if not await self.store.spendTokenId(instance.id, jti, float(claims["exp"]) + LEEWAY):
            raise ReportError(401, "replayed", "This report was made before: its jti is used.")
        return instance, claims

    # -- POST /reports/url ------------------------------------------------------------------------------

    @app.route("/url", methods=["POST"])
    async def url(self, request: IRequest) -> bytes:
        try:
            instance, claims = await self._report(request)
            url = checkInstanceURL(claims.get("url"), instance.id, self.instanceDomains)
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
        digest = _checkDigest(claims.get("digest"))
        name = _checkName(claims.get("name"))
        if instance.state not in SAVE_STATES:
            raise self._wrongState(instance, "saving or uploading")
        if name is None:
            source = await self.store.imageById(instance.image_id)
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(self.clock.seconds()))
            name = f"{(source.name if source else 'Image')[:MAX_NAME - 30]} (saved {when} UTC)"
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
            raise _badRequest("The body is not JSON.") from None
        if not isinstance(body, dict):
            raise _badRequest("The body must be a JSON object.")
        method = body.get("method")
        if not isinstance(method, str) or method.upper() not in METHODS:
            raise _badRequest(f"method must be one of {', '.join(sorted(METHODS))}.")
        reference = body.get("image")
        if not isinstance(reference, str) or not 0 < len(reference) <= MAX_URL:
            raise _badRequest(f"image must be an image reference, id or digest of at most {MAX_URL} characters.")
        given = body.get("headers", {})
        if given is None:
            given = {}
        if not isinstance(given, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in given.items()
        ):
            raise _badRequest("headers must be an object of strings.")
        return method.upper(), reference, {k.lower(): v for k, v in given.items()}

    async def _decide(self, method: str, reference: str, headers: Mapping[str, str]) -> Decision:
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

    async def _mayWrite(self, reference: str, authorization: str | None) -> Decision:
        token = _bearer(authorization)
        if token is None:
            return _deny("Writes need a Bearer upload token signed by the instance that saves the image.")
        try:
            instance, claims = await self.instanceTokens.check(token, UPLOAD_AUDIENCE)
            digest = _checkDigest(claims.get("digest"))
        except ReportError as e:
            return _deny(f"Upload token: {e.reason}")
        if reference != digest:
            return _deny("The upload token is for another digest.")
        if instance.state not in SAVE_STATES:
            return _deny(f"Instance {instance.id} is {instance.state}, not saving or uploading.")
        return Decision(
            True, f"Instance {instance.id} is saving this image.", user=instance.owner_id,
            via="upload-token", instance=instance.id,
        )  # fmt: skip

    async def _people(self, headers: Mapping[str, str], reasons: list[str]) -> list[tuple[User, str]]:
        """The people the credentials show (API token, then session cookie); why others showed nobody."""
        found: list[tuple[User, str]] = []
        token = _bearer(headers.get("authorization"))
        if token is not None and token.startswith(API_TOKEN_PREFIX):
            user = await self.store.userByApiToken(token)
            if user is None:
                reasons.append("the API token is not valid")
            else:
                found.append((user, "api-token"))
        # A portal on https names it __Host-dit4c_session (security.CookiePolicy).
        cookies = headers.get("cookie")
        session = _cookie(cookies, "__Host-" + SESSION_COOKIE) or _cookie(cookies, SESSION_COOKIE)
        if session is not None:
            held = await self.store.sessionByToken(session)
            user = await self.store.userById(held.user_id) if held is not None else None
            if user is None or user.disabled:
                reasons.append("the portal session is not valid")
            else:
                found.append((user, "session"))
        return found

    async def _mayRead(self, images: list[Image], headers: Mapping[str, str]) -> Decision:
        reasons: list[str] = []
        token = _bearer(headers.get("authorization"))
        if token is not None and not token.startswith(API_TOKEN_PREFIX):
            try:
                claims = await self._readTokens.verify(token)
            except tokens.InvalidToken as e:
                reasons.append(f"the read token was refused: {e.reason}")
            else:
                if claims.get("image") in {image.id for image in images}:
                    return Decision(True, "A read token the portal signed for this image.", via="read-token")
                reasons.append("the read token is for another image")
        for user, via in await self._people(headers, reasons):
            for image in images:
                if await self.store.mayUseImage(user.id, image.id):
                    why = "owns it" if image.owner_id == user.id else "may use it"
                    return Decision(True, f"{user.name} {why}.", user=user.id, via=via)
            reasons.append(f"{user.name} may not use this image")
        return _deny(self._why(reasons, "Reads need a Bearer API token or read token, or a portal session."))

    async def _removal(self, reference: str, authorization: str | None) -> Decision | None:
        """
        The portal's own delete token (a saved image was deleted, and its
        bytes are to go): allowed for its digest while no saved image has
        that digest. None: not such a token.
        """
        token = _bearer(authorization)
        if token is None or token.startswith(API_TOKEN_PREFIX):
            return None
        try:
            claims = await self._deleteTokens.verify(token)
        except tokens.InvalidToken:
            return None  # perhaps another kind of token: the other rules decide
        if claims.get("digest") != reference:
            return _deny("The delete token is for another digest.")
        if await self.store.findImages(reference):
            return _deny("A saved image still has these bytes.")
        return Decision(True, "The portal deleted every image with these bytes.", via="delete-token")

    async def _mayDelete(self, images: list[Image], headers: Mapping[str, str]) -> Decision:
        reasons: list[str] = []
        for user, via in await self._people(headers, reasons):
            # Every image the reference names must be theirs: a digest two
            # people saved is not one person's to delete.
            if all(image.owner_id == user.id for image in images):
                return Decision(True, f"{user.name} owns it.", user=user.id, via=via)
            reasons.append(f"{user.name} does not own this image")
        return _deny(self._why(reasons, "Only the image's owner may delete it (API token or portal session)."))

    @staticmethod
    def _why(reasons: list[str], otherwise: str) -> str:
        if not reasons:
            return otherwise
        text = "; ".join(reasons)
        return text[0].upper() + text[1:] + "."

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
            raise _badRequest("The body is not JSON.") from None
        subject = body.get("instance") if isinstance(body, dict) else None
        if not isinstance(subject, str) or tokens.INSTANCE_ID_RE.fullmatch(subject) is None:
            raise _badRequest("instance must be an instance id.")
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
