"""
Logging in through upstream providers, over real HTTP on loopback:

- OpenID Connect against a real provider, panva's ``oidc-provider`` run with
  Node (``tests/portal/oidc_provider``; ``npm ci`` there installs it), driven
  through its own login and consent pages the way a browser would;
- GitHub against a small fake GitHub (GitHub itself is out of reach here),
  served by twisted.web with the endpoints configured as for GitHub
  Enterprise.

The portal is served with a real (SQLite) store; its clock is a ``Clock``
set to the wall clock, so a test can make a login flow expire.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import jwt
import pytest
import pytest_twisted
import treq
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from klein import Klein
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.pages import notFound
from twisted.web.server import Site

from dit4c.common.pkce import codeChallenge
from dit4c.portal import security
from dit4c.portal.app import Portal, PortalConfig
from dit4c.portal.keys import KeyRing
from dit4c.portal.store import openStore
from dit4c.portal.upstream import (
    FLOW_COOKIE,
    FLOW_LIFETIME,
    ConfigError,
    InvalidIdentity,
    ProviderConfig,
    UpstreamLogin,
    baseLoginName,
    loginLinks,
    providersFromFile,
    verifyIDToken,
)

OIDC_DIR = Path(__file__).parent / "oidc_provider"
FLOW = FLOW_COOKIE.decode()
SESSION = security.SESSION_COOKIE.decode()

#: The provider's clients: client id -> (ID token algorithm, the portal's provider names using it).
CLIENTS: dict[str, tuple[str, list[str]]] = {
    "dit4c": ("RS256", ["op", "closed", "mitm"]),
    "dit4c-ps": ("PS256", ["op-ps"]),
    "dit4c-es": ("ES256", ["op-es"]),
    "dit4c-ed": ("EdDSA", ["op-ed"]),
    "dit4c-hs": ("HS256", ["op-hs"]),
    "other": ("RS256", ["other"]),
}

ACCOUNTS = {
    "alice-sub": {
        "preferred_username": "Alice.Smith",
        "email": "alice@uni.example",
        "email_verified": True,
        "name": "Alice Smith",
    },
    "bob-sub": {"email": "Bob@uni.example", "email_verified": False},
}


def serve(site: Site) -> tuple[Any, str]:
    """Listen on a free loopback port: the port, and its URL."""
    port: Any = reactor.listenTCP(0, cast(Any, site), interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}"


def secretOf(client: str) -> str:
    return f"secret-of-{client}-0123456789abcdef0123456789abcdef"


# -- the portal, served on loopback ---------------------------------------------------------------


@dataclass
class Served:
    site: Site
    port: Any
    url: str


@pytest_twisted.async_yield_fixture(scope="module")
async def served() -> Any:
    """One loopback port for the module (the provider's clients name it); each test mounts its own portal."""
    site = Site(notFound())
    port, url = serve(site)
    yield Served(site, port, url)
    await port.stopListening()


class Root:
    """What app.py's mount does: ``/login/`` to the upstream login, everything else to the portal."""

    app = Klein()

    def __init__(self, portal: Portal, upstream: UpstreamLogin) -> None:
        self.portal = portal
        self.upstream = upstream

    @app.route("/login", methods=["GET"])
    def loginPage(self, request: IRequest) -> Any:
        return self.portal.loginPage(request)

    @app.route("/login", methods=["POST"])
    def login(self, request: IRequest) -> Any:
        return self.portal.login(request)

    @app.route("/login/", branch=True)
    def upstreamLogin(self, request: IRequest) -> Any:
        return self.upstream.app.resource()

    @app.route("/", branch=True)
    def rest(self, request: IRequest) -> Any:
        return self.portal.app.resource()


@dataclass
class Env:
    served: Served
    portal: Portal
    store: Any
    clock: Clock
    upstream: UpstreamLogin | None = None

    @property
    def url(self) -> str:
        return self.served.url

    def mount(
        self, providers: list[ProviderConfig], http: HTTPClient | None = None
    ) -> UpstreamLogin:
        self.upstream = UpstreamLogin(self.portal, providers, http or HTTPClient(Agent(reactor)))
        self.served.site.resource = Root(self.portal, self.upstream).app.resource()
        return self.upstream


@pytest_twisted.async_yield_fixture
async def env(served: Served, tmp_path: Path) -> Any:
    clock = Clock()
    clock.advance(time.time())
    store = await openStore(f"sqlite:///{tmp_path / 'portal.db'}", reactor, clock=clock)
    keys = KeyRing(tmp_path / "keys", issuer=served.url, clock=clock)
    portal = Portal(store, keys, PortalConfig(publicURL=served.url), clock)
    yield Env(served, portal, store, clock)
    served.site.resource = notFound()
    await store.close()


class Browser:
    """A cookie-keeping HTTP client (cookies by host and path, as a browser keeps them)."""

    def __init__(self, source: str | None = None) -> None:
        """``source``: the loopback address to connect from (any of 127.0.0.0/8)."""
        self.jar = CookieJar()
        agent = Agent(reactor, bindAddress=(source, 0) if source else None)
        self.http = HTTPClient(agent, cookiejar=cast(Any, self.jar))

    async def get(self, url: str, cookies: dict[str, str] | None = None) -> tuple[Any, str]:
        response = await self.http.get(url, allow_redirects=False, cookies=cookies)
        return response, await response.text()

    async def post(self, url: str, data: dict[str, str]) -> tuple[Any, str]:
        response = await self.http.post(url, data=data, allow_redirects=False)
        return response, await response.text()

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)


