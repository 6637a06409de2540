"""
What can go wrong in the storage helper before it mounts anything.

- ``StorageConfigError``: the file server's address, its pinned host key
  or the mount point is not usable; the helper refuses to start (a usage
  error naming the variable), and nothing is mounted.

Once running, a mount that fails is not an exception to a caller: the
helper logs it and mounts again after a back-off.
"""

from __future__ import annotations

__all__ = ["StorageConfigError"]


class StorageConfigError(ValueError):
    """The file server, its host key or the mount point is not usable; the message says which."""
