"""
What every WebSocket of DIT4C shares: how its factories are set up, how a
``ws://`` or ``wss://`` URL is dialled, and which certificates a ``wss://``
client trusts.

The tunnel's WebSocket carrier (:mod:`dit4c.tunnel.websocket`) and the
channel links (:mod:`dit4c.channel`: portal-scheduler, scheduler-node) use
these, so a limit or a trust rule is set in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hyperlink import URL
from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint

__all__ = ["configureFactory", "trustRoot", "webSocketEndpoint"]


def trustRoot(path: str | Path | None) -> Any:
    """
    The certificates a ``wss://`` client trusts instead of the system's:
    ``path`` is a PEM file, or a directory whose ``*.pem`` and ``*.crt``
    files are all trusted. None (or empty): the system's roots.
    """
    if not path:
        return None
    p = Path(path)
    files = sorted(p.glob("*.pem")) + sorted(p.glob("*.crt")) if p.is_dir() else [p]
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read_bytes()) for f in files])


def webSocketEndpoint(
    reactor: Any, url: str, *, trustRoots: str | Path | None = None, timeout: float = 30
) -> IStreamClientEndpoint:
    """
    The endpoint that reaches a ``ws://`` or ``wss://`` URL; over ``wss://``
    the server's certificate is checked for the URL's host name
    (service-identity).

    :raises ValueError: not a ``ws://`` or ``wss://`` URL with a host.
    """
    parsed = URL.from_text(url)
    if parsed.scheme not in ("ws", "wss") or not parsed.host:
        raise ValueError(f"a WebSocket URL is ws:// or wss://, not {url!r}")
    secure = parsed.scheme == "wss"
    port = parsed.port or (443 if secure else 80)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, parsed.host, port, timeout=timeout)
    if secure:
        options = ssl.optionsForClientTLS(parsed.host, trustRoot=trustRoot(trustRoots))
        endpoint = wrapClientTLS(options, endpoint)
    return endpoint


def configureFactory(
    factory: Any,
    *,
    maxMessage: int,
    openHandshakeTimeout: float,
    closeHandshakeTimeout: float = 5,
    pingInterval: float | None = None,
    pingTimeout: float | None = None,
) -> None:
    """
    The limits of one kind of WebSocket, the same on both of its ends: the
    largest frame and message (a larger one closes the connection with
    1009, said in a close frame rather than by dropping it), and bounds on
    the opening and closing handshakes. With ``pingInterval``, WebSocket
    pings go out that often and a peer silent for ``pingTimeout`` is
    dropped (a link with heartbeats of its own, the tunnel, needs none).
    """
    factory.noisy = False
    options: dict[str, Any] = {
        "maxFramePayloadSize": maxMessage,
        "maxMessagePayloadSize": maxMessage,
        "openHandshakeTimeout": openHandshakeTimeout,
        "closeHandshakeTimeout": closeHandshakeTimeout,
        "failByDrop": False,
    }
    if pingInterval is not None:
        options["autoPingInterval"] = pingInterval
        options["autoPingTimeout"] = pingTimeout if pingTimeout is not None else 3 * pingInterval
    factory.setProtocolOptions(**options)