def location(response: Any) -> str:
    [value] = response.headers.getRawHeaders("location")
    return str(value)


def setCookie(response: Any, name: str) -> str | None:
    return next(
        (c for c in response.headers.getRawHeaders("set-cookie", []) if c.startswith(name + "=")),
        None,
    )


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


# -- the real OpenID Connect provider ----------------------------------------------------------


def requireProvider() -> None:
    if shutil.which("node") is None or not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
        reason = "oidc-provider is not installed: run 'npm ci' in tests/portal/oidc_provider"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


class NodeProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.started: Deferred[dict[str, Any]] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.out = b""
        self.err = b""

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if b"\n" in self.out and not self.started.called:
            self.started.callback(json.loads(self.out.split(b"\n", 1)[0]))

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        if not self.started.called:
            self.started.errback(
                RuntimeError("oidc-provider exited:\n" + self.err.decode(errors="replace"))
            )
        self.ended.callback(None)


@dataclass
class OIDCProvider:
    issuer: str
    process: NodeProcess

    def config(self, name: str, **kwargs: Any) -> ProviderConfig:
        [client] = [c for c, (_, names) in CLIENTS.items() if name in names]
        kwargs.setdefault("allowSignup", True)
        return ProviderConfig(name, "oidc", client, secretOf(client), issuer=self.issuer, **kwargs)


@pytest_twisted.async_yield_fixture(scope="module")
async def oidc(served: Served) -> Any:
    requireProvider()
    clients = [
        {
            "client_id": client,
            "client_secret": secretOf(client),
            "redirect_uris": [f"{served.url}/login/{name}/callback" for name in names],
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
            "id_token_signed_response_alg": alg,
            "token_endpoint_auth_method": "client_secret_post"
            if client == "dit4c-es"
            else "client_secret_basic",
        }
        for client, (alg, names) in CLIENTS.items()
    ]
    settings = {
        "clients": clients,
        "accounts": ACCOUNTS,
        "idTokenAlgs": ["RS256", "PS256", "ES256", "EdDSA", "HS256"],
    }
    process = NodeProcess()
    node = shutil.which("node")
    assert node is not None
    reactor.spawnProcess(
        process,
        node,
        [node, "provider.mjs", json.dumps(settings)],
        env=dict(os.environ),
        path=str(OIDC_DIR),
    )
    started = await process.started.addTimeout(30, reactor)
    yield OIDCProvider(started["issuer"], process)
    assert process.transport is not None
    process.transport.closeStdin()  # the script exits when its stdin closes
    try:
        await process.ended.addTimeout(10, reactor)
    except Exception:
        process.transport.signalProcess("KILL")


class Forms(HTMLParser):
    """The forms (action, fields) and links of a page."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.forms.append((a.get("action") or "", {}))
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1][1][a["name"] or ""] = a.get("value") or ""
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"] or "")


async def atProvider(
    browser: Browser, url: str, back: str, account: str = "alice-sub", abort: bool = False
) -> str:
    """
    Go through the provider's pages (log in as ``account`` with any
    password, consent) until it sends the browser back to ``back``; the URL
    it sends it to.
    """
    for _ in range(16):
        if url.startswith(back):
            return url
        response, page = await browser.get(url)
        if response.code in (302, 303):
            url = urljoin(url, location(response))
            continue
        assert response.code == 200, page
        forms = Forms(page)
        if abort:
            [abortURL] = [link for link in forms.links if "/abort" in link]
            response, _ = await browser.get(urljoin(url, abortURL))
            url = urljoin(url, location(response))
            continue
        action, fields = forms.forms[0]
        if "login" in fields:
            fields.update(login=account, password="any password")
        response, page = await browser.post(urljoin(url, action), fields)
        assert response.code in (302, 303), page
        url = urljoin(url, location(response))
    raise AssertionError(f"the provider never sent the browser back; last at {url}")


async def startLogin(browser: Browser, env: Env, path: str) -> str:
    """Start a login at the portal; the provider URL it redirects to."""
    response, page = await browser.get(env.url + path)
    assert response.code == 303, page
    return location(response)


async def logInVia(
    browser: Browser, env: Env, path: str = "/login/op", account: str = "alice-sub"
) -> tuple[Any, str]:
    """The whole login: the portal's answer to the callback."""
    authorize = await startLogin(browser, env, path)
    callback = await atProvider(browser, authorize, env.url + "/login/", account)
    return await browser.get(callback)


