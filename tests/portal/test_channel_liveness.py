"""
A scheduler that stops answering on an open channel (its WebSocket pings
unanswered: a frozen process, a dead link) is dropped after the ping
timeout, on a real loopback WebSocket; until then it stays connected.
"""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString

from dit4c.portal.channel import ChannelHub
from dit4c.portal.store import openStore
from dit4c.testing.scheduler import RawChannel, registerScheduler


@pytest_twisted.ensureDeferred
async def test_a_scheduler_that_stops_answering_is_dropped(tmp_path: Path) -> None:
    store = await openStore(f"sqlite:///{tmp_path / 'portal.db'}", reactor)
    hub = ChannelHub(reactor, store, issuer="http://portal.test", pingInterval=1.0, pingTimeout=2.0, pollInterval=None)
    listening = hub.listen(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    hub.startService()
    raw: RawChannel | None = None
    try:
        assert listening.port is not None
        scheduler, key = await registerScheduler(store, "hpc")
        raw = await RawChannel.connect(reactor, f"ws://127.0.0.1:{listening.port.getHost().port}")  # type: ignore[attr-defined]
        await raw.hello(scheduler.id, key)
        assert (await raw.next())["type"] == "welcome"
        assert raw.protocol is not None and raw.protocol.transport is not None
        # Answering its pings, it stays well past the ping timeout: the
        # portal's fourth ping comes after the first's timeout would have ended it.
        pings: list[bytes] = []
        answer = raw.protocol.onPing

        def onPing(payload: bytes) -> None:
            pings.append(payload)
            answer(payload)

        raw.protocol.onPing = onPing  # type: ignore[method-assign]
        await eventually(lambda: len(pings) >= 4, what=lambda: f"four pings, {len(pings)} came")
        assert hub.connected(scheduler.id)
        # Frozen: it reads nothing more, so answers no ping.
        raw.protocol.transport.pauseProducing()  # type: ignore[attr-defined]
        await eventually(lambda: not hub.connected(scheduler.id), timeout=15, what="a silent scheduler dropped")
        raw.protocol.transport.resumeProducing()  # type: ignore[attr-defined]
        await raw.closed.addTimeout(10, reactor)
    finally:
        if raw is not None and not raw.closed.called:
            raw.abort()
        await hub.stopService()
        await store.close()
