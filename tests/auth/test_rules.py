"""The auth helper's rules without sockets: PKCE, flow cookies, cookie headers, paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from dit4c.auth.errors import InvalidFlow
from dit4c.auth.session import (
    FlowCookies,
    clearCookie,
    deriveKey,
    isNavigation,
    parseCookies,
    publicBase,
    safeNext,
    setCookie,
    stripCookies,
)
from dit4c.common.keys import generatePrivateKey, savePrivateKey

KEY = b"k" * 32


def test_flow_cookie_round_trip() -> None:
    flows = FlowCookies(KEY)
    flow, cookie = flows.start("/lab?x=1", now=1000)
    assert flows.check(cookie, flow.state, now=1001) == flow
    assert flow.next == "/lab?x=1" and flow.expires == 1600


@pytest.mark.parametrize(
    "mutate, state, now, why",
    [
        (lambda c: c, "wrong", 1001, "does not belong"),
        (lambda c: c, "", 1001, "does not belong"),
        (lambda c: c, None, 1700, "too long"),
        (lambda c: c[:-2] + (b"AA" if c[-2:] != b"AA" else b"BB"), None, 1001, "not made here"),
        (lambda c: c.replace(b"v1.", b"v2."), None, 1001, "not made here"),
        (lambda c: b"garbage", None, 1001, "malformed"),
        (lambda c: b"", None, 1001, "no login"),
    ],
)
def test_flow_cookie_refusals(mutate, state, now, why) -> None:  # type: ignore[no-untyped-def]
    flows = FlowCookies(KEY)
    flow, cookie = flows.start("/", now=1000)
    with pytest.raises(InvalidFlow, match=why):
        flows.check(mutate(cookie), flow.state if state is None else state, now=now)


def test_a_flow_cookie_from_another_key_is_refused() -> None:
    flow, cookie = FlowCookies(b"x" * 32).start("/", now=0)
    with pytest.raises(InvalidFlow, match="not made here"):
        FlowCookies(KEY).check(cookie, flow.state, now=1)
    with pytest.raises(ValueError):
        FlowCookies(b"short")


def test_keys_derive_from_the_instance_key(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pem", tmp_path / "b.pem"
    savePrivateKey(generatePrivateKey(), a)
    savePrivateKey(generatePrivateKey(), b)
    assert deriveKey(a, "i1", "flow-cookie") == deriveKey(a, "i1", "flow-cookie")
    assert len(deriveKey(a, "i1", "flow-cookie")) == 32
    assert deriveKey(a, "i1", "flow-cookie") != deriveKey(a, "i2", "flow-cookie")
    assert deriveKey(a, "i1", "flow-cookie") != deriveKey(b, "i1", "flow-cookie")
    assert deriveKey(a, "i1", "flow-cookie") != deriveKey(a, "i1", "other")


def test_cookies_are_stripped_byte_for_byte() -> None:
    ours = frozenset((b"dit4c_auth", b"dit4c_auth_flow"))
    headers = [b"a=1; dit4c_auth=tok; b=\"x y\"", b"dit4c_auth_flow=f;c=3;;"]
    assert stripCookies(headers, ours) == b'a=1; b="x y"; c=3'
    assert stripCookies([b"dit4c_auth=t"], ours) is None
    assert stripCookies([b"dit4c_authx=t"], ours) == b"dit4c_authx=t"
    assert parseCookies(headers)[1] == (b"dit4c_auth", b"tok")


def test_cookie_attributes() -> None:
    assert setCookie(b"n", b"v", secure=False, maxAge=60) == b"n=v; Path=/; HttpOnly; SameSite=Lax; Max-Age=60"
    assert setCookie(b"n", b"v", secure=True, maxAge=60).endswith(b"; Secure")
    assert clearCookie(b"n", secure=False) == b"n=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("/lab", "/lab"),
        ("/a?b=c", "/a?b=c"),
        ("//evil.example/", "/"),
        ("/\\evil", "/"),
        ("http://evil.example/", "/"),
        ("", "/"),
        (None, "/"),
        ("/" + "a" * 3000, "/"),
        ("/a\r\nSet-Cookie: x", "/"),
    ],
)
def test_only_local_paths_are_returned_to(value: str | None, expected: str) -> None:
    assert safeNext(value) == expected


def test_what_counts_as_a_page_load() -> None:
    html = [(b"Accept", b"text/html,*/*")]
    assert isNavigation(b"GET", html, upgrade=False)
    assert isNavigation(b"HEAD", html, upgrade=False)
    assert not isNavigation(b"POST", html, upgrade=False)
    assert not isNavigation(b"GET", html, upgrade=True)
    assert not isNavigation(b"GET", [(b"Accept", b"application/json")], upgrade=False)
    assert not isNavigation(b"GET", [*html, (b"Sec-Fetch-Mode", b"cors")], upgrade=False)
    assert isNavigation(b"GET", [(b"Sec-Fetch-Mode", b"navigate"), (b"Sec-Fetch-Dest", b"document")], upgrade=False)
    assert not isNavigation(b"GET", [(b"Sec-Fetch-Mode", b"navigate"), (b"Sec-Fetch-Dest", b"iframe")], upgrade=False)


def test_public_base_from_host_and_proto() -> None:
    assert publicBase(b"abc.localhost:8080", None) == "http://abc.localhost:8080"
    assert publicBase(b"abc.example.org", b"https") == "https://abc.example.org"
    assert publicBase(b"abc.example.org", b"gopher") == "http://abc.example.org"
    assert publicBase(b"[::1]:8080", b"http") == "http://[::1]:8080"
    for bad in (None, b"", b"evil.example/path", b"a b", b"x@evil", b"h:99999999"):
        assert publicBase(bad, None) is None
