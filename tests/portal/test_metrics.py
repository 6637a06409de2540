"""
The portal's Prometheus figures: read from the store every few seconds,
counted as instances change, served on their own endpoint
(``twistd dit4c-portal --metrics``) with ``/health``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from support.metrics import scrape
from support.sockets import RawClient
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString

from dit4c.common.adminsite import adminSite
from dit4c.common.life import State
from dit4c.portal.app import Portal
from dit4c.portal.events import InstanceEvent
from dit4c.portal.metrics import PortalMetrics


@pytest_twisted.ensureDeferred
async def test_the_figures_follow_the_store_and_the_changes(api: Portal) -> None:
    metrics = PortalMetrics(
        api.store, api.events, api.clock, schedulers=lambda: 1, streams=api.streams.count, following=lambda: 0,
        interval=15,
    )  # fmt: skip
    metrics.startService()
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(adminSite(metrics, lambda: {}))
    try:
        number = port.getHost().port  # type: ignore[attr-defined]
        alice = await api.store.userByName("alice")
        first = await api.store.createInstance(alice.id, api.image.id)  # type: ignore[attr-defined]
        await api.store.createInstance(alice.id, api.image.id)  # type: ignore[attr-defined]
        before = await scrape(number)
        assert before[("dit4c_portal_people", ())] == 3  # read at start: alice, bob, root
        assert before[("dit4c_portal_instances", (("state", "requested"),))] == 0  # not read again yet

        api.clock.advance(15)  # type: ignore[attr-defined]
        running = await api.store.updateInstance(first.id, state=State.RUNNING)
        api.events.changed(InstanceEvent(running, first, "state"))
        after = await scrape(number)
        assert after[("dit4c_portal_instances", (("state", "requested"),))] == 2
        assert after[("dit4c_portal_instance_states_reached_total", (("state", "running"),))] == 1
        assert after[("dit4c_portal_schedulers_connected", ())] == 1
        health = await (await treq.get(f"http://127.0.0.1:{number}/health", persistent=False)).json()
        assert health == {"status": "ok"}
    finally:
        await port.stopListening()
        metrics.stopService()


@pytest_twisted.ensureDeferred
async def test_twistd_serves_the_figures_on_their_own_endpoint(processes: Any, tmp_path: Path) -> None:
    proc = processes(
        "dit4c-portal", "--data-dir", str(tmp_path / "portal"), "--listen", "tcp:0:interface=127.0.0.1",
        "--metrics", "tcp:0:interface=127.0.0.1",
    )  # fmt: skip
    port = await proc.waitForPort("portal metrics")
    figures = await scrape(port)
    assert figures[("dit4c_portal_people", ())] == 0
    assert figures[("dit4c_portal_instances", (("state", "running"),))] == 0
    assert (await (await treq.get(f"http://127.0.0.1:{port}/health")).json()) == {"status": "ok", "people": 0}
    # Not on the public port.
    public = await proc.waitForPort("portal")
    assert (await treq.get(f"http://127.0.0.1:{public}/metrics")).code == 404


@pytest_twisted.ensureDeferred
async def test_a_half_sent_request_to_the_figures_is_closed(api: Portal) -> None:
    """The admin endpoint's deadline: a client that stops mid-request is let go, and holds nothing."""
    metrics = PortalMetrics(api.store, api.events, api.clock, schedulers=lambda: 0, streams=lambda: 0, following=lambda: 0)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(adminSite(metrics, lambda: {}, timeout=0.5))
    try:
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)  # type: ignore[attr-defined]
        client.transport.write(b"GET /metrics HTTP/1.1\r\nHost: a")  # and never the rest
        await client.done.addTimeout(10, reactor)  # closed by the server, not by this test
    finally:
        await port.stopListening()
