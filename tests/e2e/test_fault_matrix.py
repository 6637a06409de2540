"""
The fault matrix: an instance's life survives any server being killed at
any step.

For each server kind (``dit4c-dev``, which is all of them in one process,
and the portal, the scheduler, the node, the routing server, the image
server and the file server of an installation of separate processes) and
each step of an instance's life (starting, running, stopping, resuming,
saving, uploading, discarding), a new instance of a person whose quota is
one is held in the step, the server is killed (SIGKILL), the hold let go,
and the server started again. Then:

- within 30 s the portal and the node agree on the instance's state (a
  discarded instance: the portal says so and the node holds no record);
- it finishes its step, or is errored with a reason: never stuck; a resume
  is never errored: it runs, or is stopped again with the reason, and the
  file the person wrote before the stop is there as it was;
- it is driven to its end (stopped if it runs, then discarded), and a new
  instance starts, runs, is saved and discarded (and, if no stop came after
  the fault, another is stopped): start, stop, save and discard all work
  afterwards;
- after each discard no process of the pod is left (nothing in the process
  table works in its directory, names it or carries its id), no mount under
  the node's directory and no partial file (a capture, a fetched image, an
  upload in the image server's spool);
- the person's active instances, as the API lists them, are what runs, and
  their quota of one lets a new instance start once the held one is at rest,
  and no second one beside it.

Each step is held deterministically, never by a race: the tool
(``gatedtool.py``) serves only once its ``serve`` file exists (starting) and
ends on SIGTERM only once its ``end`` file exists (stopping: the node's stop
grace is a minute); a capture reads every file of the working directory, and
one of them is under a write lease of the test, so its ``open`` waits until
the lease is let go (saving); a stopped instance whose ``serve`` file is
removed is resumed, and its tool, started again, waits to serve (resuming); the upload helper, once connected to the image
server, writes how much of the image it has sent (nothing yet) to a file
that is under a lease, and waits there (uploading); a discard reads the
pod's pid files (to kill what they name) before it removes anything, and the
tool's is under a lease (discarding). A kill with part of an image sent is
not held so (nothing the helper does between two chunks waits on a file):
the image server's spool is checked all the same.

One installation per server kind serves its seven steps, in one test (each
step a subtest), so that a parallel run never makes two of them. The
resume's case checks what comes after the fault on the resumed instance
itself (a second start refused by the quota, then a save and a discard)
rather than on new instances, which the other six cases do.
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from cluster import Cluster
from support.waiting import eventually

from dit4c.common.life import ACTIVE, HOLDS_POD, TRANSIENT, State
from dit4c.common.mounts import mountPoints
from dit4c.node.processes import podProcesses
from dit4c.upload.helper import progressFile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "portal"))
from portal_client import Client  # noqa: E402

pytestmark = pytest.mark.slow

SERVERS = ("dev", "portal", "scheduler", "node", "routing", "images", "files")


class Step(enum.StrEnum):
    """A step of an instance's life in which a server is killed."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    #: A stopped instance started again on its node (``starting`` there).
    RESUMING = "resuming"
    SAVING = "saving"
    UPLOADING = "uploading"
    DISCARDING = "discarding"


STEPS = tuple(Step)
#: The instance's state while each step is held.
HELD_IN = {step: State.STARTING if step is Step.RESUMING else State(step.value) for step in Step}

