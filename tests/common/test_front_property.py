"""
Generated request heads (and bytes) fed to the shared front through each
proxy, on real sockets: the routing server's public side (through a tunnel
and listener) and the auth helper (with a real portal, alice logged in),
each in front of a recording tool.

For every example: each head is answered with a 4xx (or the auth helper's
login redirect) or passed on well formed: the tool parses what it receives
strictly (httptools), and every request it gets has exactly the headers
the client sent, less those the front drops, plus those it sets; nothing
is logged as an error, and the connection always ends.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.nextpath import inReactor
from support.sockets import RawClient
from twisted.internet import reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from dit4c.auth.session import stripCookies

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "auth"))
from auth_client import Browser, closeWorld, logIn, makeWorld  # noqa: E402

# -- the tool: parses strictly, records, answers ----------------------------------------------------------


@dataclass
class Received:
    """One request as the tool parsed it."""

    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False


@implementer(IHalfCloseableProtocol)
class RecordingTool(Protocol):
    """
    Reads requests with httptools (strict), records each one in ``log``,
    answers ``200`` to each (``101`` to an upgrade of ``/switch``, then
    reads no more), and a malformed one is recorded as such.
    """

    def __init__(self, log: list[Any]) -> None:
        self.log = log
        self.parser = httptools.HttpRequestParser(self)
        self.current: Received | None = None
        self.switched = False

    def dataReceived(self, data: bytes) -> None:
        if self.switched:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            if self.switched:
                return
            # Asked to switch, and answered 200: what follows is HTTP again.
            self.parser = httptools.HttpRequestParser(self)
            self.dataReceived(data[e.args[0]:])
        except httptools.HttpParserError as e:
            self.log.append(("malformed", bytes(data[:200]), str(e)))
            self.transport.loseConnection()

    def on_url(self, url: bytes) -> None:
        self.current = Received(url, [])
        self.log.append(self.current)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self.current.body += body  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        request = self.current
        assert request is not None
        request.complete = True
        if request.target == b"/switch" and self.parser.should_upgrade():
            self.switched = True
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\n")
        elif self.parser.get_method() == b"HEAD":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Tool: yes\r\n\r\n")
        else:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Tool: yes\r\n\r\ntool")

    def readConnectionLost(self) -> None:
        if self.current is not None and not self.current.complete and not self.switched:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


def toolFactory(log: list[Any]) -> Factory:
    return Factory.forProtocol(lambda: RecordingTool(log))


# -- requests, generated ------------------------------------------------------------------------------------


@dataclass
class Request:
    seq: int
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    fold: bool
    eol: bytes

    def encode(self, host: bytes, cookie: bytes) -> bytes:
        lines = [self.method + b" " + self.target + b" " + self.version]
        for name, value in self.headers:
            value = value.replace(b"{host}", host).replace(b"{session}", cookie)
            lines.append(name + b": " + value)
            if self.fold:
                lines.append(b" folded")
        return self.eol.join(lines) + self.eol + self.eol + self.body


#: Headers a front drops or sets, sent by the client: each must be dropped (or replaced) every time.
FORGED = st.sampled_from(
    [
        (b"Cookie", b"theirs=1; {session}; dit4c_auth_flow=x"),
        (b"Cookie", b"dit4c_auth=bogus"),
        (b"Cookie", b"a=1"),
        (b"X-DIT4C-User", b"IMPERSONATED-OWNER"),
        (b"x-dit4c-user", b"owner"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"evil.example"),
        (b"Forwarded", b"for=6.6.6.6"),
    ]
)
#: Headers that decide what comes after the head.
FRAMING = st.sampled_from(
    [
        (b"Upgrade", b"foo"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"upgrade"),
        (b"Connection", b"close"),
        (b"Connection", b"keep-alive, Upgrade"),
        (b"Content-Length", b"0"),
        (b"Content-Length", b"5"),
        (b"Content-Length", b"-1"),
        (b"Content-Length", b"1x"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Transfer-Encoding", b"gzip, chunked"),
        (b"Transfer-Encoding", b"chunked, gzip"),
        (b"Expect", b"100-continue"),
    ]
)
#: Other headers, and ones no front takes.
OTHER = st.one_of(
    st.tuples(
        st.from_regex(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}", fullmatch=True),
        st.from_regex(rb"[ -~\t]{0,24}", fullmatch=True),
    ),
    st.sampled_from([(b"Host", b"other.localhost"), (b"Host", b"a b"), (b"Host", b"\xff")]),
    st.sampled_from([(b"Accept", b"text/html"), (b"Sec-Fetch-Mode", b"navigate"), (b"Sec-Fetch-Dest", b"document")]),
)

TARGETS = st.one_of(
    st.sampled_from([b"/headers", b"/", b"/switch", b"/.dit4c/callback?code=x&state=y", b"/.dit4c/x", b"/a?b=c#d"]),
    st.from_regex(rb"/[!-~]{0,24}", fullmatch=True),
    st.sampled_from([b"*", b"http://a.example/x", b"//x", b"/a b", b""]),
)

BODIES = st.one_of(
    st.just(b""),
    st.sampled_from([b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"3;x=y\r\nabc\r\n0\r\nT: t\r\n\r\n"]),
    st.binary(max_size=12),
)


def framedBody(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The body the headers announce (a chunked one, or one of the length given)."""
    for name, value in reversed(headers):
        if name.lower() == b"transfer-encoding" and value.lower().endswith(b"chunked"):
            return b"5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\nT: t\r\n\r\n"
        if name.lower() == b"content-length" and value.isdigit():
            return b"x" * int(value)
    return b""


