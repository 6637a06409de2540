"""
Clients for the portal's tests: one that keeps cookies as a browser does
(with helpers to log in and read CSRF tokens), and one that carries a
personal API token; and the portal served on a loopback port.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import treq
from support.sockets import RawClient
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from dit4c.portal.app import Portal


class Browser:
    """
    An HTTP client that keeps cookies, as a browser would. ``source``: the
    loopback address it connects from (any of 127.0.0.0/8), so that a test
    can be several people, or several attackers, on real sockets.
    ``headers``: sent with every request.
    """

    def __init__(self, portal: Portal, source: str | None = None, headers: dict[str, str] | None = None) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent

        self.base = portal.testURL  # type: ignore[attr-defined]
        self.cookies: dict[str, str] = {}
        self.extra = dict(headers or {})
        self.http = HTTPClient(Agent(reactor, bindAddress=(source, 0) if source else None))

    def _headers(self) -> dict[str, str]:
        if not self.cookies:
            return dict(self.extra)
        return {**self.extra, "Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}

    def _keep(self, response: Any) -> list[str]:
        setCookies = response.headers.getRawHeaders("set-cookie", [])
        for raw in setCookies:
            name, _, rest = raw.partition("=")
            value = rest.split(";", 1)[0]
            if "Max-Age=0" in raw:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return setCookies  # type: ignore[no-any-return]

    async def get(self, path: str) -> tuple[Any, str]:
        response = await self.http.get(self.base + path, headers=self._headers(), allow_redirects=False)
        self._keep(response)
        return response, (await response.text())

    async def post(self, path: str, data: dict[str, str]) -> tuple[Any, str]:
        response = await self.http.post(self.base + path, data=data, headers=self._headers(), allow_redirects=False)
        self._keep(response)
        return response, (await response.text())


def csrfOf(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


async def submit(browser: Browser, path: str, **fields: str) -> None:
    """Post a form of the home page (with its CSRF token) to ``path``, as the page's button does; it must be taken (303)."""
    _, page = await browser.get("/")
    response, answer = await browser.post(path, {"csrf": csrfOf(page), **fields})
    assert response.code == 303, answer


async def logIn(browser: Browser, name: str = "alice", password: str = "correct horse battery") -> Any:
    _, page = await browser.get("/login")
    response, _ = await browser.post(
        "/login", {"csrf": csrfOf(page), "username": name, "password": password, "next": "/"}
    )
    return response


def serve(portal: Portal) -> Any:
    """The portal on a loopback port, behind its HTTP channel as ``twistd dit4c-portal`` serves it."""
    from dit4c.portal.http import portalSite

    port = reactor.listenTCP(0, portalSite(portal.app.resource(), reactor), interface="127.0.0.1")
    portal.testURL = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
    return port


async def startService(tmp_path: Path, publicURL: str, **options: Any) -> Any:
    """
    ``PortalService`` as ``twistd dit4c-portal`` builds it (``options``: its
    keyword arguments), with an SQLite store in ``tmp_path`` and its web port
    on loopback port 0; fires with the service once it serves, its portal's
    ``testURL`` set. Stop it with ``stopService()``.
    """
    from twisted.internet.endpoints import serverFromString

    from dit4c.portal.app import PortalConfig
    from dit4c.portal.service import PortalService

    service = PortalService(
        reactor,
        database=f"sqlite:///{tmp_path / 'portal.db'}",
        dataDir=tmp_path / "data",
        config=PortalConfig(publicURL=publicURL),
        endpoints=[serverFromString(reactor, "tcp:0:interface=127.0.0.1")],
        **options,
    )
    service.startService()
    portal = await service.ready
    portal.testURL = f"http://127.0.0.1:{service.ports[0].port.getHost().port}"  # type: ignore[union-attr,attr-defined]
    return service


class Client:
    """An API client with a personal token."""

    def __init__(self, portal: Portal, token: str | None) -> None:
        self.base = portal.testURL + "/api/v1"  # type: ignore[attr-defined]
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def call(self, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        response = await treq.request(
            method, self.base + path, data=data, headers={**self.headers, **headers}, allow_redirects=False
        )
        text = await response.text()
        return response.code, (json.loads(text) if text else None)


async def tokenFor(portal: Portal, name: str, password: str) -> str:
    browser = Browser(portal)
    await logIn(browser, name, password)
    _, home = await browser.get("/")
    response = await treq.post(
        portal.testURL + "/api/v1/tokens",  # type: ignore[attr-defined]
        data=json.dumps({"name": "laptop"}).encode(),
        headers={**browser._headers(), "X-CSRF-Token": csrfOf(home)},
    )
    assert response.code == 201
    return (await response.json())["token"]  # type: ignore[no-any-return]


class Held:
    """Calls to a coroutine function held until :meth:`release`, then made."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.waiting: list[Deferred[None]] = []
        self.made: list[Any] = []

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        waiter: Deferred[None] = Deferred()
        self.waiting.append(waiter)
        await waiter
        self.made.append(args)
        return await self.call(*args, **kwargs)

    def release(self) -> None:
        for waiter in self.waiting:
            if not waiter.called:
                waiter.callback(None)


async def postAndLeave(
    portal: Portal, browser: Browser, path: str, held: Held, lost: list[object], **fields: str
) -> None:
    """
    Post the home page's form to ``path`` and close the connection while
    ``held`` holds the action; let it go once the portal has noticed.
    """
    _, page = await browser.get("/")
    body = urlencode({"csrf": csrfOf(page), **fields}).encode()
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    client = RawClient()
    port = int(portal.testURL.rsplit(":", 1)[1])  # type: ignore[attr-defined]
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.transport.write(
        f"POST {path} HTTP/1.1\r\nHost: portal.test\r\nCookie: {cookie}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await eventually(lambda: held.waiting)
    client.transport.loseConnection()
    await eventually(lambda: lost)
    held.release()
