"""
The auth helper's reverse proxy: one :class:`AuthProxyProtocol` per
connection from the listener (a browser's connection, through the routing
server), and at most one connection to the tool behind it.

Each request head is parsed (httptools, through ``dit4c.common.httpfront``)
and checked before a byte of it reaches the tool: a valid session is
forwarded, with the helper's cookies removed and ``X-DIT4C-User`` set; a
browser without one is sent to log in at the portal; anything else is
answered here. Bodies are re-framed as parsed and streamed, responses pass
back untouched, and after an ``Upgrade`` the connection is a plain pipe. The
rules are in docs/protocols.md section 10.

While a head's check is under way (a key fetch, a question to the portal)
reading from the client is paused and what was already read is queued, so
nothing a client sends later can overtake a check.

Half-close is carried across as a direct connection to the tool would see
it: a client that has sent all it will (EOF after a forwarded request, or
in a raw pipe) has the tool hear EOF too, in order after what it sent, and
still gets the answer; the tool's EOF in a raw pipe reaches the client the
same way. The protocol runs over a TCP connection or, in the pod helper,
directly on a tunnel stream (``dit4c.podhelper``): both half-close.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httptools
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dit4c.auth import pages
from dit4c.auth.connections import Connections
from dit4c.auth.gate import ALLOWED, FORBIDDEN, Sessions, Verdict
from dit4c.auth.portal import PortalClient, PortalRefused
from dit4c.auth.session import (
    CALLBACK_PATH,
    FLOW_COOKIE,
    LOCAL_PREFIX,
    SESSION_COOKIE,
    FlowCookies,
    InvalidFlow,
    clearCookie,
    codeChallenge,
    isNavigation,
    parseCookies,
    publicBase,
    setCookie,
    stripCookies,
)
from dit4c.common.httpfront import (
    FrontLimits,
    HeadError,
    RequestHead,
    Upgraded,
    feedParser,
)
from dit4c.common.service import IConnectionTransport, noDelay
from dit4c.common.tokens import InvalidToken, TokenVerifier
from dit4c.tunnel.splice import halfClose

__all__ = ["AuthConfig", "AuthProxyFactory", "AuthProxyProtocol", "USER_HEADER"]

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


@dataclass
class _Request:
    method: bytes
    version: str
    head: RequestHead
    upgrade: bool
    keepAlive: bool
    hasBody: bool
    #: Decided: True forwards it, False drops its body (answered here).
    forward: bool = False


@implementer(IHalfCloseableProtocol)
class _ToolSide(Protocol):
    """The connection to the tool: whatever it answers goes to the client as is."""

    transport: IConnectionTransport

    def __init__(self, proxy: AuthProxyProtocol) -> None:
        self.proxy = proxy
        self.readClosed = False
        self.writeClosed = False

    def connectionMade(self) -> None:
        noDelay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.proxy.fromTool(data)

    def readConnectionLost(self) -> None:
        self.readClosed = True
        self.proxy.toolFinished(self)

    def writeConnectionLost(self) -> None:
        self.writeClosed = True
        if self.readClosed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.proxy.toolLost(self)


@implementer(IHalfCloseableProtocol)
class AuthProxyProtocol(Protocol):
    log = Logger()
    transport: IConnectionTransport

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.clock = config.clock
        self.limits = config.limits
        self._parser: Any = None
        self._head: RequestHead | None = None
        self._inHead = True
        self._headBytes = 0
        self._events: deque[tuple[str, Any]] = deque()
        self._current: _Request | None = None
        self._waiting = False
        self._pumping = False
        self._closing = False
        self._closed = False
        self._pausedForCheck = False
        self._raw = False
        self._tool: _ToolSide | None = None
        self._toolConnecting: Deferred[Any] | None = None
        #: Bytes from the tool since the last request was forwarded.
        self._toolReceived = 0
        self._headTimer: IDelayedCall | None = None
        self._idleTimer: IDelayedCall | None = None
        self.lastActivity = 0.0
        #: The client sent EOF; our own EOF to it has gone.
        self._readClosed = False
        self._writeClosed = False
        #: A request head has begun and is not complete.
        self._partialHead = False

    # -- connection life -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self._parser = httptools.HttpRequestParser(self)
        self.lastActivity = self.clock.seconds()
        self._headTimer = self.clock.callLater(self.limits.headTimeout, self._headTimedOut)
        self._idleTimer = self.clock.callLater(self.limits.idleTimeout, self._checkIdle)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.config.connections.ended(self)
        self._closing = True
        self._cancelTimers()
        self._parser = None
        self._events.clear()
        tool, self._tool = self._tool, None
        if tool is not None and tool.transport is not None:
            tool.transport.unregisterProducer()
            tool.transport.loseConnection()
        connecting, self._toolConnecting = self._toolConnecting, None
        if connecting is not None:
            connecting.cancel()

    def _cancelTimers(self) -> None:
        for timer in (self._headTimer, self._idleTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._headTimer = self._idleTimer = None

    def _headTimedOut(self) -> None:
        self._headTimer = None
        if self._inHead and not self._closing:
            self.log.info("closing a connection: request head not sent in time")
            self._answer(pages.page(408, "Request timeout", "The request was not sent in time.", close=True), close=True)

    def _checkIdle(self) -> None:
        self._idleTimer = None
        if self._raw or self._closing:
            return
        idle = self.clock.seconds() - self.lastActivity
        if idle >= self.limits.idleTimeout and not self._waiting:
            self._close()
        else:
            self._idleTimer = self.clock.callLater(max(self.limits.idleTimeout - idle, 0.1), self._checkIdle)

    def _close(self) -> None:
        """Close the client connection once what was written is sent."""
        if self._closed:
            return
        self._closed = self._closing = True
        self._cancelTimers()
        self._events.clear()
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _answer(self, response: bytes, close: bool) -> None:
        """Write a response of our own; ``close`` ends the connection after it."""
        self.transport.write(response)
        if close:
            self._close()

    # -- half-close ----------------------------------------------------------------------------------

    def readConnectionLost(self) -> None:
        """The client has sent all it will: the tool hears so once what came before is through (see ``eof``)."""
        self._readClosed = True
        if self._closing:
            return
        self._events.append(("eof", None))
        self._pump()

    def writeConnectionLost(self) -> None:
        self._writeClosed = True
        if self._readClosed:
            self._close()

    def _clientDone(self) -> None:
        """
        The client's EOF, in its turn: passed to the tool when the tool
        has its request (or the pipe is raw); otherwise nobody is left to
        answer, or a request was cut short, and the connection closes once
        our answers are written.
        """
        request = self._current
        tool = self._tool
        forwarded = self._raw or (request is not None and request.forward and not self._partialHead)
        if forwarded and tool is not None and tool.transport is not None:
            halfClose(tool.transport)
        else:
            self._close()

    # -- bytes from the client ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.lastActivity = self.clock.seconds()
        if self._raw:
            self._tool.transport.write(data)  # type: ignore[union-attr]
            return
        if self._parser is None:
            # Upgraded, waiting for its check: hold what follows the head.
            self._events.append(("raw", data))
        else:
            if self._inHead:
                self._headBytes += len(data)
            try:
                feedParser(self._parser, data)
            except Upgraded as e:
                self._parser = None
                self._events.append(("upgrade", e.rest))
            except HeadError as e:
                self._parser = None
                self._events.append(("refuse", e))
            except Exception:
                self.log.failure("request handling failed")
                self._parser = None
                self._events.append(("refuse", HeadError(500, "Internal error", "The auth helper failed.")))
            else:
                if self._inHead and self._headBytes > self.limits.maxHeadBytes + 65536:
                    self._parser = None
                    self._events.append(("refuse", HeadError(431, "Request Header Fields Too Large", "The request head is too large.")))
        self._pump()
        if self._waiting and not self._closing:
            # Read no more until the check is done (what was read is queued).
            self._pausedForCheck = True
            self.transport.pauseProducing()

    # -- httptools callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._inHead = True
        self._partialHead = True
        self._headBytes = 0
        self._head = RequestHead(self.limits)
        if self._headTimer is None:
            self._headTimer = self.clock.callLater(self.limits.headTimeout, self._headTimedOut)

    def on_url(self, url: bytes) -> None:
        self._head.onUrl(url)  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head.onHeader(name, value)  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        self._inHead = False
        self._partialHead = False
        if self._headTimer is not None:
            if self._headTimer.active():
                self._headTimer.cancel()
            self._headTimer = None
        parser = self._parser
        method = parser.get_method()
        if method == b"CONNECT":
            raise HeadError(405, "Method Not Allowed", "CONNECT is not supported.")
        head = self._head
        assert head is not None
        hasBody = head.chunked or any(
            n.lower() == b"content-length" and v.strip() not in (b"0", b"") for n, v in head.headers
        )
        self._events.append(
            (
                "head",
                _Request(method, parser.get_http_version(), head, parser.should_upgrade(), parser.should_keep_alive(), hasBody),
            )
        )

    def on_body(self, body: bytes) -> None:
        self._events.append(("body", body))

    def on_message_complete(self) -> None:
        self._events.append(("end", None))

    # -- the queue ------------------------------------------------------------------------------------

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._events and not self._waiting and not self._closing:
                kind, value = self._events.popleft()
                if kind == "head":
                    self._startRequest(value)
                elif kind == "body":
                    request = self._current
                    if request is not None and request.forward:
                        if request.head.chunked:
                            self._toToolSequence((b"%x\r\n" % len(value), value, b"\r\n"))
                        else:
                            self._toTool(value)
                elif kind == "end":
                    request = self._current
                    if request is not None and request.forward and request.head.chunked:
                        self._toTool(b"0\r\n\r\n")
                elif kind == "upgrade":
                    request = self._current
                    if request is not None and request.forward and request.upgrade:
                        self._raw = True
                        self._cancelTimers()
                        if value:
                            self._toTool(value)
                    else:
                        self._close()
                elif kind == "raw":
                    if self._raw:
                        self._toTool(value)
                elif kind == "eof":
                    self._clientDone()
                elif kind == "refuse":
                    self.log.info("request refused: {status} {why}", status=value.status, why=value.message)
                    self._answer(pages.page(value.status, value.title, value.message, close=True), close=True)
        finally:
            self._pumping = False

    def _toTool(self, data: bytes) -> None:
        if self._tool is not None and self._tool.transport is not None:
            self._tool.transport.write(data)

    def _toToolSequence(self, data: tuple[bytes, ...]) -> None:
        if self._tool is not None and self._tool.transport is not None:
            self._tool.transport.writeSequence(data)

    def _wait(self, start: Callable[[], Deferred[Any]]) -> None:
        """
        Hold the queue while the work ``start()`` begins does its part; that
        work ends by calling :meth:`_resume` (perhaps before ``start`` returns).
        """
        self._waiting = True
        try:
            d = start()
        except Exception:
            d = fail()

        def failed(failure: Failure) -> None:
            self.log.failure("request handling failed", failure)
            if not self._closing:
                self._answer(pages.page(500, "Internal error", "The auth helper failed.", close=True), close=True)
            self._resume()

        d.addErrback(failed)

    def _resume(self) -> None:
        self._waiting = False
        if not self._closing:
            self._pump()
        if self._pausedForCheck and not self._waiting and not self._closing:
            self._pausedForCheck = False
            self.transport.resumeProducing()

    # -- deciding ----------------------------------------------------------------------------------------

    def _startRequest(self, request: _Request) -> None:
        self._current = request
        target = request.head.target
        if target.startswith(LOCAL_PREFIX):
            self._wait(lambda: Deferred.fromCoroutine(self._local(request)))
            return
        token = self._sessionCookie(request)
        if token is None:
            self._unauthenticated(request, hadCookie=False)
            return
        self._wait(lambda: self.config.sessions.check(token).addCallback(self._checked, request))

    def _sessionCookie(self, request: _Request) -> str | None:
        for name, value in parseCookies(request.head.values(b"cookie")):
            if name == SESSION_COOKIE and value:
                try:
                    return value.decode("ascii")
                except UnicodeDecodeError:
                    return None
        return None

    def _secure(self, request: _Request) -> bool:
        proto = request.head.values(b"x-forwarded-proto")
        return bool(proto) and proto[0].strip().lower() == b"https"

    def _checked(self, verdict: Verdict, request: _Request) -> None:
        if self._closing:
            return
        if verdict.kind == ALLOWED and verdict.name:
            request.forward = True
            self.config.connections.forwarding(self, self._sessionCookie(request), self._revoked)
            self._forward(request, verdict.name)
            return
        if verdict.kind == FORBIDDEN:
            self._forbidden(request)
        else:
            self._unauthenticated(request, hadCookie=True)
        self._resume()

    def _revoked(self) -> None:
        """The portal no longer allows the session this connection forwards for: cut both legs now."""
        self._closed = self._closing = True
        self._cancelTimers()
        self._events.clear()
        self.transport.abortConnection()

    def _endsConnection(self, request: _Request) -> bool:
        """Whether an answer of ours to ``request`` must close: its body is not read."""
        return request.hasBody or request.upgrade or not request.keepAlive

    def _unauthenticated(self, request: _Request, hadCookie: bool) -> None:
        secure = self._secure(request)
        close = self._endsConnection(request)
        cookies: list[tuple[bytes, bytes]] = []
        if hadCookie:
            cookies.append((b"Set-Cookie", clearCookie(SESSION_COOKIE, secure=secure)))
        base = publicBase(request.head.hostHeader, self._firstHeader(request, b"x-forwarded-proto"))
        if base is None:
            self._answer(pages.page(400, "Bad request", "The request names no usable host.", close=True), close=True)
            return
        if isNavigation(request.method, request.head.headers, request.upgrade):
            try:
                next = request.head.target.decode("ascii")
            except UnicodeDecodeError:
                next = "/"
            flow, cookie = self.config.flows.start(next, self.clock.seconds())
            location = self.config.portal + "/oauth/authorize?" + urlencode(
                {
                    "response_type": "code",
                    "client_id": self.config.instance,
                    "redirect_uri": base + CALLBACK_PATH.decode(),
                    "state": flow.state,
                    "code_challenge": codeChallenge(flow.verifier),
                    "code_challenge_method": "S256",
                }
            )
            cookies.append((b"Set-Cookie", setCookie(FLOW_COOKIE, cookie, secure=secure, maxAge=self.config.flows.lifetime)))
            self._answer(pages.redirect(location, headers=cookies, close=close), close)
            return
        self._answer(
            pages.page(
                401,
                "Not logged in",
                "You are not logged in to this instance (or your login has expired). Load the page again to log in.",
                link=base + "/",
                linkText="Log in",
                headers=[(b"WWW-Authenticate", b'DIT4C realm="dit4c"'), *cookies],
                close=close,
                headOnly=request.method == b"HEAD",
            ),
            close,
        )

    def _forbidden(self, request: _Request) -> None:
        close = self._endsConnection(request)
        self._answer(
            pages.page(
                403,
                "You may not use this instance",
                "You are logged in to the portal, but this instance is not shared with you. "
                "Ask its owner to share it.",
                link=self.config.portal + "/",
                linkText="Go to the portal",
                headers=[(b"Set-Cookie", clearCookie(SESSION_COOKIE, secure=self._secure(request)))],
                close=close,
                headOnly=request.method == b"HEAD",
            ),
            close,
        )

    @staticmethod
    def _firstHeader(request: _Request, name: bytes) -> bytes | None:
        values = request.head.values(name)
        return values[0] if values else None

    # -- forwarding -------------------------------------------------------------------------------------

    def _forward(self, request: _Request, user: str) -> None:
        head = self._toolHead(request, user)
        if self._tool is not None:
            self._sendHead(head)
            self._resume()
            return
        connecting = self.config.tool.connect(_OneFactory(_ToolSide(self)))
        self._toolConnecting = connecting

        def connected(tool: _ToolSide) -> None:
            self._toolConnecting = None
            if self._closing:
                tool.transport.loseConnection()
                return
            self._tool = tool
            # Back-pressure both ways: a slow client pauses reading from the
            # tool, a slow tool pauses reading from the client.
            self.transport.registerProducer(tool.transport, True)
            tool.transport.registerProducer(self.transport, True)
            self._sendHead(head)
            self._resume()

        def failed(failure: Failure) -> None:
            self._toolConnecting = None
            if self._closing:
                return
            self.log.warn("cannot reach the tool: {why}", why=failure.getErrorMessage())
            self._answer(
                pages.page(502, "The tool is not answering", "The instance is running, but its tool does not take connections (yet). Try again in a moment.", close=True),
                close=True,
            )
            self._resume()

        connecting.addCallbacks(connected, failed)
        # ``failed`` handled it; ``connected`` errors go to ``_wait``'s errback.

    def _sendHead(self, head: bytes) -> None:
        self._toolReceived = 0
        self._toTool(head)

    def _toolHead(self, request: _Request, user: str) -> bytes:
        head = request.head
        parts = [request.method, b" ", head.target, b" HTTP/", request.version.encode(), b"\r\n"]
        chunked = head.chunked
        cookies: list[bytes] = []
        for name, value in head.headers:
            lname = name.lower()
            if lname == b"cookie":
                cookies.append(value)
                continue
            if lname in _DROP or (chunked and lname == b"content-length"):
                continue
            parts += (name, b": ", value, b"\r\n")
        kept = stripCookies(cookies, _OUR_COOKIES)
        if kept is not None:
            parts += (b"Cookie: ", kept, b"\r\n")
        parts += (USER_HEADER, b": ", user.encode("ascii", "replace"), b"\r\n\r\n")
        return b"".join(parts)

    def fromTool(self, data: bytes) -> None:
        self._toolReceived += len(data)
        self.lastActivity = self.clock.seconds()
        if self.transport is not None and not self._closing:
            self.transport.write(data)

    def toolFinished(self, tool: _ToolSide) -> None:
        """
        The tool sent EOF. In a raw pipe the client hears EOF too and may
        still send; otherwise its answer is complete and the connection
        ends (as :meth:`toolLost` says).
        """
        if tool is self._tool and self._raw and not self._closing:
            halfClose(self.transport)
            if tool.writeClosed or self._readClosed:
                tool.transport.loseConnection()
        else:
            tool.transport.loseConnection()

    def toolLost(self, tool: _ToolSide) -> None:
        if tool is not self._tool:
            return
        self._tool = None
        if self._closing:
            return
        if self._toolReceived == 0 and self._current is not None and self._current.forward:
            self.transport.write(
                pages.page(502, "The tool is not answering", "The tool closed the connection without answering.", close=True)
            )
        self._close()

    # -- /.dit4c/ -------------------------------------------------------------------------------------------

    async def _local(self, request: _Request) -> None:
        response, close = await self._localAnswer(request)
        if not self._closing:
            self._answer(response, close or self._endsConnection(request))
        self._resume()

    async def _localAnswer(self, request: _Request) -> tuple[bytes, bool]:
        path, _, query = request.head.target.partition(b"?")
        if path != CALLBACK_PATH:
            return pages.page(404, "Not found", "There is nothing here."), False
        if request.method != b"GET":
            return pages.page(405, "Method not allowed", "Only GET is allowed here.", headers=[(b"Allow", b"GET")]), False
        return await self._callback(request, query)

    def _callbackError(self, request: _Request, status: int, title: str, message: str) -> tuple[bytes, bool]:
        self.log.info("login refused at the callback: {title}: {message}", title=title, message=message)
        return (
            pages.page(
                status,
                title,
                message,
                link="/",
                linkText="Try again",
                headers=[(b"Set-Cookie", clearCookie(FLOW_COOKIE, secure=self._secure(request)))],
            ),
            False,
        )

    async def _callback(self, request: _Request, query: bytes) -> tuple[bytes, bool]:
        secure = self._secure(request)
        try:
            pairs = parse_qsl(query.decode("ascii"), keep_blank_values=True, strict_parsing=False, max_num_fields=16)
        except (UnicodeDecodeError, ValueError):
            return self._callbackError(request, 400, "Login failed", "The answer from the portal is malformed.")
        params: dict[str, str] = {}
        for name, value in pairs:
            if name in params:
                return self._callbackError(request, 400, "Login failed", f"The answer from the portal gives {name} twice.")
            params[name] = value
        flowCookie: bytes | None = None
        for cname, cvalue in parseCookies(request.head.values(b"cookie")):
            if cname == FLOW_COOKIE:
                flowCookie = cvalue
        try:
            flow = self.config.flows.check(flowCookie, params.get("state"), self.clock.seconds())
        except InvalidFlow as e:
            return self._callbackError(
                request, 400, "Login failed", f"{e} Logins must finish in the browser (and tab) that started them, within 10 minutes."
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
            return self._callbackError(request, 400, "Login failed", f"The portal answered with the error {shown}.")
        code = params.get("code", "")
        if not code:
            return self._callbackError(request, 400, "Login failed", "The answer from the portal has no code.")
        base = publicBase(request.head.hostHeader, self._firstHeader(request, b"x-forwarded-proto"))
        if base is None:
            return self._callbackError(request, 400, "Login failed", "The request names no usable host.")
        try:
            token = await self.config.portalClient.exchange(code, flow.verifier, base + CALLBACK_PATH.decode())
        except PortalRefused as e:
            return self._callbackError(request, 400, "Login failed", f"The portal refused the login ({e.error}). Try again.")
        except Exception as e:
            why = "no answer in time" if isinstance(e, TimeoutError) else (str(e) or type(e).__name__)
            self.log.warn("code exchange with the portal failed: {why}", why=why)
            return self._callbackError(request, 502, "The portal is not answering", f"The login could not be finished: {why}.")
        try:
            claims = await self.config.verifier.verify(token)
        except InvalidToken as e:
            self.log.warn("the portal's access token was refused: {reason}", reason=e.reason)
            return self._callbackError(request, 502, "Login failed", f"The portal's answer could not be checked ({e.reason}).")
        who = claims.get("name")
        if not isinstance(who, str) or not who:
            return self._callbackError(request, 502, "Login failed", "The portal's answer names nobody.")
        exp = float(claims["exp"])
        self.config.sessions.remember(token, who, exp)
        maxAge = max(int(exp - self.clock.seconds()), 1)
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
    noisy = False

    def __init__(self, config: AuthConfig) -> None:
        self.config = config

    def buildProtocol(self, addr: Any) -> AuthProxyProtocol:
        return AuthProxyProtocol(self.config)
