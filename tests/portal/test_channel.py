"""
The scheduler channel, portal side, over a real loopback WebSocket: a
ChannelHub on an SQLite store and the real reactor, with the testing
scheduler (the real channel client) or a bare client on the other end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from dit4c.channel.handshake import signProof
from dit4c.channel.questions import Unanswered
from dit4c.channel.wire import MAX_MESSAGE, CloseCode, LogChunk
from dit4c.common.keys import generatePrivateKey, publicJWK
from dit4c.common.life import State
from dit4c.portal.channel import (
    ChannelHub,
    IInstanceEvents,
)
from dit4c.portal.channelupdates import LOST_REASON
from dit4c.portal.events import InstanceEvent
from dit4c.portal.store import Conflict, Instance, openStore
from dit4c.testing.scheduler import RawChannel, TestingScheduler, registerScheduler

ISSUER = "http://portal.test"


# -- the harness ---------------------------------------------------------------------------


@dataclass
class Harness:
    store: Any
    hub: ChannelHub
    url: str
    user: Any
    image: Any
    sims: list[TestingScheduler] = field(default_factory=list)
    raws: list[RawChannel] = field(default_factory=list)

    async def scheduler(self, name: str = "hpc") -> tuple[Any, Any]:
        return await registerScheduler(self.store, name)

    async def instance(self, scheduler_id: str) -> Instance:
        instance: Instance = await self.store.createInstance(self.user.id, self.image.id, scheduler_id=scheduler_id)
        return instance

    async def connect(self, scheduler: Any, key: Any, sim: TestingScheduler | None = None, **kw: Any) -> TestingScheduler:
        sim = sim or TestingScheduler(reactor)
        if sim not in self.sims:
            self.sims.append(sim)
        sim.connect(self.url, scheduler.id, key, **kw)
        assert sim.client is not None
        await sim.client.whenConnected().addTimeout(5, reactor)
        return sim

    async def raw(self, **kw: Any) -> RawChannel:
        channel = await RawChannel.connect(reactor, self.url, **kw)
        self.raws.append(channel)
        return channel

    async def authenticated(self, scheduler: Any, key: Any) -> RawChannel:
        channel = await self.raw()
        await channel.hello(scheduler.id, key)
        welcome = await channel.next()
        assert welcome["type"] == "welcome", welcome
        return channel


@pytest_twisted.async_yield_fixture
async def portal(tmp_path: Path) -> Any:
    store = await openStore(f"sqlite://{tmp_path}/portal.db", reactor)
    hub = ChannelHub(reactor, store, issuer=ISSUER, handshakeTimeout=3.0, pollInterval=None)
    listening = hub.listen(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    hub.startService()
    assert listening.port is not None
    url = f"ws://127.0.0.1:{listening.port.getHost().port}"  # type: ignore[attr-defined]
    user = await store.createUser("alice")
    image = await store.createImage("Jupyter", "quay.io/jupyter/base-notebook", port=8888)
    harness = Harness(store, hub, url, user, image)
    try:
        yield harness
    finally:
        for sim in harness.sims:
            await sim.stop()
        for raw in harness.raws:
            raw.abort()
        await hub.stopService()
        for raw in harness.raws:
            await raw.closed
        await store.close()


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every message logged during the test, formatted."""
    messages: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        messages.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield messages
    globalLogPublisher.removeObserver(observer)


