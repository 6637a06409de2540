"""
What can go wrong in the routing server beyond a tunnel's own failures
(those are :mod:`dit4c.tunnel.errors`).

- ``ReplayedToken``: a routing token whose id was used before; the
  tunnel's HELLO is refused (``AUTH_FAILED``) and the listener that holds
  the real token keeps its host name.
- ``TooManyTokens``: the server remembers as many recent token ids as it
  may (in all, or for this instance); the HELLO is refused, nothing is
  recorded, and a later dial may go ahead.

Both are :class:`~dit4c.common.errors.InvalidToken`, so whoever refuses a
token refuses these the same way; each ``reason`` (its docstring unless
given) may be logged and sent.
"""

from __future__ import annotations

from dit4c.common.errors import InvalidToken

__all__ = ["ReplayedToken", "TooManyTokens"]


class ReplayedToken(InvalidToken):
    """token already used"""


class TooManyTokens(InvalidToken):
    """too many recent tunnel tokens; try again later"""
