"""
Work that, once begun, runs to its end even if whoever asked for it stops
waiting.

Klein cancels a route's Deferred when its client goes away, and a
coroutine's cancellation stops it at whichever ``await`` it was on. For a
page that only reads, that is right. For an action that changes several
things in turn (an instance claimed, then its start command stored and
sent; a share removed, then every helper told), stopping half-way leaves
the first step without the rest: an instance ``requested`` that no
scheduler ever hears of, because the browser navigated away (or reloaded)
while its form was being answered. Such an action is accepted as a whole
or not at all, whatever its caller does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["completes", "toTheEnd"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

log = Logger()


def toTheEnd(work: Deferred[_T]) -> Deferred[_T]:
    """
    ``work``'s result, in a Deferred whose cancellation tells the caller at
    once (``CancelledError``) but leaves ``work`` running to its end; a
    failure nobody waits for any more is logged, not lost.
    """

    def passOn(result: _T | Failure) -> None:
        if not waiting.called:
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(result)
        elif isinstance(result, Failure):
            log.failure("work whose caller stopped waiting failed", result)

    waiting: Deferred[_T] = Deferred()
    work.addBoth(passOn)
    return waiting


def completes(method: Callable[_P, Coroutine[Any, Any, _T]]) -> Callable[_P, Deferred[_T]]:
    """Decorate an ``async def`` so that each call runs to its end (:func:`toTheEnd`)."""

    @functools.wraps(method)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
        return toTheEnd(Deferred.fromCoroutine(method(*args, **kwargs)))

    return run
