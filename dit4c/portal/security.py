"""
What keeps the portal's pages safe: password hashing, login throttling,
the client's address behind trusted proxies, session cookies and CSRF
tokens.

Passwords are hashed with Argon2id (argon2-cffi, the reference binding),
off the reactor thread because hashing is deliberately slow. Session and
CSRF tokens are random 256-bit values; the store keeps only their hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from urllib.parse import urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.web.iweb import IRequest

from dit4c.common.errors import InvalidToken
from dit4c.common.tokens import TokenVerifier
from dit4c.portal.keys import KeyRing, KeyRingKeySource
from dit4c.portal.store.interfaces import ILoginFailures

#: Cookie names as the portal sets them over http; over https each is
#: ``__Host-`` + the name (``CookiePolicy.name``).
SESSION_COOKIE = b"dit4c_session"
#: Before login: the browser's pre-login id, which the login form's token is bound to.
LOGIN_COOKIE = b"dit4c_login"

#: The audience of the login form's token (``LoginForms``): it is good for nothing else.
LOGIN_FORM_AUDIENCE = "dit4c-login-form"
#: Seconds a login form may be left open before it is sent.
LOGIN_FORM_LIFETIME = 3600.0

_hasher = PasswordHasher()


@cache
def _dummyHash() -> str:
    """
    Verified against when a user does not exist, so that a login for an
    unknown name costs as long as one for a known name. Made at the first
    login, not at import: hashing costs about 0.2 s of CPU, which every
    program that imports this module (``dit4c user-add`` too) would pay.
    """
    return _hasher.hash(secrets.token_urlsafe(16))


def newToken() -> str:
    return secrets.token_urlsafe(32)


def tokensEqual(a: str | bytes | None, b: str | bytes | None) -> bool:
    if not a or not b:
        return False
    if isinstance(a, str):
        a = a.encode()
    if isinstance(b, str):
        b = b.encode()
    return hmac.compare_digest(a, b)


async def hashPassword(password: str) -> str:
    return await deferToThread(_hasher.hash, password)


async def verifyPassword(stored: str | None, password: str) -> bool:
    """Check a password in a thread; an unknown user costs the same."""

    def check() -> bool:
        try:
            return _hasher.verify(stored or _dummyHash(), password) and stored is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    return await deferToThread(check)


def passwordProblem(password: str) -> str | None:
    """Why a new password is refused, or None."""
    if len(password) < 10:
        return "Passwords must have at least 10 characters."
    if len(password) > 1024:
        return "Passwords may have at most 1024 characters."
    return None


@dataclass(frozen=True)
class CookiePolicy:
    """
    How the portal's cookies are set and read: host-only (no ``Domain``),
    ``Path=/``, HttpOnly, and when the portal is served over TLS, Secure and
    named ``__Host-<name>``. A browser takes a ``__Host-`` cookie only from
    a secure page of the portal's own host, never with a ``Domain``: another
    host under the same parent domain (an instance at
    ``*.apps.example.org`` beside ``portal.example.org``) cannot plant one,
    though it can plant a cookie of any other name for the whole parent
    domain. So the portal reads only the names it sets.
    """

    secure: bool
    sessionLifetime: float = 12 * 3600.0

    def name(self, base: bytes) -> bytes:
        return b"__Host-" + base if self.secure else base

    def get(self, request: IRequest, base: bytes) -> bytes | None:
        value: bytes | None = request.getCookie(self.name(base))
        return value

    def set(self, request: IRequest, base: bytes, value: str, *, maxAge: float | None, sameSite: bytes = b"Lax") -> None:
        parts = [self.name(base) + b"=" + value.encode(), b"Path=/", b"HttpOnly", b"SameSite=" + sameSite]
        if maxAge is not None:
            parts.append(b"Max-Age=%d" % int(maxAge))
        if self.secure:
            parts.append(b"Secure")
        request.responseHeaders.addRawHeader(b"set-cookie", b"; ".join(parts))

    def clear(self, request: IRequest, base: bytes) -> None:
        self.set(request, base, "", maxAge=0)


class LoginForms:
    """
    CSRF for the login form, before there is a session. The browser gets a
    pre-login id (a random 256-bit value) in the ``LOGIN_COOKIE`` cookie
    (``__Host-`` over https, SameSite=Strict); the form carries a token the
    portal signs (ES256, audience ``LOGIN_FORM_AUDIENCE``, an hour) over
    that id's SHA-256. A login is taken only with a token that the portal
    signed for the very id the cookie holds, so a form another site posts
    needs the victim's own cookie, which it can neither read nor (with
    ``__Host-``) plant. The binding is checked with the portal's keys: any
    portal process checks a form another made, and nothing is stored.
    """

    def __init__(self, keys: KeyRing, cookies: CookiePolicy) -> None:
        self.keys = keys
        self.cookies = cookies
        # Checked by the clock the keys sign with.
        self.verifier = TokenVerifier(
            KeyRingKeySource(keys), audience=LOGIN_FORM_AUDIENCE, issuer=keys.issuer, clock=keys.clock
        )

    @staticmethod
    def _preLoginId(value: bytes | None) -> str | None:
        if not value or len(value) != 43:
            return None
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            return None
        return text if all(c.isalnum() or c in "-_" for c in text) else None

    @staticmethod
    def _bound(preLogin: str) -> str:
        return hashlib.sha256(b"dit4c pre-login:" + preLogin.encode("ascii")).hexdigest()

    def token(self, request: IRequest) -> str:
        """The token for a login form in answer to ``request``, setting the pre-login cookie if it has none."""
        preLogin = self._preLoginId(self.cookies.get(request, LOGIN_COOKIE))
        if preLogin is None:
            preLogin = newToken()
        # Set again each time, so the cookie lasts as long as the newest form.
        self.cookies.set(request, LOGIN_COOKIE, preLogin, maxAge=LOGIN_FORM_LIFETIME, sameSite=b"Strict")
        signer = self.keys.signer()
        return str(signer.sign({"sub": self._bound(preLogin)}, audience=LOGIN_FORM_AUDIENCE, lifetime=LOGIN_FORM_LIFETIME))

    async def check(self, request: IRequest, token: str | None) -> bool:
        """Whether ``token`` (the form's) was made by the portal for this browser's pre-login id."""
        preLogin = self._preLoginId(self.cookies.get(request, LOGIN_COOKIE))
        if preLogin is None or not token:
            return False
        try:
            claims = await self.verifier.verify(token)
        except InvalidToken:
            return False
        return tokensEqual(str(claims.get("sub", "")), self._bound(preLogin))


# -- requests from other sites ---------------------------------------------------------------------------

#: Methods that change nothing: never refused for where they came from.
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})


def origin(url: str) -> str:
    """The origin of ``url`` as a browser writes it in ``Origin``: ``scheme://host[:port]``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def crossSite(request: IRequest, ownOrigin: str) -> str | None:
    """
    Why a state-changing request is refused as sent by another site, or
    None. The browser says where a request comes from: ``Sec-Fetch-Site``
    must be ``same-origin`` (or ``none``, the person's own doing); a
    ``same-site`` request, from a sibling host under the same parent
    domain, is refused like a ``cross-site`` one. A browser that sends no
    ``Sec-Fetch-Site`` sends ``Origin`` on every POST: it must be the
    portal's. A request with neither (not from a browser, or a very old
    one) passes this check and meets the CSRF token alone.
    """
    if request.method in SAFE_METHODS:
        return None
    site = request.getHeader(b"sec-fetch-site")
    if site is not None:
        site = site.strip().lower()
        if site in (b"same-origin", b"none"):
            return None
        return f"Sec-Fetch-Site: {site.decode('latin-1')[:32]}"
    sent = request.getHeader(b"origin")
    if sent is not None:
        text = sent.decode("latin-1").strip().lower()
        if text == ownOrigin:
            return None
        return f"Origin: {text[:200]}"
    return None


# -- the client's address ----------------------------------------------------------------------------

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: How a peer on a Unix socket is named: it has no IP address.
UNIX_PEER = "unix"


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address as written in ``X-Forwarded-For`` (``[v6]:port`` and ``v4:port`` too), or None."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """
    The reverse proxies whose ``X-Forwarded-For`` the portal believes:
    addresses or networks (``10.0.0.0/8``, ``::1``), and ``unix`` for a
    proxy that connects over a Unix socket. With none, the client is the
    peer of the connection and ``X-Forwarded-For`` is ignored, since anyone
    can send it.
    """

    def __init__(self, specs: Iterable[str] = ()) -> None:
        self.networks: list[IPNetwork] = []
        self.unix = False
        for spec in specs:
            if spec.strip().lower() == UNIX_PEER:
                self.unix = True
                continue
            try:
                self.networks.append(ipaddress.ip_network(spec.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"{spec!r} is not an IP address or network (e.g. 10.0.0.0/8), nor 'unix'"
                ) from None

    def trusts(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self.networks)

    def clientAddress(self, request: IRequest) -> str:
        """
        The address a request came from: the peer, unless the peer is a
        trusted proxy; then ``X-Forwarded-For`` is read from the right
        (each proxy appends the address it was reached from), skipping
        trusted proxies, and the first address that is not one is the
        client. Entries to the left of it were written by the client and
        are never looked at. If every entry is a trusted proxy, the
        leftmost is the client; an entry that is no address stops the walk
        at the proxy that passed it on.
        """
        peer = request.getClientAddress()
        host = getattr(peer, "host", None)
        if host is None:
            if not self.unix:
                return UNIX_PEER
            hop: str = UNIX_PEER
        else:
            address = _address(str(host))
            if address is None:
                return str(host)
            if not self.trusts(address):
                return str(address)
            hop = str(address)
        values = request.requestHeaders.getRawHeaders(b"x-forwarded-for", [])
        entries = [e for v in values for e in v.decode("latin-1").split(",") if e.strip()]
        for entry in reversed(entries):
            address = _address(entry)
            if address is None:
                return hop
            hop = str(address)
            if not self.trusts(address):
                return hop
        return hop


# -- login throttling ----------------------------------------------------------------------------------


def doublingDelay(free: int, first: float, maximum: float) -> Callable[[int], float]:
    """
    ``free`` failures back to back, then ``first`` seconds between
    attempts, doubling with each further failure up to ``maximum``.
    """

    def delay(failures: int) -> float:
        if failures < free:
            return 0.0
        return min(first * 2.0 ** min(failures - free, 64), maximum)

    return delay


def throttleAddress(address: str) -> str:
    """
    What an address is throttled as: itself, or for IPv6 its /64 (one
    person usually has a whole /64 to choose addresses from).
    """
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


class LoginThrottle:
    """
    Slows down password guessing without locking anyone out.

    Only failures count, and only against the address they came from and
    the name tried from that address: ``addressLimit`` failures from an
    address, or ``nameLimit`` for one name from it, go back to back; after
    that each attempt from there waits ``firstDelay`` seconds after the
    previous one, doubling with every further failure up to ``maxDelay``.
    Failures are forgotten ``forget`` seconds after the latest attempt. A
    success clears the name's failures at that address and is not counted.
    So wrong passwords for a name from other addresses never slow its owner
    down, and a correct password from an address with no recent failures is
    always let through.

    The counts are in the store, so every portal process sees them. An
    attempt is counted as a failure before the password is checked (the
    check is slow; guesses sent at once would otherwise all go through
    before any counted) and taken back when it succeeds.
    """

    #: Seconds between purges of forgotten keys (per portal process).
    PURGE_INTERVAL = 600.0

    def __init__(
        self,
        store: ILoginFailures,
        clock: IReactorTime,
        *,
        addressLimit: int,
        nameLimit: int,
        firstDelay: float,
        maxDelay: float,
        forget: float,
    ) -> None:
        self.store = store
        self.clock = clock
        self.forget = forget
        self.addressDelay = doublingDelay(addressLimit, firstDelay, maxDelay)
        self.nameDelay = doublingDelay(nameLimit, firstDelay, maxDelay)
        self._purged = float("-inf")

    @staticmethod
    def keys(name: str | None, address: str) -> tuple[str, str | None]:
        """
        The store's keys for an address and for a name at it. The name is
        hashed: people type passwords into the name field by mistake.
        """
        where = throttleAddress(address)
        if name is None:
            return f"addr:{where}", None
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()
        return f"addr:{where}", f"name:{where}:{digest}"

    async def claim(self, name: str | None, address: str) -> float:
        """
        0 if an attempt for ``name`` (None: no name, e.g. a provider's
        answer) from ``address`` may go ahead, now counted as a failure;
        else the seconds to wait, and nothing is counted.
        """
        now = self.clock.seconds()
        if now - self._purged >= self.PURGE_INTERVAL:
            self._purged = now
            await self.store.forgetLoginFailures(now - self.forget)
        addressKey, nameKey = self.keys(name, address)
        delays = {addressKey: self.addressDelay}
        if nameKey is not None:
            delays[nameKey] = self.nameDelay
        return await self.store.claimLoginAttempt(delays, now, self.forget)

    async def succeeded(self, name: str | None, address: str) -> None:
        """The attempt ``claim`` let through succeeded: it is not a failure."""
        addressKey, nameKey = self.keys(name, address)
        await self.store.loginSucceeded(
            clear=[nameKey] if nameKey is not None else [], takeBack=[addressKey]
        )


def waitText(seconds: float) -> str:
    """How long to wait, for a person: "5 seconds", "2 minutes"."""
    whole = _wholeSeconds(seconds)
    if whole < 120:
        return f"{whole} second{'s' if whole != 1 else ''}"
    return f"{-(-whole // 60)} minutes"


def setRetryAfter(request: IRequest, seconds: float) -> None:
    """``Retry-After``: whole seconds, at least one."""
    request.setHeader(b"retry-after", b"%d" % _wholeSeconds(seconds))


def _wholeSeconds(seconds: float) -> int:
    return max(1, -int(-seconds // 1))
