"""
``UpstreamLogin``: the Klein app at ``/login/`` that runs the authorization
code flow with a provider's ``Backend`` and logs the person in.

``GET /login/<provider>`` keeps the login's ``state``, ``nonce`` and PKCE
verifier in a short-lived flow cookie (a JWT signed with a key derived from
the client secret, so any portal process takes it) and sends the browser to
the provider; ``GET /login/<provider>/callback`` takes that cookie (once:
a state is spent), checks the answer against it, has the backend say who
the code belongs to, finds or signs up the user, and starts a session as
the local login does.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from typing import Any

import jwt
from klein import Klein
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from dit4c.common.nextpath import safeNext
from dit4c.common.pkce import codeChallenge
from dit4c.portal import security
from dit4c.portal.store.errors import Conflict, StoreClosed
from dit4c.portal.store.model import User
from dit4c.portal.web import arg, redirect

from .backend import Backend, ProviderHTTP, UpstreamIdentity
from .config import ProviderConfig, loginLinks
from .errors import (
    AccountDisabled,
    ConfigError,
    FlowExpired,
    FlowReplayed,
    NotRegistered,
    ProviderRefused,
    ProviderUnavailable,
    StateMismatch,
    TooManyFailures,
    UnknownProvider,
    UpstreamLoginError,
)
from .github import GitHub
from .host import LoginHost
from .names import baseLoginName, loginNameCandidates
from .oidc import OpenIDConnect

__all__ = ["FLOW_COOKIE", "FLOW_LIFETIME", "MAX_PARAMETER", "UpstreamLogin"]

#: The cookie that carries a login in progress from ``/login/<p>`` to its callback.
FLOW_COOKIE = b"dit4c_upstream_flow"

#: How long a person has to log in at the provider, in seconds.
FLOW_LIFETIME = 600.0

#: The largest callback parameter accepted (a code or state).
MAX_PARAMETER = 2048

_ERROR_CODE = re.compile(r"[a-z_]{1,64}")


class UpstreamLogin:
    """
    ``/login/<provider>`` and ``/login/<provider>/callback`` for each
    provider; mount at ``/login/`` (a Klein branch).

    ``host`` is what the login uses of the portal (``LoginHost``): the
    portal's service gives a ``LoginDoors``; the ``Portal`` itself will do.
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        host: LoginHost,
        providers: Sequence[ProviderConfig],
        httpClient: HTTPClient,
        *,
        clock: IReactorTime | None = None,
    ) -> None:
        self.host = host
        self.clock = clock if clock is not None else host.clock
        self.configs = {p.name: p for p in providers}
        if len(self.configs) != len(providers):
            raise ConfigError("two providers have the same name")
        self.backends: dict[str, Backend] = {}
        for p in providers:
            http = ProviderHTTP(p, httpClient, self.clock)
            self.backends[p.name] = (
                OpenIDConnect(p, http, self.clock) if p.kind == "oidc" else GitHub(p, http)
            )
        #: The state of each flow that came back, until its cookie expires:
        #: a callback replayed (even with its cookie) is refused here.
        self._used: dict[str, float] = {}
        #: New users are made one at a time, so that one identity makes one user.
        self._signup = DeferredLock()

    def links(self, next: str | None = None) -> list[tuple[str, str]]:
        return loginLinks(self.configs.values(), next)

    def redirectURI(self, name: str) -> str:
        return f"{self.host.config.publicURL}/login/{name}/callback"

    def _backend(self, name: str) -> Backend:
        backend = self.backends.get(name)
        if backend is None:
            raise UnknownProvider(reason=f"no provider {name!r}")
        return backend

    def _flowKey(self, config: ProviderConfig) -> bytes:
        # From the client secret: every portal process (and a restarted one)
        # has it, so a flow started at one is accepted at another.
        return hmac.new(
            config.clientSecret.encode(),
            b"dit4c upstream login flow:" + config.name.encode(),
            hashlib.sha256,
        ).digest()

    # -- the flow ------------------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    def index(self, request: IRequest) -> bytes:
        return redirect(request, "/login")

    @app.route("/<name>", methods=["GET"])
    async def start(self, request: IRequest, name: str) -> bytes:
        backend = self._backend(name)
        target = safeNext(arg(request, "next"))
        if await self.host.loggedIn(request) is not None:
            return self._redirect(request, target)
        state, nonce, verifier = (
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(48),
        )
        url = await backend.authorizationURL(
            self.redirectURI(name), state, nonce, codeChallenge(verifier)
        )
        now = self.clock.seconds()
        flow = {
            "p": name,
            "s": state,
            "n": nonce,
            "v": verifier,
            "next": target,
            "exp": int(now + FLOW_LIFETIME),
        }
        cookie = jwt.encode(flow, self._flowKey(backend.config), algorithm="HS256")
        self.host.cookies.set(request, FLOW_COOKIE, cookie, maxAge=FLOW_LIFETIME)
        return self._redirect(request, url)

    @app.route("/<name>/callback", methods=["GET"])
    async def callback(self, request: IRequest, name: str) -> bytes:
        """
        The provider's answer, throttled as password logins are: an answer
        that was forged, stale or replayed counts as a failed login from
        its address (``UpstreamLoginError.failure``), and an address with
        too many of them waits before its next answer is even read.
        """
        backend = self._backend(name)
        throttle, address = self.host.throttle, self.host.proxies.clientAddress(request)
        wait = await throttle.claim(None, address)
        if wait > 0:
            raise TooManyFailures(wait)
        try:
            page = await self._finish(request, name, backend)
        except UpstreamLoginError as e:
            if not e.failure:
                await throttle.succeeded(None, address)
            raise
        except BaseException:
            await throttle.succeeded(None, address)  # the portal failed, not the person
            raise
        await throttle.succeeded(None, address)
        return page

    async def _finish(self, request: IRequest, name: str, backend: Backend) -> bytes:
        flow = self._takeFlow(request, backend.config)
        state = self._param(request, "state")
        if not security.tokensEqual(state, flow["s"]):
            raise StateMismatch(reason="state differs from the flow cookie's")
        self._useOnce(flow["s"], flow["exp"])
        await backend.checkIssuer(self._param(request, "iss"))
        error = self._param(request, "error")
        if error is not None:
            raise self._refused(backend.config, error)
        code = self._param(request, "code")
        if not code:
            raise ProviderRefused(reason="callback without code or error")
        identity = await backend.identify(code, flow["v"], flow["n"], self.redirectURI(name))
        user = await self._userFor(identity, backend.config)
        await self._logIn(request, user)
        self.log.info(
            "{name} logged in through {provider} (subject {subject})",
            name=user.name,
            provider=identity.provider,
            subject=identity.subject,
        )
        return self._redirect(request, safeNext(flow["next"]))

    def _takeFlow(self, request: IRequest, config: ProviderConfig) -> dict[str, Any]:
        """The flow this browser started (its cookie, now spent), or ``FlowExpired``."""
        raw = self.host.cookies.get(request, FLOW_COOKIE)
        if not raw:
            raise FlowExpired(reason="no flow cookie")
        self.host.cookies.clear(request, FLOW_COOKIE)
        try:
            flow = jwt.decode(
                raw.decode("ascii"),
                self._flowKey(config),
                algorithms=["HS256"],
                # The portal's clock decides (checked below), not the wall clock.
                options={"verify_exp": False, "require": ["exp"]},
            )
        except (UnicodeDecodeError, jwt.PyJWTError) as e:
            raise FlowExpired(reason=f"flow cookie refused: {e}") from None
        if flow.get("p") != config.name:
            raise StateMismatch(reason=f"the flow was started for {flow.get('p')!r}")
        if not isinstance(flow.get("exp"), int) or flow["exp"] <= self.clock.seconds():
            raise FlowExpired(reason="flow cookie expired")
        if not all(isinstance(flow.get(k), str) for k in ("s", "n", "v", "next")):
            raise FlowExpired(reason="flow cookie incomplete")
        return flow

    def _useOnce(self, state: str, expires: float) -> None:
        now = self.clock.seconds()
        for old in [s for s, e in self._used.items() if e <= now]:
            del self._used[old]
        if state in self._used:
            raise FlowReplayed(reason="callback replayed")
        self._used[state] = expires

    @staticmethod
    def _param(request: IRequest, name: str) -> str | None:
        """A callback parameter: None if missing, repeated, longer than ``MAX_PARAMETER`` or not UTF-8."""
        values: list[bytes] | None = request.args.get(name.encode())
        if not values or len(values) != 1 or len(values[0]) > MAX_PARAMETER:
            return None
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            return None

    @staticmethod
    def _refused(config: ProviderConfig, error: str) -> ProviderRefused:
        code = error if _ERROR_CODE.fullmatch(error) else "unknown"
        if code == "access_denied":
            message = f"You did not allow logging in here with {config.label}."
        else:
            message = f"{config.label} did not log you in ({code})."
        return ProviderRefused(message, reason=f"provider error {code}")

    # -- users and sessions ----------------------------------------------------------------------

    async def _userFor(self, identity: UpstreamIdentity, config: ProviderConfig) -> User:
        store = self.host.store
        user = await store.userByIdentity(identity.provider, identity.subject)
        if user is None:
            if not config.allowSignup:
                raise NotRegistered(
                    reason=f"{identity.provider} subject {identity.subject} is not linked to a user"
                )
            user = await self._signup.run(lambda: Deferred.fromCoroutine(self._signUp(identity)))
        if user.disabled:
            raise AccountDisabled(reason=f"{user.name} is disabled")
        return user

    async def _signUp(self, identity: UpstreamIdentity) -> User:
        store = self.host.store
        user = await store.userByIdentity(identity.provider, identity.subject)
        if user is not None:
            return user  # another callback made it meanwhile
        base = baseLoginName(identity.nameHints)
        for name in loginNameCandidates(base):
            if await store.userByName(name) is not None:
                continue
            try:
                user = await store.createUser(
                    name, email=identity.email, display_name=identity.displayName or name
                )
                break
            except Conflict:
                continue
        else:
            raise ProviderUnavailable(
                "No free login name could be found for you.", reason=f"no free name for {base}"
            )
        try:
            await store.linkIdentity(user.id, identity.provider, identity.subject)
        except Conflict:
            # Linked by another portal process meanwhile: use that user, and
            # retire the one made here.
            await store.updateUser(user.id, disabled=True)
            linked = await store.userByIdentity(identity.provider, identity.subject)
            if linked is None:
                raise
            return linked
        self.log.info(
            "new user {name} signed up through {provider} (subject {subject})",
            name=user.name,
            provider=identity.provider,
            subject=identity.subject,
        )
        return user

    async def _logIn(self, request: IRequest, user: User) -> None:
        """A fresh session, exactly as the local login makes one."""
        host = self.host
        old = host.cookies.get(request, security.SESSION_COOKIE)
        if old:
            await host.store.deleteSession(old.decode("ascii", "replace"))
        lifetime = host.config.sessionLifetime
        session = await host.store.createSession(user.id, lifetime)
        host.cookies.set(request, security.SESSION_COOKIE, session.id, maxAge=lifetime)
        host.cookies.clear(request, security.LOGIN_COOKIE)

    def _redirect(self, request: IRequest, location: str) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        # The callback's URL holds a code: it goes to no one else.
        request.setHeader(b"referrer-policy", b"no-referrer")
        return redirect(request, location)

    # -- errors ---------------------------------------------------------------------------------------

    @app.handle_errors(UpstreamLoginError)
    def refused(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, UpstreamLoginError)
        self.log.warn(
            "login through {uri} refused: {error}: {reason}",
            uri=request.path.decode("ascii", "replace"),
            error=error.__class__.__name__,
            reason=error.reason,
        )
        body = self.host.render(
            request, "error.html", error.status, title=error.title, message=error.message
        )
        request.setHeader(b"referrer-policy", b"no-referrer")
        if isinstance(error, TooManyFailures):
            security.setRetryAfter(request, error.wait)
        return body

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Failure) -> bytes:
        if isinstance(failure.value, HTTPException):
            http = failure.value
            return self.host.render(
                request, "error.html", http.code or 500, title=http.name, message=http.description
            )
        if failure.check(StoreClosed):
            # A login that came as the portal stopped: no fault of anyone's.
            return self.host.render(
                request, "error.html", 503, title="Service Unavailable", message=str(failure.value)
            )
        self.log.failure("upstream login failed: {uri}", failure, uri=request.path)
        return self.host.render(
            request,
            "error.html",
            500,
            title="Something went wrong",
            message="The portal failed; try again.",
        )
