"""
Instances left unused: the helpers' reports of use (``POST /reports/activity``,
sent by :class:`dit4c.listener.activity.ActivityReporter`), and the portal's
culler, which stops or saves a running instance past its catalogue entry's
idle limit as its owner would, with the reason kept.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest_twisted
from portal_client import Client, tokenFor
from test_reports import World, post, sign, world  # noqa: F401  (the fixture)
from twisted.internet import reactor

from dit4c.common.life import State
from dit4c.common.limits import ToolLimits
from dit4c.listener.activity import ActivityReporter
from dit4c.portal.app import Portal
from dit4c.portal.culling import IdleCuller, idleDeadline

# -- the helpers' reports --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_report_of_use_moves_the_instance_on(world: World) -> None:  # noqa: F811
    w = world
    now = w.clock.seconds()
    status, body = await post(w, "/reports/activity", sign(w, w.keyA, w.a, active_at=now - 5))
    assert (status, body) == (200, {"instance": w.a.id, "active_at": now - 5})
    assert (await w.store.instanceById(w.a.id)).active_at == now - 5
    assert w.events and w.events[-1].id == w.a.id  # the owner's pages hear it
    # An older report keeps the later time; one from the future counts as now.
    assert (await post(w, "/reports/activity", sign(w, w.keyA, w.a, active_at=now - 60)))[1]["active_at"] == now - 5
    assert (await post(w, "/reports/activity", sign(w, w.keyA, w.a, active_at=now + 3600)))[1]["active_at"] == now
    # The rules of every report: a replay, another instance's key, a bad claim, a stopped instance.
    token = sign(w, w.keyA, w.a, active_at=now)
    await post(w, "/reports/activity", token)
    assert (await post(w, "/reports/activity", token))[1]["error"] == "replayed"
    assert (await post(w, "/reports/activity", sign(w, w.keyB, w.a, active_at=now)))[0] == 401
    for bad in ("soon", None, True, float("inf")):
        status, body = await post(w, "/reports/activity", sign(w, w.keyA, w.a, active_at=bad))
        assert status == 400 and "active_at" in body["reason"], bad
    await w.store.updateInstance(w.a.id, state=State.STOPPED)
    status, body = await post(w, "/reports/activity", sign(w, w.keyA, w.a, active_at=now))
    assert (status, body["error"]) == (409, "wrong_state")


class Tunnel:
    """What the reporter reads of a listener: its tunnel's session counters."""

    def __init__(self) -> None:
        self.session = SimpleNamespace(streamsOpened=0, bytesIn=0)


@pytest_twisted.ensureDeferred
async def test_the_listener_reports_use_at_most_once_a_look(world: World) -> None:  # noqa: F811
    w = world
    listener = SimpleNamespace(tunnel=None)
    reporter = ActivityReporter(reactor, listener, w.base, w.a.id, w.keyA, interval=60, clock=w.clock)  # type: ignore[arg-type]
    assert reporter.look() is None  # no tunnel yet: nothing to say
    listener.tunnel = tunnel = Tunnel()  # type: ignore[assignment]
    assert reporter.look() is None  # a new tunnel that carried nothing is no use
    tunnel.session.streamsOpened = 1  # a browser opened a connection
    w.clock.advance(60)
    await reporter.look()
    assert reporter.reported == w.clock.seconds() == (await w.store.instanceById(w.a.id)).active_at
    w.clock.advance(60)
    assert reporter.look() is None  # nothing came since: nothing sent
    tunnel.session.bytesIn += 40  # a WebSocket's frames
    w.clock.advance(60)
    await reporter.look()
    assert (await w.store.instanceById(w.a.id)).active_at == w.clock.seconds()
    # A reconnect is a new session: only what it carries counts.
    listener.tunnel = Tunnel()  # type: ignore[assignment]
    w.clock.advance(60)
    assert reporter.look() is None
    # A portal that will not take it (the instance stopped) is not asked again.
    listener.tunnel.session.bytesIn = 10  # type: ignore[attr-defined]
    await w.store.updateInstance(w.a.id, state=State.STOPPED)
    w.clock.advance(60)
    await reporter.look()
    assert reporter.pending is None


# -- the culler ---------------------------------------------------------------------------------------


async def runningInstance(api: Portal, limits: ToolLimits) -> tuple[Any, dict[str, Any]]:
    root = Client(api, await tokenFor(api, "root", "root password!"))
    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    code, image = await root.call("POST", "/admin/images", {"name": "Lab", "ref": "lab", "limits": limits.toJSON()})
    assert code == 201
    code, instance = await alice.call("POST", "/instances", {"image": image["id"]})
    assert code == 201
    await api.store.updateInstance(instance["id"], state=State.RUNNING)
    return alice, instance


@pytest_twisted.ensureDeferred
async def test_an_unused_instance_is_stopped_once_its_limit_passed(api: Portal) -> None:
    alice, instance = await runningInstance(api, ToolLimits(idle=30))
    culler = IdleCuller(api.store, api.instances, api.clock, interval=30)
    running = await api.store.instanceById(instance["id"])
    assert idleDeadline(running, ToolLimits(idle=30)) == running.updated + 30 * 60  # type: ignore[arg-type,union-attr]

    api.clock.advance(20 * 60)  # type: ignore[attr-defined]
    assert await culler.look() == 0
    await api.store.markActive(instance["id"], api.clock.seconds())  # used at minute 20
    api.clock.advance(25 * 60)  # type: ignore[attr-defined]
    assert await culler.look() == 0  # 25 min since its use
    api.clock.advance(5 * 60)  # type: ignore[attr-defined]
    assert await culler.look() == 1
    stopped = await api.store.instanceById(instance["id"])
    assert (stopped.state, stopped.reason) == (State.STOPPING, "Stopped after 30 min without use.")  # type: ignore[union-attr]
    assert api.commands.sent[-1][1:3] == ("stop", instance["id"])  # type: ignore[attr-defined]
    assert await culler.look() == 0  # no longer running: nothing more to do
    # The owner sees why, and can resume it.
    code, seen = await alice.call("GET", f"/instances/{instance['id']}")
    assert seen["reason"] == "Stopped after 30 min without use."


@pytest_twisted.ensureDeferred
async def test_an_unused_instance_is_saved_if_its_entry_says_so(api: Portal) -> None:
    _, instance = await runningInstance(api, ToolLimits(idle=5, idleAction="save"))
    culler = IdleCuller(api.store, api.instances, api.clock)
    culler.startService()  # its own looks, on the clock
    try:
        api.clock.advance(5 * 60 + 30)  # type: ignore[attr-defined]
        from support.waiting import eventually

        await eventually(lambda: culler.culled == 1, what="the culler's look")
    finally:
        culler.stopService()
    assert api.commands.sent[-1][1:3] == ("save", instance["id"])  # type: ignore[attr-defined]
    assert (await api.store.instanceById(instance["id"])).reason == "Saved after 5 min without use."  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_instances_without_an_idle_limit_run_on(api: Portal) -> None:
    _, instance = await runningInstance(api, ToolLimits(cpus=1.0))
    culler = IdleCuller(api.store, api.instances, api.clock)
    api.clock.advance(365 * 24 * 3600)  # type: ignore[attr-defined]
    assert await culler.look() == 0
    assert (await api.store.instanceById(instance["id"])).state is State.RUNNING  # type: ignore[union-attr]
