"""
A saved image uploaded as a file (``POST /api/v1/images``, the file as the
body, as ``GET /api/v1/images/{id}/download`` gave it): a new saved image
of the person's, for a tool of the catalogue.

The portal never holds the file. twisted.web reads a request's whole body
before its resource sees it, so :class:`UploadRequest` hands this route to
the application at the end of its head, the connection paused: the route
authenticates the person, checks the tool and opens an upload to the image
server (``POST /images``, with an import token the portal signs,
:mod:`dit4c.portal.importtokens`); only then is the body read, each chunk
passed on as it arrives (:class:`Incoming`, the image server's body
producer: while the image server's connection is full, the person's is
paused). On the way each chunk is hashed and read as a tar archive
(:class:`~dit4c.portal.archivecheck.ArchiveCheck`). The image server stores
an upload only once its body is whole (docs/protocols.md 12.3), and the
portal ends that body only once the file proved a whole saved image: a
truncated or damaged file, a wrong tool, a digest other than the one the
uploader named, or a person who went away break the upload off, and nothing
is left, on the image server or in the store.

A refusal before the body is in (not logged in, an unknown tool, over the
limit) is answered at once with ``Connection: close``; the rest of the body
is read and dropped for a little while (the channel's linger), then the
connection closes.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import treq
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IRequest
from zope.interface import implementer

from dit4c.common.httpsite import BodyLimit, FrontRequest
from dit4c.portal.archivecheck import ArchiveCheck, NotAnImage, SavedImageKind
from dit4c.portal.errors import APIError
from dit4c.portal.importtokens import importToken
from dit4c.portal.instances import imageJSON
from dit4c.portal.keys import KeyRing
from dit4c.portal.reportrules import MAX_NAME
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import Image, User
from dit4c.portal.web import arg, utc

__all__ = ["DEFAULT_UPLOAD_LIMIT", "UPLOAD_PATH", "ImageUploads", "Incoming", "UploadRequest", "uploadBodyLimit"]

#: The largest file taken unless configured otherwise (``--upload-limit``): 20 GiB, the image server's default.
DEFAULT_UPLOAD_LIMIT = 20 * 1024**3
#: The route whose body streams.
UPLOAD_PATH = b"/api/v1/images"
#: Seconds the image server has to take the connection.
CONNECT_TIMEOUT = 30.0
#: The body's types: the archive itself (a form's multipart body is refused).
BODY_TYPES = (b"application/x-tar", b"application/octet-stream")

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def isUpload(method: bytes, target: bytes) -> bool:
    """Whether a request head is an upload's (``POST /api/v1/images``, any query)."""
    path = re.sub(rb"/+", b"/", target.partition(b"?")[0])
    return method == b"POST" and path.rstrip(b"/") == UPLOAD_PATH


def uploadBodyLimit(limit: BodyLimit) -> BodyLimit:
    """``limit``, except for uploads, whose body :class:`UploadRequest` streams and bounds itself."""

    def bodyLimit(method: bytes, target: bytes) -> int | None:
        return None if isUpload(method, target) else limit(method, target)

    return bodyLimit