async def idTokenFor(
    oidc: OIDCProvider, client: str, back: str, nonce: str, account: str = "alice-sub"
) -> str:
    """A real ID token from the provider for ``client``, with ``nonce`` (a login made by the test itself)."""
    name = CLIENTS[client][1][0]
    redirectURI = f"{back}/login/{name}/callback"
    verifier = "v" * 64
    browser = Browser()
    _, discovery = await browser.get(oidc.issuer + "/.well-known/openid-configuration")
    meta = json.loads(discovery)
    authorize = (
        meta["authorization_endpoint"]
        + "?"
        + urlencode(
            {
                "response_type": "code",
                "client_id": client,
                "redirect_uri": redirectURI,
                "scope": "openid",
                "state": "test-state",
                "nonce": nonce,
                "code_challenge": codeChallenge(verifier),
                "code_challenge_method": "S256",
            }
        )
    )
    callback = await atProvider(browser, authorize, redirectURI, account)
    response = await treq.post(
        meta["token_endpoint"],
        data={
            "grant_type": "authorization_code",
            "code": query(callback)["code"],
            "redirect_uri": redirectURI,
            "code_verifier": verifier,
        },
        auth=(client, secretOf(client)),
    )
    body = await response.json()
    assert response.code == 200, body
    return str(body["id_token"])


# -- OpenID Connect: logging in -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_first_login_signs_up_and_links_then_the_next_finds_the_same_user(
    env: Env, oidc: OIDCProvider
) -> None:
    env.mount([oidc.config("op")])
    browser = Browser()
    authorize = await startLogin(browser, env, "/login/op?next=/instances")
    assert authorize.startswith(oidc.issuer + "/auth?")
    params = query(authorize)
    assert params["client_id"] == "dit4c" and params["code_challenge_method"] == "S256"
    assert params["redirect_uri"] == env.url + "/login/op/callback"
    assert params["scope"] == "openid profile email"
    assert (
        len(params["state"]) >= 43
        and len(params["nonce"]) >= 43
        and len(params["code_challenge"]) == 43
    )
    callback = await atProvider(browser, authorize, env.url + "/login/")
    assert browser.cookie(FLOW) is not None
    response, page = await browser.get(callback)
    assert response.code == 303, page
    assert location(response) == "/instances"
    cookie = setCookie(response, SESSION)
    assert cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert browser.cookie(FLOW) is None  # spent

    user = await env.store.userByIdentity("op", "alice-sub")
    assert user is not None
    assert (user.name, user.display_name, user.email) == (
        "alice-smith",
        "Alice Smith",
        "alice@uni.example",
    )
    assert user.password_hash is None
    response, page = await browser.get(env.url + "/")
    assert response.code == 200 and "Alice Smith" in page

    # Again, from another browser: the same user, no new one.
    again = Browser()
    response, _ = await logInVia(again, env)
    assert response.code == 303 and location(response) == "/"
    session = await env.store.sessionByToken(again.cookie(SESSION))
    assert session.user_id == user.id
    assert again.cookie(SESSION) != browser.cookie(SESSION)
    assert await env.store.countUsers() == 1


@pytest_twisted.ensureDeferred
async def test_the_login_page_links_and_a_logged_in_person_goes_straight_on(
    env: Env, oidc: OIDCProvider
) -> None:
    upstream = env.mount([oidc.config("op", label="University"), oidc.config("closed")])
    assert upstream.links("/instances") == [
        ("Log in with University", "/login/op?next=%2Finstances"),
        ("Log in with closed", "/login/closed?next=%2Finstances"),
    ]
    browser = Browser()
    await logInVia(browser, env)
    response, _ = await browser.get(env.url + "/login/op?next=/x")
    assert response.code == 303 and location(response) == "/x"
    response, _ = await browser.get(env.url + "/login/nosuch")
    assert response.code == 404
    response, _ = await browser.get(env.url + "/login")  # the portal's own page is still there
    assert response.code == 303  # (logged in already)


@pytest_twisted.ensureDeferred
async def test_a_taken_login_name_gets_digits_and_names_come_from_the_email(
    env: Env, oidc: OIDCProvider
) -> None:
    env.mount([oidc.config("op")])
    await env.store.createUser("alice-smith")
    await env.store.createUser("alice-smith2")
    response, _ = await logInVia(Browser(), env)
    assert response.code == 303
    user = await env.store.userByIdentity("op", "alice-sub")
    assert user.name == "alice-smith3"

    response, _ = await logInVia(Browser(), env, account="bob-sub")
    assert response.code == 303
    bob = await env.store.userByIdentity("op", "bob-sub")
    # The name from the email's local part; the email itself is not verified, so not kept.
    assert (bob.name, bob.email) == ("bob", None)


