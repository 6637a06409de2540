"""
PKCE (RFC 7636), the one way every OAuth 2 party here makes and checks it:
the auth helper and the portal's upstream login as clients, the portal's
authorization server as the server.
"""

from __future__ import annotations

import hashlib
import secrets
from base64 import urlsafe_b64encode

__all__ = ["codeChallenge", "newVerifier"]


def newVerifier() -> str:
    """A fresh code verifier: 256 random bits, 43 base64url characters."""
    return secrets.token_urlsafe(32)


def codeChallenge(verifier: str) -> str:
    """``S256``: ``BASE64URL(SHA256(ASCII(code_verifier)))``, unpadded."""
    return (
        urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest())
        .rstrip(b"=")
        .decode("ascii")
    )
