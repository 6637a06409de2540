"""
The auth helper's reverse proxy: one front connection
(:mod:`dit4c.common.frontconn`) per connection from the listener (a
browser's connection, through the routing server), with the auth helper's
rules (:class:`AuthRules`), and at most one connection to the tool behind it.

Every request head is parsed and checked before a byte of it reaches the
tool: a valid session is forwarded, with the helper's cookies removed and
``X-DIT4C-User`` set (on every request of the connection, until the tool
answered ``101`` to one that asked to switch protocols); a browser without
one is sent to log in at the portal; anything else is answered here. While
a check is under way (a key fetch, a question to the portal) the client is
not read, so nothing it sends later can overtake a check. The rules are in
docs/protocols.md section 10.

The protocol runs over a TCP connection or, in the pod helper, directly on
a tunnel stream (``dit4c.podhelper``): both half-close, and half-close is
carried across as a direct connection to the tool would see it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dit4c.auth import pages
from dit4c.auth.connections import Connections
from dit4c.auth.errors import InvalidFlow, PortalRefused
from dit4c.auth.gate import ALLOWED, FORBIDDEN, Sessions, Verdict
from dit4c.auth.portal import PortalClient
from dit4c.auth.session import (
    CALLBACK_PATH,
    FLOW_COOKIE,
    LOCAL_PREFIX,
    SESSION_COOKIE,
    FlowCookies,
    clearCookie,
    isNavigation,
    parseCookies,
    publicBase,
    setCookie,
    stripCookies,
)
from dit4c.common.errors import HeadError, InvalidToken
from dit4c.common.frontconn import (
    Answer,
    Forward,
    FrontMetrics,
    FrontProtocol,
    IFrontRules,
    UpstreamProtocol,
)
from dit4c.common.httpfront import FrontLimits, RequestHead
from dit4c.common.pkce import codeChallenge
from dit4c.common.tokens import TokenVerifier

__all__ = ["AuthConfig", "AuthProxyFactory", "AuthRules", "USER_HEADER"]

#: The header that tells the tool who is at the browser.
USER_HEADER = b"X-DIT4C-User"

_OUR_COOKIES = frozenset((SESSION_COOKIE, FLOW_COOKIE))
#: Headers never passed to the tool as the client sent them.
_DROP = frozenset((b"cookie", USER_HEADER.lower()))


@dataclass
class AuthConfig:
    """What every connection needs: the instance, the portal, the tool, the rules."""

    instance: str
    #: The portal's public URL (browsers go there), no trailing slash.
    portal: str
    flows: FlowCookies
    sessions: Sessions
    portalClient: PortalClient
    #: Checks the access token the portal gives at the callback.
    verifier: TokenVerifier
    tool: IStreamClientEndpoint
    clock: IReactorTime
    limits: FrontLimits
    #: Connections by the session they forward for: closed when it is revoked.
    connections: Connections = field(default_factory=Connections)
    #: The front's counters (requests, bytes, refusals by kind).
    metrics: FrontMetrics = field(default_factory=FrontMetrics)


@implementer(IFrontRules)
class AuthRules:
    """One client connection's rules: who may reach the tool, and as whom."""

    log = Logger()

    __slots__ = ("config", "transport")

    def __init__(self, config: AuthConfig, transport: Any) -> None:
        self.config = config
        self.transport = transport

    # -- deciding ----------------------------------------------------------------------------------

    def check(self, head: RequestHead) -> Forward | Answer | Deferred[Any]:
        if head.target.startswith(LOCAL_PREFIX):
            return Deferred.fromCoroutine(self._local(head))
        token = self._sessionCookie(head)
        if token is None:
            return self._unauthenticated(head, hadCookie=False)
        sessions = self.config.sessions
        verdict = sessions.known(token)
        if verdict is not None:
            return self._checked(verdict, head, token)
        return sessions.check(token).addCallback(self._checked, head, token)

    @staticmethod
    def _sessionCookie(head: RequestHead) -> str | None:
        for name, value in parseCookies(head.values(b"cookie")):
            if name == SESSION_COOKIE and value:
                try:
                    return value.decode("ascii")
                except UnicodeDecodeError:
                    return None
        return None

    @staticmethod
    def _secure(head: RequestHead) -> bool:
        proto = head.values(b"x-forwarded-proto")
        return bool(proto) and proto[0].strip().lower() == b"https"

    @staticmethod
    def _firstHeader(head: RequestHead, name: bytes) -> bytes | None:
        values = head.values(name)
        return values[0] if values else None

    def _checked(self, verdict: Verdict, head: RequestHead, token: str) -> Forward | Answer:
        if verdict.kind == ALLOWED and verdict.name:
            self.config.connections.forwarding(self, token, self.transport.abortConnection)
            return Forward(self._toolHead(head, verdict.name))
        if verdict.kind == FORBIDDEN:
            return self._forbidden(head)
        return self._unauthenticated(head, hadCookie=True)

    def _toolHead(self, head: RequestHead, user: str) -> bytes:
        """The head the tool gets: our cookies and any ``X-DIT4C-User`` removed, ours set."""
        extra: list[bytes] = []
        kept = stripCookies(head.values(b"cookie"), _OUR_COOKIES)
        if kept is not None:
            extra.append(b"Cookie: " + kept + b"\r\n")
        extra.append(USER_HEADER + b": " + user.encode("ascii", "replace") + b"\r\n")
        return head.rebuilt(_DROP, extra)

    def _unauthenticated(self, head: RequestHead, hadCookie: bool) -> Answer:
        secure = self._secure(head)
        close = head.endsConnection
        cookies: list[tuple[bytes, bytes]] = []
        if hadCookie:
            cookies.append((b"Set-Cookie", clearCookie(SESSION_COOKIE, secure=secure)))
        base = publicBase(head.hostHeader, self._firstHeader(head, b"x-forwarded-proto"))
        if base is None:
            return Answer(pages.page(400, "Bad request", "The request names no usable host.", close=True), close=True)
        if isNavigation(head.method, head.headers, head.upgrade):
            try:
                next = head.target.decode("ascii")
            except UnicodeDecodeError:
                next = "/"
            config = self.config
            flow, cookie = config.flows.start(next, config.clock.seconds())
            location = config.portal + "/oauth/authorize?" + urlencode(
                {
                    "response_type": "code",
                    "client_id": config.instance,
                    "redirect_uri": base + CALLBACK_PATH.decode(),
                    "state": flow.state,
                    "code_challenge": codeChallenge(flow.verifier),
                    "code_challenge_method": "S256",
                }
            )
            cookies.append((b"Set-Cookie", setCookie(FLOW_COOKIE, cookie, secure=secure, maxAge=config.flows.lifetime)))
            return Answer(pages.redirect(location, headers=cookies, close=close), close)
        return Answer(
            pages.page(
                401,
                "Not logged in",
                "You are not logged in to this instance (or your login has expired). Load the page again to log in.",
                link=base + "/",
                linkText="Log in",
                headers=[(b"WWW-Authenticate", b'DIT4C realm="dit4c"'), *cookies],
                close=close,
                headOnly=head.method == b"HEAD",
            ),
            close,
        )

    def _forbidden(self, head: RequestHead) -> Answer:
        close = head.endsConnection
        return Answer(
            pages.page(
                403,
                "You may not use this instance",
                "You are logged in to the portal, but this instance is not shared with you. "
                "Ask its owner to share it.",
                link=self.config.portal + "/",
                linkText="Go to the portal",
                headers=[(b"Set-Cookie", clearCookie(SESSION_COOKIE, secure=self._secure(head)))],
                close=close,
                headOnly=head.method == b"HEAD",
            ),
            close,
        )

    # -- the tool ---------------------------------------------------------------------------------------

    def connect(self, protocol: UpstreamProtocol) -> Deferred[Any]:
        """One connection to the tool per client connection, opened at the first request forwarded."""

        def failed(failure: Failure) -> None:
            self.log.warn("cannot reach the tool: {why}", why=failure.getErrorMessage())
            raise HeadError(
                502,
                "The tool is not answering",
                "The instance is running, but its tool does not take connections (yet). Try again in a moment.",
                "bad_gateway",
            )

        return self.config.tool.connect(_OneFactory(protocol)).addErrback(failed)

    def page(self, status: int, title: str, message: str) -> bytes:
        self.log.info("request refused: {status} {why}", status=status, why=message)
        return pages.page(status, title, message, close=True)

    def unanswered(self, reason: Failure | None) -> bytes:
        return pages.page(502, "The tool is not answering", "The tool closed the connection without answering.", close=True)

    def cut(self, reason: Failure | None) -> bool:
        return False

    def ended(self) -> None:
        self.config.connections.ended(self)

    # -- /.dit4c/ -------------------------------------------------------------------------------------------

    async def _local(self, head: RequestHead) -> Answer:
        response, close = await self._localAnswer(head)
        return Answer(response, close)

    async def _localAnswer(self, head: RequestHead) -> tuple[bytes, bool]:
        path, _, query = head.target.partition(b"?")
        if path != CALLBACK_PATH:
            return pages.page(404, "Not found", "There is nothing here."), False
        if head.method != b"GET":
            return pages.page(405, "Method not allowed", "Only GET is allowed here.", headers=[(b"Allow", b"GET")]), False
        return await self._callback(head, query)

    def _callbackError(self, head: RequestHead, status: int, title: str, message: str) -> tuple[bytes, bool]:
        self.log.info("login refused at the callback: {title}: {message}", title=title, message=message)
        return (
            pages.page(
                status,
                title,
                message,
                link="/",
                linkText="Try again",
                headers=[(b"Set-Cookie", clearCookie(FLOW_COOKIE, secure=self._secure(head)))],
            ),
            False,
        )

    async def _callback(self, head: RequestHead, query: bytes) -> tuple[bytes, bool]:
        secure = self._secure(head)
        try:
            pairs = parse_qsl(query.decode("ascii"), keep_blank_values=True, strict_parsing=False, max_num_fields=16)
        except (UnicodeDecodeError, ValueError):
            return self._callbackError(head, 400, "Login failed", "The answer from the portal is malformed.")
        params: dict[str, str] = {}
        for name, value in pairs:
            if name in params:
                return self._callbackError(head, 400, "Login failed", f"The answer from the portal gives {name} twice.")
            params[name] = value
        flowCookie: bytes | None = None
        for cname, cvalue in parseCookies(head.values(b"cookie")):
            if cname == FLOW_COOKIE:
                flowCookie = cvalue
        try:
            flow = self.config.flows.check(flowCookie, params.get("state"), self.config.clock.seconds())
        except InvalidFlow as e:
            return self._callbackError(
                head, 400, "Login failed", f"{e} Logins must finish in the browser (and tab) that started them, within 10 minutes."
            )
        error = params.get("error")
        if error == "access_denied":
            self.log.info("the portal denied access to this instance")
            return (
                pages.page(
                    403,
                    "You may not use this instance",
                    "You are logged in to the portal, but this instance is not shared with you. "
                    "Ask its owner to share it.",
                    link=self.config.portal + "/",
                    linkText="Go to the portal",
                    headers=[(b"Set-Cookie", clearCookie(FLOW_COOKIE, secure=secure))],
                ),
                False,
            )
        if error is not None:
            shown = "".join(c for c in error if c.isalnum() or c == "_")[:64]
            return self._callbackError(head, 400, "Login failed", f"The portal answered with the error {shown}.")
        code = params.get("code", "")
        if not code:
            return self._callbackError(head, 400, "Login failed", "The answer from the portal has no code.")
        base = publicBase(head.hostHeader, self._firstHeader(head, b"x-forwarded-proto"))
        if base is None:
            return self._callbackError(head, 400, "Login failed", "The request names no usable host.")
        try:
            token = await self.config.portalClient.exchange(code, flow.verifier, base + CALLBACK_PATH.decode())
        except PortalRefused as e:
            return self._callbackError(head, 400, "Login failed", f"The portal refused the login ({e.error}). Try again.")
        except Exception as e:
            why = "no answer in time" if isinstance(e, TimeoutError) else (str(e) or type(e).__name__)
            self.log.warn("code exchange with the portal failed: {why}", why=why)
            return self._callbackError(head, 502, "The portal is not answering", f"The login could not be finished: {why}.")
        try:
            claims = await self.config.verifier.verify(token)
        except InvalidToken as e:
            self.log.warn("the portal's access token was refused: {reason}", reason=e.reason)
            return self._callbackError(head, 502, "Login failed", f"The portal's answer could not be checked ({e.reason}).")
        who = claims.get("name")
        if not isinstance(who, str) or not who:
            return self._callbackError(head, 502, "Login failed", "The portal's answer names nobody.")
        exp = float(claims["exp"])
        self.config.sessions.remember(token, who, exp)
        maxAge = max(int(exp - self.config.clock.seconds()), 1)
        self.log.info("{name} logged in", name=who)
        return (
            pages.redirect(
                flow.next,
                headers=[
                    (b"Set-Cookie", setCookie(SESSION_COOKIE, token.encode("ascii"), secure=secure, maxAge=maxAge)),
                    (b"Set-Cookie", clearCookie(FLOW_COOKIE, secure=secure)),
                ],
            ),
            False,
        )


class _OneFactory(Factory):
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


class AuthProxyFactory(Factory):
    """The auth helper's connections: each one a front connection with :class:`AuthRules`."""

    noisy = False

    def __init__(self, config: AuthConfig) -> None:
        self.config = config

    def rulesFor(self, transport: Any) -> AuthRules:
        return AuthRules(self.config, transport)

    def buildProtocol(self, addr: Any) -> FrontProtocol:
        config = self.config
        return FrontProtocol(self.rulesFor, config.clock, config.limits, config.metrics)