#: The tool whose life the test holds, as the node's tool table names it.
GATED = "test/gated"
GATED_TOOL = Path(__file__).resolve().parent / "gatedtool.py"
#: Where each step ends when it finishes.
FINISHED = {
    Step.STARTING: State.RUNNING,
    Step.RUNNING: State.RUNNING,
    Step.STOPPING: State.STOPPED,
    Step.RESUMING: State.RUNNING,
    Step.SAVING: State.SAVED,
    Step.UPLOADING: State.SAVED,
    Step.DISCARDING: State.DISCARDED,
}
#: Where each step may end instead (with a reason): errored; a resume, stopped again with its files kept.
INSTEAD = {step: State.STOPPED if step is Step.RESUMING else State.ERRORED for step in Step}
#: What the person wrote in the tool's working directory before a resume's stop, and finds there after it.
KEPT = "kept.txt"
#: Seconds the portal and the node have to agree once the server is back.
AGREE = 30.0
#: Seconds a stopping tool has before it is killed: longer than any hold.
STOP_GRACE = 60
#: The image a node captures for a save, in the pod's directory.
ARCHIVE = "saved-image.tar"


# -- holding a step ------------------------------------------------------------------------------


class Lease:
    """
    A write lease on a file (made if missing): whoever opens it waits until
    the lease is let go (or the kernel's ``fs.lease-break-time``, 45 s, has
    passed).
    """

    def __init__(self, path: Path) -> None:
        if not path.exists():
            path.write_bytes(b"held")
        self.fd: int | None = os.open(path, os.O_RDONLY)
        fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)

    @property
    def waited(self) -> bool:
        """Whether someone is waiting to open the file (the lease is being broken)."""
        return self.fd is not None and fcntl.fcntl(self.fd, fcntl.F_GETLEASE) != fcntl.F_WRLCK

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- one installation per server kind --------------------------------------------------------------


