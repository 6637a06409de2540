"""
What can go wrong in the parts every DIT4C component shares.

- Configuration: ``HelperEnvironmentError`` (a helper's environment, docs/protocols.md
  section 9, lacks a variable or holds a malformed one) and ``KeyFileError``
  (a key file or published key is not a usable key; ``UnsupportedKey``: a
  key of a type DIT4C does not sign with). A server refuses to start on
  either, with a message that names the variable or the file.
- Tokens: ``InvalidToken``, a signed token refused (bad signature, wrong
  audience, expired, malformed ...). Its ``reason`` is short and never
  holds token text, so it may be logged and shown; the request it came
  with is refused.
- Public HTTP fronts: ``HeadError``, a request head the server answers
  itself (with ``status``, ``title``, ``message``) and then closes the
  connection; ``Upgraded`` is no error but the parser's signal that the
  request switches the connection to another protocol.
- An instance's life: ``IllegalMove``, a move or action that
  :mod:`dit4c.common.life` does not allow from the instance's state; the
  instance stays where it was.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "HeadError",
    "HelperEnvironmentError",
    "IllegalMove",
    "InvalidToken",
    "KeyFileError",
    "UnsupportedKey",
    "Upgraded",
]

# -- configuration -------------------------------------------------------------------------------


class HelperEnvironmentError(ValueError):
    """A variable is missing or malformed; the message names it."""


class KeyFileError(ValueError):
    """The file does not hold a usable key (a PEM EC P-256 or Ed25519 key)."""


class UnsupportedKey(KeyFileError):
    """The key is neither EC P-256 nor Ed25519, the only types DIT4C signs with."""


# -- tokens --------------------------------------------------------------------------------------


class InvalidToken(Exception):
    """The token was refused."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or (self.__doc__ or "").strip())

    @property
    def reason(self) -> str:
        """The short reason: safe to log or show, never any token text."""
        return str(self.args[0])


# -- public HTTP fronts --------------------------------------------------------------------------


class HeadError(Exception):
    """
    A request head the server answers itself (with ``status``) and then
    closes; ``kind`` names the trouble in a server's error counters.
    """

    def __init__(self, status: int, title: str, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.status, self.title, self.message, self.kind = status, title, message, kind


class Upgraded(Exception):
    """The parser stopped at an ``Upgrade``: ``rest`` is what followed the head."""

    def __init__(self, rest: bytes) -> None:
        super().__init__("upgraded")
        self.rest = rest


# -- an instance's life --------------------------------------------------------------------------


class IllegalMove(Exception):
    """A move or action the instance's life does not allow from its state."""

    def __init__(self, state: StrEnum, what: str) -> None:
        # state: a dit4c.common.life.State (not imported: life imports this module).
        super().__init__(f"{what} is not allowed from {state.value}")
        self.state = state
        self.what = what