@pytest_twisted.ensureDeferred
async def test_without_signup_an_unknown_account_is_not_registered(
    env: Env, oidc: OIDCProvider
) -> None:
    env.mount([oidc.config("closed", allowSignup=False)])
    browser = Browser()
    response, page = await logInVia(browser, env, "/login/closed")
    assert response.code == 403
    assert "not registered here" in page
    assert browser.cookie(SESSION) is None
    assert await env.store.countUsers() == 0

    # Once an administrator links the identity to a user, it logs in.
    carol = await env.store.createUser("carol")
    await env.store.linkIdentity(carol.id, "closed", "alice-sub")
    response, _ = await logInVia(browser, env, "/login/closed")
    assert response.code == 303
    session = await env.store.sessionByToken(browser.cookie(SESSION))
    assert session.user_id == carol.id

    # A disabled user does not.
    await env.store.updateUser(carol.id, disabled=True)
    other = Browser()
    response, page = await logInVia(other, env, "/login/closed")
    assert response.code == 403 and "disabled" in page
    assert other.cookie(SESSION) is None


@pytest.mark.parametrize("name", ["op-ps", "op-es", "op-ed"])
@pytest_twisted.ensureDeferred
async def test_every_pinned_algorithm_verifies(env: Env, oidc: OIDCProvider, name: str) -> None:
    # PS256 with an RSA key that names no algorithm; ES256 with client_secret_post.
    env.mount([oidc.config(name, tokenAuth="client_secret_post" if name == "op-es" else "")])
    browser = Browser()
    response, page = await logInVia(browser, env, f"/login/{name}")
    assert response.code == 303, page
    assert await env.store.userByIdentity(name, "alice-sub") is not None


@pytest_twisted.ensureDeferred
async def test_an_algorithm_outside_the_pinned_set_is_refused(env: Env, oidc: OIDCProvider) -> None:
    # The provider offers HS256 (its discovery document lists it) and signs with it.
    env.mount([oidc.config("op-hs")])
    browser = Browser()
    response, page = await logInVia(browser, env, "/login/op-hs")
    assert response.code == 403 and "could not be verified" in page
    assert browser.cookie(SESSION) is None
    assert await env.store.countUsers() == 0


# -- OpenID Connect: what is refused ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_next_is_kept_and_other_sites_are_refused(env: Env, oidc: OIDCProvider) -> None:
    env.mount([oidc.config("op")])
    browser = Browser()
    cases = {
        "/instances/abc?tab=files&x=1": "/instances/abc?tab=files&x=1",
        "https://evil.example/steal": "/",
        "//evil.example/steal": "/",
        "/\\evil.example": "/",
    }
    for given, expected in cases.items():
        browser.jar.clear()  # logged out, and a new login at the provider
        response, _ = await logInVia(browser, env, "/login/op?" + urlencode({"next": given}))
        assert response.code == 303
        assert location(response) == expected, given


@pytest_twisted.ensureDeferred
async def test_the_person_saying_no_at_the_provider_gets_no_session(
    env: Env, oidc: OIDCProvider
) -> None:
    env.mount([oidc.config("op", label="University")])
    browser = Browser()
    authorize = await startLogin(browser, env, "/login/op")
    callback = await atProvider(browser, authorize, env.url + "/login/", abort=True)
    assert query(callback)["error"] == "access_denied"
    response, page = await browser.get(callback)
    assert response.code == 403
    assert "You did not allow logging in here with University." in page
    assert browser.cookie(SESSION) is None


@pytest_twisted.ensureDeferred
async def test_a_state_that_is_not_this_browsers_is_refused(env: Env, oidc: OIDCProvider) -> None:
    env.mount([oidc.config("op")])
    browser = Browser()
    authorize = await startLogin(browser, env, "/login/op")
    callback = await atProvider(browser, authorize, env.url + "/login/")
    forged = callback.replace(query(callback)["state"], "forged-state")
    response, page = await browser.get(forged)
    assert response.code == 400 and "does not belong to the login you started" in page
    assert browser.cookie(SESSION) is None
    # The flow is spent: the genuine answer, now, is refused too.
    response, _ = await browser.get(callback)
    assert response.code == 400
    assert browser.cookie(SESSION) is None

    # An answer followed in another browser (login CSRF) is refused.
    victim = Browser()
    authorize = await startLogin(browser, env, "/login/op")
    callback = await atProvider(browser, authorize, env.url + "/login/")
    response, page = await victim.get(callback)
    assert response.code == 400 and "started in another browser" in page
    assert victim.cookie(SESSION) is None


@pytest_twisted.ensureDeferred
async def test_a_replayed_callback_is_refused(env: Env, oidc: OIDCProvider) -> None:
    env.mount([oidc.config("op")])
    browser = Browser()
    authorize = await startLogin(browser, env, "/login/op")
    callback = await atProvider(browser, authorize, env.url + "/login/")
    flowCookie = browser.cookie(FLOW)
    assert flowCookie is not None
    response, _ = await browser.get(callback)
    assert response.code == 303

    # The same browser again: its flow cookie is gone.
    response, _ = await browser.get(callback)
    assert response.code == 400 and setCookie(response, SESSION) is None
    # Someone who kept the flow cookie too.
    thief = Browser()
    response, page = await thief.get(callback, cookies={FLOW: flowCookie})
    assert response.code == 400 and "used already" in page
    assert thief.cookie(SESSION) is None


