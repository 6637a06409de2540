"""
The auth helper's rules without I/O: PKCE, the signed flow cookie, cookie
headers, which local path to go back to, and what a request looks like
(docs/protocols.md section 10).

Nothing here touches the network or the global clock: time comes in as a
number, keys as bytes, so every rule is testable on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from itsdangerous import (
    BadData,
    BadSignature,
    SignatureExpired,
    TimestampSigner,
    URLSafeTimedSerializer,
    want_bytes,
)

from dit4c.auth.errors import InvalidFlow
from dit4c.common.keys import loadPrivateKey
from dit4c.common.nextpath import safeNext
from dit4c.common.pkce import newVerifier

__all__ = [
    "CALLBACK_PATH",
    "FLOW_COOKIE",
    "FLOW_LIFETIME",
    "LOCAL_PREFIX",
    "SESSION_COOKIE",
    "Flow",
    "FlowCookies",
    "clearCookie",
    "deriveKey",
    "isNavigation",
    "parseCookies",
    "safeNext",
    "setCookie",
    "stripCookies",
]

#: The session cookie: the portal's access token for this instance.
SESSION_COOKIE = b"dit4c_auth"
#: The cookie that binds a login in progress to this browser.
FLOW_COOKIE = b"dit4c_auth_flow"
#: Every path under this belongs to the auth helper, never to the tool.
LOCAL_PREFIX = b"/.dit4c/"
#: Where the portal sends the browser back (docs/protocols.md 6.1).
CALLBACK_PATH = b"/.dit4c/callback"
#: Seconds a login may take, from the redirect to the portal to the callback.
FLOW_LIFETIME = 600

_FLOW_VERSION = "v1"
#: itsdangerous' salt for the flow cookie: its signing key is HMAC-SHA256(key, salt).
_FLOW_SALT = b"dit4c-helper-auth.flow-cookie." + _FLOW_VERSION.encode("ascii")


# -- keys ----------------------------------------------------------------------------------------


def deriveKey(keyFile: str | Path, instance: str, purpose: str) -> bytes:
    """
    A 256-bit HMAC key for ``purpose``, derived (HKDF-SHA256) from the
    instance's private key, so every run of the helper for this instance,
    and only it, has the same one. The private key itself is never used to
    MAC anything.
    """
    key = loadPrivateKey(keyFile)
    material = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"dit4c-helper-auth",
        info=f"{purpose}:{instance}".encode(),
    )
    return hkdf.derive(material)


# -- the flow cookie -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    """A login in progress: what the callback needs to finish it."""

    #: The OAuth ``state`` sent to the portal.
    state: str
    #: The PKCE code verifier whose challenge was sent.
    verifier: str
    #: The local path to return to.
    next: str
    #: When the flow stops being valid (seconds since the epoch).
    expires: int


class _FlowSigner(TimestampSigner):
    """
    itsdangerous' timestamped HMAC signer, with SHA-256 and HMAC key
    derivation pinned, reading the time it is given instead of the global
    clock (the module's rules take time as a number), and comparing the
    signature as text: itsdangerous decodes it first, and base64 ignores
    the spare bits of its last character, so four spellings of one
    signature would pass; compared as text, exactly one cookie is ours.
    """

    def __init__(self, secretKey: bytes, salt: bytes, now: float) -> None:
        super().__init__(secretKey, salt=salt, key_derivation="hmac", digest_method=hashlib.sha256)
        self._now = now

    def get_timestamp(self) -> int:
        return int(self._now)

    def verify_signature(self, value: str | bytes, sig: str | bytes) -> bool:
        return hmac.compare_digest(want_bytes(sig), self.get_signature(value))


class FlowCookies:
    """
    Makes and checks flow cookies: ``v1.<token>``, where token is
    itsdangerous' URL-safe timed serialization of the JSON ``{"s": state,
    "v": verifier, "n": next}``, signed with HMAC-SHA256 (docs/protocols.md
    10.1). The version names the salt, so a token is never read under
    another version's rules.
    """

    def __init__(self, key: bytes, lifetime: int = FLOW_LIFETIME) -> None:
        if len(key) < 32:
            raise ValueError("the flow cookie key must be at least 256 bits")
        self._key = key
        self.lifetime = lifetime

    def _serializer(self, now: float) -> URLSafeTimedSerializer:
        return URLSafeTimedSerializer(
            self._key, salt=_FLOW_SALT, signer=_FlowSigner, signer_kwargs={"now": now}
        )

    def start(self, next: str, now: float) -> tuple[Flow, bytes]:
        """A fresh flow returning to ``next``, and its cookie value."""
        flow = Flow(
            state=secrets.token_urlsafe(32),
            verifier=newVerifier(),
            next=safeNext(next),
            expires=int(now) + self.lifetime,
        )
        token = self._serializer(now).dumps({"s": flow.state, "v": flow.verifier, "n": flow.next})
        return flow, f"{_FLOW_VERSION}.{token}".encode("ascii")

    def check(self, value: bytes | None, state: str | None, now: float) -> Flow:
        """
        The flow in cookie ``value``, if its MAC is ours, it has not
        expired, and its state equals ``state`` (the callback's).

        :raises InvalidFlow: otherwise; the message says which, without secrets.
        """
        if not value:
            raise InvalidFlow("There is no login in progress in this browser.")
        try:
            version, dot, token = value.decode("ascii").partition(".")
        except UnicodeDecodeError:
            raise InvalidFlow("The login cookie is malformed.") from None
        if not dot:
            raise InvalidFlow("The login cookie is malformed.")
        if version != _FLOW_VERSION:
            raise InvalidFlow("The login cookie was not made here.")
        try:
            # A flow made at t is good while now < t + lifetime; itsdangerous
            # refuses once its age (whole seconds) is over max_age.
            data, signed = self._serializer(now).loads(
                token, max_age=self.lifetime - 1, return_timestamp=True
            )
            flow = Flow(
                str(data["s"]),
                str(data["v"]),
                safeNext(str(data["n"])),
                int(signed.timestamp()) + self.lifetime,
            )
        except SignatureExpired:
            raise InvalidFlow("The login took too long.") from None
        except BadSignature:
            raise InvalidFlow("The login cookie was not made here.") from None
        except (BadData, KeyError, TypeError, ValueError):
            raise InvalidFlow("The login cookie is malformed.") from None
        if not state or not hmac.compare_digest(state.encode("utf-8"), flow.state.encode("ascii")):
            raise InvalidFlow("The answer from the portal does not belong to the login started in this browser.")
        return flow


# -- cookies ---------------------------------------------------------------------------------------


def parseCookies(headers: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The ``(name, value)`` pairs of ``Cookie`` header values, in order."""
    pairs = []
    for header in headers:
        for part in header.split(b";"):
            part = part.strip()
            if not part:
                continue
            name, _, value = part.partition(b"=")
            pairs.append((name.strip(), value.strip()))
    return pairs


def stripCookies(headers: list[bytes], names: frozenset[bytes]) -> bytes | None:
    """
    One ``Cookie`` header value holding every cookie of ``headers`` except
    those named in ``names``, byte for byte as sent; None if none is left.
    """
    kept = []
    for header in headers:
        for part in header.split(b";"):
            part = part.strip()
            if part and part.partition(b"=")[0].strip() not in names:
                kept.append(part)
    return b"; ".join(kept) or None


def setCookie(name: bytes, value: bytes, *, secure: bool, maxAge: int) -> bytes:
    """A ``Set-Cookie`` value: host-only (no Domain), Path=/, HttpOnly, SameSite=Lax."""
    parts = [name + b"=" + value, b"Path=/", b"HttpOnly", b"SameSite=Lax", b"Max-Age=%d" % maxAge]
    if secure:
        parts.append(b"Secure")
    return b"; ".join(parts)


def clearCookie(name: bytes, *, secure: bool) -> bytes:
    return setCookie(name, b"", secure=secure, maxAge=0)


# -- requests --------------------------------------------------------------------------------------


def isNavigation(method: bytes, headers: list[tuple[bytes, bytes]], upgrade: bool) -> bool:
    """
    Whether a request is a browser loading a page, which may be sent to log
    in: a GET or HEAD, not an Upgrade, that says it navigates
    (``Sec-Fetch-Mode: navigate``) or accepts HTML. Anything else (fetch,
    XHR, WebSocket, a script) gets a 401 instead, since a redirect to a
    login page would mean nothing to it.
    """
    if upgrade or method not in (b"GET", b"HEAD"):
        return False
    mode = dest = None
    accept = b""
    for name, value in headers:
        lname = name.lower()
        if lname == b"sec-fetch-mode":
            mode = value.strip().lower()
        elif lname == b"sec-fetch-dest":
            dest = value.strip().lower()
        elif lname == b"accept":
            accept += value.lower()
    if mode is not None:
        return mode == b"navigate" and dest in (None, b"document")
    return b"text/html" in accept


_HOST = re.compile(rb"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def publicBase(host: bytes | None, proto: bytes | None) -> str | None:
    """
    ``<scheme>://<host>`` as the browser reached this instance (the Host
    header, and the routing server's ``X-Forwarded-Proto``), or None if the
    Host header is not a plain host name and port. The portal compares the
    redirect URI built from it with the one it holds, byte for byte, so a
    forged Host only makes the login fail.
    """
    if host is None or _HOST.fullmatch(host) is None:
        return None
    scheme = "https" if proto is not None and proto.strip().lower() == b"https" else "http"
    return f"{scheme}://{host.decode('ascii')}"
