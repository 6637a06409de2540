"""
What the portal refuses, as its pages, its REST API and its
server-to-server endpoints answer it.

- ``InstanceError`` and its kinds: a person's action on an instance was
  refused (not found, not theirs, over quota, no scheduler, not from this
  state ...).
  The message is one the person can act on; the home page shows it, the
  REST API answers ``{"error": code, "reason": message}`` with ``status``.
  Nothing changed.
- ``APIError``: the REST API refused a request before doing anything (not
  logged in, no CSRF header, a body too large or malformed, a wrong
  field), answered ``{"error": code, "reason": reason}`` with ``status``.
- ``ReportError``: a refusal on an endpoint another component calls with
  a signed token or a secret (an instance's reports, the image server's
  and the file server's questions), answered ``{"error", "reason"}`` with
  ``status``; its ``reason`` never holds token text, so it may be logged.
- ``OAuthError`` and its kinds: the OAuth 2 server (``/oauth/*``) refused
  a request, answered with its RFC 6749 / RFC 6750 ``error`` code and
  ``status``; the description never holds a code, verifier or token.
- ``CrossSiteRequest``: a state-changing request another site sent; it is
  refused (403) whatever it carries, and nothing is done.

What the store refuses is in :mod:`dit4c.portal.store.errors`; what goes
wrong in a login through a provider, in :mod:`dit4c.portal.upstream.errors`;
the OAuth 2 server's refusals are below.
"""

from __future__ import annotations

from werkzeug.exceptions import Forbidden as HTTPForbidden

__all__ = [
    "APIError",
    "AccessDenied",
    "CrossSiteRequest",
    "Forbidden",
    "InstanceError",
    "InvalidAccessToken",
    "InvalidGrant",
    "InvalidRequest",
    "NoScheduler",
    "NotFound",
    "OAuthError",
    "QuotaExceeded",
    "ReportError",
    "UnknownClient",
    "UnsupportedGrantType",
    "WrongState",
]

# -- a person's actions on instances -------------------------------------------------------------


class InstanceError(Exception):
    """An action on an instance was refused; the message says why."""

    status = 400
    code = "refused"


class NotFound(InstanceError):
    """There is no such instance, image, share link or person (of those this person may name)."""

    status = 404
    code = "not_found"


class Forbidden(InstanceError):
    """That is not this person's to use."""

    status = 403
    code = "forbidden"


class QuotaExceeded(InstanceError):
    """The person already runs as many instances as they may."""

    status = 409
    code = "quota"


class NoScheduler(InstanceError):
    """No scheduler (cluster) open to this person takes instances now."""

    status = 503
    code = "no_scheduler"


class WrongState(InstanceError):
    """The action is not allowed from the instance's state, or the state changed meanwhile."""

    status = 409
    code = "state"


# -- the REST API --------------------------------------------------------------------------------


class APIError(Exception):
    """A refusal of the REST API: answered as JSON ``{"error", "reason"}`` with ``status``."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


# -- endpoints other components call -------------------------------------------------------------


class ReportError(Exception):
    """A refusal: answered as JSON ``{"error", "reason"}`` with ``status``."""

    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error

    @property
    def reason(self) -> str:
        """Safe to show and to log: never token text."""
        return str(self.args[0])


# -- the OAuth 2 server --------------------------------------------------------------------------


class OAuthError(Exception):
    """The request was refused."""

    #: The RFC 6749 / RFC 6750 error code.
    error = "invalid_request"
    #: The HTTP status of the answer.
    status = 400

    def __init__(self, description: str = "") -> None:
        super().__init__(description or (self.__doc__ or "").strip())

    @property
    def description(self) -> str:
        """Safe to show and to log: never a code, verifier or token."""
        return str(self.args[0])


class InvalidRequest(OAuthError):
    """The request is missing a parameter, or one is malformed or given twice."""


class UnknownClient(OAuthError):
    """
    The request does not come from an instance this portal knows, or does
    not name that instance's own callback address.
    """


class InvalidGrant(OAuthError):
    """The authorization code is unknown, expired, used already, or was issued for another request."""

    error = "invalid_grant"


class UnsupportedGrantType(OAuthError):
    """Only ``grant_type=authorization_code`` is supported."""

    error = "unsupported_grant_type"


class InvalidAccessToken(OAuthError):
    """The access token is missing, expired, or not for this instance."""

    error = "invalid_token"
    status = 401


class AccessDenied(OAuthError):
    """This person may not use this instance."""

    error = "access_denied"
    status = 403


# -- requests from other sites -------------------------------------------------------------------


class CrossSiteRequest(HTTPForbidden):
    """A state-changing request that another site sent (``security.crossSite``)."""

    description = "This request was sent from another site, so it was refused. Use the portal's own pages."
