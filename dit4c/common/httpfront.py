"""
What every DIT4C server that parses public HTTP request heads shares (the
routing server's public side, the auth helper): limits, error pages, the
rules a request head must follow (size, header lines, one ``Host``), and a
collector for httptools' request-head callbacks that enforces them. The
connection around them (deadlines, forwarding, the switch to a raw pipe) is
:mod:`dit4c.common.frontconn`.

Request heads are parsed by httptools (llhttp, Node's strict parser); nothing
here parses HTTP by hand.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from html import escape
from typing import Any

import httptools

from dit4c.common.errors import HeadError, Upgraded

__all__ = ["FrontLimits", "RequestHead", "errorPage", "feedParser", "hostName"]


@dataclass(frozen=True)
class FrontLimits:
    """Bounds on what one public connection can make the server hold or wait for."""

    #: Bytes of one request head (request line and headers).
    maxHeadBytes: int = 64 * 1024
    #: Header lines in one request.
    maxHeaders: int = 100
    #: Seconds from a request's first byte (or the connection's start) to the end of its head.
    headTimeout: float = 10.0
    #: Seconds with no byte in either direction before a non-upgraded connection is closed.
    idleTimeout: float = 60.0
    #: Connections held at once; one more is answered 503 and closed (None: as many as the process may open).
    maxConnections: int | None = None


def errorPage(
    status: int,
    title: str,
    message: str,
    server: str = "DIT4C routing server",
    headers: bytes = b"",
) -> bytes:
    """A whole ``Connection: close`` HTTP response: a small HTML page saying what happened."""
    body = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{escape(title)}</title></head>"
        '<body style="font-family:sans-serif;max-width:40em;margin:4em auto">'
        f"<h1>{escape(title)}</h1><p>{escape(message)}</p><hr><small>{escape(server)}</small></body></html>\n"
    ).encode()
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/html; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\nCache-Control: no-store\r\n%s\r\n%s"
        % (status, title.encode(), len(body), headers, body)
    )


HEAD_TOO_LARGE = (431, "Request Header Fields Too Large", "The request head is too large.", "head_too_large")


class RequestHead:
    """
    One request head as httptools' callbacks deliver it, with the limits
    enforced as it grows (:class:`HeadError` 431 past them); what the parser
    knows once the head is complete is filled in by :meth:`complete`.
    """

    __slots__ = (
        "url", "headers", "hostHeader", "chunked", "size", "_limits",
        "method", "version", "upgrade", "keepAlive", "hasBody", "host",
    )  # fmt: skip

    def __init__(self, limits: FrontLimits) -> None:
        self._limits = limits
        self.url: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.hostHeader: bytes | None = None
        self.chunked = False
        self.size = 0
        #: The rest is known once the head is complete (:meth:`complete`).
        self.method = b""
        self.version = "1.1"
        #: It asks to switch protocols (``Upgrade`` with ``Connection: upgrade``).
        self.upgrade = False
        self.keepAlive = True
        #: A body follows (chunked, or a Content-Length other than 0).
        self.hasBody = False
        #: The host name of its ``Host`` header (:func:`hostName`).
        self.host = ""

    def _counted(self, n: int) -> None:
        self.size += n
        if self.size > self._limits.maxHeadBytes:
            raise HeadError(*HEAD_TOO_LARGE)

    def onUrl(self, url: bytes) -> None:
        self.url.append(url)
        self._counted(len(url))

    def onHeader(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self._limits.maxHeaders:
            raise HeadError(431, "Request Header Fields Too Large", "Too many header lines.", "too_many_headers")
        self.headers.append((name, value))
        self._counted(len(name) + len(value) + 4)
        lname = name.lower()
        if lname == b"host":
            if self.hostHeader is not None:
                raise HeadError(400, "Bad Request", "More than one Host header.", "bad_request")
            self.hostHeader = value
        elif lname == b"transfer-encoding" and b"chunked" in value.lower():
            self.chunked = True

    def complete(self, parser: Any) -> None:
        """
        The head is complete: take what the parser knows of it and apply the
        rules every front shares.

        :raises HeadError: ``CONNECT`` (405: no front tunnels it), no usable
            ``Host`` (400), or an upgrade request with a body (400: the
            bytes after its head are either its body or another protocol,
            depending on the answer, so no front can frame them safely).
        """
        self.method = method = parser.get_method()
        if method == b"CONNECT":
            raise HeadError(405, "Method Not Allowed", "CONNECT is not supported.", "connect")
        self.version = parser.get_http_version()
        self.upgrade = parser.should_upgrade()
        self.keepAlive = parser.should_keep_alive()
        self.hasBody = self.chunked or any(
            n.lower() == b"content-length" and v.strip() not in (b"0", b"") for n, v in self.headers
        )
        self.host = hostName(self.hostHeader)
        if self.upgrade and self.hasBody:
            raise HeadError(400, "Bad Request", "A request that asks to switch protocols cannot have a body.", "bad_request")

    @property
    def endsConnection(self) -> bool:
        """Whether a server's own answer to it must close the connection: its body is not read, or it asked so."""
        return self.hasBody or self.upgrade or not self.keepAlive

    @property
    def target(self) -> bytes:
        """The request target as sent (``/path?query``)."""
        return b"".join(self.url)

    def values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (lower case), in order."""
        return [v for n, v in self.headers if n.lower() == name]

    def rebuilt(self, drop: frozenset[bytes], extra: Iterable[bytes]) -> bytes:
        """
        The head to pass on: the request line as parsed, every header but
        those named in ``drop`` (lower case) in the order sent, then
        ``extra`` (whole ``Name: value\r\n`` lines) and the blank line. A
        chunked body stays chunked, so a ``Content-Length`` beside it is
        dropped too.
        """
        parts = [self.method, b" ", *self.url, b" HTTP/", self.version.encode(), b"\r\n"]
        chunked = self.chunked
        for name, value in self.headers:
            lname = name.lower()
            if lname in drop or (chunked and lname == b"content-length"):
                continue
            parts += (name, b": ", value, b"\r\n")
        parts += extra
        parts.append(b"\r\n")
        return b"".join(parts)


def hostName(raw: bytes | None) -> str:
    """
    The host name of a ``Host`` header: lower case, no port, no trailing dot.

    :raises HeadError: 400, no header or not ASCII.
    """
    if raw is None:
        raise HeadError(400, "Bad Request", "The request has no Host header.", "bad_request")
    try:
        host = raw.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        raise HeadError(400, "Bad Request", "The Host header is not ASCII.", "bad_request") from None
    if host.startswith("["):
        host = host[: host.find("]") + 1]
    else:
        host = host.partition(":")[0]
    return host.rstrip(".")


def feedParser(parser: Any, data: bytes) -> None:
    """
    Feed ``data`` to an httptools parser, turning its exceptions into ours:

    :raises Upgraded: the request upgraded the connection (bytes after the head in ``rest``).
    :raises HeadError: a callback refused the head, or the request is malformed (400).
    :raises Exception: a callback failed otherwise (the original exception).
    """
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade as e:
        raise Upgraded(data[e.args[0]:]) from None
    except HeadError:
        raise
    except httptools.HttpParserCallbackError as e:
        cause = e.__context__
        if isinstance(cause, Exception):
            raise cause from None
        raise
    except httptools.HttpParserError as e:
        raise HeadError(400, "Bad Request", f"Malformed request: {e}", "bad_request") from None
