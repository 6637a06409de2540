"""
The one "next" check (dit4c.common.nextpath), judged by a real browser's
URL parser: Chromium resolves what the check lets through (and every
percent-decoding of it) against the site's URL, and it must stay there.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from support.nextpath import browserOrigin, nextValues

from dit4c.common.nextpath import MAX_NEXT, isLocalPath, safeNext

BASE = "https://portal.example.org/"

#: The forms that reached another site at some time, and their relatives.
HOSTILE = [
    "/%09/evil.example/",
    "/\t/evil.example/",
    "/\n/evil.example/",
    "/\r/evil.example/",
    "//evil.example/",
    "///evil.example/",
    "/\\evil.example/",
    "/\\/evil.example/",
    "/%5C/evil.example/",
    "/%2F/evil.example/",
    "/%2f%2fevil.example/",
    "/%252F%252Fevil.example/",
    "/%25%30%39/evil.example/",
    "/\x00/evil.example/",
    "/%00/evil.example/",
    "/\u202e/evil.example/",
    "/%E2%80%AE/evil.example/",
    "/\uff0f/evil.example/",
    "https://evil.example/",
    "javascript:alert(1)",
    " /x",
    "/" + "a" * MAX_NEXT,
    "",
    None,
]

LOCAL = [
    "/",
    "/instances",
    "/lab?x=1",
    "/a?b=//c",
    "/notebooks/My%20File.ipynb",
    "/share/abc_DEF-123",
    "/oauth/authorize?"
    + urlencode({"client_id": "abc", "redirect_uri": "https://abc.apps.example.org/.dit4c/callback", "state": "s"}),
]


@pytest.mark.parametrize("value", HOSTILE)
def test_what_leads_elsewhere_is_the_home_page(value: str | None) -> None:
    assert safeNext(value) == "/"
    assert not isLocalPath(value)


@pytest.mark.parametrize("value", LOCAL)
def test_local_paths_are_kept(value: str) -> None:
    assert safeNext(value) == value


def decodings(value: str) -> list[str]:
    seen = [value]
    while len(seen) < 8 and unquote(seen[-1]) != seen[-1]:
        seen.append(unquote(seen[-1]))
    return seen


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=nextValues())
def test_what_passes_stays_on_the_site_in_a_browser(value: str, browser: Any) -> None:
    result = safeNext(value)
    assert result in ("/", value)
    for form in decodings(result):
        origin = browserOrigin(browser, form, BASE)
        assert origin == "https://portal.example.org", (value, form, origin)
