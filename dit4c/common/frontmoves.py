"""
The shared front's machine as a table: the phases a client connection goes
through, the events that move it, and every move allowed
(:data:`TRANSITIONS`).

It is a table rather than an automat machine: each request crosses three
or four moves, and at the routing server's rate automat's cost per input (a
few microseconds) would be a fifth of the time a request may take. The
table is the whole of the machine's shape, and the tests check it; the
machine that follows it is :class:`~dit4c.common.frontmachine.FrontConnection`.
It stands apart so that both halves of that machine (the client's side and
the upstream's, :mod:`dit4c.common.frontresponses`) read the same names.
"""

from __future__ import annotations

import enum

__all__ = [
    "AWAITING",
    "CHECKING",
    "CLOSED",
    "CLOSING",
    "FORWARDING",
    "HEAD",
    "HOLDING",
    "PARSED_BODY",
    "PARSED_END",
    "PARSED_EOF",
    "PARSED_HEAD",
    "PARSED_REFUSAL",
    "RAW",
    "SWITCHING",
    "TRANSITIONS",
    "UNREAD",
    "Event",
    "Phase",
]


class Phase(enum.StrEnum):
    """Where a connection is, as its client's bytes are read."""

    #: Reading a request head (or waiting for the next one).
    HEAD = "head"
    #: A complete head is being decided on; the client is held.
    CHECKING = "checking"
    #: The request went on; its body follows as parsed.
    FORWARDING = "forwarding"
    #: Held until the upstream has answered every request passed on: an own
    #: answer waits for the responses before it, a ``HEAD`` request for its
    #: response's head (whose body length cannot be read from it).
    AWAITING = "awaiting"
    #: A request that asked to switch protocols went on; held until its
    #: answer's status: ``101`` makes the connection raw, any other leaves it HTTP.
    SWITCHING = "switching"
    #: After ``101``: a pipe both ways, nothing parsed.
    RAW = "raw"
    #: No more requests: what the upstream owes finishes, then our last answer, then the close.
    CLOSING = "closing"
    CLOSED = "closed"


class Event(enum.StrEnum):
    HEAD_COMPLETE = "head-complete"
    FORWARDED = "forwarded"
    ANSWERED = "answered"
    SENT = "sent"
    WAIT = "wait"
    ASK_SWITCH = "ask-switch"
    CAUGHT_UP = "caught-up"
    SWITCHED = "switched"
    NOT_SWITCHED = "not-switched"
    CLOSE = "close"
    LOST = "lost"


_P, _E = Phase, Event

#: The machine: (phase, event) -> next phase. Every phase but CLOSED may
#: close (CLOSE) and every phase ends when the client's connection is lost (LOST).
TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (_P.HEAD, _E.HEAD_COMPLETE): _P.CHECKING,
    (_P.CHECKING, _E.FORWARDED): _P.FORWARDING,
    (_P.CHECKING, _E.ANSWERED): _P.HEAD,
    (_P.CHECKING, _E.WAIT): _P.AWAITING,
    (_P.FORWARDING, _E.SENT): _P.HEAD,
    (_P.FORWARDING, _E.WAIT): _P.AWAITING,
    (_P.FORWARDING, _E.ASK_SWITCH): _P.SWITCHING,
    (_P.AWAITING, _E.CAUGHT_UP): _P.HEAD,
    (_P.SWITCHING, _E.SWITCHED): _P.RAW,
    (_P.SWITCHING, _E.NOT_SWITCHED): _P.HEAD,
    **{(p, _E.CLOSE): _P.CLOSING for p in Phase if p is not _P.CLOSED},
    **{(p, _E.LOST): _P.CLOSED for p in Phase},
}

#: Phases in which the client's later requests wait.
HOLDING = frozenset((_P.CHECKING, _P.AWAITING, _P.SWITCHING, _P.CLOSING))
#: Phases in which the client is not read meanwhile. (A closing connection
#: is read, and what comes dropped, so that a client that goes away is seen.)
UNREAD = frozenset((_P.CHECKING, _P.AWAITING, _P.SWITCHING))

# The hot path compares phases often: module names are faster than the class's.
HEAD, CHECKING, FORWARDING, AWAITING = _P.HEAD, _P.CHECKING, _P.FORWARDING, _P.AWAITING
SWITCHING, RAW, CLOSING, CLOSED = _P.SWITCHING, _P.RAW, _P.CLOSING, _P.CLOSED

# What the request parser's callbacks queue for the machine, in order: plain
# ints, compared for every piece of a body.
PARSED_BODY, PARSED_END, PARSED_HEAD, PARSED_REFUSAL, PARSED_EOF = range(5)
