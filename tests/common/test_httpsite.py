"""
The twisted.web channel behind the public-front rules
(:mod:`dit4c.common.httpsite`), driven byte by byte on a ``StringTransport``
with a test ``Clock``: deadlines, body limits, head rules, pipelining, and
what the access log is allowed to show. The portal's own tests
(tests/portal/test_http.py, tests/security/) run the same channel on real
sockets.
"""

from __future__ import annotations

import tempfile
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from dit4c.common.httpfront import FrontLimits
from dit4c.common.httpsite import FrontSite, Phase, SiteLimits, redactingLogFormatter, redactTarget

LIMITS = SiteLimits(front=FrontLimits(headTimeout=10.0, idleTimeout=60.0), bodyTimeout=30.0, lingerTime=2.0, lingerBytes=1000)
HOST = b"Host: example.org\r\n"


class Recorder(Resource):
    """Answers every request with its body's length; ``hold`` keeps requests unanswered."""

    isLeaf = True

    def __init__(self, hold: bool = False) -> None:
        super().__init__()
        self.hold = hold
        self.requests: list[Any] = []

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        if self.hold:
            return NOT_DONE_YET
        body = request.content.read()
        return b"got %d" % len(body)


class HalfClosable(StringTransport):
    """A transport that can shut its sending side, as TCP's can."""

    writeClosed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class Connection:
    def __init__(self, resource: Resource | None = None, limit: int | None = 100, limits: SiteLimits = LIMITS) -> None:
        self.clock = Clock()
        self.resource = resource or Recorder()
        self.site = FrontSite(self.resource, reactor=self.clock, bodyLimit=lambda method, target: limit, limits=limits)
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        self.channel: Any = self.site.buildProtocol(peer)
        self.transport = HalfClosable(peerAddress=peer)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def answer(self) -> bytes:
        value: bytes = self.transport.value()
        self.transport.clear()
        return value

    @property
    def closing(self) -> bool:
        return bool(self.transport.writeClosed or self.transport.disconnecting)

    @property
    def handled(self) -> int:
        return len(self.resource.requests)  # type: ignore[attr-defined]


def status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer
    return int(answer[9:12])


# -- deadlines -----------------------------------------------------------------------------------


def test_head_deadline_is_not_reset_by_each_byte() -> None:
    c = Connection()
    for byte in (b"GET / HTTP/1.1\r\n" + HOST + b"X-Slow: aaaa")[:36]:  # 9 s
        c.send(bytes([byte]))
        c.clock.advance(0.25)
    assert c.answer() == b"" and not c.closing
    c.clock.advance(1.0)
    answer = c.answer()
    assert status(answer) == 408 and c.closing and c.handled == 0
    assert c.channel.phase is Phase.CLOSING


def test_a_silent_connection_has_the_head_deadline() -> None:
    c = Connection()
    c.clock.advance(9.9)
    assert not c.closing
    c.clock.advance(0.1)
    assert status(c.answer()) == 408


def test_closing_aborts_after_the_linger_time_and_drops_what_comes() -> None:
    c = Connection()
    c.clock.advance(10.0)
    assert status(c.answer()) == 408
    assert c.transport.writeClosed and not c.transport.aborted
    c.send(b"x" * 500)  # read and dropped
    assert c.answer() == b""
    c.clock.advance(2.0)
    assert c.transport.aborted


