"""
A saved image as a file: ``GET /images/{id}/download`` (a page's link) and
``GET /api/v1/images/{id}/download`` (a personal token), for whoever may
use the image (its owner, or someone it is shared with).

The portal reads it from the image server with a read token of its own
(docs/protocols.md 8.5), so the person needs no credential there, and
passes it on as it arrives: while the person's connection falls behind,
the image server's is paused (the portal never holds more than a socket's
buffers of it). The answer names the image's SHA-256 (``Repr-Digest``,
RFC 9530, and ``X-DIT4C-Digest``), so that what arrived can be checked
(``sha256sum``). If the image server's side ends early, the person's
connection is cut rather than finished, so a truncated file is never taken
for a whole one.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any, cast

import treq
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest

from dit4c.portal.errors import InstanceError, NotFound
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import Image, User
from dit4c.portal.web import finishStream, served

__all__ = ["ImageDownloads", "fileName"]

#: Seconds the image server has to start answering.
CONNECT_TIMEOUT = 30.0


class Unavailable(InstanceError):
    """The image server did not give the image (502)."""

    status = 502
    code = "unavailable"


def fileName(image: Image) -> str:
    """What the browser saves the image as: its name, tamed, as an OCI archive."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", image.name).strip("-.")[:80] or "image"
    return f"{stem}.oci.tar"


def digestHeaders(digest: str) -> dict[bytes, bytes]:
    """``sha256:<hex>`` as the answer's headers."""
    algorithm, _, hexDigest = digest.partition(":")
    if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexDigest):
        return {}
    encoded = base64.b64encode(bytes.fromhex(hexDigest)).decode("ascii")
    return {b"repr-digest": f"sha-256=:{encoded}:".encode(), b"x-dit4c-digest": digest.encode()}


class _ToRequest(Protocol):
    """The image server's body into the person's answer; the image server paused while the person lags."""

    def __init__(self, request: IRequest, done: Deferred[bool]) -> None:
        """:param done: fires with whether the whole body came."""
        self.request = request
        self.done = done

    def connectionMade(self) -> None:
        served(self.request).registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if served(self.request).channel is not None:  # the person is still there
            served(self.request).unregisterProducer()
        self.done.callback(reason.check(ResponseDone) is not None)


class ImageDownloads:
    """Saved images, read from the image server and passed on."""

    log = Logger()

    def __init__(self, store: IStore, readToken: Callable[[Image], str]) -> None:
        """:param readToken: a read token for an image (``reportrules.imageReadToken``)."""
        self.store = store
        self.readToken = readToken

    async def send(self, request: IRequest, user: User, imageId: str) -> bytes | None:
        """
        The image ``imageId`` as ``request``'s answer, if ``user`` may use it;
        ``None`` once it is under way (the answer ends when the image does).
        """
        image = await self.store.imageById(imageId)
        if (
            image is None
            or image.deleted
            or not image.ref.startswith(("http://", "https://"))
            or not await self.store.mayUseImage(user.id, image.id)
        ):
            raise NotFound("There is no such saved image of yours or shared with you.")
        try:
            response: Any = await treq.get(
                image.ref,
                headers=Headers({"Authorization": [f"Bearer {self.readToken(image)}"]}),
                unbuffered=True,
                timeout=CONNECT_TIMEOUT,
            )
        except Exception as e:
            self.log.warn("image {image}: the image server is away: {error}", image=image.id, error=str(e))
            raise Unavailable("The image server is not answering; try again later.") from None
        if response.code != 200:
            await response.content()
            self.log.warn("image {image}: the image server answered {code}", image=image.id, code=response.code)
            raise Unavailable(f"The image server answered {response.code}.")
        request.setHeader(b"content-type", b"application/x-tar")
        request.setHeader(b"content-disposition", f'attachment; filename="{fileName(image)}"'.encode())
        request.setHeader(b"cache-control", b"no-store")
        for name, value in digestHeaders(image.digest or "").items():
            request.setHeader(name, value)
        if isinstance(response.length, int):
            request.setHeader(b"content-length", str(response.length).encode())
        done: Deferred[bool] = Deferred()
        body = _ToRequest(request, done)
        response.deliverBody(body)
        # The person gone: stop reading the image server.
        served(request).notifyFinish().addErrback(lambda _: cast(IPushProducer, body.transport).stopProducing())
        whole = await done
        if served(request).finished or served(request)._disconnected:
            return None
        if whole:
            finishStream(request)
        else:
            self.log.warn("image {image}: the image server's answer ended early", image=image.id)
            served(request).transport.abortConnection()  # type: ignore[union-attr]
        return None
