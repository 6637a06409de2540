"""Helpers reach the portal over HTTP or over a UNIX socket (which crosses network namespaces)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from dit4c.common.errors import HelperEnvironmentError
from dit4c.common.helperenv import fromEnvironment
from dit4c.common.portalhttp import portalHTTP

BASE = {"DIT4C_INSTANCE": "abc", "DIT4C_INSTANCE_KEY": "/k", "DIT4C_PORTAL": "http://localhost:8000"}


@pytest_twisted.ensureDeferred
async def test_requests_go_to_the_socket(tmp_path: Path) -> None:
    root = Resource()
    root.putChild(b"hello", Data(b"from the portal", "text/plain"))
    socket = tmp_path / "portal.sock"
    port = await serverFromString(reactor, f"unix:{socket}").listen(Site(root))
    try:
        http, base = portalHTTP(reactor, f"unix:{socket}", persistent=False)
        assert base == "http://localhost"
        response = await http.get(base + "/hello")
        assert response.code == 200
        assert await response.content() == b"from the portal"
    finally:
        await port.stopListening()


def test_urls_keep_their_base() -> None:
    _, base = portalHTTP(reactor, "https://portal.example.org/", persistent=False)
    assert base == "https://portal.example.org"


def test_the_environment_takes_a_socket() -> None:
    env = fromEnvironment({**BASE, "DIT4C_PORTAL_INTERNAL": "unix:/run/dit4c/portal.sock"})
    assert env.portalBase == "unix:/run/dit4c/portal.sock"
    with pytest.raises(HelperEnvironmentError, match="DIT4C_PORTAL_INTERNAL"):
        fromEnvironment({**BASE, "DIT4C_PORTAL_INTERNAL": "ftp://x"})
    with pytest.raises(HelperEnvironmentError, match="DIT4C_PORTAL is not set"):
        fromEnvironment({"DIT4C_INSTANCE": "abc", "DIT4C_INSTANCE_KEY": "/k"})
    with pytest.raises(HelperEnvironmentError, match="not an instance id"):
        fromEnvironment({**BASE, "DIT4C_INSTANCE": "Not_An_Id"})