def stateIs(store: Any, instance_id: str, state: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        instance = await store.instanceById(instance_id)
        return bool(instance.state == state)

    return check


# -- the handshake -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_handshake(portal: Harness) -> None:
    scheduler, key = await portal.scheduler()
    raw = await portal.raw()
    challenge = await raw.hello(scheduler.id, key)
    assert challenge["portal"] == ISSUER
    assert len(challenge["nonce"]) == 43 and "=" not in challenge["nonce"]  # 32 random bytes, base64url
    welcome = await raw.next()
    assert welcome == {"type": "welcome", "scheduler": scheduler.id, "ping": 10.0, "timeout": 30.0}
    assert portal.hub.connected(scheduler.id)
    assert portal.hub.connectedSchedulers() == [scheduler.id]


@pytest_twisted.ensureDeferred
async def test_testing_scheduler_connects(portal: Harness) -> None:
    scheduler, key = await portal.scheduler()
    assert not portal.hub.connected(scheduler.id)
    sim = await portal.connect(scheduler, key)
    assert sim.client is not None and sim.client.connected
    assert portal.hub.connected(scheduler.id)
    await sim.stop()
    await eventually(lambda: not portal.hub.connected(scheduler.id))


@pytest_twisted.ensureDeferred
async def test_the_portal_asks_a_scheduler_for_a_tools_output(portal: Harness) -> None:
    """
    A question down the channel and its answer; one asked of a scheduler
    that is away fails at once, and one open when the channel drops fails
    then, never waiting for its deadline.
    """
    scheduler, key = await portal.scheduler()
    sim = await portal.connect(scheduler, key)
    instance = await portal.instance(scheduler.id)
    sim.setState(instance.id, "running")
    sim.output[instance.id] = b"hello from the tool\n"
    chunk = await portal.hub.logs(scheduler.id, instance.id, 6, 100)
    assert (chunk.offset, chunk.next, chunk.text, chunk.error) == (6, 20, "from the tool\n", None)
    chunk = await portal.hub.logs(scheduler.id, "elsewhere1", None, 100)
    assert chunk.text == "" and "holds instance elsewhere1" in (chunk.error or "")

    held: Deferred[LogChunk] = Deferred()
    sim.logs = lambda *_: held  # type: ignore[method-assign]
    asked = portal.hub.logs(scheduler.id, instance.id, None, 100)
    await sim.stop()
    with pytest.raises(Unanswered, match="went away"):
        await asked
    with pytest.raises(Unanswered, match="not connected"):
        await portal.hub.logs(scheduler.id, instance.id, None, 100)


async def _refused(portal: Harness, raw: RawChannel, reason: str, logged: list[str]) -> None:
    code, text = await raw.closed
    assert code == CloseCode.AUTH_FAILED
    assert text is not None and reason in text
    assert any(reason in line and "closing the channel" in line for line in logged)
    assert portal.hub.connectedSchedulers() == []


@pytest_twisted.ensureDeferred
async def test_unknown_scheduler_refused(portal: Harness, logged: list[str]) -> None:
    raw = await portal.raw()
    await raw.hello("nobody", generatePrivateKey())
    await _refused(portal, raw, "unknown scheduler", logged)


@pytest_twisted.ensureDeferred
async def test_disabled_scheduler_refused(portal: Harness, logged: list[str]) -> None:
    scheduler, key = await portal.scheduler()
    await portal.store.updateScheduler(scheduler.id, disabled=True)
    raw = await portal.raw()
    await raw.hello(scheduler.id, key)
    await _refused(portal, raw, "scheduler disabled", logged)


@pytest_twisted.ensureDeferred
async def test_wrong_key_refused(portal: Harness, logged: list[str]) -> None:
    scheduler, _ = await portal.scheduler()
    raw = await portal.raw()
    await raw.hello(scheduler.id, generatePrivateKey())
    await _refused(portal, raw, "bad proof: unknown key", logged)


@pytest_twisted.ensureDeferred
async def test_expired_proof_refused(portal: Harness, logged: list[str]) -> None:
    scheduler, key = await portal.scheduler()
    past = Clock()
    past.advance(time.time() - 300)
    raw = await portal.raw()
    await raw.hello(scheduler.id, key, clock=past)
    await _refused(portal, raw, "bad proof: token expired", logged)


@pytest.mark.parametrize("firstStillOpen", [True, False])
@pytest_twisted.ensureDeferred
async def test_replayed_proof_refused(portal: Harness, logged: list[str], firstStillOpen: bool) -> None:
    """A proof answers one challenge: the very proof that opened a channel opens no other."""
    scheduler, key = await portal.scheduler()
    first = await portal.raw()
    challenge = await first.next()
    proof = signProof(key, scheduler.id, challenge["nonce"], ISSUER)
    first.send({"type": "hello", "scheduler": scheduler.id, "proof": proof})
    assert (await first.next())["type"] == "welcome"
    if not firstStillOpen:
        await first.close()
        await eventually(lambda: not portal.hub.connected(scheduler.id))
    second = await portal.raw()
    await second.next()
    second.send({"type": "hello", "scheduler": scheduler.id, "proof": proof})
    code, text = await second.closed
    assert code == CloseCode.AUTH_FAILED
    assert text is not None and "does not answer this challenge" in text
    assert any("does not answer this challenge" in line for line in logged)
    # The channel that had authenticated is untouched.
    assert portal.hub.connected(scheduler.id) is firstStillOpen


@pytest.mark.parametrize(
    "how, reason",
    [
        ({"lifetime": 3600}, "valid for longer than 60 s"),
        ({"audience": "dit4c-routing"}, "wrong audience"),
        ({"portal": "https://evil.example"}, "for another portal"),
        ({"sub": "someone-else"}, "names another scheduler"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_proofs_refused(portal: Harness, logged: list[str], how: dict[str, Any], reason: str) -> None:
    scheduler, key = await portal.scheduler()
    raw = await portal.raw()
    await raw.hello(scheduler.id, key, **how)
    await _refused(portal, raw, reason, logged)


@pytest.mark.parametrize(
    "message, reason",
    [
        ({"type": "hello", "scheduler": "x"}, "proof must be a non-empty string"),
        ({"type": "state", "instance": "abc", "state": "running"}, "expected a hello"),
        ("not json", "malformed JSON"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_hello_is_a_protocol_error(portal: Harness, logged: list[str], message: Any, reason: str) -> None:
    raw = await portal.raw()
    await raw.next()
    raw.send(message)
    code, text = await raw.closed
    assert code == CloseCode.PROTOCOL_ERROR and text is not None and reason in text


@pytest_twisted.ensureDeferred
async def test_handshake_timeout(portal: Harness, logged: list[str]) -> None:
    """A peer that sends no hello is closed once the hub's handshake timeout (on its clock) has passed."""
    ticks = Clock()
    hub = ChannelHub(ticks, portal.store, issuer=ISSUER, clock=reactor, handshakeTimeout=0.2, pollInterval=None)
    listening = hub.listen(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    hub.startService()
    try:
        raw = await RawChannel.connect(reactor, f"ws://127.0.0.1:{listening.port.getHost().port}")  # type: ignore[union-attr]
        portal.raws.append(raw)
        assert (await raw.next())["type"] == "challenge"
        ticks.advance(0.2)
        code, text = await raw.closed.addTimeout(5, reactor)
        assert code == CloseCode.HANDSHAKE_TIMEOUT
        assert any("no valid hello within 0.2 s" in line for line in logged)
    finally:
        await hub.stopService()


@pytest_twisted.ensureDeferred
async def test_wrong_path_or_subprotocol_refused(portal: Harness) -> None:
    with pytest.raises(Exception, match="not opened"):
        await portal.raw(protocols=[])
    with pytest.raises(Exception, match="not opened"):
        await RawChannel.connect(reactor, portal.url + "/elsewhere")


@pytest_twisted.ensureDeferred
async def test_new_channel_replaces_old(portal: Harness) -> None:
    scheduler, key = await portal.scheduler()
    instance = await portal.instance(scheduler.id)
    old = await portal.authenticated(scheduler, key)
    new = await portal.authenticated(scheduler, key)
    code, text = await old.closed
    assert code == CloseCode.REPLACED
    assert portal.hub.connected(scheduler.id)
    await portal.hub.send(scheduler.id, "start", instance.id, {"image": "x"})
    command = await new.next()
    assert (command["type"], command["instance"]) == ("command", instance.id)


# -- commands down -----------------------------------------------------------------------------


async def _acked(portal: Harness, commandId: str) -> None:
    async def acked() -> bool:
        command = await portal.store.commandById(commandId)
        return command is not None and command.acked is not None

    await eventually(acked)


@pytest_twisted.ensureDeferred
async def test_commands_delivered_and_acked(portal: Harness) -> None:
    scheduler, key = await portal.scheduler()
    instance = await portal.instance(scheduler.id)
    raw = await portal.authenticated(scheduler, key)
    commandId = await portal.hub.send(scheduler.id, "start", instance.id, {"image": "quay.io/x", "port": 8888})
    command = await raw.next()
    assert command == {
        "type": "command",
        "id": commandId,
        "op": "start",
        "instance": instance.id,
        "params": {"image": "quay.io/x", "port": 8888},
    }
    assert [c.id for c in await portal.store.pendingCommands(scheduler.id)] == [commandId]
    raw.send({"type": "ack", "id": commandId})
    await _acked(portal, commandId)
    assert await portal.store.pendingCommands(scheduler.id) == []


@pytest_twisted.ensureDeferred
async def test_commands_reach_the_testing_scheduler(portal: Harness) -> None:
    scheduler, key = await portal.scheduler()
    instance = await portal.instance(scheduler.id)
    sim = await portal.connect(scheduler, key)
    commandId = await portal.hub.send(scheduler.id, "start", instance.id, {"image": "quay.io/x"})
    await _acked(portal, commandId)
    assert [(c.id, c.op, c.instance, dict(c.params)) for c in sim.handled] == [
        (commandId, "start", instance.id, {"image": "quay.io/x"})
    ]


@pytest_twisted.ensureDeferred
async def test_commands_wait_for_the_scheduler(portal: Harness) -> None:
    scheduler, key = await portal.scheduler()
    first = await portal.instance(scheduler.id)
    second = await portal.instance(scheduler.id)
    ids = [
        await portal.hub.send(scheduler.id, "start", first.id, {"image": "a"}),
        await portal.hub.send(scheduler.id, "start", second.id, {"image": "b"}),
        await portal.hub.send(scheduler.id, "stop", first.id),
    ]
    raw = await portal.authenticated(scheduler, key)
    received = [await raw.next() for _ in ids]
    assert [m["id"] for m in received] == ids
    assert [m["op"] for m in received] == ["start", "start", "stop"]
    # Not acknowledged: sent again on the next channel, in the same order.
    raw.send({"type": "ack", "id": ids[0]})
    await _acked(portal, ids[0])
    raw.abort()
    await raw.closed
    again = await portal.authenticated(scheduler, key)
    assert [(await again.next())["id"] for _ in ids[1:]] == ids[1:]


@pytest_twisted.ensureDeferred
async def test_commands_sent_while_away_reach_the_testing_scheduler(portal: Harness) -> None:
    scheduler, key = await portal.scheduler()
    instances = [await portal.instance(scheduler.id) for _ in range(3)]
    ids = [await portal.hub.send(scheduler.id, "start", i.id, {"image": "x"}) for i in instances]
    sim = await portal.connect(scheduler, key)
    for commandId in ids:
        await _acked(portal, commandId)
    assert [c.id for c in sim.handled] == ids
    for instance in instances:
        await eventually(stateIs(portal.store, instance.id, "running"))


@pytest_twisted.ensureDeferred
async def test_duplicate_delivery_handled_once(portal: Harness, logged: list[str]) -> None:
    """The connection drops after the scheduler handled a command but before its ack arrived."""
    scheduler, key = await portal.scheduler()
    instance = await portal.instance(scheduler.id)
    sim = await portal.connect(scheduler, key)
    assert sim.client is not None
    drops: list[str] = []

    def dropOnce(command: Any) -> None:
        if not drops:
            drops.append(command.id)
            assert sim.client is not None
            sim.client.dropConnection()

    sim.beforeAck = dropOnce
    commandId = await portal.hub.send(scheduler.id, "start", instance.id, {"image": "x"})
    await _acked(portal, commandId)
    assert drops == [commandId]
    # Delivered twice (before and after the reconnect), handled once.
    assert [c.id for c in sim.handled] == [commandId]
    assert sum("channel to the portal open" in line for line in logged) == 2
    await eventually(stateIs(portal.store, instance.id, "running"))
    assert sim.history.count((instance.id, "starting")) == 1


@pytest_twisted.ensureDeferred
async def test_command_for_another_schedulers_instance_refused(portal: Harness) -> None:
    scheduler, _ = await portal.scheduler()
    other, _ = await portal.scheduler("other")
    instance = await portal.instance(other.id)
    with pytest.raises(Conflict):
        await portal.hub.send(scheduler.id, "start", instance.id, {})
    with pytest.raises(ValueError):
        await portal.hub.send(other.id, "explode", instance.id, {})


# -- states up -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_states_reach_store_and_subscribers(portal: Harness) -> None:
    scheduler, key = await portal.scheduler()
    instance = await portal.instance(scheduler.id)
    byUser: list[InstanceEvent] = []
    byInstance: list[InstanceEvent] = []
    everything: list[InstanceEvent] = []
    portal.hub.subscribe(portal.user.id, byUser.append)
    unsubscribe = portal.hub.subscribe(instance.id, byInstance.append)
    portal.hub.subscribe(None, everything.append)
    sim = await portal.connect(scheduler, key, sim=TestingScheduler(reactor, delays={"save": 0.01}))
    await portal.hub.send(scheduler.id, "start", instance.id, {"image": "x"})
    await eventually(lambda: any(e.instance.state == "running" for e in byUser))
    stored = await portal.store.instanceById(instance.id)
    assert (stored.state, stored.url) == ("running", f"http://{instance.id}.localhost/")
    assert json.loads(stored.public_jwk) == publicJWK(sim.keys[instance.id])
    assert [(e.change, e.instance.state) for e in byUser] == [
        ("state", "starting"),
        ("key", "starting"),
        ("state", "running"),
    ]
    assert byUser[0].previous.state == "requested"
    assert [e.instance for e in byInstance] == [e.instance for e in byUser] == [e.instance for e in everything]

    unsubscribe()
    await portal.hub.send(scheduler.id, "save", instance.id)
    await eventually(stateIs(portal.store, instance.id, "saved"))
    await eventually(lambda: byUser[-1].instance.state == "saved")
    assert [e.instance.state for e in byUser[3:]] == ["stopping", "saving", "uploading", "saved"]
    assert byUser[-1].instance.url is None  # a saved instance has no URL
    assert len(byInstance) == 3

    await portal.hub.send(scheduler.id, "discard", instance.id)
    await eventually(stateIs(portal.store, instance.id, "discarded"))


@pytest_twisted.ensureDeferred
async def test_failures_reach_the_store(portal: Harness) -> None:
    scheduler, key = await portal.scheduler()
    instance = await portal.instance(scheduler.id)
    sim = TestingScheduler(reactor, failures={"start": "the image could not be pulled"})
    await portal.connect(scheduler, key, sim=sim)
    await portal.hub.send(scheduler.id, "start", instance.id, {"image": "x"})
    await eventually(stateIs(portal.store, instance.id, "errored"))
    stored = await portal.store.instanceById(instance.id)
    assert stored.reason == "the image could not be pulled"


@pytest_twisted.ensureDeferred
async def test_illegal_transitions_ignored(portal: Harness, logged: list[str]) -> None:
    scheduler, key = await portal.scheduler()
    instance = await portal.instance(scheduler.id)
    await portal.store.updateInstance(instance.id, state="saved")
    raw = await portal.authenticated(scheduler, key)
    raw.send({"type": "state", "instance": instance.id, "state": "running", "url": "http://x.localhost/"})
    raw.send({"type": "state", "instance": instance.id, "state": "discarded"})
    await eventually(stateIs(portal.store, instance.id, "discarded"))
    assert any("from saved to running: not allowed; ignored" in line for line in logged)
    # Nothing comes back from the dead.
    raw.send({"type": "state", "instance": instance.id, "state": "errored", "reason": "boom"})
    raw.send({"type": "report", "instances": []})
    await eventually(lambda: any("reported 0 instances" in line for line in logged))
    assert (await portal.store.instanceById(instance.id)).state == "discarded"


@pytest_twisted.ensureDeferred
async def test_unknown_and_foreign_instances_ignored(portal: Harness, logged: list[str]) -> None:
    scheduler, key = await portal.scheduler()
    other, _ = await portal.scheduler("other")
    theirs = await portal.instance(other.id)
    ours = await portal.instance(scheduler.id)
    raw = await portal.authenticated(scheduler, key)
    raw.send({"type": "state", "instance": theirs.id, "state": "errored", "reason": "mine now"})
    raw.send({"type": "state", "instance": "hzzzzzzzzzzzzzzzz", "state": "running"})
    raw.send({"type": "instance-key", "instance": theirs.id, "jwk": publicJWK(generatePrivateKey())})
    raw.send({"type": "state", "instance": ours.id, "state": "starting"})
    await eventually(stateIs(portal.store, ours.id, "starting"))
    assert (await portal.store.instanceById(theirs.id)) == theirs
    assert any(f"instance {theirs.id}, which is not placed on it; ignored" in line for line in logged)
    assert any("unknown instance hzzzzzzzzzzzzzzzz; ignored" in line for line in logged)
    assert portal.hub.connected(scheduler.id)


@pytest_twisted.ensureDeferred
async def test_instance_keys(portal: Harness, logged: list[str]) -> None:
    scheduler, key = await portal.scheduler()
    instance = await portal.instance(scheduler.id)
    raw = await portal.authenticated(scheduler, key)
    instanceKey = generatePrivateKey()
    private = dict(publicJWK(instanceKey))
    private["d"] = "c2VjcmV0"
    raw.send({"type": "instance-key", "instance": instance.id, "jwk": private})
    raw.send({"type": "instance-key", "instance": instance.id, "jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}})
    raw.send({"type": "state", "instance": instance.id, "state": "starting"})
    await eventually(stateIs(portal.store, instance.id, "starting"))
    assert (await portal.store.instanceById(instance.id)).public_jwk is None
    assert any("private key members (d)" in line for line in logged)
    assert not any("c2VjcmV0" in line for line in logged)
    assert any("not an EC P-256 or Ed25519 public key" in line for line in logged)
    # The public half alone is published (with its thumbprint as kid).
    bare = {k: v for k, v in publicJWK(instanceKey).items() if k in ("kty", "crv", "x", "y")}
    raw.send({"type": "instance-key", "instance": instance.id, "jwk": bare})

    async def published() -> bool:
        stored = await portal.store.instanceById(instance.id)
        return stored.public_jwk is not None and json.loads(stored.public_jwk) == publicJWK(instanceKey)

    await eventually(published)
    assert portal.hub.connected(scheduler.id)


# -- reports and reconciliation --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reconciliation_after_reconnect(portal: Harness, logged: list[str]) -> None:
    scheduler, key = await portal.scheduler()
    kept, lost, waiting, stopped = [await portal.instance(scheduler.id) for _ in range(4)]
    sim = await portal.connect(scheduler, key)
    for instance in (kept, lost, stopped):
        await portal.hub.send(scheduler.id, "start", instance.id, {"image": "x"})
        await eventually(stateIs(portal.store, instance.id, "running"))
    await portal.hub.send(scheduler.id, "stop", stopped.id)
    await eventually(stateIs(portal.store, stopped.id, "stopped"))
    await sim.stop()
    await eventually(lambda: not portal.hub.connected(scheduler.id))

    # While the scheduler is away: the node loses one instance, and a
    # command for another waits in the portal.
    sim.forget(lost.id)
    sim.forget(stopped.id)
    await portal.hub.send(scheduler.id, "start", waiting.id, {"image": "x"})
    events: list[InstanceEvent] = []
    portal.hub.subscribe(portal.user.id, events.append)
    await portal.connect(scheduler, key, sim=sim)

    await eventually(stateIs(portal.store, lost.id, "errored"))
    stored = await portal.store.instanceById(lost.id)
    assert (stored.reason, stored.url) == (LOST_REASON, None)
    await eventually(stateIs(portal.store, waiting.id, "running"))
    assert (await portal.store.instanceById(kept.id)).state == "running"
    # Not active: not lost.
    assert (await portal.store.instanceById(stopped.id)).state == "stopped"
    assert [e.previous.state for e in events if e.instance.id == lost.id] == ["running"]
    assert any(f"instance {lost.id} (running) is missing" in line for line in logged)


@pytest_twisted.ensureDeferred
async def test_report_applies_states(portal: Harness) -> None:
    scheduler, key = await portal.scheduler()
    first, second, third, untold = [await portal.instance(scheduler.id) for _ in range(4)]
    await portal.store.updateInstance(third.id, state="running", url="https://c.example/")
    raw = await portal.authenticated(scheduler, key)
    raw.send(
        {
            "type": "report",
            "instances": [
                {"instance": first.id, "state": "running", "reason": None, "url": "https://a.example/"},
                {"instance": second.id, "state": "stopped"},
            ],
        }
    )
    await eventually(stateIs(portal.store, third.id, "errored"))
    assert (await portal.store.instanceById(first.id)).url == "https://a.example/"
    assert (await portal.store.instanceById(second.id)).state == "stopped"
    assert (await portal.store.instanceById(third.id)).reason == LOST_REASON
    # Requested, and no command about it ever made: the scheduler cannot know of it.
    assert (await portal.store.instanceById(untold.id)).state == "requested"


@pytest_twisted.ensureDeferred
async def test_a_discard_the_report_leaves_out_is_finished(portal: Harness, logged: list[str]) -> None:
    """
    The node's word that a discard finished came while the scheduler (or its
    channel) was away: its report, which names every instance its nodes
    hold, leaves the instance out, and the portal takes it as discarded.
    """
    scheduler, key = await portal.scheduler()
    finished, commanded, underWay = [await portal.instance(scheduler.id) for _ in range(3)]
    for instance in (finished, commanded, underWay):
        await portal.store.updateInstance(instance.id, state=State.DISCARDING)
    # A discard command about one is still on its way: the scheduler may not know of it yet.
    await portal.hub.send(scheduler.id, "discard", commanded.id)
    raw = await portal.authenticated(scheduler, key)
    raw.send({"type": "report", "instances": [{"instance": underWay.id, "state": State.DISCARDING.value}]})

    await eventually(lambda: any(f"scheduler {scheduler.id} reported 1 instances" in line for line in logged))
    assert (await portal.store.instanceById(finished.id)).state == State.DISCARDED
    assert (await portal.store.instanceById(commanded.id)).state == State.DISCARDING
    assert (await portal.store.instanceById(underWay.id)).state == State.DISCARDING
    assert any(f"instance {finished.id} (discarding) is missing" in line for line in logged)


# -- protocol violations cost only their channel -----------------------------------------------


@pytest.mark.parametrize(
    "payload, binary, reason",
    [
        (b"{not json", False, "malformed JSON"),
        (b"\xff\xfe", True, "binary message"),
        (b"[1, 2]", False, "not a JSON object"),
        (b'{"kind": "state"}', False, "without a type"),
        (b'{"type": "explode"}', False, "unknown message type 'explode'"),
        (b'{"type": "hello", "scheduler": "x", "proof": "y"}', False, "unknown message type 'hello'"),
        (b'{"type": "state", "instance": "Not An Id!", "state": "running"}', False, "not an instance id"),
        (b'{"type": "state", "instance": "abc", "state": "flying"}', False, "state must be one of"),
        (b'{"type": "state", "instance": "abc", "state": "running", "url": "javascript:x"}', False, "http(s) URL"),
        (b'{"type": "report", "instances": {}}', False, "instances must be a list"),
        (b'{"type": "ack", "id": 7}', False, "id must be a non-empty string"),
        (b'{"type": "ack", "id": NaN}', False, "malformed JSON"),
        (b'{"type": "instance-key", "instance": "abc", "jwk": "x"}', False, "jwk must be a JSON object"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_messages_close_only_that_channel(
    portal: Harness, logged: list[str], payload: bytes, binary: bool, reason: str
) -> None:
    bad, badKey = await portal.scheduler("bad")
    good, goodKey = await portal.scheduler("good")
    instance = await portal.instance(good.id)
    sim = await portal.connect(good, goodKey)
    raw = await portal.authenticated(bad, badKey)
    raw.send(payload, isBinary=binary)
    code, text = await raw.closed
    assert code == CloseCode.PROTOCOL_ERROR
    assert text is not None and reason in text
    assert any(reason in line and f"scheduler {bad.id}" in line for line in logged)
    assert not portal.hub.connected(bad.id)
    # The other channel, and the portal, go on.
    assert portal.hub.connected(good.id)
    commandId = await portal.hub.send(good.id, "start", instance.id, {"image": "x"})
    await _acked(portal, commandId)
    assert [c.id for c in sim.handled] == [commandId]


@pytest_twisted.ensureDeferred
async def test_oversized_message_closes_the_channel(portal: Harness, logged: list[str]) -> None:
    scheduler, key = await portal.scheduler()
    raw = await portal.authenticated(scheduler, key)
    raw.send(b'{"type": "report", "instances": [], "pad": "' + b"x" * MAX_MESSAGE + b'"}')
    code, _ = await raw.closed
    assert code == 1009
    assert not portal.hub.connected(scheduler.id)
    assert any(f"scheduler {scheduler.id}" in line and "closed by the portal (1009" in line for line in logged)


@pytest_twisted.ensureDeferred
async def test_stopping_closes_channels(tmp_path: Path) -> None:
    store = await openStore(f"sqlite://{tmp_path}/portal.db", reactor)
    ticks = Clock()  # the hub's timers: its polls run as the test moves it on
    hub = ChannelHub(ticks, store, issuer=ISSUER, clock=reactor, pollInterval=0.05)
    listening = hub.listen(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    hub.startService()
    assert IInstanceEvents.providedBy(hub)
    scheduler, key = await registerScheduler(store, "hpc")
    raw = await RawChannel.connect(reactor, f"ws://127.0.0.1:{listening.port.getHost().port}")  # type: ignore[union-attr]
    await raw.hello(scheduler.id, key)
    assert (await raw.next())["type"] == "welcome"
    ticks.advance(0.05)  # a poll: nothing pending, nothing sent
    # A command made elsewhere then: the polls send it, after anything the first sent.
    user = await store.createUser("alice")
    image = await store.createImage("Jupyter", "quay.io/jupyter/base-notebook", port=8888)
    instance = await store.createInstance(user.id, image.id, scheduler_id=scheduler.id)
    command = await store.createCommand(scheduler.id, instance.id, "start", {"image": "x"})

    def polled() -> list[Any]:
        ticks.advance(0.05)
        return raw.messages[2:]

    await eventually(polled, what="the command sent by a poll")
    assert [(m.get("type"), m.get("id")) for m in raw.messages[2:]] == [("command", command.id)]
    await hub.stopService()
    code, text = await raw.closed
    assert (code, text) == (CloseCode.SHUTDOWN, "the portal is stopping")
    await store.close()


@pytest_twisted.ensureDeferred
async def test_poll_delivers_commands_made_elsewhere(portal: Harness) -> None:
    """Another portal process stored a command: the poll sends it down this channel."""
    scheduler, key = await portal.scheduler()
    instance = await portal.instance(scheduler.id)
    raw = await portal.authenticated(scheduler, key)
    command = await portal.store.createCommand(scheduler.id, instance.id, "start", {"image": "x"})
    await portal.hub._pollAll()
    message = await raw.next().addTimeout(5, reactor)
    assert message["id"] == command.id


# -- the portal service ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_portal_service_serves_the_channel(tmp_path: Path) -> None:
    from dit4c.portal.app import PortalConfig
    from dit4c.portal.service import PortalService

    service = PortalService(
        reactor,
        database=f"sqlite://{tmp_path}/portal.db",
        dataDir=tmp_path / "data",
        config=PortalConfig(publicURL=ISSUER),
        endpoints=[serverFromString(reactor, "tcp:0:interface=127.0.0.1")],
        channelEndpoints=[serverFromString(reactor, "tcp:0:interface=127.0.0.1")],
    )
    service.startService()
    try:
        await service.ready
        hub = service.channels
        assert hub is not None
        listening = [s for s in hub if getattr(s, "port", None) is not None]
        assert len(listening) == 1
        scheduler, key = await registerScheduler(service.store, "hpc")
        sim = TestingScheduler(reactor)
        sim.connect(f"ws://127.0.0.1:{listening[0].port.getHost().port}", scheduler.id, key, issuer=ISSUER)  # type: ignore[attr-defined]
        assert sim.client is not None
        await sim.client.whenConnected().addTimeout(5, reactor)
        assert hub.connected(scheduler.id)
        await sim.stop()
    finally:
        await service.stopService()


def test_default_has_no_channel_endpoint(tmp_path: Path) -> None:
    from dit4c.portal.app import PortalConfig
    from dit4c.portal.service import PortalService

    service = PortalService(
        reactor, database="sqlite:///:memory:", dataDir=tmp_path, config=PortalConfig(publicURL=ISSUER), endpoints=[]
    )
    assert service.channelEndpoints == []


@pytest_twisted.ensureDeferred
async def test_channel_mounted_in_a_web_site(portal: Harness) -> None:
    """``hub.resource()`` serves the channel beside the pages, at /.dit4c/channel."""
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    root = Resource()
    dit4c = Resource()
    root.putChild(b".dit4c", dit4c)
    dit4c.putChild(b"channel", portal.hub.resource())
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        scheduler, key = await portal.scheduler()
        sim = TestingScheduler(reactor)
        portal.sims.append(sim)
        sim.connect(f"ws://127.0.0.1:{port.getHost().port}", scheduler.id, key)
        assert sim.client is not None
        await sim.client.whenConnected().addTimeout(5, reactor)
        assert portal.hub.connected(scheduler.id)
        await sim.stop()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_registered_key_with_its_own_kid(portal: Harness) -> None:
    key = generatePrivateKey()
    scheduler = await portal.store.createScheduler("hpc", json.dumps({**publicJWK(key), "kid": "hpc-2024"}))
    await portal.authenticated(scheduler, key)
    assert portal.hub.connected(scheduler.id)


@pytest_twisted.ensureDeferred
async def test_unusable_registered_key(portal: Harness, logged: list[str]) -> None:
    scheduler = await portal.store.createScheduler("hpc", json.dumps({"kty": "RSA", "n": "AQAB", "e": "AQAB"}))
    raw = await portal.raw()
    await raw.hello(scheduler.id, generatePrivateKey())
    await _refused(portal, raw, "registered key is not usable", logged)
    assert any("has no usable registered key" in line for line in logged)
