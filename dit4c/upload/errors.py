"""
What can go wrong in the upload helper.

- ``UploadFailed``: the image could not be stored at the image server or
  reported to the portal, after the retries a transient failure gets (or
  at once, for what no retry mends: a refusal, a missing file or key).
  The helper leaves the reason beside the image and exits with status 1;
  the node then does not report the instance ``saved``.
"""

from __future__ import annotations

__all__ = ["UploadFailed"]


class UploadFailed(Exception):
    """The image could not be stored or reported; the message says why."""
