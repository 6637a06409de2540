"""
A small web tool for the tests that move traffic through DIT4C: it
streams (``/bytes?n=N``), sinks and hashes (``/sink``), reports the
request it got (``/headers``) and echoes WebSocket messages (``/ws``).

It never holds a body in memory: uploads are hashed as they arrive and
downloads are produced as the client reads, so a test that moves hundreds
of megabytes through a tunnel measures the tunnel, not this.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

#: One block of the download pattern; downloads are this block repeated.
PATTERN = bytes(range(256)) * 256


def patternDigest(n: int) -> str:
    """The sha256 of the first ``n`` bytes of ``/bytes?n=...``."""
    h = hashlib.sha256()
    full, rest = divmod(n, len(PATTERN))
    for _ in range(full):
        h.update(PATTERN)
    h.update(PATTERN[:rest])
    return h.hexdigest()


class HashingRequest(Request):
    """A request whose body is hashed and counted on arrival, never stored."""

    def gotLength(self, length: int | None) -> None:
        super().gotLength(0)
        self.bodyHash = hashlib.sha256()
        self.bodyLength = 0

    def handleContentChunk(self, data: bytes) -> None:
        self.bodyHash.update(data)
        self.bodyLength += len(data)


@implementer(IPushProducer)
class PatternProducer:
    """
    ``n`` bytes of the pattern as ``request``'s body, written only while the
    connection takes them (``paused`` says when it does not); with
    ``cutAfter``, the connection is dropped once that many are written.
    """

    def __init__(self, request: Request, n: int, cutAfter: int | None = None) -> None:
        self.request = request
        self.n = n
        self.remaining = n
        self.cutAfter = cutAfter
        self.paused = False
        self.stopped = False

    @property
    def sent(self) -> int:
        return self.n - self.remaining

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped and self.remaining > 0:
            if self.cutAfter is not None and self.sent >= self.cutAfter:
                self.stopped = True
                self.request.transport.abortConnection()  # type: ignore[union-attr]
                return
            chunk = PATTERN if self.remaining >= len(PATTERN) else PATTERN[: self.remaining]
            self.remaining -= len(chunk)
            self.request.write(chunk)
        if self.remaining == 0 and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.stopped = True


class _Bytes(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> Any:
        n = int(request.args.get(b"n", [b"0"])[0])
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(n).encode())
        PatternProducer(request, n).start()
        return NOT_DONE_YET


class _Sink(Resource):
    isLeaf = True

    def render_POST(self, request: HashingRequest) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"length": request.bodyLength, "sha256": request.bodyHash.hexdigest()}).encode()

    render_PUT = render_POST


class _Headers(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        headers = {k.decode(): [v.decode() for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()}
        body = {
            "method": request.method.decode(),
            "path": request.uri.decode(),
            "headers": headers,
            "client": request.getClientAddress().host,
        }
        return json.dumps(body).encode()

    render_POST = render_GET


class EchoProtocol(WebSocketServerProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


@dataclass
class Backend:
    port: IListeningPort
    site: Site

    @property
    def portNumber(self) -> int:
        return self.port.getHost().port  # type: ignore[attr-defined]

    @property
    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.portNumber}"

    def stop(self) -> Deferred[Any]:
        return defer.maybeDeferred(self.port.stopListening)


def backendSite() -> Site:
    """``/bytes?n=N`` (streamed), ``/sink`` (hash a body), ``/headers``, ``/ws`` (echo)."""
    root = Resource()
    root.putChild(b"bytes", _Bytes())
    root.putChild(b"sink", _Sink())
    root.putChild(b"headers", _Headers())
    ws = WebSocketServerFactory()
    ws.protocol = EchoProtocol
    ws.setProtocolOptions(maxMessagePayloadSize=16 * 1024 * 1024)
    root.putChild(b"ws", WebSocketResource(ws))
    site = Site(root, requestFactory=HashingRequest)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


def startBackend(reactor: Any, interface: str = "127.0.0.1") -> Backend:
    site = backendSite()
    port = reactor.listenTCP(0, site, interface=interface, backlog=4096)
    return Backend(port, site)