class Matrix:
    """An installation, the person whose instances the cases use, and what the cases do with them."""

    def __init__(self, cluster: Cluster, server: str) -> None:
        self.cluster = cluster
        self.server = server
        self.people = 0
        self.client: Client | None = None
        self.leases: dict[str, Lease] = {}

    async def ready(self) -> None:
        """The installation up (started the first time; any server a failed case left dead started again)."""
        if not self.cluster.processes:
            await self.cluster.start()
        for name in self.cluster.servers:
            if not self.cluster.running(name):
                await self.cluster.startAgain(name)
        # A person of their own, whose quota is one instance.
        self.people += 1
        token = await self.cluster.apiToken(f"p{self.people}", max_instances=1)
        self.client = Client(SimpleNamespace(testURL=f"http://127.0.0.1:{self.cluster.portalPort}"), token)

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        assert self.client is not None
        return await self.client.call(method, path, body)

    def pod(self, instance: str) -> Path:
        return self.cluster.podsDirectory() / instance

    # -- states ------------------------------------------------------------------------

    async def portalState(self, instance: str) -> tuple[State, str | None]:
        code, body = await self.api("GET", f"/instances/{instance}")
        assert code == 200, body
        return State(body["state"]), body["reason"]

    def nodeState(self, instance: str) -> State | None:
        """The node's state of ``instance``; None if it holds no record (discarded)."""
        record = self.cluster.nodeRecord(instance)
        return State(record["state"]) if record is not None else None

    async def agreed(self, instance: str) -> State | None:
        """The state the portal and the node agree on, or None if they do not."""
        portal, _ = await self.portalState(instance)
        node = self.nodeState(instance)
        if node is None and portal is State.DISCARDED:
            return State.DISCARDED
        return portal if portal is node else None

    async def until(self, what: str, check: Any, timeout: float) -> Any:
        """
        Until ``check()`` (awaited if need be) is true; its value. A look
        every quarter second: most looks ask the portal's API, and the
        installations of a parallel run look at once, on the CPU their
        servers need.
        """
        return await eventually(check, timeout, interval=0.25, what=f"{self.server}: {what}")

    async def waitFor(self, instance: str, state: State, timeout: float = 60.0) -> None:
        """Until the portal and the node agree that ``instance`` is in ``state``."""

        async def there() -> bool:
            return await self.agreed(instance) is state

        try:
            await self.until(f"{instance} {state.value}", there, timeout)
        except AssertionError:
            portal = await self.portalState(instance)
            raise AssertionError(
                f"{self.server}: wanted {state.value}; portal says {portal}, node says {self.nodeState(instance)}"
            ) from None

    # -- actions -------------------------------------------------------------------------

    async def start(self) -> str:
        code, body = await self.api("POST", "/instances", {"image": self.cluster.imageIds[GATED]})
        assert code == 201, body
        instance: str = body["id"]
        try:
            await self.until(f"{instance}'s working directory", (self.pod(instance) / "work").is_dir, 30)
        except AssertionError as e:
            raise AssertionError(f"{e}; the portal says {await self.portalState(instance)}") from None
        return instance

    async def act(self, instance: str, action: str) -> None:
        code, body = await self.api("POST", f"/instances/{instance}/{action}")
        assert code == 200, (action, body)

    def gate(self, instance: str, *names: str) -> None:
        for name in names:
            (self.pod(instance) / "work" / name).touch()

    async def running(self) -> str:
        """A new instance, running."""
        instance = await self.start()
        self.gate(instance, "serve", "end")
        await self.waitFor(instance, State.RUNNING, 60)
        return instance

    # -- holding each step ------------------------------------------------------------------

    async def hold(self, step: Step) -> str:
        """A new instance, held in ``step``."""
        instance = await self.start()
        pod = self.pod(instance)
        if step is Step.STARTING:
            # Its pod made, its tool waiting to serve.
            await self.until("the tool started", (pod / "tool.pid").exists, 30)
            await self.waitFor(instance, State.STARTING, 30)
            return instance
        self.gate(instance, "serve")
        if step is not Step.STOPPING:
            self.gate(instance, "end")
        if step is Step.SAVING:
            self.leases[instance] = Lease(pod / "work" / "held")
        await self.waitFor(instance, State.RUNNING, 60)
        if step is Step.RUNNING:
            return instance
        if step is Step.STOPPING:
            await self.act(instance, "stop")
            await self.waitFor(instance, State.STOPPING, 30)
        elif step is Step.RESUMING:
            # A file of the person's, the instance stopped, then resumed: its tool, started again, waits to serve.
            (pod / "work" / KEPT).write_text(instance)
            await self.act(instance, "stop")
            await self.waitFor(instance, State.STOPPED, 30)
            before = toolPid(pod)
            (pod / "work" / "serve").unlink()
            await self.act(instance, "resume")
            await self.until("the tool started again", lambda: toolPid(pod) not in (None, before), 30)
            await self.waitFor(instance, State.STARTING, 30)
        elif step is Step.SAVING:
            await self.act(instance, "save")
            lease = self.leases[instance]
            await self.until("the capture reached the held file", lambda: lease.waited, 60)
            await self.waitFor(instance, State.SAVING, 30)
        elif step is Step.UPLOADING:
            # What the upload helper writes its progress to (then renames) as it starts sending the image.
            lease = self.leases[instance] = Lease(progressFile(str(pod / ARCHIVE)).with_suffix(".tmp"))
            await self.act(instance, "save")
            await self.until("the upload helper sending", lambda: lease.waited, 60)
            await self.waitFor(instance, State.UPLOADING, 30)
        elif step is Step.DISCARDING:
            await self.act(instance, "stop")
            await self.waitFor(instance, State.STOPPED, 30)
            lease = self.leases[instance] = Lease(pod / "tool.pid")
            await self.act(instance, "discard")
            await self.until("the removal reached the held pid file", lambda: lease.waited, 60)
            await self.until("the node discarding", lambda: self.nodeState(instance) is State.DISCARDING, 30)
        return instance

    def stillIn(self, instance: str, step: Step) -> None:
        """Right after the kill: the instance was still in ``step`` (its hold held)."""
        assert self.nodeState(instance) is HELD_IN[step], f"{self.server}: {self.nodeState(instance)} at the kill"

    def release(self, instance: str, step: Step) -> None:
        """Let go of what held ``instance`` in ``step``."""
        if step is Step.STARTING:
            self.gate(instance, "serve", "end")
        elif step is Step.RESUMING:
            self.gate(instance, "serve")
        elif step is Step.STOPPING:
            self.gate(instance, "end")
        elif step in (Step.SAVING, Step.UPLOADING, Step.DISCARDING):
            self.leases.pop(instance).release()

    # -- what must hold ---------------------------------------------------------------------

    async def settle(self, instance: str, step: Step) -> State:
        """The state ``instance`` comes to rest in, once the portal and the node agree on it."""
        try:
            await self.until("the portal and the node agree", lambda: self.agreed(instance), AGREE)
        except AssertionError:
            portal = await self.portalState(instance)
            raise AssertionError(
                f"{self.server}, {step.value}: no agreement within {AGREE:g} s: "
                f"portal says {portal}, node says {self.nodeState(instance)}"
            ) from None

        async def atRest() -> State | None:
            state = await self.agreed(instance)
            return state if state is not None and state not in TRANSIENT else None

        final: State = await self.until(f"{instance} out of {step.value}", atRest, 120)
        reason = (await self.portalState(instance))[1]
        assert final in (FINISHED[step], INSTEAD[step]), f"{self.server}, {step.value}: ended {final.value} ({reason})"
        if final is INSTEAD[step]:
            assert reason, f"{self.server}, {step.value}: {final.value} with no reason"
        return final

    async def toEnd(self, instance: str, state: State) -> None:
        """Through the allowed actions to its end: stopped if it runs, then discarded."""
        if state is State.RUNNING:
            await self.act(instance, "stop")
            await self.waitFor(instance, State.STOPPED)
            state = State.STOPPED
        if state is not State.DISCARDED:
            await self.act(instance, "discard")
            await self.waitFor(instance, State.DISCARDED)
        await self.nothingLeft(instance)

    async def nothingLeft(self, instance: str) -> None:
        """Nothing of a discarded instance anywhere: its directory, processes, mounts, partial files."""
        pod = self.pod(instance)
        assert not pod.exists(), f"{self.server}: {pod} is left"
        assert podProcesses(pod, instance) == [], f"{self.server}: processes of {instance} are left"
        nodeDirectory = str(self.cluster.podsDirectory())
        assert [p for p in mountPoints() if p.startswith(nodeDirectory + "/")] == [], f"{self.server}: mounts left"
        partial = [
            str(path)
            for pattern in ("*.partial", "saved-image.*", "image.tar*")
            for path in self.cluster.podsDirectory().rglob(pattern)
        ]
        assert partial == [], f"{self.server}: partial files left"
        spool = self.cluster.dataDirectory / "images" / "tmp"
        assert not spool.exists() or list(spool.iterdir()) == [], f"{self.server}: unfinished uploads left"

    async def quotaCounts(self) -> None:
        """The person's active instances, as the API lists them, are those whose pods run."""
        code, listed = await self.api("GET", "/instances")
        assert code == 200, listed
        active = {i["id"] for i in listed if not i["shared"] and State(i["state"]) in ACTIVE}
        pods = self.cluster.podsDirectory()
        held = {i["id"] for i in listed if self.nodeState(i["id"]) in HOLDS_POD}
        runs = {i["id"] for i in listed if podProcesses(pods / i["id"], i["id"])}
        assert active == held == runs, f"{self.server}: active {active}, held {held}, running {runs}"

    async def afterwards(self, stopped: bool) -> None:
        """
        A new instance starts (the quota of one counts right: another is
        refused while it is active), runs, is saved and discarded; and,
        unless a stop was seen since the fault (``stopped``), another starts,
        is stopped and discarded.
        """
        instance = await self.running()
        await self.quotaCounts()
        code, body = await self.api("POST", "/instances", {"image": self.cluster.imageIds[GATED]})
        assert (code, body["error"]) == (409, "quota"), f"{self.server}: {code} {body}"
        await self.act(instance, "save")
        await self.waitFor(instance, State.SAVED, 90)
        await self.act(instance, "discard")
        await self.waitFor(instance, State.DISCARDED)
        await self.nothingLeft(instance)
        if not stopped:
            await self.toEnd(await self.running(), State.RUNNING)
        await self.quotaCounts()

    async def afterResume(self, instance: str, state: State) -> None:
        """
        The person's file as they wrote it before the stop; and after the
        fault, on the instance itself: resumed, it counts against the quota
        (a second start is refused), is saved and discarded; stopped again,
        it is resumed first.
        """
        kept = self.pod(instance) / "work" / KEPT
        assert kept.read_text() == instance, f"{self.server}: the person's file is not as it was"
        if state is State.STOPPED:
            await self.act(instance, "resume")
            await self.waitFor(instance, State.RUNNING, 60)
        code, body = await self.api("POST", "/instances", {"image": self.cluster.imageIds[GATED]})
        assert (code, body["error"]) == (409, "quota"), f"{self.server}: {code} {body}"
        await self.act(instance, "save")
        await self.waitFor(instance, State.SAVED, 90)
        await self.act(instance, "discard")
        await self.waitFor(instance, State.DISCARDED)
        await self.nothingLeft(instance)
        await self.quotaCounts()


