"""
What every connection of the image server shares (:class:`ImageServer`:
the storage, the portal gate, the limits) and what a request is about
(:func:`route`, :func:`credentials`).

Both the requests that take over a body at the end of its head
(:mod:`dit4c.imageserver.uploads`) and the resource that answers them
(:mod:`dit4c.imageserver.web`) read these, so they stand below both.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.web.server import Request

from dit4c.imageserver.errors import MethodNotAllowed, NotFound
from dit4c.imageserver.metrics import ImageServerMetrics
from dit4c.imageserver.portal import PortalGate
from dit4c.imageserver.storage import NEW_IMAGE, IImageStorage, parseDigest

__all__ = [
    "DEFAULT_MAX_SIZE",
    "HEALTH_METHODS",
    "IMAGE_METHODS",
    "LINGER_BYTES",
    "LINGER_TIME",
    "ImageServer",
    "clientAddress",
    "connectionTransport",
    "credentials",
    "route",
]

#: The largest image accepted unless configured otherwise: 20 GiB.
DEFAULT_MAX_SIZE = 20 * 1024**3
#: After an answer sent before the body was read, how long (seconds) and how
#: many more body bytes the connection is read (and dropped) so that the
#: client reads the answer before the connection closes under it.
LINGER_TIME = 2.0
LINGER_BYTES = 1024 * 1024

IMAGE_METHODS = (b"GET", b"HEAD", b"PUT", b"DELETE")
HEALTH_METHODS = (b"GET", b"HEAD")


class ImageServer:
    """
    What every connection of the image server shares: the storage, the
    portal gate, the limits, the public base URL (for the ``url`` of an
    upload's answer), and the figures every request counts itself in
    (``metrics``; its own unless given).
    """

    def __init__(
        self,
        reactor: Any,
        storage: IImageStorage,
        gate: PortalGate,
        *,
        publicURL: str | None = None,
        maxSize: int = DEFAULT_MAX_SIZE,
        lingerTime: float = LINGER_TIME,
        lingerBytes: int = LINGER_BYTES,
        metrics: ImageServerMetrics | None = None,
    ) -> None:
        self.reactor = reactor
        self.storage = storage
        self.gate = gate
        self.publicURL = publicURL.rstrip("/") if publicURL else None
        self.maxSize = maxSize
        self.lingerTime = lingerTime
        self.lingerBytes = lingerBytes
        self.metrics = metrics if metrics is not None else ImageServerMetrics()

    def imageURL(self, digest: str) -> str:
        return f"{self.publicURL or ''}/images/{digest}"


def route(method: bytes, target: bytes) -> tuple[str, str | None]:
    """
    What a request is about: ``("health", None)``, ``("image", digest)``,
    or ``("image", NEW_IMAGE)`` for ``POST /images``: an upload whose digest
    is known only once it is in (the portal's, of a file a person uploads).

    :raises ImageServerError: ``404`` for another path, ``405`` for another
        method, ``400`` for a malformed digest.
    """
    path = target.split(b"?", 1)[0]
    if path == b"/health":
        if method not in HEALTH_METHODS:
            raise MethodNotAllowed(b", ".join(HEALTH_METHODS))
        return "health", None
    if path == b"/images" and method == b"POST":
        return "image", NEW_IMAGE
    if path.startswith(b"/images/"):
        if method not in IMAGE_METHODS:
            raise MethodNotAllowed(b", ".join(IMAGE_METHODS))
        name = unquote_to_bytes(path[len(b"/images/"):]).decode("latin-1")
        parseDigest(name)
        return "image", name
    raise NotFound("Not found.")


def credentials(request: Any) -> dict[str, str]:
    """The request's ``authorization`` and ``cookie`` headers, for the portal."""
    found: dict[str, str] = {}
    authorization = request.requestHeaders.getRawHeaders(b"authorization")
    if authorization:
        found["authorization"] = authorization[0].decode("latin-1")
    cookies = request.requestHeaders.getRawHeaders(b"cookie")
    if cookies:
        found["cookie"] = "; ".join(c.decode("latin-1") for c in cookies)
    return found



def connectionTransport(request: Request) -> Any:
    """The connection's transport (TCP or TLS): a consumer, a push producer, abortable."""
    return request.channel.transport


def clientAddress(request: Request) -> str:
    """The client's address, for the log."""
    return str(getattr(request.getClientAddress(), "host", "unknown"))
