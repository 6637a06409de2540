"""
Waiting on the global reactor, for tests on real sockets and processes:
for a condition (:func:`eventually`) rather than a guessed time.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

#: Seconds between the first two looks of :func:`eventually`.
FIRST_LOOK = 0.01


def deferLater(seconds: float) -> defer.Deferred[None]:
    """Wait on the global reactor (for tests on real sockets)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater as _deferLater

    return _deferLater(reactor, seconds, lambda: None)


async def eventually(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str | Callable[[], str] | None = None,
) -> Any:
    """
    Wait (without blocking the reactor) until ``predicate()`` is true, and
    return what it returned; ``predicate`` may return an awaitable, whose
    result counts. A test waits for the event it needs this way rather
    than sleeping for a guessed time: fast when the event comes soon, and
    a clear failure (``what`` was awaited, or its text now) at the
    deadline when it never does. The looks come quickly at first (10 ms
    apart, then twice as long each time), then every ``interval``: most
    events a test waits for come within milliseconds, and a fixed look
    every ``interval`` made each wait last a whole one. Later looks stay
    ``interval`` apart because many predicates ask a server under test,
    whose CPU a tighter loop takes away on a machine that runs tests in
    parallel.
    """
    deadline = time.monotonic() + timeout
    pause = min(FIRST_LOOK, interval)
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            detail = what() if callable(what) else what or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"not so within {timeout} s: {detail}")
        await deferLater(pause)
        pause = min(pause * 2, interval)
