"""
The portal's HTTP channel (dit4c.portal.http) on a real loopback port, as
``PortalService`` serves it: malformed heads refused, every route's body
limit applied before the body is read, and the long-lived connections (the
scheduler channel's WebSocket, the pages' event stream) kept past every
deadline of the channel. The channel's own rules, byte by byte on a test
clock, are tests/common/test_httpsite.py; the attacks on a real ``twistd
dit4c-portal`` (2 GB bodies, slow clients, generated heads) are
tests/security/.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
from portal_client import Browser, csrfOf, logIn, startService
from support.passwords import cheapHash
from support.sockets import RawClient, rawRequest
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from dit4c.common.httpfront import FrontLimits
from dit4c.common.httpsite import SiteLimits
from dit4c.portal import api, oauth, reports
from dit4c.portal.http import BODY_LIMITS, FORM_BODY, bodyLimit
from dit4c.portal.service import PortalService
from dit4c.testing.scheduler import TestingScheduler, registerScheduler

ISSUER = "http://portal.localhost"

#: Deadlines short enough that a test outlives each of them many times over.
SHORT = SiteLimits(front=FrontLimits(headTimeout=0.3, idleTimeout=0.3), bodyTimeout=0.3, lingerTime=0.3)


async def startPortal(tmp_path: Path, limits: SiteLimits | None = None) -> tuple[PortalService, Any, int]:
    service = await startService(tmp_path, ISSUER, limits=limits)
    portal = service.portal
    await portal.store.createUser("alice", password_hash=cheapHash("correct horse battery"))
    return service, portal, service.ports[0].port.getHost().port


@pytest_twisted.async_yield_fixture
async def portalPort(tmp_path: Path) -> AsyncIterator[int]:
    service, _, port = await startPortal(tmp_path)
    yield port
    await service.stopService()


def status(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert match, answer[:200]
    return int(match.group(1))


HOST = b"Host: portal.localhost\r\n"


async def idleClosed(port: int) -> None:
    """
    A request on a new kept-alive connection, answered, then the
    connection closed by the portal once idle: every deadline of the
    channel (all as long as the idle one in ``SHORT``) set before it has
    come due by then.
    """
    answer = await Deferred.fromCoroutine(rawRequest(port, b"GET /health HTTP/1.1\r\n" + HOST + b"\r\n")).addTimeout(10, reactor)
    assert status(answer) == 200 and answer.count(b"HTTP/1.1") == 1


@pytest.mark.parametrize(
    "head",
    [
        b"GET /health HTTP/1.1\r\n" + HOST + b"X-Folded: a\r\n b\r\n\r\n",
        b"GET /health HTTP/1.1\r\n" + HOST + b"Host: other.example\r\n\r\n",
        b"GET /health HTTP/1.1\r\n\r\n",
    ],
    ids=["obs-fold", "two-hosts", "no-host"],
)
@pytest_twisted.ensureDeferred
async def test_malformed_heads_are_refused(portalPort: int, head: bytes) -> None:
    answer = await rawRequest(portalPort, head)
    assert status(answer) == 400
    assert answer.count(b"HTTP/1.1") == 1 and b'{"status": "ok"}' not in answer
    # The same request, well formed, is answered.
    good = await rawRequest(portalPort, b"GET /health HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
    assert status(good) == 200


ROUTES = [(prefix.decode() + ("x" if prefix.endswith(b"/") else ""), limit) for prefix, limit in BODY_LIMITS] + [
    ("/login", FORM_BODY),
    ("/instances/abc/stop", FORM_BODY),
]


@pytest.mark.parametrize("path, limit", ROUTES)
@pytest_twisted.ensureDeferred
async def test_each_route_refuses_a_body_over_its_limit_before_reading_it(portalPort: int, path: str, limit: int) -> None:
    head = f"POST {path} HTTP/1.1\r\n".encode() + HOST + b"Connection: close\r\nContent-Length: %d\r\n\r\n"
    # One byte over: refused at once, without the body ever being sent.
    answer = await rawRequest(portalPort, head % (limit + 1))
    assert status(answer) == 413 and b"limited to %d bytes" % limit in answer
    # At the limit: the body is read and the route answers (whatever it thinks of it).
    answer = await rawRequest(portalPort, head % limit + b"x" * limit)
    assert status(answer) != 413


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_is_cut_at_the_routes_limit(portalPort: int) -> None:
    chunk = b"a" * 4096
    body = b"".join(b"1000\r\n" + chunk + b"\r\n" for _ in range(oauth.MAX_TOKEN_REQUEST // 4096 + 1)) + b"0\r\n\r\n"
    answer = await rawRequest(portalPort, b"POST /oauth/token HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert status(answer) == 413
    # Within it, the token endpoint reads the form and answers for itself.
    answer = await rawRequest(
        portalPort,
        b"POST /oauth/token HTTP/1.1\r\n" + HOST + b"Connection: close\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n5\r\na=b&c\r\n0\r\n\r\n",
    )
    assert status(answer) == 400 and b"invalid_request" in answer


def test_every_route_has_the_limit_of_what_it_reads() -> None:
    """Each Klein route of the portal, under the path it is mounted at, gets the limit its handler reads up to."""
    from dit4c.portal.admin import AdminPages
    from dit4c.portal.api import API
    from dit4c.portal.app import Portal
    from dit4c.portal.oauth import OAuthServer
    from dit4c.portal.reports import Reports
    from dit4c.portal.upstream import UpstreamLogin

    mounts: list[tuple[str, Any, int | None]] = [
        ("", Portal.app, None),
        ("/api/v1", API.app, api.MAX_BODY),
        ("/admin", AdminPages.app, 64 * 1024),
        ("/oauth", OAuthServer.app, None),
        ("/reports", Reports.app, reports.MAX_BODY),
        ("/login", UpstreamLogin.app, FORM_BODY),
    ]
    seen = 0
    for mount, app, expected in mounts:
        for rule in app.url_map.iter_rules():
            path = mount + re.sub(r"<[^>]+>", "x", rule.rule)
            if not mount and any(path.startswith(m + "/") for m, _, _ in mounts if m):
                continue  # the branch a mounted app's routes come through
            limit = bodyLimit(b"POST", path.encode())
            seen += 1
            if path == "/oauth/token":
                assert limit == oauth.MAX_TOKEN_REQUEST
            elif path in ("/events", "/.dit4c/channel"):
                assert limit == 0  # no body: a stream, a WebSocket upgrade
            elif expected is not None:
                assert limit == expected, path
            else:
                assert 0 < limit <= FORM_BODY, path
    assert seen > 50  # every route was looked at


@pytest_twisted.ensureDeferred
async def test_the_websocket_and_the_event_stream_outlive_every_deadline(tmp_path: Path) -> None:
    service, portal, port = await startPortal(tmp_path, SHORT)
    sim = TestingScheduler(reactor)
    stream = RawClient()
    try:
        image = await portal.store.createImage("Notebook", "notebook:1", port=8888)
        scheduler, key = await registerScheduler(portal.store, "cluster")
        client = sim.connect(f"ws://127.0.0.1:{port}/.dit4c/channel", scheduler.id, key, issuer=ISSUER)
        await client.whenConnected().addTimeout(10, reactor)
        alice = Browser(portal)
        await logIn(alice)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), stream)
        cookie = alice._headers()["Cookie"]
        stream.transport.write(f"GET /events HTTP/1.1\r\nHost: portal.localhost\r\nCookie: {cookie}\r\n\r\n".encode())
        await eventually(lambda: b"watching" in stream.received, what=lambda: repr(bytes(stream.received)))

        # Many times every deadline of the channel later, both still work.
        for _ in range(5):
            await idleClosed(port)
        assert not stream.done.called and service.channels is not None and service.channels.connected(scheduler.id)
        _, page = await alice.get("/")
        await alice.post("/instances", {"csrf": csrfOf(page), "image": image.id})
        await eventually(lambda: any(c.op == "start" for c in sim.handled), what=lambda: repr(sim.handled))
        await eventually(lambda: b"event: instance" in stream.received, what=lambda: repr(bytes(stream.received)))
    finally:
        if stream.transport is not None:
            stream.transport.loseConnection()
        await sim.stop()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_kept_alive_connection_is_closed_when_idle(tmp_path: Path) -> None:
    service, _, port = await startPortal(tmp_path, SHORT)
    try:
        # No Connection: close: the portal closes the connection once it is idle.
        await idleClosed(port)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_secrets_in_targets_never_reach_the_log(tmp_path: Path) -> None:
    """
    A share link followed the way a browser follows it (sent to log in,
    back to the link, redeemed), and an upstream login's callback: every
    request is in the access log, and no token, code or state is.
    """
    import treq
    from twisted.logger import formatEvent, globalLogPublisher

    messages: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        messages.append(formatEvent(event))

    observer: Any = observe
    service, portal, port = await startPortal(tmp_path)
    globalLogPublisher.addObserver(observer)
    try:
        store = portal.store
        await store.createUser("bob", password_hash=cheapHash("bobs password!"))
        alice = await store.userByName("alice")
        image = await store.createImage("Notebook", "notebook:1", port=8888)
        scheduler, _ = await registerScheduler(store, "cluster")
        instance = await store.createInstance(alice.id, image.id, scheduler_id=scheduler.id)
        owner = Browser(portal)
        await logIn(owner)
        _, home = await owner.get("/")
        _, page = await owner.post(f"/instances/{instance.id}/link", {"csrf": csrfOf(home)})
        match = re.search(r"/share/([A-Za-z0-9_-]{16,})", page)
        assert match, page
        token = match.group(1)

        bob = Browser(portal)
        response, _ = await bob.get(f"/share/{token}")
        assert response.code == 303
        [location] = response.headers.getRawHeaders("location")
        assert token in location  # to the login page, and back to the link after it
        _, form = await bob.get(location)
        response = await treq.post(
            portal.testURL + "/login",
            data={"csrf": csrfOf(form), "username": "bob", "password": "bobs password!", "next": f"/share/{token}"},
            headers={**bob._headers(), "Referer": portal.testURL + location},  # type: ignore[arg-type]
            allow_redirects=False,
        )
        bob._keep(response)
        assert response.headers.getRawHeaders("location") == [f"/share/{token}"]
        response, _ = await bob.get(f"/share/{token}")
        assert response.code == 303
        assert [i.id for i in await store.listInstancesSharedWith((await store.userByName("bob")).id)] == [instance.id]

        code, state = "c0de-" + token[:10], "st4te-" + token[:10]
        response = await treq.get(f"{portal.testURL}/login/github/callback?code={code}&state={state}")
        await response.content()
        # The access log's line is written as the answer ends: the last of the test's requests.
        await eventually(lambda: any("/login/github/callback?code=" in m for m in messages), what="the callback logged")
    finally:
        globalLogPublisher.removeObserver(observer)
        await service.stopService()
    access = [m for m in messages if '"GET /' in m or '"POST /' in m]
    assert sum('"GET /share/[redacted] HTTP/1.1" 303' in m for m in access) == 2
    assert any('"GET /login?next=[redacted] HTTP/1.1" 200' in m for m in access)
    assert any('"POST /login HTTP/1.1" 303' in m and "/login?next=[redacted]" in m for m in access)
    assert any("/login/github/callback?code=[redacted]&state=[redacted]" in m for m in access)
    for secret in (token, code, state):
        assert not [m for m in messages if secret in m]


@pytest.mark.allow_logged_errors
@pytest_twisted.ensureDeferred
async def test_a_failing_route_logs_its_target_without_secrets(portal: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug while following a share link, or in the OAuth server, is logged with the target, redacted."""
    from twisted.logger import formatEvent, globalLogPublisher

    async def broken(*args: Any) -> Any:
        raise RuntimeError("the store broke")

    messages: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        messages.append(formatEvent(event))

    observer: Any = observe
    alice = Browser(portal)
    await logIn(alice)
    monkeypatch.setattr(portal.store, "redeemShareLink", broken)
    monkeypatch.setattr(portal.oauth, "_checkClient", broken)
    globalLogPublisher.addObserver(observer)
    try:
        response, _ = await alice.get("/share/s3cr3t-t0ken")
        assert response.code == 500
        response, _ = await alice.get("/oauth/authorize?client_id=x&state=s3cr3t-st4te&code_challenge=c")
        assert response.code == 500
    finally:
        globalLogPublisher.removeObserver(observer)
    failures = [m for m in messages if "request failed" in m]
    assert any("portal request failed: /share/[redacted]" in m for m in failures), failures
    assert any("OAuth request failed: /oauth/authorize?client_id=x&state=[redacted]" in m for m in failures), failures
    assert not [m for m in messages if "s3cr3t" in m]


@pytest_twisted.ensureDeferred
async def test_a_request_that_comes_as_the_portal_stops_is_answered_503_and_logs_no_error(portal: Any) -> None:
    """
    A page's event stream (or any request) that arrives while the portal
    stops finds its store closed: it is told to come back (503), and it is
    no error of the portal's (the test fails if one is logged).
    """
    alice = Browser(portal)
    await logIn(alice)
    await portal.store.close()
    for path in ("/events", "/", "/oauth/authorize?client_id=i-1&redirect_uri=https%3A%2F%2Fi-1.example%2Fcb"):
        response, _ = await alice.get(path)
        assert response.code == 503, path
    # A helper's report, read as the portal stops: the helper reports again.
    # Its instance is looked up (in the closed store) before its signature is checked.
    token = jwt.encode({"sub": "i-0123456789abcdef"}, "k" * 32, algorithm="HS256")
    response = await alice.http.post(
        alice.base + "/reports/url", token.encode(), headers={"content-type": ["application/jwt"]}
    )
    assert response.code == 503
