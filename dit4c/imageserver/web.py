"""
The image server's HTTP side (docs/protocols.md section 12).

twisted.web reads a request's whole body (into memory or a temporary
file) before a resource sees the request. An image may be many gigabytes,
and an upload nobody allowed should cost no more than its head, so
:class:`ImageRequest` takes over at the end of the head (``gotLength``):

- ``PUT /images/sha256:<hex>``: the connection stops reading
  (``pauseProducing``) while the portal is asked; on a yes, the bytes
  already read and every later chunk go straight to the storage's writer
  (which hashes them), and reading resumes; on a no, the answer is sent at
  once and the connection closes, the body unread. ``Expect:
  100-continue`` is honoured only once the portal said yes.
- any other request: a body is not wanted; more than a little of one is
  refused (``413``) as it arrives.

When the body is complete, the resource (:class:`ImageResource`) commits
the upload: stored under its digest if the SHA-256 of what arrived
matches. ``GET``, ``HEAD`` and ``DELETE`` ask the portal in the resource,
then stream the image from the storage (one ``Range`` honoured, for
resumable downloads) or remove it. Every storage call returns a Deferred:
the storage may be remote (:mod:`dit4c.imageserver.s3`).
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from dit4c.common.httpfront import FrontLimits
from dit4c.common.httpsite import FrontSite, SiteLimits
from dit4c.imageserver.errors import (
    ImageServerError,
    MethodNotAllowed,
    NotFound,
    PortalUnavailable,
    Refused,
    TooLarge,
)
from dit4c.imageserver.portal import Decision, PortalGate
from dit4c.imageserver.storage import Committed, IImageStorage, IImageWriter, parseDigest

__all__ = ["DEFAULT_MAX_SIZE", "ImageRequest", "ImageResource", "ImageServer", "ImageSite", "route"]

#: The largest image accepted unless configured otherwise: 20 GiB.
DEFAULT_MAX_SIZE = 20 * 1024**3
#: The most body bytes a request other than an upload may carry.
MAX_OTHER_BODY = 64 * 1024
#: After an answer sent before the body was read, how long (seconds) and how
#: many more body bytes the connection is read (and dropped) so that the
#: client reads the answer before the connection closes under it.
LINGER_TIME = 2.0
LINGER_BYTES = 1024 * 1024

IMAGE_METHODS = (b"GET", b"HEAD", b"PUT", b"DELETE")
HEALTH_METHODS = (b"GET", b"HEAD")
DIGEST_HEADER = b"X-DIT4C-Digest"


class ImageServer:
    """
    What every connection of the image server shares: the storage, the
    portal gate, the limits, and the public base URL (for the ``url`` of
    an upload's answer).
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
    ) -> None:
        self.reactor = reactor
        self.storage = storage
        self.gate = gate
        self.publicURL = publicURL.rstrip("/") if publicURL else None
        self.maxSize = maxSize
        self.lingerTime = lingerTime
        self.lingerBytes = lingerBytes

    def imageURL(self, digest: str) -> str:
        return f"{self.publicURL or ''}/images/{digest}"


def route(method: bytes, target: bytes) -> tuple[str, str | None]:
    """
    What a request is about: ``("health", None)`` or ``("image", digest)``.

    :raises ImageServerError: ``404`` for another path, ``405`` for another
        method, ``400`` for a malformed digest.
    """
    path = target.split(b"?", 1)[0]
    if path == b"/health":
        if method not in HEALTH_METHODS:
            raise MethodNotAllowed(b", ".join(HEALTH_METHODS))
        return "health", None
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


def _encode(error: ImageServerError) -> bytes:
    return json.dumps(error.body()).encode("utf-8")


def _transport(request: Request) -> Any:
    """The connection's transport (TCP or TLS): a consumer, a push producer, abortable."""
    return request.channel.transport


def _clientAddress(request: Request) -> str:
    return str(getattr(request.getClientAddress(), "host", "unknown"))


class _State(Enum):
    ASKING = "asking the portal"
    RECEIVING = "receiving"
    COMMITTING = "storing"
    DONE = "done"
    FAILED = "failed"
    LOST = "broken off"


