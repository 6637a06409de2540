"""
Login names for people who sign up through a provider: made from the
provider's names for them (``baseLoginName``), then numbered when taken
(``loginNameCandidates``).
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from collections.abc import Iterable

from dit4c.portal.store.model import MAX_LOGIN_NAME

__all__ = ["MAX_LOGIN_NAME", "RESERVED_NAMES", "baseLoginName", "loginNameCandidates"]

#: Login names never given to a new user from a provider's name for them.
RESERVED_NAMES: frozenset[str] = frozenset(
    {"admin", "administrator", "root", "system", "dit4c", "portal", "api", "login", "logout", "www"}
)


def baseLoginName(hints: Iterable[str | None]) -> str:
    """
    A login name from a provider's names for a person, best first: lower
    case, DNS-label-like (``a-z``, ``0-9``, ``-``; no ``-`` at either end),
    at most ``MAX_LOGIN_NAME`` characters; an email address gives its local
    part. ``user`` when none of them gives anything usable.
    """
    for hint in hints:
        if not hint:
            continue
        if "@" in hint:
            hint = hint.rsplit("@", 1)[0]
        ascii_ = unicodedata.normalize("NFKD", hint).encode("ascii", "ignore").decode().lower()
        name = re.sub(r"[^a-z0-9]+", "-", ascii_).strip("-")[:MAX_LOGIN_NAME].rstrip("-")
        if name and name not in RESERVED_NAMES:
            return name
    return "user"


def _withDigits(base: str, n: int) -> str:
    """``base`` with the number ``n`` after it, still at most ``MAX_LOGIN_NAME`` long."""
    suffix = str(n)
    return base[: MAX_LOGIN_NAME - len(suffix)].rstrip("-") + suffix


def loginNameCandidates(base: str) -> list[str]:
    """
    The names to try for a new user, in order: ``base``, then ``base2`` to
    ``base99``, then ten with a random number of up to six digits (so a
    popular name still finds a free one quickly).
    """
    names = [base] + [_withDigits(base, n) for n in range(2, 100)]
    names += [_withDigits(base, secrets.randbelow(10**6)) for _ in range(10)]
    return names
