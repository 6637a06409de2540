"""
The one check of a "next" path: where a browser may be sent after a login,
by the portal (its login form, its upstream logins) and by an instance's
auth helper. Only a path on the same site passes; anything else becomes
``/``.

A ``Location`` header is read by the browser with the WHATWG URL parser,
which drops tabs and newlines anywhere, turns ``\\`` into ``/``, and takes
``//host`` as another site. So a value like ``/%09/evil.example/`` (a tab,
once the query string is decoded) is another site. The rules are therefore
strict rather than clever, and are applied to the value as given and again
after each round of percent-decoding (until it no longer changes), so that
whatever decodes it once more later sees a local path too:

- it is ASCII, at most ``MAX_NEXT`` characters, and starts with one ``/``;
- its path (before any ``?`` or ``#``) holds no ``//``;
- it holds no ``\\`` and no control character (C0, DEL, C1, Unicode format
  and line/paragraph separators);
- it has no scheme and no host (``urllib.parse.urlsplit``).
"""

from __future__ import annotations

import unicodedata
from urllib.parse import unquote, urlsplit

__all__ = ["MAX_NEXT", "isLocalPath", "safeNext"]

#: The longest path accepted; a longer one returns to ``/``.
MAX_NEXT = 2048

#: Rounds of percent-decoding after which a value that still changes is refused.
_MAX_DECODINGS = 4

#: Unicode categories never allowed: controls, format characters (bidi
#: overrides, zero-width ones), line and paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _plain(text: str) -> bool:
    """One round's rules (see the module's docstring)."""
    if not text.startswith("/"):
        return False
    path = text.split("?", 1)[0].split("#", 1)[0]
    if "//" in path or "\\" in text:
        return False
    if any(unicodedata.category(c) in _FORBIDDEN_CATEGORIES for c in text):
        return False
    parts = urlsplit(text)
    return not parts.scheme and not parts.netloc


def isLocalPath(value: object) -> bool:
    """Whether ``value`` is a path on this site that a browser may be sent to."""
    if not isinstance(value, str) or not value or len(value) > MAX_NEXT or not value.isascii():
        return False
    text = value
    for _ in range(_MAX_DECODINGS + 1):
        if not _plain(text):
            return False
        decoded = unquote(text)
        if decoded == text:
            return True
        text = decoded
    return False


def safeNext(value: str | None) -> str:
    """``value`` if it is a local path (``isLocalPath``), else ``/``."""
    return value if value is not None and isLocalPath(value) else "/"
