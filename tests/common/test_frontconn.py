"""
The shared front's connection machine (dit4c.common.frontconn), driven on
StringTransport and Clock: a client on one side, an upstream on the other,
and rules that forward, answer, refuse or take their time. What the two
real fronts do on real sockets is in tests/routing and tests/auth.
"""

from __future__ import annotations

from typing import Any

import httptools
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dit4c.common.errors import HeadError
from dit4c.common.frontconn import (
    TRANSITIONS,
    Answer,
    Event,
    Forward,
    FrontMetrics,
    FrontProtocol,
    IFrontIO,
    IFrontRules,
    Phase,
)
from dit4c.common.httpfront import FrontLimits, RequestHead, errorPage

OWN = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nown"
LIMITS = FrontLimits(headTimeout=10, idleTimeout=60)


class Transport(StringTransport):
    """A StringTransport that half-closes, as TCP and tunnel streams do."""

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


@implementer(IFrontRules)
class Rules:
    """
    ``/own``: answered here (keep-alive); ``/refuse``: 403 and close;
    ``/later``: decided when the test says (``waiting``); anything else
    forwarded without ``X-Secret``, with ``X-Who: front``.
    """

    def __init__(self) -> None:
        self.upstreams: list[Transport] = []
        self.waiting: list[tuple[Deferred[Any], RequestHead]] = []
        self.endedCount = 0

    def check(self, head: RequestHead) -> Any:
        if head.target.startswith(b"/own"):
            return Answer(OWN)
        if head.target.startswith(b"/refuse"):
            raise HeadError(403, "Forbidden", "Not you.", "forbidden")
        if head.target.startswith(b"/later"):
            d: Deferred[Any] = Deferred()
            self.waiting.append((d, head))
            return d
        return forwarded(head)

    def connect(self, protocol: Any) -> None:
        transport = Transport()
        self.upstreams.append(transport)
        protocol.makeConnection(transport)
        return None

    def page(self, status: int, title: str, message: str) -> bytes:
        return errorPage(status, title, message)

    def unanswered(self, reason: Failure | None) -> bytes:
        return errorPage(502, "Bad Gateway", "No answer.")

    def cut(self, reason: Failure | None) -> bool:
        return False

    def ended(self) -> None:
        self.endedCount += 1


def forwarded(head: RequestHead) -> Forward:
    return Forward(head.rebuilt(frozenset((b"x-secret",)), (b"X-Who: front\r\n",)))


class Front:
    """A front connection with its client transport, rules, clock and metrics."""

    def __init__(self, limits: FrontLimits = LIMITS) -> None:
        self.clock = Clock()
        self.rules = Rules()
        self.metrics = FrontMetrics()
        self.protocol = FrontProtocol(lambda transport: self.rules, self.clock, limits, self.metrics)
        self.client = Transport()
        self.protocol.makeConnection(self.client)

    @property
    def machine(self) -> Any:
        return self.protocol.machine

    @property
    def phase(self) -> Phase:
        return self.machine.phase  # type: ignore[no-any-return]

    @property
    def upstream(self) -> Transport:
        assert self.rules.upstreams, "no upstream connection"
        return self.rules.upstreams[-1]

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def answer(self, data: bytes) -> None:
        assert self.protocol.upstream is not None
        self.protocol.upstream.dataReceived(data)

    def sent(self) -> bytes:
        """What the upstream got so far (and forget it)."""
        value = self.upstream.value()
        self.upstream.clear()
        return value

    def got(self) -> bytes:
        """What the client got so far (and forget it)."""
        value = self.client.value()
        self.client.clear()
        return value


def get(path: str, *extra: str) -> bytes:
    return ("".join([f"GET {path} HTTP/1.1\r\nHost: a.example\r\n", *(f"{h}\r\n" for h in extra), "\r\n"])).encode()


def ok(body: bytes = b"ok", *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), b"".join(h + b"\r\n" for h in extra), body)


def heads(data: bytes) -> list[tuple[bytes, dict[bytes, list[bytes]]]]:
    """Every request in ``data``, parsed strictly: (target, headers by lower-case name)."""
    found: list[tuple[bytes, dict[bytes, list[bytes]]]] = []

    class Collect:
        def on_url(self, url: bytes) -> None:
            found.append((url, {}))

        def on_header(self, name: bytes, value: bytes) -> None:
            found[-1][1].setdefault(name.lower(), []).append(value)

    parser = httptools.HttpRequestParser(Collect())
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    return found


# -- the table ------------------------------------------------------------------------------------------


