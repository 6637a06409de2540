"""
The connection every public HTTP front shares: the routing server's public
side and the auth helper in front of each tool.

A browser's connection is read as a sequence of requests, each parsed
(httptools: llhttp, Node's strict parser) and decided on before a byte of it
goes on; what differs between the fronts is only the decision and the head
passed on (:class:`IFrontRules`: which tunnel owns the host and
``X-Forwarded-*`` at the routing server; the session check, its cookies
stripped and ``X-DIT4C-User`` set at the auth helper). Everything else is
here, once:

- a deadline for each request head (from its first byte, not reset by
  later ones), and one for a connection with no byte either way;
- refusals answered with the front's own page, in order behind the
  responses to the requests before them;
- bodies re-framed exactly as parsed (a chunked body stays chunked, a
  ``Content-Length`` beside it is dropped), so nothing is smuggled past;
- the upstream's responses parsed too (httptools' response parser), only to
  know where each one ends and what its status is: the bytes themselves pass
  back untouched;
- the switch to a raw pipe only once the upstream answered ``101 Switching
  Protocols`` to a request that asked to switch. Until then every request on
  the connection is parsed and its headers set again: a request that asked
  to upgrade and got a ``200`` leaves the connection an HTTP one;
- back-pressure both ways (a slow reader slows the writer), and half-close
  carried across as a direct connection would see it.

The pieces, each in its own module and all importable from here:

- :mod:`dit4c.common.frontrules`: what a front decides (:class:`IRequestRules`,
  :class:`Forward`, :class:`Answer`) and where the machine acts (:class:`IFrontIO`);
- :mod:`dit4c.common.frontmoves`: the machine as a table (:class:`Phase`,
  :class:`Event`, :data:`TRANSITIONS`), rather than an automat machine,
  for speed; the table is the whole of the machine, and the tests check it;
- :mod:`dit4c.common.frontmachine`: :class:`FrontConnection`, the machine,
  which takes bytes and events and acts through :class:`IFrontIO`, with
  the upstream's side of it (the responses) in :mod:`dit4c.common.frontresponses`;
- :mod:`dit4c.common.frontproto`: :class:`FrontProtocol`, the thin Twisted
  protocol around the machine, :class:`UpstreamProtocol`, and a front's
  whole rules (:class:`IFrontRules`: the above, and how the upstream is reached);
- :mod:`dit4c.common.frontmetrics`: :class:`FrontMetrics`, the counters.

The rules are in docs/protocols.md, sections 3 and 10.
"""

from __future__ import annotations

from dit4c.common.frontmachine import FrontConnection
from dit4c.common.frontmetrics import FrontMetrics
from dit4c.common.frontmoves import TRANSITIONS, Event, Phase
from dit4c.common.frontproto import FrontProtocol, IFrontRules, UpstreamProtocol
from dit4c.common.frontrules import Answer, Forward, IFrontIO, IRequestRules, Verdict

__all__ = [
    "TRANSITIONS",
    "Answer",
    "Event",
    "Forward",
    "FrontConnection",
    "FrontMetrics",
    "FrontProtocol",
    "IFrontIO",
    "IFrontRules",
    "IRequestRules",
    "Phase",
    "UpstreamProtocol",
    "Verdict",
]
