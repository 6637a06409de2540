"""
twisted.web sites behind the public-front rules (:mod:`dit4c.common.httpfront`):
a DIT4C server that answers HTTP itself with twisted.web (the portal, the
image server) serves it through :class:`FrontSite`, whose channel adds to
twisted.web's HTTP/1.1 parser what a public port needs:

- every request head is checked by httptools (llhttp, the parser the
  routing server and the auth helper use) with the shared limits and rules
  (:class:`~dit4c.common.httpfront.RequestHead`): malformed heads, obs-fold
  lines, two ``Host`` headers or none, too large heads are answered
  ``400``/``431`` and the connection is closed;
- a head must be complete within ``headTimeout`` of its first byte (of the
  connection's start, for the first): the deadline is not reset by each
  byte, so a client sending one byte at a time is cut (``408``);
- a kept-alive connection with no request for ``idleTimeout`` is closed;
- a request body has a limit that depends on the route
  (:attr:`FrontSite.bodyLimit`): a ``Content-Length`` over it is refused with
  ``413`` before any of the body is read, and a chunked body is counted as
  it arrives and cut (``413``) at the limit; a body within its limit must
  arrive within ``bodyTimeout`` of the head. Bodies are kept in memory
  (:class:`FrontRequest`), never spooled to a temporary file as
  twisted.web does past 100 KB: the limit bounds what one request holds;
- the access log is written with secrets redacted from request targets and
  ``Referer`` (:func:`redactTarget`).

Once a request is handed to the application, no deadline of the channel
applies until it is answered: a long-lived answer (Server-Sent Events) or a
connection taken over by a WebSocket lives as long as the application keeps
it.

A refusal is a small HTML page (:func:`~dit4c.common.httpfront.errorPage`);
then the sending side is shut and what the client still sends is read and
dropped for a little while (``lingerTime``, ``lingerBytes``), so that the
client reads the answer before the connection is reset under it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from io import BytesIO
from typing import Any
from urllib.parse import unquote_plus

import httptools
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, combinedLogFormatter
from twisted.web.iweb import IAccessLogFormatter
from twisted.web.server import Request, Site
from zope.interface import provider

from dit4c.common.errors import HeadError, Upgraded
from dit4c.common.httpfront import FrontLimits, RequestHead, errorPage, feedParser

__all__ = [
    "SECRET_PARAMETERS",
    "BodyLimit",
    "FrontChannel",
    "FrontRequest",
    "FrontSite",
    "Phase",
    "SiteLimits",
    "redactTarget",
    "redactingLogFormatter",
]


@dataclass(frozen=True)
class SiteLimits:
    """Bounds on what one connection to a twisted.web site can make it hold or wait for."""

    #: The request-head limits and deadlines every public front shares.
    front: FrontLimits = field(default_factory=FrontLimits)
    #: Seconds, after its head, for a body within its limit to arrive whole
    #: (with the head's 10 s: a request is in within 30 s, or refused).
    bodyTimeout: float = 20.0
    #: After a refusal: seconds, and bytes, of what the client still sends that are read and dropped.
    lingerTime: float = 2.0
    lingerBytes: int = 1024 * 1024


#: The largest body a request for ``(method, target)`` may have, in bytes;
#: ``None``: the site's request class takes the body as it streams (and
#: bounds it itself), and the channel only keeps the connection's idle deadline.
BodyLimit = Callable[[bytes, bytes], "int | None"]


class Phase(Enum):
    """
    Where a connection is, and so which deadline runs:

    ================  =================================  ==============================
    phase             deadline                           next
    ================  =================================  ==============================
    ``HEAD``          ``headTimeout`` since the first    ``BODY``, ``ANSWERING``,
                      byte (or the connection's start)   ``CLOSING`` (refused)
    ``BODY``          ``bodyTimeout`` for the whole      ``ANSWERING``, ``CLOSING``
                      body (``idleTimeout`` per byte
                      for a streamed body)
    ``ANSWERING``     none: the application answers      ``IDLE`` (kept alive), closed
    ``IDLE``          ``idleTimeout``                    ``HEAD`` at the first byte
    ``CLOSING``       ``lingerTime``, then abort         closed
    ================  =================================  ==============================
    """

    HEAD = "reading a request head"
    BODY = "reading a request body"
    ANSWERING = "answering"
    IDLE = "waiting for the next request"
    CLOSING = "closing"


class _HeadReader:
    """httptools' callbacks for one request head, collected by the shared :class:`RequestHead`."""

    __slots__ = ("head", "complete")

    def __init__(self, limits: FrontLimits) -> None:
        self.head = RequestHead(limits)
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.head.onUrl(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head.onHeader(name, value)

    def on_headers_complete(self) -> None:
        self.complete = True


class FrontChannel(HTTPChannel):
    """twisted.web's HTTP/1.1 channel with the public-front rules (see the module)."""

    log = Logger()

    site: FrontSite
    phase: Phase = Phase.HEAD
    _timer: IDelayedCall | None = None
    _head: _HeadReader | None = None
    _parser: Any = None
    _bodyLimit: int | None = None
    _bodyCount = 0
    _discarded = 0

    # -- the connection's life ------------------------------------------------------------------

    def connectionMade(self) -> None:
        limits = self.site.limits.front
        # twisted.web's own limits, past ours, so that ours answer first.
        self.MAX_LENGTH = limits.maxHeadBytes + 1024
        self.totalHeadersSize = limits.maxHeadBytes + 1024
        self.maxHeaders = limits.maxHeaders + 1
        super().connectionMade()
        self._enter(Phase.HEAD)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelTimer()
        super().connectionLost(reason)

    def _enter(self, phase: Phase) -> None:
        """Move to ``phase`` and start its deadline (the only place deadlines start)."""
        self._cancelTimer()
        self.phase = phase
        limits = self.site.limits
        clock = self.site.reactor
        if phase is Phase.HEAD:
            self._timer = clock.callLater(limits.front.headTimeout, self._timedOut, "head")
        elif phase is Phase.BODY:
            wait = limits.bodyTimeout if self._bodyLimit is not None else limits.front.idleTimeout
            self._timer = clock.callLater(wait, self._timedOut, "body")
        elif phase is Phase.IDLE:
            self._timer = clock.callLater(limits.front.idleTimeout, self._idleTimedOut)
        elif phase is Phase.CLOSING:
            self._timer = clock.callLater(limits.lingerTime, self._abort)

    def _cancelTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _timedOut(self, what: str) -> None:
        self._timer = None
        self._refuse(408, "Request Timeout", f"The request {what} was not sent in time.")

    def _idleTimedOut(self) -> None:
        self._timer = None
        self._close()

    def _abort(self) -> None:
        self._timer = None
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    # -- bytes in ---------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        phase = self.phase
        if phase is Phase.CLOSING:
            self._discard(len(data))
            return
        if phase is Phase.IDLE:
            self._enter(Phase.HEAD)
        elif phase is Phase.BODY and self._bodyLimit is None and self._timer is not None:
            # A streamed body (an image upload) may take long, but not stall.
            self._timer.reset(self.site.limits.front.idleTimeout)
        super().dataReceived(data)

    def _discard(self, n: int) -> None:
        self._discarded += n
        if self._discarded > self.site.limits.lingerBytes:
            self._abort()

    def lineReceived(self, line: bytes) -> None:
        if self.phase is Phase.CLOSING:
            return
        if self.phase is Phase.IDLE:
            # A pipelined request's head, read from what was buffered.
            self._enter(Phase.HEAD)
        if self._head is None:
            if not line:
                # twisted.web drops one empty line before a request (and refuses a second).
                super().lineReceived(line)
                return
            self._head = _HeadReader(self.site.limits.front)
            self._parser = httptools.HttpRequestParser(self._head)
        try:
            try:
                feedParser(self._parser, line + b"\r\n")
            except Upgraded:
                pass  # a WebSocket's head, complete: the resource takes the connection over
            if line:
                super().lineReceived(line)
                return
            self._headComplete()
        except HeadError as e:
            self._refuse(e.status, e.title, e.message)
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(431, "Request Header Fields Too Large", "The request head is too large.")

    def _headComplete(self) -> None:
        """
        The head's last line came: apply the rules httptools' callbacks
        cannot (those every front shares, and the route's body limit) and
        start the body's deadline, before twisted.web reads a byte of the
        body.
        """
        reader, parser = self._head, self._parser
        self._head = self._parser = None
        assert reader is not None
        if not reader.complete:
            raise HeadError(400, "Bad Request", "Malformed request: the head ended early.")
        head = reader.head
        # The rules every front shares: a Host, no CONNECT, no body on an upgrade.
        head.complete(parser)
        limit = self.site.bodyLimit(head.method, head.target)
        lengths = head.values(b"content-length")
        length = int(lengths[0]) if lengths else 0
        if limit is not None and length > limit:
            raise HeadError(413, "Content Too Large", f"A request body here is limited to {limit} bytes.")
        self._bodyLimit = limit
        self._bodyCount = 0
        self._enter(Phase.BODY if length or head.chunked else Phase.ANSWERING)

    def bodyReceived(self, n: int) -> bool:
        """
        ``n`` more bytes of the request's body (decoded) arrived; whether to
        keep them (no: the body passed its limit and was refused).
        """
        if self.phase is Phase.CLOSING:
            return False
        self._bodyCount += n
        if self._bodyLimit is not None and self._bodyCount > self._bodyLimit:
            self._refuse(413, "Content Too Large", f"A request body here is limited to {self._bodyLimit} bytes.")
            return False
        return True

    def rawDataReceived(self, data: bytes) -> None:
        if self.phase is Phase.CLOSING:
            self._discard(len(data))
            return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if self.phase is Phase.CLOSING:
            return  # refused: never handed to the application
        self._enter(Phase.ANSWERING)
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        if self.phase is Phase.ANSWERING:
            self._enter(Phase.IDLE)
        super().requestDone(request)

    # -- refusing and closing -----------------------------------------------------------------------

    def _refuse(self, status: int, title: str, message: str) -> None:
        """Answer ``status`` ourselves and close (nothing of this request reached the application)."""
        if self.phase is Phase.CLOSING or self.transport is None:
            return
        peer = getattr(self.transport.getPeer(), "host", "?")
        self.log.info("refused a request from {peer}: {status} {message}", peer=peer, status=status, message=message)
        self.transport.write(errorPage(status, title, message, server=self.site.serverName))
        self._close(half=True)

    def _close(self, half: bool = False) -> None:
        """
        Close: shut the sending side (``half``: keep reading and dropping for
        ``lingerTime``, so that the client reads the answer) or the whole
        connection; abort it if it is not gone within ``lingerTime``.
        """
        self._enter(Phase.CLOSING)
        transport: Any = self.transport
        if transport is None:
            return
        transport.unregisterProducer()
        if half:
            try:
                transport.loseWriteConnection()
                transport.resumeProducing()
                return
            except (AttributeError, NotImplementedError):
                pass
        transport.loseConnection()


class FrontRequest(Request):
    """
    A request whose body is kept in memory, bounded by its route's limit
    (the channel refuses past it): never a temporary file.
    """

    channel: FrontChannel

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        content: Any = self.content
        if self.channel.bodyReceived(len(data)):
            content.write(data)


# -- the access log ------------------------------------------------------------------------------

#: Query parameters whose values are secrets wherever they appear: OAuth 2
#: codes and states, tokens of every kind, passwords, CSRF tokens.
SECRET_PARAMETERS = frozenset(
    {"code", "state", "token", "access_token", "id_token", "refresh_token", "code_verifier",
     "client_secret", "password", "csrf", "ticket", "key", "secret", "session"}
)  # fmt: skip

REDACTED = "[redacted]"

_ABSOLUTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
_PARAMETER_NAMES = re.compile(r"(?:^|[?&;])\s*([^=&;?#]+)=")


def _unquoted(text: str) -> str:
    """``text`` percent-decoded until it no longer changes (at most three times)."""
    for _ in range(3):
        decoded = unquote_plus(text, encoding="latin-1")
        if decoded == text:
            break
        text = decoded
    return text


def _normalPath(text: str) -> str:
    return re.sub(r"/+", "/", _unquoted(text).lower())


def _carriesSecret(value: str, secretPaths: tuple[str, ...], secretParameters: frozenset[str]) -> bool:
    decoded = _unquoted(value)
    normal = _normalPath(decoded)
    if any(path in normal for path in secretPaths):
        return True
    return any(name.strip().lower() in secretParameters for name in _PARAMETER_NAMES.findall(decoded))


def redactTarget(
    target: bytes, secretPaths: Iterable[str] = (), secretParameters: frozenset[str] = SECRET_PARAMETERS
) -> bytes:
    """
    ``target`` (a request target or an absolute URL, as a ``Referer``) with
    its secrets replaced by ``[redacted]``: what follows a path prefix of
    ``secretPaths`` (``"/share/"``: a share link's token), the value of
    every query parameter named in ``secretParameters``, and the whole
    value of any other parameter that carries one of these, however often
    percent-encoded (``next=%2Fshare%2F...``).
    """
    paths = tuple(p.lower() for p in secretPaths)
    text = target.decode("latin-1")
    origin = ""
    match = _ABSOLUTE.match(text)
    if match:
        origin, text = match.group(0), text[match.end() :]
    path, question, query = text.partition("?")
    path, hash_, _ = path.partition("#")
    normal = _normalPath(path)
    for prefix in paths:
        if normal.startswith(prefix):
            path = prefix + REDACTED
            break
    if question:
        query = query.partition("#")[0]
        pairs = []
        for pair in query.split("&"):
            name, equals, value = pair.partition("=")
            if equals and (
                _unquoted(name).strip().lower() in secretParameters
                or _carriesSecret(value, paths, secretParameters)
            ):
                pair = f"{name}={REDACTED}"
            pairs.append(pair)
        path += "?" + "&".join(pairs)
    if hash_:
        path += "#" + REDACTED
    return (origin + path).encode("latin-1")


class _Redacted:
    """What :func:`combinedLogFormatter` reads of a request, with the secrets redacted."""

    def __init__(self, request: Any, paths: tuple[str, ...], parameters: frozenset[str]) -> None:
        self._request = request
        self.uri = redactTarget(request.uri, paths, parameters)
        self._paths = paths
        self._parameters = parameters

    def getHeader(self, name: bytes) -> bytes | None:
        value: bytes | None = self._request.getHeader(name)
        if value is not None and name.lower() == b"referer":
            value = redactTarget(value, self._paths, self._parameters)
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def redactingLogFormatter(
    secretPaths: Iterable[str] = (), secretParameters: frozenset[str] = SECRET_PARAMETERS
) -> IAccessLogFormatter:
    """twisted.web's combined log format, with secrets redacted from the target and ``Referer``."""
    paths = tuple(secretPaths)

    @provider(IAccessLogFormatter)
    def formatter(timestamp: str, request: Any) -> str:
        line: str = combinedLogFormatter(timestamp, _Redacted(request, paths, secretParameters))
        return line

    return formatter


# -- the site ----------------------------------------------------------------------------------


def _noLimit(method: bytes, target: bytes) -> int | None:
    return None


class FrontSite(Site):
    """
    A twisted.web ``Site`` served through :class:`FrontChannel` (HTTP/1.1
    only: the channel is twisted.web's HTTP/1.1 one).

    :param bodyLimit: the largest body of a request, by method and target;
        ``None`` for requests whose body the ``requestFactory`` streams and
        bounds itself (then :class:`FrontRequest` must not be that factory).
    :param secretPaths: path prefixes after which a target holds a secret
        (redacted from the access log).
    """

    protocol = FrontChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Any,
        *,
        reactor: Any,
        bodyLimit: BodyLimit = _noLimit,
        limits: SiteLimits | None = None,
        requestFactory: Any = FrontRequest,
        serverName: str = "DIT4C",
        secretPaths: Iterable[str] = (),
        secretParameters: frozenset[str] = SECRET_PARAMETERS,
    ) -> None:
        super().__init__(
            resource,
            requestFactory=requestFactory,
            # twisted.web's timeout restarts at every byte: the channel keeps its own deadlines.
            timeout=None,
            reactor=reactor,
            logFormatter=redactingLogFormatter(secretPaths, secretParameters),
        )
        self.bodyLimit = bodyLimit
        self.limits = limits or SiteLimits()
        self.serverName = serverName

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]
