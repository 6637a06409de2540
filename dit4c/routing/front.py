"""
The routing server's public side: one :class:`PublicHTTPProtocol` per
browser connection.

Each connection is routed by its first request's host name and becomes one
tunnel stream; the listener turns that stream into one connection to the
tool, so keep-alive and pipelining work end to end. Request heads are parsed
(httptools: llhttp, Node's strict parser) so that forwarding headers can be
set and bodies re-framed exactly as parsed; responses pass through untouched.
After an ``Upgrade`` (WebSocket and the like) the connection is a plain pipe.
The rules are in docs/protocols.md section 3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dit4c.common.httpfront import FrontLimits, errorPage
from dit4c.common.httpfront import HeadError as _HeadError
from dit4c.common.service import IConnectionTransport, noDelay
from dit4c.tunnel.errors import ErrorCode, StreamReset, TunnelError

if TYPE_CHECKING:
    from dit4c.tunnel.session import Session
    from dit4c.tunnel.stream import Stream

#: Headers a client may not set: the routing server says who the client is.
_DROP = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"))


class Metrics:
    """Counters the admin endpoint exposes; plain ints so the hot path stays cheap."""

    def __init__(self) -> None:
        self.requests = 0
        self.connections = 0
        self.open = 0
        self.bytesIn = 0
        self.bytesOut = 0
        self.errors: dict[str, int] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


#: host name (lower case, no port) → the session of the tunnel that owns it.
Resolver = Callable[[str], "Session | None"]


class _Upstream(Protocol):
    """The stream side: whatever the tool answers goes to the client as is."""

    def __init__(self, front: PublicHTTPProtocol) -> None:
        self.front = front
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        front = self.front
        front.metrics.bytesOut += len(data)
        front.lastActivity = front.clock.seconds()
        front.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.front.upstreamLost(self, reason)


@implementer(IHalfCloseableProtocol)
class PublicHTTPProtocol(Protocol):
    log = Logger()
    transport: IConnectionTransport

    def __init__(
        self,
        resolve: Resolver,
        scheme: str,
        clock: IReactorTime,
        limits: FrontLimits,
        metrics: Metrics,
        sniHost: Callable[[Any], str | None] | None = None,
    ) -> None:
        self.resolve = resolve
        self.scheme = scheme.encode()
        self.clock = clock
        self.limits = limits
        self.metrics = metrics
        self.sniHost = sniHost
        self._parser: Any = None
        self._host: str | None = None
        self._stream: Stream | None = None
        self._upstream: _Upstream | None = None
        self._inHead = True
        self._headBytes = 0
        self._headSize = 0
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._hostHeader: bytes | None = None
        self._chunked = False
        self._raw = False
        self._closing = False
        self._headTimer: IDelayedCall | None = None
        self._idleTimer: IDelayedCall | None = None
        self.lastActivity = 0.0
        self._clientIP = b""

    # -- connection life ---------------------------------------------------------

    def connectionMade(self) -> None:
        self.metrics.connections += 1
        self.metrics.open += 1
        noDelay(self.transport)
        peer = self.transport.getPeer()
        self._clientIP = str(getattr(peer, "host", "")).encode()
        self._parser = httptools.HttpRequestParser(self)
        self.lastActivity = self.clock.seconds()
        self._headTimer = self.clock.callLater(self.limits.headTimeout, self._headTimedOut)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.metrics.open -= 1
        self._cancelTimers()
        self._parser = None
        stream, self._stream = self._stream, None
        if stream is not None:
            self._upstream = None
            stream.loseConnection()

    def _cancelTimers(self) -> None:
        for timer in (self._headTimer, self._idleTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._headTimer = self._idleTimer = None

    def _headTimedOut(self) -> None:
        self._headTimer = None
        if self._inHead and not self._closing:
            self.metrics.error("head_timeout")
            self._refuse(408, "Request Timeout", "The request was not sent in time.")

    def _checkIdle(self) -> None:
        self._idleTimer = None
        if self._raw or self._closing:
            return
        idle = self.clock.seconds() - self.lastActivity
        if idle >= self.limits.idleTimeout:
            self.metrics.error("idle_timeout")
            self._close()
        else:
            self._idleTimer = self.clock.callLater(self.limits.idleTimeout - idle, self._checkIdle)

    # -- bytes from the client -------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.metrics.bytesIn += len(data)
        self.lastActivity = self.clock.seconds()
        if self._raw:
            self._stream.write(data)  # type: ignore[union-attr]
            return
        if self._inHead:
            self._headBytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgraded(data[e.args[0]:])
            return
        except _HeadError as e:
            self._refuse(e.status, e.title, e.message)
            return
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _HeadError):
                self._refuse(cause.status, cause.title, cause.message)
            else:
                self.log.failure("public request handling failed", Failure(cause or e))
                self._refuse(500, "Internal Server Error", "The routing server failed.")
            return
        except httptools.HttpParserError as e:
            self.metrics.error("bad_request")
            self._refuse(400, "Bad Request", f"Malformed request: {e}")
            return
        # httptools holds a header line until it ends: bound what a client
        # can make it hold (the callbacks count the head exactly).
        if self._inHead and self._headBytes > self.limits.maxHeadBytes + 65536:
            self.metrics.error("head_too_large")
            self._refuse(431, "Request Header Fields Too Large", "The request head is too large.")

    def _refuse(self, status: int, title: str, message: str) -> None:
        """
        Answer an error ourselves if no response from the tool can be under
        way on this connection, then close; otherwise just close.
        """
        if self._closing:
            return
        self._closing = True
        self._cancelTimers()
        if self._upstream is None or self._upstream.received == 0:
            self.transport.write(errorPage(status, title, message))
        stream, self._stream = self._stream, None
        self._upstream = None
        if stream is not None:
            stream.abortConnection()
        self._close()

    def _close(self, abort: bool = False) -> None:
        """
        Close the client connection. The stream was its producer: unregister
        it first, or a paused producer would be resumed instead of the close.
        """
        self._closing = True
        self._cancelTimers()
        self.transport.unregisterProducer()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._inHead = True
        self._headBytes = 0
        self._headSize = 0
        self._url = []
        self._headers = []
        self._hostHeader = None
        self._chunked = False
        if self._headTimer is None:
            self._headTimer = self.clock.callLater(self.limits.headTimeout, self._headTimedOut)

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._counted(len(url))

    def _counted(self, n: int) -> None:
        self._headSize += n
        if self._headSize > self.limits.maxHeadBytes:
            self.metrics.error("head_too_large")
            raise _HeadError(431, "Request Header Fields Too Large", "The request head is too large.")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= self.limits.maxHeaders:
            self.metrics.error("too_many_headers")
            raise _HeadError(431, "Request Header Fields Too Large", "Too many header lines.")
        headers.append((name, value))
        self._counted(len(name) + len(value) + 4)
        lname = name.lower()
        if lname == b"host":
            if self._hostHeader is not None:
                raise _HeadError(400, "Bad Request", "More than one Host header.")
            self._hostHeader = value
        elif lname == b"transfer-encoding" and b"chunked" in value.lower():
            self._chunked = True

    def on_headers_complete(self) -> None:
        self._inHead = False
        if self._headTimer is not None:
            if self._headTimer.active():
                self._headTimer.cancel()
            self._headTimer = None
        self.metrics.requests += 1
        parser = self._parser
        method = parser.get_method()
        if method == b"CONNECT":
            raise _HeadError(405, "Method Not Allowed", "CONNECT is not supported.")
        host = self._requestHost()
        if self._stream is None:
            self._connect(host)
        elif host != self._host:
            self.metrics.error("misdirected")
            raise _HeadError(421, "Misdirected Request", "One connection serves one host name.")
        self._stream.write(self._head(method, parser.get_http_version()))  # type: ignore[union-attr]
        if self._idleTimer is None and not self._closing:
            self._idleTimer = self.clock.callLater(self.limits.idleTimeout, self._checkIdle)

    def on_body(self, body: bytes) -> None:
        stream = self._stream
        if stream is None:
            return
        if self._chunked:
            stream.writeSequence((b"%x\r\n" % len(body), body, b"\r\n"))
        else:
            stream.write(body)

    def on_message_complete(self) -> None:
        if self._chunked and self._stream is not None:
            self._stream.write(b"0\r\n\r\n")

    # -- routing ---------------------------------------------------------------------

    def _requestHost(self) -> str:
        raw = self._hostHeader
        if raw is None:
            raise _HeadError(400, "Bad Request", "The request has no Host header.")
        try:
            host = raw.decode("ascii").strip().lower()
        except UnicodeDecodeError:
            raise _HeadError(400, "Bad Request", "The Host header is not ASCII.") from None
        if host.startswith("["):
            host = host[: host.find("]") + 1]
        else:
            host = host.partition(":")[0]
        host = host.rstrip(".")
        if self.sniHost is not None:
            sni = self.sniHost(self.transport)
            if sni is not None and sni != host:
                raise _HeadError(421, "Misdirected Request", "The Host header does not match TLS SNI.")
        return host

    def _connect(self, host: str) -> None:
        session = self.resolve(host)
        if session is None:
            self.metrics.error("unknown_host")
            raise _HeadError(404, "Not Found", f"There is no instance at {host}.")
        upstream = _Upstream(self)
        peer = self.transport.getPeer()
        metadata = {
            "peer": f"{getattr(peer, 'host', '')}:{getattr(peer, 'port', '')}",
            "scheme": self.scheme.decode(),
            "host": host,
        }
        try:
            stream = session.openStream(upstream, metadata)
        except TunnelError as e:
            self.metrics.error("tunnel_unavailable")
            raise _HeadError(502, "Bad Gateway", f"The instance cannot take connections now ({e}).") from None
        self._host = host
        self._stream = stream
        self._upstream = upstream
        # Back-pressure both ways: a slow client pauses the stream (and so
        # the tool, through withheld window credit); a full stream pauses
        # reading from the client.
        self.transport.registerProducer(stream, True)
        stream.registerProducer(self.transport, True)

    def _head(self, method: bytes, version: str) -> bytes:
        parts = [method, b" ", b"".join(self._url), b" HTTP/", version.encode(), b"\r\n"]
        chunked = self._chunked
        for name, value in self._headers:
            lname = name.lower()
            if lname in _DROP or (chunked and lname == b"content-length"):
                continue
            parts += (name, b": ", value, b"\r\n")
        parts += (
            b"X-Forwarded-For: ", self._clientIP,
            b"\r\nX-Forwarded-Proto: ", self.scheme,
            b"\r\nX-Forwarded-Host: ", self._hostHeader or b"",
            b"\r\n\r\n",
        )  # fmt: skip
        return b"".join(parts)

    def _upgraded(self, rest: bytes) -> None:
        """After an Upgrade the connection is a pipe: no more parsing or timeouts."""
        self._raw = True
        self._parser = None
        self._cancelTimers()
        if rest and self._stream is not None:
            self._stream.write(rest)

    # -- half-close and the end of the stream ---------------------------------------------

    def readConnectionLost(self) -> None:
        stream = self._stream
        if stream is not None and (self._raw or not self._inHead):
            stream.loseWriteConnection()
        else:
            self._close()

    def writeConnectionLost(self) -> None:
        pass

    def upstreamLost(self, upstream: _Upstream, reason: Failure | None) -> None:
        if upstream is not self._upstream:
            return
        self._stream = None
        self._upstream = None
        error = reason.value if reason is not None else None
        if isinstance(error, StreamReset) and upstream.received == 0 and not self._closing:
            self.metrics.error("bad_gateway")
            message = (
                "The tool is not answering."
                if error.code == ErrorCode.CONNECT_FAILED
                else "The instance's tunnel went away."
            )
            self.transport.write(errorPage(502, "Bad Gateway", message))
            self._close()
            return
        self._close(abort=isinstance(error, StreamReset))


class PublicHTTPFactory(Factory):
    noisy = False

    def __init__(
        self,
        resolve: Resolver,
        scheme: str,
        clock: IReactorTime,
        limits: FrontLimits | None = None,
        metrics: Metrics | None = None,
        sniHost: Callable[[Any], str | None] | None = None,
    ) -> None:
        self.resolve = resolve
        self.scheme = scheme
        self.clock = clock
        self.limits = limits or FrontLimits()
        self.metrics = metrics or Metrics()
        self.sniHost = sniHost

    def buildProtocol(self, addr: Any) -> PublicHTTPProtocol:
        return PublicHTTPProtocol(self.resolve, self.scheme, self.clock, self.limits, self.metrics, self.sniHost)
