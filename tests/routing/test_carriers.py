"""
Tunnels over TLS (with the routing server's name checked) and over
WebSocket, and public HTTPS routed by SNI, on real loopback sockets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from support.routing import Routing, stopRouting
from support.sockets import RawClient
from support.tls import makeCertificate
from support.waiting import eventually
from twisted.internet import reactor, ssl
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    serverFromString,
    wrapClientTLS,
)

from dit4c.routing.server import RoutingServer

DOMAIN = "dit4c.test"


async def tlsRouting(signing: Any, tmp_path: Path) -> tuple[Routing, Path, Path, int]:
    """
    A routing server whose tunnel ports have a certificate for ``localhost``
    and whose public HTTPS port has a wildcard one for ``*.dit4c.test``
    (a wildcard needs a name below a two-label domain).
    """
    key, cert = makeCertificate(tmp_path / "tunnel-ca", "localhost")
    publicKey, publicCert = makeCertificate(tmp_path / "public-ca", DOMAIN, f"*.{DOMAIN}")
    server = RoutingServer(reactor, signing.verifier(), DOMAIN, drainTimeout=1.0)
    tls = f"interface=127.0.0.1:privateKey={key}:certKey={cert}"
    tunnel = server.addTunnelEndpoint(serverFromString(reactor, f"ssl:0:{tls}"))
    ws = server.addTunnelWebSocketEndpoint(serverFromString(reactor, f"ssl:0:{tls}"))
    public = server.addPublicEndpoint(
        serverFromString(reactor, f"ssl:0:interface=127.0.0.1:privateKey={publicKey}:certKey={publicCert}"),
        "https",
    )
    server.startService()
    routing = Routing(server, tunnel.port.getHost().port, public.port.getHost().port)  # type: ignore[union-attr]
    return routing, tmp_path / "tunnel-ca", tmp_path / "public-ca", ws.port.getHost().port  # type: ignore[union-attr]


async def httpsGet(port: int, sni: str, host: str, trust: Path, path: str = "/headers") -> bytes:
    root = ssl.Certificate.loadPEM((trust / "cert.pem").read_bytes())
    options = ssl.optionsForClientTLS(sni, trustRoot=root)
    client = RawClient()
    await connectProtocol(wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port)), client)
    client.transport.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    return await client.done


@pytest_twisted.ensureDeferred
async def test_tls_tunnel_and_https_routed_by_sni(signing: Any, backend: Any, tmp_path: Path) -> None:
    routing, trust, public, _ = await tlsRouting(signing, tmp_path)
    try:
        listener = await routing.listen(
            signing.token("secure"), backend.endpoint, routing=f"tls:localhost:{routing.tunnelPort}:trustRoots={trust}"
        )
        welcome = (await listener.whenRegistered()).welcome
        assert welcome["url"] == f"https://secure.{DOMAIN}:{routing.httpPort}/"

        answer = await httpsGet(routing.httpPort, f"secure.{DOMAIN}", f"secure.{DOMAIN}", public)
        assert answer.startswith(b"HTTP/1.1 200")
        assert b'"X-Forwarded-Proto": ["https"]' in answer
        # A Host that does not match the TLS server name is refused.
        answer = await httpsGet(routing.httpPort, f"secure.{DOMAIN}", f"other.{DOMAIN}", public)
        assert answer.startswith(b"HTTP/1.1 421")
    finally:
        await stopRouting(routing)


@pytest_twisted.ensureDeferred
async def test_tls_tunnel_checks_the_routing_servers_name(signing: Any, backend: Any, tmp_path: Path) -> None:
    routing, trust, _, _ = await tlsRouting(signing, tmp_path)
    try:
        # The certificate is for localhost; dialling it as 127.0.0.1 must fail
        # the service-identity check, so the tunnel never comes up.
        listener = await routing.listen(
            signing.token("wrongname"),
            backend.endpoint,
            routing=f"tls:127.0.0.1:{routing.tunnelPort}:trustRoots={trust}",
            wait=False,
        )
        await eventually(lambda: listener.lastError is not None)
        assert len(routing.server.registry) == 0
        assert listener.welcome is None
        # And a certificate that nobody trusts is refused too.
        other = tmp_path / "untrusted"
        makeCertificate(other, "localhost")
        stranger = await routing.listen(
            signing.token("stranger"),
            backend.endpoint,
            routing=f"tls:localhost:{routing.tunnelPort}:trustRoots={other}",
            wait=False,
        )
        await eventually(lambda: stranger.lastError is not None)
        assert len(routing.server.registry) == 0
        assert stranger.welcome is None
    finally:
        await stopRouting(routing)


@pytest_twisted.ensureDeferred
async def test_tunnel_over_websocket(signing: Any, backend: Any, tmp_path: Path) -> None:
    routing, trust, public, wsPort = await tlsRouting(signing, tmp_path)
    try:
        url = f"wss\\://localhost\\:{wsPort}/.dit4c/tunnel"
        listener = await routing.listen(
            signing.token("wsi"), backend.endpoint, routing=f"dit4c-ws:url={url}:trustRoots={trust}"
        )
        assert (await listener.whenRegistered()).welcome["host"] == f"wsi.{DOMAIN}"
        answer = await httpsGet(routing.httpPort, f"wsi.{DOMAIN}", f"wsi.{DOMAIN}", public, "/bytes?n=3000000")
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200")
        from hashlib import sha256

        from support.backend import patternDigest

        assert sha256(body).hexdigest() == patternDigest(3000000)
    finally:
        await stopRouting(routing)
