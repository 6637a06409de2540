"""
Helpers for the auth helper's tests: the world they run in (a real portal,
people, an instance, the tool, the auth helper in this process), and a
cookie-keeping client that follows no redirect by itself.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from support.backend import Backend, backendSite
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString, serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site

from dit4c.auth.service import AuthService
from dit4c.common.httpfront import FrontLimits
from dit4c.portal.app import Portal

PASSWORDS = {"alice": "correct horse battery", "bob": "bobs password!", "carol": "carols password!"}


@dataclass
class World:
    portal: Portal
    portalURL: str
    store: Any
    users: dict[str, Any]
    instance: Any
    keyFile: Path
    tool: Backend
    #: Request targets the tool has seen, in order.
    toolSaw: list[bytes]
    auth: AuthService | None = None
    authPort: int = 0
    services: list[Any] = field(default_factory=list)
    #: What the world listens on (the tool, the portal), closed by :func:`closeWorld`.
    ports: list[Any] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"{self.instance.id}.localhost:{self.authPort}"

    @property
    def instanceURL(self) -> str:
        return f"http://{self.host}/"

    async def startAuth(
        self,
        *,
        port: int = 0,
        tool: str | None = None,
        portalInternal: str | None = None,
        recheck: float = 30.0,
        unwatchedRecheck: float = 5.0,
        timeout: float = 5.0,
        limits: FrontLimits | None = None,
    ) -> AuthService:
        service = AuthService(
            reactor,
            instance=self.instance.id,
            keyFile=str(self.keyFile),
            portal=self.portalURL,
            portalInternal=portalInternal or self.portalURL,
            listen=serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1"),
            tool=clientFromString(reactor, tool or self.tool.endpoint),  # type: ignore[arg-type]
            recheck=recheck,
            unwatchedRecheck=unwatchedRecheck,
            timeout=timeout,
            limits=limits,
        )
        service.startService()
        self.services.append(service)
        self.auth = service
        self.authPort = service.port.getHost().port
        # The URL the instance's listener would report to the portal.
        self.instance = await self.store.updateInstance(self.instance.id, url=self.instanceURL)
        return service

    async def stopAuth(self) -> None:
        if self.auth is not None:
            await defer.maybeDeferred(self.auth.stopService)
            self.services.remove(self.auth)
            self.auth = None


async def makeWorld(tmp_path: Path) -> World:
    """A real portal (SQLite store, its own keys, on loopback), alice, bob and carol, and an instance of alice's."""
    from support.passwords import cheapHash

    from dit4c.common.keys import generatePrivateKey, publicJWK, savePrivateKey
    from dit4c.common.life import State
    from dit4c.portal.app import PortalConfig
    from dit4c.portal.keys import KeyRing
    from dit4c.portal.store import openStore

    # The portal learns its public URL only once it listens.
    site = Site(Resource())
    site.noisy = False
    portalPort = reactor.listenTCP(0, site, interface="127.0.0.1")
    portalURL = f"http://127.0.0.1:{portalPort.getHost().port}"
    store = await openStore(f"sqlite:///{tmp_path / 'portal.db'}", reactor, clock=reactor)
    keys = KeyRing(tmp_path / "keys", issuer=portalURL, clock=reactor)
    portal = Portal(store, keys, PortalConfig(publicURL=portalURL, loginLimit=100), reactor)
    site.resource = portal.app.resource()
    users = {}
    for name, password in PASSWORDS.items():
        users[name] = await store.createUser(name, password_hash=cheapHash(password))
    image = await store.createImage("Tool", "tool:latest", owner_id=None, port=8888)
    instance = await store.createInstance(users["alice"].id, image.id)
    keyFile = tmp_path / "instance.pem"
    key = generatePrivateKey()
    savePrivateKey(key, keyFile)
    # The instance's public key, as its node sends it up (the helper signs its watch with it).
    instance = await store.updateInstance(instance.id, state=State.RUNNING, public_jwk=json.dumps(publicJWK(key)))
    seen: list[bytes] = []
    toolPort = reactor.listenTCP(0, countingSite(seen), interface="127.0.0.1")
    w = World(portal, portalURL, store, users, instance, keyFile, Backend(toolPort, backendSite()), seen)
    w.ports = [toolPort, portalPort]
    return w


async def closeWorld(w: World) -> None:
    for service in list(w.services):
        await defer.maybeDeferred(service.stopService)
    for port in w.ports:
        await defer.maybeDeferred(port.stopListening)
    await w.store.close()


def countingSite(seen: list[bytes]) -> Site:
    site = backendSite()
    original = site.getResourceFor

    def getResourceFor(request: Any) -> Resource:
        seen.append(request.uri)
        return original(request)  # type: ignore[no-any-return]

    site.getResourceFor = getResourceFor  # type: ignore[method-assign]
    return site


# -- a browser, by hand ------------------------------------------------------------------------


HTML = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


