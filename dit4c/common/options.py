"""Option coercions and constructions shared by every ``tap.py``."""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.python import usage


def positiveFloat(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise usage.UsageError(f"{value!r} is not a number") from None
    if number <= 0:
        raise usage.UsageError(f"{value!r} must be positive")
    return number


positiveFloat.coerceDoc = "A positive number."  # type: ignore[attr-defined]


def positiveInt(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise usage.UsageError(f"{value!r} is not a whole number") from None
    if number <= 0:
        raise usage.UsageError(f"{value!r} must be positive")
    return number


positiveInt.coerceDoc = "A positive whole number."  # type: ignore[attr-defined]


def endpointList(descriptions: list[str], *, server: bool, option: str) -> None:
    """
    Check endpoint strings at option time, so that a typo is a usage error
    rather than a traceback at start-up. Nothing is bound or dialled.
    """
    from twisted.internet import reactor

    parse = serverFromString if server else clientFromString
    for description in descriptions:
        try:
            parse(reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--{option}: bad endpoint {description!r}: {e}") from None


#: The shortest secret shared between the portal and a server that asks it questions.
MIN_SECRET = 16


def secretFromFile(path: str, option: str) -> str:
    """
    A shared secret from a file (surrounding white space ignored), at least
    :data:`MIN_SECRET` characters.

    :raises usage.UsageError: it cannot be read, or is too short (the
        message names ``--option``, never the secret).
    """
    from pathlib import Path

    try:
        secret = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise usage.UsageError(f"--{option}: {getattr(e, 'strerror', None) or e}") from None
    if len(secret) < MIN_SECRET:
        raise usage.UsageError(f"--{option}: the secret must have at least {MIN_SECRET} characters")
    return secret


def verifierFromOptions(config: Any, reactor: Any) -> Any:
    """A TokenVerifier from --jwks-url/--jwks-file, --audience and --issuer."""
    from dit4c.common.tokens import JWKSKeySource, StaticKeySource, TokenVerifier

    if config["jwks-file"]:
        keys: Any = StaticKeySource.fromFile(config["jwks-file"])
    else:
        # Instances sign their own routing tokens with keys the portal
        # publishes as they start: an unknown kid is looked for again soon.
        keys = JWKSKeySource(config["jwks-url"], reactor=reactor, min_refetch=1.0)
    return TokenVerifier(keys, audience=config["audience"], issuer=config["issuer"], clock=reactor)