class _Upload:
    """
    One ``PUT`` on its way in: ask the portal (the connection paused),
    then write chunk by chunk, then commit.
    ``ASKING → RECEIVING → COMMITTING → DONE``, or ``FAILED`` (refused, too
    large, digest mismatch, the store failed) or ``LOST`` (the client went
    away) from either of the first two.
    """

    log = Logger()

    def __init__(self, request: ImageRequest, server: ImageServer, digest: str, length: int | None) -> None:
        self.request = request
        self.server = server
        self.digest = digest
        self.length = length
        self.state = _State.ASKING
        self.received = 0
        self._pending: list[bytes] = []
        self._writer: IImageWriter | None = None
        self._expectContinue = False
        self._bodyComplete = False
        self._result: Deferred[Committed] | None = None
        self._question: Deferred[Decision] | None = None

    # -- events -------------------------------------------------------------------------------

    def start(self) -> None:
        """The head is in: stop reading and ask the portal."""
        headers = self.request.requestHeaders
        expect = headers.getRawHeaders(b"expect")
        if expect and expect[0].strip().lower() == b"100-continue":
            # Not now (twisted.web would send it right after this): only
            # once the portal allows the upload.
            self._expectContinue = getattr(self.request.channel, "_version", None) == b"HTTP/1.1"
            headers.removeHeader(b"expect")
        _transport(self.request).pauseProducing()
        self._question = self.server.gate.ask("PUT", self.digest, credentials(self.request))
        self._question.addCallbacks(self._decided, self._unanswered)

    def chunk(self, data: bytes) -> None:
        """The next bytes of the body."""
        if self.state not in (_State.ASKING, _State.RECEIVING):
            return
        self.received += len(data)
        if self.received > self.server.maxSize:
            self._fail(TooLarge(f"The image is larger than {self.server.maxSize} bytes: nothing was stored."))
            return
        if self.state is _State.ASKING:
            # At most what one read brought in with the head: the
            # connection is paused until the portal answers.
            self._pending.append(data)
            return
        assert self._writer is not None
        try:
            self._writer.write(data)
        except OSError:
            self.log.failure("could not write image {digest}", digest=self.digest)
            self._fail(ImageServerError("The image could not be stored."))

    def bodyComplete(self) -> Deferred[Committed]:
        """The body is complete: what it stored, once it is stored (or why not)."""
        self._bodyComplete = True
        self._result = Deferred()
        if self.state is _State.RECEIVING:
            self._commit()
        elif self.state is _State.FAILED:
            self._result.errback(ImageServerError("The upload failed."))
        return self._result

    def lost(self) -> None:
        """The connection closed."""
        if self.state not in (_State.ASKING, _State.RECEIVING):
            return
        self.log.info(
            "upload of {digest} from {client} broke off after {received} bytes: nothing stored",
            digest=self.digest, client=_clientAddress(self.request), received=self.received,
        )  # fmt: skip
        self.state = _State.LOST
        self._drop()
        if self._question is not None and not self._question.called:
            self._question.cancel()
        if self._result is not None and not self._result.called:
            self._result.errback(ImageServerError("The connection closed."))

    # -- the portal's answer ---------------------------------------------------------------------------

    def _decided(self, decision: Decision) -> None:
        if self.state is not _State.ASKING:
            return
        if not decision.allowed:
            self.log.info(
                "upload of {digest} from {client} refused: {reason}",
                digest=self.digest, client=_clientAddress(self.request), reason=decision.reason,
            )  # fmt: skip
            self._fail(Refused(decision.reason))
            return
        try:
            self._writer = self.server.storage.begin(self.digest)
            for data in self._pending:
                self._writer.write(data)
        except OSError:
            self.log.failure("could not start storing image {digest}", digest=self.digest)
            self._fail(ImageServerError("The image could not be stored."))
            return
        self._pending = []
        self.state = _State.RECEIVING
        self.log.info(
            "upload of {digest} from {client} allowed: {reason}",
            digest=self.digest, client=_clientAddress(self.request), reason=decision.reason,
        )  # fmt: skip
        transport = _transport(self.request)
        if self._expectContinue and not self._bodyComplete:
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        transport.resumeProducing()
        if self._bodyComplete:
            self._commit()

    def _unanswered(self, failure: Failure) -> None:
        if self.state is not _State.ASKING:
            return
        if failure.check(ImageServerError):
            self._fail(failure.value)  # type: ignore[arg-type]
        else:
            self.log.failure("asking the portal failed", failure)
            self._fail(PortalUnavailable())

    # -- the end ----------------------------------------------------------------------------------------

    def _commit(self) -> None:
        assert self._writer is not None and self._result is not None
        writer, self._writer = self._writer, None
        # The body is in: from now on the image is stored (or refused)
        # whether or not the client waits for the answer.
        self.state = _State.COMMITTING
        d = maybeDeferred(writer.commit)
        d.addCallbacks(self._committed, self._notCommitted, errbackArgs=(writer,))
        d.addErrback(lambda f: self.log.failure("finishing upload of {digest} failed", f, digest=self.digest))

    def _committed(self, committed: Committed) -> None:
        assert self._result is not None
        self.state = _State.DONE
        self.log.info(
            "stored {digest} ({size} bytes, {what})",
            digest=self.digest, size=committed.size, what="new" if committed.created else "stored before",
        )  # fmt: skip
        if not self._result.called:
            self._result.callback(committed)

    def _notCommitted(self, failure: Failure, writer: IImageWriter) -> None:
        assert self._result is not None
        self.state = _State.FAILED
        writer.abort()
        if failure.check(ImageServerError):
            error: ImageServerError = failure.value  # type: ignore[assignment]
            self.log.info(
                "upload of {digest} from {client} refused: {reason}",
                digest=self.digest, client=_clientAddress(self.request), reason=error.reason,
            )  # fmt: skip
        else:
            self.log.failure("could not store image {digest}", failure, digest=self.digest)
            error = ImageServerError("The image could not be stored.")
        if not self._result.called:
            self._result.errback(error)

    def _fail(self, error: ImageServerError) -> None:
        self.state = _State.FAILED
        self._drop()
        if self._result is not None:
            # The body is in and the request is being processed: an
            # ordinary answer, and the connection may stay open.
            if not self._result.called:
                self._result.errback(error)
        else:
            self.request.answerEarly(error)

    def _drop(self) -> None:
        self._pending = []
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.abort()