class UploadRequest(FrontRequest):
    """
    The portal's requests: an upload's is handed to the application at the
    end of its head, its body to :attr:`incoming` as it arrives; any other
    is :class:`FrontRequest`'s (its body in memory, within its limit).
    """

    incoming: Incoming | None = None

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        channel: Any = self.channel
        method, target = getattr(channel, "_command", b""), getattr(channel, "_path", b"")
        uploads: ImageUploads | None = getattr(channel.site, "uploads", None)
        if uploads is None or not isUpload(method, target):
            return
        if length is not None and length > uploads.limit:
            channel._refuse(413, "Content Too Large", f"An upload here is limited to {uploads.limit} bytes.")
            return
        self.incoming = Incoming(self, uploads.limit)
        channel.transport.pauseProducing()  # until the image server takes the body
        super().requestReceived(method, target, channel._version)  # the route runs now

    def handleContentChunk(self, data: bytes) -> None:
        if self.incoming is None:
            super().handleContentChunk(data)
        else:
            self.incoming.chunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.incoming is None:
            super().requestReceived(command, path, version)
        else:  # handed over at the end of its head: now the body is in
            self.incoming.bodyComplete()

    def write(self, data: bytes) -> None:
        if self.incoming is not None and not self.incoming.bodyDone and not self.startedWriting:
            self.setHeader(b"connection", b"close")
        super().write(data)

    def _cleanup(self) -> None:
        if self.incoming is None or self.incoming.bodyDone:
            super()._cleanup()
            return
        # Answered before the whole body came: the channel would read the
        # rest as the next request. It drops it instead, and closes.
        channel: Any = self.channel
        if self in channel.requests:
            channel.requests.remove(self)
        channel._close(half=True)
        self.incoming.abandon(Failure(ConnectionDone("answered before the body was in")))
        for d in self.notifications:
            d.callback(None)
        self.notifications = []

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if self.incoming is not None:
            self.incoming.abandon(reason)


@implementer(IBodyProducer)
class Incoming:
    """
    An upload's body on its way through: checked, hashed, and the image
    server's request body (an ``IBodyProducer`` of unknown length: chunked,
    so that it is whole only once :meth:`commit` says so).
    """

    length = UNKNOWN_LENGTH

    def __init__(self, request: UploadRequest, limit: int) -> None:
        self.request = request
        self.limit = limit
        self.received = 0
        self.bodyDone = False
        self.check = ArchiveCheck()
        self.sha = hashlib.sha256()
        #: What the file is once the body is in and whole, or why not (a Failure of an ``APIError``).
        self._outcome: SavedImageKind | Failure | None = None
        self._waiting: list[Deferred[SavedImageKind]] = []
        #: An OCI archive names no tool: refused at its first member if none was chosen.
        self.toolChosen = True
        self._pending: list[bytes] = []
        self._consumer: IConsumer | None = None
        self._sent: Deferred[None] | None = None
        self._over = False
        self._committed = False

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()

    def _transport(self) -> Any:
        return getattr(self.request.channel, "transport", None)

    # -- the person's side --------------------------------------------------------------------

    def chunk(self, data: bytes) -> None:
        if self._over:
            return
        self.received += len(data)
        if self.received > self.limit:
            self._fail(APIError(413, "too_large", f"An upload here is limited to {self.limit} bytes."))
            return
        try:
            self.check.feed(data)
        except NotAnImage as e:
            self._fail(APIError(400, "not_an_image", e.reason))
            return
        if not self.toolChosen and self.check.firstMember and self.check.kind is None:
            self._fail(APIError(400, "missing_tool", "This saved image does not say which tool it is: choose one."))
            return
        self.sha.update(data)
        if self._consumer is None:
            self._pending.append(data)  # what came with the head, before the image server took the body
        else:
            self._consumer.write(data)

    def bodyComplete(self) -> None:
        self.bodyDone = True
        if self._over:
            return
        try:
            kind = self.check.finish()
        except NotAnImage as e:
            self._fail(APIError(400, "not_an_image", e.reason))
            return
        expected = self.request.getHeader(b"x-dit4c-digest")
        if expected is not None and expected.decode("latin-1").strip() != self.digest:
            self._fail(APIError(400, "digest_mismatch", f"The file's SHA-256 is {self.digest}, not the one named."))
            return
        self._settle(kind)

    # -- the image server's side (IBodyProducer) ----------------------------------------------------

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._sent = Deferred()
        pending, self._pending = self._pending, []
        for data in pending:
            consumer.write(data)
        transport = self._transport()
        if self._committed:
            self._sent.callback(None)
        elif self._over:
            self._sent.errback(Failure(ConnectionDone("the upload was refused")))
        elif not self.bodyDone and transport is not None:
            transport.resumeProducing()
        return self._sent

    def pauseProducing(self) -> None:
        transport = self._transport()
        if transport is not None and not self.bodyDone:
            transport.pauseProducing()

    def resumeProducing(self) -> None:
        transport = self._transport()
        if transport is not None and not self.bodyDone:
            transport.resumeProducing()

    def stopProducing(self) -> None:
        """The image server's connection ended (it answered, or went away): its answer says why."""
        self._consumer = None
        self.pauseProducing()

    # -- the end ------------------------------------------------------------------------------------------

    def whenComplete(self) -> Deferred[SavedImageKind]:
        """Fires with what the file is once the body is in and whole; fails with why not (an ``APIError``)."""
        d: Deferred[SavedImageKind] = Deferred()
        if self._outcome is None:
            self._waiting.append(d)
        else:
            d.callback(self._outcome)  # a Failure runs the errbacks
        return d

    def _settle(self, outcome: SavedImageKind | Failure) -> None:
        self._outcome = outcome
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(outcome)

    def commit(self) -> None:
        """The file is a whole saved image: end the image server's body, so that it stores it."""
        self._over = self._committed = True
        if self._sent is not None and not self._sent.called:
            self._sent.callback(None)

    def abandon(self, why: Failure) -> None:
        """Break the image server's upload off (it stores nothing); the route hears ``why``."""
        self._fail(APIError(400, "broken_off", "The upload broke off.") if why.check(ConnectionDone) else why)

    def _fail(self, error: APIError | Failure) -> None:
        if self._over:
            return
        self._over = True
        self._pending = []
        # The route hears why first: breaking the image server's request off fails that request at once.
        if self._outcome is None:
            self._settle(error if isinstance(error, Failure) else Failure(error))
        if self._sent is not None and not self._sent.called:
            self._sent.errback(Failure(ConnectionDone("the upload was refused")))


