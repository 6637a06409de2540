"""
The image server's HTTP side (docs/protocols.md section 12).

A request never spools its body: :class:`~dit4c.imageserver.uploads.ImageRequest`
takes over at the end of the head, asks the portal before it reads an
upload, and streams the upload to the storage as it arrives
(:mod:`dit4c.imageserver.uploads`).

When the body is complete, the resource (:class:`ImageResource`) commits
the upload: stored under its digest if the SHA-256 of what arrived
matches. ``GET``, ``HEAD`` and ``DELETE`` ask the portal in the resource,
then stream the image from the storage (one ``Range`` honoured, for
resumable downloads) or remove it. Every storage call returns a Deferred:
the storage may be remote (:mod:`dit4c.imageserver.s3`). What every
connection shares (:class:`~dit4c.imageserver.server.ImageServer`) and
what a request is about (:func:`~dit4c.imageserver.server.route`) are in
:mod:`dit4c.imageserver.server`; every name of it and of the uploads'
module is importable from here too.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from dit4c.common.httpfront import FrontLimits
from dit4c.common.httpsite import FrontSite, SiteLimits
from dit4c.imageserver.errors import ImageServerError, MethodNotAllowed, NotFound, Refused
from dit4c.imageserver.metrics import CountingConsumer, outcomeOf
from dit4c.imageserver.server import (
    DEFAULT_MAX_SIZE,
    HEALTH_METHODS,
    IMAGE_METHODS,
    LINGER_BYTES,
    LINGER_TIME,
    ImageServer,
    clientAddress,
    connectionTransport,
    credentials,
    route,
)
from dit4c.imageserver.uploads import MAX_OTHER_BODY, ImageRequest

__all__ = [
    "DEFAULT_MAX_SIZE",
    "DIGEST_HEADER",
    "HEALTH_METHODS",
    "IMAGE_METHODS",
    "LINGER_BYTES",
    "LINGER_TIME",
    "MAX_OTHER_BODY",
    "ImageRequest",
    "ImageResource",
    "ImageServer",
    "ImageSite",
    "byteRange",
    "credentials",
    "route",
]

DIGEST_HEADER = b"X-DIT4C-Digest"


def byteRange(request: Any, size: int) -> tuple[int, int]:
    """
    The part of an image of ``size`` bytes that a ``GET`` asks for:
    ``(offset, length)``; sets ``206`` and ``Content-Range`` for one
    satisfiable ``Range: bytes=...``, and answers ``416`` for an
    unsatisfiable one (``length`` 0). Several ranges, or a malformed or
    unknown header, get the whole image (RFC 9110 lets a server ignore
    ``Range``).
    """
    header = request.getHeader(b"range")
    whole = (0, size)
    if header is None:
        return whole
    unit, sep, spec = header.partition(b"=")
    if not sep or unit.strip().lower() != b"bytes" or b"," in spec:
        return whole
    first, dash, last = spec.strip().partition(b"-")
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()) or not (first or last):
        return whole
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return whole
    else:
        start, end = max(size - int(last), 0), size - 1
    if start >= size or end < start:
        request.setResponseCode(http.REQUESTED_RANGE_NOT_SATISFIABLE)
        request.setHeader(b"content-range", b"bytes */%d" % size)
        return 0, 0
    request.setResponseCode(http.PARTIAL_CONTENT)
    request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, end, size))
    return start, end - start + 1


class ImageResource(Resource):
    """``/health`` and ``/images/sha256:<hex>``: every image request asks the portal first."""

    isLeaf = True
    log = Logger()

    def __init__(self, server: ImageServer) -> None:
        super().__init__()
        self.images = server

    def render(self, request: Any) -> Any:
        try:
            what, digest = route(request.method, request.path)
        except ImageServerError as e:
            return self._error(request, e)
        if what == "health":
            return self._json(request, 200, {"status": "ok"})
        assert digest is not None
        d = Deferred.fromCoroutine(self._serve(request, digest))
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    async def _serve(self, request: ImageRequest, digest: str) -> None:
        method = request.method
        outcome = "failed"
        try:
            if request.upload is not None:  # PUT, or POST /images
                await self._put(request, digest)
                return
            outcome = await self._answer(request, digest)
        except ImageServerError as e:
            outcome = outcomeOf(e)
            if not request._disconnected and not request.finished:
                if request.startedWriting:
                    connectionTransport(request).abortConnection()
                    return
                request.responseHeaders.removeHeader(b"content-range")
                request.responseHeaders.removeHeader(b"content-length")
                request.write(self._error(request, e))
                request.finish()
        finally:
            # The one place a GET, HEAD or DELETE is counted, however it ended;
            # an upload counts itself where its end is decided (dit4c.imageserver.uploads).
            if request.upload is None:
                self.images.metrics.answered(method, outcome)

    async def _answer(self, request: ImageRequest, digest: str) -> str:
        """``GET``, ``HEAD`` or ``DELETE``, once the portal allows it: how it ended (dit4c.imageserver.metrics)."""
        method = request.method
        decision = await self.images.gate.ask(method.decode("ascii"), digest, credentials(request))
        if request._disconnected:
            return "cut_off"
        if not decision.allowed:
            self.log.info(
                "{method} {digest} from {client} refused: {reason}",
                method=method.decode("ascii"), digest=digest, client=clientAddress(request),
                reason=decision.reason,
            )  # fmt: skip
            raise Refused(decision.reason)
        if method == b"DELETE":
            if not await self.images.storage.delete(digest):
                raise NotFound()
            self.log.info("deleted {digest} ({reason})", digest=digest, reason=decision.reason)
            request.setResponseCode(204)
            request.responseHeaders.removeHeader(b"content-type")
            request.finish()
            return "deleted"
        return await self._send(request, digest)

    async def _put(self, request: ImageRequest, digest: str) -> None:
        upload = request.upload
        if upload is None:  # pragma: no cover - gotLength starts every PUT's upload
            raise ImageServerError()
        committed = await upload.bodyComplete()
        if request._disconnected:
            return
        body = {"digest": committed.digest, "size": committed.size, "url": self.images.imageURL(committed.digest)}
        request.setHeader(b"location", self.images.imageURL(committed.digest).encode("ascii"))
        request.write(self._json(request, 201 if committed.created else 200, body))
        request.finish()

    async def _send(self, request: ImageRequest, digest: str) -> str:
        """
        ``GET`` or ``HEAD``: the image (``200``), one range of it (``206``),
        streamed from the storage as the connection takes it (its bytes
        counted as they go); how it ended.
        """
        storage = self.images.storage
        info = await storage.stat(digest)
        if request._disconnected:
            return "cut_off"
        if info is None:
            raise NotFound()
        request.setHeader(DIGEST_HEADER, digest.encode("ascii"))
        request.setHeader(b"cache-control", b"private, no-cache")
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"content-type", b"application/octet-stream")
        if info.modified is not None and request.setLastModified(info.modified) is http.CACHED:
            request.finish()
            return "not_modified"
        offset, length = 0, info.size
        if request.method == b"GET":
            offset, length = byteRange(request, info.size)
        request.setHeader(b"content-length", b"%d" % length)
        if request.method == b"HEAD" or length == 0:
            request.finish()
            return "range_not_satisfiable" if request.code == http.REQUESTED_RANGE_NOT_SATISFIABLE else "sent"
        reading = storage.read(digest, CountingConsumer(request, self.images.metrics), offset, length)
        request.notifyFinish().addErrback(lambda _: reading.cancel())
        try:
            await reading
        except CancelledError:
            return "cut_off"
        except ImageServerError:
            raise
        except Exception:
            self.log.failure("reading {digest} failed", digest=digest)
            if not request._disconnected:
                if request.startedWriting:
                    # Headers and part of the body are out: the client must see a broken response.
                    connectionTransport(request).abortConnection()
                    return "failed"
                raise ImageServerError("The image could not be read; try again.") from None
            return "cut_off"
        if request._disconnected:
            return "cut_off"
        request.finish()
        return "sent"

    def _failed(self, failure: Failure, request: ImageRequest) -> None:
        self.log.failure("image request failed: {method} {path}", failure, method=request.method, path=request.path)
        if not request._disconnected and not request.finished:
            request.write(self._error(request, ImageServerError("The image server failed; try again.")))
            request.finish()

    @staticmethod
    def _json(request: Any, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode("utf-8")

    def _error(self, request: Any, error: ImageServerError) -> bytes:
        if isinstance(error, MethodNotAllowed):
            request.setHeader(b"allow", error.allow)
        return self._json(request, error.status, error.body())


class ImageSite(FrontSite):
    """
    The image server's site: :class:`ImageRequest` for every request, behind
    the public-front rules (dit4c.common.httpsite: a head complete within
    10 s of its first byte, ``timeout`` for an idle connection or a stalled
    upload, httptools' head rules). Bodies are the requests' own: an
    upload's goes to the storage as it arrives, any other is refused past a
    little. HTTP/1.1 only: an upload's body is taken over at the end of its
    head (ImageRequest.gotLength), which HTTP/2 streams do differently.
    """

    def __init__(self, server: ImageServer, *, timeout: float = 60.0) -> None:
        super().__init__(
            ImageResource(server),
            reactor=server.reactor,
            requestFactory=ImageRequest,
            limits=SiteLimits(
                front=FrontLimits(idleTimeout=timeout), lingerTime=server.lingerTime, lingerBytes=server.lingerBytes
            ),
            serverName="DIT4C image server",
        )
        self.server = server
        self.noisy = False

