"""
What can go wrong in the auth helper's talk with the portal.

- ``PortalUnreachable``: the portal could not be asked (no answer, or one
  that makes no sense). A login cannot finish (502); a recheck of a
  session keeps the last answer, while its token is valid, and asks again
  soon.
- ``PortalRefused``: the portal answered and said no to a login code; the
  person is sent to log in again.
- ``InvalidFlow``: a login's flow cookie is missing, forged, expired or
  from another browser or tab; the person is sent to log in again.
- ``WatchError``: the portal's watch of access changes sent something that
  is not a watch; the watch is opened again, with back-off.
"""

from __future__ import annotations

__all__ = ["InvalidFlow", "PortalRefused", "PortalUnreachable", "WatchError"]


class PortalUnreachable(Exception):
    """The portal did not answer, or answered something that makes no sense."""


class PortalRefused(Exception):
    """The portal refused the code (its OAuth ``error`` code is the message)."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class WatchError(Exception):
    """The portal sent something that is not a watch (the watch is opened again)."""


class InvalidFlow(Exception):
    """The login took too long, or was started in another browser or tab."""
