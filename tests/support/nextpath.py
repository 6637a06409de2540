"""
Test helpers for the "next" check (``dit4c.common.nextpath``): values of
``next`` built from the pieces URL parsers disagree on, and a real
browser's URL parser as the judge of where a ``Location`` leads.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from hypothesis import strategies as st

_T = TypeVar("_T")

__all__ = ["PIECES", "browserOrigin", "inReactor", "nextValues"]

#: Pieces that parsers disagree on, to build values from.
PIECES = [
    "/", "//", "\\", "%2F", "%2f", "%5C", "%5c", "%09", "%0A", "%0d", "%00", "%7F", "%25", "%2509",
    "%252F", "%255C", "\t", "\n", "\r", " ", "\x00", "\x7f", "\x85", "\u200b", "\u202e", "\u2028",
    "\u3002", "\uff0f", "\uff3c", "%E3%80%82", "%EF%BC%8F", "evil.example", ".", "..", ":", "@",
    "?", "#", "http:", "https:", "javascript:", "a", "%", "%%", "%2", "%C3%A9",
]  # fmt: skip


def nextValues(exclude: str = "", *, ascii: bool = False) -> st.SearchStrategy[str]:
    """
    Values of ``next``, mostly starting as a path does (that is what the
    check looks at first). ``exclude``: characters none may hold (a raw
    request line cannot carry a space or a line break); ``ascii``: only
    ASCII (what an HTTP server takes in a request target).
    """
    pieces = [p for p in PIECES if not any(c in p for c in exclude) and (p.isascii() or not ascii)]
    # No lone surrogates: no browser or URL can carry one.
    characters = st.characters(
        blacklist_characters=exclude, blacklist_categories=("Cs",), max_codepoint=127 if ascii else None
    )
    text = st.text(alphabet=characters, max_size=3)
    return st.tuples(
        st.sampled_from(["/", "/", "/", ""]),
        st.lists(st.one_of(st.sampled_from(pieces), text), min_size=1, max_size=6),
    ).map(lambda parts: parts[0] + "".join(parts[1]))


#: Where a browser goes from ``arguments[0]`` on ``arguments[1]``, by its own URL parser.
_RESOLVE = "try { return new URL(arguments[0], arguments[1]).origin } catch (e) { return 'invalid' }"


def browserOrigin(browser: Any, location: str, base: str) -> str:
    """
    The origin Chromium goes to for a ``Location`` of ``location`` on a page
    at ``base`` (:class:`support.browser.Browser`; the call blocks).
    """
    return str(browser.driver.execute_script(_RESOLVE, location, base))


def inReactor(work: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """
    Run the coroutine ``work()`` in the reactor and wait for its result,
    from another thread: how a hypothesis test (which runs its examples
    one after another, blocking) is driven from a thread the async test
    started, while servers keep running in the reactor.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.threads import blockingCallFromThread

    def start() -> Deferred[_T]:
        return Deferred.fromCoroutine(work())

    result: _T = blockingCallFromThread(cast(Any, reactor), cast(Any, start))
    return result