@st.composite
def requests(draw: Any, seq: int) -> Request:
    headers = [(b"X-Seq", str(seq).encode())]
    if draw(st.integers(0, 9)) > 0:
        headers.append((b"Host", b"{host}"))
    if draw(st.integers(0, 3)) > 0:
        headers.append((b"Cookie", b"{session}"))
    headers += draw(st.lists(st.one_of(FORGED, FORGED, FRAMING, OTHER), max_size=5))
    switch = draw(st.sampled_from(["ask to switch" if i == 3 else "" for i in range(6)]))
    if switch:
        headers += [(b"Upgrade", b"foo"), (b"Connection", b"Upgrade")]
    # Now and then a head or a body no front may pass on as it is (the odd
    # ones in the middle of the list: hypothesis tries a list's ends often).
    odd = draw(st.sampled_from(["well formed"] * 15 + list(ODD) + ["well formed"] * 15))
    if odd == "header":
        headers.append(draw(st.tuples(st.binary(min_size=1, max_size=8), st.binary(max_size=12))))
    return Request(
        seq,
        draw(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"OPTIONS", b"DELETE"])) if odd != "method" else b"G T",
        (b"/switch" if switch else draw(TARGETS)) if odd != "target" else draw(st.binary(max_size=12)),
        b"HTTP/1.1" if odd != "version" else draw(st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"HTTX/1.1"])),
        headers,
        framedBody(headers) if odd != "body" else draw(st.binary(max_size=12)),
        odd == "fold",
        b"\n" if odd == "bare LF" else b"\r\n",
    )


ODD = ("fold", "bare LF", "method", "target", "version", "body", "header")


@st.composite
def connections(draw: Any) -> tuple[list[Request], bytes]:
    n = draw(st.integers(1, 3))
    return [draw(requests(i)) for i in range(n)], draw(st.one_of(st.just(b""), st.just(b""), st.binary(max_size=16)))


# -- the property -----------------------------------------------------------------------------------------


#: What the client may get: the tool's answers, the helper's login redirect, and refusals (4xx); never a 5xx.
ALLOWED = {101, 200, 303} | set(range(400, 500))


