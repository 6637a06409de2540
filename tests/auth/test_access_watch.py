"""
The auth helper's watch of its instance at the portal (docs/protocols.md
6.6): the wire format without I/O (and fuzzed), and the watch's life on a
test clock: watching, each change handed on, a silent or refused watch
opened again with back-off, and stopped cleanly.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from dit4c.auth.errors import WatchError
from dit4c.auth.watch import MAX_LINE, AccessWatch, Notice, NoticeParser

# -- the wire format ----------------------------------------------------------------------------


def test_notices_in_any_pieces() -> None:
    stream = (
        b'{"type":"watching","keepalive":5}\n{"type":"keepalive"}\n\n'
        b'{"type":"changed","sub":"u-1"}\n{"type":"changed"}\n{"type":"future","x":1}\n'
    )
    expected = [
        Notice("watching", keepalive=5.0),
        Notice("keepalive"),
        Notice("changed", sub="u-1"),
        Notice("changed"),
    ]
    assert NoticeParser().feed(stream) == expected
    parser = NoticeParser()
    got: list[Notice] = []
    for i in range(len(stream)):
        got += parser.feed(stream[i : i + 1])
    assert got == expected


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1, 2]",
        b'{"no": "type"}',
        b'{"type": 3}',
        b'{"type": "changed", "sub": 7}',
        b'{"type": "watching", "keepalive": "soon"}',
        b'{"type": "watching", "keepalive": 0}',
        b'{"type": "watching", "keepalive": true}',
        b"[" * 100000,
    ],
)
def test_what_is_not_a_notice(line: bytes) -> None:
    with pytest.raises(WatchError):
        NoticeParser().feed(line + b"\n")


def test_a_line_too_long_is_refused_before_its_end() -> None:
    parser = NoticeParser()
    parser.feed(b"x" * MAX_LINE)
    with pytest.raises(WatchError):
        parser.feed(b"x")


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_any_bytes_give_notices_or_a_watch_error(pieces: list[bytes]) -> None:
    parser = NoticeParser()
    try:
        for piece in pieces:
            for notice in parser.feed(piece):
                assert notice.type in ("watching", "keepalive", "changed")
    except WatchError:
        pass


# -- the watch's life ------------------------------------------------------------------------------


class Body:
    """A response body's producer: stopping it ends the body, as the HTTP client does."""

    def __init__(self, response: Response) -> None:
        self.response = response

    def stopProducing(self) -> None:
        self.response.end()


class Response:
    def __init__(self, code: int) -> None:
        self.code = code
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(Body(self))

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self) -> None:
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connectionLost(Failure(ResponseDone()))


class Portal:
    def __init__(self) -> None:
        self.attempts: list[Deferred[Response]] = []

    def watch(self) -> Deferred[Response]:
        d: Deferred[Response] = Deferred()
        self.attempts.append(d)
        return d

    async def refusal(self, response: Response) -> str:
        return f"{response.code}: refused"


class Revocations:
    def __init__(self) -> None:
        self.said: list[Any] = []

    def watching(self, live: bool) -> None:
        self.said.append(("watching", live))

    def changed(self, sub: str | None) -> None:
        self.said.append(("changed", sub))


def watch() -> tuple[AccessWatch, Portal, Revocations, Clock]:
    clock, portal, revocations = Clock(), Portal(), Revocations()
    service = AccessWatch(portal, revocations, clock, backoff=lambda attempt: 2.0 ** attempt)  # type: ignore[arg-type]
    return service, portal, revocations, clock


def answered() -> tuple[AccessWatch, Response, Portal, Revocations, Clock]:
    """A watch started, and the portal's ``200`` to it (nothing of its body yet)."""
    service, portal, revocations, clock = watch()
    service.startService()
    response = Response(200)
    portal.attempts[0].callback(response)
    return service, response, portal, revocations, clock


def test_changes_are_handed_on_while_watching() -> None:
    service, response, portal, revocations, clock = answered()
    assert len(portal.attempts) == 1
    # Nothing counts before the portal says it is watching.
    response.send(b'{"type":"changed","sub":"u-1"}\n')
    assert revocations.said == []
    response.send(b'{"type":"watching","keepalive":5}\n{"type":"changed","sub":"u-1"}\n{"type":"chan')
    assert service.state == "watching"
    assert revocations.said == [("watching", True), ("changed", "u-1")]
    response.send(b'ged"}\n')
    assert revocations.said[-1] == ("changed", None)
    service.stopService()
    assert service.state == "stopped" and response.protocol is None


def test_a_silent_watch_is_opened_again() -> None:
    service, response, portal, revocations, clock = answered()
    response.send(b'{"type":"watching","keepalive":5}\n')
    for _ in range(10):
        clock.advance(14)
        response.send(b'{"type":"keepalive"}\n')
    assert service.state == "watching" and len(portal.attempts) == 1
    # Three keepalive periods with nothing heard: dropped, and opened again after the back-off.
    clock.advance(15)
    assert response.protocol is None
    assert service.state == "waiting" and revocations.said[-1] == ("watching", False)
    clock.advance(1)
    assert len(portal.attempts) == 2
    again = Response(200)
    portal.attempts[1].callback(again)
    again.send(b'{"type":"watching","keepalive":5}\n')
    assert revocations.said[-1] == ("watching", True)
    service.stopService()


def test_a_refused_or_failed_watch_backs_off_and_tries_again() -> None:
    service, portal, revocations, clock = watch()
    service.startService()
    portal.attempts[0].callback(Response(401))
    assert service.state == "waiting" and revocations.said == [("watching", False)]
    clock.advance(1)
    portal.attempts[1].errback(ConnectionRefusedError("no portal"))
    clock.advance(1.9)
    assert len(portal.attempts) == 2
    clock.advance(0.1)
    assert len(portal.attempts) == 3
    # A watch the portal ends: tried again too.
    response = Response(200)
    portal.attempts[2].callback(response)
    response.send(b'{"type":"watching"}\n')
    assert service.state == "watching"
    response.end()
    assert service.state == "waiting" and revocations.said[-1] == ("watching", False)
    # The back-off starts again after a watch that worked.
    clock.advance(1)
    assert len(portal.attempts) == 4
    service.stopService()
    assert portal.attempts[3].called  # cancelled
    clock.advance(100)
    assert len(portal.attempts) == 4


def test_garbage_from_the_portal_drops_the_watch() -> None:
    service, response, portal, revocations, clock = answered()
    response.send(b'{"type":"watching"}\n<html>oops</html>\n')
    assert response.protocol is None and service.state == "waiting"
    service.stopService()
