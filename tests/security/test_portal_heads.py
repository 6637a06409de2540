"""
Generated request heads (hypothesis) thrown at a real ``twistd
dit4c-portal``, one connection each: well-formed and malformed request
lines, every route, hosts, lengths, transfer codings, folded and broken
header lines, cookies and credentials of any shape. Every one is answered
with a whole status line that is not a server error (a 4xx refusal, or the
route's own answer), and the portal logs no exception.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest_twisted
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from security_world import RunningPortal, startPortal

ROUTES = [
    "/", "/login", "/logout", "/events", "/share/abc", "/instances", "/instances/x/stop", "/images/x/share",
    "/health", "/.well-known/jwks.json", "/.well-known/openid-configuration", "/static/app.js", "/.dit4c/channel",
    "/api/v1/me", "/api/v1/instances", "/api/v1/tokens", "/api/v1/openapi.json", "/admin/", "/admin/users",
    "/oauth/authorize", "/oauth/token", "/oauth/userinfo", "/reports/url", "/reports/image-access",
    "/login/github", "/login/github/callback",
]  # fmt: skip

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~", min_size=1, max_size=12)
#: A header value as clients send them: visible ASCII, spaces, some Latin-1.
VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60).map(
    lambda t: t.strip().encode("latin-1")
)
#: Any bytes but CR and LF (where a line's end falls is the generator's business).
RAW = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
QUERY = st.text(alphabet="abc=&%2F?;+/", max_size=24)
ODD_QUERY = st.text(alphabet="abc=&%2F?#;+/ \x01é", max_size=24)


@st.composite
def targets(draw: Any) -> bytes:
    path = draw(st.sampled_from(ROUTES))
    kind = draw(st.sampled_from(["route"] * 10 + ["query"] * 4 + ["odd query", "odd"]))
    if kind.endswith("query"):
        return (path + "?" + draw(QUERY if kind == "query" else ODD_QUERY)).encode()
    if kind == "odd":
        return draw(
            st.sampled_from([b"*", b"http://portal.localhost/health", b"//share/x", b"/%2e%2e/admin/", b"/a%00b", b"/\xff", b""])
        )
    return path.encode()


#: Header lines a client may well send, with values of any shape.
ORDINARY = st.one_of(
    VALUE.map(lambda v: b"Cookie: " + v),
    VALUE.map(lambda v: b"Cookie: dit4c_session=" + v),
    VALUE.map(lambda v: b"Authorization: Bearer " + v),
    VALUE.map(lambda v: b"Authorization: " + v),
    st.sampled_from(
        [b"Content-Type: application/json", b"Content-Type: application/x-www-form-urlencoded",
         b"Content-Type: multipart/form-data; boundary=x", b"Content-Type: multipart/form-data",
         b"Expect: 100-continue", b"Connection: close", b"Connection: keep-alive", b"Accept: text/event-stream",
         b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Version: 13",
         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-Fetch-Site: cross-site", b"Origin: null",
         b"X-Forwarded-For: 10.0.0.1", b"Accept-Encoding: gzip"]
    ),  # fmt: skip
    st.builds(lambda n, v: n.encode() + b": " + v, TOKEN, VALUE),
)
#: Lines no client should send.
BROKEN = st.one_of(
    RAW.map(lambda v: b" folded " + v),  # obs-fold
    RAW.map(lambda v: b"No colon " + v),
    st.builds(lambda n, v: n.encode() + b": " + v, TOKEN, RAW),
    st.sampled_from(
        [b"Host: portal.localhost", b"Host:", b"Host: a b", b"Host: \xc3\xa9", b"Content-Length: -1",
         b"Content-Length: 1e3", b"Content-Length: 99999999999999999999", b"Content-Length:",
         b"Content-Length: 0", b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked, identity",
         b"X : y", b"X-Nul: a\x00b"]
    ),  # fmt: skip
)


def rarely(common: Any, rare: Any, odds: int = 8) -> Any:
    """``rare`` about once in ``odds`` draws, else ``common``."""
    return st.integers(0, odds - 1).flatmap(lambda n: rare if n == 0 else common)


METHODS = rarely(
    st.sampled_from([b"GET"] * 4 + [b"POST"] * 3 + [b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"]),
    st.one_of(st.sampled_from([b"TRACE", b"CONNECT", b"get", b"G ET"]), TOKEN.map(str.encode)),
)
VERSIONS = rarely(st.just(b"HTTP/1.1"), st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/x", b""]))
HOSTS = rarely(st.just(b"portal.localhost"), st.sampled_from([b"portal.localhost:8000", b"[::1]", b"127.0.0.1"]), 4)


@st.composite
def requests(draw: Any) -> bytes:
    version = draw(VERSIONS)
    line = draw(METHODS) + b" " + draw(targets()) + (b" " + version if version else b"")
    lines = [b"Host: " + draw(HOSTS)]
    lines += draw(st.lists(ORDINARY, max_size=5))
    body = b""
    framing = draw(st.sampled_from(["none"] * 4 + ["length", "length", "chunked"]))
    if framing == "length":
        body = draw(st.binary(max_size=300)) if draw(st.booleans()) else b"a=b&csrf=x&username=alice&password=p"
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        data = draw(st.binary(min_size=1, max_size=300))
        lines.append(b"Transfer-Encoding: chunked")
        body = b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n"
    broken = draw(rarely(st.none(), BROKEN.map(lambda b: [b]), 4))
    if broken:
        lines.insert(draw(st.integers(0, len(lines))), broken[0])
    if draw(st.booleans()):
        lines = draw(st.permutations(lines))
    eol = draw(rarely(st.just(b"\r\n"), st.just(b"\n"), 16))
    return line + b"\r\n" + b"".join(x + eol for x in lines) + b"\r\n" + body


def answer(port: int, data: bytes) -> bytes:
    """The status line and headers of the portal's first answer to ``data``."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            try:
                more = s.recv(65536)
            except ConnectionResetError:
                break
            if not more:
                break
            received += more
        return received


@pytest_twisted.async_yield_fixture
async def portal(processes: Any, tmp_path: Path) -> Any:
    yield await startPortal(processes, tmp_path)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests())
def test_every_generated_head_is_answered_without_a_server_error(portal: RunningPortal, request: bytes) -> None:
    received = answer(portal.port, request)
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", received)
    assert match, (request, received[:300])
    event(f"answered {match.group(1).decode()}")
    assert 100 <= int(match.group(1)) < 500 or received.startswith(b"HTTP/1.1 100 "), (request, received[:300])
    log = portal.process.log()
    assert "Traceback" not in log and "Unhandled" not in log and "request failed" not in log, log[-3000:]
