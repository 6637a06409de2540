"""
How helpers reach the portal: over HTTP(S), or over a UNIX socket.

A helper that runs in a pod's network namespace (the podman runtime's auth
helper) cannot reach a portal that listens only on the host's loopback, as
the all-in-one ``dit4c-dev`` does; a UNIX socket crosses network
namespaces (it is a file). ``DIT4C_PORTAL_INTERNAL`` may therefore be
``unix:/path/to/portal.sock``: every request then goes to that socket.
"""

from __future__ import annotations

import json
from typing import Any

from treq import collect
from treq.client import HTTPClient
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

__all__ = ["portalHTTP", "isPortalAddress", "readJSON"]

#: The base URL requests name when they go to a UNIX socket.
SOCKET_BASE = "http://localhost"


@implementer(IAgentEndpointFactory)
class _SocketEndpoints:
    def __init__(self, reactor: Any, path: str, timeout: float) -> None:
        self.reactor = reactor
        self.path = path
        self.timeout = timeout

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self.reactor, self.path, timeout=self.timeout)


def isPortalAddress(value: str) -> bool:
    """Whether ``value`` is a portal address helpers can use: an http(s) URL or ``unix:/path``."""
    return value.startswith(("http://", "https://")) or (value.startswith("unix:/") and len(value) > 6)


def portalHTTP(
    reactor: Any, address: str, *, timeout: float = 10.0, persistent: bool = True
) -> tuple[HTTPClient, str]:
    """
    An HTTP client for the portal at ``address`` and the base URL to give
    it: ``(client, "https://portal.example.org")``, or for ``unix:/path``
    a client bound to that socket and ``"http://localhost"``.
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    if persistent:
        pool.maxPersistentPerHost = 4
        pool.cachedConnectionTimeout = 30
    if address.startswith("unix:"):
        agent = Agent.usingEndpointFactory(reactor, _SocketEndpoints(reactor, address[5:], timeout), pool=pool)
        return HTTPClient(agent), SOCKET_BASE
    return HTTPClient(Agent(reactor, pool=pool, connectTimeout=timeout)), address.rstrip("/")


async def readJSON(response: Any, *, limit: int, failure: type[Exception]) -> tuple[int, Any]:
    """
    ``(status, parsed body)`` of the portal's answer, read at most ``limit``
    bytes of it (a bigger answer is cut off, not held).

    :raises failure: the answer is too large, or not JSON.
    """
    body: list[bytes] = []
    size = 0

    def collector(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise failure("The portal's answer is too large.")
        body.append(data)

    await collect(response, collector)
    try:
        return response.code, json.loads(b"".join(body))
    except ValueError:
        raise failure(f"The portal answered {response.code} without JSON.") from None

