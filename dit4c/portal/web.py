"""
What every room of the portal does with a request and its answer: read a
form field, redirect, check a form's CSRF token, render a page from the
templates, and say which part of a target may be logged.

These are plain functions and one renderer (:class:`Pages`), so that the
pages, the administrators' pages, the OAuth server and the upstream login
share them without reaching into ``dit4c.portal.app.Portal``.
"""

from __future__ import annotations

import time
from typing import Any, cast

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from twisted.web.http import Request
from twisted.web.iweb import IRequest

from dit4c.common.httpsite import redactTarget
from dit4c.common.life import toJSON as lifeJSON
from dit4c.portal import security

__all__ = ["SECRET_PATHS", "Pages", "arg", "csrfOK", "loggableTarget", "redirect", "served"]

#: Paths whose rest is a secret: a share link's token (only its hash is stored).
SECRET_PATHS = ("/share/",)


def arg(request: IRequest, name: str) -> str | None:
    """The first value of form or query field ``name``, or None (absent, or not UTF-8)."""
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        value: str = values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return value


def served(request: IRequest) -> Request:
    """
    ``request`` as the web server made it (Klein hands routes the
    ``twisted.web`` request): what ``IRequest`` does not declare, such as the
    status set so far or whether the answer finished, is read here.
    """
    return cast(Request, request)


def redirect(request: IRequest, location: str) -> bytes:
    """A ``303 See Other`` to ``location``."""
    request.setResponseCode(303)
    request.setHeader(b"location", location.encode())
    return b""


def csrfOK(request: IRequest, expected: str) -> bool:
    """Whether the form's ``csrf`` field is ``expected`` (a session's CSRF token)."""
    return security.tokensEqual(arg(request, "csrf"), expected)


def startStream(request: IRequest, contentType: bytes, first: bytes) -> None:
    """Start a streamed answer of ``contentType`` with ``first`` (the head goes now, even if ``first`` is empty)."""
    request.setHeader(b"content-type", contentType)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-accel-buffering", b"no")
    request.write(first)


def finishStream(request: IRequest) -> None:
    """End a streamed answer (its reader may be gone already)."""
    if not served(request).finished and not served(request)._disconnected:
        request.finish()


def utc(when: float) -> str:
    """A time as pages show it: to the minute, in UTC (the portal's people are anywhere)."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when))


def loggableTarget(target: bytes) -> str:
    """A request target as the portal may log it: its secrets redacted, as in the access log."""
    return redactTarget(target, SECRET_PATHS).decode("latin-1")


class Pages:
    """The portal's HTML pages, from the templates that ship with the package."""

    def __init__(self) -> None:
        self.templates = Environment(
            loader=PackageLoader("dit4c.portal", "templates"),
            autoescape=select_autoescape(default=True),
            # Templates ship with the package; no need to stat them per render.
            auto_reload=False,
        )
        # The instance life, as pages and their script see it (states, actions, deadlines).
        self.templates.globals["life"] = lifeJSON()
        # ... and as the pages' script reads it, made once (it never changes while the portal runs).
        self.templates.globals["lifeJSON"] = Markup(self.templates.from_string("{{ life | tojson }}").render())
        self.templates.filters["utc"] = utc

    def render(
        self, request: IRequest, template: str, status: int = 200, *, formTargets: tuple[str, ...] = (), **context: Any
    ) -> bytes:
        """
        A page from a template. ``formTargets``: origins besides the portal's
        that a form on the page may end up at through redirects (CSP
        ``form-action`` covers a form's whole redirect chain).
        """
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-frame-options", b"DENY")
        formAction = " ".join(("'self'", *formTargets))
        request.setHeader(
            b"content-security-policy",
            f"default-src 'self'; frame-ancestors 'none'; form-action {formAction}".encode("ascii"),
        )
        request.setHeader(b"referrer-policy", b"same-origin")
        return self.templates.get_template(template).render(**context).encode()