class ImageUploads:
    """Files uploaded as new saved images, sent on to the image server at ``imageServer``."""

    log = Logger()

    def __init__(
        self, store: IStore, keys: KeyRing, clock: IReactorTime, imageServer: str, *, limit: int = DEFAULT_UPLOAD_LIMIT
    ) -> None:
        """
        :param imageServer: the image server's base URL, as the portal reaches it.
        :param limit: the largest file taken, in bytes.
        """
        self.store = store
        self.keys = keys
        self.clock = clock
        self.imageServer = imageServer.rstrip("/")
        self.limit = limit

    async def receive(self, request: IRequest, user: User) -> dict[str, Any] | None:
        """The request's body as a new saved image of ``user``'s: its JSON (None: the person went away)."""
        incoming: Incoming | None = getattr(request, "incoming", None)
        if incoming is None:
            raise APIError(400, "not_streamed", "Send the file as the request's body.")
        kind = (request.getHeader(b"content-type") or b"application/octet-stream").split(b";")[0].strip().lower()
        if kind not in BODY_TYPES:
            raise APIError(415, "unsupported_media_type", "Send the file itself as the body (application/x-tar).")
        catalogue = await self.store.listCatalogue()
        chosen = self._tool(catalogue, arg(request, "tool"))
        name = self._name(arg(request, "name"), arg(request, "filename"))
        incoming.toolChosen = chosen is not None
        sending: Deferred[Any] = treq.post(
            self.imageServer + "/images",
            data=incoming,
            headers=Headers({
                "Authorization": [f"Bearer {importToken(self.keys, user.id)}"],
                "Content-Type": ["application/octet-stream"],
            }),
            unbuffered=True,
            timeout=CONNECT_TIMEOUT,
        )  # fmt: skip
        try:
            index, what = await _first(incoming.whenComplete(), sending)
            if index == 1:  # the image server answered, or went away, before the whole file came
                raise await self._refusal(what)
            if isinstance(what, Failure):
                what.raiseException()
            tool = self._match(catalogue, chosen, what)
            incoming.commit()
            try:
                response = await sending
            except Exception as e:
                raise await self._refusal(Failure(e)) from None
        except BaseException as e:
            incoming.abandon(Failure(e))
            if not sending.called:
                sending.cancel()
            sending.addErrback(lambda _: None)
            if getattr(request, "_disconnected", False):
                return None
            raise
        if response.code not in (200, 201):
            raise await self._refusal(response)
        stored = await treq.json_content(response)
        if not isinstance(stored, dict) or stored.get("digest") != incoming.digest or not isinstance(stored.get("url"), str):
            self.log.error("the image server stored an upload as {stored}, not {digest}", stored=stored, digest=incoming.digest)
            raise APIError(502, "unavailable", "The image server did not store the file as it was sent.")
        image = await self.store.createImage(
            name or f"{tool.name} (uploaded {utc(self.clock.seconds())})", stored["url"],
            owner_id=user.id, digest=incoming.digest, port=tool.port, limits=tool.limits,
        )  # fmt: skip
        self.log.info(
            "{user} uploaded image {image} ({digest}, {size} bytes, tool {tool})",
            user=user.name, image=image.id, digest=image.digest, size=incoming.received, tool=tool.ref,
        )  # fmt: skip
        request.setHeader(b"location", f"/api/v1/images/{image.id}".encode())
        return imageJSON(image, user.id)

    @staticmethod
    def _tool(catalogue: list[Image], wanted: str | None) -> Image | None:
        """The catalogue entry the uploader chose, by id, ref or name; None if they chose none."""
        if not wanted:
            return None
        for entry in catalogue:
            if wanted in (entry.id, entry.ref) or wanted.casefold() == entry.name.casefold():
                return entry
        raise APIError(400, "unknown_tool", f"There is no tool {wanted[:100]!r} in this portal's catalogue.")

    @staticmethod
    def _match(catalogue: list[Image], chosen: Image | None, kind: SavedImageKind) -> Image:
        """The saved image's tool: the one it names (which the chosen one, if any, must be) or the chosen one."""
        if kind.tool is None:
            if chosen is None:
                raise APIError(400, "missing_tool", "This saved image does not say which tool it is: choose one.")
            return chosen
        if chosen is not None and chosen.ref != kind.tool:
            raise APIError(400, "wrong_tool", f"This is a saved image of {kind.tool[:100]}, not of {chosen.name}.")
        for entry in catalogue:
            if entry.ref == kind.tool:
                return entry
        raise APIError(400, "unknown_tool", f"This saved image's tool, {kind.tool[:100]!r}, is not in this portal's catalogue.")

    @staticmethod
    def _name(name: str | None, filename: str | None) -> str | None:
        """The new image's name: as given, else the file's name without ``.oci.tar``; None: the tool's."""
        if not name and filename:
            name = re.sub(r"(\.oci)?\.tar$", "", filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1])
        name = (name or "").strip()
        if not name:
            return None
        if len(name) > MAX_NAME or not name.isprintable():
            raise APIError(400, "bad_name", f"A name is 1 to {MAX_NAME} printable characters.")
        return name

    async def _refusal(self, answer: Any) -> APIError:
        """Why the image server did not take the file, as the person hears it."""
        if isinstance(answer, Failure):
            self.log.warn("the image server could not be reached: {why}", why=str(answer.value))
            return APIError(502, "unavailable", "The image server is not answering; try again later.")
        try:
            body = json.loads(await treq.content(answer))
        except Exception:
            body = {}
        reason = body.get("reason") if isinstance(body, dict) else None
        self.log.warn("the image server refused an upload: {code} {reason}", code=answer.code, reason=reason)
        if answer.code == 413:
            return APIError(413, "too_large", str(reason or "The file is larger than the image server takes."))
        return APIError(502, "unavailable", f"The image server answered {answer.code}.")


def _first(*ds: Deferred[Any]) -> Deferred[tuple[int, Any]]:
    """
    Which of ``ds`` fires first, and with what (a Failure too), leaving
    the others be (``defer.race`` would cancel them, and skips failures).
    """
    first: Deferred[tuple[int, Any]] = Deferred()

    def settle(result: Any, index: int) -> Any:
        if not first.called:
            first.callback((index, result))
        return result

    for index, d in enumerate(ds):
        d.addBoth(settle, index)
    ds[0].addErrback(lambda _: None)  # heard through ``first``
    return first