def test_the_table_is_the_whole_machine() -> None:
    # Every phase can close (but a closed one) and be lost; nothing leaves CLOSED but LOST.
    for phase in Phase:
        assert TRANSITIONS[(phase, Event.LOST)] is Phase.CLOSED
        assert ((phase, Event.CLOSE) in TRANSITIONS) == (phase is not Phase.CLOSED)
    assert {e for (p, e) in TRANSITIONS if p is Phase.CLOSED} == {Event.LOST}
    # RAW is reached only from SWITCHING, by SWITCHED (a 101), and never left but by closing.
    assert [(p, e) for (p, e), to in TRANSITIONS.items() if to is Phase.RAW] == [(Phase.SWITCHING, Event.SWITCHED)]
    assert {e for (p, e) in TRANSITIONS if p is Phase.RAW} == {Event.CLOSE, Event.LOST}
    # A request is decided before anything of it goes on.
    assert [(p, e) for (p, e), to in TRANSITIONS.items() if to is Phase.FORWARDING] == [(Phase.CHECKING, Event.FORWARDED)]


def test_a_move_the_table_lacks_is_refused() -> None:
    front = Front()
    with pytest.raises(AssertionError):
        front.machine._move(Event.SWITCHED)
    assert front.phase is Phase.HEAD


def test_the_protocol_is_the_machines_io() -> None:
    front = Front()
    verifyObject(IFrontIO, front.protocol)
    verifyObject(IFrontRules, front.rules)


# -- forwarding, keep-alive, pipelining -------------------------------------------------------------------


def test_each_request_is_forwarded_with_its_headers_set_again() -> None:
    front = Front()
    front.send(get("/one", "X-Secret: forged") + get("/two", "X-Secret: forged", "X-Who: forged"))
    sent = heads(front.sent())
    assert [t for t, _ in sent] == [b"/one", b"/two"]
    for _, headers in sent:
        assert b"x-secret" not in headers
    assert sent[1][1][b"x-who"] == [b"forged", b"front"]  # the rules' own line comes last, after the client's
    front.answer(ok(b"1") + ok(b"2"))
    assert front.got() == ok(b"1") + ok(b"2")
    assert front.phase is Phase.HEAD
    assert front.metrics.requests == 2


def test_a_chunked_body_is_reframed_as_parsed() -> None:
    front = Front()
    front.send(
        b"POST /up HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=x\r\nhello\r\n0\r\nTrailer: t\r\n\r\n"
    )
    head, _, body = front.sent().partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"5\r\nhello\r\n0\r\n\r\n"


def test_a_length_body_is_passed_as_is_and_the_next_request_after_it() -> None:
    front = Front()
    front.send(b"POST /up HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\nhel")
    front.send(b"lo" + get("/next"))
    sent = front.sent()
    assert b"\r\n\r\nhello" in sent
    assert [t for t, _ in heads(sent)] == [b"/up", b"/next"]


# -- the switch to a raw pipe -----------------------------------------------------------------------


def test_an_upgrade_answered_200_leaves_the_connection_http() -> None:
    front = Front()
    front.send(get("/ws", "Upgrade: foo", "Connection: upgrade") + get("/next", "X-Secret: forged"))
    # Only the first request went on; the rest waits, and the client is not read meanwhile.
    assert [t for t, _ in heads(front.sent())] == [b"/ws"]
    assert front.phase is Phase.SWITCHING
    assert front.client.producerState == "paused"
    front.answer(ok(b"no switch"))
    # Not switched: what followed is read as a request, and its headers are set again.
    sent = heads(front.sent())
    assert [t for t, _ in sent] == [b"/next"]
    assert b"x-secret" not in sent[0][1] and sent[0][1][b"x-who"] == [b"front"]
    assert front.phase is Phase.HEAD
    assert front.client.producerState == "producing"
    # And it stays so for every later request.
    front.answer(ok())
    front.send(get("/third", "X-Secret: forged"))
    assert b"X-Secret" not in front.sent()


def test_a_101_to_a_request_that_asked_makes_a_raw_pipe() -> None:
    front = Front()
    front.send(get("/ws", "Upgrade: foo", "Connection: upgrade") + b"early bytes")
    front.sent()
    front.answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\nhello")
    assert front.phase is Phase.RAW
    assert front.got().endswith(b"\r\n\r\nhello")
    # What the client sent after its head goes on untouched, then everything, unparsed.
    assert front.sent() == b"early bytes"
    front.send(b"GET / HTTP/1.1\r\nX-Secret: x\r\n\r\n")
    assert front.sent() == b"GET / HTTP/1.1\r\nX-Secret: x\r\n\r\n"
    # No deadline runs on a raw pipe, and nothing of the HTTP machine is kept.
    assert front.clock.getDelayedCalls() == []
    assert front.machine._parser is None and front.machine._responses is None


