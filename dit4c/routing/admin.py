"""
The routing server's admin endpoint: ``/health`` and Prometheus ``/metrics``.

Served on its own endpoint string so that it can stay on loopback or a
private network while the public ports face the internet.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.web.server import Site

from dit4c.common import adminsite as common

if TYPE_CHECKING:
    from dit4c.routing.server import RoutingServer


class RoutingCollector:
    """Reads the live figures at scrape time: nothing is counted twice."""

    def __init__(self, server: RoutingServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        tunnels = server.registry.tunnels()
        sessions = [t.session for t in tunnels if t.session is not None]
        m = server.metrics
        yield GaugeMetricFamily("dit4c_routing_tunnels", "Tunnels registered now.", value=len(tunnels))
        yield GaugeMetricFamily(
            "dit4c_routing_streams", "Streams open now over all tunnels.", value=sum(s.streamCount for s in sessions)
        )
        yield GaugeMetricFamily(
            "dit4c_routing_public_connections", "Public connections open now.", value=m.open
        )
        buffered = GaugeMetricFamily(
            "dit4c_routing_tunnel_buffered_bytes", "Bytes held for paused readers, all tunnels."
        )
        buffered.add_metric([], sum(s.recvBuffered for s in sessions))
        yield buffered
        bytes_ = CounterMetricFamily(
            "dit4c_routing_bytes", "Bytes through public connections.", labels=["direction"]
        )
        bytes_.add_metric(["in"], m.bytesIn)
        bytes_.add_metric(["out"], m.bytesOut)
        yield bytes_
        yield CounterMetricFamily("dit4c_routing_requests", "Request heads routed.", value=m.requests)
        yield CounterMetricFamily(
            "dit4c_routing_connections", "Public connections accepted.", value=m.connections
        )
        errors = CounterMetricFamily("dit4c_routing_errors", "Errors by kind.", labels=["kind"])
        for kind, count in sorted(m.errors.items()):
            errors.add_metric([kind], count)
        yield errors


def adminSite(server: RoutingServer) -> Site:
    return common.adminSite(RoutingCollector(server), lambda: {"tunnels": len(server.registry)})
