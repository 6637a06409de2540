"""
What keeps the portal's pages safe: password hashing, login rate limits,
session cookies and CSRF tokens.

Passwords are hashed with Argon2id (argon2-cffi, the reference binding),
off the reactor thread because hashing is deliberately slow. Session and
CSRF tokens are random 256-bit values; the store keeps only their hashes.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet.threads import deferToThread

SESSION_COOKIE = b"dit4c_session"
LOGIN_CSRF_COOKIE = b"dit4c_login_csrf"

_hasher = PasswordHasher()
#: Verified against when a user does not exist, so that a login for an
#: unknown name costs as long as one for a known name.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


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
            return _hasher.verify(stored or _DUMMY_HASH, password) and stored is not None
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
    """How session cookies are set: Secure when the portal is served over TLS."""

    secure: bool
    sessionLifetime: float = 12 * 3600.0

    def set(self, request: Any, name: bytes, value: str, *, maxAge: float | None, sameSite: bytes = b"Lax") -> None:
        parts = [name + b"=" + value.encode(), b"Path=/", b"HttpOnly", b"SameSite=" + sameSite]
        if maxAge is not None:
            parts.append(b"Max-Age=%d" % int(maxAge))
        if self.secure:
            parts.append(b"Secure")
        request.responseHeaders.addRawHeader(b"set-cookie", b"; ".join(parts))

    def clear(self, request: Any, name: bytes) -> None:
        self.set(request, name, "", maxAge=0)
