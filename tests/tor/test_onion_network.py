"""
DIT4C over Tor on a private Tor network on loopback (tests/support/tornet.py):
Twisted endpoint strings that txtorcon provides (``onion:`` to listen as an
onion service, ``tor:`` to dial through Tor), a listener tunnel to a routing
server that is reachable only as an onion service, and a listener that
publishes its instance as an onion service with no routing server at all.

One network for these tests and the node's (tests/tor/conftest.py); every
test publishes its own onion services.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import pytest_twisted
import treq
from support.backend import startBackend
from support.passwords import cheapHash
from support.routing import Signing
from support.tornet import TorNetwork, requireTor
from support.waiting import eventually
from twisted.internet import defer, reactor
from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.server import Site

from dit4c.auth.service import AuthService
from dit4c.common.keys import generatePrivateKey, publicJWK, savePrivateKey
from dit4c.listener import tap as listenerTap
from dit4c.listener.onion import ONION_KEY_FILE, OnionService
from dit4c.listener.service import ListenerService
from dit4c.portal.app import Portal, PortalConfig
from dit4c.portal.keys import KeyRing
from dit4c.portal.reportrules import isOnionV3
from dit4c.portal.store import openStore
from dit4c.routing.server import RoutingServer

requireTor("The tests over a private Tor network")

pytestmark = pytest.mark.slow

#: Seconds a first onion round trip may take: the descriptor reaches the
#: directories, the client fetches it and builds the circuits.
FIRST_TRIP = 120.0
#: The portal's public URL, as a browser reaches it (the auth helper sends browsers there to log in).
PORTAL = "http://portal.test"
#: A browser's navigation: the auth helper answers it with a redirect to log in (others get 401).
BROWSER = "Accept: text/html\r\n"


class _Exchange(Protocol):
    """Send a request, read until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(self.data)


async def httpGet(endpoint: str, host: str, path: str = "/", headers: str = "") -> bytes:
    """One HTTP/1.0 GET over the client endpoint string ``endpoint``; the whole answer."""
    request = f"GET {path} HTTP/1.0\r\nHost: {host}\r\n{headers}\r\n".encode()
    protocol = await connectProtocol(clientFromString(reactor, endpoint), _Exchange(request))
    return await protocol.done.addTimeout(60, reactor)


async def firstAnswer(endpoint: str, host: str, path: str = "/", headers: str = "") -> tuple[bytes, float]:
    """:func:`httpGet`, again until the onion service answers (its descriptor takes a while to reach the client)."""
    began = time.monotonic()
    failures: list[str] = []

    async def answer() -> bytes | None:
        try:
            return await httpGet(endpoint, host, path, headers) or None
        except Exception as e:  # not published yet, or not yet fetched
            failures[:] = [f"{type(e).__name__}: {e}"]
            return None

    response: bytes = await eventually(answer, FIRST_TRIP, 1.0, lambda: f"an answer from {host}: {failures}")
    return response, time.monotonic() - began


@pytest_twisted.ensureDeferred
async def test_an_onion_endpoint_string_is_reached_through_a_tor_endpoint_string(tornet: TorNetwork) -> None:
    """
    What every DIT4C server listens with (``serverFromString``) takes
    txtorcon's ``onion:`` string, given the control port of a running tor;
    what every DIT4C client dials with (``clientFromString``) takes
    ``tor:``, given a SOCKS port: a web server published so is reached
    through Tor, and only by its .onion name.
    """
    backend = startBackend(reactor)
    onion = serverFromString(reactor, f"onion:80:controlPort={tornet.controlPort}:version=3")
    port = await onion.listen(backend.site)
    try:
        host = port.getHost().onion_uri
        assert host.endswith(".onion") and len(host) == 56 + len(".onion"), host
        response, seconds = await firstAnswer(tornet.dial(host, 80), host, "/bytes?n=5")
        print(f"first onion round trip {seconds:.1f} s after the service was published")
        assert response.startswith(b"HTTP/1.0 200") or response.startswith(b"HTTP/1.1 200"), response[:200]
        began = time.monotonic()
        again = await httpGet(tornet.dial(host, 80), host, "/bytes?n=5")
        print(f"next onion round trip {time.monotonic() - began:.2f} s")
        assert b" 200 " in again.split(b"\r\n", 1)[0]
    finally:
        await defer.maybeDeferred(port.stopListening)
        await backend.stop()