class ImageRequest(Request):
    """
    A request that never spools its body: an upload's body goes to the
    storage as it arrives, once the portal allowed it; any other body is
    dropped (and refused if it is more than a little).
    """

    log = Logger()

    upload: _Upload | None = None
    #: Answered before the body was read; the connection is closing.
    answeredEarly = False
    _otherBody = 0
    _discarded = 0
    _linger: Any = None

    @property
    def server(self) -> ImageServer:
        server: ImageServer = getattr(self.channel, "site").server  # noqa: B009 - untyped attribute
        return server

    # -- the channel's calls ------------------------------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        # Nothing is ever written to ``content``: an empty in-memory file.
        super().gotLength(0)
        # The request line is the channel's until the body is complete;
        # twisted.web keeps it as ``_command`` and ``_path`` meanwhile.
        method = getattr(self.channel, "_command", b"")
        target = getattr(self.channel, "_path", b"")
        if method != b"PUT":
            return
        try:
            _, digest = route(method, target)
        except ImageServerError as e:
            self.answerEarly(e)
            return
        assert digest is not None
        server = self.server
        if length is not None and length > server.maxSize:
            self.answerEarly(TooLarge(f"The image is larger than {server.maxSize} bytes: nothing was stored."))
            return
        self.upload = _Upload(self, server, digest, length)
        self.upload.start()

    def handleContentChunk(self, data: bytes) -> None:
        if self.answeredEarly:
            self._discarded += len(data)
            if self._discarded > self.server.lingerBytes:
                _transport(self).abortConnection()
        elif self.upload is not None:
            self.upload.chunk(data)
        else:
            self._otherBody += len(data)
            if self._otherBody > MAX_OTHER_BODY:
                self.answerEarly(TooLarge("Only uploads (PUT) carry a body."))

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.answeredEarly:
            # Answered already, and the connection is closing.
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        if self.upload is not None:
            self.upload.lost()

    # -- answering before the body ----------------------------------------------------------------------

    def answerEarly(self, error: ImageServerError) -> None:
        """
        Answer now, before the body is read, and close the connection: the
        answer goes out, the sending side is shut, and whatever the client
        still sends is read and dropped for a short while (at most
        ``lingerTime`` seconds and ``lingerBytes`` bytes) so that the client
        reads the answer before the connection is reset under it.
        """
        if self.answeredEarly or self._disconnected:
            return
        self.answeredEarly = True
        body = _encode(error)
        lines = [
            b"HTTP/1.1 %d %s" % (error.status, http.RESPONSES.get(error.status, b"Error")),
            b"Content-Type: application/json",
            b"Cache-Control: no-store",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        if isinstance(error, MethodNotAllowed):
            lines.append(b"Allow: " + error.allow)
        transport = _transport(self)
        transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.log.info(
            "{method} {path} from {client}: {status} before the body ({reason})",
            method=getattr(self.channel, "_command", b"?").decode("latin-1"),
            path=getattr(self.channel, "_path", b"?")[:200].decode("latin-1"),
            client=_clientAddress(self), status=error.status, reason=error.reason,
        )  # fmt: skip
        server = self.server
        self._linger = server.reactor.callLater(server.lingerTime, transport.abortConnection)
        try:
            transport.loseWriteConnection()
        except (AttributeError, NotImplementedError):
            transport.loseConnection()
        transport.resumeProducing()


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
        try:
            if method == b"PUT":
                await self._put(request, digest)
                return
            decision = await self.images.gate.ask(method.decode("ascii"), digest, credentials(request))
            if request._disconnected:
                return
            if not decision.allowed:
                self.log.info(
                    "{method} {digest} from {client} refused: {reason}",
                    method=method.decode("ascii"), digest=digest, client=_clientAddress(request),
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
                return
            await self._send(request, digest)
        except ImageServerError as e:
            if not request._disconnected and not request.finished:
                if request.startedWriting:
                    _transport(request).abortConnection()
                    return
                request.responseHeaders.removeHeader(b"content-range")
                request.responseHeaders.removeHeader(b"content-length")
                request.write(self._error(request, e))
                request.finish()

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

    async def _send(self, request: ImageRequest, digest: str) -> None:
        """
        ``GET`` or ``HEAD``: the image (``200``), one range of it (``206``),
        streamed from the storage as the connection takes it.
        """
        storage = self.images.storage
        info = await storage.stat(digest)
        if request._disconnected:
            return
        if info is None:
            raise NotFound()
        request.setHeader(DIGEST_HEADER, digest.encode("ascii"))
        request.setHeader(b"cache-control", b"private, no-cache")
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"content-type", b"application/octet-stream")
        if info.modified is not None and request.setLastModified(info.modified) is http.CACHED:
            request.finish()
            return
        offset, length = 0, info.size
        if request.method == b"GET":
            offset, length = byteRange(request, info.size)
        request.setHeader(b"content-length", b"%d" % length)
        if request.method == b"HEAD" or length == 0:
            request.finish()
            return
        reading = storage.read(digest, request, offset, length)
        request.notifyFinish().addErrback(lambda _: reading.cancel())
        try:
            await reading
        except CancelledError:
            return
        except ImageServerError:
            raise
        except Exception:
            self.log.failure("reading {digest} failed", digest=digest)
            if not request._disconnected:
                if request.startedWriting:
                    # Headers and part of the body are out: the client must see a broken response.
                    _transport(request).abortConnection()
                    return
                raise ImageServerError("The image could not be read; try again.") from None
            return
        if not request._disconnected:
            request.finish()

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

