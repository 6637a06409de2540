"""
The portal's web application (Klein): pages, and the well-known documents
other components read.

The app is a class whose methods are routes (klein's "non-global state"
pattern), so a test builds one around an in-memory store and drives it
through ``StubTreq(portal.app.resource())``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, select_autoescape
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.exceptions import Forbidden

from dit4c.common.life import ACTIVE
from dit4c.common.life import toJSON as lifeJSON
from dit4c.common.nextpath import safeNext
from dit4c.portal import security
from dit4c.portal.events import AccessChange
from dit4c.portal.keys import KeyRing
from dit4c.portal.security import CookiePolicy
from dit4c.portal.store.ids import hashToken


@dataclass(frozen=True)
class PortalConfig:
    #: The portal's public base URL, e.g. ``https://portal.example.org`` (no trailing slash).
    publicURL: str
    #: Failed logins from one address that go back to back; after them, each
    #: attempt from there waits ``loginDelay`` seconds after the previous one,
    #: doubling with every further failure up to ``loginMaxDelay``
    #: (``security.LoginThrottle``).
    loginLimit: int = 10
    #: The same, for one user name from one address.
    loginNameLimit: int = 3
    loginDelay: float = 1.0
    loginMaxDelay: float = 900.0
    #: Seconds after an address's (or a name's at it) latest attempt that its failures are forgotten.
    loginWindow: float = 3600.0
    #: Reverse proxies whose ``X-Forwarded-For`` names the client: addresses,
    #: networks (``10.0.0.0/8``) or ``unix`` (``security.TrustedProxies``).
    trustedProxies: tuple[str, ...] = ()
    sessionLifetime: float = 12 * 3600.0
    #: Instances a person may run at once unless an administrator set theirs.
    defaultQuota: int = 4

    @property
    def secure(self) -> bool:
        return self.publicURL.startswith("https://")


class CrossSiteRequest(Forbidden):
    """A state-changing request that another site sent (``security.crossSite``)."""

    description = "This request was sent from another site, so it was refused. Use the portal's own pages."


class LoggedIn:
    """The person behind a request, and their session."""

    def __init__(self, user: Any, session: Any, token: str) -> None:
        self.user = user
        self.session = session
        self.token = token


_PUBLIC_MEMBERS = ("kty", "crv", "x", "y", "alg", "use")


def continuationOrigins(next: str) -> tuple[str, ...]:
    """
    Where a login that goes on to ``next`` may end up: for an OAuth
    authorization (an instance's auth helper sent the person to log in), the
    origin of its redirect URI, so that the browser may follow the login
    form's redirects back to the instance. The authorization endpoint still
    checks that URI against the instance's before it redirects anywhere.
    """
    from urllib.parse import parse_qs, urlsplit

    path, _, query = next.partition("?")
    if path != "/oauth/authorize":
        return ()
    uris = parse_qs(query).get("redirect_uri", [])
    if len(uris) != 1:
        return ()
    parts = urlsplit(uris[0])
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return ()
    host = parts.hostname
    if not all(c.isalnum() or c in ".-" for c in host):
        return ()
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return ()
    return (f"{parts.scheme}://{host}{port}",)


def publicMembers(text: str | None, kid: str) -> dict[str, Any] | None:
    """The public members of a stored JWK (JSON text), under ``kid``; None if unusable."""
    try:
        jwk = json.loads(text or "")
    except ValueError:
        return None
    if not isinstance(jwk, dict) or "kty" not in jwk:
        return None
    key = {k: jwk[k] for k in _PUBLIC_MEMBERS if k in jwk}
    key["kid"] = kid
    key.setdefault("use", "sig")
    return key


class NoChannel:
    """A portal without schedulers: commands are refused, nothing is connected."""

    def send(self, scheduler_id: str, op: str, instance_id: str, params: dict[str, Any]) -> Any:
        from dit4c.portal.instances import NoScheduler

        raise NoScheduler("This portal has no scheduler channel.")

    def connected(self, scheduler_id: str) -> bool:
        return False


class Portal:
    app = Klein()
    log = Logger()

    def __init__(
        self, store: Any, keys: KeyRing, config: PortalConfig, clock: Any, commands: Any = None
    ) -> None:
        from dit4c.portal.events import EventStreams, InstanceEvents
        from dit4c.portal.instances import Instances, Sharing

        self.store = store
        self.keys = keys
        self.config = config
        self.clock = clock
        #: Where instance commands go (the scheduler channel).
        self.events = InstanceEvents()
        #: The pages' event streams (GET /events).
        self.streams = EventStreams(store, self.events, clock)
        self.instances = Instances(
            store,
            commands or NoChannel(),
            defaultQuota=config.defaultQuota,
            events=self.events,
            readToken=self._readToken,
        )
        self.sharing = Sharing(self.instances, config.publicURL, removeBytes=self._removeImageBytes)
        self.cookies = CookiePolicy(secure=config.secure, sessionLifetime=config.sessionLifetime)
        #: The portal's own origin, which state-changing requests must come from.
        self.origin = security.origin(config.publicURL)
        #: The login form's CSRF tokens, bound to a pre-login cookie.
        self.loginForms = security.LoginForms(keys, self.cookies)
        #: Who sent a request (behind trusted reverse proxies too).
        self.proxies = security.TrustedProxies(config.trustedProxies)
        #: Failed logins slow down the address they came from, never the account.
        self.throttle = security.LoginThrottle(
            store,
            clock,
            addressLimit=config.loginLimit,
            nameLimit=config.loginNameLimit,
            firstDelay=config.loginDelay,
            maxDelay=config.loginMaxDelay,
            forget=config.loginWindow,
        )
        self.templates = Environment(
            loader=PackageLoader("dit4c.portal", "templates"),
            autoescape=select_autoescape(default=True),
            # Templates ship with the package; no need to stat them per render.
            auto_reload=False,
        )
        # The instance life, as pages and their script see it (states, actions, deadlines).
        self.templates.globals["life"] = lifeJSON()
        from dit4c.portal.oauth import OAuthServer

        #: The OAuth 2 authorization server for the instances' auth helpers, at /oauth/.
        self.oauth = OAuthServer(self)
        from dit4c.portal.reports import Reports

        #: Reports from instances' helpers, and the image server's question, at /reports/
        #: (no image server until ``self.reports.setImageServerSecret(...)``).
        self.reports = Reports(self)
        from dit4c.portal.admin import AdminPages
        from dit4c.portal.api import API

        #: The REST API at /api/v1/, and the administrators' pages at /admin/.
        self.api = API(self)
        self.admin = AdminPages(self)
        #: Login through GitHub / OpenID Connect providers, at /login/<provider>
        #: (a ``dit4c.portal.upstream.UpstreamLogin``), or None for none.
        self.upstream: Any = None
        self._jwksCache: tuple[float, list[dict[str, Any]]] | None = None
        #: The scheduler channel's WebSocket resource, served at /.dit4c/channel.
        self.channelResource: Any = None

    # -- helpers ---------------------------------------------------------------------

    def render(
        self, request: IRequest, template: str, status: int = 200, *, formTargets: tuple[str, ...] = (), **context: Any
    ) -> bytes:
        """
        A page from a template. ``formTargets``: origins besides the portal's
        that a form on the page may end up at through redirects (CSP
        ``form-action`` covers a form's whole redirect chain).
        """
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-frame-options", b"DENY")
        formAction = " ".join(("'self'", *formTargets))
        request.setHeader(
            b"content-security-policy",
            f"default-src 'self'; frame-ancestors 'none'; form-action {formAction}".encode("ascii"),
        )
        request.setHeader(b"referrer-policy", b"same-origin")
        return self.templates.get_template(template).render(**context).encode()

    def json(self, request: IRequest, body: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    @staticmethod
    def arg(request: IRequest, name: str) -> str | None:
        values = request.args.get(name.encode())
        if not values:
            return None
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            return None

    async def loggedIn(self, request: IRequest) -> LoggedIn | None:
        """
        The person whose session cookie came with ``request``, if any.
        Every use of a session goes through here, so here a state-changing
        request sent by another site is refused (403), whatever it carries.
        """
        self.refuseCrossSite(request)
        token = self.cookies.get(request, security.SESSION_COOKIE)
        if not token:
            return None
        try:
            text = token.decode("ascii")
        except UnicodeDecodeError:
            return None
        session = await self.store.sessionByToken(text)
        if session is None:
            return None
        user = await self.store.userById(session.user_id)
        if user is None or user.disabled:
            return None
        return LoggedIn(user, session, text)

    def redirect(self, request: IRequest, location: str) -> bytes:
        request.setResponseCode(303)
        request.setHeader(b"location", location.encode())
        return b""

    def refuseCrossSite(self, request: IRequest) -> None:
        """Raise ``CrossSiteRequest`` (403) for a state-changing request another site sent (``security.crossSite``)."""
        why = security.crossSite(request, self.origin)
        if why is not None:
            self.log.warn(
                "refused {method} {path} from another site ({why})",
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                why=why,
            )
            raise CrossSiteRequest()

    def csrfOK(self, request: IRequest, expected: str) -> bool:
        return security.tokensEqual(self.arg(request, "csrf"), expected)

    # -- pages -------------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    async def home(self, request: IRequest) -> bytes:
        who = await self.loggedIn(request)
        if who is None:
            return self.redirect(request, "/login")
        return await self.homePage(request, who)

    async def homePage(self, request: IRequest, who: LoggedIn, status: int = 200, **extra: Any) -> bytes:
        instances = await self.store.listInstancesOf(who.user.id)
        shared = await self.store.listInstancesSharedWith(who.user.id)
        images = await self.instances.images(who.user)
        names = {image.id: image.name for image in images}
        for instance in instances:
            if instance.image_id not in names:
                image = await self.store.imageById(instance.image_id)
                names[instance.image_id] = image.name if image else "?"
        schedulers = await self.store.schedulersFor(who.user.id)
        links = {i.id: [k for k in await self.store.listShareLinks(i.id) if not k.revoked] for i in instances}
        return self.render(
            request,
            "home.html",
            status,
            user=who.user,
            csrf=who.session.csrf,
            instances=instances,
            shared=shared,
            images=images,
            imageNames=names,
            schedulers=schedulers,
            links=links,
            quota=self.instances.quotaOf(who.user),
            **extra,
        )

    @app.route("/events", methods=["GET"])
    async def eventStream(self, request: IRequest) -> None | bytes:
        """
        Server-Sent Events: every change to an instance this person may see
        at the time of the change, while they watch and while their session
        lasts (``dit4c.portal.events.EventStreams``).
        """
        who = await self.loggedIn(request)
        if who is None:
            request.setResponseCode(401)
            return b""
        await self.streams.serve(request, who)
        return None

    @app.route("/share/<token>", methods=["GET"])
    async def followShareLink(self, request: IRequest, token: str) -> bytes:
        """A share link: once logged in, the person may use the instance."""
        who = await self.loggedIn(request)
        if who is None:
            return self.redirect(request, "/login?next=" + quote(f"/share/{token}", safe="/"))
        instance = await self.store.redeemShareLink(token, who.user.id)
        if instance is None:
            return self.render(
                request, "error.html", 404, user=who.user, csrf=who.session.csrf,
                title="Link not valid", message="This share link does not exist or was revoked.",
            )  # fmt: skip
        return self.redirect(request, "/")

    async def homeForm(self, request: IRequest, act: Callable[[LoggedIn], Awaitable[bytes | None]]) -> bytes:
        """
        A form on the home page: the person logged in and the CSRF token
        checked, then ``act``; its refusal (an ``InstanceError``) is shown
        on the page, else the browser goes back to it (or to the page
        ``act`` returned).
        """
        from dit4c.portal.instances import InstanceError

        who = await self.loggedIn(request)
        if who is None:
            return self.redirect(request, "/login")
        if not self.csrfOK(request, who.session.csrf):
            return await self.homePage(request, who, 400, error="The form expired; try again.")
        try:
            page = await act(who)
        except InstanceError as e:
            return await self.homePage(request, who, e.status, error=str(e))
        return page if page is not None else self.redirect(request, "/")

    @app.route("/instances", methods=["POST"])
    async def startInstance(self, request: IRequest) -> bytes:
        async def start(who: LoggedIn) -> None:
            await self.instances.start(
                who.user, self.arg(request, "image") or "", self.arg(request, "scheduler") or None
            )

        return await self.homeForm(request, start)

    @app.route("/instances/<instance_id>/<action>", methods=["POST"])
    async def instanceAction(self, request: IRequest, instance_id: str, action: str) -> bytes:
        async def act(who: LoggedIn) -> bytes | None:
            if action == "link":
                _, url = await self.sharing.createLink(who.user, instance_id)
                # The link is shown once, on this page: only its hash is kept.
                return await self.homePage(request, who, newLink=url, newLinkFor=instance_id)
            if action == "revoke-link":
                await self.sharing.revokeLink(who.user, instance_id, self.arg(request, "link") or "")
            elif action == "share":
                await self.instances.share(who.user, instance_id, self.arg(request, "user") or "")
            elif action == "unshare":
                await self.instances.unshare(who.user, instance_id, self.arg(request, "user") or "")
            else:
                await self.instances.act(who.user, instance_id, action)
            return None

        return await self.homeForm(request, act)

    @app.route("/images/<image_id>/<action>", methods=["POST"])
    async def imageAction(self, request: IRequest, image_id: str, action: str) -> bytes:
        """A saved image's owner shares it with someone, or deletes it."""

        async def act(who: LoggedIn) -> bytes | None:
            if action == "share":
                await self.sharing.shareImage(who.user, image_id, self.arg(request, "user") or "")
            elif action == "delete":
                await self.sharing.deleteImage(who.user, image_id)
            else:
                return await self.homePage(request, who, 404, error="There is no such action.")
            return None

        return await self.homeForm(request, act)

    @app.route("/login", methods=["GET"])
    async def loginPage(self, request: IRequest) -> bytes:
        if await self.loggedIn(request) is not None:
            return self.redirect(request, safeNext(self.arg(request, "next")))
        return self.loginForm(request, error=None)

    def loginForm(self, request: IRequest, error: str | None, status: int = 200, name: str = "") -> bytes:
        return self.render(
            request,
            "login.html",
            status,
            csrf=self.loginForms.token(request),
            error=error,
            name=name,
            next=safeNext(self.arg(request, "next")),
            providers=self.upstream.links(self.arg(request, "next")) if self.upstream else [],
            formTargets=continuationOrigins(safeNext(self.arg(request, "next"))),
        )

    @app.route("/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        try:
            self.refuseCrossSite(request)
        except CrossSiteRequest:
            return self.loginForm(request, "This login form was sent from another site. Log in here.", 403)
        if not await self.loginForms.check(request, self.arg(request, "csrf")):
            return self.loginForm(request, "Your login form expired; please try again.", 400)
        name = (self.arg(request, "username") or "").strip().lower()
        password = self.arg(request, "password") or ""
        address = self.proxies.clientAddress(request)
        wait = await self.throttle.claim(name, address)
        if wait > 0:
            return self.tooManyFailures(request, wait, address, name)
        user = await self.store.userByName(name) if name else None
        ok = await security.verifyPassword(user.password_hash if user else None, password)
        if not ok or user is None or user.disabled:
            # Only a name that exists is logged: a password typed into the name field is not.
            self.log.info(
                "failed login for {name} from {address}", name=user.name if user else "(no such user)", address=address
            )
            return self.loginForm(request, "Wrong user name or password.", 401, name)
        await self.throttle.succeeded(name, address)
        # A fresh session at every login: a session id planted before login
        # is worth nothing after it.
        old = self.cookies.get(request, security.SESSION_COOKIE)
        if old:
            await self.store.deleteSession(old.decode("ascii", "replace"))
        session = await self.store.createSession(user.id, self.config.sessionLifetime)
        self.cookies.set(request, security.SESSION_COOKIE, session.id, maxAge=self.config.sessionLifetime)
        self.cookies.clear(request, security.LOGIN_COOKIE)
        self.log.info("{name} logged in from {address}", name=user.name, address=address)
        return self.redirect(request, safeNext(self.arg(request, "next")))

    def tooManyFailures(self, request: IRequest, wait: float, address: str, name: str = "") -> bytes:
        """The login form, refused for now (429, with ``Retry-After``): too many recent failures from here."""
        self.log.warn(
            "login from {address} throttled for {wait:.0f} s after failures", address=address, wait=wait
        )
        security.setRetryAfter(request, wait)
        return self.loginForm(
            request,
            f"Too many failed logins from here. Try again in {security.waitText(wait)}.",
            429,
            name,
        )

    @app.route("/logout", methods=["POST"])
    async def logout(self, request: IRequest) -> bytes:
        who = await self.loggedIn(request)
        if who is not None:
            if not self.csrfOK(request, who.session.csrf):
                request.setResponseCode(400)
                return b"Bad CSRF token"
            await self.store.deleteSession(who.token)
            self.events.accessChanged(AccessChange(user=who.user.id, session=hashToken(who.token)))
        self.cookies.clear(request, security.SESSION_COOKIE)
        return self.redirect(request, "/login")

    # -- documents for other components ---------------------------------------------------

    @app.route("/.well-known/jwks.json", methods=["GET"])
    async def jwks(self, request: IRequest) -> bytes:
        """
        Every public key others must check: the portal's own (its ``kid`` is
        the key's thumbprint), each enabled scheduler's (``scheduler:<id>``)
        and each live instance's (``instance:<id>``). Public members only.
        """
        request.setHeader(b"cache-control", b"public, max-age=10")
        now = self.clock.seconds()
        cached = self._jwksCache
        if cached is None or now - cached[0] >= 10:
            cached = self._jwksCache = (now, await self._publishedKeys())
        return self.json(request, {"keys": list(self.keys.publicJWKs()) + cached[1]})

    def _readToken(self, image: Any) -> str:
        from dit4c.portal.reports import imageReadToken

        return imageReadToken(self, image)

    def _removeImageBytes(self, image: Any) -> Deferred[None]:
        """
        ``DELETE`` a deleted saved image's bytes at the image server, with a
        delete token the portal signs for that digest (60 s); the image
        server asks the portal, which allows it only while no saved image
        has that digest (docs/protocols.md 8.4).
        """
        import treq
        from twisted.web.http_headers import Headers

        from dit4c.portal.reports import DELETE_AUDIENCE

        token = self.keys.signer().sign(
            {"sub": image.digest, "digest": image.digest}, audience=DELETE_AUDIENCE, lifetime=60
        )

        async def remove() -> None:
            response = await treq.delete(
                image.ref, headers=Headers({"Authorization": [f"Bearer {token}"]}), timeout=10
            )
            await response.content()
            if response.code not in (204, 404):
                raise RuntimeError(f"the image server answered {response.code}")
            self.log.info("removed the bytes of deleted image {image} ({digest})", image=image.id, digest=image.digest)

        return Deferred.fromCoroutine(remove())

    def keysChanged(self) -> None:
        """
        An instance or scheduler key came or went: the next JWKS is made
        afresh (a routing server waits for a new instance's key).
        """
        self._jwksCache = None

    async def _publishedKeys(self) -> list[dict[str, Any]]:
        published: list[dict[str, Any]] = []
        for scheduler in await self.store.listSchedulers():
            if scheduler.disabled:
                continue
            key = publicMembers(scheduler.public_jwk, f"scheduler:{scheduler.id}")
            if key is not None:
                published.append(key)
            for instance in await self.store.listInstancesOfScheduler(scheduler.id):
                if instance.state in ACTIVE and instance.public_jwk:
                    key = publicMembers(instance.public_jwk, f"instance:{instance.id}")
                    if key is not None:
                        published.append(key)
        return published

    @app.route("/.well-known/openid-configuration", methods=["GET"])
    def discovery(self, request: IRequest) -> bytes:
        base = self.config.publicURL
        return self.json(
            request,
            {
                "issuer": base,
                "jwks_uri": f"{base}/.well-known/jwks.json",
                "authorization_endpoint": f"{base}/oauth/authorize",
                "token_endpoint": f"{base}/oauth/token",
                "userinfo_endpoint": f"{base}/oauth/userinfo",
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["none"],
                "id_token_signing_alg_values_supported": ["ES256"],
                "subject_types_supported": ["public"],
            },
        )

    @app.route("/static/", branch=True, methods=["GET"])
    def static(self, request: IRequest) -> Any:
        from twisted.web.static import File

        return File(str(Path(__file__).parent / "static"))

    @app.route("/api/v1/", branch=True)
    def apiResource(self, request: IRequest) -> Any:
        return self.api.app.resource()

    @app.route("/admin/", branch=True)
    def adminPages(self, request: IRequest) -> Any:
        return self.admin.app.resource()

    @app.route("/.dit4c/channel", methods=["GET"])
    def channel(self, request: IRequest) -> Any:
        if self.channelResource is None:
            from werkzeug.exceptions import NotFound

            raise NotFound()
        return self.channelResource

    @app.route("/login/", branch=True)
    def upstreamLogin(self, request: IRequest) -> Any:
        if self.upstream is None:
            from werkzeug.exceptions import NotFound

            raise NotFound()
        return self.upstream.app.resource()

    @app.route("/oauth/", branch=True)
    def oauthServer(self, request: IRequest) -> Any:
        return self.oauth.app.resource()

    @app.route("/reports/", branch=True)
    def reportEndpoints(self, request: IRequest) -> Any:
        return self.reports.app.resource()

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        return self.json(request, {"status": "ok"})

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Any) -> bytes:
        from werkzeug.exceptions import HTTPException

        if failure.check(HTTPException):
            code = failure.value.code
            title = failure.value.name
            return self.render(request, "error.html", code, title=title, message=failure.value.description)
        from dit4c.portal.http import loggableTarget

        self.log.failure("portal request failed: {uri}", failure, uri=loggableTarget(request.uri))
        return self.render(
            request, "error.html", 500, title="Something went wrong", message="The portal failed; try again."
        )


__all__ = ["Portal", "PortalConfig", "quote", "safeNext"]
