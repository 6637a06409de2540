"""
The portal's OAuth 2 authorization server: how an instance's auth helper
learns who is at the browser, and whether they may use the instance
(docs/protocols.md, "OAuth 2 for instances").

It is the authorization code flow (RFC 6749 section 4.1) with PKCE
(RFC 7636, ``S256`` only), for public clients only:

- a client is an instance: ``client_id`` is the instance id, and the one
  redirect URI it may use is ``<instance URL>.dit4c/callback``, compared as
  a string. A request naming any other is refused on a page shown to the
  person; it never becomes a redirect;
- ``GET /oauth/authorize`` gives a logged-in person who may use the
  instance a one-time code, valid for a minute and kept only as a hash;
- ``POST /oauth/token`` (server to server, no cookies) exchanges the code
  and its PKCE verifier for an access token: a JWT signed by the portal for
  the audience ``dit4c-instance:<id>``;
- ``GET /oauth/userinfo?instance=<id>`` checks such a token and asks the
  store again, now, whether its person may use the instance and whether
  the portal session the token was issued in still lives;
- ``GET /oauth/watch`` (the helper, signed with the instance's key) stays
  open and tells the helper, as it happens, that an access to its instance
  changed, so that it asks ``userinfo`` again at once: a share revoked, a
  person disabled or logged out loses the instance within seconds
  (``dit4c.portal.streams.InstanceWatches``).

``OAuthServer`` is a Klein app of its own, mounted by the portal at
``/oauth/``; it uses the portal's store, keys, login sessions and pages.

Why not oauthlib (4.0.1) or authlib (1.9.10): the two endpoints were built
on oauthlib's ``AuthorizationCodeGrant``, and authlib's grant was tried on
its own; neither is smaller or as strict here. Both ask their storage hooks synchronously
(oauthlib's ``RequestValidator``; authlib's ``query_client``,
``query_authorization_code``, ``save_authorization_code``) and the store
answers with Deferreds, so every lookup, and the atomic spending of the code
(``redeemOAuthCode``), has to happen before the library is called, which is
then left comparing what it was handed. On oauthlib, with the OAuth tests
passing unchanged, this module became 552 lines plus a 123-line validator
(675 against 547). And each library is laxer where this server is strict:

- oauthlib issues a refresh token unless told not to
  (``GrantTypeBase.refresh_token``); takes a missing
  ``code_challenge_method`` as ``plain`` and checks neither the challenge's
  form nor ``state`` (``AuthorizationCodeGrant.validate_authorization_request``);
  refuses duplicates of a few names only; sends a malformed authorization
  request back to the client with a ``302`` (``create_authorization_response``)
  where this server shows a page; and at the token endpoint asks
  ``validate_code`` (where a code would be spent) before it looks for
  ``code_verifier``, reports another redirect URI as ``invalid_request``
  rather than ``invalid_grant`` (``validate_token_request``), and
  invalidates a code only after the token is made (``create_token_response``).
- authlib, even with ``CodeChallenge(required=True)``, gives a code
  to an authorization request without ``code_challenge``
  (``CodeChallenge.validate_code_challenge``: ``required`` counts at the
  token endpoint only), defaults the method to ``plain``, takes 43 to 128
  characters, and compares the S256 challenge with ``==``; its
  ``AuthorizationCodeGrant.create_token_response`` deletes a code only after
  the token is made, so after a wrong verifier the same code still gives a
  token, and two concurrent exchanges can both find it; it answers with
  ``302`` and a code of its own, and refuses a request URL that is not
  ``https`` unless an environment variable says otherwise
  (``InsecureTransportError.check``).
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from dit4c.common import tokens
from dit4c.common.life import State
from dit4c.common.pkce import codeChallenge
from dit4c.common.tokens import TokenVerifier
from dit4c.portal.errors import (
    AccessDenied,
    InvalidAccessToken,
    InvalidGrant,
    InvalidRequest,
    OAuthError,
    ReportError,
    UnknownClient,
    UnsupportedGrantType,
)
from dit4c.portal.interfaces import Basics, InstanceTokenCheck, PageRenderer, SessionLookup
from dit4c.portal.keys import KeyRingKeySource
from dit4c.portal.reportrules import LEEWAY, MAX_JTI
from dit4c.portal.store.errors import StoreClosed
from dit4c.portal.streams import InstanceWatches
from dit4c.portal.web import loggableTarget

__all__ = [
    "AUDIENCE_PREFIX",
    "CALLBACK_PATH",
    "OAuthServer",
    "WATCH_AUDIENCE",
    "audienceFor",
    "redirectURIFor",
]

#: An access token for instance ``X`` has the audience ``dit4c-instance:X``.
AUDIENCE_PREFIX = "dit4c-instance:"

#: The audience of the token a helper signs with its instance's key to watch (6.6).
WATCH_AUDIENCE = "dit4c-portal-watch"

#: Where, under an instance's public URL, its auth helper takes the code.
CALLBACK_PATH = ".dit4c/callback"

#: How long an authorization code may wait to be exchanged, in seconds.
CODE_LIFETIME = 60.0

#: How long an access token is valid, in seconds, unless the server is told otherwise.
TOKEN_LIFETIME = 3600.0

MAX_STATE = 512
MAX_REDIRECT_URI = 2048
MAX_CODE = 256
#: The largest token request body read (a real one is a few hundred bytes).
MAX_TOKEN_REQUEST = 8192

#: RFC 6749 appendix A.5: ``state`` is visible ASCII and space.
_STATE = re.compile(rf"[\x20-\x7e]{{1,{MAX_STATE}}}")
#: RFC 7636 section 4.1: 43 to 128 unreserved characters.
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
#: RFC 7636 section 4.2: ``S256`` gives 32 bytes, 43 base64url characters.
_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
_CODE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_CODE}}}")


# -- the rules, without I/O ----------------------------------------------------------------------


def audienceFor(instanceId: str) -> str:
    """The audience of access tokens for an instance."""
    return AUDIENCE_PREFIX + instanceId


def redirectURIFor(instanceURL: str) -> str:
    """
    The one redirect URI of the instance at ``instanceURL``: for
    ``http://abc.localhost:8080/``, ``http://abc.localhost:8080/.dit4c/callback``.
    """
    if not instanceURL.endswith("/"):
        instanceURL += "/"
    return instanceURL + CALLBACK_PATH


def withQuery(uri: str, params: Mapping[str, str]) -> str:
    """``uri`` with ``params`` added to its query."""
    return uri + ("&" if "?" in uri else "?") + urlencode(params)


def _singleValues(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """
    Parameters by name. RFC 6749 section 3.1: none may be given twice, and
    one given without a value is as if it were not given.
    """
    found: dict[str, str] = {}
    for name, value in pairs:
        if name in found:
            raise InvalidRequest(f"{name} is given more than once")
        found[name] = value
    return {name: value for name, value in found.items() if value != ""}


def _queryParameters(request: IRequest) -> dict[str, str]:
    pairs: list[tuple[str, str]] = []
    for name, values in request.args.items():
        try:
            key = name.decode("utf-8")
            pairs.extend((key, value.decode("utf-8")) for value in values)
        except UnicodeDecodeError:
            raise InvalidRequest("parameters must be UTF-8") from None
    return _singleValues(pairs)


def _formParameters(request: IRequest) -> dict[str, str]:
    """The parameters of a form-encoded body; nothing from the URL (secrets stay out of URLs)."""
    contentType = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
    if contentType != b"application/x-www-form-urlencoded":
        raise InvalidRequest("the request body must be application/x-www-form-urlencoded")
    if b"?" in request.uri:
        raise InvalidRequest("parameters belong in the request body, not the URL")
    request.content.seek(0)
    body = request.content.read(MAX_TOKEN_REQUEST + 1)
    if len(body) > MAX_TOKEN_REQUEST:
        raise InvalidRequest(f"the request body is larger than {MAX_TOKEN_REQUEST} bytes")
    try:
        pairs = parse_qsl(
            body.decode("ascii"), keep_blank_values=True, errors="strict", max_num_fields=32
        )
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the request body is not a form") from None
    return _singleValues(pairs)


def _required(params: Mapping[str, str], name: str) -> str:
    value = params.get(name)
    if value is None:
        raise InvalidRequest(f"{name} is missing")
    return value


def _clientId(params: Mapping[str, str]) -> str:
    value = _required(params, "client_id")
    if tokens.INSTANCE_ID_RE.fullmatch(value) is None:
        raise UnknownClient("client_id is not an instance id")
    return value


# -- the server ----------------------------------------------------------------------------------


class OAuthServer:
    """
    The authorization, token and userinfo endpoints, as a Klein app to
    mount at ``mountedAt`` (its routes are relative to it).
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        basics: Basics,
        *,
        sessions: SessionLookup,
        pages: PageRenderer,
        instanceTokens: InstanceTokenCheck,
        mountedAt: str = "/oauth",
        codeLifetime: float = CODE_LIFETIME,
        tokenLifetime: float = TOKEN_LIFETIME,
    ) -> None:
        """
        :param sessions: who is logged in at the browser (authorization).
        :param pages: the pages a refused authorization is shown on.
        :param instanceTokens: the check of a watch's token, signed with the instance's key.
        """
        self.store = basics.store
        self.keys = basics.keys
        self.clock = basics.clock
        self.sessions = sessions
        self.pages = pages
        self.instanceTokens = instanceTokens
        self.mountedAt = mountedAt
        self.codeLifetime = codeLifetime
        self.tokenLifetime = tokenLifetime
        self.keySource = KeyRingKeySource(basics.keys)
        #: The helpers' open watches, told of every access change to their instance.
        self.watches = InstanceWatches(basics.store, basics.events, basics.clock)

    # -- answers ------------------------------------------------------------------------------

    @staticmethod
    def _noStore(request: IRequest) -> None:
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"pragma", b"no-cache")

    def _json(self, request: IRequest, body: object, status: int = 200) -> bytes:
        self._noStore(request)
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def _jsonError(self, request: IRequest, error: OAuthError) -> bytes:
        if isinstance(error, InvalidAccessToken):
            # RFC 6750 section 3.
            request.setHeader(
                b"www-authenticate",
                b'Bearer realm="dit4c", error="invalid_token", error_description="%s"'
                % error.description.replace('"', "'").encode("ascii", "replace"),
            )
        return self._json(request, {"error": error.error, "error_description": error.description}, error.status)

    def _errorPage(self, request: IRequest, error: OAuthError) -> bytes:
        return self.pages.render(
            request, "error.html", error.status, title="This link to an instance is not valid",
            message=error.description,
        )  # fmt: skip

    def _redirect(self, request: IRequest, location: str) -> bytes:
        self._noStore(request)
        request.setResponseCode(303)
        request.setHeader(b"location", location.encode("ascii"))
        # The code is in the Location: no page should pass it on as a referrer.
        request.setHeader(b"referrer-policy", b"no-referrer")
        return b""

    # -- authorization endpoint -------------------------------------------------------------------

    async def _checkClient(self, params: Mapping[str, str]) -> tuple[str, str]:
        """The instance and redirect URI named, if the URI is that instance's callback exactly."""
        clientId = _clientId(params)
        redirectURI = _required(params, "redirect_uri")
        instance = await self.store.instanceById(clientId)
        if instance is None or instance.state == State.DISCARDED:
            raise UnknownClient("There is no such instance.")
        if instance.url is None:
            raise UnknownClient("The instance has no public address yet; try again when it is running.")
        if (
            len(redirectURI) > MAX_REDIRECT_URI
            or not redirectURI.isascii()
            or redirectURI != redirectURIFor(instance.url)
        ):
            raise UnknownClient("The address to return to is not the instance's own.")
        return clientId, redirectURI

    @staticmethod
    def _checkAuthorizeRequest(params: Mapping[str, str]) -> tuple[str, str]:
        """The state and code challenge of an authorization request."""
        if params.get("response_type") != "code":
            raise InvalidRequest("response_type must be code")
        state = _required(params, "state")
        if _STATE.fullmatch(state) is None:
            raise InvalidRequest(f"state must be 1 to {MAX_STATE} visible ASCII characters")
        challenge = _required(params, "code_challenge")
        if params.get("code_challenge_method") != "S256":
            raise InvalidRequest("code_challenge_method must be S256")
        if _CHALLENGE.fullmatch(challenge) is None:
            raise InvalidRequest("code_challenge must be 43 base64url characters (S256)")
        return state, challenge

    @app.route("/authorize", methods=["GET"])
    async def authorize(self, request: IRequest) -> bytes:
        # Everything about the request is checked before anything else, and
        # every failure is a page here: a redirect goes only to a URI that
        # was checked to be the instance's own callback.
        try:
            params = _queryParameters(request)
            clientId, redirectURI = await self._checkClient(params)
            state, challenge = self._checkAuthorizeRequest(params)
        except OAuthError as e:
            self.log.info("authorization request refused: {reason}", reason=e.description)
            return self._errorPage(request, e)

        who = await self.sessions.loggedIn(request)
        if who is None:
            again = {
                "response_type": "code",
                "client_id": clientId,
                "redirect_uri": redirectURI,
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
            here = withQuery(f"{self.mountedAt}/authorize", again)
            return self._redirect(request, withQuery("/login", {"next": here}))

        user = who.user
        if not await self.store.mayUseInstance(user.id, clientId):
            self.log.info(
                "{name} may not use instance {instance}: access denied", name=user.name, instance=clientId
            )
            return self._redirect(
                request,
                withQuery(
                    redirectURI,
                    {
                        "error": "access_denied",
                        "error_description": AccessDenied().description,
                        "state": state,
                    },
                ),
            )
        # The code remembers the portal session it was asked in: the access
        # token made from it lasts only as long as that session (6.4).
        _, code = await self.store.createOAuthCode(
            clientId, redirectURI, user.id, challenge, self.codeLifetime, session=who.session.id
        )
        return self._redirect(request, withQuery(redirectURI, {"code": code, "state": state}))

    # -- token endpoint ---------------------------------------------------------------------------

    @app.route("/token", methods=["POST"])
    async def token(self, request: IRequest) -> bytes:
        try:
            return self._json(request, await self._exchange(_formParameters(request)))
        except OAuthError as e:
            self.log.info("token request refused: {error}: {reason}", error=e.error, reason=e.description)
            return self._jsonError(request, e)

    async def _exchange(self, params: Mapping[str, str]) -> dict[str, Any]:
        grantType = _required(params, "grant_type")
        if grantType != "authorization_code":
            raise UnsupportedGrantType()
        code = _required(params, "code")
        redirectURI = _required(params, "redirect_uri")
        clientId = _clientId(params)
        verifier = _required(params, "code_verifier")
        if _CODE.fullmatch(code) is None:
            raise InvalidGrant()
        if _VERIFIER.fullmatch(verifier) is None:
            raise InvalidRequest("code_verifier must be 43 to 128 characters of A-Z a-z 0-9 - . _ ~")

        # From here on the code is spent, whatever else is wrong.
        grant = await self.store.redeemOAuthCode(code)
        if grant is None:
            raise InvalidGrant()
        if grant.client_id != clientId or grant.redirect_uri != redirectURI:
            raise InvalidGrant("The authorization code was issued for another client_id or redirect_uri.")
        if not hmac.compare_digest(codeChallenge(verifier), grant.code_challenge):
            raise InvalidGrant("The code_verifier does not match the code_challenge.")
        user = await self.store.userById(grant.user_id)
        if user is None or user.disabled:
            raise InvalidGrant("The person this code was issued to can no longer log in.")
        if not await self.store.mayUseInstance(user.id, clientId):
            raise InvalidGrant("The person this code was issued to may no longer use this instance.")
        if grant.session_hash is None or not await self.store.sessionLive(grant.session_hash):
            raise InvalidGrant("The portal session this code was issued in has ended; log in again.")

        accessToken = self.keys.signer().sign(
            {"sub": user.id, "name": user.name, "sid": grant.session_hash},
            audience=audienceFor(clientId),
            lifetime=self.tokenLifetime,
        )
        self.log.info("{name} may use instance {instance}: access token issued", name=user.name, instance=clientId)
        return {"access_token": accessToken, "token_type": "Bearer", "expires_in": int(self.tokenLifetime)}

    # -- userinfo endpoint --------------------------------------------------------------------------

    @app.route("/userinfo", methods=["GET"])
    async def userinfo(self, request: IRequest) -> bytes:
        try:
            params = _queryParameters(request)
            instanceId = _required(params, "instance")
            if tokens.INSTANCE_ID_RE.fullmatch(instanceId) is None:
                raise InvalidRequest("instance is not an instance id")
            return self._json(request, await self._whoMayUse(request, instanceId))
        except OAuthError as e:
            return self._jsonError(request, e)

    async def _whoMayUse(self, request: IRequest, instanceId: str) -> dict[str, Any]:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, accessToken = header.partition(" ")
        accessToken = accessToken.strip()
        if scheme.lower() != "bearer" or not accessToken:
            raise InvalidAccessToken("A Bearer access token is required.")
        verifier = TokenVerifier(
            self.keySource, audience=audienceFor(instanceId), issuer=self.keys.issuer, clock=self.clock
        )
        try:
            claims = await verifier.verify(accessToken)
        except tokens.InvalidToken as e:
            raise InvalidAccessToken(f"The access token was refused: {e.reason}.") from None
        subject = claims.get("sub")
        if not isinstance(subject, str):
            raise InvalidAccessToken("The access token names nobody.")
        user = await self.store.userById(subject)
        if user is None or user.disabled:
            raise AccessDenied()
        session = claims.get("sid")
        if not isinstance(session, str) or not await self.store.sessionLive(session):
            # Logged out (or the session expired): the person logs in again.
            raise InvalidAccessToken("The portal session this access token was issued in has ended.")
        if not await self.store.mayUseInstance(subject, instanceId):
            raise AccessDenied()
        return {"sub": subject, "name": user.name, "instance": instanceId, "allowed": True}

    # -- the helpers' watches -------------------------------------------------------------------------

    @app.route("/watch", methods=["GET"])
    async def watch(self, request: IRequest) -> bytes | None:
        """
        An auth helper's watch of its instance (docs/protocols.md 6.6): a
        token signed with the instance's own key, then one JSON line per
        access change to the instance, for as long as the helper listens.
        """
        try:
            instanceId = await self._watcher(request)
        except OAuthError as e:
            self.log.info("watch refused: {reason}", reason=e.description)
            return self._jsonError(request, e)
        self._noStore(request)
        await self.watches.serve(request, instanceId)
        return None

    async def _watcher(self, request: IRequest) -> str:
        """The instance whose helper signed the watch request: its key, its audience, a fresh ``jti``."""
        if request.args:
            raise InvalidRequest("The watch takes no parameters.")
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise InvalidAccessToken("A Bearer token signed with the instance's key is required.")
        try:
            # The same check as an instance's reports (docs/protocols.md 8.1), for another audience.
            instance, claims = await self.instanceTokens.check(token, WATCH_AUDIENCE)
        except ReportError as e:
            raise InvalidAccessToken(e.reason) from None
        if instance.state == State.DISCARDED:
            raise AccessDenied("The instance is discarded.")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI:
            raise InvalidAccessToken(f"The token needs a jti claim of 1 to {MAX_JTI} characters.")
        if not await self.store.spendTokenId(instance.id, jti, float(claims["exp"]) + LEEWAY):
            raise InvalidAccessToken("This token was used before: its jti is spent.")
        return str(instance.id)

    # -- everything else ----------------------------------------------------------------------------

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Failure) -> bytes:
        if isinstance(failure.value, HTTPException):
            error = failure.value
            for name, value in error.get_headers():
                if name.lower() == "allow":
                    request.setHeader(b"allow", value.encode("ascii"))
            description = f"{error.name}."
            if error.code == 405:
                description = f"{request.method.decode('ascii', 'replace')} is not allowed here."
            return self._json(
                request, {"error": "invalid_request", "error_description": description}, error.code or 500
            )
        if failure.check(StoreClosed):
            # A request that came as the portal stopped: no fault of anyone's.
            return self._json(
                request, {"error": "temporarily_unavailable", "error_description": str(failure.value)}, 503
            )
        self.log.failure("OAuth request failed: {uri}", failure, uri=loggableTarget(request.uri))
        return self._json(
            request, {"error": "server_error", "error_description": "The portal failed; try again."}, 500
        )