def test_closing_aborts_past_the_linger_bytes() -> None:
    c = Connection()
    c.send(b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 101\r\n\r\n")
    assert status(c.answer()) == 413
    c.send(b"x" * 1000)
    assert not c.transport.aborted
    c.send(b"x")
    assert c.transport.aborted


def test_idle_deadline_between_requests() -> None:
    c = Connection()
    c.clock.advance(9.0)
    c.send(b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
    assert status(c.answer()) == 200
    assert c.channel.phase is Phase.IDLE
    c.clock.advance(59.9)
    assert not c.closing
    c.clock.advance(0.1)
    assert c.closing and c.answer() == b""  # closed quietly: no request was under way


def test_the_next_head_has_its_own_deadline_from_its_first_byte() -> None:
    c = Connection()
    c.send(b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
    c.answer()
    c.clock.advance(50.0)
    c.send(b"G")
    assert c.channel.phase is Phase.HEAD
    c.clock.advance(9.9)
    assert not c.closing
    c.clock.advance(0.1)
    assert status(c.answer()) == 408


def test_an_answer_in_progress_has_no_deadline() -> None:
    """A long-lived answer (Server-Sent Events, a WebSocket) lives as long as the application keeps it."""
    resource = Recorder(hold=True)
    c = Connection(resource)
    c.send(b"GET /events HTTP/1.1\r\n" + HOST + b"\r\n")
    assert c.channel.phase is Phase.ANSWERING
    request = resource.requests[0]
    request.write(b"data: 1\n\n")
    c.clock.advance(24 * 3600.0)
    assert not c.closing
    request.finish()
    assert c.channel.phase is Phase.IDLE
    c.clock.advance(60.0)
    assert c.closing


def test_body_deadline() -> None:
    c = Connection()
    c.send(b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 10\r\n\r\n12345")
    assert c.channel.phase is Phase.BODY
    c.clock.advance(29.9)
    c.send(b"6")
    c.clock.advance(0.1)
    assert status(c.answer()) == 408 and c.handled == 0


def test_a_streamed_body_may_take_long_but_not_stall() -> None:
    """With no limit (the request class streams the body), each byte extends the deadline to ``idleTimeout``."""
    c = Connection(limit=None)
    c.send(b"PUT / HTTP/1.1\r\n" + HOST + b"Content-Length: 100\r\n\r\n")
    for _ in range(20):
        c.clock.advance(50.0)
        c.send(b"x")
    assert not c.closing
    c.clock.advance(60.0)
    assert status(c.answer()) == 408


# -- bodies ----------------------------------------------------------------------------------------


def test_content_length_over_the_limit_is_refused_before_the_body() -> None:
    c = Connection()
    c.send(b"POST / HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\nContent-Length: 2147483648\r\n\r\n")
    answer = c.answer()
    assert status(answer) == 413 and b"100 Continue" not in answer
    assert b"limited to 100 bytes" in answer and c.closing and c.handled == 0


def test_a_chunked_body_is_cut_at_the_limit() -> None:
    c = Connection()
    c.send(b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n")
    c.send(b"32\r\n" + b"a" * 50 + b"\r\n")
    c.send(b"32\r\n" + b"a" * 50 + b"\r\n")
    assert c.answer() == b""  # 100 bytes: the limit, not past it
    c.send(b"1\r\na\r\n0\r\n\r\n")
    answer = c.answer()
    assert status(answer) == 413 and c.handled == 0  # and the end of the body did not reach the application


def test_a_body_within_its_limit_reaches_the_application() -> None:
    c = Connection()
    c.send(b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n32\r\n" + b"a" * 50 + b"\r\n0\r\n\r\n")
    c.send(b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 100\r\n\r\n" + b"b" * 100)
    answer = c.answer()
    assert answer.count(b"HTTP/1.1 200 OK") == 2 and b"got 50" in answer and b"got 100" in answer


def test_bodies_are_never_spooled_to_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """twisted.web writes a body over 100 KB to a temporary file; within its limit, this one stays in memory."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a request body went to a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    c = Connection(limit=300_000)
    c.send(b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 300000\r\n\r\n" + b"x" * 300_000)
    assert b"got 300000" in c.answer()


# -- heads ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head, expected",
    [
        (b"GET / HTTP/1.1\r\n" + HOST + b"X-A: a\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + HOST + b"\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + b"X-A: a\nX-B: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked, identity\r\n\r\n", 400),
        (b"GET /\x01 HTTP/1.1\r\n" + HOST + b"\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + b"X : b\r\n\r\n", 400),
        (b"CONNECT example.org:443 HTTP/1.1\r\n" + HOST + b"\r\n", 405),
        (b"GET / HTTP/1.1\r\n" + HOST + b"Upgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 5\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + HOST + b"".join(b"X-%d: a\r\n" % i for i in range(100)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * (64 * 1024) + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * (70 * 1024), 431),
    ],
    ids=["obs-fold", "two-hosts", "no-host", "no-host-1.0", "host-not-ascii", "bare-lf", "two-lengths",
         "length-and-chunked", "chunked-not-last", "control-in-target", "space-before-colon", "connect", "upgrade-with-body",
         "too-many-headers", "header-too-large", "line-too-long"],
)  # fmt: skip
def test_malformed_heads_are_refused(head: bytes, expected: int) -> None:
    c = Connection()
    c.send(head)
    answer = c.answer()
    assert status(answer) == expected and c.closing and c.handled == 0
    assert b"Connection: close" in answer


def test_a_websocket_head_is_handed_on() -> None:
    c = Connection(Recorder(hold=True))
    c.send(
        b"GET /.dit4c/channel HTTP/1.1\r\n" + HOST
        + b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )  # fmt: skip
    assert c.handled == 1 and c.channel.phase is Phase.ANSWERING


def test_pipelined_heads_each_follow_the_rules() -> None:
    c = Connection()
    c.send(b"GET / HTTP/1.1\r\n" + HOST + b"\r\nGET / HTTP/1.1\r\n" + HOST + HOST + b"\r\n")
    answer = c.answer()
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 400 Bad Request" in answer
    assert c.handled == 1 and c.closing


def test_one_empty_line_before_a_request_is_allowed() -> None:
    c = Connection()
    c.send(b"\r\nGET / HTTP/1.1\r\n" + HOST + b"\r\n")
    assert status(c.answer()) == 200


# -- the access log --------------------------------------------------------------------------------

SHARE = ("/share/",)


@pytest.mark.parametrize(
    "target, logged",
    [
        (b"/share/s3cr3t", b"/share/[redacted]"),
        (b"//share/s3cr3t?x=1", b"/share/[redacted]?x=1"),
        (b"/%73hare/s3cr3t", b"/share/[redacted]"),
        (b"/login?next=/share/s3cr3t", b"/login?next=[redacted]"),
        (b"/login?next=%2Fshare%2Fs3cr3t&a=b", b"/login?next=[redacted]&a=b"),
        (b"/login?next=%252Fshare%252Fs3cr3t", b"/login?next=[redacted]"),
        (b"/login/gh/callback?code=s3cr3t&state=s3cr3t", b"/login/gh/callback?code=[redacted]&state=[redacted]"),
        (b"/login?next=/oauth/authorize%3Fclient_id%3Dx%26state%3Ds3cr3t", b"/login?next=[redacted]"),
        (b"/oauth/authorize?client_id=x&STATE=s3cr3t&redirect_uri=https://a/", b"/oauth/authorize?client_id=x&STATE=[redacted]&redirect_uri=https://a/"),
        (b"https://portal.example.org/login?next=/share/s3cr3t", b"https://portal.example.org/login?next=[redacted]"),
        (b"/api/v1/instances?token=s3cr3t#frag", b"/api/v1/instances?token=[redacted]"),
        (b"/health", b"/health"),
        (b"/static/app.js?v=3", b"/static/app.js?v=3"),
    ],
)
def test_secrets_are_redacted_from_targets(target: bytes, logged: bytes) -> None:
    assert redactTarget(target, SHARE) == logged


@given(
    token=st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=8, max_size=64),
    slashes=st.integers(1, 3),
    form=st.sampled_from(["path", "next", "next-encoded", "referer", "code", "state-in-next"]),
)
def test_no_form_of_a_secret_reaches_the_log(token: str, slashes: int, form: str) -> None:
    lead = "/" * slashes
    target = {
        "path": f"{lead}share/{token}",
        "next": f"/login?next={lead}share/{token}",
        "next-encoded": f"/login?a=1&next=%2Fshare%2F{token}",
        "referer": f"https://portal.example.org/login?next=/share/{token}",
        "code": f"/login/github/callback?state=x&code={token}",
        "state-in-next": f"/login?next=/oauth/authorize%3Fresponse_type%3Dcode%26state%3D{token}",
    }[form]
    assert token.encode() not in redactTarget(target.encode(), SHARE)


def test_the_access_log_line_redacts_target_and_referer() -> None:
    resource = Recorder()
    c = Connection(resource)
    c.send(b"GET /share/s3cr3t HTTP/1.1\r\n" + HOST + b"Referer: https://example.org/login?next=/share/s3cr3t\r\n\r\n")
    formatter = redactingLogFormatter(SHARE)
    line = formatter("[now]", resource.requests[0])
    assert "s3cr3t" not in line
    assert '"GET /share/[redacted] HTTP/1.1" 200' in line and '"https://example.org/login?next=[redacted]"' in line