@pytest_twisted.ensureDeferred
async def test_forged_callbacks_slow_down_their_address_only(env: Env, oidc: OIDCProvider) -> None:
    """
    The callback is throttled as password logins are: forged answers count
    as failures of the address they came from (ten back to back, then 1 s,
    2 s ... between attempts). Someone elsewhere logs in meanwhile; a real
    answer from the throttled address waits, unspent, and goes through once
    the wait is over.
    """
    env.mount([oidc.config("op")])
    attacker = Browser(source="127.0.0.77")
    forged = env.url + "/login/op/callback?state=forged&code=forged"
    for _ in range(10):
        response, _ = await attacker.get(forged)
        assert response.code == 400
    response, page = await attacker.get(forged)
    assert response.code == 429 and response.headers.getRawHeaders("retry-after") == ["1"]
    assert "Too many failed logins" in page

    elsewhere = Browser()
    response, _ = await logInVia(elsewhere, env)
    assert response.code == 303 and elsewhere.cookie(SESSION) is not None

    person = Browser(source="127.0.0.77")
    authorize = await startLogin(person, env, "/login/op")
    callback = await atProvider(person, authorize, env.url + "/login/")
    response, _ = await person.get(callback)
    assert response.code == 429 and person.cookie(SESSION) is None
    env.clock.advance(1)
    response, _ = await person.get(callback)
    assert response.code == 303 and person.cookie(SESSION) is not None


@pytest_twisted.ensureDeferred
async def test_a_login_older_than_ten_minutes_is_refused(env: Env, oidc: OIDCProvider) -> None:
    env.mount([oidc.config("op")])
    browser = Browser()
    response, _ = await browser.get(env.url + "/login/op")
    cookie = setCookie(response, FLOW)
    assert cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Max-Age=600" in cookie
    assert "Secure" not in cookie  # plain http here
    callback = await atProvider(browser, location(response), env.url + "/login/")
    env.clock.advance(FLOW_LIFETIME + 1)
    response, page = await browser.get(callback)
    assert response.code == 400 and "took too long" in page
    assert browser.cookie(SESSION) is None


