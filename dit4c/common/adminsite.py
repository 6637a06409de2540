"""
A server's admin endpoint: ``/health`` (JSON) and Prometheus ``/metrics``,
served on an endpoint string of its own so that it can stay on loopback or
a private network while the public ports face the internet.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from twisted.web.resource import Resource
from twisted.web.server import Site

__all__ = ["ADMIN_TIMEOUT", "Collector", "adminSite"]


class Collector(Protocol):
    """What prometheus_client asks at each scrape: the figures as they are."""

    def collect(self) -> Iterator[Metric]: ...


class _Health(Resource):
    isLeaf = True

    def __init__(self, health: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.health = health

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps({"status": "ok", **self.health()}).encode()


#: Seconds a connection to the admin endpoint may stay silent before it is closed.
ADMIN_TIMEOUT = 30.0


def adminSite(collector: Collector, health: Callable[[], dict[str, Any]], timeout: float = ADMIN_TIMEOUT) -> Site:
    """
    ``/health`` (``{"status": "ok", ...health()}``) and ``/metrics`` (what
    ``collector`` says); a connection silent for ``timeout`` seconds (a
    half-sent request, an idle kept-alive one) is closed.
    """
    # Imported here: prometheus_client.twisted imports (so installs) the
    # global reactor, which importing a server's modules must never do
    # (twistd installs the one asked for; a fork server forks before it).
    from prometheus_client.twisted import MetricsResource

    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    root = Resource()
    root.putChild(b"health", _Health(health))
    root.putChild(b"metrics", MetricsResource(registry=registry))
    site = Site(root)
    site.displayTracebacks = False
    site.timeOut = timeout
    return site