@pytest_twisted.ensureDeferred
async def test_a_listener_tunnel_to_a_routing_server_reached_only_through_tor(
    tornet: TorNetwork, signing: Signing, backend: Any
) -> None:
    """
    A routing server whose tunnel port is an onion service
    (``--tunnel onion:9000:controlPort=...:version=3``) and a listener
    that dials it through Tor (``--routing tor:host=<name>.onion:port=9000:...``):
    the tunnel comes up, and a request to the instance's host name at the
    routing server's public port reaches the tool through it.
    """
    server = RoutingServer(reactor, signing.verifier(), "localhost", drainTimeout=2.0)
    tunnel = server.addTunnelEndpoint(serverFromString(reactor, f"onion:9000:controlPort={tornet.controlPort}:version=3"))
    public = server.addPublicEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), "http")
    server.startService()
    listener = None
    try:
        await eventually(lambda: tunnel.port is not None, 60, 0.2, "the routing server's onion service published")
        onion = tunnel.port.getHost().onion_uri  # type: ignore[union-attr]
        options = listenerTap.Options()
        options.parseOptions([
            "--routing", tornet.dial(onion, 9000), "--target", backend.endpoint,
            "--key-file", str(signing.keyPath), "--instance", "abc",
        ])  # fmt: skip
        listener = listenerTap.makeService(options, reactor)
        assert isinstance(listener, ListenerService)
        listener.startService()
        began = time.monotonic()
        welcome = await eventually(lambda: listener.welcome, FIRST_TRIP, 0.2, lambda: f"a tunnel through Tor: {listener.lastError}")
        print(f"listener registered through Tor in {time.monotonic() - began:.1f} s")
        assert welcome["host"] == "abc.localhost"
        port = public.port.getHost().port  # type: ignore[union-attr]
        response = await treq.get(f"http://127.0.0.1:{port}/bytes?n=5", headers={"Host": "abc.localhost"})
        assert response.code == 200
        assert len(await response.content()) == 5
    finally:
        if listener is not None:
            await defer.maybeDeferred(listener.stopService)
        await server.stopService()


