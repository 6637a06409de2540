"""
What can go wrong in the file server.

- ``AccessRefused``: the portal says this instance may not reach the
  storage (its reason is the message). A login is refused with it; an
  open connection is closed.
- ``PortalUnavailable``: the portal gave no answer that counts (no answer
  in time, or one that makes no sense). A login is refused (nobody gets in
  on a guess); on an open connection, the operation that needed a fresh
  answer is refused and the next one asks again.
- ``Escape``: a path would lead out of the person's directory; the client
  is told "permission denied" (``EACCES``) and nothing is touched.
"""

from __future__ import annotations

import errno

__all__ = ["AccessRefused", "Escape", "PortalUnavailable"]


class AccessRefused(Exception):
    """The portal says no; the message is its reason."""


class PortalUnavailable(Exception):
    """The portal gave no answer that counts."""


class Escape(PermissionError):
    """The path leads out of the person's directory."""

    def __init__(self, what: str = "The path leads out of your storage.") -> None:
        super().__init__(errno.EACCES, what)
