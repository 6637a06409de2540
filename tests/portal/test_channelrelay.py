"""
Questions for a scheduler whose channel another portal process holds
(dit4c.portal.channelrelay; docs/protocols.md 16), with two scheduler
channel hubs on one real PostgreSQL database, each with its own peers, and
a scheduler (real, with nodes in memory) connected to the first: the second
asks the first for the scheduler's nodes, a node's cool-down and a tool's
output; and says the scheduler is away once it is gone, or once the
process holding its channel is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from support.postgres import PostgresServer
from support.stubnode import StubNode
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.endpoints import serverFromString

from dit4c.channel.questions import Unanswered
from dit4c.channel.wire import InstanceStatus, LogChunk
from dit4c.common.life import State
from dit4c.portal.channel import ChannelHub
from dit4c.portal.channelrelay import AWAY
from dit4c.portal.nodes import NodeUnavailable
from dit4c.portal.pgpeers import PostgresPeers
from dit4c.portal.store import openStore
from dit4c.scheduler.channel import ChannelClient
from dit4c.scheduler.scheduler import Scheduler
from dit4c.testing.scheduler import registerScheduler

ISSUER = "http://portal.test"


class Two:
    """Two portal processes' channel hubs on one database; a scheduler connected to the first."""

    def __init__(self) -> None:
        self.stores: list[Any] = []
        self.peers: list[PostgresPeers] = []
        self.hubs: list[ChannelHub] = []
        self.scheduler: Scheduler | None = None

    async def start(self, url: str) -> None:
        for _ in range(2):
            store = await openStore(url, reactor)
            peers = PostgresPeers(reactor, url)
            peers.startService()
            await peers.listening
            hub = ChannelHub(reactor, store, issuer=ISSUER, peers=peers, pollInterval=None)
            hub.startService()
            self.stores.append(store)
            self.peers.append(peers)
            self.hubs.append(hub)
        listening = self.hubs[0].listen(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
        record, key = await registerScheduler(self.stores[0], "hpc")
        self.schedulerId = record.id
        self.n1 = StubNode("n1")
        self.n1.statuses["i1"] = InstanceStatus("i1", State.RUNNING)
        self.n1.logs = lambda instance, offset, limit: succeed(LogChunk.of(b"the tool said this\n", offset, limit))  # type: ignore[method-assign]
        scheduler = Scheduler([self.n1, StubNode("n2", capacity=4)], reactor=reactor, nodesDelay=0.05)
        port = listening.port.getHost().port  # type: ignore[union-attr]
        scheduler.channel = ChannelClient(reactor, f"ws://127.0.0.1:{port}", record.id, key, scheduler)
        scheduler.startService()
        scheduler.channel.startService()
        await scheduler.channel.whenConnected()
        self.scheduler = scheduler
        await eventually(lambda: self.hubs[0].nodes.of(record.id) is not None, what="the scheduler's nodes")

    async def disconnect(self) -> None:
        if self.scheduler is not None:
            assert self.scheduler.channel is not None
            await self.scheduler.channel.stopService()
            await self.scheduler.stopService()
            self.scheduler = None

    async def stop(self) -> None:
        await self.disconnect()
        for hub in self.hubs:
            await hub.stopService()
        for peers in self.peers:
            if peers.running:
                peers.stopService()
        for store in self.stores:
            await store.close()


@pytest_twisted.async_yield_fixture
async def two(postgresServer: PostgresServer) -> AsyncIterator[Two]:
    name = postgresServer.createDatabase()
    made = Two()
    try:
        await made.start(postgresServer.url(name))
        yield made
    finally:
        await made.stop()
        postgresServer.dropDatabase(name)


@pytest_twisted.ensureDeferred
async def test_the_other_process_asks_the_holder(two: Two) -> None:
    here, there = two.hubs
    sid = two.schedulerId
    assert here.connected(sid) and not there.connected(sid)
    await eventually(lambda: there.reachable(sid), what="the holder recorded")
    nodes = await there.nodesOf(sid)
    assert nodes is not None and sorted(n.node for n in nodes) == ["n1", "n2"]
    done = await there.nodeCommand(sid, "n1", "cool-down")
    assert done.error is None
    assert not two.n1.accepting
    refused = await there.nodeCommand(sid, "n9", "cool-down")
    assert refused.error
    chunk = await there.logs(sid, "i1", None, 1000)
    assert (chunk.text, chunk.error) == ("the tool said this\n", None)


@pytest_twisted.ensureDeferred
async def test_away_once_the_scheduler_or_its_holder_is_gone(two: Two) -> None:
    here, there = two.hubs
    sid = two.schedulerId
    await eventually(lambda: there.reachable(sid), what="the holder recorded")
    # The holding process's link to the others ends (as when it is killed): nobody holds the channel.
    # (Its server-side session leaves pg_stat_activity a moment after the connection closes.)
    two.peers[0].stopService()
    await eventually(lambda: there.reachable(sid).addCallback(lambda up: not up), what="away once the holder left")
    with pytest.raises(Unanswered, match="not connected"):
        await there.logs(sid, "some-instance", None, 1000)
    assert await there.nodesOf(sid) is None
    with pytest.raises(NodeUnavailable):
        await there.nodeCommand(sid, "n1", "cool-down")
    assert AWAY.startswith("The instance's cluster is not connected")
    # Back, then the scheduler leaves: away again, and the record says so.
    two.peers[0].startService()
    await eventually(lambda: there.reachable(sid), what="the holder linked again")
    await two.disconnect()
    await eventually(lambda: not here.connected(sid))
    await eventually(lambda: there.reachable(sid).addCallback(lambda up: not up), what="away after the scheduler left")
    assert await two.stores[1].channelHolder(sid) is None