async def logInForTheCallback(
    atPortal: Callable[..., Awaitable[tuple[int, str]]], portal: str, authorize: str, url: str, password: str
) -> str:
    """
    The portal takes the .onion callback as the instance's own and asks who
    this is; alice logs in at its form, and the authorize URL again sends
    her to the instance's callback at ``url``: that callback URL.
    """
    status, where = await atPortal("GET", authorize)
    assert status == 303 and "/login" in where, (status, where)
    status, page = await atPortal("GET", f"{portal}/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf, page
    data = {"csrf": csrf.group(1), "username": "alice", "password": password, "next": "/"}
    status, where = await atPortal("POST", f"{portal}/login", data=data)
    assert status == 303, where
    status, callback = await atPortal("GET", authorize)
    assert status == 303 and callback.startswith(f"{url}.dit4c/callback?"), (status, callback)
    return callback


def parsed(raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """An HTTP answer read off a connection: its status, headers (lower-case names) and body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [(name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines[1:])]
    return int(lines[0].split()[1]), headers, body


class Cookies:
    """One site's cookies, kept as a browser keeps them (enough for the login flow)."""

    def __init__(self) -> None:
        self.jar: dict[str, str] = {}

    def keep(self, headers: list[tuple[str, str]]) -> None:
        for name, value in headers:
            if name == "set-cookie":
                key, _, rest = value.partition("=")
                if "Max-Age=0" in value:
                    self.jar.pop(key, None)
                else:
                    self.jar[key] = rest.split(";", 1)[0]

    def header(self) -> dict[str, str]:
        return {"Cookie": "; ".join(f"{k}={v}" for k, v in self.jar.items())} if self.jar else {}

    def lines(self) -> str:
        """The same as header lines of a raw request."""
        return "".join(f"{name}: {value}\r\n" for name, value in self.header().items())


async def sentToLogIn(tornet: TorNetwork, host: str, path: str, portal: str, instance: str, url: str) -> tuple[str, Cookies]:
    """
    The first request through Tor to an instance's auth helper at ``host``:
    it sends the browser to log in at ``portal`` for that instance and its
    URL. The portal's authorize URL, and the cookies the .onion set.
    """
    raw, seconds = await firstAnswer(tornet.dial(host, 80), host, path, BROWSER)
    print(f"first request through Tor to the instance answered in {seconds:.1f} s")
    status, headers, _ = parsed(raw)
    onionCookies = Cookies()
    onionCookies.keep(headers)
    authorize = dict(headers).get("location", "")
    assert status in (302, 303) and authorize.startswith(f"{portal}/oauth/authorize?"), raw[:300]
    assert f"client_id={instance}" in authorize and quote(url, safe="") in authorize, authorize
    return authorize, onionCookies


@pytest_twisted.ensureDeferred
async def test_a_listener_publishes_its_instance_as_an_onion_service_with_no_routing_server(
    tornet: TorNetwork, backend: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A listener given only a tor's control port (``DIT4C_ONION``, no
    ``DIT4C_ROUTING``) publishes the instance's auth helper as an onion
    service and reports ``http://<name>.onion/`` to a portal that takes
    onion URLs. A browser through Tor is sent by the auth helper to log in
    at the portal, comes back to the .onion callback, and is let through to
    the tool. Started again (a resume), the listener keeps the same name:
    the key is in the pod's state directory.
    """
    store = await openStore(f"sqlite:///{tmp_path / 'portal.db'}", reactor)
    portal = Portal(store, KeyRing(tmp_path / "keys", issuer=PORTAL), PortalConfig(publicURL=PORTAL), reactor)
    portal.reports.onionURLs = True
    portalPort = reactor.listenTCP(0, Site(portal.app.resource()), interface="127.0.0.1")
    internal = f"http://127.0.0.1:{portalPort.getHost().port}"
    alice = await store.createUser("alice", password_hash=cheapHash("correct horse battery"))
    image = await store.createImage("Notes", "notes:latest", port=8888)
    key = generatePrivateKey()
    savePrivateKey(key, tmp_path / "instance.pem")
    instance = await store.createInstance(alice.id, image.id, public_jwk=json.dumps(publicJWK(key)))
    instance = await store.updateInstance(instance.id, state="running")
    (tmp_path / "state").mkdir()
    auth = AuthService(
        reactor, instance=instance.id, keyFile=str(tmp_path / "instance.pem"), portal=PORTAL, portalInternal=internal,
        listen=serverFromString(reactor, "tcp:0:interface=127.0.0.1"), tool=clientFromString(reactor, backend.endpoint),
    )  # fmt: skip
    auth.startService()
    for name, value in {
        "DIT4C_INSTANCE": instance.id,
        "DIT4C_INSTANCE_KEY": str(tmp_path / "instance.pem"),
        "DIT4C_PORTAL": PORTAL,
        "DIT4C_PORTAL_INTERNAL": internal,
        "DIT4C_AUTH": f"tcp:host=127.0.0.1:port={auth.port.getHost().port}",
        "DIT4C_STATE_DIR": str(tmp_path / "state"),
        "DIT4C_ONION": f"tcp:host=127.0.0.1:port={tornet.controlPort}",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DIT4C_ROUTING", raising=False)
    listener: Any = None
    portalCookies = Cookies()

    async def atPortal(method: str, url: str, **kw: Any) -> tuple[int, str]:
        """A request at the portal (a browser's, sent to where it listens)."""
        assert url.startswith(PORTAL), url
        response = await treq.request(
            method, internal + url[len(PORTAL) :], allow_redirects=False,
            headers={"Host": "portal.test", "Accept": "text/html", **portalCookies.header()}, **kw,
        )  # fmt: skip
        portalCookies.keep([("set-cookie", v) for v in response.headers.getRawHeaders("set-cookie", [])])
        where = response.headers.getRawHeaders("location", [""])[0]
        return response.code, where if where else await response.text()

    try:
        options = listenerTap.Options()
        options.parseOptions([])
        listener = listenerTap.makeService(options, reactor)
        assert isinstance(listener, OnionService)
        began = time.monotonic()
        listener.startService()
        url = await listener.whenPublished().addTimeout(60, reactor)
        print(f"the listener's onion service published in {time.monotonic() - began:.1f} s")
        host = urlsplit(url).hostname
        assert url == f"http://{host}/" and isOnionV3(host)

        async def recorded() -> bool:
            return (await store.instanceById(instance.id)).url == url

        await eventually(recorded, 30, 0.1, "the portal recorded the instance's .onion URL")

        # Through Tor: the auth helper sends the browser to log in at the portal.
        authorize, onionCookies = await sentToLogIn(tornet, host, "/bytes?n=7", PORTAL, instance.id, url)
        callback = await logInForTheCallback(atPortal, PORTAL, authorize, url, "correct horse battery")
        # Back at the .onion, through Tor: the callback, then the tool's page.
        path = callback[len(url) - 1 :]
        status, headers, _ = parsed(await httpGet(tornet.dial(host, 80), host, path, BROWSER + onionCookies.lines()))
        onionCookies.keep(headers)
        assert status in (302, 303) and dict(headers)["location"].endswith("/bytes?n=7"), headers
        status, headers, body = parsed(await httpGet(tornet.dial(host, 80), host, "/bytes?n=7", BROWSER + onionCookies.lines()))
        assert (status, len(body)) == (200, 7), (status, headers)
        assert oct((tmp_path / "state" / ONION_KEY_FILE).stat().st_mode & 0o777) == "0o600"

        # A resume: the same name, from the kept key; the session goes on.
        await listener.stopService()
        listener = listenerTap.makeService(options, reactor)
        listener.startService()
        assert await listener.whenPublished().addTimeout(60, reactor) == url
        raw, _ = await firstAnswer(tornet.dial(host, 80), host, "/bytes?n=3", BROWSER + onionCookies.lines())
        status, _, body = parsed(raw)
        assert (status, len(body)) == (200, 3), raw[:300]
    finally:
        if listener is not None:
            await listener.stopService()
        await auth.stopService()
        await portalPort.stopListening()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_the_commands_a_site_runs_for_a_routing_server_reached_through_tor(
    tornet: TorNetwork, signing: Signing, backend: Any, processes: Any
) -> None:
    """
    The same through the commands a site runs: ``twistd dit4c-routing
    --tunnel onion:...`` says its onion service's name in its log, and
    ``twistd dit4c-helper-listener --routing tor:...`` dials it.
    """
    routing = processes(
        "dit4c-routing", "--tunnel", f"onion:9000:controlPort={tornet.controlPort}:version=3",
        "--http", "tcp:0:interface=127.0.0.1", "--jwks-file", str(signing.jwksPath),
    )  # fmt: skip
    match = await routing.waitForLog(r"tunnel listening on TorOnionAddress\(([a-z2-7]{56}\.onion)\)", 60)
    onion = match.group(1)
    http = await routing.waitForPort("public http")
    listener = processes(
        "dit4c-helper-listener", "--routing", tornet.dial(onion, 9000), "--target", backend.endpoint,
        "--key-file", str(signing.keyPath), "--instance", "abc", env={"DIT4C_INSTANCE": ""},
    )  # fmt: skip
    await listener.waitForLog("tunnel up: instance abc", FIRST_TRIP)

    async def served() -> bool:
        response = await treq.get(f"http://127.0.0.1:{http}/bytes?n=5", headers={"Host": "abc.localhost"})
        return response.code == 200 and len(await response.content()) == 5

    await eventually(served, 10, 0.2, "the tool through the routing server's onion tunnel")
