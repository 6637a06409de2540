"""
Who may connect to the file server, and whose storage they reach.

- The SSH user name is the instance id; the SSH key offered must be the
  instance's public key as the portal publishes it in its JWKS
  (``kid`` = ``instance:<id>``), and the client must prove it holds the
  private half (the SSH signature).
- The portal then says whose storage that is: ``POST
  <portal>/reports/file-access`` with the file server's secret
  (docs/protocols.md 13), answered ``200 {"allowed": true, "user": ...}``
  only while the instance is active. A new connection always asks; an open
  one asks again when its answer is older than ``cacheFor`` seconds, and is
  closed on a refusal.

Nothing here logs a key or the secret.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from treq.client import HTTPClient
from twisted.conch import error as conchError
from twisted.conch.ssh import keys
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from dit4c.common.errors import InvalidToken
from dit4c.common.portalhttp import portalHTTP, readJSON
from dit4c.common.tokens import INSTANCE_ID_RE, IKeySource
from dit4c.fileserver.errors import AccessRefused, PortalUnavailable
from dit4c.fileserver.metrics import FileServerMetrics
from dit4c.fileserver.sftp import IAccess

__all__ = ["ACCESS_PATH", "SECRET_HEADER", "Access", "InstanceKeyChecker", "PortalAsker"]

ACCESS_PATH = "/reports/file-access"
SECRET_HEADER = b"X-DIT4C-File-Server"
MAX_ANSWER = 64 * 1024
#: What a user id must look like to name a directory (the portal's ids are 16 URL-safe characters).
USER_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")


class PortalAsker:
    """Asks the portal at ``base`` (http(s) URL or ``unix:/path``) whose storage an instance reaches."""

    log = Logger()

    def __init__(self, reactor: Any, base: str, secret: str, *, timeout: float = 10.0, http: HTTPClient | None = None) -> None:
        self._reactor = reactor
        self.timeout = timeout
        if http is None:
            http, base = portalHTTP(reactor, base, timeout=timeout)
        self._http = http
        self.url = base.rstrip("/") + ACCESS_PATH
        self._secret = secret.strip().encode("utf-8")

    def owner(self, instance: str) -> Deferred[str]:
        """The id of the person whose storage ``instance`` may reach now."""
        d = Deferred.fromCoroutine(self._ask(instance))
        d.addTimeout(self.timeout, self._reactor)

        def failed(f: Any) -> Any:
            if f.check(AccessRefused, PortalUnavailable):
                return f
            raise PortalUnavailable(f"{type(f.value).__name__}")

        d.addErrback(failed)
        return d

    async def _ask(self, instance: str) -> str:
        response = await self._http.post(
            self.url,
            data=json.dumps({"instance": instance}).encode("utf-8"),
            headers=Headers({b"Content-Type": [b"application/json"], SECRET_HEADER: [self._secret]}),
            unbuffered=True,
        )
        _, answer = await readJSON(response, limit=MAX_ANSWER, failure=PortalUnavailable)
        if not isinstance(answer, dict):
            raise PortalUnavailable(f"The portal answered {response.code} with no decision.")
        given = answer.get("reason")
        reason = given if isinstance(given, str) else "no reason given"
        if response.code == 200 and answer.get("allowed") is True:
            user = answer.get("user")
            if not isinstance(user, str) or USER_ID_RE.fullmatch(user) is None:
                raise PortalUnavailable("The portal's answer names no usable user id.")
            return user
        if response.code == 403 and answer.get("allowed") is False:
            raise AccessRefused(reason[:500])
        self.log.error(
            "the portal refused the file server's question: {status} {error}",
            status=response.code, error=answer.get("error"),
        )  # fmt: skip
        raise PortalUnavailable(f"The portal answered {response.code}.")


@implementer(IAccess)
@dataclass
class Access:
    """
    A connection's right to one person's storage: the instance, its owner
    and when the portal last said so. :meth:`check` asks the portal again
    once the answer is older than ``cacheFor``.
    """

    instance: str
    user: str
    asker: PortalAsker
    clock: Any
    checkedAt: float
    cacheFor: float = 30.0
    revoked: bool = False

    log = Logger()

    def check(self) -> Deferred[None]:
        if self.revoked:
            return _refused()
        if self.clock.seconds() - self.checkedAt < self.cacheFor:
            return succeed(None)
        d = self.asker.owner(self.instance)

        def answered(user: str) -> None:
            if user != self.user:
                # The instance changed hands: this connection's storage is not its any more.
                raise AccessRefused("The instance belongs to someone else now.")
            self.checkedAt = self.clock.seconds()

        def refused(f: Any) -> None:
            if f.check(AccessRefused):
                self.revoked = True
                self.log.info(
                    "instance {instance} may no longer reach its storage: {reason}",
                    instance=self.instance, reason=str(f.value),
                )  # fmt: skip
                for callback in list(self.onRevoke):
                    callback()
            else:
                self.log.warn("could not ask the portal again about {instance}: {reason}", instance=self.instance, reason=str(f.value))
            raise PermissionError(13, "The portal does not allow this instance to reach the storage now.")

        return d.addCallbacks(answered, refused)

    def __post_init__(self) -> None:
        #: Called when the portal takes the access away (the connection closes).
        self.onRevoke: list[Any] = []


def _refused() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    d.errback(PermissionError(13, "The portal does not allow this instance to reach the storage now."))
    return d


@implementer(ICredentialsChecker)
class InstanceKeyChecker:
    """
    SSH public-key login as an instance: user name = instance id, key = the
    instance's published key (``keySource``, kid ``instance:<id>``),
    then the portal's answer (``asker``). The avatar id is an :class:`Access`.

    Each refusal is counted here, by why (``metrics``); an accepted login
    is counted once the realm has made its avatar (``StorageRealm``).
    """

    credentialInterfaces = (ISSHPrivateKey,)
    log = Logger()

    def __init__(
        self, keySource: IKeySource, asker: PortalAsker, clock: Any, *, cacheFor: float = 30.0, metrics: FileServerMetrics | None = None
    ) -> None:
        self.keySource = keySource
        self.asker = asker
        self.clock = clock
        self.cacheFor = cacheFor
        self.metrics = metrics if metrics is not None else FileServerMetrics()

    def _refusal(self, outcome: str, message: str) -> UnauthorizedLogin:
        """The login refused, counted as ``outcome``."""
        self.metrics.login(outcome)
        return UnauthorizedLogin(message)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: Any) -> Access:
        try:
            instance = credentials.username.decode("ascii")
        except UnicodeDecodeError:
            instance = ""
        if INSTANCE_ID_RE.fullmatch(instance) is None:
            raise self._refusal("bad_credentials", "The user name must be an instance id.")
        try:
            offered = keys.Key.fromString(credentials.blob)
        except (keys.BadKeyError, ValueError):
            raise self._refusal("bad_credentials", "Unusable key.") from None
        try:
            jwk = await self.keySource.getKey(f"instance:{instance}")
            published = keys.Key(jwk.key)
        except InvalidToken:
            self.log.info("login as {instance} refused: the portal publishes no key for it", instance=instance)
            raise self._refusal("bad_credentials", "The portal publishes no key for this instance.") from None
        if offered != published:
            self.log.info("login as {instance} refused: not the instance's key", instance=instance)
            raise self._refusal("bad_credentials", "That is not the instance's key.")
        if credentials.signature is None:
            # The client asks whether this key would do: it would.
            raise conchError.ValidPublicKey()
        if not offered.verify(credentials.signature, credentials.sigData):
            self.log.info("login as {instance} refused: bad signature", instance=instance)
            raise self._refusal("bad_credentials", "Bad signature.")
        try:
            user = await self.asker.owner(instance)
        except AccessRefused as e:
            self.log.info("login as {instance} refused by the portal: {reason}", instance=instance, reason=str(e))
            raise self._refusal("refused", str(e)) from None
        except PortalUnavailable as e:
            self.log.warn("login as {instance} refused: the portal could not be asked ({reason})", instance=instance, reason=str(e))
            raise self._refusal("portal_unavailable", "The portal could not be asked.") from None
        return Access(instance, user, self.asker, self.clock, self.clock.seconds(), self.cacheFor)
