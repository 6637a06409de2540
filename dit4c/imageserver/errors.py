"""
What can go wrong in the image server.

- ``ImageServerError`` and its kinds: the refusals a client is answered
  with, each a status, an error code and a reason a person may read;
  nothing was stored.
- ``S3Error``: the S3 object store failed (unreachable, refused the
  credentials, ...). It is an :class:`OSError`, as any failure of an image
  store is (:class:`~dit4c.imageserver.storage.IImageStorage`); the client
  is answered 500 "could not be stored" or "could not be read", nothing is
  stored, and its message holds no secret.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadDigest",
    "DigestMismatch",
    "ImageServerError",
    "MethodNotAllowed",
    "NotFound",
    "PortalUnavailable",
    "Refused",
    "S3Error",
    "TooLarge",
]


class ImageServerError(Exception):
    """The request could not be served."""

    status = 500
    error = "server_error"

    def __init__(self, reason: str | None = None, **extra: Any) -> None:
        super().__init__(reason or (self.__doc__ or "").strip())
        self.extra = extra

    @property
    def reason(self) -> str:
        """Safe to show and to log: never a token, a cookie or the secret."""
        return str(self.args[0])

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "reason": self.reason, **self.extra}


class BadDigest(ImageServerError):
    """An image is named sha256: and 64 lower-case hexadecimal digits."""

    status = 400
    error = "invalid_digest"


class DigestMismatch(ImageServerError):
    """The SHA-256 of what arrived is not the digest in the URL: nothing was stored."""

    status = 400
    error = "digest_mismatch"


class NotFound(ImageServerError):
    """No such image is stored here."""

    status = 404
    error = "not_found"


class MethodNotAllowed(ImageServerError):
    """That method is not allowed here."""

    status = 405
    error = "method_not_allowed"

    def __init__(self, allow: bytes, reason: str | None = None) -> None:
        super().__init__(reason)
        self.allow = allow


class TooLarge(ImageServerError):
    """The body is larger than this image server accepts: nothing was stored."""

    status = 413
    error = "too_large"


class Refused(ImageServerError):
    """The portal does not allow this request."""

    status = 403
    error = "forbidden"


class PortalUnavailable(ImageServerError):
    """The portal could not be asked whether this request may go ahead; try again later."""

    status = 503
    error = "portal_unavailable"


class S3Error(OSError):
    """The object store failed (unreachable, refused the credentials, ...)."""