def test_a_101_to_a_request_that_did_not_ask_closes_the_connection() -> None:
    front = Front()
    front.send(get("/plain", "Upgrade: foo"))  # no Connection: upgrade, so it does not ask
    front.answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\n")
    assert front.phase is Phase.CLOSED
    assert front.client.disconnecting and front.upstream.disconnecting
    assert front.metrics.errors == {"bad_response": 1}


def test_an_upgrade_request_with_a_body_is_refused() -> None:
    front = Front()
    front.send(b"POST /ws HTTP/1.1\r\nHost: a.example\r\nUpgrade: foo\r\nConnection: upgrade\r\nContent-Length: 3\r\n\r\nabc")
    assert front.got().startswith(b"HTTP/1.1 400 ")
    assert front.rules.upstreams == []
    assert front.client.disconnecting


def test_connect_is_refused() -> None:
    front = Front()
    front.send(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert front.got().startswith(b"HTTP/1.1 405 ")
    assert front.client.disconnecting


# -- the answers' order ------------------------------------------------------------------------------------


def test_an_own_answer_waits_for_the_responses_before_it() -> None:
    front = Front()
    front.send(get("/one") + get("/own") + get("/three"))
    # /three is not sent before our answer to /own is written: its response cannot overtake it.
    assert [t for t, _ in heads(front.sent())] == [b"/one"]
    assert front.phase is Phase.AWAITING
    front.answer(ok(b"1"))
    assert front.got() == ok(b"1") + OWN
    assert [t for t, _ in heads(front.sent())] == [b"/three"]
    front.answer(ok(b"3"))
    assert front.got() == ok(b"3")


def test_a_refusal_comes_after_the_responses_before_it_then_the_connection_closes() -> None:
    front = Front()
    front.send(get("/one") + get("/refuse") + get("/never"))
    assert [t for t, _ in heads(front.sent())] == [b"/one"]
    assert front.got() == b""
    front.answer(ok(b"1"))
    answer = front.got()
    assert answer.startswith(ok(b"1") + b"HTTP/1.1 403 Forbidden\r\n")
    assert front.client.disconnecting
    assert front.sent() == b""
    assert front.metrics.errors == {"forbidden": 1}


def test_a_head_request_is_answered_before_the_next_goes() -> None:
    front = Front()
    front.send(get("/one").replace(b"GET", b"HEAD") + get("/two") + get("/ws", "Upgrade: foo", "Connection: upgrade"))
    assert [t for t, _ in heads(front.sent())] == [b"/one"]
    # The answer to HEAD names a length but has no body: the next response starts right after its head.
    front.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert [t for t, _ in heads(front.sent())] == [b"/two", b"/ws"]
    front.answer(ok(b"2"))
    # So the 101 after it is seen for what it is.
    front.answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\n")
    assert front.phase is Phase.RAW


def test_interim_responses_do_not_end_a_request() -> None:
    front = Front()
    front.send(get("/one") + get("/own"))
    front.answer(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert front.phase is Phase.AWAITING
    front.answer(ok(b"1"))
    assert front.got() == b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"1") + OWN


def test_a_response_the_front_cannot_parse_ends_the_connection_after_it() -> None:
    front = Front()
    front.send(get("/one"))
    front.answer(b"HTTP/1.1 200 OK\nbroken\n\n")
    assert front.got() == b"HTTP/1.1 200 OK\nbroken\n\n"
    assert front.phase is Phase.CLOSED and front.client.disconnecting


# -- deciding ----------------------------------------------------------------------------------------------------


def test_a_check_that_takes_its_time_holds_what_came_after() -> None:
    front = Front()
    front.send(get("/later") + get("/two"))
    assert front.phase is Phase.CHECKING
    assert front.client.producerState == "paused"
    assert front.rules.upstreams == []
    d, head = front.rules.waiting.pop()
    d.callback(forwarded(head))
    assert [t for t, _ in heads(front.sent())] == [b"/later", b"/two"]
    assert front.client.producerState == "producing"


def test_a_check_that_fails_is_a_500_and_logged(failOnLoggedErrors: list[Any]) -> None:
    front = Front()
    front.send(get("/later"))
    d, _ = front.rules.waiting.pop()
    d.errback(RuntimeError("boom"))
    assert front.got().startswith(b"HTTP/1.1 500 ")
    assert front.client.disconnecting
    assert len(failOnLoggedErrors) == 1
    failOnLoggedErrors.clear()


# -- producers ---------------------------------------------------------------------------------------------------


def test_a_slow_upstream_and_a_held_check_both_pause_the_client() -> None:
    front = Front()
    front.send(get("/one"))
    assert front.upstream.producer is front.protocol
    assert front.client.producer is front.protocol.upstream
    front.protocol.pauseProducing()  # the upstream's buffer is full
    assert front.client.producerState == "paused"
    front.answer(ok())
    front.send(get("/later"))  # and a check is under way
    front.protocol.resumeProducing()  # the upstream drained, but the check holds
    assert front.client.producerState == "paused"
    d, head = front.rules.waiting.pop()
    d.callback(forwarded(head))
    assert front.client.producerState == "producing"


def test_a_slow_client_pauses_the_upstream() -> None:
    front = Front()
    front.send(get("/one"))
    front.protocol.upstream.pauseProducing()  # as the client transport does when its buffer is full
    assert front.upstream.producerState == "paused"
    front.protocol.upstream.resumeProducing()
    assert front.upstream.producerState == "producing"


# -- deadlines ----------------------------------------------------------------------------------------------------


def test_a_head_has_a_total_deadline_not_reset_by_each_byte() -> None:
    front = Front()
    for byte in get("/slow", "X-Long: " + "a" * 100)[:-3]:
        front.send(bytes([byte]))
        front.clock.advance(0.25)
        if front.phase is not Phase.HEAD:
            break
    # 10 s after the connection began, with a byte still coming every 0.25 s.
    assert 10 <= front.clock.seconds() <= 10.25
    assert front.got().startswith(b"HTTP/1.1 408 ")
    assert front.client.disconnecting
    assert front.metrics.errors == {"head_timeout": 1}


def test_the_next_heads_deadline_starts_at_its_first_byte() -> None:
    front = Front()
    front.send(get("/one"))
    front.answer(ok())
    assert front.got() == ok()
    front.clock.advance(30)
    front.send(b"GET /two HTTP/1.1\r\n")
    front.clock.advance(9.9)
    assert front.phase is Phase.HEAD
    front.clock.advance(0.2)
    assert front.got().startswith(b"HTTP/1.1 408 ")


def test_an_idle_connection_is_closed_but_not_while_a_check_is_under_way() -> None:
    front = Front()
    front.send(get("/one"))
    front.answer(ok())
    front.clock.advance(59)
    front.send(get("/later"))
    front.clock.advance(200)
    assert front.phase is Phase.CHECKING
    d, head = front.rules.waiting.pop()
    d.callback(forwarded(head))
    front.answer(ok())
    front.clock.advance(60)
    assert front.phase is Phase.CLOSED and front.client.disconnecting
    assert front.metrics.errors == {"idle_timeout": 1}


def test_a_head_larger_than_the_limit_is_431() -> None:
    front = Front(FrontLimits(maxHeadBytes=1000))
    front.send(get("/big", "X-Big: " + "a" * 2000))
    assert front.got().startswith(b"HTTP/1.1 431 ")
    assert front.metrics.errors == {"head_too_large": 1}


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
    ],
    ids=["no-host", "two-hosts", "obs-fold", "cl-and-te", "two-lengths", "bare-lf"],
)
def test_malformed_heads_are_400(head: bytes) -> None:
    front = Front()
    front.send(head)
    assert front.got().startswith(b"HTTP/1.1 400 ")
    assert front.rules.upstreams == []