class TokenInterceptor:
    """
    Between the portal and the provider's token endpoint: forwards the
    exchange to the real provider, then hands the portal ``replace(id_token)``
    instead of the ID token it got (a provider that misbehaves, or an
    attacker who can change its answers).
    """

    app = Klein()

    def __init__(self, tokenEndpoint: str, replace: Callable[[str], str]) -> None:
        self.tokenEndpoint = tokenEndpoint
        self.replace = replace

    @app.route("/token", methods=["POST"])
    async def token(self, request: IRequest) -> bytes:
        response = await treq.post(
            self.tokenEndpoint,
            data=request.content.read(),
            headers=Headers(
                {
                    b"Authorization": [request.getHeader(b"authorization") or b""],
                    b"Content-Type": [request.getHeader(b"content-type") or b""],
                }
            ),
        )
        body = await response.json()
        if "id_token" in body:
            body["id_token"] = self.replace(body["id_token"])
        request.setResponseCode(response.code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()


class Redirecting(HTTPClient):
    """The portal's HTTP client, sending token requests to the interceptor."""

    def __init__(self, tokenEndpoint: str, to: str) -> None:
        super().__init__(Agent(reactor))
        self.tokenEndpoint = tokenEndpoint
        self.to = to

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        if url == self.tokenEndpoint:
            url = self.to
        return super().request(method, url, **kwargs)


def withClaims(token: str, **claims: Any) -> str:
    """The same token with changed claims and the original signature."""
    header, payload, signature = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    decoded.update(claims)
    changed = base64.urlsafe_b64encode(json.dumps(decoded).encode()).rstrip(b"=").decode()
    return f"{header}.{changed}.{signature}"


@pytest.mark.parametrize("attack", ["another audience", "changed subject", "another login's nonce"])
@pytest_twisted.ensureDeferred
async def test_an_id_token_that_does_not_verify_gives_no_session(
    env: Env, oidc: OIDCProvider, attack: str
) -> None:
    tokenEndpoint = oidc.issuer + "/token"
    replacement: dict[str, str] = {}

    def replace(original: str) -> str:
        return replacement.get("token") or withClaims(original, sub="someone-else")

    interceptor = TokenInterceptor(tokenEndpoint, replace)
    port, url = serve(Site(interceptor.app.resource()))
    try:
        to = url + "/token"
        env.mount([oidc.config("mitm")], http=Redirecting(tokenEndpoint, to))
        browser = Browser()
        authorize = await startLogin(browser, env, "/login/mitm")
        nonce = query(authorize)["nonce"]
        if attack == "another audience":
            # Genuinely signed by the provider, for this login's nonce, but for another client.
            replacement["token"] = await idTokenFor(oidc, "other", env.url, nonce)
        elif attack == "another login's nonce":
            replacement["token"] = await idTokenFor(oidc, "dit4c", env.url, "another-nonce")
        callback = await atProvider(browser, authorize, env.url + "/login/")
        response, page = await browser.get(callback)
        assert response.code == 403 and "could not be verified" in page
        assert browser.cookie(SESSION) is None
        assert await env.store.countUsers() == 0
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_provider_that_is_down_or_not_the_issuer_gives_an_error_page(
    env: Env, oidc: OIDCProvider
) -> None:
    wrongIssuer = ProviderConfig("op", "oidc", "dit4c", secretOf("dit4c"), issuer=oidc.issuer + "/")
    down = ProviderConfig("other", "oidc", "other", secretOf("other"), issuer="http://127.0.0.1:1")
    env.mount([wrongIssuer, down])
    for path in ("/login/op", "/login/other"):
        response, page = await Browser().get(env.url + path)
        assert response.code == 502 and "could not be reached" in page
        assert setCookie(response, FLOW) is None


# -- ID tokens, piece by piece (real tokens from the provider, and made here) ----------------------


@pytest_twisted.ensureDeferred
async def test_verify_a_real_id_token(env: Env, oidc: OIDCProvider) -> None:
    token = await idTokenFor(oidc, "dit4c", env.url, "n-1")
    _, body = await Browser().get(oidc.issuer + "/jwks")
    jwks = json.loads(body)
    args: dict[str, Any] = dict(
        issuer=oidc.issuer, clientId="dit4c", nonce="n-1", algorithms=["RS256"]
    )
    claims = verifyIDToken(token, jwks, **args)
    assert claims["sub"] == "alice-sub" and claims["aud"] == "dit4c"
    for changed in (
        dict(clientId="other"),
        dict(issuer=oidc.issuer + "/"),
        dict(nonce="n-2"),
        dict(algorithms=["ES256", "PS256"]),  # RS256 not among the issuer's
        dict(algorithms=["HS256", "none"]),  # never accepted
    ):
        with pytest.raises(InvalidIdentity):
            verifyIDToken(token, jwks, **{**args, **changed})
    with pytest.raises(InvalidIdentity):
        verifyIDToken(token, {"keys": []}, **args)


def makeToken(key: Any, alg: str, kid: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": "https://op.example",
        "sub": "s",
        "aud": "c",
        "iat": now,
        "exp": now + 60,
        "nonce": "n",
    }
    payload.update(claims)
    return jwt.encode(
        {k: v for k, v in payload.items() if v is not None},
        key,
        algorithm=alg,
        headers={"kid": kid},
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hmacToken(secret: bytes, kid: str) -> str:
    """An HS256 token made by hand (PyJWT rightly refuses to use a public key as an HMAC secret)."""
    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    claims = {
        "iss": "https://op.example",
        "sub": "s",
        "aud": "c",
        "iat": now,
        "exp": now + 60,
        "nonce": "n",
    }
    payload = b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def test_verify_made_up_id_tokens() -> None:
    rsaKey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ecKey = ec.generate_private_key(ec.SECP256R1())
    jwks = {
        "keys": [
            {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsaKey.public_key())), "kid": "r"},
            {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ecKey.public_key())), "kid": "e"},
        ]
    }
    args: dict[str, Any] = dict(
        issuer="https://op.example", clientId="c", nonce="n", algorithms=["RS256", "ES256"]
    )
    assert verifyIDToken(makeToken(rsaKey, "RS256", "r"), jwks, **args)["sub"] == "s"
    assert verifyIDToken(makeToken(ecKey, "ES256", "e"), jwks, **args)["sub"] == "s"
    assert verifyIDToken(makeToken(ecKey, "ES256", "e", aud=["c", "d"], azp="c"), jwks, **args)
    rsaPublicPEM = rsaKey.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    bad = [
        makeToken(rsaKey, "RS256", "r", exp=int(time.time()) - 3600),  # expired
        makeToken(rsaKey, "RS256", "r", iat=int(time.time()) + 3600),  # issued in the future
        makeToken(rsaKey, "RS256", "r", iss="https://evil.example"),
        makeToken(rsaKey, "RS256", "r", aud="d"),
        makeToken(ecKey, "ES256", "e", aud=["c", "d"]),  # several audiences and no azp
        makeToken(ecKey, "ES256", "e", azp="d"),
        makeToken(rsaKey, "RS256", "r", nonce=None),
        makeToken(rsaKey, "RS256", "r", exp=None),
        makeToken(rsaKey, "RS256", "r", sub=""),
        makeToken(rsaKey, "RS256", "e"),  # the kid of a key of another type
        makeToken(ecKey, "ES256", "r"),
        makeToken(rsaKey, "PS256", "r"),  # PS256 not allowed by this issuer
        jwt.encode({"sub": "s"}, None, algorithm="none"),  # type: ignore[arg-type]
        # The classic confusion: HMAC with the public key as the secret.
        hmacToken(rsaPublicPEM, "r"),
        "not.a.token",
    ]
    for token in bad:
        with pytest.raises(InvalidIdentity):
            verifyIDToken(token, jwks, **args)


