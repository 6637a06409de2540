"""
What an instance's reports, and the image and file servers' questions, are
checked against, without the endpoints (``dit4c.portal.reports``): the
tokens' audiences and limits, the refusals (:class:`ReportError`, in
:mod:`dit4c.portal.errors`), the
rules for a reported URL, digest or name, the check of a token an instance
signed with its own key (:class:`InstanceTokens`, which the OAuth server's
watch uses too), and the tokens the portal signs for the image server (a
saved image's read token; the request that removes a deleted image's bytes).

Nothing here logs a token: only instance ids, image ids and short reasons.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
import treq
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from dit4c.common import tokens
from dit4c.common.errors import InvalidToken
from dit4c.common.life import SAVING_IMAGE, states
from dit4c.common.tokens import StaticKeySource, TokenVerifier
from dit4c.portal.errors import ReportError
from dit4c.portal.keys import KeyRing
from dit4c.portal.store.interfaces import IInstances, IStore
from dit4c.portal.store.model import Image, Instance, User

__all__ = [
    "API_TOKEN_PREFIX",
    "DELETE_AUDIENCE",
    "FILE_SERVER_HEADER",
    "IMAGE_SERVER_HEADER",
    "LEEWAY",
    "MAX_JTI",
    "MAX_NAME",
    "MAX_REPORT_LIFETIME",
    "MAX_URL",
    "METHODS",
    "MIN_SECRET",
    "READ_AUDIENCE",
    "READ_METHODS",
    "REPORT_AUDIENCE",
    "SAVE_STATES",
    "SESSION_COOKIE",
    "UPLOAD_AUDIENCE",
    "WRITE_METHODS",
    "HoldsKeys",
    "InstanceTokens",
    "badRequest",
    "badToken",
    "bearerToken",
    "checkDigest",
    "checkImageURL",
    "checkInstanceURL",
    "checkName",
    "isOnionV3",
    "savedName",
    "cookieValue",
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
_BASE32 = re.compile(r"[a-z2-7]{56}")


def badRequest(reason: str) -> ReportError:
    return ReportError(400, "invalid_request", reason)


def badToken(reason: str) -> ReportError:
    return ReportError(401, "invalid_token", reason)


# -- the rules, without I/O ----------------------------------------------------------------------


def _checkHTTPURL(value: object, what: str) -> tuple[str, str]:
    """``value`` if it is a plain http(s) URL (no user info, query or fragment), and its host."""
    if not isinstance(value, str) or not value:
        raise badRequest(f"The {what} claim is missing.")
    if len(value) > MAX_URL or not value.isascii() or any(c <= " " or c == "\x7f" for c in value):
        raise badRequest(f"The {what} claim must be an ASCII URL of at most {MAX_URL} characters.")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise badRequest(f"The {what} claim is not a URL.") from None
    if parts.scheme not in ("http", "https"):
        raise badRequest(f"The {what} claim must be an http or https URL.")
    if "?" in value or "#" in value:
        raise badRequest(f"The {what} claim must have no query or fragment.")
    host = parts.hostname
    # The host as written, in lower case, and a port only if there is one:
    # no user info, no "host:" with an empty port, no upper case.
    if not host or parts.netloc not in (host, f"{host}:{port}"):
        raise badRequest(f"The {what} claim must be http(s)://host[:port]/path, in lower case.")
    if parts.path and not parts.path.startswith("/"):
        raise badRequest(f"The {what} claim is not a URL.")
    return value, host


def isOnionV3(host: str) -> bool:
    """
    Whether ``host`` is a Tor v3 onion service's name: 56 base32
    characters (the service's ed25519 public key, a two-byte checksum and
    the version, 3) then ``.onion``, with a checksum that holds, so that a
    name made up is told from one Tor can reach.
    """
    label, dot, tld = host.partition(".")
    if tld != "onion" or not dot or len(label) != 56 or _BASE32.fullmatch(label) is None:
        return False
    raw = base64.b32decode(label.upper())
    key, checksum, version = raw[:32], raw[32:34], raw[34:]
    return version == b"\x03" and hashlib.sha3_256(b".onion checksum" + key + version).digest()[:2] == checksum


def checkInstanceURL(value: object, instanceId: str, domains: Sequence[str] | None = None, *, onion: bool = False) -> str:
    """
    ``value`` if it may be the public URL of instance ``instanceId``: http
    or https, and a host name that is the instance id followed by a domain
    (``<id>.<domain>``), so that no instance can claim another's name. With
    ``domains``, the domain must be one of them. With ``onion``, a Tor v3
    onion service's name (``<56 characters>.onion``) too: the listener
    publishes the instance as an onion service of its own, whose name is
    its key's and cannot hold the instance id; only the instance's key
    signs the report, so an instance sets its own URL and no other's.

    :raises ReportError: 400 for what is not such a URL, 403 for the URL of
        another host name (any ``.onion`` name where onion URLs are not
        taken, and a name that is not a v3 onion service's).
    """
    url, host = _checkHTTPURL(value, "url")
    if host.endswith(".onion"):
        if not onion:
            raise ReportError(403, "wrong_host", "This portal takes no .onion URLs.")
        if not isOnionV3(host):
            raise ReportError(403, "wrong_host", "The URL's host is not a Tor v3 onion service's name.")
        return url
    labels = host.split(".")
    if len(host) > 253 or any(_LABEL.fullmatch(label) is None for label in labels):
        raise badRequest("The url claim's host must be a DNS name.")
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


def checkDigest(value: object) -> str:
    if not isinstance(value, str) or _DIGEST.fullmatch(value) is None:
        raise badRequest("The digest claim must be sha256: and 64 lower-case hexadecimal digits.")
    return value


def savedName(source: str, when: str) -> str:
    """
    A saved image's name: its tool's, and when it was saved. An image saved
    from a restored one is named for the tool, not for every save before
    (``Notes (saved 1) (saved 2)``).
    """
    base = re.sub(r"( \(saved [^()]*\))+$", "", source)[: MAX_NAME - 30]
    return f"{base} (saved {when})"


def checkName(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise badRequest("The name claim must be a string.")
    value = value.strip()
    if not value:
        return None
    if len(value) > MAX_NAME or not value.isprintable():
        raise badRequest(f"The name claim must be at most {MAX_NAME} printable characters.")
    return value


def _unverifiedSubject(token: str) -> str:
    """
    The ``sub`` of a token not checked yet: only to find the instance whose
    key will check it. Nothing else is read before the signature holds.
    """
    if len(token) > tokens.MAX_TOKEN_LENGTH:
        raise badToken("The token was refused: token too long.")
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except Exception:
        raise badToken("The token was refused: malformed token.") from None
    subject = payload.get("sub") if isinstance(payload, dict) else None
    if not isinstance(subject, str) or tokens.INSTANCE_ID_RE.fullmatch(subject) is None:
        raise badToken("The token's sub claim must be an instance id.")
    return subject


def bearerToken(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        return None
    return value


def cookieValue(header: str | None, name: str) -> str | None:
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

    def __init__(self, store: IInstances, clock: IReactorTime) -> None:
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
        instance = await self.store.instanceById(subject)
        if instance is None or not instance.public_jwk:
            raise badToken("The instance is unknown, or has no key yet.")
        try:
            keys = StaticKeySource({"keys": [json.loads(instance.public_jwk)]})
        except (ValueError, TypeError):
            self.log.warn("instance {instance} has an unusable public key", instance=instance.id)
            raise badToken("The instance has no usable key.") from None
        verifier = TokenVerifier(keys, audience=audience, leeway=LEEWAY, clock=self.clock)
        try:
            claims = await verifier.verify(token)
        except InvalidToken as e:
            raise badToken(f"The token was refused: {e.reason}.") from None
        if claims.get("sub") != instance.id:
            raise badToken("The token's sub claim must be an instance id.")
        if not 0 < claims["exp"] - claims["iat"] <= MAX_REPORT_LIFETIME:
            raise badToken(f"The token's exp must be at most {int(MAX_REPORT_LIFETIME)} s after its iat.")
        return instance, claims


async def peopleIn(store: IStore, headers: Mapping[str, str], reasons: list[str]) -> list[tuple[User, str]]:
    """
    The people a request's credentials show (an API token, then a portal
    session cookie), each with how (``api-token``, ``session``); why the
    others showed nobody is added to ``reasons``.
    """
    found: list[tuple[User, str]] = []
    token = bearerToken(headers.get("authorization"))
    if token is not None and token.startswith(API_TOKEN_PREFIX):
        user = await store.userByApiToken(token)
        if user is None:
            reasons.append("the API token is not valid")
        else:
            found.append((user, "api-token"))
    # A portal on https names it __Host-dit4c_session (security.CookiePolicy).
    cookies = headers.get("cookie")
    session = cookieValue(cookies, "__Host-" + SESSION_COOKIE) or cookieValue(cookies, SESSION_COOKIE)
    if session is not None:
        held = await store.sessionByToken(session)
        user = await store.userById(held.user_id) if held is not None else None
        if user is None or user.disabled:
            reasons.append("the portal session is not valid")
        else:
            found.append((user, "session"))
    return found


def why(reasons: list[str], otherwise: str) -> str:
    """Reasons as one sentence for a refusal; ``otherwise`` when there are none."""
    if not reasons:
        return otherwise
    text = "; ".join(reasons)
    return text[0].upper() + text[1:] + "."