def toolPid(pod: Path) -> int | None:
    """The pid the pod's tool was last started with (its pid file stays after a stop), or None."""
    try:
        return int(json.loads((pod / "tool.pid").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def nodeOptions(directory: Path) -> tuple[str, ...]:
    """The node's (or dit4c-dev's) options: the gated tool, and a stop grace longer than any hold."""
    directory.mkdir(parents=True, exist_ok=True)
    tools = directory / "tools.json"
    tools.write_text(json.dumps({"tools": {GATED: {"command": ["{python}", str(GATED_TOOL), "{socket}", "{dir}"]}}}))
    return ("--tools", str(tools), "--stop-grace", str(STOP_GRACE))


@contextmanager
def installation(server: str, directory: Path) -> Iterator[Matrix]:
    """An installation whose ``server`` the cases kill."""
    cluster = Cluster(
        directory / "c",
        images=True,
        files=True,
        nodeOptions=nodeOptions(directory),
        catalogue={"Gated": GATED},
        allInOne=server == "dev",
    )
    # Lease holders hear (SIGIO) when someone opens a leased file: nothing to do here.
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)
    try:
        yield Matrix(cluster, server)
    finally:
        cluster.stop()
        signal.signal(signal.SIGIO, previous)


async def case(matrix: Matrix, step: Step) -> None:
    """``matrix.server`` killed with a new instance held in ``step``: nothing is stranded."""
    await matrix.ready()
    cluster = matrix.cluster
    instance = await matrix.hold(step)

    cluster.kill(matrix.server)
    matrix.stillIn(instance, step)
    matrix.release(instance, step)
    await cluster.startAgain(matrix.server)

    final = await matrix.settle(instance, step)
    await matrix.quotaCounts()
    if step is Step.RESUMING:
        await matrix.afterResume(instance, final)
        return
    await matrix.toEnd(instance, final)
    await matrix.quotaCounts()
    # A stop seen since the fault: the held one's, or the one that ends a running instance.
    await matrix.afterwards(stopped=final in (State.STOPPED, State.RUNNING))


@pytest.mark.parametrize("server", SERVERS)
@pytest_twisted.ensureDeferred
async def test_a_killed_server_strands_nothing(server: str, tmp_path: Path, subtests: pytest.Subtests) -> None:
    """
    Each step in turn, on one installation: a step's own subtest reports it,
    and a step that fails does not hide the next (the next case starts again
    any server the failed one left dead).
    """
    with installation(server, tmp_path) as matrix:
        for step in STEPS:
            with subtests.test(step=step.value):
                await case(matrix, step)