class Browser:
    """
    Keeps cookies per host as a browser does and never follows a redirect
    by itself. Instance URLs (``<id>.localhost:PORT``) go to 127.0.0.1 with
    that Host header, as the routing server would pass them on.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.jars: dict[str, dict[str, str]] = {}
        self.setCookies: list[str] = []

    def _target(self, url: str) -> tuple[str, str]:
        parts = urlsplit(url)
        host = parts.netloc
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        if host.split(":")[0].endswith(".localhost"):
            port = host.rsplit(":", 1)[1]
            return host, f"http://127.0.0.1:{port}{path}"
        return host, url

    async def request(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, accept: str = HTML, **kw: Any
    ) -> Any:
        host, real = self._target(url)
        jar = self.jars.setdefault(host, {})
        sent = {"Host": host, "Accept": accept, **(headers or {})}
        if jar:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())
        response = await treq.request(method, real, headers=sent, allow_redirects=False, **kw)
        for raw in response.headers.getRawHeaders("set-cookie", []):
            self.setCookies.append(raw)
            name, _, rest = raw.partition("=")
            if "Max-Age=0" in raw:
                jar.pop(name, None)
            else:
                jar[name] = rest.split(";", 1)[0]
        return response

    async def get(self, url: str, **kw: Any) -> Any:
        return await self.request("GET", url, **kw)

    def instanceCookies(self) -> dict[str, str]:
        return self.jars.setdefault(self.world.host, {})

    async def logInAtPortal(self, name: str) -> None:
        response = await self.get(self.world.portalURL + "/login")
        page = await response.text()
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf, page
        response = await self.request(
            "POST",
            self.world.portalURL + "/login",
            data={"csrf": csrf.group(1), "username": name, "password": PASSWORDS[name], "next": "/"},
        )
        assert response.code == 303, await response.text()


def location(response: Any) -> str:
    values = response.headers.getRawHeaders("location")
    assert values, f"no Location in a {response.code}"
    return str(values[0])


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def startLogin(browser: Browser, path: str = "/") -> str:
    """Open ``path`` on the instance; return the portal's authorize URL it redirects to."""
    response = await browser.get(browser.world.instanceURL.rstrip("/") + path)
    assert response.code == 303, (response.code, await response.text())
    return location(response)


async def logIn(browser: Browser, name: str, path: str = "/") -> Any:
    """
    The whole dance for ``name``: instance → portal authorize → (login form)
    → authorize → instance callback → back to ``path``. Returns the
    callback's response.
    """
    authorize = await startLogin(browser, path)
    assert authorize.startswith(browser.world.portalURL + "/oauth/authorize?")
    response = await browser.get(authorize)
    if response.code == 303 and "/login" in location(response):
        await browser.logInAtPortal(name)
        response = await browser.get(authorize)
    assert response.code == 303, await response.text()
    callback = location(response)
    assert callback.startswith(browser.world.instanceURL + ".dit4c/callback?")
    return await browser.get(callback)


def loggedInURL(url: str, **params: str) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(params)


# -- a Jupyter kernel, over its WebSocket through the auth helper ------------------------------------


class _Kernel(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # Refused (the upgrade answered with an error) or cut before it opened: said at once, with why.
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"the kernel's channels did not open: {code} {reason}"))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            return
        message = json.loads(payload)
        if message.get("msg_type") == "execute_result" and not self.factory.result.called:
            self.factory.result.callback(message["content"]["data"]["text/plain"])


async def startKernel(browser: Browser) -> str:
    """Start a Jupyter kernel through the auth helper, as ``browser``'s person; its id."""
    response = await browser.request(
        "POST", browser.world.instanceURL + "api/kernels", data=b"{}", accept="application/json",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert response.code == 201, await response.text()
    return str((await response.json())["id"])


async def execute(browser: Browser, kernel: str, code: str, timeout: float = 60) -> str:
    """Run ``code`` in a Jupyter kernel over its WebSocket, as ``browser``'s person; its result as text."""
    world = browser.world
    session = uuid.uuid4().hex
    cookie = "; ".join(f"{k}={v}" for k, v in browser.instanceCookies().items())
    factory = WebSocketClientFactory(
        f"ws://{world.host}/api/kernels/{kernel}/channels?session_id={session}", headers={"Cookie": cookie}
    )
    factory.protocol = _Kernel
    # The server answers the upgrade once the kernel answers it, which a tool held to half a CPU
    # on a busy machine takes more than autobahn's 5 s to do: the execution's deadline instead.
    factory.setProtocolOptions(openHandshakeTimeout=timeout)
    factory.opened, factory.result = defer.Deferred(), defer.Deferred()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", world.authPort).connect(factory)
    began = reactor.seconds()
    client = await factory.opened.addTimeout(timeout, reactor)
    timeout -= reactor.seconds() - began
    request = {
        "header": {
            "msg_id": uuid.uuid4().hex, "username": "alice", "session": session,
            "msg_type": "execute_request", "version": "5.3", "date": "2026-01-01T00:00:00Z",
        },
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False},
    }  # fmt: skip
    client.sendMessage(json.dumps(request).encode())
    try:
        return str(await factory.result.addTimeout(timeout, reactor))
    finally:
        client.sendClose()
