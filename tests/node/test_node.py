"""
The node's record of each instance as the instance's life, with a runtime
whose every step the test finishes (a stand-in for the process and podman
runtimes, which the other node tests run for real) and a ``Clock``:
deadlines, work on one instance in turn, and what a restarted node does
with each record it finds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from standins import Watcher
from support.waiting import eventually
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dit4c.channel.wire import LogChunk
from dit4c.common.life import DEADLINES, State, expiredReason
from dit4c.node.errors import RuntimeError_
from dit4c.node.interfaces import IRuntime, PodSpec, PodStatus
from dit4c.node.node import Node


@implementer(IRuntime)
class SteppedRuntime:
    """Every call waits until the test fires it: ``runtime.step("start")``."""

    name = "stepped"
    #: As the podman runtime: a start would make a stopped pod afresh.
    resumable = False

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.waiting: dict[str, list[Deferred[Any]]] = {}
        self.found: list[PodStatus] = []
        self.answers = False
        self.exits: list[Any] = []
        self.forgotten = False

    def _call(self, what: str, instance: str) -> Deferred[Any]:
        self.calls.append((what, instance))
        d: Deferred[Any] = Deferred()
        self.waiting.setdefault(what, []).append(d)
        return d

    def step(self, what: str, result: Any = None) -> None:
        self.waiting[what].pop(0).callback(result)

    def fail(self, what: str, error: Exception) -> None:
        self.waiting[what].pop(0).errback(error)

    def pending(self, what: str) -> int:
        return len(self.waiting.get(what, []))

    def start(self, spec: PodSpec) -> Deferred[None]:
        return self._call("start", spec.instance)

    def stop(self, instance: str) -> Deferred[None]:
        return self._call("stop", instance)

    def capture(self, instance: str, archive: Path) -> Deferred[str | None]:
        archive.write_bytes(b"saved")
        return self._call("capture", instance)

    def discard(self, instance: str) -> Deferred[None]:
        return self._call("discard", instance)

    def logs(self, instance: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        return succeed(LogChunk.of(b"the tool said this\n", offset, limit))

    def pods(self) -> Deferred[list[PodStatus]]:
        return succeed(list(self.found))

    def ready(self, instance: str) -> Deferred[bool]:
        return succeed(self.answers)

    def forget(self) -> None:
        self.forgotten = True

    def onExit(self, callback: Any) -> None:
        self.exits.append(callback)


class Harness:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.clock = Clock()
        self.runtime = SteppedRuntime()
        self.watcher = Watcher()
        self.node = self.make()

    def make(self, **options: Any) -> Node:
        node = Node(
            self.clock, self.runtime, self.directory, portal="http://portal.test",
            imageServer="http://images.test", uploadCommand=["/bin/true"], **options,
        )  # fmt: skip
        node.subscribe(self.watcher.observer())
        return node

    def states(self, instance: str) -> list[str]:
        return self.watcher.history(instance)

    def record(self, instance: str) -> dict[str, Any]:
        return json.loads((self.directory / instance / "instance.json").read_text())  # type: ignore[no-any-return]

    async def running(self, instance: str = "abc") -> None:
        """The node started, and ``instance`` started on it and answering."""
        self.node.startService()
        await self.node.start(instance, "web", None)
        self.runtime.step("start")
        self.runtime.answers = True
        self.clock.advance(1)

    async def stopped(self, instance: str = "abc") -> None:
        """:meth:`running`, then stopped."""
        await self.running(instance)
        self.node.stop(instance)
        self.runtime.step("stop")
        await self.node.whenIdle()


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "pods")


def test_the_stand_in_is_a_runtime(h: Harness) -> None:
    verifyObject(IRuntime, h.runtime)


@pytest_twisted.ensureDeferred
async def test_a_start_past_its_deadline_is_errored_and_stopped(h: Harness) -> None:
    h.node.startService()
    await h.node.start("abc", "web", None)
    assert h.record("abc")["state"] == "starting"
    h.clock.advance(DEADLINES[State.STARTING] - 1)
    assert h.states("abc") == ["starting"]
    h.clock.advance(1)
    assert h.states("abc") == ["starting", "errored"]
    assert h.watcher.states[-1].reason == expiredReason(State.STARTING)
    # What was under way is given up: once the start settles, what it made is
    # stopped (by the start, and by the expiry, which cannot know how far it got).
    h.runtime.step("start")
    assert h.runtime.calls == [("start", "abc"), ("stop", "abc")]
    h.runtime.step("stop")
    assert h.runtime.calls == [("start", "abc"), ("stop", "abc"), ("stop", "abc")]  # in turn, never both at once
    h.runtime.step("stop")
    await h.node.whenIdle()
    assert h.record("abc")["state"] == "errored"


@pytest_twisted.ensureDeferred
async def test_a_stop_waits_for_the_start_under_way(h: Harness) -> None:
    h.node.startService()
    await h.node.start("abc", "web", None)
    h.node.stop("abc")  # it settles later: the start under way comes first
    # The instance is stopping at once; the runtime is asked to stop only once
    # the start it is making has settled (never both at once).
    assert h.states("abc") == ["starting", "stopping"]
    assert [c for c, _ in h.runtime.calls] == ["start"]
    h.runtime.step("start")  # the start sees it is no longer wanted, and stops what it made
    assert [c for c, _ in h.runtime.calls] == ["start", "stop"]
    h.runtime.step("stop")
    assert [c for c, _ in h.runtime.calls] == ["start", "stop", "stop"]  # then the stop asked for
    h.runtime.step("stop")
    await h.node.whenIdle()
    assert h.states("abc")[-1] == "stopped"


@pytest_twisted.ensureDeferred
async def test_a_runtime_that_cannot_resume_leaves_the_instance_stopped_and_says_why(h: Harness) -> None:
    await h.stopped()
    assert h.states("abc")[-1] == "stopped"
    await h.node.resume("abc")
    assert h.states("abc")[-1] == "stopped" and [c for c, _ in h.runtime.calls].count("start") == 1
    assert "cannot resume" in (h.watcher.states[-1].reason or "")


@pytest_twisted.ensureDeferred
async def test_a_failed_start_says_why(h: Harness) -> None:
    h.node.startService()
    await h.node.start("abc", "web", None)
    h.runtime.fail("start", RuntimeError_("This compute node has no tool called 'web'."))
    assert h.states("abc") == ["starting", "errored"]
    assert h.watcher.states[-1].reason == "This compute node has no tool called 'web'."


@pytest_twisted.ensureDeferred
async def test_a_discard_that_cannot_remove_everything_stays_errored_and_can_be_tried_again(h: Harness) -> None:
    await h.stopped()
    assert h.states("abc")[-1] == "stopped"
    h.node.discard("abc")
    h.runtime.fail("discard", OSError("/pods/abc/mnt is still mounted"))
    assert h.states("abc")[-2:] == ["discarding", "errored"]
    assert "still mounted" in (h.watcher.states[-1].reason or "")
    h.node.discard("abc")
    h.runtime.step("discard")
    await h.node.whenIdle()
    assert h.states("abc")[-2:] == ["discarding", "discarded"]
    assert not (h.directory / "abc").exists()
    assert h.node.instances() == []


@pytest_twisted.ensureDeferred
async def test_discard_of_a_running_instance_the_portal_gave_up_on(h: Harness) -> None:
    await h.running()
    assert h.states("abc")[-1] == "running"
    h.node.discard("abc")
    assert h.states("abc")[-2:] == ["errored", "discarding"]
    assert h.watcher.states[-2].reason == "Discarded while running."
    h.runtime.step("discard")
    await h.node.whenIdle()
    assert h.states("abc")[-1] == "discarded"


def _recorded(h: Harness, instance: str, state: str, **more: Any) -> None:
    directory = h.directory / instance
    directory.mkdir(parents=True)
    record = {"instance": instance, "image": "web", "port": None, "digest": None, "state": state, **more}
    (directory / "instance.json").write_text(json.dumps(record))


@pytest_twisted.ensureDeferred
async def test_a_restarted_node_takes_every_pod_back_on_its_own(h: Harness) -> None:
    for instance, state in [
        ("runs", "running"), ("died", "running"), ("halted", "stopping"),
        ("capturing", "saving"), ("going", "discarding"), ("done", "stopped"), ("broken", "errored"),
    ]:  # fmt: skip
        _recorded(h, instance, state)
    (h.directory / "capturing" / "saved-image.partial").write_bytes(b"half")
    h.runtime.found = [
        PodStatus("runs", True),
        PodStatus("died", False, "Not running: tool."),
        PodStatus("halted", False),
        PodStatus("broken", True),
        PodStatus("stranger", True),  # a pod with no record
    ]
    h.node.startService()
    await h.node.whenReported()
    # Reported at once, before the work of taking each back is done.
    statuses = {s.instance: s.state for s in h.node.instances()}
    assert statuses["runs"] == "running" and statuses["done"] == "stopped"
    assert h.states("died") == ["errored"]
    assert [s.reason for s in h.watcher.states if s.instance == "died"] == [
        "The instance stopped while its compute node was restarting. Not running: tool."
    ]
    # After its partial archive is removed (work done in a thread comes back through the real reactor).
    await eventually(lambda: ("stop", "capturing") in h.runtime.calls, what=lambda: f"stopped: {h.runtime.calls}")
    calls = sorted(h.runtime.calls)
    assert ("discard", "stranger") in calls  # nothing can use it any more
    assert ("stop", "died") in calls and ("stop", "broken") in calls and ("stop", "halted") in calls
    assert ("discard", "going") in calls
    assert ("stop", "capturing") in calls  # stopped for sure before it is captured again
    assert not (h.directory / "capturing" / "saved-image.partial").exists()
    # One that fails costs only itself.
    stranger = [i for i, (what, who) in enumerate(c for c in h.runtime.calls if c[0] == "discard") if who == "stranger"]
    h.runtime.waiting["discard"].pop(stranger[0]).errback(OSError("busy"))
    while h.runtime.pending("stop"):
        h.runtime.step("stop")
    assert h.states("halted")[-1] == "stopped"
    assert statuses["runs"] == "running" and h.node._state("runs") is State.RUNNING


@pytest_twisted.ensureDeferred
async def test_a_deadline_outlives_a_restart(h: Harness) -> None:
    h.clock.advance(1000)
    _recorded(h, "slow", "stopping", since=1000 - DEADLINES[State.STOPPING] + 5)
    h.node.startService()
    await h.node.whenReported()
    assert h.node._state("slow") is State.STOPPING
    h.clock.advance(5)
    assert h.node._state("slow") is State.ERRORED
    assert h.watcher.states[-1].reason == expiredReason(State.STOPPING)


@pytest.mark.parametrize(
    "verdict, text, state, reason",
    [
        ("done", '{"url": "http://images.test/images/x"}', "saved", None),
        ("failed", "the image server refused it: 507", "errored",
         "The saved image could not be uploaded: the image server refused it: 507"),
    ],
    ids=["finished", "failed"],
)  # fmt: skip
@pytest_twisted.ensureDeferred
async def test_an_upload_that_ended_while_the_node_was_away(
    h: Harness, verdict: str, text: str, state: str, reason: str | None
) -> None:
    """Judged by the verdict the upload helper left; the archive and the verdict are removed."""
    _recorded(h, "up", "uploading", captured="sha256:" + "0" * 64)
    (h.directory / "up" / "saved-image.tar").write_bytes(b"saved")
    (h.directory / "up" / f"saved-image.tar.{verdict}").write_text(text)
    h.node.startService()
    await h.node.whenReported()
    await h.node.whenIdle()
    assert h.states("up")[-1] == state
    assert h.watcher.states[-1].reason == reason
    assert sorted(p.name for p in (h.directory / "up").iterdir()) == ["instance.json"]


@pytest_twisted.ensureDeferred
async def test_a_lost_capture_is_said(h: Harness) -> None:
    _recorded(h, "up", "uploading", captured=None)
    h.node.startService()
    await h.node.whenReported()
    await h.node.whenIdle()
    assert h.watcher.states[-1].reason == "The captured image was lost while its compute node restarted; save again."


def test_a_move_the_life_does_not_allow_is_refused(h: Harness) -> None:
    _recorded(h, "old", "saved")
    h.node.startService()
    assert h.node._set("old", State.RUNNING, None) is False
    assert h.record("old")["state"] == "saved"


@pytest_twisted.ensureDeferred
async def test_a_resume_on_a_node_that_cannot_take_it_says_why_and_stays_stopped(h: Harness) -> None:
    h.runtime.resumable = True
    await h.stopped()
    h.node.accepting = False  # cooled down by an administrator
    await h.node.resume("abc")
    assert h.states("abc")[-1] == "stopped"
    assert h.watcher.states[-1].reason == "Node local is cooling down for maintenance and takes no instance now; try again later."
    h.node.accepting, h.node.capacity = True, 0
    await h.node.resume("abc")
    assert h.watcher.states[-1].reason == "Node local has no room for it now; try again later."
    assert [c for c, _ in h.runtime.calls].count("start") == 1  # neither resume started anything
