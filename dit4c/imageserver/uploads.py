"""
The image server's requests, which never spool a body (docs/protocols.md
section 12).

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

Apart from the resource that answers once the body is in
(:mod:`dit4c.imageserver.web`): this is the part that runs before it.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Request

from dit4c.imageserver.errors import (
    BadDigest,
    ImageServerError,
    MethodNotAllowed,
    PortalUnavailable,
    Refused,
    TooLarge,
)
from dit4c.imageserver.metrics import outcomeOf
from dit4c.imageserver.portal import Decision
from dit4c.imageserver.server import (
    ImageServer,
    clientAddress,
    connectionTransport,
    credentials,
    route,
)
from dit4c.imageserver.storage import NEW_IMAGE, Committed, IImageWriter

__all__ = ["MAX_OTHER_BODY", "ImageRequest"]

#: The most body bytes a request other than an upload may carry.
MAX_OTHER_BODY = 64 * 1024


def _encode(error: ImageServerError) -> bytes:
    return json.dumps(error.body()).encode("utf-8")



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
    away) from either of the first two. Each of those ends is counted in
    the server's figures where it is reached (:meth:`_end`), once.
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
        self.server.metrics.uploadStarted()
        headers = self.request.requestHeaders
        expect = headers.getRawHeaders(b"expect")
        if expect and expect[0].strip().lower() == b"100-continue":
            # Not now (twisted.web would send it right after this): only
            # once the portal allows the upload.
            self._expectContinue = getattr(self.request.channel, "_version", None) == b"HTTP/1.1"
            headers.removeHeader(b"expect")
        connectionTransport(self.request).pauseProducing()
        method = "POST" if self.digest == NEW_IMAGE else "PUT"
        self._question = self.server.gate.ask(method, self.digest, credentials(self.request))
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
            self.server.metrics.bytesReceived += len(data)
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
            digest=self.digest, client=clientAddress(self.request), received=self.received,
        )  # fmt: skip
        self.state = _State.LOST
        self._end("cut_off")
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
                digest=self.digest, client=clientAddress(self.request), reason=decision.reason,
            )  # fmt: skip
            self._fail(Refused(decision.reason))
            return
        try:
            self._writer = self.server.storage.begin(self.digest)
            for data in self._pending:
                self._writer.write(data)
                self.server.metrics.bytesReceived += len(data)
        except OSError:
            self.log.failure("could not start storing image {digest}", digest=self.digest)
            self._fail(ImageServerError("The image could not be stored."))
            return
        self._pending = []
        self.state = _State.RECEIVING
        self.log.info(
            "upload of {digest} from {client} allowed: {reason}",
            digest=self.digest, client=clientAddress(self.request), reason=decision.reason,
        )  # fmt: skip
        transport = connectionTransport(self.request)
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
        self._end("stored")
        self.server.metrics.bytesStored += committed.size
        self.log.info(
            "stored {digest} ({size} bytes, {what})",
            digest=committed.digest, size=committed.size, what="new" if committed.created else "stored before",
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
                digest=self.digest, client=clientAddress(self.request), reason=error.reason,
            )  # fmt: skip
        else:
            self.log.failure("could not store image {digest}", failure, digest=self.digest)
            error = ImageServerError("The image could not be stored.")
        self._end(outcomeOf(error))
        if not self._result.called:
            self._result.errback(error)

    def _fail(self, error: ImageServerError) -> None:
        self.state = _State.FAILED
        self._end(outcomeOf(error))
        self._drop()
        if self._result is not None:
            # The body is in and the request is being processed: an
            # ordinary answer, and the connection may stay open.
            if not self._result.called:
                self._result.errback(error)
        else:
            self.request.answerEarly(error)

    def _end(self, outcome: str) -> None:
        """The upload's end is decided (every path to ``DONE``, ``FAILED`` or ``LOST`` comes here once)."""
        self.server.metrics.uploadEnded(outcome)

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
        if method not in (b"PUT", b"POST"):
            return
        try:
            _, digest = route(method, target)
        except ImageServerError as e:
            if isinstance(e, BadDigest):
                self.server.metrics.uploadEnded("invalid", started=False)
            self.answerEarly(e)
            return
        assert digest is not None
        server = self.server
        if length is not None and length > server.maxSize:
            server.metrics.uploadEnded("too_large", started=False)
            self.answerEarly(TooLarge(f"The image is larger than {server.maxSize} bytes: nothing was stored."))
            return
        self.upload = _Upload(self, server, digest, length)
        self.upload.start()

    def handleContentChunk(self, data: bytes) -> None:
        if self.answeredEarly:
            self._discarded += len(data)
            if self._discarded > self.server.lingerBytes:
                connectionTransport(self).abortConnection()
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
        transport = connectionTransport(self)
        transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.log.info(
            "{method} {path} from {client}: {status} before the body ({reason})",
            method=getattr(self.channel, "_command", b"?").decode("latin-1"),
            path=getattr(self.channel, "_path", b"?")[:200].decode("latin-1"),
            client=clientAddress(self), status=error.status, reason=error.reason,
        )  # fmt: skip
        server = self.server
        self._linger = server.reactor.callLater(server.lingerTime, transport.abortConnection)
        try:
            transport.loseWriteConnection()
        except (AttributeError, NotImplementedError):
            transport.loseConnection()
        transport.resumeProducing()
