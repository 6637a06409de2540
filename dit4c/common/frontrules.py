"""
What a shared HTTP front decides, and where its machine acts: the two
interfaces between :class:`~dit4c.common.frontmachine.FrontConnection` and
the world around it.

A front (the routing server's public side, the auth helper) is only its
rules (:class:`IRequestRules`, and how it reaches its upstream,
:class:`~dit4c.common.frontproto.IFrontRules`): the machine asks them about
each request head and acts on the verdict (:class:`Forward` or :class:`Answer`).
:class:`IFrontIO` is what the machine does to the two connections, so that
the machine can be driven without sockets (tests/common/test_frontconn.py)
and the Twisted side (:mod:`dit4c.common.frontproto`) stays thin. These
live apart from both so that each imports them and neither the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import Interface

from dit4c.common.httpfront import RequestHead

__all__ = ["Answer", "Forward", "IFrontIO", "IRequestRules", "Verdict"]


@dataclass(frozen=True, slots=True)
class Forward:
    """Pass the request on, with this head (its body follows as parsed)."""

    head: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    """
    Answer the request here with ``response`` (a whole HTTP response). The
    connection closes after it if ``close``, or if the request's body was
    not read or it asked so (:attr:`RequestHead.endsConnection`).
    """

    response: bytes
    close: bool = False


Verdict = Forward | Answer


class IRequestRules(Interface):
    """
    What one front decides for one client connection (made per
    connection): the part of
    :class:`~dit4c.common.frontproto.IFrontRules` the machine asks. (How
    the upstream is reached is the protocol's question, where the
    upstream's protocol is named.)
    """

    def check(head: RequestHead) -> Verdict | Deferred[Verdict]:
        """
        Decide about a complete request head: pass it on, or answer it.
        Raise (or fail with) :class:`HeadError` to refuse it and close.
        """

    def page(status: int, title: str, message: str) -> bytes:
        """The front's own page for a refusal: a whole ``Connection: close`` response."""

    def unanswered(reason: Failure | None) -> bytes:
        """The page for a request the upstream ended without answering (``reason``: how it ended)."""

    def cut(reason: Failure | None) -> bool:
        """Whether the upstream ended abnormally, so the client's connection is aborted rather than closed."""

    def ended() -> None:
        """The client's connection has ended (closed by either side)."""


class IFrontIO(Interface):
    """Where the machine's actions go: the two connections (:class:`FrontProtocol`)."""

    def writeClient(data: bytes) -> None:
        """Send bytes to the client."""

    def writeUpstream(data: bytes) -> None:
        """Send bytes to the upstream."""

    def connectUpstream() -> Deferred[Any] | None:
        """Open the upstream connection (:meth:`~dit4c.common.frontproto.IFrontRules.connect`)."""

    def holdClient(hold: bool) -> None:
        """Stop (or start again) reading from the client while a request is decided or answered."""

    def closeClient(abort: bool) -> None:
        """Close the client's connection once written bytes are sent (or at once, ``abort``)."""

    def halfCloseClient() -> None:
        """Send EOF to the client, still reading."""

    def closeUpstream(abort: bool) -> None:
        """Close the upstream connection (if any)."""

    def halfCloseUpstream() -> None:
        """Send EOF to the upstream, still reading."""
