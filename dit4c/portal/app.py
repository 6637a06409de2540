"""
The portal's web application (Klein): its own pages, the well-known
documents other components read, and the rooms mounted under it.

``Portal`` is where the rooms are built and their doors given: each part
(the administrators' pages, the REST API, the OAuth server, the reports)
gets only the collaborators it uses (``dit4c.portal.interfaces``), and none
imports this module. The app is a class whose methods are routes (klein's
"non-global state" pattern), so a test builds one around a store and
drives it through ``StubTreq(portal.app.resource())``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.static import File
from werkzeug.exceptions import HTTPException, NotFound

from dit4c.common.nextpath import safeNext
from dit4c.portal import security
from dit4c.portal.access import endSession
from dit4c.portal.account import AccountPages
from dit4c.portal.admin import AdminPages
from dit4c.portal.api import API
from dit4c.portal.downloads import ImageDownloads
from dit4c.portal.errors import CrossSiteRequest, InstanceError
from dit4c.portal.events import InstanceEvents
from dit4c.portal.files import Files
from dit4c.portal.instances import ICommandSink, Instances, NoChannel, Sharing
from dit4c.portal.interfaces import Basics
from dit4c.portal.jwks import KeyDirectory
from dit4c.portal.keys import KeyRing
from dit4c.portal.logstream import lastOf
from dit4c.portal.oauth import OAuthServer
from dit4c.portal.pageview import homeContext, sessionView
from dit4c.portal.reportrules import InstanceTokens, imageReadToken, removeImageBytes
from dit4c.portal.reports import Reports
from dit4c.portal.security import CookiePolicy
from dit4c.portal.sessions import LoggedIn, LoginSessions
from dit4c.portal.store.errors import StoreClosed
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import PageView
from dit4c.portal.streams import EventStreams
from dit4c.portal.upstream import UpstreamLogin
from dit4c.portal.web import Pages, arg, csrfOK, loggableTarget, redirect


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


def continuationOrigins(next: str) -> tuple[str, ...]:
    """
    Where a login that goes on to ``next`` may end up: for an OAuth
    authorization (an instance's auth helper sent the person to log in), the
    origin of its redirect URI, so that the browser may follow the login
    form's redirects back to the instance. The authorization endpoint still
    checks that URI against the instance's before it redirects anywhere.
    """
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


class Portal:
    app = Klein()
    log = Logger()

    def __init__(
        self,
        store: IStore,
        keys: KeyRing,
        config: PortalConfig,
        clock: IReactorTime,
        commands: ICommandSink | None = None,
        events: InstanceEvents | None = None,
    ) -> None:
        """
        :param commands: where instance commands go (the scheduler channel,
            ``dit4c.portal.channel.ChannelHub``); None: refused.
        :param events: the event bus (the scheduler channel's too); None: one of its own.
        """
        self.store = store
        self.keys = keys
        self.config = config
        self.clock = clock
        #: The one bus of instance and access changes (``dit4c.portal.events``).
        self.events = events if events is not None else InstanceEvents()
        #: What several rooms share: the store, the keys, the clock and the bus.
        self.basics = Basics(store, keys, clock, self.events)
        #: The pages' event streams (GET /events).
        self.streams = EventStreams(store, self.events, clock)
        self.instances = Instances(
            store,
            commands or NoChannel(),
            defaultQuota=config.defaultQuota,
            events=self.events,
            readToken=partial(imageReadToken, self.basics),
        )
        self.sharing = Sharing(self.instances, config.publicURL, removeBytes=partial(removeImageBytes, keys))
        self.downloads = ImageDownloads(store, partial(imageReadToken, self.basics))
        self.cookies = CookiePolicy(secure=config.secure, sessionLifetime=config.sessionLifetime)
        #: The portal's own origin, which state-changing requests must come from.
        self.origin = security.origin(config.publicURL)
        #: Who is logged in behind a request (and another site's requests refused).
        self.sessions = LoginSessions(store, self.cookies, self.origin)
        #: The HTML pages, from the package's templates.
        self.pages = Pages()
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
        #: The public keys others check tokens with (/.well-known/jwks.json), read afresh after
        #: every change from outside a request (a key published, an instance no longer active),
        #: in this portal process or another.
        self.keyDirectory = KeyDirectory(store, keys, clock)
        self.events.subscribeKeys(self.keyDirectory.keysChanged)
        instanceTokens = InstanceTokens(store, clock)
        #: The OAuth 2 authorization server for the instances' auth helpers, at /oauth/.
        self.oauth = OAuthServer(self.basics, sessions=self.sessions, pages=self.pages, instanceTokens=instanceTokens)
        #: Reports from instances' helpers, and the image server's question, at /reports/
        #: (no image server until ``self.reports.setImageServerSecret(...)``).
        self.reports = Reports(self.basics, instanceTokens=instanceTokens)
        #: The REST API at /api/v1/, and the administrators' pages at /admin/.
        self.api = API(
            store, sessions=self.sessions, instances=self.instances, sharing=self.sharing, events=self.events,
            keys=keys, publicURL=config.publicURL, clock=clock, downloads=self.downloads,
        )  # fmt: skip
        #: A person's storage: the Files page at /files and /api/v1/files (a file server set by ``PortalService``).
        self.files = self.api.files = Files(sessions=self.sessions, pages=self.pages, caller=self.api.caller)
        self.admin = AdminPages(
            store, sessions=self.sessions, pages=self.pages, events=self.events, keys=keys,
            instances=self.instances, sharing=self.sharing,
        )  # fmt: skip
        self.account = AccountPages(store, sessions=self.sessions, pages=self.pages, events=self.events)
        #: Login through GitHub / OpenID Connect providers, at /login/<provider>
        #: (a ``dit4c.portal.upstream.UpstreamLogin``), or None for none.
        self.upstream: UpstreamLogin | None = None
        #: The scheduler channel's WebSocket resource, served at /.dit4c/channel.
        self.channelResource: IResource | None = None

    # -- the portal as the upstream login's host (``upstream.LoginHost``) ------------------------

    def loggedIn(self, request: IRequest) -> Awaitable[LoggedIn | None]:
        """The person behind ``request`` (``sessions.LoginSessions.loggedIn``)."""
        return self.sessions.loggedIn(request)

    def render(
        self, request: IRequest, template: str, status: int = 200, *, formTargets: tuple[str, ...] = (), **context: Any
    ) -> bytes:
        """A page from a template (``web.Pages.render``)."""
        return self.pages.render(request, template, status, formTargets=formTargets, **context)

    def json(self, request: IRequest, body: object, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    # -- pages -------------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    async def home(self, request: IRequest) -> bytes:
        found = await sessionView(self.sessions, self.store, request)
        if found is None:
            return redirect(request, "/login")
        if found[0].user.password_reset:
            return redirect(request, "/account/")
        return await self.homePage(request, found[0], view=found[1])

    async def homePage(
        self, request: IRequest, who: LoggedIn, status: int = 200, view: PageView | None = None, **extra: Any
    ) -> bytes:
        """The instances page: what it lists read in one transaction (``IPageViews.pageView``)."""
        view = view or await self.store.pageView(user_id=who.user.id)
        if view is None:
            return redirect(request, "/login")
        context = homeContext(view) | extra
        quota = self.instances.quotaOf(who.user)
        return self.pages.render(request, "home.html", status, user=who.user, csrf=who.session.csrf, quota=quota, **context)

    @app.route("/instances/<instance_id>", methods=["GET"])
    async def instance(self, request: IRequest, instance_id: str) -> bytes:
        """One instance of the person's: its state and actions, who may use it, its share links."""
        who = await self.sessions.loggedIn(request)
        if who is None:
            return redirect(request, "/login?next=" + quote(f"/instances/{instance_id}", safe="/"))
        if who.user.password_reset:
            return redirect(request, "/account/")
        try:
            return await self.instancePage(request, who, instance_id)
        except InstanceError as e:
            return self.pages.render(
                request, "error.html", e.status, user=who.user, csrf=who.session.csrf, title="No such instance", message=str(e)
            )

    async def instancePage(
        self, request: IRequest, who: LoggedIn, instance_id: str, status: int = 200, **extra: Any
    ) -> bytes:
        instance = await self.instances.owned(who.user, instance_id)
        image = await self.store.imageById(instance.image_id)
        access = await self.instances.access(who.user, instance.id)
        links = [k for k in await self.sharing.links(who.user, instance.id) if not k.revoked]
        followers: dict[str, list[str]] = {}
        for grant in access:
            if grant.link_id is not None:
                followers.setdefault(grant.link_id, []).append(grant.name)
        return self.pages.render(
            request,
            "instance.html",
            status,
            user=who.user,
            csrf=who.session.csrf,
            instance=instance,
            toolName=image.name if image else "?",
            access=access,
            links=links,
            linkNumbers={k.id: n for n, k in enumerate(links, 1)},
            followers=followers,
            **extra,
        )

    @app.route("/instances/<instance_id>/output.txt", methods=["GET"])
    async def output(self, request: IRequest, instance_id: str) -> bytes:
        """The last part of the tool's output (``logstream.DOWNLOAD``), as a file for the owner."""
        who = await self.sessions.loggedIn(request)
        if who is None:
            return redirect(request, "/login?next=" + quote(f"/instances/{instance_id}", safe="/"))
        try:
            text, error = await lastOf(partial(self.instances.logs, who.user, instance_id))
        except InstanceError as e:
            return self.pages.render(request, "error.html", e.status, title="No such instance", message=str(e))
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"content-disposition", f'attachment; filename="{instance_id}.txt"'.encode())
        return (text + (f"\n[{error}]\n" if error else "")).encode()

    @app.route("/events", methods=["GET"])
    async def eventStream(self, request: IRequest) -> None | bytes:
        """
        Server-Sent Events: every change to an instance this person may see
        at the time of the change, while they watch and while their session
        lasts (``dit4c.portal.streams.EventStreams``).
        """
        who = await self.sessions.loggedIn(request)
        if who is None:
            request.setResponseCode(401)
            return b""
        await self.streams.serve(request, who)
        return None

    @app.route("/share/<token>", methods=["GET"])
    async def followShareLink(self, request: IRequest, token: str) -> bytes:
        """A share link: once logged in, the person may use the instance."""
        who = await self.sessions.loggedIn(request)
        if who is None:
            return redirect(request, "/login?next=" + quote(f"/share/{token}", safe="/"))
        instance = await self.store.redeemShareLink(token, who.user.id)
        if instance is None:
            return self.pages.render(
                request, "error.html", 404, user=who.user, csrf=who.session.csrf,
                title="Link not valid", message="This share link does not exist or was revoked.",
            )  # fmt: skip
        return redirect(request, "/")

    async def homeForm(
        self, request: IRequest, act: Callable[[LoggedIn], Awaitable[bytes | None]], instanceId: str | None = None
    ) -> bytes:
        """
        A form on the home page (or, with ``instanceId``, on that
        instance's page): the person logged in and the CSRF token checked,
        then ``act``; its refusal (an ``InstanceError``) is shown on the
        page, else the browser goes back to it (or to the page ``act``
        returned): after a POST, a redirect, so a reload sends nothing again.
        """
        who = await self.sessions.loggedIn(request)
        if who is None:
            return redirect(request, "/login")

        async def page(status: int, error: str) -> bytes:
            if instanceId is not None:
                try:
                    return await self.instancePage(request, who, instanceId, status, error=error)
                except InstanceError:
                    pass  # gone meanwhile (discarded): the home page says why
            return await self.homePage(request, who, status, error=error)

        if not csrfOK(request, who.session.csrf):
            return await page(400, "The form expired; try again.")
        try:
            done = await act(who)
        except InstanceError as e:
            return await page(e.status, str(e))
        if done is not None:
            return done
        return redirect(request, f"/instances/{instanceId}" if instanceId is not None else "/")

    @app.route("/instances", methods=["POST"])
    async def startInstance(self, request: IRequest) -> bytes:
        async def start(who: LoggedIn) -> None:
            await self.instances.start(
                who.user, arg(request, "image") or "", arg(request, "scheduler") or None
            )

        return await self.homeForm(request, start)

    @app.route("/instances/<instance_id>/<action>", methods=["POST"])
    async def instanceAction(self, request: IRequest, instance_id: str, action: str) -> bytes:
        async def act(who: LoggedIn) -> bytes | None:
            if action == "link":
                _, url = await self.sharing.createLink(who.user, instance_id)
                # The link is shown once, on this page: only its hash is kept.
                return await self.instancePage(request, who, instance_id, newLink=url)
            if action == "revoke-link":
                await self.sharing.revokeLink(who.user, instance_id, arg(request, "link") or "")
            elif action == "share":
                await self.instances.share(who.user, instance_id, arg(request, "user") or "")
            elif action == "unshare":
                await self.instances.unshare(who.user, instance_id, arg(request, "user") or "")
            else:
                await self.instances.act(who.user, instance_id, action)
            return None

        # Sharing is done on the instance's page; the other actions go back to where they came from.
        fromInstance = arg(request, "from") == "instance" or action in ("link", "revoke-link", "share", "unshare")
        return await self.homeForm(request, act, instance_id if fromInstance else None)

    @app.route("/images/<image_id>/download", methods=["GET"])
    async def downloadImage(self, request: IRequest, image_id: str) -> bytes | None:
        """A saved image of the person's, or shared with them, as a file."""
        who = await self.sessions.loggedIn(request)
        if who is None:
            return redirect(request, "/login?next=/")
        try:
            return await self.downloads.send(request, who.user, image_id)
        except InstanceError as e:
            return self.pages.render(request, "error.html", e.status, user=who.user, csrf=who.session.csrf, title="No download", message=str(e))

    @app.route("/images/<image_id>/<action>", methods=["POST"])
    async def imageAction(self, request: IRequest, image_id: str, action: str) -> bytes:
        """A saved image's owner shares it with someone, or deletes it."""

        async def act(who: LoggedIn) -> bytes | None:
            if action == "share":
                await self.sharing.shareImage(who.user, image_id, arg(request, "user") or "")
            elif action == "rename":
                await self.sharing.renameImage(who.user, image_id, arg(request, "name") or "")
            elif action == "delete":
                await self.sharing.deleteImage(who.user, image_id)
            else:
                return await self.homePage(request, who, 404, error="There is no such action.")
            return None

        return await self.homeForm(request, act)

    @app.route("/login", methods=["GET"])
    async def loginPage(self, request: IRequest) -> bytes:
        if await self.sessions.loggedIn(request) is not None:
            return redirect(request, safeNext(arg(request, "next")))
        return self.loginForm(request, error=None)

    def loginForm(self, request: IRequest, error: str | None, status: int = 200, name: str = "") -> bytes:
        return self.pages.render(
            request,
            "login.html",
            status,
            csrf=self.loginForms.token(request),
            error=error,
            name=name,
            next=safeNext(arg(request, "next")),
            providers=self.upstream.links(arg(request, "next")) if self.upstream else [],
            formTargets=continuationOrigins(safeNext(arg(request, "next"))),
        )

    @app.route("/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        try:
            self.sessions.refuseCrossSite(request)
        except CrossSiteRequest:
            return self.loginForm(request, "This login form was sent from another site. Log in here.", 403)
        if not await self.loginForms.check(request, arg(request, "csrf")):
            return self.loginForm(request, "Your login form expired; please try again.", 400)
        name = (arg(request, "username") or "").strip().lower()
        password = arg(request, "password") or ""
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
        if user.password_reset:
            # An administrator set this password: the person chooses their own first.
            return redirect(request, "/account/")
        return redirect(request, safeNext(arg(request, "next")))

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
        who = await self.sessions.loggedIn(request)
        if who is not None:
            if not csrfOK(request, who.session.csrf):
                request.setResponseCode(400)
                return b"Bad CSRF token"
            await endSession(self.store, self.events, who)
        self.cookies.clear(request, security.SESSION_COOKIE)
        return redirect(request, "/login")

    # -- documents for other components ---------------------------------------------------

    @app.route("/.well-known/jwks.json", methods=["GET"])
    async def jwks(self, request: IRequest) -> bytes:
        """Every public key others must check (``jwks.KeyDirectory``)."""
        request.setHeader(b"cache-control", b"public, max-age=10")
        return self.json(request, await self.keyDirectory.document())

    def keysChanged(self) -> None:
        """
        An instance or scheduler key came or went: the next JWKS is made
        afresh (a routing server waits for a new instance's key).
        """
        self.keyDirectory.keysChanged()

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
    def static(self, request: IRequest) -> IResource:
        return File(str(Path(__file__).parent / "static"))

    @app.route("/api/v1/", branch=True)
    def apiResource(self, request: IRequest) -> IResource:
        return self.api.app.resource()

    @app.route("/account/", branch=True)
    def accountPages(self, request: IRequest) -> IResource:
        return self.account.app.resource()

    @app.route("/files", branch=True)
    def filePages(self, request: IRequest) -> IResource:
        return self.files.pages.resource()

    @app.route("/admin/", branch=True)
    def adminPages(self, request: IRequest) -> IResource:
        return self.admin.app.resource()

    @app.route("/.dit4c/channel", methods=["GET"])
    def channel(self, request: IRequest) -> IResource:
        if self.channelResource is None:
            raise NotFound()
        return self.channelResource

    @app.route("/login/", branch=True)
    def upstreamLogin(self, request: IRequest) -> IResource:
        if self.upstream is None:
            raise NotFound()
        return self.upstream.app.resource()

    @app.route("/oauth/", branch=True)
    def oauthServer(self, request: IRequest) -> IResource:
        return self.oauth.app.resource()

    @app.route("/reports/", branch=True)
    def reportEndpoints(self, request: IRequest) -> IResource:
        return self.reports.app.resource()

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        return self.json(request, {"status": "ok"})

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Failure) -> bytes:
        if isinstance(failure.value, HTTPException):
            http = failure.value
            return self.pages.render(request, "error.html", http.code or 500, title=http.name, message=http.description)
        if failure.check(StoreClosed):
            # A request that came as the portal stopped: no fault of anyone's.
            return self.pages.render(request, "error.html", 503, title="Service Unavailable", message=str(failure.value))
        self.log.failure("portal request failed: {uri}", failure, uri=loggableTarget(request.uri))
        return self.pages.render(
            request, "error.html", 500, title="Something went wrong", message="The portal failed; try again."
        )


__all__ = ["Portal", "PortalConfig", "quote", "safeNext"]
