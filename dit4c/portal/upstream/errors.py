"""
What can go wrong in a login through a provider, as the person at the
browser is told (``message``, ``title``, ``status``) and as the log and the
login throttle see it (``reason``, ``failure``); and ``ConfigError`` for a
wrong providers' configuration.

``UnknownSigningKey`` is an ``InvalidIdentity`` that the OIDC client
catches once: no key of the issuer's JWKS fits the ID token, so the keys
are fetched again (the issuer may have rolled them) and the token checked
once more; only then is it the person's refusal.
"""

from __future__ import annotations

from dit4c.portal import security

__all__ = [
    "AccountDisabled",
    "CodeRejected",
    "ConfigError",
    "FlowExpired",
    "FlowReplayed",
    "InvalidIdentity",
    "NotRegistered",
    "ProviderRefused",
    "ProviderUnavailable",
    "StateMismatch",
    "TooManyFailures",
    "UnknownProvider",
    "UnknownSigningKey",
    "UpstreamLoginError",
]


class UpstreamLoginError(Exception):
    """The login did not work. Please try again."""

    #: The HTTP status of the error page.
    status = 400
    #: The error page's title.
    title = "Login failed"
    #: Whether this answer counts as a failed login from its address
    #: (``security.LoginThrottle``): one that was forged, stale or replayed.
    failure = False

    def __init__(self, message: str = "", *, reason: str = "") -> None:
        super().__init__(message or (self.__doc__ or "").strip())
        #: For the log only: never a code, token or secret.
        self.reason = reason or self.message

    @property
    def message(self) -> str:
        """What the person at the browser is told."""
        return str(self.args[0])


class UnknownProvider(UpstreamLoginError):
    """There is no such way to log in here."""

    status = 404
    title = "Not found"


class ProviderRefused(UpstreamLoginError):
    """The login provider did not log you in."""

    status = 403


class FlowExpired(UpstreamLoginError):
    """
    This login took too long, or was started in another browser. Please
    start again.
    """

    failure = True


class StateMismatch(UpstreamLoginError):
    """This answer from the login provider does not belong to the login you started. Please start again."""

    failure = True


class FlowReplayed(UpstreamLoginError):
    """This answer from the login provider was used already. Please start again."""

    failure = True


class CodeRejected(UpstreamLoginError):
    """The login provider did not accept this login any more. Please start again."""

    failure = True


class ProviderUnavailable(UpstreamLoginError):
    """The login provider could not be reached, or its answer made no sense. Please try again later."""

    status = 502


class InvalidIdentity(UpstreamLoginError):
    """The login provider's answer could not be verified, so you were not logged in."""

    status = 403
    failure = True


class UnknownSigningKey(InvalidIdentity):
    """No key of the issuer's JWKS fits the ID token (yet: the issuer may have new keys)."""


class NotRegistered(UpstreamLoginError):
    """
    This account is not registered here. Ask an administrator of this
    portal to give you access.
    """

    status = 403
    title = "Not registered"


class AccountDisabled(UpstreamLoginError):
    """This account is disabled."""

    status = 403
    title = "Account disabled"


class TooManyFailures(UpstreamLoginError):
    """Too many failed logins from here. Please wait a little and try again."""

    status = 429
    title = "Too many failed logins"

    def __init__(self, wait: float) -> None:
        super().__init__(
            f"Too many failed logins from here. Try again in {security.waitText(wait)}.",
            reason=f"throttled for {wait:.0f} s",
        )
        #: Seconds until an attempt from here goes ahead.
        self.wait = wait


class ConfigError(ValueError):
    """The login providers' configuration is wrong."""