@dataclass
class Front:
    name: str
    port: int
    host: bytes
    cookie: bytes
    #: Headers the front drops from every request, lower case.
    drops: frozenset[bytes]
    log: list[Any]

    def expected(self, sent: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The headers a request sent with ``sent`` reaches the tool with."""
        chunked = any(n.lower() == b"transfer-encoding" and b"chunked" in v.lower() for n, v in sent)
        kept = [
            (n, v.lstrip(b" \t"))
            for n, v in sent
            if n.lower() not in self.drops and not (chunked and n.lower() == b"content-length")
        ]
        if self.name == "routing":
            host = next(v for n, v in sent if n.lower() == b"host").lstrip(b" \t")
            return kept + [(b"X-Forwarded-For", b"127.0.0.1"), (b"X-Forwarded-Proto", b"http"), (b"X-Forwarded-Host", host)]
        cookies = stripCookies([v.lstrip(b" \t") for n, v in sent if n.lower() == b"cookie"], frozenset((b"dit4c_auth", b"dit4c_auth_flow")))
        return kept + ([(b"Cookie", cookies)] if cookies else []) + [(b"X-DIT4C-User", b"alice")]


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` then EOF; everything answered until the front closes (it must, within 20 s)."""
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.transport.write(data)
    client.transport.loseWriteConnection()  # type: ignore[attr-defined]
    return await client.done.addTimeout(20, reactor)


def check(front: Front, sent: list[Request], junk: bytes) -> None:
    front.log.clear()
    errors: list[Any] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("isError"):
            errors.append(event)

    data = b"".join(r.encode(front.host, front.cookie) for r in sent) + junk
    globalLogPublisher.addObserver(observer)
    try:
        answer = inReactor(lambda: exchange(front.port, data))
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not errors, errors
    # Every answer the client got is allowed (statuses read up to a switch: after it, nothing is HTTP).
    for status in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer.split(b" 101 Switching Protocols\r\n")[0]):
        assert int(status) in ALLOWED, answer[:400]
    # Everything the tool got parsed, and each request has exactly the headers it should.
    bySeq = {r.seq: r for r in sent}
    for received in front.log:
        assert isinstance(received, Received), received
        seqs = [v for n, v in received.headers if n == b"X-Seq"]
        assert len(seqs) == 1, received
        request = bySeq[int(seqs[0])]
        sentHeaders = [
            (n, v.replace(b"{host}", front.host).replace(b"{session}", front.cookie)) for n, v in request.headers
        ]
        assert received.headers == front.expected(sentHeaders), (request, received)
        assert received.target == request.target


def runProperty(front: Front) -> None:
    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )
    @given(connections())
    def everyHeadIsAnsweredOrPassedOnWellFormed(example: tuple[list[Request], bytes]) -> None:
        check(front, *example)

    everyHeadIsAnsweredOrPassedOnWellFormed()


@pytest_twisted.ensureDeferred
async def test_routing_front(routing: Any, signing: Any) -> None:
    log: list[Any] = []
    tool = reactor.listenTCP(0, toolFactory(log), interface="127.0.0.1")
    try:
        await routing.listen(signing.token("prop"), f"tcp:host=127.0.0.1:port={tool.getHost().port}")
        front = Front(
            "routing", routing.httpPort, b"prop.localhost", b"a=b",
            frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded")), log,
        )  # fmt: skip
        await threads.deferToThread(runProperty, front)
    finally:
        await tool.stopListening()


@pytest_twisted.ensureDeferred
async def test_auth_front(tmp_path: Path) -> None:
    log: list[Any] = []
    w = await makeWorld(tmp_path)
    try:
        tool = reactor.listenTCP(0, toolFactory(log), interface="127.0.0.1")
        w.ports.append(tool)
        await w.startAuth(tool=f"tcp:host=127.0.0.1:port={tool.getHost().port}")
        alice = Browser(w)
        assert (await logIn(alice, "alice")).code == 303
        session = f"dit4c_auth={alice.instanceCookies()['dit4c_auth']}".encode()
        log.clear()
        front = Front("auth", w.authPort, w.host.encode(), session, frozenset((b"cookie", b"x-dit4c-user")), log)
        await threads.deferToThread(runProperty, front)
    finally:
        await closeWorld(w)