# -- configuration, names and links -----------------------------------------------------------------


def test_login_names_from_provider_names() -> None:
    assert baseLoginName(["Alice.Smith"]) == "alice-smith"
    assert baseLoginName([None, "Bob@uni.example"]) == "bob"
    assert baseLoginName(["José Ñúñez"]) == "jose-nunez"
    assert baseLoginName(["--__--", "admin", "", "Z"]) == "z"
    assert baseLoginName(["日本語"]) == "user"
    assert baseLoginName(["a" * 40 + "-b"]) == "a" * 32
    assert baseLoginName(["x" * 31 + "-y"]) == "x" * 31


def test_providers_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "gh.secret").write_text("gh-secret-value\n")
    (tmp_path / "uni.secret").write_text("uni-secret-value")
    config = tmp_path / "providers.json"
    config.write_text(
        json.dumps(
            {
                "providers": [
                    {
                        "name": "github",
                        "kind": "github",
                        "client_id": "Iv1",
                        "client_secret_file": "gh.secret",
                        "allow_signup": True,
                    },
                    {
                        "name": "uni",
                        "kind": "oidc",
                        "label": "University",
                        "issuer": "https://login.uni.example",
                        "client_id": "dit4c",
                        "client_secret_file": str(tmp_path / "uni.secret"),
                        "scopes": ["profile"],
                    },
                ]
            }
        )
    )
    github, uni = providersFromFile(config)
    assert (github.clientSecret, github.allowSignup, github.tokenAuth) == (
        "gh-secret-value",
        True,
        "client_secret_post",
    )
    assert github.authorizeURL == "https://github.com/login/oauth/authorize" and github.scopes == (
        "read:user",
    )
    assert (uni.clientSecret, uni.scopes, uni.allowSignup, uni.tokenAuth) == (
        "uni-secret-value",
        ("openid", "profile"),
        False,
        "client_secret_basic",
    )
    assert "secret-value" not in repr(github) + repr(uni)
    assert loginLinks([github, uni], "https://evil.example") == [
        ("Log in with GitHub", "/login/github"),
        ("Log in with University", "/login/uni"),
    ]

    def refused(entry: dict[str, Any], match: str) -> None:
        config.write_text(
            json.dumps(
                [
                    {
                        "name": "x",
                        "kind": "oidc",
                        "client_id": "c",
                        "client_secret_file": "gh.secret",
                        "issuer": "https://op.example",
                        **entry,
                    }
                ]
            )
        )
        with pytest.raises(ConfigError, match=match) as caught:
            providersFromFile(config)
        assert "gh-secret-value" not in str(caught.value)

    refused({"kind": "saml"}, "kind")
    refused({"issuer": "http://op.example"}, "https")
    refused({"client_secret_file": "missing.secret"}, "client secret")
    refused({"name": "Not A Name"}, "name")
    refused({"colour": "red"}, "unknown keys")
    refused({"allow_signup": "yes"}, "allow_signup")
    config.write_text("{not json")
    with pytest.raises(ConfigError):
        providersFromFile(config)


@pytest_twisted.ensureDeferred
async def test_the_flow_cookie_is_secure_on_https(tmp_path: Path) -> None:
    clock = Clock()
    store = await openStore(f"sqlite:///{tmp_path / 'p.db'}", reactor, clock=clock)
    try:
        portal = Portal(
            store,
            KeyRing(tmp_path / "k", issuer="https://p.test"),
            PortalConfig("https://p.test"),
            clock,
        )
        github = ProviderConfig("github", "github", "Iv1", "s3cret")
        upstream = UpstreamLogin(portal, [github], HTTPClient(Agent(reactor)))
        stub: Any = StubTreq(upstream.app.resource())
        response = await stub.get("https://p.test/github?next=/x", allow_redirects=False)
        assert response.code == 303
        target = location(response)
        assert target.startswith("https://github.com/login/oauth/authorize?")
        assert query(target)["redirect_uri"] == "https://p.test/login/github/callback"
        # Named __Host-: no other host under the same parent domain can plant one.
        assert setCookie(response, FLOW) is None
        cookie = setCookie(response, "__Host-" + FLOW)
        assert cookie and "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert "Path=/" in cookie and "Domain" not in cookie
    finally:
        await store.close()


# -- GitHub (a fake one on loopback) -------------------------------------------------------------------


