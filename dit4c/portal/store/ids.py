"""
Identifiers and secrets: instance ids, record ids, tokens and their hashes.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable

#: Crockford's base32 alphabet in lower case: digits, then letters without
#: i, l, o, u. It is in ASCII order, so a fixed-width encoding sorts as its
#: number does.
ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"

#: Characters in an instance id.
INSTANCE_ID_LENGTH = 17
_TIME_BITS = 44
_RANDOM_BITS = 40
#: A marker bit above the time: the first character is then always one of
#: ``g``..``z``, so an id is a DNS label even by RFC 1035's rule (a letter first).
_MARKER = 1 << (_TIME_BITS + _RANDOM_BITS)


def newInstanceId(now: float, randbits: Callable[[int], int] = secrets.randbits) -> str:
    """
    A new instance id for time ``now`` (seconds since the epoch).

    The id is the number ``marker | milliseconds << 40 | 40 random bits`` in
    17 characters of lower-case Crockford base32: a valid DNS label (a letter
    first, then letters and digits), sorted by creation time to the
    millisecond, unguessable within one millisecond, and good until the year
    2527.
    """
    ms = int(now * 1000)
    if not 0 <= ms < 1 << _TIME_BITS:
        raise ValueError(f"time {now!r} is outside what an instance id can hold")
    value = _MARKER | ms << _RANDOM_BITS | randbits(_RANDOM_BITS)
    chars = []
    for _ in range(INSTANCE_ID_LENGTH):
        value, digit = divmod(value, 32)
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars))


def instanceIdTime(instanceId: str) -> float:
    """The creation time (seconds, to the millisecond) encoded in an instance id."""
    value = 0
    for char in instanceId:
        value = value * 32 + ALPHABET.index(char)
    return ((value & (_MARKER - 1)) >> _RANDOM_BITS) / 1000


def newId() -> str:
    """
    A random record id: 16 URL-safe characters (96 bits), never starting
    with ``-``: a command line takes an argument that does (``dit4c start
    -gnpp...``) for an option.
    """
    while True:
        made = secrets.token_urlsafe(12)
        if not made.startswith("-"):
            return made


def newToken() -> str:
    """A random secret token: 43 URL-safe characters (256 bits)."""
    return secrets.token_urlsafe(32)


def hashToken(token: str) -> str:
    """The SHA-256 (hex) of a token: what the store keeps instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