# -- the end --------------------------------------------------------------------------------------------------------


def test_the_clients_eof_reaches_the_upstream_after_its_request() -> None:
    front = Front()
    front.send(get("/one"))
    front.protocol.readConnectionLost()
    assert front.upstream.writeClosed
    assert front.phase is Phase.CLOSING
    front.answer(ok())
    assert front.got() == ok()
    assert front.client.disconnecting


def test_eof_in_a_head_closes_without_a_word() -> None:
    front = Front()
    front.send(b"GET / HTTP/1.1\r\nHost: a")
    front.protocol.readConnectionLost()
    assert front.got() == b""
    assert front.client.disconnecting


def test_an_upstream_gone_before_answering_is_a_502() -> None:
    front = Front()
    front.send(get("/one"))
    front.protocol.upstream.connectionLost(Failure(ConnectionError("gone")))
    assert front.got().startswith(b"HTTP/1.1 502 ")
    assert front.metrics.errors == {"bad_gateway": 1}


def test_a_client_gone_after_its_eof_cuts_the_upstream() -> None:
    front = Front()
    front.send(get("/stream"))
    front.protocol.readConnectionLost()
    upstream = front.upstream
    front.protocol.connectionLost(Failure(ConnectionError("reset")))
    assert upstream.disconnecting
    assert front.metrics.open == 0
    assert front.rules.endedCount == 1