class FakeGitHub:
    """GitHub's OAuth app endpoints and user API, as much as the portal uses."""

    app = Klein()

    def __init__(self) -> None:
        self.url = ""
        self.clientId = "Iv1.fake"
        self.clientSecret = "fake-github-secret"
        self.user: dict[str, Any] = {"id": 583231, "login": "Octo-Cat", "name": "The Octocat"}
        self.deny = False
        self.userAPIDown = False
        #: code -> (redirect URI, PKCE challenge)
        self.codes: dict[str, tuple[str, str]] = {}
        self.tokens: set[str] = set()
        self.seen: list[dict[str, str]] = []

    @app.route("/login/oauth/authorize", methods=["GET"])
    def authorize(self, request: IRequest) -> bytes:
        params = {k.decode(): v[0].decode() for k, v in request.args.items()}
        self.seen.append(params)
        assert params["client_id"] == self.clientId
        back = params["redirect_uri"]
        if self.deny:
            answer = {"error": "access_denied", "state": params["state"]}
        else:
            code = security.newToken()
            self.codes[code] = (back, params["code_challenge"])
            answer = {"code": code, "state": params["state"]}
        request.redirect(back + "?" + urlencode(answer))
        return b""

    @app.route("/login/oauth/access_token", methods=["POST"])
    def token(self, request: IRequest) -> bytes:
        form = {k.decode(): v[0].decode() for k, v in request.args.items()}
        request.setHeader(b"content-type", b"application/json")
        grant = self.codes.pop(form.get("code", ""), None)
        ok = (
            form.get("client_id") == self.clientId
            and form.get("client_secret") == self.clientSecret
            and grant is not None
            and grant[0] == form.get("redirect_uri")
            and codeChallenge(form.get("code_verifier", "")) == grant[1]
        )
        if not ok:
            return json.dumps(
                {"error": "bad_verification_code"}
            ).encode()  # with status 200, as GitHub does
        token = security.newToken()
        self.tokens.add(token)
        return json.dumps(
            {"access_token": token, "token_type": "bearer", "scope": "read:user"}
        ).encode()

    @app.route("/user", methods=["GET"])
    def userAPI(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        auth = (request.getHeader(b"authorization") or b"").decode()
        if self.userAPIDown:
            request.setResponseCode(503)
            return b"{}"
        if (
            not auth.startswith("Bearer ")
            or auth[7:] not in self.tokens
            or not request.getHeader(b"user-agent")
        ):
            request.setResponseCode(401)
            return json.dumps({"message": "Bad credentials"}).encode()
        return json.dumps(self.user).encode()


@pytest_twisted.async_yield_fixture
async def github() -> Any:
    fake = FakeGitHub()
    port, fake.url = serve(Site(fake.app.resource()))
    yield fake
    await port.stopListening()


def githubConfig(fake: FakeGitHub, **kwargs: Any) -> ProviderConfig:
    base = fake.url
    kwargs.setdefault("allowSignup", True)
    return ProviderConfig(
        "github",
        "github",
        fake.clientId,
        fake.clientSecret,
        authorizeURL=base + "/login/oauth/authorize",
        tokenURL=base + "/login/oauth/access_token",
        userURL=base + "/user",
        **kwargs,
    )


async def logInViaGitHub(
    browser: Browser, env: Env, path: str = "/login/github"
) -> tuple[Any, str]:
    authorize = await startLogin(browser, env, path)
    response, _ = await browser.get(authorize)
    assert response.code == 302
    return await browser.get(location(response))


@pytest_twisted.ensureDeferred
async def test_github_login_signs_up_by_numeric_id(env: Env, github: FakeGitHub) -> None:
    env.mount([githubConfig(github)])
    browser = Browser()
    response, page = await logInViaGitHub(browser, env, "/login/github?next=/instances")
    assert response.code == 303, page
    assert location(response) == "/instances"
    [seen] = github.seen
    assert seen["code_challenge_method"] == "S256" and seen["scope"] == "read:user"
    user = await env.store.userByIdentity("github", "583231")
    assert (user.name, user.display_name, user.email) == ("octo-cat", "The Octocat", None)
    session = await env.store.sessionByToken(browser.cookie(SESSION))
    assert session.user_id == user.id

    # A new GitHub login name is still the same person: the subject is the id.
    github.user = {"id": 583231, "login": "renamed-cat"}
    again = Browser()
    response, _ = await logInViaGitHub(again, env)
    assert response.code == 303
    session = await env.store.sessionByToken(again.cookie(SESSION))
    assert session.user_id == user.id
    assert await env.store.countUsers() == 1


@pytest_twisted.ensureDeferred
async def test_github_refusals(env: Env, github: FakeGitHub) -> None:
    env.mount([githubConfig(github, allowSignup=False)])
    browser = Browser()
    response, page = await logInViaGitHub(browser, env)
    assert response.code == 403 and "not registered here" in page

    github.deny = True
    response, page = await logInViaGitHub(browser, env)
    assert response.code == 403 and "You did not allow logging in here with GitHub." in page

    # A code GitHub does not take (here: a verifier that does not match).
    github.deny = False
    authorize = await startLogin(browser, env, "/login/github")
    response, _ = await browser.get(authorize)
    back = location(response)
    github.codes = {code: (uri, "not-the-challenge") for code, (uri, _) in github.codes.items()}
    response, page = await browser.get(back)
    assert response.code == 400 and "did not accept this login" in page

    github.userAPIDown = True
    response, page = await logInViaGitHub(browser, env)
    assert response.code == 502 and "could not be reached" in page
    assert browser.cookie(SESSION) is None
    assert await env.store.countUsers() == 0
