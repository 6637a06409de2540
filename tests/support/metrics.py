"""Reading a server's Prometheus figures as a scraper does: over a real socket, parsed by prometheus_client."""

from __future__ import annotations

import treq
from prometheus_client.parser import text_string_to_metric_families

#: Every sample of a scrape, by name and labels (sorted ``(name, value)`` pairs).
Figures = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Figures:
    """Every sample of an exposition, by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(port: int, host: str = "127.0.0.1") -> Figures:
    """``GET /metrics`` at ``host:port`` on a connection of its own (none left open), parsed."""
    response = await treq.get(f"http://{host}:{port}/metrics", persistent=False, timeout=10)
    assert response.code == 200
    return samples(await response.text())
